//! Rate limit for deny log lines: at most one line per (source, destination, rule) per
//! interval, with the count of denies suppressed meanwhile. It only decides whether to log; the
//! caller supplies the time, so tests need no sleeps.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys with a window of their own: denies of further keys (a caller cycling through
/// names) share one window, so neither memory nor the log grows with what callers send.
const MAX_KEYS: usize = 4096;

#[derive(Debug)]
struct Window {
    started: Instant,
    suppressed: u64,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            started: now,
            suppressed: 0,
        }
    }

    /// `Some(suppressed)` when a line is due at `now` (and starts a new window).
    fn due(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        if now.saturating_duration_since(self.started) < interval {
            self.suppressed += 1;
            return None;
        }
        let suppressed = self.suppressed;
        *self = Window::new(now);
        Some(suppressed)
    }
}

#[derive(Debug, Default)]
struct Windows {
    by_key: HashMap<(String, String, String), Window>,
    /// Shared by denies whose key found no room.
    overflow: Option<Window>,
    /// When stale keys were last swept: at most once per interval, so a full table does
    /// not cost a scan per deny.
    swept: Option<Instant>,
}

/// Decides which denies are logged. Only the deny path takes its lock.
#[derive(Debug)]
pub(crate) struct DenyLogLimiter {
    interval: Duration,
    windows: Mutex<Windows>,
}

impl Default for DenyLogLimiter {
    fn default() -> Self {
        DenyLogLimiter::new(Duration::from_secs(60))
    }
}

impl DenyLogLimiter {
    pub(crate) fn new(interval: Duration) -> DenyLogLimiter {
        DenyLogLimiter {
            interval,
            windows: Mutex::new(Windows::default()),
        }
    }

    /// Records a deny at `now`. Returns `Some(suppressed)` when this deny should be logged,
    /// `suppressed` being how many denies of the same key (or, past [`MAX_KEYS`] keys, of
    /// every key without a window) were not logged since the last line; `None` when it falls
    /// inside the current interval.
    pub(crate) fn check(
        &self,
        source: &str,
        destination: &str,
        rule: &str,
        now: Instant,
    ) -> Option<u64> {
        let mut windows = match self.windows.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let interval = self.interval;
        let key = (
            source.to_string(),
            destination.to_string(),
            rule.to_string(),
        );
        if let Some(window) = windows.by_key.get_mut(&key) {
            return window.due(now, interval);
        }
        let sweep_due = windows
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= interval);
        if windows.by_key.len() >= MAX_KEYS && sweep_due {
            windows
                .by_key
                .retain(|_, w| now.saturating_duration_since(w.started) < interval);
            windows.swept = Some(now);
        }
        if windows.by_key.len() >= MAX_KEYS {
            return match &mut windows.overflow {
                Some(window) => window.due(now, interval),
                None => {
                    windows.overflow = Some(Window::new(now));
                    Some(0)
                }
            };
        }
        windows.by_key.insert(key, Window::new(now));
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
        for i in 0..MAX_KEYS {
            assert!(limiter.check(&format!("s{i}"), "d", "r", t0).is_some());
        }
        let later = t0 + Duration::from_secs(120);
        assert_eq!(limiter.check("new", "d", "r", later), Some(0));
        let size = limiter
            .windows
            .lock()
            .map(|w| w.by_key.len())
            .unwrap_or(usize::MAX);
        assert_eq!(size, 1);
    }

    #[test]
    fn keys_past_the_cap_share_one_window() {
        let limiter = DenyLogLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            assert!(limiter.check(&format!("s{i}"), "d", "r", t0).is_some());
        }
        // A caller cycling through new names within the interval: one line, then silence.
        assert_eq!(limiter.check("x0", "d", "r", t0), Some(0));
        for i in 1..10_000 {
            assert_eq!(limiter.check(&format!("x{i}"), "d", "r", t0), None);
        }
        let size = limiter
            .windows
            .lock()
            .map(|w| w.by_key.len())
            .unwrap_or(usize::MAX);
        assert_eq!(size, MAX_KEYS, "memory does not grow with the names sent");
        // Next interval: the stale keys are swept and the shared window reports its count.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(limiter.check("y", "d", "r", later), Some(0));
    }
}
