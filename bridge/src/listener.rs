//! Accepting TCP connections within bounds: a cap on the connections a listener holds open
//! (over it, a new connection is closed at once and counted, and those already open keep
//! working), back-off with a rate-limited log line when accepting fails (out of file
//! descriptors), and an idle timeout that closes a connection with no request in flight.
//!
//! The cap and the idle timeout can be changed while the listener runs (a reload): a lower cap
//! refuses new connections until enough of the open ones close, and waiting idle timers
//! re-arm with the new timeout.
//!
//! It owns no protocol: the HTTP servers above it mark requests in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::warn;

/// The longest pause after a failed accept; it doubles from `ACCEPT_BACKOFF_START`.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(10);
/// At most one log line per listener and kind of trouble in this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The bounds of one listener (shared by the workers that accept on its port) and its counts.
pub(crate) struct ListenerLimits {
    /// Names the listener in metrics and logs: `import:SERVICE`, `gateway`, `admin`.
    name: String,
    max_connections: AtomicUsize,
    /// The idle timeout in milliseconds.
    idle_timeout_ms: AtomicU64,
    /// Wakes idle timers when the idle timeout changes.
    idle_timeout_changed: Notify,
    /// Connections open now (each held by a [`ConnectionPermit`]).
    open: Arc<AtomicUsize>,
    refused: AtomicU64,
    accept_errors: AtomicU64,
    idle_closed: AtomicU64,
    refusal_log: RateLimitedLog,
    error_log: RateLimitedLog,
}

/// Counts of one listener, for `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ListenerCounts {
    pub(crate) name: String,
    pub(crate) open: usize,
    pub(crate) refused: u64,
    pub(crate) accept_errors: u64,
    pub(crate) idle_closed: u64,
}

impl ListenerLimits {
    pub(crate) fn new(
        name: impl Into<String>,
        max_connections: usize,
        idle_timeout: Duration,
    ) -> Self {
        Self {
            name: name.into(),
            max_connections: AtomicUsize::new(max_connections),
            idle_timeout_ms: AtomicU64::new(millis(idle_timeout)),
            idle_timeout_changed: Notify::new(),
            open: Arc::new(AtomicUsize::new(0)),
            refused: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            refusal_log: RateLimitedLog::default(),
            error_log: RateLimitedLog::default(),
        }
    }

    /// Changes the cap and the idle timeout of a running listener. Open connections stay
    /// open under a lower cap; new ones are refused until the count is below it.
    pub(crate) fn reconfigure(&self, max_connections: usize, idle_timeout: Duration) {
        self.max_connections
            .store(max_connections, Ordering::Relaxed);
        self.idle_timeout_ms
            .store(millis(idle_timeout), Ordering::Relaxed);
        self.idle_timeout_changed.notify_waiters();
    }

    /// The cap on open connections in force.
    pub(crate) fn max_connections(&self) -> usize {
        self.max_connections.load(Ordering::Relaxed)
    }

    /// The idle timeout in force.
    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed))
    }

    /// A place under the cap, if there is one.
    fn permit(&self) -> Option<ConnectionPermit> {
        let max = self.max_connections();
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .ok()
            .map(|_| ConnectionPermit(self.open.clone()))
    }

    /// Accepts the next connection there is room for. A connection over the cap is closed
    /// as soon as it is accepted; an accept error is waited out with growing pauses.
    pub(crate) async fn accept(&self, listener: &TcpListener) -> AcceptedConnection {
        let mut backoff = ACCEPT_BACKOFF_START;
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => match self.permit() {
                    Some(permit) => {
                        return AcceptedConnection {
                            stream,
                            peer,
                            permit,
                        };
                    }
                    None => {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = self.refusal_log.due() {
                            warn!(
                                listener = %self.name,
                                %peer,
                                max_connections = self.max_connections(),
                                refused_since_last_log = suppressed,
                                "connection refused: the listener holds its maximum of open connections"
                            );
                        }
                        drop(stream);
                    }
                },
                Err(error) => {
                    self.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(suppressed) = self.error_log.due() {
                        warn!(
                            listener = %self.name,
                            %error,
                            errors_since_last_log = suppressed,
                            pause_ms = backoff.as_millis() as u64,
                            "accepting a connection failed; pausing before the next accept"
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }

    /// Resolves once `activity` has had no request in flight for the idle timeout (the one
    /// in force at that moment).
    pub(crate) async fn idle(&self, activity: &ConnectionActivity) {
        loop {
            // Registered before the timeout is read, so a change in between is not missed.
            let changed = self.idle_timeout_changed.notified();
            let idle_timeout = self.idle_timeout();
            let wait = match activity.quiet_for() {
                Some(quiet) if quiet >= idle_timeout => {
                    self.idle_closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(quiet) => idle_timeout - quiet,
                None => idle_timeout,
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = changed => {}
            }
        }
    }

    pub(crate) fn counts(&self) -> ListenerCounts {
        ListenerCounts {
            name: self.name.clone(),
            open: self.open.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
            idle_closed: self.idle_closed.load(Ordering::Relaxed),
        }
    }
}

/// An accepted connection and its place under the listener's cap (freed on drop).
pub(crate) struct AcceptedConnection {
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) permit: ConnectionPermit,
}

/// One open connection counted under its listener's cap, until dropped.
pub(crate) struct ConnectionPermit(Arc<AtomicUsize>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a connection is doing anything: the requests in flight on it (counted from the
/// request head until the response body ends) and since when it has had none.
pub(crate) struct ConnectionActivity {
    in_flight: AtomicUsize,
    /// Milliseconds after `epoch` at which the last request finished (or the connection
    /// opened).
    quiet_since_ms: AtomicU64,
    epoch: Instant,
}

impl Default for ConnectionActivity {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            quiet_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl ConnectionActivity {
    /// Counts a request as in flight until the guard drops.
    pub(crate) fn request(self: &Arc<Self>) -> RequestInFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestInFlight(self.clone())
    }

    /// How long the connection has had no request in flight; `None` while it has one.
    fn quiet_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.quiet_since_ms.load(Ordering::Relaxed));
        Some(self.epoch.elapsed().saturating_sub(since))
    }
}

/// One request in flight on a connection; see [`ConnectionActivity::request`].
pub(crate) struct RequestInFlight(Arc<ConnectionActivity>);

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = activity.epoch.elapsed().as_millis() as u64;
        activity.quiet_since_ms.store(now, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Lets one log line through per `LOG_INTERVAL` and counts what it held back.
#[derive(Default)]
struct RateLimitedLog {
    state: std::sync::Mutex<Option<std::time::Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    /// `Some(n)` when a line is due now (`n` events were not logged since the last one).
    fn due(&self) -> Option<u64> {
        let mut last = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < LOG_INTERVAL) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_requests_in_flight() {
        let limits = ListenerLimits::new("import:x", 4, Duration::from_secs(10));
        let activity = Arc::new(ConnectionActivity::default());
        let request = activity.request();
        let idle = limits.idle(&activity);
        tokio::pin!(idle);
        // Held open for a minute by the request in flight.
        assert!(
            tokio::time::timeout(Duration::from_secs(60), idle.as_mut())
                .await
                .is_err()
        );
        drop(request);
        let started = Instant::now();
        idle.await;
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert_eq!(limits.counts().idle_closed, 1);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Arc::new(ListenerLimits::new("import:x", 1, Duration::from_secs(10)));
        let first_client = TcpStream::connect(addr).await.unwrap();
        let first = limits.accept(&listener).await;
        assert_eq!(first.peer, first_client.local_addr().unwrap());
        // While the first holds the only place, the second is accepted and closed at once.
        let mut second_client = TcpStream::connect(addr).await.unwrap();
        let accepting = tokio::spawn({
            let limits = limits.clone();
            async move { limits.accept(&listener).await.peer }
        });
        let mut byte = [0u8; 1];
        let read = tokio::io::AsyncReadExt::read(&mut second_client, &mut byte).await;
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the second connection was kept"
        );
        assert_eq!(limits.counts().refused, 1);
        // Once the first is gone, the next connection gets the place.
        drop(first);
        let third_client = TcpStream::connect(addr).await.unwrap();
        let third = accepting.await.unwrap();
        assert_eq!(third, third_client.local_addr().unwrap());
        let counts = limits.counts();
        assert_eq!((counts.open, counts.refused), (0, 1));
    }

    #[tokio::test]
    async fn a_lower_cap_refuses_new_connections_until_open_ones_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ListenerLimits::new("import:x", 2, Duration::from_secs(10));
        let mut clients = Vec::new();
        let mut open = Vec::new();
        for _ in 0..2 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            open.push(limits.accept(&listener).await);
        }
        assert_eq!(limits.counts().open, 2);
        // Lowered to 1 with 2 open: both stay; a third is refused even after one closes.
        limits.reconfigure(1, Duration::from_secs(10));
        assert_eq!(limits.permit().map(drop), None);
        drop(open.pop());
        assert_eq!(limits.counts().open, 1);
        assert!(limits.permit().is_none());
        drop(open.pop());
        let permit = limits.permit();
        assert!(permit.is_some());
        assert_eq!(limits.counts().open, 1);
        // Raised again: room for more.
        limits.reconfigure(3, Duration::from_secs(10));
        let more = (limits.permit(), limits.permit());
        assert!(more.0.is_some() && more.1.is_some());
        assert!(limits.permit().is_none());
        assert_eq!(limits.counts().open, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_idle_timeout_applies_to_connections_already_waiting() {
        let limits = ListenerLimits::new("import:x", 4, Duration::from_secs(120));
        let activity = Arc::new(ConnectionActivity::default());
        let started = Instant::now();
        let idle = limits.idle(&activity);
        tokio::pin!(idle);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), idle.as_mut())
                .await
                .is_err()
        );
        // Quiet for 5 s when the timeout drops to 8 s: closed 3 s later, not at 120 s.
        limits.reconfigure(4, Duration::from_secs(8));
        idle.await;
        assert_eq!(started.elapsed(), Duration::from_secs(8));
        assert_eq!(limits.idle_timeout(), Duration::from_secs(8));
    }
}
