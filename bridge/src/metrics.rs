//! Counters and histograms the data path records, and their encoding for `/metrics`.
//!
//! Every label value comes from a closed set or from the node's own configuration: per-service
//! series exist only for configured services (any other name a peer or caller sends is
//! counted under `service="unknown"` and creates nothing), reasons are enums, and tunnel
//! counters are keyed by the peer's site. The request path touches only atomics behind an
//! `ArcSwap` load; the encoding (prometheus-client) escapes whatever it is given.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, MetricEncoder,
    NoLabelSet,
};
use prometheus_client::metrics::MetricType;

use crate::http::error::Reason;
use crate::listener::{ListenerCounts, ListenerLimits};
use crate::tunnel::connection::Carrier;
use crate::tunnel::outcome::{DisconnectReason, HandshakeFailure};
use crate::workers::PerWorker;

/// Upper bounds (seconds) of the request latency histogram buckets.
pub(crate) const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `service` label of every request for a service this node is not configured with.
pub(crate) const UNKNOWN_SERVICE: &str = "unknown";

/// Which side of the bridge handled a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Side {
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

impl EncodeLabelValue for Side {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.label())
    }
}

/// Status classes counted per service, as labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct StatusClass(u8);

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(
            encoder,
            match self.0 {
                1 => "1xx",
                2 => "2xx",
                3 => "3xx",
                4 => "4xx",
                _ => "5xx",
            },
        )
    }
}

/// `{side, service}`: the per-service families.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ServiceLabels {
    pub(crate) side: Side,
    pub(crate) service: Arc<str>,
}

/// `{side, service, class}`: `hybridge_requests_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct StatusClassLabels {
    pub(crate) side: Side,
    pub(crate) service: Arc<str>,
    pub(crate) class: StatusClass,
}

/// `{side, service, reason}`: `hybridge_bridge_errors_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct BridgeErrorLabels {
    pub(crate) side: Side,
    pub(crate) service: Arc<str>,
    pub(crate) reason: Reason,
}

/// `{reason}`: `hybridge_tunnel_handshake_failures_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct HandshakeLabels {
    pub(crate) reason: HandshakeFailure,
}

/// `{site}`: `hybridge_tunnel_connects_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct SiteLabels {
    pub(crate) site: Arc<str>,
}

/// `{carrier}`: the tunnel carrier families.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct CarrierLabels {
    pub(crate) carrier: Carrier,
}

/// `{site, reason}`: `hybridge_tunnel_disconnects_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct DisconnectLabels {
    pub(crate) site: Arc<str>,
    pub(crate) reason: DisconnectReason,
}

/// `{listener}`: the listener families.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct ListenerLabels {
    pub(crate) listener: Arc<str>,
}

/// Per (side, service) request statistics, kept per worker (summed when read), so a
/// worker's requests touch only cache lines no other worker writes.
#[derive(Default)]
pub(crate) struct ServiceStats {
    counters: PerWorker<Counters>,
}

/// One worker's share of a [`ServiceStats`].
struct Counters {
    /// Responses by status class 1xx..5xx (index 0..4).
    by_class: [AtomicU64; 5],
    /// Requests answered by the bridge itself, by `Reason::index`.
    bridge_errors: [AtomicU64; Reason::ALL.len()],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Requests started minus requests ended on this worker: one that ends on another
    /// worker leaves this slot high and that one low, and the sum is right.
    active: AtomicI64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            by_class: Default::default(),
            bridge_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_buckets: Default::default(),
            latency_count: AtomicU64::new(0),
            latency_sum_micros: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            active: AtomicI64::new(0),
        }
    }
}

/// Counts one request as active until dropped, whoever drops it: a handler future that hyper
/// drops on `RST_STREAM` or a closed connection gives its count back too.
pub(crate) struct ActiveRequest(Arc<ServiceStats>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0
            .counters
            .current()
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServiceStats {
    /// Counts a request as active for as long as the guard lives.
    pub(crate) fn start(self: &Arc<Self>) -> ActiveRequest {
        self.counters
            .current()
            .active
            .fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// `field` summed over the workers.
    fn sum(&self, field: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.counters
            .iter()
            .map(|c| field(c).load(Ordering::Relaxed))
            .sum()
    }

    /// Requests active now.
    pub(crate) fn active(&self) -> i64 {
        self.counters
            .iter()
            .map(|c| c.active.load(Ordering::Relaxed))
            .sum()
    }

    /// Records a response head: status and time to first byte.
    pub(crate) fn responded(&self, status: u16, elapsed: Duration) {
        let counters = self.counters.current();
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        counters.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            counters.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        counters.latency_count.fetch_add(1, Ordering::Relaxed);
        counters
            .latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts a response the bridge produced itself.
    pub(crate) fn bridge_error(&self, reason: Reason) {
        self.counters.current().bridge_errors[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Responses the bridge produced itself for `reason` so far.
    pub(crate) fn bridge_errors(&self, reason: Reason) -> u64 {
        self.sum(|c| &c.bridge_errors[reason.index()])
    }

    pub(crate) fn add_bytes(&self, inbound: u64, outbound: u64) {
        let counters = self.counters.current();
        counters.bytes_in.fetch_add(inbound, Ordering::Relaxed);
        counters.bytes_out.fetch_add(outbound, Ordering::Relaxed);
    }

    /// Responses recorded in status class `class` (1 to 5).
    fn class(&self, class: usize) -> u64 {
        self.sum(|c| &c.by_class[class - 1])
    }

    /// Request body bytes so far.
    fn bytes_in(&self) -> u64 {
        self.sum(|c| &c.bytes_in)
    }

    /// Response body bytes so far.
    fn bytes_out(&self) -> u64 {
        self.sum(|c| &c.bytes_out)
    }

    /// The latency histogram: each bucket's count, the sum in seconds and the count.
    fn latency(&self) -> ([u64; LATENCY_BUCKETS.len()], f64, u64) {
        let buckets = std::array::from_fn(|i| self.sum(|c| &c.latency_buckets[i]));
        let sum = self.sum(|c| &c.latency_sum_micros) as f64 / 1e6;
        (buckets, sum, self.sum(|c| &c.latency_count))
    }
}

/// The stats of one side: one entry per configured service, and one shared by every other
/// name. Lookups are lock-free; registering copies the map (configuration changes only).
struct ServiceTable {
    known: ArcSwap<HashMap<Arc<str>, Arc<ServiceStats>>>,
    unknown: Arc<ServiceStats>,
    register_lock: Mutex<()>,
}

impl Default for ServiceTable {
    fn default() -> Self {
        Self {
            known: ArcSwap::from_pointee(HashMap::new()),
            unknown: Arc::new(ServiceStats::default()),
            register_lock: Mutex::new(()),
        }
    }
}

impl ServiceTable {
    fn get(&self, service: &str) -> Option<Arc<ServiceStats>> {
        self.known.load().get(service).cloned()
    }

    fn register<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let _guard = lock(&self.register_lock);
        let current = self.known.load_full();
        let new: Vec<&str> = names
            .into_iter()
            .filter(|n| !current.contains_key(*n))
            .collect();
        if new.is_empty() {
            return;
        }
        let mut next = (*current).clone();
        for name in new {
            next.entry(Arc::from(name)).or_default();
        }
        self.known.store(Arc::new(next));
    }

    /// Every series: configured services sorted by name, then `unknown`.
    fn entries(&self) -> Vec<(Arc<str>, Arc<ServiceStats>)> {
        let mut entries: Vec<_> = self
            .known
            .load()
            .iter()
            .map(|(name, stats)| (name.clone(), stats.clone()))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.push((Arc::from(UNKNOWN_SERVICE), self.unknown.clone()));
        entries
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Tunnel lifecycle counters: connects by peer site, disconnects by site and reason.
#[derive(Default)]
struct TunnelCounters {
    connects: BTreeMap<Arc<str>, u64>,
    disconnects: BTreeMap<(Arc<str>, DisconnectReason), u64>,
    /// Dialled connections, by the carrier they came up on.
    carriers: BTreeMap<Carrier, u64>,
    /// Links moved to another carrier (TCP to QUIC after a re-probe), by the new carrier.
    switches: BTreeMap<Carrier, u64>,
}

/// All metrics of one node.
pub struct Metrics {
    /// Per-service stats, one table per side (indexed by `Side as usize`).
    services: [ServiceTable; 2],
    tunnel: Mutex<TunnelCounters>,
    tunnel_silences: AtomicU64,
    tunnel_retries: AtomicU64,
    /// Refused tunnel handshakes, by `HandshakeFailure::index`.
    handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
    /// Total handshake failures, observable without polling.
    handshake_total: tokio::sync::watch::Sender<u64>,
    /// Services peers announced that their site may not serve (ignored, never routed to).
    exports_refused: AtomicU64,
    /// The caller-facing listeners, for their connection counts.
    listeners: Mutex<Vec<Arc<ListenerLimits>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            services: Default::default(),
            tunnel: Mutex::default(),
            tunnel_silences: AtomicU64::new(0),
            tunnel_retries: AtomicU64::new(0),
            handshake_failures: std::array::from_fn(|_| AtomicU64::new(0)),
            handshake_total: tokio::sync::watch::channel(0).0,
            exports_refused: AtomicU64::new(0),
            listeners: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A receiver that sees the total number of refused tunnel handshakes change.
    pub fn watch_handshake_failures(&self) -> tokio::sync::watch::Receiver<u64> {
        self.handshake_total.subscribe()
    }

    /// Gives `names` their own series on `side` (kept for the node's life, so counters never
    /// go back when a reload removes a service). Only names from the node's configuration
    /// or policy belong here, never one a peer or caller sent.
    pub(crate) fn register_services<'a>(
        &self,
        side: Side,
        names: impl IntoIterator<Item = &'a str>,
    ) {
        self.services[side as usize].register(names);
    }

    /// The stats of `service` on `side`: its own if configured, else the shared `unknown` ones.
    pub(crate) fn service(&self, side: Side, service: &str) -> Arc<ServiceStats> {
        let table = &self.services[side as usize];
        table.get(service).unwrap_or_else(|| table.unknown.clone())
    }

    /// Like [`Metrics::service`], but a name not registered yet is registered first when
    /// `configured` says the node's configuration names it (asked only on a miss).
    pub(crate) fn service_if(
        &self,
        side: Side,
        service: &str,
        configured: impl FnOnce() -> bool,
    ) -> Arc<ServiceStats> {
        let table = &self.services[side as usize];
        if let Some(stats) = table.get(service) {
            return stats;
        }
        if configured() {
            table.register([service]);
            if let Some(stats) = table.get(service) {
                return stats;
            }
        }
        table.unknown.clone()
    }

    /// A tunnel to a node of `site` came up.
    pub(crate) fn tunnel_connected(&self, site: &str) {
        let mut t = lock(&self.tunnel);
        match t.connects.get_mut(site) {
            Some(n) => *n += 1,
            None => {
                t.connects.insert(Arc::from(site), 1);
            }
        }
    }

    /// A dialled tunnel came up on `carrier`.
    pub(crate) fn tunnel_carrier_chosen(&self, carrier: Carrier) {
        *lock(&self.tunnel).carriers.entry(carrier).or_default() += 1;
    }

    /// A link moved to `carrier` (a re-probe found QUIC working again).
    pub(crate) fn tunnel_carrier_switched(&self, carrier: Carrier) {
        *lock(&self.tunnel).switches.entry(carrier).or_default() += 1;
    }

    /// A link went silent (see `tunnel::session::watch_silence`).
    pub(crate) fn tunnel_silent(&self) {
        self.tunnel_silences.fetch_add(1, Ordering::Relaxed);
    }

    /// A request waiting on a silent link was sent again on another link (the peer never
    /// acknowledged it).
    pub(crate) fn tunnel_retried(&self) {
        self.tunnel_retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A tunnel to a node of `site` went down.
    pub(crate) fn tunnel_disconnected(&self, site: &str, reason: DisconnectReason) {
        let mut t = lock(&self.tunnel);
        *t.disconnects.entry((Arc::from(site), reason)).or_default() += 1;
    }

    /// Registers a listener's limits so `/metrics` shows its connections; returns them shared.
    pub(crate) fn listener(&self, limits: ListenerLimits) -> Arc<ListenerLimits> {
        let limits = Arc::new(limits);
        lock(&self.listeners).push(limits.clone());
        limits
    }

    /// A peer announced a service its site may not serve.
    pub(crate) fn export_refused(&self) {
        self.exports_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn exports_refused(&self) -> u64 {
        self.exports_refused.load(Ordering::Relaxed)
    }

    /// Counts a refused tunnel handshake under its reason (the detail goes to the log).
    pub(crate) fn handshake_failed(&self, reason: HandshakeFailure) {
        self.handshake_failures[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.handshake_total.send_modify(|n| *n += 1);
    }

    /// Refused tunnel handshakes counted under `reason` so far.
    pub fn handshake_failures(&self, reason: HandshakeFailure) -> u64 {
        self.handshake_failures[reason.index()].load(Ordering::Relaxed)
    }

    /// Encodes the request, tunnel and listener families.
    pub(crate) fn encode(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let mut services: Vec<(ServiceLabels, Arc<ServiceStats>)> = Vec::new();
        for side in [Side::Import, Side::Export] {
            for (service, stats) in self.services[side as usize].entries() {
                services.push((ServiceLabels { side, service }, stats));
            }
        }
        encode_request_outcomes(encoder, &services)?;
        encode_latency(encoder, &services)?;
        encode_request_traffic(encoder, &services)?;
        self.encode_tunnel_links(encoder)?;
        self.encode_tunnel_events(encoder)?;
        self.encode_listeners(encoder)
    }

    /// Tunnel dials and carrier switches by carrier, connects and disconnects by site, and
    /// handshake failures by reason.
    fn encode_tunnel_links(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let (connects, disconnects, carriers, switches) = {
            let t = lock(&self.tunnel);
            (
                t.connects.clone(),
                t.disconnects.clone(),
                t.carriers.clone(),
                t.switches.clone(),
            )
        };
        // Both carriers always, so a dashboard sees a fallback start from zero.
        let by_carrier = |counts: &BTreeMap<Carrier, u64>| {
            [Carrier::Quic, Carrier::Tcp].map(|carrier| {
                (
                    CarrierLabels { carrier },
                    counts.get(&carrier).copied().unwrap_or(0),
                )
            })
        };
        counter(
            encoder,
            "hybridge_tunnel_dials_total",
            "Tunnel connections this node dialled that came up, by carrier.",
            by_carrier(&carriers),
        )?;
        counter(
            encoder,
            "hybridge_tunnel_carrier_switches_total",
            "Links moved to another carrier (TLS/TCP to QUIC once a re-probe succeeded), by the carrier moved to.",
            by_carrier(&switches),
        )?;
        counter(
            encoder,
            "hybridge_tunnel_connects_total",
            "Tunnel connections established, by the peer's site.",
            connects
                .into_iter()
                .map(|(site, n)| (SiteLabels { site }, n)),
        )?;
        counter(
            encoder,
            "hybridge_tunnel_disconnects_total",
            "Tunnel connections lost, by the peer's site and reason.",
            disconnects
                .into_iter()
                .map(|((site, reason), n)| (DisconnectLabels { site, reason }, n)),
        )?;
        // Every reason, zero or not: the set is small and fixed, and an attack then changes
        // values, never the series.
        counter(
            encoder,
            "hybridge_tunnel_handshake_failures_total",
            "Failed tunnel handshakes, by reason.",
            HandshakeFailure::ALL
                .into_iter()
                .map(|reason| (HandshakeLabels { reason }, self.handshake_failures(reason))),
        )
    }

    /// Links gone silent, requests retried on another link and announcements refused.
    fn encode_tunnel_events(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let mut silences = encoder.encode_descriptor(
            "hybridge_tunnel_silences",
            "Times a tunnel link went silent (nothing from the peer for a keepalive interval plus two round trips) and stopped getting new requests.",
            None,
            MetricType::Counter,
        )?;
        silences.encode_counter::<NoLabelSet, u64, u64>(
            &self.tunnel_silences.load(Ordering::Relaxed),
            None,
        )?;
        let mut retries = encoder.encode_descriptor(
            "hybridge_tunnel_retries",
            "Requests sent again on another link because the link they waited on went silent before the peer acknowledged them.",
            None,
            MetricType::Counter,
        )?;
        retries.encode_counter::<NoLabelSet, u64, u64>(
            &self.tunnel_retries.load(Ordering::Relaxed),
            None,
        )?;
        let mut refused = encoder.encode_descriptor(
            "hybridge_tunnel_exports_refused",
            "Service announcements ignored because the peer's site may not serve the service.",
            None,
            MetricType::Counter,
        )?;
        refused.encode_counter::<NoLabelSet, u64, u64>(&self.exports_refused(), None)
    }

    /// Per-listener open connections, refusals, accept errors and idle closes.
    fn encode_listeners(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let listeners: Vec<ListenerCounts> =
            lock(&self.listeners).iter().map(|l| l.counts()).collect();
        let by_listener = |pick: fn(&ListenerCounts) -> u64| {
            listeners.iter().map(move |c| {
                (
                    ListenerLabels {
                        listener: Arc::from(c.name.as_str()),
                    },
                    pick(c),
                )
            })
        };
        gauge(
            encoder,
            "hybridge_listener_connections",
            "Caller connections open, by listener.",
            by_listener(|c| c.open as u64),
        )?;
        counter(
            encoder,
            "hybridge_listener_connections_refused_total",
            "Connections closed on accept because the listener held its maximum.",
            by_listener(|c| c.refused),
        )?;
        counter(
            encoder,
            "hybridge_listener_accept_errors_total",
            "Failed accepts (such as running out of file descriptors), by listener.",
            by_listener(|c| c.accept_errors),
        )?;
        counter(
            encoder,
            "hybridge_listener_idle_closed_total",
            "Connections closed after the idle timeout with no request in flight.",
            by_listener(|c| c.idle_closed),
        )
    }
}

/// Requests answered by status class, and the bridge's own errors by reason.
fn encode_request_outcomes(
    encoder: &mut DescriptorEncoder<'_>,
    services: &[(ServiceLabels, Arc<ServiceStats>)],
) -> Result<(), std::fmt::Error> {
    counter(
        encoder,
        "hybridge_requests_total",
        "Requests answered, by side, service and status class.",
        services.iter().flat_map(|(labels, stats)| {
            (1u8..=5).map(|class| {
                (
                    StatusClassLabels {
                        side: labels.side,
                        service: labels.service.clone(),
                        class: StatusClass(class),
                    },
                    stats.class(usize::from(class)),
                )
            })
        }),
    )?;
    // Only reasons that happened: 18 zero series per service would drown the real ones.
    counter(
        encoder,
        "hybridge_bridge_errors_total",
        "Responses produced by the bridge itself, by reason.",
        services.iter().flat_map(|(labels, stats)| {
            Reason::ALL.into_iter().filter_map(|reason| {
                let n = stats.bridge_errors(reason);
                (n > 0).then(|| {
                    (
                        BridgeErrorLabels {
                            side: labels.side,
                            service: labels.service.clone(),
                            reason,
                        },
                        n,
                    )
                })
            })
        }),
    )
}

/// The time to response head of each service's requests, as a histogram.
fn encode_latency(
    encoder: &mut DescriptorEncoder<'_>,
    services: &[(ServiceLabels, Arc<ServiceStats>)],
) -> Result<(), std::fmt::Error> {
    let mut latency = encoder.encode_descriptor(
        "hybridge_request_duration_seconds",
        "Time to response head.",
        None,
        MetricType::Histogram,
    )?;
    for (labels, stats) in services {
        let (counts, sum, count) = stats.latency();
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS.iter().copied().zip(counts).collect();
        latency
            .encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

/// Request and response body bytes and requests in flight, per service.
fn encode_request_traffic(
    encoder: &mut DescriptorEncoder<'_>,
    services: &[(ServiceLabels, Arc<ServiceStats>)],
) -> Result<(), std::fmt::Error> {
    counter(
        encoder,
        "hybridge_request_bytes_total",
        "Request body bytes received from callers or the tunnel.",
        services.iter().map(|(l, s)| (l.clone(), s.bytes_in())),
    )?;
    counter(
        encoder,
        "hybridge_response_bytes_total",
        "Response body bytes sent back.",
        services.iter().map(|(l, s)| (l.clone(), s.bytes_out())),
    )?;
    gauge(
        encoder,
        "hybridge_active_requests",
        "Requests in flight.",
        services.iter().map(|(l, s)| (l.clone(), s.active())),
    )
}

/// Encodes one counter family. `name` is the sample name (`…_total`), as dashboards query it.
pub(crate) fn counter<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &'static str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    // The encoder appends `_total` to a counter's name.
    let family_name = name.strip_suffix("_total").unwrap_or(name);
    let mut family = encoder.encode_descriptor(family_name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, u64, u64>(&value, None)?;
    }
    Ok(())
}

/// Encodes one gauge family.
pub(crate) fn gauge<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &'static str,
    help: &str,
    series: impl IntoIterator<Item = (L, V)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// Encodes one gauge without labels.
pub(crate) fn single_gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &'static str,
    help: &str,
    value: V,
) -> Result<(), std::fmt::Error> {
    let mut family: MetricEncoder<'_> =
        encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    family.encode_gauge(&value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The families of `metrics` as Prometheus text.
    fn text(metrics: &Arc<Metrics>) -> String {
        #[derive(Debug)]
        struct Only(Arc<Metrics>);
        impl prometheus_client::collector::Collector for Only {
            fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
                self.0.encode(&mut encoder)
            }
        }
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Only(metrics.clone())));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("encoding into a String cannot fail");
        out
    }

    #[test]
    fn histogram_and_classes_are_rendered() {
        let m = Arc::new(Metrics::default());
        m.register_services(Side::Import, ["billing"]);
        let s = m.service(Side::Import, "billing");
        s.responded(200, Duration::from_micros(700));
        s.responded(503, Duration::from_secs(20));
        s.bridge_error(Reason::NoRoute);
        let out = text(&m);
        for line in [
            "hybridge_requests_total{side=\"import\",service=\"billing\",class=\"2xx\"} 1",
            "hybridge_requests_total{side=\"import\",service=\"billing\",class=\"5xx\"} 1",
            "hybridge_request_duration_seconds_bucket{side=\"import\",service=\"billing\",le=\"0.001\"} 1",
            "hybridge_request_duration_seconds_bucket{side=\"import\",service=\"billing\",le=\"10\"} 1",
            "hybridge_request_duration_seconds_bucket{side=\"import\",service=\"billing\",le=\"+Inf\"} 2",
            "hybridge_bridge_errors_total{side=\"import\",service=\"billing\",reason=\"no-route\"} 1",
            "hybridge_tunnel_handshake_failures_total{reason=\"expired\"} 0",
            "hybridge_tunnel_exports_refused_total 0",
            "# TYPE hybridge_requests_total counter",
        ] {
            assert!(
                out.lines().any(|l| l == line),
                "{line} missing from:\n{out}"
            );
        }
    }

    #[test]
    fn names_that_are_not_configured_share_one_series() {
        let m = Arc::new(Metrics::default());
        m.register_services(Side::Export, ["inventory"]);
        for hostile in ["a\"b", "x\ny", "back\\slash", "inventory2"] {
            m.service(Side::Export, hostile)
                .responded(403, Duration::ZERO);
        }
        m.service(Side::Export, "inventory")
            .responded(200, Duration::ZERO);
        let out = text(&m);
        assert!(!out.contains("a\\\"b") && !out.contains("x\\ny") && !out.contains("inventory2"));
        assert!(out.contains(
            "hybridge_requests_total{side=\"export\",service=\"unknown\",class=\"4xx\"} 4"
        ));
        assert!(out.contains(
            "hybridge_requests_total{side=\"export\",service=\"inventory\",class=\"2xx\"} 1"
        ));
        // A name the configuration names is registered on first use, and only then.
        let stats = m.service_if(Side::Import, "ledger", || true);
        stats.responded(200, Duration::ZERO);
        m.service_if(Side::Import, "nope", || false)
            .responded(200, Duration::ZERO);
        let out = text(&m);
        assert!(out.contains(
            "hybridge_requests_total{side=\"import\",service=\"ledger\",class=\"2xx\"} 1"
        ));
        assert!(out.contains(
            "hybridge_requests_total{side=\"import\",service=\"unknown\",class=\"2xx\"} 1"
        ));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Arc::new(Metrics::default());
        m.register_services(Side::Import, ["we\"ird\\name\n"]);
        m.tunnel_connected("si\"te");
        let out = text(&m);
        assert!(
            out.contains("service=\"we\\\"ird\\\\name\\n\""),
            "unescaped label in:\n{out}"
        );
        assert!(out.contains("hybridge_tunnel_connects_total{site=\"si\\\"te\"} 1"));
    }
}
