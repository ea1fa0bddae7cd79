//! Endpoint state and per-request power-of-two-choices: every request picks two random
//! available endpoints and takes the one with fewer requests in flight. No I/O here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::p2c::{self, less_loaded, two_distinct};

use super::health::Streak;

/// One resolved endpoint of a service and what we know about it.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Position of the configured name this address was resolved from.
    pub(crate) name: usize,
    pub(crate) addr: SocketAddr,
    /// The `host:port` the operator wrote; used as authority when the request has none.
    pub(crate) authority: http::uri::Authority,
    /// Verdict of active health checks (true when checks are off).
    pub(crate) healthy: AtomicBool,
    pub(crate) active: Arc<AtomicUsize>,
    pub(crate) total: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// Passive outlier state.
    pub(crate) outlier: Mutex<OutlierState>,
    /// Consecutive results of active health checks.
    pub(crate) streak: Mutex<Streak>,
}

/// Passive health bookkeeping of one endpoint.
#[derive(Debug, Default)]
pub(crate) struct OutlierState {
    pub(crate) consecutive_failures: u32,
    pub(crate) times_ejected: u32,
    pub(crate) ejected_until: Option<Instant>,
}

impl OutlierState {
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }
}

/// Counts a request in flight on one endpoint until dropped.
#[derive(Debug)]
pub(crate) struct ActiveGuard {
    active: Arc<AtomicUsize>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Endpoint {
    pub(crate) fn new(name: usize, addr: SocketAddr, authority: http::uri::Authority) -> Self {
        Self {
            name,
            addr,
            authority,
            healthy: AtomicBool::new(true),
            active: Arc::new(AtomicUsize::new(0)),
            total: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            outlier: Mutex::new(OutlierState::default()),
            streak: Mutex::new(Streak::default()),
        }
    }

    /// Marks the start of one request to this endpoint.
    pub(crate) fn begin(&self) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.total.fetch_add(1, Ordering::Relaxed);
        ActiveGuard {
            active: self.active.clone(),
        }
    }

    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        self.outlier
            .lock()
            .map(|state| state.is_ejected(now))
            .unwrap_or(false)
    }

    fn is_available(&self, now: Instant) -> bool {
        self.is_healthy() && !self.is_ejected(now)
    }
}

/// Picks an endpoint index for one attempt. `tried` are endpoints this request already
/// failed on; they are avoided while any other choice exists. When no endpoint is
/// available (all unhealthy or ejected) every endpoint is a candidate ("panic mode"):
/// trying a possibly-bad endpoint beats failing every request. `None` only for an empty
/// list.
pub(crate) fn pick(endpoints: &[Arc<Endpoint>], tried: &[usize]) -> Option<usize> {
    match endpoints.len() {
        0 => return None,
        1 => return Some(0),
        _ => {}
    }
    let now = Instant::now();
    // Fast path, no allocation: the common case of a first attempt while both sampled
    // endpoints are available.
    if tried.is_empty() {
        let (a, b) = two_distinct(endpoints.len());
        if endpoints[a].is_available(now) && endpoints[b].is_available(now) {
            return Some(less_loaded(a, b, |&index| endpoints[index].active()));
        }
    }
    let available: Vec<usize> = (0..endpoints.len())
        .filter(|&index| endpoints[index].is_available(now))
        .collect();
    let pool = if available.is_empty() {
        (0..endpoints.len()).collect()
    } else {
        available
    };
    let untried: Vec<usize> = pool
        .iter()
        .copied()
        .filter(|index| !tried.contains(index))
        .collect();
    let candidates = if untried.is_empty() { pool } else { untried };
    p2c::pick(
        candidates.len(),
        |i| candidates[i],
        |&index| endpoints[index].active(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::upstream::tests::endpoints;

    #[test]
    fn spreads_evenly_and_prefers_idle() {
        let endpoints = endpoints(3);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[pick(&endpoints, &[]).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&count| count > 800), "{counts:?}");
        // A loaded endpoint loses every comparison it takes part in.
        endpoints[0].active.store(10, Ordering::Release);
        for _ in 0..300 {
            assert_ne!(pick(&endpoints, &[]).unwrap(), 0);
        }
    }

    #[test]
    fn avoids_unavailable_and_tried_but_panics_to_all() {
        let endpoints = endpoints(3);
        endpoints[1].healthy.store(false, Ordering::Release);
        for _ in 0..100 {
            assert_eq!(pick(&endpoints, &[0]).unwrap(), 2);
        }
        for endpoint in &endpoints {
            endpoint.healthy.store(false, Ordering::Release);
        }
        let mut seen = [false; 3];
        for _ in 0..300 {
            seen[pick(&endpoints, &[]).unwrap()] = true;
        }
        assert_eq!(seen, [true; 3]);
    }
}
