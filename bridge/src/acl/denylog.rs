//! Rate limit for deny log lines: at most one line per (source, destination, rule) per
//! interval, with the count of denies suppressed meanwhile. It only decides whether to log; the
//! caller supplies the time, so tests need no sleeps.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries kept before stale ones are swept; bounds memory under many distinct callers.
const SWEEP_AT: usize = 4096;

#[derive(Debug)]
struct Window {
    started: Instant,
    suppressed: u64,
}

/// Decides which denies are logged. Only the deny path takes its lock.
#[derive(Debug)]
pub struct DenyLogLimiter {
    interval: Duration,
    windows: Mutex<HashMap<(String, String, String), Window>>,
}

impl Default for DenyLogLimiter {
    fn default() -> Self {
        DenyLogLimiter::new(Duration::from_secs(60))
    }
}

impl DenyLogLimiter {
    pub fn new(interval: Duration) -> DenyLogLimiter {
        DenyLogLimiter {
            interval,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Records a deny at `now`. Returns `Some(suppressed)` when this deny should be logged,
    /// `suppressed` being how many denies of the same key were not logged since the last line;
    /// `None` when it falls inside the current interval.
    pub fn check(&self, source: &str, destination: &str, rule: &str, now: Instant) -> Option<u64> {
        let mut windows = match self.windows.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let key = (
            source.to_string(),
            destination.to_string(),
            rule.to_string(),
        );
        if let Some(window) = windows.get_mut(&key) {
            if now.saturating_duration_since(window.started) < self.interval {
                window.suppressed += 1;
                return None;
            }
            let suppressed = window.suppressed;
            *window = Window {
                started: now,
                suppressed: 0,
            };
            return Some(suppressed);
        }
        if windows.len() >= SWEEP_AT {
            let interval = self.interval;
            windows.retain(|_, w| now.saturating_duration_since(w.started) < interval);
        }
        windows.insert(
            key,
            Window {
                started: now,
                suppressed: 0,
            },
        );
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_once_per_key_per_interval() {
        let limiter = DenyLogLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(limiter.check("web", "billing", "r1", at(0)), Some(0));
        assert_eq!(limiter.check("web", "billing", "r1", at(1)), None);
        assert_eq!(limiter.check("web", "billing", "r1", at(59)), None);
        // Other keys have their own windows.
        assert_eq!(
            limiter.check("web", "billing", "default-deny", at(1)),
            Some(0)
        );
        assert_eq!(limiter.check("cron", "billing", "r1", at(1)), Some(0));
        // The next interval logs again and reports what was suppressed.
        assert_eq!(limiter.check("web", "billing", "r1", at(60)), Some(2));
        assert_eq!(limiter.check("web", "billing", "r1", at(61)), None);
        assert_eq!(limiter.check("web", "billing", "r1", at(200)), Some(1));
    }

    #[test]
    fn sweeps_stale_windows() {
        let limiter = DenyLogLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..SWEEP_AT {
            assert!(limiter.check(&format!("s{i}"), "d", "r", t0).is_some());
        }
        let later = t0 + Duration::from_secs(120);
        assert_eq!(limiter.check("new", "d", "r", later), Some(0));
        let size = limiter
            .windows
            .lock()
            .map(|w| w.len())
            .unwrap_or(usize::MAX);
        assert_eq!(size, 1);
    }
}
