//! A running node: composes configuration, TLS material, the ACL store, upstreams, the
//! tunnel endpoint, dialers, import listeners and the admin API, and owns their shutdown.
//!
//! This is the one place where the pieces meet; it holds no protocol or policy logic itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use hybridge_ca::spiffe::SpiffeId;
use hybridge_ca::tls::{PeerExpectation, TlsMaterial};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::acl::AclService;
use crate::admin::ListenerKind;
use crate::admin::unix::{AdminSocket, SocketFile};
use crate::config::{CallerIdentity, Config};
use crate::http::export::{self, ExportContext};
use crate::http::import::{self, ImportContext, ListenerSettings, ListenerSpec, ListenerTarget};
use crate::http::path::EscapedSlashes;
use crate::listener::ListenerLimits;
use crate::metrics::{Metrics, Side};
use crate::trust::{Trust, TrustUpdates};
use crate::tunnel::connection::TunnelConnection;
use crate::tunnel::control::{ControlMessage, PeerAnnouncement};
use crate::tunnel::dialer::{CarrierChoice, DialEndpoints, DialSource, Slot};
use crate::tunnel::handshake::{RejectionSlot, observed_server};
use crate::tunnel::members::SpawnSlot;
use crate::tunnel::outcome::{HandshakeFailure, QuicHandshakeError};
use crate::tunnel::peers::{Direction, PeerSet};
use crate::tunnel::quic::{self, TransportTuning};
use crate::tunnel::serving::ServingPolicy;
use crate::tunnel::session::{self, SessionContext};
use crate::tunnel::tcp;
use crate::tunnel::udp::Handoff;
use crate::upstream::Upstream;
use crate::workers::Workers;

mod readiness;
mod reload;

pub use readiness::Readiness;
pub use reload::ReloadReport;
use reload::{ReloadRequest, Reloadable};

/// Where a started node listens.
#[derive(Clone, Debug)]
pub struct NodeAddresses {
    pub tunnel: Option<SocketAddr>,
    /// The TCP listener for TLS/TCP tunnels, if this node accepts them.
    pub tunnel_tcp: Option<SocketAddr>,
    /// The read-only admin listener (`admin.listen`).
    pub admin: SocketAddr,
    /// The admin socket (`admin.socket`): the whole API for local administrators.
    pub admin_socket: PathBuf,
    /// The remote mTLS admin listener (`[admin.remote]`), if configured.
    pub admin_remote: Option<SocketAddr>,
    /// The health-only admin listener (`admin.health_listen`), if configured.
    pub health: Option<SocketAddr>,
    /// (service, address) of every import listener, in config order.
    pub imports: Vec<(String, SocketAddr)>,
    pub gateway: Option<SocketAddr>,
}

/// State shared by the node's tasks and the admin API.
pub struct NodeState {
    pub config: ArcSwap<Config>,
    pub identity: SpiffeId,
    pub peers: Arc<PeerSet>,
    /// Which peer sites may serve which services.
    pub serving: Arc<ServingPolicy>,
    /// The certificate checks every live tunnel and mTLS connection is held to.
    pub trust: TrustUpdates,
    pub acl: Arc<AclService>,
    pub export: Arc<ExportContext>,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    pub addresses: NodeAddresses,
    /// Worker threads running the data plane (1: all on the main runtime).
    pub workers: usize,
    /// Where `POST /v1/reload` hands its reload to the node (see [`NodeState::reload`]).
    reload_requests: tokio::sync::mpsc::Sender<ReloadRequest>,
    draining: AtomicBool,
    /// What each dialer slot is doing, for status.
    pub dial_states: Arc<crate::tunnel::dialer::DialStates>,
}

impl NodeState {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// What this node tells its peers about itself: its exports and its policy.
    pub fn announcement(&self) -> PeerAnnouncement {
        PeerAnnouncement {
            exports: self.config.load().export_names(),
            policy_version: self.acl.version(),
            policy_digest: self.acl.digest(),
            members: self.config.load().tunnel.announce.clone(),
        }
    }

    /// Peers whose announced policy digest differs from this node's (peers that send none
    /// are not counted).
    pub fn peers_disagreeing(&self) -> usize {
        peers_disagreeing(&self.peers, &self.acl)
    }

    /// Ready by the node's role: see [`NodeState::readiness`].
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ready()
    }

    /// Reloads the node's configuration file on behalf of `by` (who asked, for the log) and
    /// waits for the outcome: the same reload as SIGHUP, run by the node to completion even
    /// if the caller goes away. On `Err` the running configuration stays in force.
    pub async fn reload(&self, by: String) -> Result<ReloadReport, ReloadFailed> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.reload_requests
            .send(ReloadRequest { by, reply })
            .await
            .map_err(|_| ReloadFailed::Stopping)?;
        outcome
            .await
            .map_err(|_| ReloadFailed::Stopping)?
            .map_err(ReloadFailed::Refused)
    }
}

/// Why a reload asked for over the admin API did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadFailed {
    /// The new configuration or TLS material is invalid; the reason names the file, line and
    /// field, or the file and step.
    #[error("{0}")]
    Refused(String),
    /// The node is stopping and reloads no more.
    #[error("the node is stopping")]
    Stopping,
}

/// A running node.
pub struct Node {
    pub state: Arc<NodeState>,
    /// What a reload swaps: TLS configs, listener settings, dial settings.
    live: Arc<Reloadable>,
    /// Keeps the worker threads up for as long as the node runs on them.
    workers: Arc<Workers>,
    /// Listeners, dialers, the accept loop and the admin server.
    background: TaskTracker,
    /// Request handlers and body pumps, both directions.
    requests: TaskTracker,
    stop_listeners: CancellationToken,
    stop_tunnels: CancellationToken,
    stop_rest: CancellationToken,
    /// The admin socket's file, removed when the node is gone.
    admin_socket: SocketFile,
}

/// Loads and checks the node's TLS material against its configured identity, with the
/// configured handling of a stale CRL.
pub fn load_tls(config: &Config) -> anyhow::Result<TlsMaterial> {
    let tls = &config.tls;
    let mut material = TlsMaterial::load(&tls.ca, &tls.cert, &tls.key, tls.crl.as_deref())?;
    material.crl_stale = tls.crl_stale;
    let expected = SpiffeId::Node {
        trust_domain: config.node.trust_domain.clone(),
        site: config.node.site.clone(),
        name: config.node.name.clone(),
    };
    if material.own_id != expected {
        anyhow::bail!(
            "node certificate {} is for {} but {} configures this node as {}",
            tls.cert.display(),
            material.own_id,
            config.source.display(),
            expected
        );
    }
    Ok(material)
}

/// The remote admin listener's TLS: TLS 1.3, administrator certificates of the node's trust
/// domain only, the node's CA bundle and CRL.
fn admin_remote_tls(
    material: &TlsMaterial,
    config: &Config,
) -> anyhow::Result<rustls::ServerConfig> {
    Ok(hybridge_ca::tls::server_config(
        material,
        PeerExpectation::AnyAdmin {
            trust_domain: config.node.trust_domain.clone(),
        },
        &[b"h2", b"http/1.1"],
        true,
    )?)
}

/// Names besides its address a client may put in `Host` to reach the remote admin listener:
/// the DNS and IP SANs of the node certificate (what an administrator dials).
fn node_certificate_names(material: &TlsMaterial) -> Vec<String> {
    let Some(summary) = material
        .chain
        .first()
        .and_then(|leaf| hybridge_ca::inspect::summarize(leaf.as_ref()).ok())
    else {
        return Vec::new();
    };
    let ips = summary.ips.iter().map(|ip| {
        if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.clone()
        }
    });
    summary
        .dns_names
        .iter()
        .map(|name| name.to_ascii_lowercase())
        .chain(ips)
        .collect()
}

/// The TLS config of `mtls` import and gateway listeners: a service certificate from the CA
/// is required, and it names the caller.
fn import_tls_config(
    material: &TlsMaterial,
    trust_domain: &str,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let expect = PeerExpectation::AnyService {
        trust_domain: trust_domain.to_owned(),
    };
    Ok(Arc::new(hybridge_ca::tls::server_config(
        material,
        expect,
        &[b"h2", b"http/1.1"],
        false,
    )?))
}

/// Creates the data dir (and missing parents) 0700 whatever the umask: it holds the policy
/// database. An existing dir keeps its mode (systemd creates it 0750 for the service group).
fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// Whether each worker can have a tunnel endpoint of its own: a listen-only node's workers
/// share the listen port (`SO_REUSEPORT`); a dial-only node's workers dial from ports of
/// their own. A node that listens and dials, or dials from a fixed port, keeps one endpoint
/// (on the first worker, numbered 1 in `/v1/status`) that the other workers' requests use.
///
/// The kernel picks a worker's socket of a shared port by the peer's address; the sockets
/// then deal new connections to the workers in turn, and hand a datagram to the worker its
/// connection ID names, so a peer whose NAT rebinds migrates (`tunnel::udp::Handoff`).
fn tunnel_per_worker(config: &Config, workers: &Workers) -> bool {
    workers.count() > 1
        && match config.tunnel.listen {
            Some(_) => config.peers.is_empty(),
            None => config.tunnel.bind.port() == 0,
        }
}

/// The settings of each import listener, then of the gateway: the order of `listener_specs`.
fn listener_settings(config: &Config) -> Vec<ListenerSettings> {
    let max_header_bytes = config.limits.max_header_bytes;
    config
        .imports
        .iter()
        .map(|i| (i.request_timeout, i.escaped_slashes))
        .chain(
            config
                .gateway
                .iter()
                .map(|g| (g.request_timeout, g.escaped_slashes)),
        )
        .map(|(request_timeout, escaped_slashes)| ListenerSettings {
            request_timeout,
            max_header_bytes,
            escaped_slashes,
        })
        .collect()
}

/// The dialing config for `peer`: its site's nodes, or exactly the named one.
fn peer_client_config(
    material: &TlsMaterial,
    trust_domain: &str,
    peer: &crate::config::PeerConfig,
    tuning: &TransportTuning,
) -> anyhow::Result<quic::DialConfig> {
    let expect = match &peer.name {
        Some(name) => PeerExpectation::Exact(SpiffeId::Node {
            trust_domain: trust_domain.to_owned(),
            site: peer.site.clone(),
            name: name.clone(),
        }),
        None => PeerExpectation::NodeOfSites {
            trust_domain: trust_domain.to_owned(),
            sites: vec![peer.site.clone()],
        },
    };
    quic::DialConfig::new(material, expect, tuning)
}

/// Each export's `escaped_slashes`, as the export side looks it up per request.
fn escaped_slashes_by_export(config: &Config) -> HashMap<String, EscapedSlashes> {
    config
        .exports
        .iter()
        .map(|e| (e.name.clone(), e.escaped_slashes))
        .collect()
}

/// Binds `addr` once per worker, each socket registered with its worker's runtime. Several
/// workers share the port with `SO_REUSEPORT` (the kernel spreads connections over them);
/// a plain bind first makes a port held by anything else, another hybridge included, fail
/// as it would with one worker, and resolves port 0.
fn bind_tcp(
    workers: &Workers,
    addr: SocketAddr,
) -> std::io::Result<(SocketAddr, Vec<TcpListener>)> {
    let share = workers.count() > 1;
    let addr = if share {
        std::net::TcpListener::bind(addr)?.local_addr()?
    } else {
        addr
    };
    let mut listeners = Vec::with_capacity(workers.count());
    for worker in 0..workers.count() {
        let listener = workers.enter(worker, || {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            if share {
                socket.set_reuseport(true)?;
            }
            socket.bind(addr)?;
            socket.listen(1024)
        })?;
        listeners.push(listener);
    }
    let local = listeners[0].local_addr()?;
    Ok((local, listeners))
}

impl Node {
    /// Starts every part of the node on the caller's runtime; returns once all listeners
    /// accept connections.
    pub async fn start(config: Config) -> anyhow::Result<Node> {
        Self::start_on(config, Arc::new(Workers::inline())).await
    }

    /// Starts the node with its data plane spread over `workers` (listeners, tunnels and
    /// request handling on each; admin API and health checks on the caller's runtime).
    pub async fn start_on(config: Config, workers: Arc<Workers>) -> anyhow::Result<Node> {
        let material = load_tls(&config)?;
        create_private_dir(&config.node.data_dir)
            .with_context(|| format!("creating data dir {}", config.node.data_dir.display()))?;
        let acl = AclService::open(&config.database_path()).with_context(|| {
            format!("opening policy store {}", config.database_path().display())
        })?;
        let metrics = Arc::new(Metrics::default());
        count_configured_services(&metrics, &acl, &config);
        let stop_rest = CancellationToken::new();

        let mut services = HashMap::new();
        for export in &config.exports {
            let upstream = Upstream::start(&export.name, &export.upstream, stop_rest.child_token())
                .await
                .with_context(|| {
                    format!("{}: export `{}`", config.source.display(), export.name)
                })?;
            services.insert(export.name.clone(), upstream);
        }
        let export_ctx = Arc::new(ExportContext {
            acl: acl.clone(),
            services: ArcSwap::from_pointee(services),
            escaped_slashes: ArcSwap::from_pointee(escaped_slashes_by_export(&config)),
            metrics: metrics.clone(),
        });

        let tuning = TransportTuning {
            keepalive: config.tunnel.keepalive,
            idle_timeout: config.tunnel.idle_timeout,
            congestion: config.tunnel.congestion,
            ..TransportTuning::default()
        };
        let server_config = match config.tunnel.listen {
            Some(_) => Some(quic::server_config(
                &material,
                tunnel_expectation(&config),
                &tuning,
            )?),
            None => None,
        };
        let per_worker = tunnel_per_worker(&config, &workers);
        let share_port = per_worker && config.tunnel.listen.is_some();
        let mut bind = match config.tunnel.listen {
            // TLS/TCP tunnels take the same port number: an ephemeral one must be free for both.
            Some(listen)
                if listen.port() == 0
                    && config.tunnel.listen_tcp.is_none()
                    && config.tunnel.tcp_listen_address().is_some() =>
            {
                port_free_for_udp_and_tcp(listen).with_context(|| {
                    format!(
                        "{}: tunnel: finding a port free for UDP and TCP on {listen}",
                        config.source.display()
                    )
                })?
            }
            Some(listen) => listen,
            None => config.tunnel.bind,
        };
        if share_port {
            // As for TCP: a plain bind fails on a port anything else holds, and resolves 0.
            bind = std::net::UdpSocket::bind(bind)
                .and_then(|probe| probe.local_addr())
                .with_context(|| {
                    format!(
                        "{}: tunnel: binding the tunnel UDP socket {bind}",
                        config.source.display()
                    )
                })?;
        }
        let sockets = (0..if per_worker { workers.count() } else { 1 })
            .map(|_| quic::bind_socket(bind, share_port))
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| format!("{}: tunnel", config.source.display()))?;
        let handoff = share_port.then(|| Handoff::new(sockets.len()));
        let mut endpoints = Vec::new();
        for (worker, socket) in sockets.into_iter().enumerate() {
            let endpoint = workers
                .enter(worker, || {
                    quic::endpoint(
                        socket,
                        server_config.clone(),
                        material.key.secret_der(),
                        handoff.as_ref().map(|h| (h, worker)),
                    )
                })
                .with_context(|| format!("{}: tunnel", config.source.display()))?;
            endpoints.push(endpoint);
        }
        let tunnel_addr = match config.tunnel.listen {
            Some(_) => Some(
                endpoints[0]
                    .local_addr()
                    .context("reading the tunnel address")?,
            ),
            None => None,
        };

        // TLS/TCP tunnels: on the UDP listener's port unless configured otherwise.
        let tcp_tunnel = match config.tunnel.tcp_listen_address() {
            None => None,
            Some(addr) => {
                let addr = match (config.tunnel.listen_tcp, tunnel_addr) {
                    (None, Some(udp)) => udp,
                    _ => addr,
                };
                let (local, listeners) = bind_tcp(&workers, addr).with_context(|| {
                    format!(
                        "{}: tunnel: binding the tunnel TCP listener {addr}",
                        config.source.display()
                    )
                })?;
                let tls = Arc::new(ArcSwap::new(tcp::server_config(
                    &material,
                    tunnel_expectation(&config),
                )?));
                let limits = metrics.listener(ListenerLimits::new(
                    format!("tunnel-tcp@{local}"),
                    config.limits.max_connections,
                    config.limits.idle_timeout,
                ));
                Some((local, listeners, tls, limits))
            }
        };
        let tunnel_tcp_addr = tcp_tunnel.as_ref().map(|(local, ..)| *local);

        let peers = Arc::new(PeerSet::default());
        let serving = Arc::new(ServingPolicy::new(acl.clone(), &config));
        let trust = TrustUpdates::new(Trust::new(
            &material,
            &config.node.trust_domain,
            &config.tunnel.allowed_sites,
            config.tls.crl.as_deref(),
        )?);
        crate::trust::warn_stale_crls(&trust.current());
        let requests = TaskTracker::new();
        let background = TaskTracker::new();
        let stop_listeners = CancellationToken::new();
        let stop_tunnels = CancellationToken::new();

        // Import listeners are bound before anything is spawned so a port clash fails start.
        let import_ctx = Arc::new(ImportContext {
            peers: peers.clone(),
            serving: serving.clone(),
            trust: trust.subscribe(),
            acl: acl.clone(),
            site: Arc::from(config.node.site.as_str()),
            metrics: metrics.clone(),
            tasks: requests.clone(),
        });
        let import_tls = || import_tls_config(&material, &config.node.trust_domain);
        let mut listeners = Vec::new();
        let mut import_addrs = Vec::new();
        let mut settings = listener_settings(&config).into_iter();
        let mut next_settings = || {
            settings
                .next()
                .map(arc_swap::ArcSwap::from_pointee)
                .context("a listener without settings")
        };
        for import in &config.imports {
            let (local, listener) = bind_tcp(&workers, import.listen).with_context(|| {
                format!(
                    "{}: import `{}`: binding {}",
                    config.source.display(),
                    import.service,
                    import.listen
                )
            })?;
            import_addrs.push((import.service.clone(), local));
            let tls = if import.caller == CallerIdentity::Mtls {
                Some(import_tls()?)
            } else {
                None
            };
            let spec = ListenerSpec {
                target: ListenerTarget::Service(import.service.clone()),
                caller: import.caller.clone(),
                tls: arc_swap::ArcSwapOption::new(tls),
                settings: next_settings()?,
                limits: metrics.listener(ListenerLimits::new(
                    format!("import:{}@{local}", import.service),
                    config.limits.max_connections,
                    config.limits.idle_timeout,
                )),
            };
            listeners.push((listener, spec));
        }
        let mut gateway_addr = None;
        if let Some(gateway) = &config.gateway {
            let (local, listener) = bind_tcp(&workers, gateway.listen).with_context(|| {
                format!(
                    "{}: gateway: binding {}",
                    config.source.display(),
                    gateway.listen
                )
            })?;
            gateway_addr = Some(local);
            let tls = if gateway.caller == CallerIdentity::Mtls {
                Some(import_tls()?)
            } else {
                None
            };
            let spec = ListenerSpec {
                target: ListenerTarget::Gateway {
                    suffix: gateway.suffix.clone(),
                },
                caller: gateway.caller.clone(),
                tls: arc_swap::ArcSwapOption::new(tls),
                settings: next_settings()?,
                limits: metrics.listener(ListenerLimits::new(
                    format!("gateway@{local}"),
                    config.limits.max_connections,
                    config.limits.idle_timeout,
                )),
            };
            listeners.push((listener, spec));
        }
        let admin_listener = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| {
                format!(
                    "{}: admin: binding {}",
                    config.source.display(),
                    config.admin.listen
                )
            })?;
        let admin_addr = admin_listener.local_addr()?;
        let health_listener = match config.admin.health_listen {
            None => None,
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "{}: admin: binding health_listen {addr}",
                    config.source.display()
                )
            })?),
        };
        let health_addr = health_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let AdminSocket {
            listener: socket_listener,
            file: admin_socket,
        } = AdminSocket::bind(&config.admin.socket)
            .with_context(|| format!("{}: admin", config.source.display()))?;
        let remote = match &config.admin.remote {
            None => None,
            Some(remote) => {
                let listener = TcpListener::bind(remote.listen).await.with_context(|| {
                    format!(
                        "{}: admin.remote: binding {}",
                        config.source.display(),
                        remote.listen
                    )
                })?;
                let tls = Arc::new(ArcSwap::from_pointee(admin_remote_tls(&material, &config)?));
                Some((listener, tls))
            }
        };
        let remote_addr = remote
            .as_ref()
            .map(|(listener, _)| listener.local_addr())
            .transpose()?;

        let identity = material.own_id.clone();
        // Few callers reload at once; one more waits for room.
        let (reload_requests, reload_queue) = tokio::sync::mpsc::channel(4);
        let state = Arc::new(NodeState {
            config: ArcSwap::from_pointee(config.clone()),
            identity: identity.clone(),
            peers: peers.clone(),
            serving: serving.clone(),
            trust,
            acl: acl.clone(),
            export: export_ctx.clone(),
            metrics: metrics.clone(),
            started: Instant::now(),
            addresses: NodeAddresses {
                tunnel: tunnel_addr,
                tunnel_tcp: tunnel_tcp_addr,
                admin: admin_addr,
                admin_socket: admin_socket.path().to_path_buf(),
                admin_remote: remote_addr,
                health: health_addr,
                imports: import_addrs,
                gateway: gateway_addr,
            },
            workers: workers.count(),
            dial_states: Arc::default(),
            reload_requests,
            draining: AtomicBool::new(false),
        });

        // `acl apply` warns about destinations that neither this node nor a connected peer
        // exports (allowed — the service may not exist yet — but usually a typo).
        let known_state = Arc::downgrade(&state);
        state.acl.set_known_destinations(Arc::new(move || {
            let Some(state) = known_state.upgrade() else {
                return Vec::new();
            };
            let mut names = state.config.load().export_names();
            for link in state.peers.links().iter() {
                names.extend(link.exports().iter().cloned());
            }
            names
        }));

        let hello_state = Arc::downgrade(&state);
        let hello_id = identity.to_string();
        let session_ctx = Arc::new(SessionContext {
            peers: peers.clone(),
            serving: serving.clone(),
            trust: state.trust.subscribe(),
            metrics: metrics.clone(),
            tasks: requests.clone(),
            hello: Box::new(move || {
                let announcement = hello_state
                    .upgrade()
                    .map(|s| s.announcement())
                    .unwrap_or_default();
                ControlMessage::hello(&hello_id, announcement)
            }),
            on_stream: Box::new(move |send, recv, peer| {
                Box::pin(export::serve_stream(send, recv, peer, export_ctx.clone()))
            }),
            keepalive: config.tunnel.keepalive,
            dial_states: state.dial_states.clone(),
        });

        let tunnel_server = server_config
            .clone()
            .map(|config| Arc::new(ArcSwap::from_pointee(config)));
        if let (Some(_), Some(tunnel_server)) = (tunnel_addr, &tunnel_server) {
            for (worker, endpoint) in endpoints.iter().enumerate() {
                workers.spawn_on(
                    worker,
                    &background,
                    accept_loop(
                        endpoint.clone(),
                        Arc::clone(tunnel_server),
                        session_ctx.clone(),
                        metrics.clone(),
                        stop_tunnels.clone(),
                        background.clone(),
                    ),
                );
            }
        }
        let tunnel_tcp_server = match tcp_tunnel {
            None => None,
            Some((_, listeners, tls, limits)) => {
                for (worker, listener) in listeners.into_iter().enumerate() {
                    workers.spawn_on(
                        worker,
                        &background,
                        tcp_accept_loop(
                            listener,
                            tls.clone(),
                            limits.clone(),
                            tuning.clone(),
                            session_ctx.clone(),
                            stop_tunnels.clone(),
                            background.clone(),
                        ),
                    );
                }
                Some(tls)
            }
        };
        let carrier_choice = CarrierChoice {
            transport: config.tunnel.transport,
            tcp_fallback_after: config.tunnel.tcp_fallback_after,
            quic_reprobe_interval: config.tunnel.quic_reprobe_interval,
        };
        // A dial-only node on an ephemeral port dials each QUIC connection from a port of its
        // own (see `tunnel::dialer`); otherwise dialers share the node's endpoints.
        let dial_endpoints = Arc::new(DialEndpoints::default());
        let fresh_ports = config.tunnel.listen.is_none() && config.tunnel.bind.port() == 0;
        let reset_key_seed: Arc<[u8]> = Arc::from(material.key.secret_der());
        let mut peer_clients = Vec::new();
        let (dial_backoff, max_backoff) =
            tokio::sync::watch::channel(config.tunnel.reconnect_max_backoff);
        for peer in &config.peers {
            let client = Arc::new(ArcSwap::from_pointee(peer_client_config(
                &material,
                &config.node.trust_domain,
                peer,
                &tuning,
            )?));
            peer_clients.push((peer.address.clone(), client.clone()));
            // The configured number of connections, spread over the workers' endpoints,
            // and at least one per endpoint so every worker has a tunnel of its own.
            let next_worker = std::sync::atomic::AtomicUsize::new(0);
            let spawn_slot: SpawnSlot = Arc::new({
                let (workers, background, endpoints) =
                    (workers.clone(), background.clone(), endpoints.clone());
                let (dial_endpoints, reset_key_seed) =
                    (dial_endpoints.clone(), reset_key_seed.clone());
                let (max_backoff, session_ctx, stop_tunnels) = (
                    max_backoff.clone(),
                    session_ctx.clone(),
                    stop_tunnels.clone(),
                );
                let bind = config.tunnel.bind;
                move |slot| {
                    let worker = next_worker.fetch_add(1, Ordering::Relaxed) % endpoints.len();
                    let source = if fresh_ports {
                        DialSource::Fresh {
                            bind,
                            reset_key_seed: reset_key_seed.clone(),
                            registry: dial_endpoints.clone(),
                        }
                    } else {
                        DialSource::Shared(endpoints[worker].clone())
                    };
                    workers.spawn_on(
                        worker,
                        &background,
                        crate::tunnel::dialer::run(
                            source,
                            slot,
                            client.clone(),
                            carrier_choice,
                            max_backoff.clone(),
                            session_ctx.clone(),
                            stop_tunnels.clone(),
                        ),
                    );
                }
            });
            for index in 0..usize::from(peer.connections).max(endpoints.len()) {
                spawn_slot(Slot::configured(peer, index));
            }
            if !peer.member_networks.is_empty() {
                background.spawn(crate::tunnel::members::follow(
                    peer.clone(),
                    state.peers.clone(),
                    spawn_slot,
                    stop_tunnels.clone(),
                ));
            }
        }
        let mut listener_specs = Vec::new();
        for (per_worker, spec) in listeners {
            let spec = Arc::new(spec);
            listener_specs.push(spec.clone());
            for (worker, listener) in per_worker.into_iter().enumerate() {
                workers.spawn_on(
                    worker,
                    &background,
                    import::serve(
                        listener,
                        spec.clone(),
                        import_ctx.clone(),
                        stop_listeners.clone(),
                    ),
                );
            }
        }
        background.spawn(announce_policy_changes(
            Arc::downgrade(&state),
            acl.subscribe_changes(),
            stop_rest.clone(),
        ));
        background.spawn(crate::admin::serve_tcp(
            admin_listener,
            state.clone(),
            ListenerKind::ReadOnly,
            stop_rest.clone(),
        ));
        if let Some(listener) = health_listener {
            background.spawn(crate::admin::serve_tcp(
                listener,
                state.clone(),
                ListenerKind::HealthOnly,
                stop_rest.clone(),
            ));
        }
        background.spawn(crate::admin::serve_socket(
            socket_listener,
            state.clone(),
            stop_rest.clone(),
        ));
        let admin_remote_tls = match remote {
            None => None,
            Some((listener, tls)) => {
                background.spawn(crate::admin::serve_remote(
                    listener,
                    tls.clone(),
                    node_certificate_names(&material),
                    state.clone(),
                    stop_rest.clone(),
                ));
                Some(tls)
            }
        };
        background.spawn(crate::trust::watch_crl_freshness(
            state.trust.subscribe(),
            stop_rest.clone(),
        ));
        info!(node = %identity, tunnel = ?tunnel_addr, admin = %admin_addr, admin_socket = %state.addresses.admin_socket.display(), admin_remote = ?remote_addr, workers = workers.count(), tunnel_endpoints = endpoints.len(), "node started");
        let live = Arc::new(Reloadable {
            state: state.clone(),
            endpoints,
            dial_endpoints,
            peer_clients,
            tunnel_server,
            tunnel_tcp_server,
            admin_remote_tls,
            listener_specs,
            dial_backoff,
            tuning,
            stop_rest: stop_rest.clone(),
            one_at_a_time: tokio::sync::Mutex::new(()),
        });
        background.spawn(reload::serve_requests(
            reload_queue,
            live.clone(),
            stop_rest.clone(),
        ));
        Ok(Node {
            state,
            live,
            workers,
            background,
            requests,
            stop_listeners,
            stop_tunnels,
            stop_rest,
            admin_socket,
        })
    }

    pub fn addresses(&self) -> &NodeAddresses {
        &self.state.addresses
    }

    /// Moves a dial-only node's tunnel endpoints to fresh local ports, migrating their
    /// connections: what a NAT rebinding looks like to the peer, and what a host whose
    /// address changed needs. A listening node keeps its port; this refuses.
    pub fn rebind_tunnels(&self) -> anyhow::Result<()> {
        let config = self.state.config.load();
        anyhow::ensure!(
            config.tunnel.listen.is_none(),
            "a listening node keeps its tunnel port"
        );
        let bind = SocketAddr::new(config.tunnel.bind.ip(), 0);
        for (worker, endpoint) in self.live.endpoints.iter().enumerate() {
            let socket = quic::bind_socket(bind, false)?;
            let socket = self
                .workers
                .enter(worker, || crate::tunnel::udp::TunnelSocket::new(socket))?;
            endpoint.rebind_abstract(Arc::new(socket))?;
        }
        for (runtime, endpoint) in self.live.dial_endpoints.all() {
            let socket = quic::bind_socket(bind, false)?;
            let socket = {
                let _runtime = runtime.enter();
                crate::tunnel::udp::TunnelSocket::new(socket)?
            };
            endpoint.rebind_abstract(Arc::new(socket))?;
        }
        Ok(())
    }

    /// Waits (at most `limit`) until a connected peer that may serve `service` exports it.
    pub async fn wait_for_route(&self, service: &str, limit: Duration) -> bool {
        let peers = &self.state.peers;
        let serving = &self.state.serving;
        tokio::time::timeout(
            limit,
            peers.wait_until(|links| {
                links.iter().any(|l| {
                    !l.is_draining()
                        && l.exports().contains(service)
                        && serving.permits(service, l.site())
                })
            }),
        )
        .await
        .is_ok()
    }

    /// Re-reads the config file the node runs from, with its certificates, CA bundle and CRL,
    /// and applies what a running node can (`config::reload`) without dropping tunnels or
    /// in-flight requests; what needs a restart keeps its running value and is named in the
    /// report. Invalid input refuses the whole reload and changes nothing. `by` names who
    /// asked, for the log line every reload writes. SIGHUP and `POST /v1/reload` both end
    /// here.
    pub async fn reload(&self, by: &str) -> anyhow::Result<ReloadReport> {
        self.live.reload(by).await
    }

    /// Drains and stops: tell peers we are going away and wait for them to acknowledge,
    /// stop accepting callers, finish in-flight requests (up to the drain timeout), then
    /// close tunnels.
    pub async fn shutdown(self) {
        let state = &self.state;
        state.draining.store(true, Ordering::Release);
        let deadline = Instant::now() + state.config.load().limits.drain_timeout;
        // Every link is told, including one whose handshake finishes during the drain (a
        // dialer's second connection): untold, it would never acknowledge, and the drain
        // would wait out its deadline.
        let mut told = std::collections::HashSet::new();
        let acknowledged = tokio::time::timeout_at(
            deadline.into(),
            state.peers.wait_until(|links| {
                for link in links {
                    if told.insert(link.id()) {
                        link.send_control(ControlMessage::GoAway {
                            reason: "node shutting down".into(),
                        });
                    }
                }
                links.iter().all(|l| l.drain_acknowledged())
            }),
        )
        .await;
        if acknowledged.is_err() {
            warn!("not every peer acknowledged the drain before the deadline");
        }
        self.stop_listeners.cancel();
        self.requests.close();
        if tokio::time::timeout_at(deadline.into(), self.requests.wait())
            .await
            .is_err()
        {
            warn!("drain deadline reached with requests still in flight");
        }
        self.stop_tunnels.cancel();
        let endpoints: Vec<quinn::Endpoint> = (self.live.endpoints.iter().cloned())
            .chain(self.live.dial_endpoints.all().into_iter().map(|(_, e)| e))
            .collect();
        for endpoint in &endpoints {
            endpoint.close(
                quinn::VarInt::from_u32(crate::tunnel::stream::codes::GOING_AWAY),
                b"node shutting down",
            );
        }
        let idle = futures_util::future::join_all(endpoints.iter().map(quinn::Endpoint::wait_idle));
        let _ = tokio::time::timeout(Duration::from_secs(2), idle).await;
        self.stop_rest.cancel();
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.background.wait()).await;
        // The listener is closed: remove the socket file so nobody mistakes it for a node.
        drop(self.admin_socket);
        info!(node = %state.identity, "node stopped");
    }

    /// Stops at once without draining (tests of peer failure use this).
    pub async fn abort(self) {
        self.stop_listeners.cancel();
        self.stop_tunnels.cancel();
        self.stop_rest.cancel();
        for endpoint in &self.live.endpoints {
            endpoint.close(quinn::VarInt::from_u32(0), b"aborted");
        }
        self.background.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.background.wait()).await;
        drop(self.admin_socket);
    }
}

/// Connected peers that announced a policy digest other than `acl`'s.
pub(crate) fn peers_disagreeing(peers: &PeerSet, acl: &AclService) -> usize {
    let ours = acl.digest();
    peers
        .links()
        .iter()
        .filter(|l| {
            let theirs = l.policy_digest();
            !theirs.is_empty() && *theirs != ours
        })
        .count()
}

/// Gives the services `config` names their own metric series and ACL decision counters; any
/// other name a peer or caller sends is counted as `unknown` (see `metrics`).
fn count_configured_services(metrics: &Metrics, acl: &AclService, config: &Config) {
    let exports = || config.exports.iter().map(|e| e.name.as_str());
    let imports = || config.imports.iter().map(|i| i.service.as_str());
    metrics.register_services(Side::Export, exports());
    metrics.register_services(Side::Import, imports());
    acl.count_destinations(exports().chain(imports()));
}

/// Tells every peer this node's new policy digest after each committed policy change, so
/// their `status` shows whether the nodes agree.
async fn announce_policy_changes(
    state: std::sync::Weak<NodeState>,
    mut changes: tokio::sync::watch::Receiver<u64>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let Some(state) = state.upgrade() else { return };
        state
            .peers
            .broadcast(&ControlMessage::update(state.announcement()));
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    server_config: Arc<ArcSwap<quinn::ServerConfig>>,
    ctx: Arc<SessionContext>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(i) => i,
                None => break,
            },
            () = cancel.cancelled() => break,
        };
        let (ctx, metrics, cancel) = (ctx.clone(), metrics.clone(), cancel.clone());
        let remote = incoming.remote_address();
        let rejection = RejectionSlot::default();
        let connecting = match incoming
            .accept_with(Arc::new(observed_server(&server_config.load(), &rejection)))
        {
            Ok(connecting) => connecting,
            Err(e) => {
                metrics.handshake_failed(HandshakeFailure::Protocol);
                warn!(%remote, error = %e, "tunnel connection refused before its handshake");
                continue;
            }
        };
        tasks.spawn(async move {
            match connecting.await {
                Ok(connection) => {
                    session::run(
                        TunnelConnection::Quic(connection),
                        Direction::Accepted,
                        ctx,
                        cancel,
                        CancellationToken::new(),
                    )
                    .await;
                }
                Err(error) => {
                    // The count takes the reason; the detail (serial, dates) goes to the log.
                    let error = QuicHandshakeError {
                        error,
                        rejected: rejection.take(),
                    };
                    let reason = error.failure();
                    metrics.handshake_failed(reason);
                    warn!(%remote, %reason, %error, "tunnel handshake refused");
                }
            }
        });
    }
}

/// Accepts TLS/TCP tunnels on one worker's listener until `cancel` fires. Handshakes run
/// in their own tasks, each bounded by `tcp::HANDSHAKE_TIMEOUT`, and every connection,
/// handshaking or up, counts under the listener's connection cap.
async fn tcp_accept_loop(
    listener: TcpListener,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    limits: Arc<ListenerLimits>,
    tuning: TransportTuning,
    ctx: Arc<SessionContext>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            accepted = limits.accept(&listener) => accepted,
            () = cancel.cancelled() => break,
        };
        let (ctx, cancel, tuning) = (ctx.clone(), cancel.clone(), tuning.clone());
        let config = tls.load_full();
        tasks.spawn(async move {
            let remote = accepted.peer;
            let _permit = accepted.permit;
            match tcp::accept(accepted.stream, remote, config, &tuning).await {
                Ok(connection) => {
                    session::run(
                        TunnelConnection::Tcp(connection),
                        Direction::Accepted,
                        ctx,
                        cancel,
                        CancellationToken::new(),
                    )
                    .await;
                }
                Err(error) => {
                    let reason = error.failure();
                    ctx.metrics.handshake_failed(reason);
                    warn!(%remote, %reason, %error, "tunnel TCP handshake refused");
                }
            }
        });
    }
}

/// An ephemeral port of `addr`'s address that is free for UDP and TCP alike, so the TLS/TCP
/// listener can take the QUIC listener's port number (busy hosts hand out many ephemeral TCP
/// ports; a port free for UDP is often taken for TCP).
fn port_free_for_udp_and_tcp(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let mut last = None;
    for _ in 0..64 {
        let tcp = std::net::TcpListener::bind(addr)?;
        let candidate = tcp.local_addr()?;
        match std::net::UdpSocket::bind(candidate) {
            Ok(_) => return Ok(candidate),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for UDP and TCP")))
}

/// Which peers may open tunnels to this node: nodes of the allowed sites.
fn tunnel_expectation(config: &Config) -> PeerExpectation {
    PeerExpectation::NodeOfSites {
        trust_domain: config.node.trust_domain.clone(),
        sites: config.tunnel.allowed_sites.clone(),
    }
}
