//! The NAT in front of side A, for rebinding: once `rebind` is called, every UDP flow from A
//! leaves from a new external port (and optionally a new address), as a NAT whose mapping
//! timed out would send it, and replies to mappings from before the rebinding are dropped.
//!
//! Until the first rebinding it is transparent. TCP is never translated.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

#[derive(Default)]
pub(crate) struct Nat {
    /// `None` until the first rebinding.
    active: Option<Mapping>,
}

struct Mapping {
    address: Option<Ipv4Addr>,
    next_port: u16,
    outward: HashMap<SocketAddrV4, SocketAddrV4>,
    inward: HashMap<SocketAddrV4, SocketAddrV4>,
}

impl Nat {
    /// Forgets every mapping; from now on A's UDP flows leave from fresh ports starting at
    /// `first_port` (and from `address` if given).
    pub(crate) fn rebind(&mut self, address: Option<Ipv4Addr>, first_port: u16) {
        self.active = Some(Mapping {
            address,
            next_port: first_port.max(1024),
            outward: HashMap::new(),
            inward: HashMap::new(),
        });
    }

    /// The source an outgoing datagram from `internal` carries, if it is translated.
    pub(crate) fn outward(&mut self, internal: SocketAddrV4) -> Option<SocketAddrV4> {
        let mapping = self.active.as_mut()?;
        if let Some(external) = mapping.outward.get(&internal) {
            return Some(*external);
        }
        let address = mapping.address.unwrap_or(*internal.ip());
        let external = loop {
            let candidate = SocketAddrV4::new(address, mapping.next_port);
            mapping.next_port = mapping.next_port.checked_add(1).unwrap_or(1024);
            if !mapping.inward.contains_key(&candidate) {
                break candidate;
            }
        };
        mapping.outward.insert(internal, external);
        mapping.inward.insert(external, internal);
        Some(external)
    }

    /// Where a reply to `external` goes: `Ok(None)` untranslated (no rebinding yet),
    /// `Ok(Some(internal))` translated, `Err(())` if nothing maps it (drop it).
    pub(crate) fn inward(&self, external: SocketAddrV4) -> Result<Option<SocketAddrV4>, ()> {
        match &self.active {
            None => Ok(None),
            Some(mapping) => mapping.inward.get(&external).copied().map(Some).ok_or(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparent_until_rebound_then_maps_both_ways() {
        let a: SocketAddrV4 = "10.201.0.1:5000".parse().unwrap();
        let mut nat = Nat::default();
        assert_eq!(nat.outward(a), None);
        assert_eq!(nat.inward(a), Ok(None));

        nat.rebind(None, 30_000);
        let first = nat.outward(a).unwrap();
        assert_eq!(first, "10.201.0.1:30000".parse().unwrap());
        assert_eq!(nat.outward(a), Some(first), "one flow keeps its mapping");
        assert_eq!(nat.inward(first), Ok(Some(a)));
        assert_eq!(nat.inward(a), Err(()), "the old port no longer reaches A");

        nat.rebind(Some("10.201.0.77".parse().unwrap()), 40_000);
        let second = nat.outward(a).unwrap();
        assert_eq!(second, "10.201.0.77:40000".parse().unwrap());
        assert_eq!(
            nat.inward(first),
            Err(()),
            "replies to the old mapping are dropped"
        );
        assert_eq!(nat.inward(second), Ok(Some(a)));
    }
}
