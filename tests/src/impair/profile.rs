//! What a link does to the packets crossing it in one direction, and the one-line spec
//! (`loss=2%,delay=50ms,...`) that the tests, the `impair` binary and `bench/run` share.
//!
//! Pure values: no clocks, no randomness; the shaper applies them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// One direction's impairment. `Impairment::default()` is a clean link.
///
/// Per packet, in this order: `blackhole` drops everything; `block_udp` drops IP protocol 17
/// (the enterprise firewall that lets only TCP out); `loss` drops at random; `rate` queues
/// behind the packets before it (tail drop once the queue is `queue_limit` long); then the
/// packet waits `delay` ± `jitter` (uniform). Jitter never reorders: a packet leaves no
/// earlier than the one before it. Only `reorder` reorders: that share of packets is held
/// back `reorder_gap` longer, so the packets after it overtake it. `duplicate` delivers that
/// share twice.
#[derive(Clone, Debug, PartialEq)]
pub struct Impairment {
    /// Share of packets dropped at random, 0.0 to 1.0.
    pub loss: f64,
    /// One-way delay.
    pub delay: Duration,
    /// Up to this much is added to or taken from `delay`, uniformly.
    pub jitter: Duration,
    /// Share of packets held back by `reorder_gap`, 0.0 to 1.0.
    pub reorder: f64,
    pub reorder_gap: Duration,
    /// Share of packets delivered twice, 0.0 to 1.0.
    pub duplicate: f64,
    /// Bandwidth in bytes per second; `None` is unlimited.
    pub rate: Option<u64>,
    /// The longest a packet may queue for `rate` before it is dropped instead.
    pub queue_limit: Duration,
    /// Drop every packet.
    pub blackhole: bool,
    /// Drop UDP, pass everything else.
    pub block_udp: bool,
}

impl Default for Impairment {
    fn default() -> Self {
        Self {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            reorder_gap: Duration::from_millis(10),
            duplicate: 0.0,
            rate: None,
            queue_limit: Duration::from_millis(100),
            blackhole: false,
            block_udp: false,
        }
    }
}

impl Impairment {
    /// A clean link: nothing dropped, delayed or reordered.
    pub fn clean() -> Self {
        Self::default()
    }
}

/// Parses `key=value,...`: `loss=2%` (or `0.02`), `delay=50ms`, `jitter=10ms`, `reorder=5%`,
/// `reorder_gap=10ms`, `duplicate=1%`, `rate=10mbit` (`kbit`, `mbit`, `gbit` are bits per
/// second; `kB`, `MB`, `GB` or a bare number are bytes per second), `queue=100ms`, and the
/// flags `blackhole` and `block_udp`. An empty spec or `clean` is a clean link.
impl FromStr for Impairment {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut profile = Impairment::default();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key.trim(), Some(value.trim())),
                None => (item, None),
            };
            let needs = || format!("impairment `{key}` needs a value ({key}=...)");
            match key {
                "clean" if value.is_none() => {}
                "blackhole" => profile.blackhole = parse_flag(key, value)?,
                "block_udp" => profile.block_udp = parse_flag(key, value)?,
                "loss" => profile.loss = parse_share(key, value.ok_or_else(needs)?)?,
                "reorder" => profile.reorder = parse_share(key, value.ok_or_else(needs)?)?,
                "duplicate" => profile.duplicate = parse_share(key, value.ok_or_else(needs)?)?,
                "delay" => profile.delay = parse_duration(key, value.ok_or_else(needs)?)?,
                "jitter" => profile.jitter = parse_duration(key, value.ok_or_else(needs)?)?,
                "reorder_gap" => {
                    profile.reorder_gap = parse_duration(key, value.ok_or_else(needs)?)?
                }
                "queue" => profile.queue_limit = parse_duration(key, value.ok_or_else(needs)?)?,
                "rate" => profile.rate = parse_rate(value.ok_or_else(needs)?)?,
                _ => {
                    return Err(format!(
                        "unknown impairment `{item}` (known: loss, delay, jitter, reorder, \
                         reorder_gap, duplicate, rate, queue, blackhole, block_udp)"
                    ));
                }
            }
        }
        Ok(profile)
    }
}

/// The spec `from_str` reads back to the same value (what the binary prints).
impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let default = Impairment::default();
        let mut items = Vec::new();
        if self.loss > 0.0 {
            items.push(format!("loss={}", self.loss));
        }
        if !self.delay.is_zero() {
            items.push(format!("delay={}", humantime::format_duration(self.delay)));
        }
        if !self.jitter.is_zero() {
            items.push(format!(
                "jitter={}",
                humantime::format_duration(self.jitter)
            ));
        }
        if self.reorder > 0.0 {
            items.push(format!("reorder={}", self.reorder));
        }
        if self.reorder_gap != default.reorder_gap {
            let gap = humantime::format_duration(self.reorder_gap);
            items.push(format!("reorder_gap={gap}"));
        }
        if self.duplicate > 0.0 {
            items.push(format!("duplicate={}", self.duplicate));
        }
        if let Some(rate) = self.rate {
            items.push(format!("rate={rate}"));
        }
        if self.queue_limit != default.queue_limit {
            let queue = humantime::format_duration(self.queue_limit);
            items.push(format!("queue={queue}"));
        }
        if self.blackhole {
            items.push("blackhole".into());
        }
        if self.block_udp {
            items.push("block_udp".into());
        }
        if items.is_empty() {
            items.push("clean".into());
        }
        f.write_str(&items.join(","))
    }
}

fn parse_flag(key: &str, value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("true" | "on" | "1") => Ok(true),
        Some("false" | "off" | "0") => Ok(false),
        Some(other) => Err(format!("`{key}={other}`: expected on or off")),
    }
}

fn parse_share(key: &str, value: &str) -> Result<f64, String> {
    let share = match value.strip_suffix('%') {
        Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
        None => value.parse::<f64>(),
    }
    .map_err(|_| format!("`{key}={value}`: expected a share like 2% or 0.02"))?;
    if !(0.0..=1.0).contains(&share) {
        return Err(format!("`{key}={value}`: must be between 0% and 100%"));
    }
    Ok(share)
}

fn parse_duration(key: &str, value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("`{key}={value}`: {e}"))
}

fn parse_rate(value: &str) -> Result<Option<u64>, String> {
    let units: [(&str, f64); 7] = [
        ("gbit", 1e9 / 8.0),
        ("mbit", 1e6 / 8.0),
        ("kbit", 1e3 / 8.0),
        ("GB", 1e9),
        ("MB", 1e6),
        ("kB", 1e3),
        ("B", 1.0),
    ];
    let (number, scale) = units
        .iter()
        .find_map(|(suffix, scale)| value.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or((value, 1.0));
    let number: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`rate={value}`: expected e.g. 10mbit, 1MB or 125000"))?;
    let bytes = (number * scale).round();
    if bytes < 1.0 {
        return Err(format!(
            "`rate={value}`: must be at least 1 byte per second"
        ));
    }
    Ok(Some(bytes as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let profile: Impairment = "loss=2%, delay=50ms,jitter=10ms,reorder=0.05,reorder_gap=3ms,\
                                   duplicate=1%,rate=8mbit,queue=20ms,block_udp"
            .parse()
            .unwrap();
        assert_eq!(
            profile,
            Impairment {
                loss: 0.02,
                delay: Duration::from_millis(50),
                jitter: Duration::from_millis(10),
                reorder: 0.05,
                reorder_gap: Duration::from_millis(3),
                duplicate: 0.01,
                rate: Some(1_000_000),
                queue_limit: Duration::from_millis(20),
                blackhole: false,
                block_udp: true,
            }
        );
    }

    #[test]
    fn display_reads_back() {
        for spec in [
            "clean",
            "loss=10%,delay=50ms,rate=1MB,blackhole",
            "jitter=1s,queue=1s",
        ] {
            let profile: Impairment = spec.parse().unwrap();
            assert_eq!(profile.to_string().parse::<Impairment>().unwrap(), profile);
        }
        assert_eq!("".parse::<Impairment>().unwrap(), Impairment::clean());
    }

    #[test]
    fn refuses_mistakes_by_name() {
        for (spec, message) in [
            ("los=2%", "unknown impairment `los=2%`"),
            ("loss=200%", "between 0% and 100%"),
            ("loss", "needs a value"),
            ("delay=fast", "`delay=fast`"),
            ("rate=0", "at least 1 byte"),
            ("blackhole=maybe", "expected on or off"),
        ] {
            let error = spec.parse::<Impairment>().unwrap_err();
            assert!(error.contains(message), "{spec}: {error}");
        }
    }
}
