//! Circuit breaking: counts requests in flight and requests waiting for a connection for
//! one service and refuses new ones past the configured limits. No I/O, no waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OverloadLimit {
    /// `circuit_breaker.max_active_requests`
    ActiveRequests,
    /// `circuit_breaker.max_pending_requests`
    PendingRequests,
}

impl std::fmt::Display for OverloadLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ActiveRequests => "max_active_requests",
            Self::PendingRequests => "max_pending_requests",
        })
    }
}

/// Shared counters of one service's breaker.
#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    max_active: usize,
    max_pending: usize,
    active: Arc<AtomicUsize>,
    pending: Arc<AtomicUsize>,
    trips: AtomicU64,
}

/// Holds one slot of a breaker counter; frees it on drop.
#[derive(Debug)]
pub(crate) struct BreakerSlot {
    counter: Arc<AtomicUsize>,
}

impl Drop for BreakerSlot {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl CircuitBreaker {
    pub(crate) fn new(max_active: usize, max_pending: usize) -> Self {
        Self {
            max_active,
            max_pending,
            active: Arc::new(AtomicUsize::new(0)),
            pending: Arc::new(AtomicUsize::new(0)),
            trips: AtomicU64::new(0),
        }
    }

    /// Admits one more active request, or counts a trip and refuses.
    pub(crate) fn try_active(&self) -> Result<BreakerSlot, OverloadLimit> {
        self.try_take(&self.active, self.max_active, OverloadLimit::ActiveRequests)
    }

    /// Admits one more request waiting for a connection, or counts a trip and refuses.
    pub(crate) fn try_pending(&self) -> Result<BreakerSlot, OverloadLimit> {
        self.try_take(
            &self.pending,
            self.max_pending,
            OverloadLimit::PendingRequests,
        )
    }

    fn try_take(
        &self,
        counter: &Arc<AtomicUsize>,
        limit: usize,
        which: OverloadLimit,
    ) -> Result<BreakerSlot, OverloadLimit> {
        let admitted = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                (current < limit).then_some(current + 1)
            })
            .is_ok();
        if admitted {
            Ok(BreakerSlot {
                counter: counter.clone(),
            })
        } else {
            self.trips.fetch_add(1, Ordering::Relaxed);
            Err(which)
        }
    }

    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    pub(crate) fn trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limit_and_counts_trips() {
        let breaker = CircuitBreaker::new(2, 1);
        let first = breaker.try_active().unwrap();
        let _second = breaker.try_active().unwrap();
        assert_eq!(
            breaker.try_active().unwrap_err(),
            OverloadLimit::ActiveRequests
        );
        assert_eq!(breaker.trips(), 1);
        drop(first);
        let _third = breaker.try_active().unwrap();
        assert_eq!(breaker.active(), 2);
        let _pending = breaker.try_pending().unwrap();
        assert_eq!(
            breaker.try_pending().unwrap_err(),
            OverloadLimit::PendingRequests
        );
        assert_eq!(breaker.trips(), 2);
    }
}
