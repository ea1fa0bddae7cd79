//! Reload as a pure diff of the running and the new configuration (like rathole's
//! `calculate_events`): every field is either applied by a running node or waits for a restart.
//!
//! `diff` destructures every config struct without `..`, so a field added to one does not
//! compile until it is classified here. It decides and names; `Node::reload` applies.

use std::fmt::Display;

use super::{
    AdminRemoteSection, AdminSection, Config, ExportConfig, GatewayConfig, ImportConfig,
    LimitsSection, NodeSection, PeerConfig, TlsSection, TunnelSection,
};
use crate::upstream::{
    CircuitBreakerSettings, HealthCheckSettings, PassiveHealthSettings, RetrySettings,
    UpstreamSettings,
};

/// What reloading `new` over the running `old` configuration does.
#[derive(Clone, Debug)]
pub(crate) struct ReloadPlan {
    /// The configuration in force after the reload: `new`, except that every field needing a
    /// restart keeps its running value (so the next reload names it again until a restart).
    pub(crate) in_force: Config,
    /// Changed fields the reload applies, e.g. `limits.max_header_bytes`, in config order.
    pub(crate) applied: Vec<String>,
    /// Changed fields whose new value waits for a restart, e.g. `tunnel.keepalive`.
    pub(crate) needs_restart: Vec<String>,
}

/// The two lists a diff fills, one field at a time.
#[derive(Default)]
struct Decisions {
    applied: Vec<String>,
    needs_restart: Vec<String>,
}

impl Decisions {
    /// A field a running node applies: the new value is in force.
    fn live<T: PartialEq>(&mut self, field: impl Display, old: T, new: T) -> T {
        if old != new {
            self.applied.push(field.to_string());
        }
        new
    }

    /// A field only a restart applies: the running value stays in force.
    fn restart<T: PartialEq>(&mut self, field: impl Display, old: T, new: T) -> T {
        if old != new {
            self.needs_restart.push(field.to_string());
        }
        old
    }

    /// `live` when `applies`, else `restart`: a listener's settings wait for a restart when
    /// the listener itself does.
    fn live_if<T: PartialEq>(&mut self, applies: bool, field: impl Display, old: T, new: T) -> T {
        if applies {
            self.live(field, old, new)
        } else {
            self.restart(field, old, new)
        }
    }
}

/// Classifies every field of `new` against the running `old`: which changes a reload applies,
/// which wait for a restart, and the configuration in force afterwards.
pub(crate) fn diff(old: &Config, new: &Config) -> ReloadPlan {
    let Config {
        source: _,
        node: old_node,
        tls: old_tls,
        tunnel: old_tunnel,
        peers: old_peers,
        admin: old_admin,
        limits: old_limits,
        exports: old_exports,
        imports: old_imports,
        gateway: old_gateway,
    } = old.clone();
    let Config {
        source,
        node,
        tls,
        tunnel,
        peers,
        admin,
        limits,
        exports,
        imports,
        gateway,
    } = new.clone();
    let mut d = Decisions::default();
    let in_force = Config {
        // Where the new text was read from: the file the next reload reads again.
        source,
        node: node_section(&mut d, old_node, node),
        tls: tls_section(&mut d, old_tls, tls),
        tunnel: tunnel_section(&mut d, old_tunnel, tunnel),
        peers: pairs(old_peers, peers)
            .enumerate()
            .filter_map(|(i, pair)| peer(&mut d, i, pair))
            .collect(),
        admin: admin_section(&mut d, old_admin, admin),
        limits: limits_section(&mut d, old_limits, limits),
        exports: export_list(&mut d, old_exports, exports),
        imports: pairs(old_imports, imports)
            .enumerate()
            .filter_map(|(i, pair)| import(&mut d, i, pair))
            .collect(),
        gateway: gateway_section(&mut d, old_gateway, gateway),
    };
    ReloadPlan {
        in_force,
        applied: d.applied,
        needs_restart: d.needs_restart,
    }
}

/// The entries of two lists side by side, by position: (old, new), either missing when one
/// list is longer.
fn pairs<T>(old: Vec<T>, new: Vec<T>) -> impl Iterator<Item = (Option<T>, Option<T>)> {
    let len = old.len().max(new.len());
    let mut old = old.into_iter();
    let mut new = new.into_iter();
    (0..len).map(move |_| (old.next(), new.next()))
}

fn node_section(d: &mut Decisions, old: NodeSection, new: NodeSection) -> NodeSection {
    let NodeSection {
        name,
        site,
        trust_domain,
        data_dir,
    } = old;
    let NodeSection {
        name: new_name,
        site: new_site,
        trust_domain: new_trust_domain,
        data_dir: new_data_dir,
    } = new;
    // The node's identity: its certificate, the tunnels its peers admitted and the open
    // policy store are bound to it.
    NodeSection {
        name: d.restart("node.name", name, new_name),
        site: d.restart("node.site", site, new_site),
        trust_domain: d.restart("node.trust_domain", trust_domain, new_trust_domain),
        data_dir: d.restart("node.data_dir", data_dir, new_data_dir),
    }
}

fn tls_section(d: &mut Decisions, old: TlsSection, new: TlsSection) -> TlsSection {
    let TlsSection {
        ca,
        cert,
        key,
        crl,
        crl_stale,
    } = old;
    let TlsSection {
        ca: new_ca,
        cert: new_cert,
        key: new_key,
        crl: new_crl,
        crl_stale: new_crl_stale,
    } = new;
    // Every reload re-reads the files and publishes them to listeners and live connections
    // (`crate::trust`), so other paths and another staleness policy apply the same way.
    TlsSection {
        ca: d.live("tls.ca", ca, new_ca),
        cert: d.live("tls.cert", cert, new_cert),
        key: d.live("tls.key", key, new_key),
        crl: d.live("tls.crl", crl, new_crl),
        crl_stale: d.live("tls.crl_stale", crl_stale, new_crl_stale),
    }
}

fn tunnel_section(d: &mut Decisions, old: TunnelSection, new: TunnelSection) -> TunnelSection {
    let TunnelSection {
        listen,
        allowed_sites,
        bind,
        keepalive,
        idle_timeout,
        reconnect_max_backoff,
        transport,
        listen_tcp,
        tcp_fallback_after,
        quic_reprobe_interval,
        congestion,
        announce,
    } = old;
    let TunnelSection {
        listen: new_listen,
        allowed_sites: new_allowed_sites,
        bind: new_bind,
        keepalive: new_keepalive,
        idle_timeout: new_idle_timeout,
        reconnect_max_backoff: new_reconnect_max_backoff,
        transport: new_transport,
        listen_tcp: new_listen_tcp,
        tcp_fallback_after: new_tcp_fallback_after,
        quic_reprobe_interval: new_quic_reprobe_interval,
        congestion: new_congestion,
        announce: new_announce,
    } = new;
    // The tunnel sockets are bound once.
    let listen = d.restart("tunnel.listen", listen, new_listen);
    // Sites are checked at every handshake and, through the trust in force, on live tunnels.
    // A node that keeps listening until its restart keeps its sites rather than take none.
    let allowed_sites = if listen.is_some() && new_allowed_sites.is_empty() {
        d.restart("tunnel.allowed_sites", allowed_sites, new_allowed_sites)
    } else {
        d.live("tunnel.allowed_sites", allowed_sites, new_allowed_sites)
    };
    TunnelSection {
        listen,
        allowed_sites,
        bind: d.restart("tunnel.bind", bind, new_bind),
        // QUIC transport parameters are negotiated in each tunnel's handshake: a new value
        // would apply only to tunnels opened later, a mix nobody could see. Restart.
        keepalive: d.restart("tunnel.keepalive", keepalive, new_keepalive),
        idle_timeout: d.restart("tunnel.idle_timeout", idle_timeout, new_idle_timeout),
        // Read by every dialer before each wait.
        reconnect_max_backoff: d.live(
            "tunnel.reconnect_max_backoff",
            reconnect_max_backoff,
            new_reconnect_max_backoff,
        ),
        // Dialers and the TCP listener take these when they start.
        transport: d.restart("tunnel.transport", transport, new_transport),
        listen_tcp: d.restart("tunnel.listen_tcp", listen_tcp, new_listen_tcp),
        tcp_fallback_after: d.restart(
            "tunnel.tcp_fallback_after",
            tcp_fallback_after,
            new_tcp_fallback_after,
        ),
        quic_reprobe_interval: d.restart(
            "tunnel.quic_reprobe_interval",
            quic_reprobe_interval,
            new_quic_reprobe_interval,
        ),
        // Each connection builds its controller when it opens, and a TCP socket takes its
        // algorithm when it connects: a new value would apply only to tunnels opened later.
        congestion: d.restart("tunnel.congestion", congestion, new_congestion),
        // Sent to every peer in the update a reload broadcasts.
        announce: d.live("tunnel.announce", announce, new_announce),
    }
}

/// Dialers run per configured peer and connection slot from the start: every peer change,
/// and a peer added or removed, waits for a restart.
fn peer(
    d: &mut Decisions,
    i: usize,
    pair: (Option<PeerConfig>, Option<PeerConfig>),
) -> Option<PeerConfig> {
    match pair {
        (Some(old), Some(new)) => {
            let PeerConfig {
                address,
                site,
                name,
                connections,
                member_networks,
            } = old;
            let PeerConfig {
                address: new_address,
                site: new_site,
                name: new_name,
                connections: new_connections,
                member_networks: new_member_networks,
            } = new;
            let field = |f: &str| format!("peer[{i}].{f}");
            Some(PeerConfig {
                address: d.restart(field("address"), address, new_address),
                site: d.restart(field("site"), site, new_site),
                name: d.restart(field("name"), name, new_name),
                connections: d.restart(field("connections"), connections, new_connections),
                member_networks: d.restart(
                    field("member_networks"),
                    member_networks,
                    new_member_networks,
                ),
            })
        }
        (Some(old), None) => {
            d.needs_restart.push(format!("peer[{i}] (removed)"));
            Some(old)
        }
        (None, Some(_)) => {
            d.needs_restart.push(format!("peer[{i}] (added)"));
            None
        }
        (None, None) => None,
    }
}

fn admin_section(d: &mut Decisions, old: AdminSection, new: AdminSection) -> AdminSection {
    let AdminSection {
        listen,
        allow_remote,
        health_listen,
        socket,
        remote,
    } = old;
    let AdminSection {
        listen: new_listen,
        allow_remote: new_allow_remote,
        health_listen: new_health_listen,
        socket: new_socket,
        remote: new_remote,
    } = new;
    // The admin listeners and the socket are bound once; `allow_remote` only judges `listen`.
    let remote = match (remote, new_remote) {
        (Some(AdminRemoteSection { listen }), Some(AdminRemoteSection { listen: new_listen })) => {
            Some(AdminRemoteSection {
                listen: d.restart("admin.remote.listen", listen, new_listen),
            })
        }
        (remote, new_remote) => d.restart("admin.remote", remote, new_remote),
    };
    AdminSection {
        listen: d.restart("admin.listen", listen, new_listen),
        allow_remote: d.restart("admin.allow_remote", allow_remote, new_allow_remote),
        health_listen: d.restart("admin.health_listen", health_listen, new_health_listen),
        socket: d.restart("admin.socket", socket, new_socket),
        remote,
    }
}

fn limits_section(d: &mut Decisions, old: LimitsSection, new: LimitsSection) -> LimitsSection {
    let LimitsSection {
        max_header_bytes,
        drain_timeout,
        max_connections,
        idle_timeout,
        ready_timeout,
    } = old;
    let LimitsSection {
        max_header_bytes: new_max_header_bytes,
        drain_timeout: new_drain_timeout,
        max_connections: new_max_connections,
        idle_timeout: new_idle_timeout,
        ready_timeout: new_ready_timeout,
    } = new;
    // Listeners read these per connection and request; draining reads the config in force.
    LimitsSection {
        max_header_bytes: d.live(
            "limits.max_header_bytes",
            max_header_bytes,
            new_max_header_bytes,
        ),
        drain_timeout: d.live("limits.drain_timeout", drain_timeout, new_drain_timeout),
        max_connections: d.live(
            "limits.max_connections",
            max_connections,
            new_max_connections,
        ),
        idle_timeout: d.live("limits.idle_timeout", idle_timeout, new_idle_timeout),
        // Read once, at start, before READY=1.
        ready_timeout: d.restart("limits.ready_timeout", ready_timeout, new_ready_timeout),
    }
}

/// Exports are matched by name and all live: a changed upstream is started anew and swapped
/// in, and the export list is announced to peers.
fn export_list(
    d: &mut Decisions,
    old: Vec<ExportConfig>,
    new: Vec<ExportConfig>,
) -> Vec<ExportConfig> {
    for removed in old.iter().filter(|o| !new.iter().any(|n| n.name == o.name)) {
        d.applied
            .push(format!("export[{}] (removed)", removed.name));
    }
    let mut old = old;
    new.into_iter()
        .map(|new| match old.iter().position(|o| o.name == new.name) {
            Some(at) => export(d, old.swap_remove(at), new),
            None => {
                d.applied.push(format!("export[{}] (added)", new.name));
                new
            }
        })
        .collect()
}

fn export(d: &mut Decisions, old: ExportConfig, new: ExportConfig) -> ExportConfig {
    let ExportConfig {
        // Matched by name: equal.
        name: _,
        upstream,
        escaped_slashes,
    } = old;
    let ExportConfig {
        name: new_name,
        upstream: new_upstream,
        escaped_slashes: new_escaped_slashes,
    } = new;
    let prefix = format!("export[{new_name}]");
    ExportConfig {
        name: new_name,
        upstream: upstream_settings(d, &prefix, upstream, new_upstream),
        escaped_slashes: d.live(
            format!("{prefix}.escaped_slashes"),
            escaped_slashes,
            new_escaped_slashes,
        ),
    }
}

fn upstream_settings(
    d: &mut Decisions,
    prefix: &str,
    old: UpstreamSettings,
    new: UpstreamSettings,
) -> UpstreamSettings {
    let UpstreamSettings {
        endpoints,
        dns_refresh,
        protocol,
        health_check,
        connect_timeout,
        request_timeout,
        request_body_idle_timeout,
        circuit_breaker,
        retry,
        passive_health,
    } = old;
    let UpstreamSettings {
        endpoints: new_endpoints,
        dns_refresh: new_dns_refresh,
        protocol: new_protocol,
        health_check: new_health_check,
        connect_timeout: new_connect_timeout,
        request_timeout: new_request_timeout,
        request_body_idle_timeout: new_request_body_idle_timeout,
        circuit_breaker: new_circuit_breaker,
        retry: new_retry,
        passive_health: new_passive_health,
    } = new;
    let field = |f: &str| format!("{prefix}.{f}");
    // Any change starts the export's upstream anew (pools, health checks, breaker) and swaps
    // it in; requests in flight finish on the old one.
    UpstreamSettings {
        endpoints: d.live(field("endpoints"), endpoints, new_endpoints),
        dns_refresh: d.live(field("dns_refresh"), dns_refresh, new_dns_refresh),
        protocol: d.live(field("protocol"), protocol, new_protocol),
        health_check: match (health_check, new_health_check) {
            (Some(old), Some(new)) => {
                Some(health_check_settings(d, &field("health_check"), old, new))
            }
            (old, new) => d.live(field("health_check"), old, new),
        },
        connect_timeout: d.live(
            field("connect_timeout"),
            connect_timeout,
            new_connect_timeout,
        ),
        request_timeout: d.live(
            field("request_timeout"),
            request_timeout,
            new_request_timeout,
        ),
        request_body_idle_timeout: d.live(
            field("request_body_idle_timeout"),
            request_body_idle_timeout,
            new_request_body_idle_timeout,
        ),
        circuit_breaker: circuit_breaker_settings(
            d,
            &field("circuit_breaker"),
            circuit_breaker,
            new_circuit_breaker,
        ),
        retry: retry_settings(d, &field("retry"), retry, new_retry),
        passive_health: passive_health_settings(
            d,
            &field("passive_health"),
            passive_health,
            new_passive_health,
        ),
    }
}

fn health_check_settings(
    d: &mut Decisions,
    prefix: &str,
    old: HealthCheckSettings,
    new: HealthCheckSettings,
) -> HealthCheckSettings {
    let HealthCheckSettings {
        path,
        interval,
        timeout,
        healthy_threshold,
        unhealthy_threshold,
    } = old;
    let HealthCheckSettings {
        path: new_path,
        interval: new_interval,
        timeout: new_timeout,
        healthy_threshold: new_healthy_threshold,
        unhealthy_threshold: new_unhealthy_threshold,
    } = new;
    let field = |f: &str| format!("{prefix}.{f}");
    HealthCheckSettings {
        path: d.live(field("path"), path, new_path),
        interval: d.live(field("interval"), interval, new_interval),
        timeout: d.live(field("timeout"), timeout, new_timeout),
        healthy_threshold: d.live(
            field("healthy_threshold"),
            healthy_threshold,
            new_healthy_threshold,
        ),
        unhealthy_threshold: d.live(
            field("unhealthy_threshold"),
            unhealthy_threshold,
            new_unhealthy_threshold,
        ),
    }
}

fn circuit_breaker_settings(
    d: &mut Decisions,
    prefix: &str,
    old: CircuitBreakerSettings,
    new: CircuitBreakerSettings,
) -> CircuitBreakerSettings {
    let CircuitBreakerSettings {
        max_active_requests,
        max_pending_requests,
        max_connections,
    } = old;
    let CircuitBreakerSettings {
        max_active_requests: new_max_active_requests,
        max_pending_requests: new_max_pending_requests,
        max_connections: new_max_connections,
    } = new;
    let field = |f: &str| format!("{prefix}.{f}");
    CircuitBreakerSettings {
        max_active_requests: d.live(
            field("max_active_requests"),
            max_active_requests,
            new_max_active_requests,
        ),
        max_pending_requests: d.live(
            field("max_pending_requests"),
            max_pending_requests,
            new_max_pending_requests,
        ),
        max_connections: d.live(
            field("max_connections"),
            max_connections,
            new_max_connections,
        ),
    }
}

fn retry_settings(
    d: &mut Decisions,
    prefix: &str,
    old: RetrySettings,
    new: RetrySettings,
) -> RetrySettings {
    let RetrySettings {
        max_retries,
        budget_percent,
        min_concurrent_retries,
    } = old;
    let RetrySettings {
        max_retries: new_max_retries,
        budget_percent: new_budget_percent,
        min_concurrent_retries: new_min_concurrent_retries,
    } = new;
    let field = |f: &str| format!("{prefix}.{f}");
    RetrySettings {
        max_retries: d.live(field("max_retries"), max_retries, new_max_retries),
        budget_percent: d.live(field("budget_percent"), budget_percent, new_budget_percent),
        min_concurrent_retries: d.live(
            field("min_concurrent_retries"),
            min_concurrent_retries,
            new_min_concurrent_retries,
        ),
    }
}

fn passive_health_settings(
    d: &mut Decisions,
    prefix: &str,
    old: PassiveHealthSettings,
    new: PassiveHealthSettings,
) -> PassiveHealthSettings {
    let PassiveHealthSettings {
        consecutive_failures,
        base_ejection,
        max_ejection,
        max_ejection_percent,
    } = old;
    let PassiveHealthSettings {
        consecutive_failures: new_consecutive_failures,
        base_ejection: new_base_ejection,
        max_ejection: new_max_ejection,
        max_ejection_percent: new_max_ejection_percent,
    } = new;
    let field = |f: &str| format!("{prefix}.{f}");
    PassiveHealthSettings {
        consecutive_failures: d.live(
            field("consecutive_failures"),
            consecutive_failures,
            new_consecutive_failures,
        ),
        base_ejection: d.live(field("base_ejection"), base_ejection, new_base_ejection),
        max_ejection: d.live(field("max_ejection"), max_ejection, new_max_ejection),
        max_ejection_percent: d.live(
            field("max_ejection_percent"),
            max_ejection_percent,
            new_max_ejection_percent,
        ),
    }
}

/// Import listeners are matched by position. Each is bound to its address at start and serves
/// one service to one kind of caller: another address, service or caller is another listener,
/// which waits for a restart, and so do its settings. A listener that stays applies its
/// request timeout and escaped-slash handling at once.
fn import(
    d: &mut Decisions,
    i: usize,
    pair: (Option<ImportConfig>, Option<ImportConfig>),
) -> Option<ImportConfig> {
    match pair {
        (Some(old), Some(new)) => {
            let ImportConfig {
                service,
                listen,
                caller,
                request_timeout,
                escaped_slashes,
            } = old;
            let ImportConfig {
                service: new_service,
                listen: new_listen,
                caller: new_caller,
                request_timeout: new_request_timeout,
                escaped_slashes: new_escaped_slashes,
            } = new;
            let same_listener =
                service == new_service && listen == new_listen && caller == new_caller;
            let field = |f: &str| format!("import[{i}].{f}");
            Some(ImportConfig {
                service: d.restart(field("service"), service, new_service),
                listen: d.restart(field("listen"), listen, new_listen),
                caller: d.restart(field("caller"), caller, new_caller),
                request_timeout: d.live_if(
                    same_listener,
                    field("request_timeout"),
                    request_timeout,
                    new_request_timeout,
                ),
                escaped_slashes: d.live_if(
                    same_listener,
                    field("escaped_slashes"),
                    escaped_slashes,
                    new_escaped_slashes,
                ),
            })
        }
        (Some(old), None) => {
            d.needs_restart.push(format!("import[{i}] (removed)"));
            Some(old)
        }
        (None, Some(_)) => {
            d.needs_restart.push(format!("import[{i}] (added)"));
            None
        }
        (None, None) => None,
    }
}

/// The gateway, like an import listener: its address, suffix and caller are the listener;
/// its request timeout and escaped-slash handling apply at once while it stays.
fn gateway_section(
    d: &mut Decisions,
    old: Option<GatewayConfig>,
    new: Option<GatewayConfig>,
) -> Option<GatewayConfig> {
    match (old, new) {
        (Some(old), Some(new)) => {
            let GatewayConfig {
                listen,
                suffix,
                caller,
                request_timeout,
                escaped_slashes,
            } = old;
            let GatewayConfig {
                listen: new_listen,
                suffix: new_suffix,
                caller: new_caller,
                request_timeout: new_request_timeout,
                escaped_slashes: new_escaped_slashes,
            } = new;
            let same_listener =
                listen == new_listen && suffix == new_suffix && caller == new_caller;
            Some(GatewayConfig {
                listen: d.restart("gateway.listen", listen, new_listen),
                suffix: d.restart("gateway.suffix", suffix, new_suffix),
                caller: d.restart("gateway.caller", caller, new_caller),
                request_timeout: d.live_if(
                    same_listener,
                    "gateway.request_timeout",
                    request_timeout,
                    new_request_timeout,
                ),
                escaped_slashes: d.live_if(
                    same_listener,
                    "gateway.escaped_slashes",
                    escaped_slashes,
                    new_escaped_slashes,
                ),
            })
        }
        (Some(old), None) => {
            d.needs_restart.push("gateway (removed)".into());
            Some(old)
        }
        (None, Some(_)) => {
            d.needs_restart.push("gateway (added)".into());
            None
        }
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    /// A listening and dialling node with every kind of listener, an export with nested
    /// tables, and an admin remote listener.
    const RUNNING: &str = r#"
[node]
name = "cloud-1"
site = "cloud"
trust_domain = "example.internal"
data_dir = "state"

[tls]
ca = "ca.pem"
cert = "node.pem"
key = "node.key"
crl = "crl.pem"

[tunnel]
listen = "127.0.0.1:7443"
allowed_sites = ["onprem"]
keepalive = "1s"
idle_timeout = "5s"
reconnect_max_backoff = "2s"

[admin]
listen = "127.0.0.1:7180"
socket = "/run/hybridge/admin.sock"

[admin.remote]
listen = "127.0.0.1:7182"

[limits]
max_header_bytes = 65536
drain_timeout = "30s"
max_connections = 10000
idle_timeout = "120s"

[[peer]]
address = "other.example:7443"
site = "other"

[[export]]
name = "ledger"
endpoints = ["127.0.0.1:9000"]

[export.health_check]
path = "/health"

[[import]]
service = "inventory"
listen = "127.0.0.1:8081"
caller = "web"
request_timeout = "10s"

[gateway]
listen = "127.0.0.1:8080"
caller = "web"
"#;

    fn parse(text: &str) -> Config {
        Config::parse(Path::new("/etc/hybridge/hybridge.toml"), text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// Edits of RUNNING (`from → to`) and the fields they should name.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);

    /// The plan for RUNNING edited by `from → to` (each must occur once).
    fn plan(edits: &[(&str, &str)]) -> ReloadPlan {
        let mut text = RUNNING.to_owned();
        for (from, to) in edits {
            assert_eq!(text.matches(from).count(), 1, "`{from}` must occur once");
            text = text.replace(from, to);
        }
        diff(&parse(RUNNING), &parse(&text))
    }

    #[test]
    fn the_same_config_changes_nothing() {
        let running = parse(RUNNING);
        let plan = diff(&running, &parse(RUNNING));
        assert_eq!(plan.applied, Vec::<String>::new());
        assert_eq!(plan.needs_restart, Vec::<String>::new());
        assert_eq!(format!("{:?}", plan.in_force), format!("{running:?}"));
    }

    #[test]
    fn every_live_field_is_applied_and_in_force() {
        let cases: &[Case] = &[
            (&[("ca = \"ca.pem\"", "ca = \"ca-2.pem\"")], &["tls.ca"]),
            (
                &[("cert = \"node.pem\"", "cert = \"node-2.pem\"")],
                &["tls.cert"],
            ),
            (
                &[("key = \"node.key\"", "key = \"node-2.key\"")],
                &["tls.key"],
            ),
            (&[("crl = \"crl.pem\"\n", "")], &["tls.crl"]),
            (
                &[(
                    "crl = \"crl.pem\"",
                    "crl = \"crl.pem\"\ncrl_stale = \"refuse\"",
                )],
                &["tls.crl_stale"],
            ),
            (
                &[(
                    "allowed_sites = [\"onprem\"]",
                    "allowed_sites = [\"onprem\", \"edge\"]",
                )],
                &["tunnel.allowed_sites"],
            ),
            (
                &[(
                    "reconnect_max_backoff = \"2s\"",
                    "reconnect_max_backoff = \"30s\"",
                )],
                &["tunnel.reconnect_max_backoff"],
            ),
            (
                &[("max_header_bytes = 65536", "max_header_bytes = 8192")],
                &["limits.max_header_bytes"],
            ),
            (
                &[("drain_timeout = \"30s\"", "drain_timeout = \"5s\"")],
                &["limits.drain_timeout"],
            ),
            (
                &[("max_connections = 10000", "max_connections = 10")],
                &["limits.max_connections"],
            ),
            (
                &[("idle_timeout = \"120s\"", "idle_timeout = \"9s\"")],
                &["limits.idle_timeout"],
            ),
            (
                &[("request_timeout = \"10s\"", "request_timeout = \"250ms\"")],
                &["import[0].request_timeout"],
            ),
            (
                &[(
                    "caller = \"web\"\nrequest_timeout",
                    "caller = \"web\"\nescaped_slashes = \"keep\"\nrequest_timeout",
                )],
                &["import[0].escaped_slashes"],
            ),
            (
                &[(
                    "listen = \"127.0.0.1:8080\"\ncaller = \"web\"",
                    "listen = \"127.0.0.1:8080\"\ncaller = \"web\"\nrequest_timeout = \"3s\"\nescaped_slashes = \"keep\"",
                )],
                &["gateway.request_timeout", "gateway.escaped_slashes"],
            ),
            (
                &[(
                    "endpoints = [\"127.0.0.1:9000\"]",
                    "endpoints = [\"127.0.0.1:9001\"]\nprotocol = \"h2c\"\nescaped_slashes = \"keep\"",
                )],
                &[
                    "export[ledger].endpoints",
                    "export[ledger].protocol",
                    "export[ledger].escaped_slashes",
                ],
            ),
            (
                &[("path = \"/health\"", "path = \"/ready\"\ninterval = \"1s\"")],
                &[
                    "export[ledger].health_check.path",
                    "export[ledger].health_check.interval",
                ],
            ),
            (
                &[("[export.health_check]\npath = \"/health\"\n", "")],
                &["export[ledger].health_check"],
            ),
            (
                &[(
                    "[export.health_check]",
                    "[export.retry]\nmax_retries = 1\n\n[export.circuit_breaker]\nmax_connections = 8\n\n[export.passive_health]\nbase_ejection = \"1s\"\n\n[export.health_check]",
                )],
                &[
                    "export[ledger].circuit_breaker.max_connections",
                    "export[ledger].retry.max_retries",
                    "export[ledger].passive_health.base_ejection",
                ],
            ),
            (
                &[("name = \"ledger\"", "name = \"journal\"")],
                &["export[ledger] (removed)", "export[journal] (added)"],
            ),
        ];
        for (edits, applied) in cases {
            let plan = plan(edits);
            assert_eq!(plan.applied, *applied, "{edits:?}");
            assert_eq!(plan.needs_restart, Vec::<String>::new(), "{edits:?}");
        }

        // The live values are the ones in force.
        let plan = plan(&[
            (
                "reconnect_max_backoff = \"2s\"",
                "reconnect_max_backoff = \"30s\"",
            ),
            ("max_header_bytes = 65536", "max_header_bytes = 8192"),
            ("request_timeout = \"10s\"", "request_timeout = \"250ms\""),
            (
                "crl = \"crl.pem\"",
                "crl = \"crl.pem\"\ncrl_stale = \"refuse\"",
            ),
        ]);
        let config = &plan.in_force;
        assert_eq!(config.tunnel.reconnect_max_backoff, Duration::from_secs(30));
        assert_eq!(config.limits.max_header_bytes, 8192);
        assert_eq!(
            config.imports[0].request_timeout,
            Some(Duration::from_millis(250))
        );
        assert_eq!(config.tls.crl_stale, crate::config::CrlStale::Refuse);
    }

    #[test]
    fn every_restart_field_is_named_and_keeps_its_running_value() {
        let cases: &[Case] = &[
            (
                &[("name = \"cloud-1\"", "name = \"cloud-2\"")],
                &["node.name"],
            ),
            (&[("site = \"cloud\"", "site = \"aws\"")], &["node.site"]),
            (
                &[(
                    "trust_domain = \"example.internal\"",
                    "trust_domain = \"corp\"",
                )],
                &["node.trust_domain"],
            ),
            (
                &[("data_dir = \"state\"", "data_dir = \"state-2\"")],
                &["node.data_dir"],
            ),
            (
                &[("listen = \"127.0.0.1:7443\"", "listen = \"127.0.0.1:7444\"")],
                &["tunnel.listen"],
            ),
            (
                &[("[tunnel]\n", "[tunnel]\nbind = \"127.0.0.1:5000\"\n")],
                &["tunnel.bind"],
            ),
            (
                &[("keepalive = \"1s\"", "keepalive = \"2s\"")],
                &["tunnel.keepalive"],
            ),
            (
                &[("idle_timeout = \"5s\"", "idle_timeout = \"10s\"")],
                &["tunnel.idle_timeout"],
            ),
            (
                &[("listen = \"127.0.0.1:7180\"", "listen = \"127.0.0.1:7190\"")],
                &["admin.listen"],
            ),
            (
                &[("[admin]\n", "[admin]\nallow_remote = true\n")],
                &["admin.allow_remote"],
            ),
            (
                &[("[admin]\n", "[admin]\nhealth_listen = \"127.0.0.1:7181\"\n")],
                &["admin.health_listen"],
            ),
            (
                &[("/run/hybridge/admin.sock", "/run/hybridge/other.sock")],
                &["admin.socket"],
            ),
            (
                &[("listen = \"127.0.0.1:7182\"", "listen = \"127.0.0.1:7183\"")],
                &["admin.remote.listen"],
            ),
            (
                &[("[admin.remote]\nlisten = \"127.0.0.1:7182\"\n", "")],
                &["admin.remote"],
            ),
            (
                &[(
                    "address = \"other.example:7443\"",
                    "address = \"other.example:7444\"",
                )],
                &["peer[0].address"],
            ),
            (
                &[("site = \"other\"", "site = \"edge\"")],
                &["peer[0].site"],
            ),
            (
                &[(
                    "site = \"other\"",
                    "site = \"other\"\nname = \"o-1\"\nconnections = 4",
                )],
                &["peer[0].name", "peer[0].connections"],
            ),
            (
                &[(
                    "[[export]]",
                    "[[peer]]\naddress = \"third.example:7443\"\nsite = \"third\"\n\n[[export]]",
                )],
                &["peer[1] (added)"],
            ),
            (
                &[(
                    "[[peer]]\naddress = \"other.example:7443\"\nsite = \"other\"\n",
                    "",
                )],
                &["peer[0] (removed)"],
            ),
            (
                &[("listen = \"127.0.0.1:8081\"", "listen = \"127.0.0.1:8082\"")],
                &["import[0].listen"],
            ),
            (
                &[("service = \"inventory\"", "service = \"stock\"")],
                &["import[0].service"],
            ),
            (
                &[(
                    "caller = \"web\"\nrequest_timeout",
                    "caller = \"shop\"\nrequest_timeout",
                )],
                &["import[0].caller"],
            ),
            (
                &[(
                    "[gateway]",
                    "[[import]]\nservice = \"billing\"\nlisten = \"127.0.0.1:8083\"\ncaller = \"web\"\n\n[gateway]",
                )],
                &["import[1] (added)"],
            ),
            (
                &[(
                    "[[import]]\nservice = \"inventory\"\nlisten = \"127.0.0.1:8081\"\ncaller = \"web\"\nrequest_timeout = \"10s\"\n",
                    "",
                )],
                &["import[0] (removed)"],
            ),
            (
                &[("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:8090\"")],
                &["gateway.listen"],
            ),
            (
                &[(
                    "listen = \"127.0.0.1:8080\"",
                    "listen = \"127.0.0.1:8080\"\nsuffix = \"corp\"",
                )],
                &["gateway.suffix"],
            ),
            (
                &[(
                    "listen = \"127.0.0.1:8080\"\ncaller = \"web\"",
                    "listen = \"127.0.0.1:8080\"\nmtls = true",
                )],
                &["gateway.caller"],
            ),
            (
                &[(
                    "[gateway]\nlisten = \"127.0.0.1:8080\"\ncaller = \"web\"\n",
                    "",
                )],
                &["gateway (removed)"],
            ),
        ];
        let running = parse(RUNNING);
        for (edits, restart) in cases {
            let plan = plan(edits);
            assert_eq!(plan.needs_restart, *restart, "{edits:?}");
            assert_eq!(plan.applied, Vec::<String>::new(), "{edits:?}");
            // Nothing needing a restart reaches the configuration in force.
            assert_eq!(
                format!("{:?}", plan.in_force),
                format!("{running:?}"),
                "{edits:?}"
            );
        }
    }

    #[test]
    fn a_gateway_added_waits_for_a_restart() {
        let without = RUNNING.replace(
            "[gateway]\nlisten = \"127.0.0.1:8080\"\ncaller = \"web\"\n",
            "",
        );
        let plan = diff(&parse(&without), &parse(RUNNING));
        assert_eq!(plan.needs_restart, ["gateway (added)"]);
        assert!(plan.in_force.gateway.is_none());
    }

    #[test]
    fn a_mixed_change_applies_the_live_part_and_names_the_rest() {
        let plan = plan(&[
            ("keepalive = \"1s\"", "keepalive = \"2s\""),
            ("request_timeout = \"10s\"", "request_timeout = \"1s\""),
            ("max_connections = 10000", "max_connections = 50"),
        ]);
        assert_eq!(
            plan.applied,
            ["limits.max_connections", "import[0].request_timeout"]
        );
        assert_eq!(plan.needs_restart, ["tunnel.keepalive"]);
        assert_eq!(plan.in_force.tunnel.keepalive, Duration::from_secs(1));
        assert_eq!(plan.in_force.limits.max_connections, 50);
        assert_eq!(
            plan.in_force.imports[0].request_timeout,
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn a_replaced_listener_holds_back_its_settings() {
        // Another service on the same position is another listener: its timeout waits too.
        let plan = plan(&[
            ("service = \"inventory\"", "service = \"stock\""),
            ("request_timeout = \"10s\"", "request_timeout = \"1s\""),
        ]);
        assert_eq!(
            plan.needs_restart,
            ["import[0].service", "import[0].request_timeout"]
        );
        assert_eq!(plan.applied, Vec::<String>::new());
        assert_eq!(plan.in_force.imports[0].service, "inventory");
        assert_eq!(
            plan.in_force.imports[0].request_timeout,
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn a_node_that_keeps_listening_keeps_its_sites() {
        // A dial-only config (no listen, no sites) over a listening node: the listener stays
        // until a restart, and so do the sites it admits.
        let plan = plan(&[
            ("listen = \"127.0.0.1:7443\"\n", ""),
            ("allowed_sites = [\"onprem\"]\n", ""),
        ]);
        assert_eq!(
            plan.needs_restart,
            ["tunnel.listen", "tunnel.allowed_sites"]
        );
        assert_eq!(plan.in_force.tunnel.allowed_sites, ["onprem"]);
    }

    #[test]
    fn the_new_source_is_the_one_in_force() {
        let running = parse(RUNNING);
        let new = Config::parse(Path::new("/etc/hybridge/other.toml"), RUNNING).unwrap();
        let plan = diff(&running, &new);
        assert_eq!(plan.in_force.source, Path::new("/etc/hybridge/other.toml"));
        assert_eq!(plan.applied, Vec::<String>::new());
    }
}
