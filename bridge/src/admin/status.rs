//! What the admin API reports: the `/v1/status` document and the `/metrics` text.
//!
//! Read-only views over node state; formatting only.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::metrics::escape;
use crate::node::NodeState;

/// The `/v1/status` JSON document.
pub fn status_json(state: &NodeState) -> Value {
    let config = state.config.load();
    let digest = state.acl.digest();
    // `None` for a peer that does not announce a digest.
    let agrees = |theirs: &str| (!theirs.is_empty()).then(|| theirs == digest);
    let peers: Vec<Value> = state
        .peers
        .links()
        .iter()
        .map(|l| {
            let stats = l.connection.stats();
            let mut exports: Vec<&String> = Vec::new();
            let exported = l.exports();
            exports.extend(exported.iter());
            exports.sort();
            let certificate = l
                .connection
                .peer_certificate()
                .map(|(serial, not_after)| json!({ "serial": serial, "not_after": not_after }));
            json!({
                "peer": l.peer.to_string(),
                "remote": l.connection.remote_address().to_string(),
                "direction": l.direction,
                "worker": l.worker,
                "connected_seconds": l.established.elapsed().as_secs(),
                "rtt_ms": stats.rtt.as_secs_f64() * 1000.0,
                "lost_packets": stats.lost_packets,
                "sent_packets": stats.sent_packets,
                "path_mtu": stats.path_mtu,
                "streams_stopped": stats.streams_stopped,
                "streams_reset": stats.streams_reset,
                "exports": exports,
                "draining": l.is_draining(),
                "active_streams": l.active_streams(),
                "total_streams": l.total_streams(),
                "policy_version": l.policy_version(),
                "policy_digest": l.policy_digest().as_str(),
                "policy_agrees": agrees(&l.policy_digest()),
                "certificate": certificate,
            })
        })
        .collect();
    let exports: Vec<Value> = state
        .export
        .services
        .load()
        .iter()
        .map(|(name, upstream)| json!({ "service": name, "upstream": upstream.stats() }))
        .collect();
    let imports: Vec<Value> = state
        .addresses
        .imports
        .iter()
        .map(|(service, addr)| json!({ "service": service, "listen": addr.to_string() }))
        .collect();
    json!({
        "node": state.identity.to_string(),
        "name": config.node.name,
        "site": config.node.site,
        "uptime_seconds": state.started.elapsed().as_secs(),
        "workers": state.workers,
        "ready": state.is_ready(),
        "draining": state.is_draining(),
        "policy_version": state.acl.version(),
        "policy_digest": digest,
        "peers_disagreeing": state.peers_disagreeing(),
        "tunnel_listen": state.addresses.tunnel.map(|a| a.to_string()),
        "gateway": state.addresses.gateway.map(|a| a.to_string()),
        "peers": peers,
        "exports": exports,
        "imports": imports,
        "crl_stale": state.trust.current().crl_stale().as_str(),
        "crls": crl_status(state, time::OffsetDateTime::now_utc()),
    })
}

/// Each CRL in force and how far it is from its nextUpdate at `now` (negative: stale).
fn crl_status(state: &NodeState, now: time::OffsetDateTime) -> Vec<Value> {
    let text = |at: time::OffsetDateTime| {
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| at.unix_timestamp().to_string())
    };
    let trust = state.trust.current();
    trust
        .crls()
        .iter()
        .enumerate()
        .map(|(i, crl)| {
            json!({
                "position": i + 1,
                "issuer": crl.issuer,
                "number": crl.number,
                "revoked": crl.revoked,
                "this_update": text(crl.this_update),
                "next_update": crl.next_update.map(text),
                "next_update_seconds": crl.seconds_to_next_update(now),
                "stale": crl.is_stale(now),
            })
        })
        .collect()
}

/// The `/metrics` Prometheus text.
pub fn metrics_text(state: &NodeState) -> String {
    let mut out = String::with_capacity(8192);
    state.metrics.render(&mut out);
    let _ = writeln!(
        out,
        "# HELP hybridge_tunnel_rtt_seconds Smoothed round-trip time of each tunnel connection."
    );
    let _ = writeln!(out, "# TYPE hybridge_tunnel_rtt_seconds gauge");
    let links = state.peers.links();
    for l in links.iter() {
        let _ = writeln!(
            out,
            "hybridge_tunnel_rtt_seconds{{peer=\"{}\",connection=\"{}\"}} {}",
            escape(&l.peer.to_string()),
            l.id(),
            l.connection.stats().rtt.as_secs_f64()
        );
    }
    let _ = writeln!(
        out,
        "# HELP hybridge_tunnel_lost_packets_total Packets declared lost on each tunnel connection."
    );
    let _ = writeln!(out, "# TYPE hybridge_tunnel_lost_packets_total counter");
    for l in links.iter() {
        let _ = writeln!(
            out,
            "hybridge_tunnel_lost_packets_total{{peer=\"{}\",connection=\"{}\"}} {}",
            escape(&l.peer.to_string()),
            l.id(),
            l.connection.stats().lost_packets
        );
    }
    let _ = writeln!(
        out,
        "# HELP hybridge_tunnel_active_streams Open request streams on each tunnel connection."
    );
    let _ = writeln!(out, "# TYPE hybridge_tunnel_active_streams gauge");
    for l in links.iter() {
        let _ = writeln!(
            out,
            "hybridge_tunnel_active_streams{{peer=\"{}\",connection=\"{}\"}} {}",
            escape(&l.peer.to_string()),
            l.id(),
            l.active_streams()
        );
    }
    let _ = writeln!(
        out,
        "# HELP hybridge_tunnels_up Tunnel connections currently up."
    );
    let _ = writeln!(out, "# TYPE hybridge_tunnels_up gauge");
    let _ = writeln!(out, "hybridge_tunnels_up {}", links.len());
    let _ = writeln!(
        out,
        "# HELP hybridge_policy_version Version of the ACL policy in force."
    );
    let _ = writeln!(out, "# TYPE hybridge_policy_version gauge");
    let _ = writeln!(out, "hybridge_policy_version {}", state.acl.version());
    let _ = writeln!(
        out,
        "# HELP hybridge_policy_info The policy in force, by digest (equal on nodes that agree)."
    );
    let _ = writeln!(out, "# TYPE hybridge_policy_info gauge");
    let _ = writeln!(
        out,
        "hybridge_policy_info{{digest=\"{}\"}} 1",
        state.acl.digest()
    );
    let _ = writeln!(
        out,
        "# HELP hybridge_policy_peers_disagreeing Connected peers whose policy digest differs from this node's."
    );
    let _ = writeln!(out, "# TYPE hybridge_policy_peers_disagreeing gauge");
    let _ = writeln!(
        out,
        "hybridge_policy_peers_disagreeing {}",
        state.peers_disagreeing()
    );
    let _ = writeln!(
        out,
        "# HELP hybridge_crl_next_update_seconds Seconds until each CRL in force passes its nextUpdate; negative once it has (the CRL is stale)."
    );
    let _ = writeln!(out, "# TYPE hybridge_crl_next_update_seconds gauge");
    let now = time::OffsetDateTime::now_utc();
    for (i, crl) in state.trust.current().crls().iter().enumerate() {
        if let Some(seconds) = crl.seconds_to_next_update(now) {
            let _ = writeln!(
                out,
                "hybridge_crl_next_update_seconds{{crl=\"{}\",issuer=\"{}\"}} {seconds}",
                i + 1,
                escape(&crl.issuer)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP hybridge_acl_decisions_total ACL decisions on this node, by destination and action."
    );
    let _ = writeln!(out, "# TYPE hybridge_acl_decisions_total counter");
    for ((destination, action), n) in state.acl.decision_counts() {
        let _ = writeln!(
            out,
            "hybridge_acl_decisions_total{{destination=\"{}\",action=\"{}\"}} {n}",
            escape(&destination),
            action_label(&action)
        );
    }
    upstream_metrics(state, &mut out);
    out
}

/// Per-service and per-endpoint upstream health and protection counters of the exports.
fn upstream_metrics(state: &NodeState, out: &mut String) {
    let mut stats: Vec<_> = state
        .export
        .services
        .load()
        .values()
        .map(|u| u.stats())
        .collect();
    stats.sort_by(|a, b| a.service.cmp(&b.service));
    type EndpointPick = fn(&crate::upstream::EndpointStats) -> u64;
    let per_endpoint: [(&str, &str, &str, EndpointPick); 3] = [
        (
            "hybridge_upstream_endpoint_healthy",
            "gauge",
            "1 when the endpoint takes requests (active checks pass and not ejected), else 0.",
            |e| u64::from(e.healthy && !e.ejected),
        ),
        (
            "hybridge_upstream_endpoint_requests_total",
            "counter",
            "Requests sent to the endpoint.",
            |e| e.total_requests,
        ),
        (
            "hybridge_upstream_endpoint_failures_total",
            "counter",
            "Connect errors, resets and 5xx answers from the endpoint.",
            |e| e.failures,
        ),
    ];
    for (name, kind, help, pick) in per_endpoint {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in &stats {
            for e in &s.endpoints {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",endpoint=\"{}\"}} {}",
                    escape(&s.service),
                    e.addr,
                    pick(e)
                );
            }
        }
    }
    type ServicePick = fn(&crate::upstream::UpstreamStats) -> u64;
    let per_service: [(&str, &str, &str, ServicePick); 3] = [
        (
            "hybridge_upstream_circuit_breaker_trips_total",
            "counter",
            "Requests refused with 503 overloaded by the circuit breaker.",
            |s| s.circuit_breaker_trips,
        ),
        (
            "hybridge_upstream_retries_total",
            "counter",
            "Retries of idempotent requests.",
            |s| s.retries,
        ),
        (
            "hybridge_upstream_pending_requests",
            "gauge",
            "Requests waiting for an upstream connection.",
            |s| s.pending_requests as u64,
        ),
    ];
    for (name, kind, help, pick) in per_service {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for s in &stats {
            let _ = writeln!(
                out,
                "{name}{{service=\"{}\"}} {}",
                escape(&s.service),
                pick(s)
            );
        }
    }
}

fn action_label(action: &crate::acl::Action) -> String {
    format!("{action:?}").to_lowercase()
}
