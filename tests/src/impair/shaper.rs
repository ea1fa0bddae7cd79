//! One direction's impairment decisions: given a packet's size and protocol, the current
//! profile and the time it arrived, whether it is dropped (and why) or when it leaves.
//!
//! No I/O and no clock: the relay passes `now` in, and the randomness comes from a seeded
//! generator, so a test that sends the same packets sees the same losses.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::packet::PROTOCOL_UDP;
use super::profile::Impairment;

/// Why a packet did not cross the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Blackhole,
    UdpBlocked,
    Loss,
    /// The rate limit's queue was full.
    Queue,
    /// A UDP reply to a port the rebinding NAT no longer maps.
    NatUnmapped,
    /// Writing to the far TUN device failed (its queue was full).
    Write,
}

/// What happens to one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Drop(DropReason),
    Deliver {
        at: Instant,
        /// Delivered twice (the `duplicate` share).
        duplicate: bool,
        /// Held back so that later packets overtake it.
        reordered: bool,
    },
}

pub(crate) struct Shaper {
    random: StdRng,
    /// When the rate limit's transmitter is free again.
    busy_until: Option<Instant>,
    /// When the last packet that was not reordered leaves: jitter never sends one earlier.
    last_in_order: Option<Instant>,
}

impl Shaper {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            random: StdRng::seed_from_u64(seed),
            busy_until: None,
            last_in_order: None,
        }
    }

    pub(crate) fn admit(
        &mut self,
        profile: &Impairment,
        len: usize,
        protocol: Option<u8>,
        now: Instant,
    ) -> Verdict {
        if profile.blackhole {
            return Verdict::Drop(DropReason::Blackhole);
        }
        if profile.block_udp && protocol == Some(PROTOCOL_UDP) {
            return Verdict::Drop(DropReason::UdpBlocked);
        }
        if profile.loss > 0.0 && self.random.random_bool(profile.loss) {
            return Verdict::Drop(DropReason::Loss);
        }
        let mut departure = now;
        if let Some(rate) = profile.rate {
            let start = self.busy_until.filter(|busy| *busy > now).unwrap_or(now);
            let nanos = len as u128 * 1_000_000_000 / u128::from(rate.max(1));
            let transmit = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            if start + transmit - now > profile.queue_limit {
                return Verdict::Drop(DropReason::Queue);
            }
            departure = start + transmit;
            self.busy_until = Some(departure);
        }
        let mut at = departure + profile.delay;
        if !profile.jitter.is_zero() {
            let jitter = profile.jitter.as_secs_f64();
            let offset = self.random.random_range(-jitter..=jitter);
            at = if offset >= 0.0 {
                at + Duration::from_secs_f64(offset)
            } else {
                at.checked_sub(Duration::from_secs_f64(-offset))
                    .unwrap_or(departure)
                    .max(departure)
            };
        }
        let reordered = profile.reorder > 0.0 && self.random.random_bool(profile.reorder);
        if reordered {
            at += profile.reorder_gap;
        } else {
            at = self.last_in_order.map_or(at, |last| at.max(last));
            self.last_in_order = Some(at);
        }
        let duplicate = profile.duplicate > 0.0 && self.random.random_bool(profile.duplicate);
        Verdict::Deliver {
            at,
            duplicate,
            reordered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliveries(
        shaper: &mut Shaper,
        profile: &Impairment,
        now: Instant,
        n: usize,
    ) -> Vec<Verdict> {
        (0..n)
            .map(|_| shaper.admit(profile, 1000, Some(6), now))
            .collect()
    }

    #[test]
    fn clean_link_delivers_now() {
        let now = Instant::now();
        let verdict = Shaper::new(1).admit(&Impairment::clean(), 1500, Some(17), now);
        assert_eq!(
            verdict,
            Verdict::Deliver {
                at: now,
                duplicate: false,
                reordered: false
            }
        );
    }

    #[test]
    fn blackhole_and_udp_block_drop_by_reason() {
        let now = Instant::now();
        let mut shaper = Shaper::new(1);
        let blocked = Impairment {
            block_udp: true,
            ..Impairment::clean()
        };
        assert_eq!(
            shaper.admit(&blocked, 100, Some(17), now),
            Verdict::Drop(DropReason::UdpBlocked)
        );
        assert!(matches!(
            shaper.admit(&blocked, 100, Some(6), now),
            Verdict::Deliver { .. }
        ));
        let blackhole = Impairment {
            blackhole: true,
            ..Impairment::clean()
        };
        assert_eq!(
            shaper.admit(&blackhole, 100, Some(6), now),
            Verdict::Drop(DropReason::Blackhole)
        );
    }

    #[test]
    fn loss_is_seeded() {
        let now = Instant::now();
        let lossy = Impairment {
            loss: 0.1,
            ..Impairment::clean()
        };
        let first = deliveries(&mut Shaper::new(7), &lossy, now, 10_000);
        assert_eq!(first, deliveries(&mut Shaper::new(7), &lossy, now, 10_000));
        let lost = first
            .iter()
            .filter(|v| matches!(v, Verdict::Drop(_)))
            .count();
        assert!((800..1200).contains(&lost), "{lost} of 10000 lost at 10%");
    }

    #[test]
    fn jitter_never_reorders_but_reorder_does() {
        let now = Instant::now();
        let jittery = Impairment {
            delay: Duration::from_millis(50),
            jitter: Duration::from_millis(40),
            ..Impairment::clean()
        };
        let mut shaper = Shaper::new(3);
        let times: Vec<Instant> = (0..1000)
            .map(
                |i| match shaper.admit(&jittery, 100, None, now + Duration::from_micros(i)) {
                    Verdict::Deliver { at, .. } => at,
                    Verdict::Drop(reason) => panic!("dropped: {reason:?}"),
                },
            )
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!(times.iter().all(|t| *t >= now + Duration::from_millis(10)));

        let reordering = Impairment {
            reorder: 0.2,
            ..Impairment::clean()
        };
        let verdicts = deliveries(&mut Shaper::new(3), &reordering, now, 1000);
        let held = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Deliver { reordered: true, at, .. } if *at == now + reordering.reorder_gap))
            .count();
        assert!(
            (100..300).contains(&held),
            "{held} of 1000 held back at 20%"
        );
    }

    #[test]
    fn rate_paces_and_tail_drops() {
        let now = Instant::now();
        let limited = Impairment {
            rate: Some(1_000_000),
            queue_limit: Duration::from_millis(10),
            ..Impairment::clean()
        };
        let verdicts = deliveries(&mut Shaper::new(1), &limited, now, 20);
        // 1000 bytes at 1 MB/s is 1 ms each: ten fit in a 10 ms queue, the rest are dropped.
        for (i, verdict) in verdicts.iter().enumerate() {
            if i < 10 {
                let at = now + Duration::from_millis(i as u64 + 1);
                assert!(
                    matches!(verdict, Verdict::Deliver { at: t, .. } if *t == at),
                    "{i}"
                );
            } else {
                assert_eq!(*verdict, Verdict::Drop(DropReason::Queue), "{i}");
            }
        }
    }
}
