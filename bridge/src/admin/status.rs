//! What the admin API reports: the `/v1/status` document and the `/metrics` text.
//!
//! Read-only views over node state; formatting only.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, prometheus_text};
use prometheus_client::registry::Registry;
use serde_json::Value;

use super::document::{
    CrlStatus, DialingStatus, ExportStatus, ImportStatus, PeerCertificate, PeerStatus,
    StatusDocument,
};
use crate::metrics::{counter, gauge, single_gauge};
use crate::node::NodeState;

/// The `/v1/status` document.
pub fn status_document(state: &NodeState) -> StatusDocument {
    let config = state.config.load();
    let digest = state.acl.digest();
    let peers = peer_statuses(state, &digest);
    let dialing = dialing_statuses(state);
    let exports = state
        .export
        .services
        .load()
        .iter()
        .map(|(name, upstream)| ExportStatus {
            service: name.clone(),
            upstream: upstream.stats(),
        })
        .collect();
    let imports = state
        .addresses
        .imports
        .iter()
        .map(|(service, addr)| ImportStatus {
            service: service.clone(),
            listen: addr.to_string(),
        })
        .collect();
    let readiness = state.readiness();
    StatusDocument {
        node: state.identity.to_string(),
        name: config.node.name.clone(),
        site: config.node.site.clone(),
        uptime_seconds: state.started.elapsed().as_secs(),
        workers: state.workers,
        ready: readiness.is_ready(),
        not_ready_reasons: readiness.reasons,
        draining: state.is_draining(),
        policy_version: state.acl.version(),
        policy_digest: digest,
        peers_disagreeing: state.peers_disagreeing(),
        tunnel_listen: state.addresses.tunnel.map(|a| a.to_string()),
        tunnel_listen_tcp: state.addresses.tunnel_tcp.map(|a| a.to_string()),
        gateway: state.addresses.gateway.map(|a| a.to_string()),
        peers,
        dialing,
        exports,
        imports,
        crl_stale: state.trust.current().crl_stale().as_str().to_owned(),
        crls: crl_status(state, time::OffsetDateTime::now_utc()),
    }
}

/// Each tunnel link's status; `digest` is this node's policy digest.
fn peer_statuses(state: &NodeState, digest: &str) -> Vec<PeerStatus> {
    // `None` for a peer that does not announce a digest.
    let agrees = |theirs: &str| (!theirs.is_empty()).then(|| theirs == digest);
    state
        .peers
        .links()
        .iter()
        .map(|l| {
            let stats = l.connection.stats();
            let mut exports: Vec<String> = l.exports().iter().cloned().collect();
            exports.sort();
            let certificate = l
                .connection
                .peer_certificate()
                .map(|(serial, not_after)| PeerCertificate { serial, not_after });
            PeerStatus {
                peer: l.peer.to_string(),
                remote: l.connection.remote_address().to_string(),
                carrier: l.connection.carrier().as_str().to_owned(),
                direction: l.direction.as_str().to_owned(),
                worker: l.worker,
                connected_seconds: l.established.elapsed().as_secs(),
                rtt_ms: stats.rtt.as_secs_f64() * 1000.0,
                lost_packets: stats.lost_packets,
                sent_packets: stats.sent_packets,
                path_mtu: stats.path_mtu,
                streams_stopped: stats.streams_stopped,
                streams_reset: stats.streams_reset,
                exports,
                draining: l.is_draining(),
                active_streams: l.active_streams(),
                total_streams: l.total_streams(),
                policy_version: l.policy_version(),
                policy_digest: l.policy_digest().to_string(),
                policy_agrees: agrees(&l.policy_digest()),
                certificate,
            }
        })
        .collect()
}

/// Each dialer slot's status.
fn dialing_statuses(state: &NodeState) -> Vec<DialingStatus> {
    let now = tokio::time::Instant::now();
    state
        .dial_states
        .all()
        .into_iter()
        .map(|slot| DialingStatus {
            state_seconds: now.duration_since(slot.since).as_secs(),
            next_retry_ms: slot
                .next_retry
                .map(|at| at.saturating_duration_since(now).as_millis() as u64),
            address: slot.address,
            site: slot.site,
            slot: slot.slot,
            learned: slot.learned,
            state: slot.state.to_owned(),
            carrier: slot.carrier.map(|c| c.as_str().to_owned()),
            carrier_reason: slot.carrier_reason,
            last_error: slot.last_error,
        })
        .collect()
}

/// The `/v1/status` document as JSON (keys sorted, as the API has always sent them).
pub fn status_json(state: &NodeState) -> Value {
    serde_json::to_value(status_document(state)).unwrap_or_default()
}

/// Each CRL in force and how far it is from its nextUpdate at `now` (negative: stale).
fn crl_status(state: &NodeState, now: time::OffsetDateTime) -> Vec<CrlStatus> {
    let text = |at: time::OffsetDateTime| {
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| at.unix_timestamp().to_string())
    };
    let trust = state.trust.current();
    trust
        .crls()
        .iter()
        .enumerate()
        .map(|(i, crl)| CrlStatus {
            position: i + 1,
            issuer: crl.issuer.clone(),
            number: crl.number.clone(),
            revoked: crl.revoked,
            this_update: text(crl.this_update),
            next_update: crl.next_update.map(text),
            next_update_seconds: crl.seconds_to_next_update(now),
            stale: crl.is_stale(now),
        })
        .collect()
}

/// The `/metrics` Prometheus text (format 0.0.4), encoded by prometheus-client.
pub fn metrics_text(state: &NodeState) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector {
        metrics: state.metrics.clone(),
        peers: state.peers.clone(),
        acl: state.acl.clone(),
        export: state.export.clone(),
        trust: state.trust.current(),
    }));
    let mut out = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_text::encode(&mut out, &registry) {
        // Writing into a String fails only if an encoder reports an error; say so instead of
        // serving half a scrape.
        tracing::warn!(error = %e, "encoding /metrics failed");
        out.clear();
    }
    out
}

/// `{peer, connection}`: per tunnel connection (live links only, so bounded by them).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LinkLabels {
    peer: Arc<str>,
    connection: u64,
    carrier: crate::tunnel::connection::Carrier,
}

/// `{digest}`: `hybridge_policy_info` (one series, the policy in force).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PolicyLabels {
    digest: Arc<str>,
}

/// `{crl, issuer}`: per CRL in force (its position in the CRL file and its issuer, both
/// from the node's own files).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CrlLabels {
    crl: u64,
    issuer: Arc<str>,
}

/// `{destination, action}`: `hybridge_acl_decisions_total`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DecisionLabels {
    destination: Arc<str>,
    action: &'static str,
}

/// `{service}`: per exported service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamLabels {
    service: Arc<str>,
}

/// `{service, endpoint}`: per configured upstream endpoint (`host:port` as written, so the
/// series are bounded by the configuration however many addresses a name resolves to).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    service: Arc<str>,
    endpoint: Arc<str>,
}

/// One configured endpoint's numbers, summed over its addresses (and over entries written
/// twice, which share their labels).
#[derive(Clone, Copy, Debug, Default)]
struct EndpointTotals {
    addresses: u64,
    /// Addresses taking requests.
    healthy: u64,
    requests: u64,
    failures: u64,
    dns_failures: u64,
}

/// Everything `/metrics` shows, read at scrape time.
struct NodeCollector {
    metrics: Arc<crate::metrics::Metrics>,
    peers: Arc<crate::tunnel::peers::PeerSet>,
    acl: Arc<crate::acl::AclService>,
    export: Arc<crate::http::export::ExportContext>,
    trust: Arc<crate::trust::Trust>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.metrics.encode(&mut encoder)?;
        self.encode_links(&mut encoder)?;
        self.encode_policy(&mut encoder)?;
        self.encode_crls(&mut encoder)?;
        self.encode_acl_decisions(&mut encoder)?;
        self.encode_upstreams(&mut encoder)
    }
}

impl NodeCollector {
    /// Per-link round-trip time, lost packets and open streams, and the number of links up.
    fn encode_links(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let links = self.peers.links();
        let link_labels = |l: &crate::tunnel::peers::PeerLink| LinkLabels {
            peer: Arc::from(l.peer.to_string()),
            connection: l.id() as u64,
            carrier: l.connection.carrier(),
        };
        gauge(
            encoder,
            "hybridge_tunnel_rtt_seconds",
            "Smoothed round-trip time of each tunnel connection.",
            links
                .iter()
                .map(|l| (link_labels(l), l.connection.stats().rtt.as_secs_f64())),
        )?;
        counter(
            encoder,
            "hybridge_tunnel_lost_packets_total",
            "Packets declared lost on each tunnel connection.",
            links
                .iter()
                .map(|l| (link_labels(l), l.connection.stats().lost_packets)),
        )?;
        gauge(
            encoder,
            "hybridge_tunnel_active_streams",
            "Open request streams on each tunnel connection.",
            links
                .iter()
                .map(|l| (link_labels(l), l.active_streams() as u64)),
        )?;
        single_gauge(
            encoder,
            "hybridge_tunnels_up",
            "Tunnel connections currently up.",
            links.len() as u64,
        )
    }

    /// The ACL policy in force (version, digest) and how many peers disagree with it.
    fn encode_policy(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        single_gauge(
            encoder,
            "hybridge_policy_version",
            "Version of the ACL policy in force.",
            self.acl.version(),
        )?;
        gauge(
            encoder,
            "hybridge_policy_info",
            "The policy in force, by digest (equal on nodes that agree).",
            [(
                PolicyLabels {
                    digest: Arc::from(self.acl.digest().as_str()),
                },
                1u64,
            )],
        )?;
        single_gauge(
            encoder,
            "hybridge_policy_peers_disagreeing",
            "Connected peers whose policy digest differs from this node's.",
            crate::node::peers_disagreeing(&self.peers, &self.acl) as u64,
        )
    }

    /// How far each CRL in force is from its nextUpdate.
    fn encode_crls(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let now = time::OffsetDateTime::now_utc();
        gauge(
            encoder,
            "hybridge_crl_next_update_seconds",
            "Seconds until each CRL in force passes its nextUpdate; negative once it has (the CRL is stale).",
            self.trust
                .crls()
                .iter()
                .zip(1u64..)
                .filter_map(|(crl, position)| {
                    let seconds = crl.seconds_to_next_update(now)?;
                    Some((
                        CrlLabels {
                            crl: position,
                            issuer: Arc::from(crl.issuer.as_str()),
                        },
                        seconds,
                    ))
                }),
        )
    }

    /// The ACL decisions this node made, by destination and action.
    fn encode_acl_decisions(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        counter(
            encoder,
            "hybridge_acl_decisions_total",
            "ACL decisions on this node, by destination (configured or named by the policy, else unknown) and action.",
            self.acl
                .decision_counts()
                .into_iter()
                .map(|((destination, action), n)| {
                    (
                        DecisionLabels {
                            destination: Arc::from(destination),
                            action: action.as_str(),
                        },
                        n,
                    )
                }),
        )
    }

    /// Per-service and per-endpoint upstream health and protection counters of the exports.
    fn encode_upstreams(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut stats: Vec<_> = self
            .export
            .services
            .load()
            .values()
            .map(|u| u.stats())
            .collect();
        stats.sort_by(|a, b| a.service.cmp(&b.service));
        let services: Vec<(Arc<str>, &crate::upstream::UpstreamStats)> = stats
            .iter()
            .map(|s| (Arc::from(s.service.as_str()), s))
            .collect();
        encode_endpoints(encoder, &endpoint_totals(&services))?;
        encode_upstream_services(encoder, &services)
    }
}

/// Each export endpoint's numbers, summed over the addresses its name resolves to.
fn endpoint_totals(
    services: &[(Arc<str>, &crate::upstream::UpstreamStats)],
) -> Vec<(EndpointLabels, EndpointTotals)> {
    let mut totals: Vec<(EndpointLabels, EndpointTotals)> = Vec::new();
    for (service, s) in services {
        let mut by_name: std::collections::BTreeMap<&str, EndpointTotals> =
            std::collections::BTreeMap::new();
        for name in &s.names {
            let entry = by_name.entry(name.name.as_str()).or_default();
            entry.requests += name.total_requests;
            entry.failures += name.failures;
            entry.dns_failures += name.dns_failures;
        }
        for e in &s.endpoints {
            let entry = by_name.entry(e.name.as_str()).or_default();
            entry.addresses += 1;
            entry.healthy += u64::from(e.healthy && !e.ejected);
        }
        totals.extend(by_name.into_iter().map(|(name, numbers)| {
            (
                EndpointLabels {
                    service: service.clone(),
                    endpoint: Arc::from(name),
                },
                numbers,
            )
        }));
    }
    totals
}

/// Per-endpoint health, addresses, requests, failures and DNS failures.
fn encode_endpoints(
    encoder: &mut DescriptorEncoder<'_>,
    totals: &[(EndpointLabels, EndpointTotals)],
) -> Result<(), std::fmt::Error> {
    let endpoints = |pick: fn(&EndpointTotals) -> u64| {
        totals
            .iter()
            .map(move |(labels, numbers)| (labels.clone(), pick(numbers)))
    };
    gauge(
        encoder,
        "hybridge_upstream_endpoint_healthy",
        "Addresses of the endpoint that take requests (active checks pass and not ejected): 1 or 0 for an IP address.",
        endpoints(|e| e.healthy),
    )?;
    gauge(
        encoder,
        "hybridge_upstream_endpoint_addresses",
        "Addresses the endpoint resolves to now (1 for an IP address).",
        endpoints(|e| e.addresses),
    )?;
    counter(
        encoder,
        "hybridge_upstream_endpoint_requests_total",
        "Requests sent to the endpoint, over every address it has resolved to.",
        endpoints(|e| e.requests),
    )?;
    counter(
        encoder,
        "hybridge_upstream_endpoint_failures_total",
        "Connect errors, resets and 5xx answers from the endpoint, over every address it has resolved to.",
        endpoints(|e| e.failures),
    )?;
    counter(
        encoder,
        "hybridge_upstream_dns_failures_total",
        "Failed lookups of the endpoint's host name (each kept its last addresses); 0 for an IP address.",
        endpoints(|e| e.dns_failures),
    )
}

/// Per-service circuit-breaker trips, retries and pending requests.
fn encode_upstream_services(
    encoder: &mut DescriptorEncoder<'_>,
    services: &[(Arc<str>, &crate::upstream::UpstreamStats)],
) -> Result<(), std::fmt::Error> {
    let per_service = |pick: fn(&crate::upstream::UpstreamStats) -> u64| {
        services.iter().map(move |(service, s)| {
            (
                UpstreamLabels {
                    service: service.clone(),
                },
                pick(s),
            )
        })
    };
    counter(
        encoder,
        "hybridge_upstream_circuit_breaker_trips_total",
        "Requests refused with 503 overloaded by the circuit breaker.",
        per_service(|s| s.circuit_breaker_trips),
    )?;
    counter(
        encoder,
        "hybridge_upstream_retries_total",
        "Retries of idempotent requests.",
        per_service(|s| s.retries),
    )?;
    gauge(
        encoder,
        "hybridge_upstream_pending_requests",
        "Requests waiting for an upstream connection.",
        per_service(|s| s.pending_requests as u64),
    )
}
