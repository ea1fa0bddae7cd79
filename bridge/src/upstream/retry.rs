//! Retry policy: which requests may be sent again (idempotent method, no body), which
//! failures justify it, and the budget that keeps retries from amplifying an outage.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::Method;
use http_body::Body;

use super::settings::{MAX_RETRIES_CAP, RetrySettings};

/// True when `request` may be replayed: its method is idempotent (RFC 9110 §9.2.2) and it
/// carries no body, so the copy we keep (head only) is the whole request.
pub(crate) fn is_replayable<B: Body>(request: &http::Request<B>) -> bool {
    let idempotent = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let body = request.body();
    let empty = body.is_end_stream() || body.size_hint().exact() == Some(0);
    idempotent && empty
}

/// Retry limits and the concurrent-retry budget of one service.
#[derive(Debug)]
pub(crate) struct RetryPolicy {
    max_retries: u32,
    budget_percent: usize,
    min_concurrent: usize,
    in_flight: Arc<AtomicUsize>,
    total: AtomicU64,
}

/// One retry in flight; returns its budget share on drop.
#[derive(Debug)]
pub(crate) struct RetryToken {
    in_flight: Arc<AtomicUsize>,
}

impl Drop for RetryToken {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl RetryPolicy {
    pub(crate) fn new(settings: &RetrySettings) -> Self {
        Self {
            max_retries: settings.max_retries.min(MAX_RETRIES_CAP),
            budget_percent: settings.budget_percent as usize,
            min_concurrent: settings.min_concurrent_retries,
            in_flight: Arc::new(AtomicUsize::new(0)),
            total: AtomicU64::new(0),
        }
    }

    /// Attempts a request may make in total.
    pub(crate) fn max_attempts(&self) -> u32 {
        self.max_retries + 1
    }

    /// Takes a share of the budget for one retry, if `active_requests` leaves room.
    pub(crate) fn try_budget(&self, active_requests: usize) -> Option<RetryToken> {
        let allowed = (active_requests * self.budget_percent / 100).max(self.min_concurrent);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                (current < allowed).then_some(current + 1)
            })
            .ok()?;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(RetryToken {
            in_flight: self.in_flight.clone(),
        })
    }

    /// Retries made since start.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{Empty, Full};

    #[test]
    fn only_idempotent_bodyless_requests_are_replayable() {
        let get = http::Request::get("/").body(Empty::<Bytes>::new()).unwrap();
        assert!(is_replayable(&get));
        let put_empty = http::Request::put("/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert!(is_replayable(&put_empty));
        let put = http::Request::put("/")
            .body(Full::new(Bytes::from("x")))
            .unwrap();
        assert!(!is_replayable(&put));
        let post = http::Request::post("/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert!(!is_replayable(&post));
    }

    #[test]
    fn budget_allows_minimum_then_percentage() {
        let policy = RetryPolicy::new(&RetrySettings::default());
        assert_eq!(policy.max_attempts(), 3);
        let tokens: Vec<_> = (0..3).map(|_| policy.try_budget(1).unwrap()).collect();
        assert!(policy.try_budget(1).is_none());
        assert!(policy.try_budget(100).is_some(), "20% of 100 is 20");
        drop(tokens);
        assert_eq!(policy.total(), 4);
    }
}
