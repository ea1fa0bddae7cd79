//! The userspace wire between the two TUN devices: one thread reads IP packets from either
//! side, passes them through the NAT and that direction's shaper, and writes them to the
//! other side when their time comes (a timer queue, so one delayed packet holds up none of
//! the others).
//!
//! It runs on its own thread and runtime, so a test's runtime (or a test blocking its only
//! thread) cannot stall the link.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::nat::Nat;
use super::packet::{self, Endpoint};
use super::profile::Impairment;
use super::shaper::{DropReason, Shaper, Verdict};
use super::sys;

/// A direction across the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    AtoB,
    BtoA,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::AtoB, Direction::BtoA];

    fn index(self) -> usize {
        match self {
            Direction::AtoB => 0,
            Direction::BtoA => 1,
        }
    }
}

/// What crossed the link in one direction, and what did not and why. Counts only grow.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Packets (and their bytes) written to the far side; a duplicate counts twice.
    pub packets: u64,
    pub bytes: u64,
    pub blackholed: u64,
    pub udp_blocked: u64,
    pub lost: u64,
    pub queue_dropped: u64,
    pub nat_unmapped: u64,
    pub write_failed: u64,
    pub reordered: u64,
    pub duplicated: u64,
    /// UDP datagrams whose endpoint the rebinding NAT rewrote.
    pub translated: u64,
}

impl Counters {
    /// Every packet dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.blackholed
            + self.udp_blocked
            + self.lost
            + self.queue_dropped
            + self.nat_unmapped
            + self.write_failed
    }
}

#[derive(Default)]
struct AtomicCounters {
    packets: AtomicU64,
    bytes: AtomicU64,
    blackholed: AtomicU64,
    udp_blocked: AtomicU64,
    lost: AtomicU64,
    queue_dropped: AtomicU64,
    nat_unmapped: AtomicU64,
    write_failed: AtomicU64,
    reordered: AtomicU64,
    duplicated: AtomicU64,
    translated: AtomicU64,
}

impl AtomicCounters {
    fn dropped(&self, reason: DropReason) {
        let counter = match reason {
            DropReason::Blackhole => &self.blackholed,
            DropReason::UdpBlocked => &self.udp_blocked,
            DropReason::Loss => &self.lost,
            DropReason::Queue => &self.queue_dropped,
            DropReason::NatUnmapped => &self.nat_unmapped,
            DropReason::Write => &self.write_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Counters {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Counters {
            packets: read(&self.packets),
            bytes: read(&self.bytes),
            blackholed: read(&self.blackholed),
            udp_blocked: read(&self.udp_blocked),
            lost: read(&self.lost),
            queue_dropped: read(&self.queue_dropped),
            nat_unmapped: read(&self.nat_unmapped),
            write_failed: read(&self.write_failed),
            reordered: read(&self.reordered),
            duplicated: read(&self.duplicated),
            translated: read(&self.translated),
        }
    }
}

/// What the test changes while the relay runs, and what the relay reports back.
#[derive(Default)]
pub(crate) struct LinkState {
    profiles: Mutex<[Impairment; 2]>,
    nat: Mutex<Nat>,
    counters: [AtomicCounters; 2],
}

impl LinkState {
    pub(crate) fn set(&self, direction: Direction, profile: Impairment) {
        self.profiles.lock().unwrap_or_else(PoisonError::into_inner)[direction.index()] = profile;
    }

    pub(crate) fn profile(&self, direction: Direction) -> Impairment {
        self.profiles.lock().unwrap_or_else(PoisonError::into_inner)[direction.index()].clone()
    }

    pub(crate) fn counters(&self, direction: Direction) -> Counters {
        self.counters[direction.index()].snapshot()
    }

    pub(crate) fn nat(&self) -> std::sync::MutexGuard<'_, Nat> {
        self.nat.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The relay thread; stopping it (on drop) closes both TUN devices.
pub(crate) struct Relay {
    cancel: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    pub(crate) fn start(
        side_a: File,
        side_b: File,
        state: Arc<LinkState>,
        seed: u64,
    ) -> io::Result<Relay> {
        let cancel = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (side_a, side_b) = {
            let _context = runtime.enter();
            (sys::register_tun(side_a)?, sys::register_tun(side_b)?)
        };
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("impair-relay".into())
            .spawn(move || {
                let wire = Wire {
                    sides: [side_a, side_b],
                    state,
                    shapers: [
                        Shaper::new(seed),
                        Shaper::new(seed.rotate_left(32) ^ 0x5bd1),
                    ],
                    queue: BinaryHeap::new(),
                    sequence: 0,
                };
                runtime.block_on(wire.run(stop));
            })?;
        Ok(Relay {
            cancel,
            thread: Some(thread),
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A packet waiting for its time; ordered by time, then by arrival, so packets due at the
/// same instant leave in the order they came.
struct Scheduled {
    at: Instant,
    sequence: u64,
    direction: Direction,
    packet: Vec<u8>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.sequence) == (other.at, other.sequence)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.sequence).cmp(&(other.at, other.sequence))
    }
}

/// Packets read per side per wake-up, so a flood one way cannot starve the other.
const BURST: usize = 64;

struct Wire {
    /// Side A's TUN, side B's TUN.
    sides: [AsyncFd<File>; 2],
    state: Arc<LinkState>,
    shapers: [Shaper; 2],
    queue: BinaryHeap<Reverse<Scheduled>>,
    sequence: u64,
}

impl Wire {
    async fn run(mut self, cancel: CancellationToken) {
        let mut buffer = vec![0u8; 65_536];
        loop {
            let next = self.queue.peek().map(|Reverse(s)| s.at);
            let due = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let (direction, packets) = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                ready = self.sides[0].readable() => match ready {
                    Ok(mut guard) => (Direction::AtoB, read_burst(&mut guard, &mut buffer)),
                    Err(_) => return,
                },
                ready = self.sides[1].readable() => match ready {
                    Ok(mut guard) => (Direction::BtoA, read_burst(&mut guard, &mut buffer)),
                    Err(_) => return,
                },
                () = due => (Direction::AtoB, Vec::new()),
            };
            self.admit(direction, packets);
            self.release(Instant::now());
        }
    }

    fn admit(&mut self, direction: Direction, packets: Vec<Vec<u8>>) {
        if packets.is_empty() {
            return;
        }
        let profile = self.state.profile(direction);
        let state = self.state.clone();
        let counters = &state.counters[direction.index()];
        let now = Instant::now();
        for mut packet in packets {
            let summary = packet::summarize(&packet);
            if let Some((source, destination)) = summary.and_then(|s| s.udp)
                && let Err(reason) = self.translate(direction, &mut packet, source, destination)
            {
                counters.dropped(reason);
                continue;
            }
            let protocol = summary.map(|s| s.protocol);
            let shaper = &mut self.shapers[direction.index()];
            match shaper.admit(&profile, packet.len(), protocol, now) {
                Verdict::Drop(reason) => counters.dropped(reason),
                Verdict::Deliver {
                    at,
                    duplicate,
                    reordered,
                } => {
                    if reordered {
                        counters.reordered.fetch_add(1, Ordering::Relaxed);
                    }
                    if duplicate {
                        counters.duplicated.fetch_add(1, Ordering::Relaxed);
                        self.schedule(at, direction, packet.clone());
                    }
                    self.schedule(at, direction, packet);
                }
            }
        }
    }

    /// Applies side A's NAT to a UDP datagram crossing in `direction`.
    fn translate(
        &self,
        direction: Direction,
        packet: &mut [u8],
        source: SocketAddrV4,
        destination: SocketAddrV4,
    ) -> Result<(), DropReason> {
        let counters = &self.state.counters[direction.index()];
        let mut nat = self.state.nat();
        let rewrite = match direction {
            Direction::AtoB => nat.outward(source).map(|to| (Endpoint::Source, to)),
            Direction::BtoA => match nat.inward(destination) {
                Ok(to) => to.map(|to| (Endpoint::Destination, to)),
                Err(()) => return Err(DropReason::NatUnmapped),
            },
        };
        if let Some((endpoint, to)) = rewrite
            && packet::rewrite_udp(packet, endpoint, to)
        {
            counters.translated.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn schedule(&mut self, at: Instant, direction: Direction, packet: Vec<u8>) {
        self.sequence += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            sequence: self.sequence,
            direction,
            packet,
        }));
    }

    fn release(&mut self, now: Instant) {
        while self.queue.peek().is_some_and(|Reverse(s)| s.at <= now) {
            let Some(Reverse(scheduled)) = self.queue.pop() else {
                break;
            };
            let (target, counters) = match scheduled.direction {
                Direction::AtoB => (&self.sides[1], &self.state.counters[0]),
                Direction::BtoA => (&self.sides[0], &self.state.counters[1]),
            };
            // A TUN write takes the whole packet or none of it.
            match target.get_ref().write(&scheduled.packet) {
                Ok(written) if written == scheduled.packet.len() => {
                    counters.packets.fetch_add(1, Ordering::Relaxed);
                    let bytes = scheduled.packet.len() as u64;
                    counters.bytes.fetch_add(bytes, Ordering::Relaxed);
                }
                Ok(_) | Err(_) => counters.dropped(DropReason::Write),
            }
        }
    }
}

/// Reads up to `BURST` packets that are ready now.
fn read_burst(
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, File>,
    buffer: &mut [u8],
) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    while packets.len() < BURST {
        match guard.try_io(|tun| tun.get_ref().read(buffer)) {
            Ok(Ok(len)) if len > 0 => packets.push(buffer[..len].to_vec()),
            // `Err` is WouldBlock: readiness is already cleared.
            Err(_) => break,
            // A TUN read fails (or returns nothing) only while the device goes away: wait
            // for the next readiness edge instead of spinning on the error.
            Ok(_) => {
                guard.clear_ready();
                break;
            }
        }
    }
    packets
}
