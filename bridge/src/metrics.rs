//! Counters and histograms the data path records, rendered as Prometheus text by `admin`.
//!
//! The request path touches only atomics behind a read lock that is uncontended once a
//! service has been seen; rare events (tunnel connects, handshake failures) use a mutex.
//! This module records and renders; it never decides anything.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Upper bounds (seconds) of the request latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Which side of the bridge handled a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// A caller on this site, forwarded into the tunnel.
    Import,
    /// A request from the peer, sent to a local upstream.
    Export,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Self::Import => "import",
            Self::Export => "export",
        }
    }
}

/// Per (side, service) request statistics.
#[derive(Default)]
pub struct ServiceStats {
    /// Responses by status class 1xx..5xx (index 0..4).
    by_class: [AtomicU64; 5],
    /// Requests answered by the bridge itself, by reason.
    bridge_errors: Mutex<BTreeMap<&'static str, u64>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    active: AtomicI64,
}

/// Counts one request as active until dropped, whoever drops it: a handler future that hyper
/// drops on `RST_STREAM` or a closed connection gives its count back too.
pub struct ActiveRequest(Arc<ServiceStats>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServiceStats {
    /// Counts a request as active for as long as the guard lives.
    pub fn start(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// Requests active now.
    pub fn active(&self) -> i64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Records a response head: status and time to first byte.
    pub fn responded(&self, status: u16, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn bridge_error(&self, reason: &'static str) {
        if let Ok(mut m) = self.bridge_errors.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    pub fn add_bytes(&self, inbound: u64, outbound: u64) {
        self.bytes_in.fetch_add(inbound, Ordering::Relaxed);
        self.bytes_out.fetch_add(outbound, Ordering::Relaxed);
    }

    /// Total responses recorded (all classes).
    pub fn total(&self) -> u64 {
        self.by_class
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Tunnel lifecycle counters, by peer and reason.
#[derive(Default)]
struct TunnelCounters {
    connects: BTreeMap<String, u64>,
    disconnects: BTreeMap<(String, String), u64>,
    handshake_failures: BTreeMap<String, u64>,
}

/// One row of the per-service table: (side, service name) and its stats.
type ServiceEntry = ((Side, Arc<str>), Arc<ServiceStats>);

/// All metrics of one node.
pub struct Metrics {
    /// Per-service stats, one map per side (indexed by `Side as usize`), keyed by service name
    /// so the hot-path lookup borrows the name instead of allocating a key.
    services: [RwLock<HashMap<Arc<str>, Arc<ServiceStats>>>; 2],
    tunnel: Mutex<TunnelCounters>,
    /// Total handshake failures, observable without polling.
    handshake_failures: tokio::sync::watch::Sender<u64>,
    /// Services peers announced that their site may not serve (ignored, never routed to).
    exports_refused: std::sync::atomic::AtomicU64,
    /// The caller-facing listeners, for their connection counts.
    listeners: Mutex<Vec<Arc<crate::listener::ListenerLimits>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            services: Default::default(),
            tunnel: Mutex::default(),
            handshake_failures: tokio::sync::watch::channel(0).0,
            exports_refused: std::sync::atomic::AtomicU64::new(0),
            listeners: Mutex::default(),
        }
    }
}

impl Metrics {
    /// A receiver that sees the total number of refused tunnel handshakes change.
    pub fn watch_handshake_failures(&self) -> tokio::sync::watch::Receiver<u64> {
        self.handshake_failures.subscribe()
    }

    /// The stats of `service` on `side`, created on first use.
    pub fn service(&self, side: Side, service: &str) -> Arc<ServiceStats> {
        let lock = &self.services[side as usize];
        if let Ok(map) = lock.read()
            && let Some(s) = map.get(service)
        {
            return s.clone();
        }
        let mut map = match lock.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(Arc::from(service)).or_default().clone()
    }

    pub fn tunnel_connected(&self, peer: &str) {
        if let Ok(mut t) = self.tunnel.lock() {
            *t.connects.entry(peer.to_owned()).or_default() += 1;
        }
    }

    pub fn tunnel_disconnected(&self, peer: &str, reason: &str) {
        if let Ok(mut t) = self.tunnel.lock() {
            *t.disconnects
                .entry((peer.to_owned(), short_reason(reason)))
                .or_default() += 1;
        }
    }

    /// Registers a listener's limits so `/metrics` shows its connections; returns them shared.
    pub fn listener(
        &self,
        limits: crate::listener::ListenerLimits,
    ) -> Arc<crate::listener::ListenerLimits> {
        let limits = Arc::new(limits);
        if let Ok(mut listeners) = self.listeners.lock() {
            listeners.push(limits.clone());
        }
        limits
    }

    /// A peer announced a service its site may not serve.
    pub fn export_refused(&self) {
        self.exports_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn exports_refused(&self) -> u64 {
        self.exports_refused.load(Ordering::Relaxed)
    }

    pub fn handshake_failed(&self, reason: &str) {
        if let Ok(mut t) = self.tunnel.lock() {
            *t.handshake_failures
                .entry(short_reason(reason))
                .or_default() += 1;
        }
        self.handshake_failures.send_modify(|n| *n += 1);
    }

    /// Renders the request and tunnel metrics as Prometheus text exposition.
    pub fn render(&self, out: &mut String) {
        let mut services: Vec<ServiceEntry> = Vec::new();
        for side in [Side::Import, Side::Export] {
            if let Ok(m) = self.services[side as usize].read() {
                services.extend(m.iter().map(|(k, v)| ((side, k.clone()), v.clone())));
            }
        }
        services.sort_by(|a, b| a.0.cmp(&b.0));
        let _ = writeln!(
            out,
            "# HELP hybridge_requests_total Requests answered, by side, service and status class."
        );
        let _ = writeln!(out, "# TYPE hybridge_requests_total counter");
        for ((side, service), s) in &services {
            for (i, c) in s.by_class.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "hybridge_requests_total{{side=\"{}\",service=\"{}\",class=\"{}xx\"}} {}",
                    side.label(),
                    service,
                    i + 1,
                    c.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP hybridge_bridge_errors_total Responses produced by the bridge itself, by reason."
        );
        let _ = writeln!(out, "# TYPE hybridge_bridge_errors_total counter");
        for ((side, service), s) in &services {
            if let Ok(m) = s.bridge_errors.lock() {
                for (reason, n) in m.iter() {
                    let _ = writeln!(
                        out,
                        "hybridge_bridge_errors_total{{side=\"{}\",service=\"{}\",reason=\"{}\"}} {}",
                        side.label(),
                        service,
                        reason,
                        n
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP hybridge_request_duration_seconds Time to response head."
        );
        let _ = writeln!(out, "# TYPE hybridge_request_duration_seconds histogram");
        for ((side, service), s) in &services {
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += s.latency_buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "hybridge_request_duration_seconds_bucket{{side=\"{}\",service=\"{}\",le=\"{}\"}} {}",
                    side.label(),
                    service,
                    bound,
                    cumulative
                );
            }
            let count = s.latency_count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "hybridge_request_duration_seconds_bucket{{side=\"{}\",service=\"{}\",le=\"+Inf\"}} {}",
                side.label(),
                service,
                count
            );
            let _ = writeln!(
                out,
                "hybridge_request_duration_seconds_sum{{side=\"{}\",service=\"{}\"}} {}",
                side.label(),
                service,
                s.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "hybridge_request_duration_seconds_count{{side=\"{}\",service=\"{}\"}} {}",
                side.label(),
                service,
                count
            );
        }
        for (name, help, pick) in [
            (
                "hybridge_request_bytes_total",
                "Request body bytes received from callers or the tunnel.",
                0,
            ),
            (
                "hybridge_response_bytes_total",
                "Response body bytes sent back.",
                1,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for ((side, service), s) in &services {
                let v = if pick == 0 { &s.bytes_in } else { &s.bytes_out };
                let _ = writeln!(
                    out,
                    "{name}{{side=\"{}\",service=\"{}\"}} {}",
                    side.label(),
                    service,
                    v.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(out, "# HELP hybridge_active_requests Requests in flight.");
        let _ = writeln!(out, "# TYPE hybridge_active_requests gauge");
        for ((side, service), s) in &services {
            let _ = writeln!(
                out,
                "hybridge_active_requests{{side=\"{}\",service=\"{}\"}} {}",
                side.label(),
                service,
                s.active.load(Ordering::Relaxed)
            );
        }
        if let Ok(t) = self.tunnel.lock() {
            let _ = writeln!(
                out,
                "# HELP hybridge_tunnel_connects_total Tunnel connections established, by peer."
            );
            let _ = writeln!(out, "# TYPE hybridge_tunnel_connects_total counter");
            for (peer, n) in &t.connects {
                let _ = writeln!(
                    out,
                    "hybridge_tunnel_connects_total{{peer=\"{}\"}} {n}",
                    escape(peer)
                );
            }
            let _ = writeln!(
                out,
                "# HELP hybridge_tunnel_disconnects_total Tunnel connections lost, by peer and reason."
            );
            let _ = writeln!(out, "# TYPE hybridge_tunnel_disconnects_total counter");
            for ((peer, reason), n) in &t.disconnects {
                let _ = writeln!(
                    out,
                    "hybridge_tunnel_disconnects_total{{peer=\"{}\",reason=\"{}\"}} {n}",
                    escape(peer),
                    escape(reason)
                );
            }
            let _ = writeln!(
                out,
                "# HELP hybridge_tunnel_handshake_failures_total Failed tunnel handshakes, by reason."
            );
            let _ = writeln!(
                out,
                "# TYPE hybridge_tunnel_handshake_failures_total counter"
            );
            for (reason, n) in &t.handshake_failures {
                let _ = writeln!(
                    out,
                    "hybridge_tunnel_handshake_failures_total{{reason=\"{}\"}} {n}",
                    escape(reason)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP hybridge_tunnel_exports_refused_total Service announcements ignored because the peer's site may not serve the service."
        );
        let _ = writeln!(out, "# TYPE hybridge_tunnel_exports_refused_total counter");
        let _ = writeln!(
            out,
            "hybridge_tunnel_exports_refused_total {}",
            self.exports_refused()
        );
        let listeners: Vec<crate::listener::ListenerCounts> = self
            .listeners
            .lock()
            .map(|l| l.iter().map(|l| l.counts()).collect())
            .unwrap_or_default();
        for (name, kind, help, value) in [
            (
                "hybridge_listener_connections",
                "gauge",
                "Caller connections open, by listener.",
                (|c: &crate::listener::ListenerCounts| c.open as u64)
                    as fn(&crate::listener::ListenerCounts) -> u64,
            ),
            (
                "hybridge_listener_connections_refused_total",
                "counter",
                "Connections closed on accept because the listener held its maximum.",
                |c| c.refused,
            ),
            (
                "hybridge_listener_accept_errors_total",
                "counter",
                "Failed accepts (such as running out of file descriptors), by listener.",
                |c| c.accept_errors,
            ),
            (
                "hybridge_listener_idle_closed_total",
                "counter",
                "Connections closed after the idle timeout with no request in flight.",
                |c| c.idle_closed,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for counts in &listeners {
                let _ = writeln!(
                    out,
                    "{name}{{listener=\"{}\"}} {}",
                    escape(&counts.name),
                    value(counts)
                );
            }
        }
    }
}

/// Escapes a Prometheus label value.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Keeps label values readable and bounded: the innermost reason of a nested rustls/quinn
/// error (`… invalid peer certificate: Other(OtherError(certificate revoked …))` becomes
/// `certificate revoked …`), at most 120 characters.
pub fn short_reason(reason: &str) -> String {
    let inner = match reason.rfind("OtherError(") {
        Some(at) => {
            let rest = &reason[at + "OtherError(".len()..];
            rest.strip_suffix("))").unwrap_or(rest)
        }
        None => reason.rsplit(": ").next().unwrap_or(reason),
    };
    inner.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_reduced_to_their_core() {
        assert_eq!(
            short_reason(
                "the cryptographic handshake failed: error 46: invalid peer certificate: Other(OtherError(certificate not issued by the hybridge CA))"
            ),
            "certificate not issued by the hybridge CA"
        );
        assert_eq!(short_reason("timed out"), "timed out");
        assert_eq!(
            short_reason("handshake with 1.2.3.4:5: aborted by peer: error 46"),
            "error 46"
        );
    }

    #[test]
    fn histogram_and_classes_are_rendered() {
        let m = Metrics::default();
        let s = m.service(Side::Import, "billing");
        s.responded(200, Duration::from_micros(700));
        s.responded(503, Duration::from_secs(20));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains(
            "hybridge_requests_total{side=\"import\",service=\"billing\",class=\"2xx\"} 1"
        ));
        assert!(out.contains(
            "hybridge_requests_total{side=\"import\",service=\"billing\",class=\"5xx\"} 1"
        ));
        assert!(out.contains("hybridge_request_duration_seconds_bucket{side=\"import\",service=\"billing\",le=\"0.001\"} 1"));
        assert!(out.contains("hybridge_request_duration_seconds_bucket{side=\"import\",service=\"billing\",le=\"10\"} 1"));
        assert!(out.contains("hybridge_request_duration_seconds_bucket{side=\"import\",service=\"billing\",le=\"+Inf\"} 2"));
    }
}
