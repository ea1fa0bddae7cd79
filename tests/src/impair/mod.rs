//! The impairment harness: two network namespaces joined only by a userspace link that can
//! lose, delay, jitter, reorder, duplicate, rate-limit, blackhole or firewall (UDP blocked)
//! the packets between them and rebind side A's UDP NAT mapping; plus a flow-hashing L4
//! balancer like a cloud network load balancer. Both work on raw IP, so QUIC and TCP pairs
//! (hybridge, nginx, HAProxy) cross the same impaired path.
//!
//! Needs root (namespaces, veths, TUN); without it `Link::start` says so. Everything is
//! removed when the `Link` drops, including processes started inside its namespaces.
//!
//! # Address plan
//!
//! ```text
//!            host namespace                 namespace A              namespace B
//!  10.202.x.1 hbi{K}a ──veth── hbi{K}ap 10.202.x.2
//!                                     tun0 10.201.0.1/24 ═relay═ tun0 10.201.0.2/24
//!  10.202.x.5 hbi{K}b ──veth─────────────────────────────── hbi{K}bp 10.202.x.6
//! ```
//!
//! - `tunnel_address(side)` (10.201.0.1 / 10.201.0.2, on the TUNs): what the two sides dial
//!   each other on. The only route between A and B, so everything between them is impaired.
//!   The same in every link (each link's namespaces have their own routing tables); the rest
//!   of 10.201.0.0/24 is free for `rebind_udp` to move A's apparent address to.
//! - `address(side)` (10.202.x.2 / 10.202.x.6, on each veth): where the test process reaches
//!   what runs inside (admin API, import listeners). Clean, never impaired.
//! - `host_address(side)` (10.202.x.1 / 10.202.x.5, the veths' host ends): where something
//!   listening in the host (an upstream, a load generator's target) is reached from inside.
//!
//! Link index K (0..8191) is unique on the machine; its block is 10.202.0.0 + 8·K (a /30 per
//! side). The namespaces have no default route: A cannot reach B's veth, only B's TUN.

mod balancer;
pub mod control;
mod nat;
mod netns;
mod packet;
mod profile;
mod relay;
mod shaper;
mod sys;

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

pub use balancer::{BackendState, Balancer, BalancerCounters, BalancerOptions, HealthMode};
pub use netns::in_namespace;
pub use profile::Impairment;
pub use relay::{Counters, Direction};
pub use shaper::DropReason;

use netns::Namespace;
use relay::{LinkState, Relay};

/// One end of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    A,
    B,
}

impl Side {
    fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// How to build a link.
#[derive(Clone, Debug)]
pub struct LinkOptions {
    /// Part of the namespace names (letters, digits, `_`), to tell links apart.
    pub name: String,
    /// Seeds the loss, jitter, reorder and duplicate decisions.
    pub seed: u64,
    /// The impairment in both directions from the start.
    pub impairment: Impairment,
}

impl LinkOptions {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            seed: 1,
            impairment: Impairment::clean(),
        }
    }
}

struct SideInfo {
    namespace: Namespace,
    host_interface: String,
    tunnel: Ipv4Addr,
    address: Ipv4Addr,
    host: Ipv4Addr,
}

/// Two namespaces joined by an impaired userspace link; see the module doc for addresses.
pub struct Link {
    relay: Option<Relay>,
    state: Arc<LinkState>,
    sides: Option<[SideInfo; 2]>,
    host_veths: Vec<HostVeth>,
    seed: u64,
    rebindings: AtomicU32,
}

impl Link {
    /// A clean link whose namespaces carry `name`; panics with the reason if it cannot be
    /// made (e.g. not root).
    pub fn new(name: &str) -> Link {
        Link::start(LinkOptions::new(name)).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn start(options: LinkOptions) -> anyhow::Result<Link> {
        netns::check_privileges()?;
        static STALE_REMOVED: std::sync::Once = std::sync::Once::new();
        STALE_REMOVED.call_once(netns::remove_stale);

        let (index, host_veths) = claim_index()?;
        let label: String = options
            .name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect();
        let block = u32::from(Ipv4Addr::new(10, 202, 0, 0)) + 8 * index;
        let mut sides = Vec::new();
        let mut tuns = Vec::new();
        for (side, letter) in [(Side::A, "a"), (Side::B, "b")] {
            let name = format!(
                "{}{}-{index}-{label}-{letter}",
                netns::NAME_PREFIX,
                std::process::id()
            );
            let namespace = Namespace::create(name)?;
            let offset = 4 * side.index() as u32;
            let info = SideInfo {
                namespace,
                host_interface: host_veths[side.index()].0.clone(),
                tunnel: Ipv4Addr::new(10, 201, 0, 1 + side.index() as u8),
                address: Ipv4Addr::from(block + offset + 2),
                host: Ipv4Addr::from(block + offset + 1),
            };
            tuns.push(configure_side(&info, &host_veths[side.index()].0)?);
            sides.push(info);
        }
        let state = Arc::new(LinkState::default());
        for direction in Direction::BOTH {
            state.set(direction, options.impairment.clone());
        }
        let tun_b = tuns.pop().context("side B's TUN")?;
        let tun_a = tuns.pop().context("side A's TUN")?;
        let relay = Relay::start(tun_a, tun_b, state.clone(), options.seed)
            .context("starting the relay thread")?;
        let sides: [SideInfo; 2] = sides
            .try_into()
            .map_err(|_| anyhow::anyhow!("a link has two sides"))?;
        Ok(Link {
            relay: Some(relay),
            state,
            sides: Some(sides),
            host_veths,
            seed: options.seed,
            rebindings: AtomicU32::new(0),
        })
    }

    fn side(&self, side: Side) -> &SideInfo {
        match &self.sides {
            Some(sides) => &sides[side.index()],
            None => unreachable!("sides are only taken on drop"),
        }
    }

    /// The impairment in both directions from now on.
    pub fn set(&self, impairment: Impairment) {
        for direction in Direction::BOTH {
            self.state.set(direction, impairment.clone());
        }
    }

    /// The impairment in one direction from now on.
    pub fn set_direction(&self, direction: Direction, impairment: Impairment) {
        self.state.set(direction, impairment);
    }

    pub fn impairment(&self, direction: Direction) -> Impairment {
        self.state.profile(direction)
    }

    pub fn counters(&self, direction: Direction) -> Counters {
        self.state.counters(direction)
    }

    /// Rebinds side A's NAT: from now on each UDP flow from A reaches B from a new port (and
    /// from `address`, inside 10.201.0.0/24, if given), and B's replies to the old mapping
    /// are dropped, as after a NAT timeout. TCP is not translated.
    pub fn rebind_udp(&self, address: Option<Ipv4Addr>) {
        let generation = self.rebindings.fetch_add(1, Ordering::Relaxed) + 1;
        let spread = (self.seed as u32)
            .wrapping_mul(7919)
            .wrapping_add(generation * 4099);
        let first_port = 20_000 + (spread % 40_000) as u16;
        self.state.nat().rebind(address, first_port);
    }

    /// The namespace of `side` (for `ip netns exec`, `ip -n`).
    pub fn namespace(&self, side: Side) -> &str {
        &self.side(side).namespace.name
    }

    /// The address of `side` on the impaired link: what the other side dials.
    pub fn tunnel_address(&self, side: Side) -> Ipv4Addr {
        self.side(side).tunnel
    }

    /// The address of `side` on its clean veth to the host: what the test process dials.
    pub fn address(&self, side: Side) -> Ipv4Addr {
        self.side(side).address
    }

    /// The host's end of `side`'s veth: where `side` reaches a listener in the host.
    pub fn host_address(&self, side: Side) -> Ipv4Addr {
        self.side(side).host
    }

    /// The host end of `side`'s veth (`hbi{K}a`, `hbi{K}b`).
    pub fn host_interface(&self, side: Side) -> &str {
        &self.side(side).host_interface
    }

    /// `ip netns exec NS program`: a command to run inside `side`; whatever it starts is
    /// killed when the link drops.
    pub fn command(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.side(side).namespace.command(program)
    }

    /// Runs `f` inside `side`'s namespace (on a short-lived thread) and returns its result;
    /// sockets it creates stay in that namespace.
    pub fn enter<T: Send>(&self, side: Side, f: impl FnOnce() -> T + Send) -> T {
        in_namespace(self.namespace(side), f)
            .unwrap_or_else(|e| panic!("entering namespace {}: {e}", self.namespace(side)))
    }

    /// Names and addresses, as `impair link --print-addresses` prints them.
    pub fn describe(&self) -> serde_json::Value {
        let side = |side: Side| {
            serde_json::json!({
                "namespace": self.namespace(side),
                "tunnel_address": self.tunnel_address(side).to_string(),
                "address": self.address(side).to_string(),
                "host_address": self.host_address(side).to_string(),
                "host_interface": self.host_interface(side),
            })
        };
        serde_json::json!({ "a": side(Side::A), "b": side(Side::B) })
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Processes first (they hold sockets in the namespaces), then the TUN devices (the
        // relay owns them), then the veths, so nothing outlives the link.
        let sides = self.sides.take();
        if let Some(sides) = &sides {
            for side in sides {
                side.namespace.kill_processes();
            }
        }
        self.relay.take();
        self.host_veths.clear();
        drop(sides);
    }
}

/// The host end of a veth pair, deleted (with its peer) on drop.
struct HostVeth(String);

impl Drop for HostVeth {
    fn drop(&mut self) {
        let _ = netns::ip(&["link", "del", &self.0]);
    }
}

/// Claims a link index no other link on the machine holds, by creating its two veth pairs
/// (creating an interface whose name exists fails, atomically).
fn claim_index() -> anyhow::Result<(u32, Vec<HostVeth>)> {
    const INDICES: u32 = 8192;
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(97) + CALLS.fetch_add(1, Ordering::Relaxed) * 13;
    'index: for attempt in 0..256 {
        let index = (start + attempt) % INDICES;
        let mut veths = Vec::new();
        for letter in ["a", "b"] {
            let host = format!("hbi{index}{letter}");
            let peer = format!("{host}p");
            match netns::ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]) {
                Ok(()) => veths.push(HostVeth(host)),
                Err(e) if e.to_string().contains("File exists") => continue 'index,
                Err(e) => return Err(e),
            }
        }
        return Ok((index, veths));
    }
    anyhow::bail!("no free link index after 256 tries (stale hbi* interfaces?)")
}

/// Moves the veth peer into the side's namespace, addresses both ends, and creates the
/// side's TUN device; returns the TUN.
fn configure_side(side: &SideInfo, host_interface: &str) -> anyhow::Result<std::fs::File> {
    let namespace = side.namespace.name.as_str();
    let peer = format!("{host_interface}p");
    let host_cidr = format!("{}/30", side.host);
    let inner_cidr = format!("{}/30", side.address);
    let tunnel_cidr = format!("{}/24", side.tunnel);
    netns::ip(&["link", "set", &peer, "netns", namespace])?;
    netns::ip(&["addr", "add", &host_cidr, "dev", host_interface])?;
    netns::ip(&["link", "set", host_interface, "up"])?;
    netns::ip(&["-n", namespace, "addr", "add", &inner_cidr, "dev", &peer])?;
    netns::ip(&["-n", namespace, "link", "set", &peer, "up"])?;
    let tun = in_namespace(namespace, || sys::open_tun("tun0"))
        .and_then(|opened| opened)
        .with_context(|| format!("creating tun0 in namespace {namespace}"))?;
    netns::ip(&["-n", namespace, "addr", "add", &tunnel_cidr, "dev", "tun0"])?;
    // The kernel drops what the relay has not read once a TUN's queue (500 packets by
    // default) is full, where the link's counters cannot see it: a burst from a fast sender
    // would look like loss the link never chose. A deep queue leaves the choice to the link.
    netns::ip(&[
        "-n",
        namespace,
        "link",
        "set",
        "tun0",
        "txqueuelen",
        "20000",
    ])?;
    netns::ip(&["-n", namespace, "link", "set", "tun0", "up"])?;
    Ok(tun)
}
