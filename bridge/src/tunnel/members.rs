//! Keeping a link to every listening node of a peer site.
//!
//! Behind a flow-hashing load balancer, a dialling node's links land on whichever nodes the
//! hash picks, and a request entering a node without a link to the caller's site has no
//! route. So a listening site announces its nodes' own tunnel addresses
//! (`tunnel.announce`, sent in the hello and in updates), and a dialling node whose
//! `[[peer]] member_networks` holds them keeps one more link to each: the load balancer
//! address only bootstraps, as in Consul peering or Skupper.
//!
//! A peer cannot point this node at arbitrary hosts: only socket-address literals inside
//! `member_networks` are dialled (at most `MAX_ANNOUNCED_MEMBERS` a site), and a member
//! link is authenticated like any other (its certificate must name the peer's site). An
//! address no node of the site announces any more is left: its link drains, so nothing in
//! flight fails. While the site has no link at all, the last members are kept dialling —
//! they are a way back in when the load balancer is what failed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::dialer::Slot;
use super::peers::PeerSet;
use crate::config::{HostPort, MAX_ANNOUNCED_MEMBERS, PeerConfig};

/// Starts a dialer for a slot (on a worker of the caller's choosing).
pub(crate) type SpawnSlot = Arc<dyn Fn(Slot) + Send + Sync>;

/// What a site's links announced, sorted into what to dial and what to refuse.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Selection {
    /// Member addresses to keep a link to (inside `member_networks`, not the configured
    /// address itself).
    pub(crate) dial: BTreeSet<SocketAddr>,
    /// Announced addresses outside `member_networks`.
    pub(crate) refused: BTreeSet<SocketAddr>,
}

/// Sorts the union of what the site's links announced.
pub(crate) fn select<'a>(
    peer: &PeerConfig,
    announced: impl IntoIterator<Item = &'a SocketAddr>,
) -> Selection {
    let configured: Option<SocketAddr> = peer.address.as_str().parse().ok();
    let mut selection = Selection::default();
    for &address in announced {
        if Some(address) == configured {
            continue;
        }
        if peer
            .member_networks
            .iter()
            .any(|net| net.contains(&address.ip()))
        {
            if selection.dial.len() < MAX_ANNOUNCED_MEMBERS {
                selection.dial.insert(address);
            }
        } else {
            selection.refused.insert(address);
        }
    }
    selection
}

/// Follows what `peer`'s site announces for as long as the node runs, starting a dialer
/// slot for each new member and letting go of members no longer announced.
pub(crate) async fn follow(
    peer: PeerConfig,
    peers: Arc<PeerSet>,
    spawn: SpawnSlot,
    cancel: CancellationToken,
) {
    let mut changes = peers.subscribe();
    let mut slots: BTreeMap<SocketAddr, CancellationToken> = BTreeMap::new();
    let mut refused_told = BTreeSet::new();
    loop {
        let links = peers.links();
        let site_links: Vec<_> = links.iter().filter(|l| l.site() == peer.site).collect();
        // With no link to the site there is nobody to hear from: keep the members we have.
        if !site_links.is_empty() {
            let announced: Vec<Arc<Vec<SocketAddr>>> =
                site_links.iter().map(|l| l.members()).collect();
            let selection = select(&peer, announced.iter().flat_map(|m| m.iter()));
            if !selection.refused.is_empty() && selection.refused != refused_told {
                warn!(peer = %peer.address, site = %peer.site, refused = ?selection.refused, networks = ?peer.member_networks,
                    "the peer site announces member addresses outside `member_networks`; they are not dialled");
                refused_told = selection.refused;
            }
            slots.retain(|address, leave| {
                let keep = selection.dial.contains(address);
                if !keep {
                    info!(peer = %peer.address, site = %peer.site, member = %address, "member no longer announced; its link drains");
                    leave.cancel();
                }
                keep
            });
            for &address in &selection.dial {
                if slots.contains_key(&address) {
                    continue;
                }
                let Ok(member) = HostPort::parse(&address.to_string()) else {
                    continue;
                };
                info!(peer = %peer.address, site = %peer.site, member = %address, "keeping a link to an announced member");
                let slot = Slot {
                    peer: PeerConfig {
                        address: member,
                        connections: 1,
                        member_networks: Vec::new(),
                        ..peer.clone()
                    },
                    index: 0,
                    learned: true,
                    leave: cancel.child_token(),
                };
                slots.insert(address, slot.leave.clone());
                spawn(slot);
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            () = cancel.cancelled() => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(address: &str, networks: &[&str]) -> PeerConfig {
        PeerConfig {
            address: HostPort::parse(address).unwrap(),
            site: "cloud".into(),
            name: None,
            connections: 2,
            member_networks: networks.iter().map(|n| n.parse().unwrap()).collect(),
        }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn members_inside_the_networks_are_dialled_and_the_rest_refused() {
        let announced = addrs(&[
            "10.0.1.5:4433",
            "10.0.2.5:4433",
            "192.168.1.9:4433",
            "[fd00::5]:4433",
            "10.0.1.5:4433",
        ]);
        let s = select(&peer("nlb.example:4433", &["10.0.0.0/16"]), &announced);
        assert_eq!(
            s.dial,
            addrs(&["10.0.1.5:4433", "10.0.2.5:4433"])
                .into_iter()
                .collect()
        );
        assert_eq!(
            s.refused,
            addrs(&["192.168.1.9:4433", "[fd00::5]:4433"])
                .into_iter()
                .collect()
        );
        let s = select(&peer("nlb.example:4433", &["fd00::/8"]), &announced);
        assert_eq!(s.dial, addrs(&["[fd00::5]:4433"]).into_iter().collect());
    }

    #[test]
    fn nothing_is_learned_without_networks_and_the_configured_address_is_not_dialled_twice() {
        let announced = addrs(&["10.0.1.5:4433", "10.0.2.5:4433"]);
        let s = select(&peer("10.0.1.5:4433", &[]), &announced);
        assert!(s.dial.is_empty());
        assert_eq!(s.refused, addrs(&["10.0.2.5:4433"]).into_iter().collect());
        let s = select(&peer("10.0.1.5:4433", &["10.0.0.0/8"]), &announced);
        assert_eq!(s.dial, addrs(&["10.0.2.5:4433"]).into_iter().collect());
    }

    #[test]
    fn a_site_cannot_make_a_node_dial_more_than_the_bound() {
        let announced: Vec<SocketAddr> = (0..500)
            .map(|i| SocketAddr::from(([10, 0, (i / 200) as u8, (i % 200) as u8], 4433)))
            .collect();
        let s = select(&peer("nlb:4433", &["10.0.0.0/8"]), &announced);
        assert_eq!(s.dial.len(), MAX_ANNOUNCED_MEMBERS);
    }
}
