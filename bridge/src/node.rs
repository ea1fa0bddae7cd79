//! A running node: composes configuration, TLS material, the ACL store, upstreams, the
//! tunnel endpoint, dialers, import listeners and the admin API, and owns their shutdown.
//!
//! Start-up (`Node::start_on`) is a plan of named steps on `Startup`: every socket is bound
//! before any task starts, then the tasks start in a fixed order (tunnel accept loops,
//! dialers, import listeners, admin API, reload server). This is the one place where the
//! pieces meet; it holds no protocol or policy logic itself.

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
use crate::workers::{Balance, Held, Workers};

mod readiness;
mod reload;

pub(crate) use reload::ReloadReport;
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
    pub(crate) admin_remote: Option<SocketAddr>,
    /// The health-only admin listener (`admin.health_listen`), if configured.
    pub health: Option<SocketAddr>,
    /// (service, address) of every import listener, in config order.
    pub imports: Vec<(String, SocketAddr)>,
    pub gateway: Option<SocketAddr>,
}

/// State shared by the node's tasks and the admin API.
pub struct NodeState {
    pub config: ArcSwap<Config>,
    pub(crate) identity: SpiffeId,
    pub peers: Arc<PeerSet>,
    /// Which peer sites may serve which services.
    pub(crate) serving: Arc<ServingPolicy>,
    /// The certificate checks every live tunnel and mTLS connection is held to.
    pub(crate) trust: TrustUpdates,
    pub acl: Arc<AclService>,
    pub export: Arc<ExportContext>,
    pub metrics: Arc<Metrics>,
    pub(crate) started: Instant,
    pub(crate) addresses: NodeAddresses,
    /// Worker threads running the data plane (1: all on the main runtime).
    pub(crate) workers: usize,
    /// Where `POST /v1/reload` hands its reload to the node (see [`NodeState::reload`]).
    reload_requests: tokio::sync::mpsc::Sender<ReloadRequest>,
    draining: AtomicBool,
    /// What each dialer slot is doing, for status.
    pub(crate) dial_states: Arc<crate::tunnel::dialer::DialStates>,
}

impl NodeState {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// What this node tells its peers about itself: its exports and its policy.
    pub(crate) fn announcement(&self) -> PeerAnnouncement {
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
    pub(crate) async fn reload(&self, by: String) -> Result<ReloadReport, ReloadFailed> {
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
pub(crate) enum ReloadFailed {
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
pub(crate) fn load_tls(config: &Config) -> anyhow::Result<TlsMaterial> {
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
        .map(|e| (e.name.to_string(), e.escaped_slashes))
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

/// Creates the data dir and opens the policy store in it.
fn open_policy_store(config: &Config) -> anyhow::Result<Arc<AclService>> {
    create_private_dir(&config.node.data_dir)
        .with_context(|| format!("creating data dir {}", config.node.data_dir.display()))?;
    AclService::open(&config.database_path())
        .with_context(|| format!("opening policy store {}", config.database_path().display()))
}

/// A node being started: what its start-up steps share. Every task a step spawns runs on
/// `workers` (or the caller's runtime), is owned by `background` (request handlers by
/// `requests`) and stops on one of the three tokens, which the running `Node` then holds.
struct Startup {
    config: Config,
    material: TlsMaterial,
    workers: Arc<Workers>,
    metrics: Arc<Metrics>,
    tuning: TransportTuning,
    background: TaskTracker,
    requests: TaskTracker,
    stop_listeners: CancellationToken,
    stop_tunnels: CancellationToken,
    stop_rest: CancellationToken,
}

/// The tunnel's sockets, bound: the QUIC endpoints (one per worker when the tunnel can be
/// shared out, else one) and the TLS/TCP listener, if any.
struct TunnelSockets {
    /// The QUIC listener's config (a listening node).
    server_config: Option<quinn::ServerConfig>,
    endpoints: Vec<quinn::Endpoint>,
    /// Where the QUIC listener takes tunnels (a listening node).
    addr: Option<SocketAddr>,
    tcp: Option<TcpTunnelListener>,
}

/// The TLS/TCP tunnel listener, bound on every worker, with its TLS config and its cap.
struct TcpTunnelListener {
    addr: SocketAddr,
    listeners: Vec<TcpListener>,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    limits: Arc<ListenerLimits>,
}

/// The tunnel once it accepts: the endpoints dialers share and `rebind_tunnels` moves, and
/// the listeners' TLS configs a reload swaps.
struct TunnelListening {
    endpoints: Vec<quinn::Endpoint>,
    server: Option<Arc<ArcSwap<quinn::ServerConfig>>>,
    tcp_server: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
}

/// The import listeners, then the gateway, each bound on every worker with its spec.
struct ImportListeners {
    listeners: Vec<(Vec<TcpListener>, ListenerSpec)>,
    /// (service, address) of every import listener, in config order.
    addresses: Vec<(String, SocketAddr)>,
    gateway: Option<SocketAddr>,
}

/// The admin listeners, bound: read-only TCP, health-only TCP, the Unix socket, remote mTLS.
struct AdminListeners {
    tcp: TcpListener,
    tcp_addr: SocketAddr,
    health: Option<TcpListener>,
    health_addr: Option<SocketAddr>,
    socket: tokio::net::UnixListener,
    socket_file: SocketFile,
    remote: Option<(TcpListener, Arc<ArcSwap<rustls::ServerConfig>>)>,
    remote_addr: Option<SocketAddr>,
}

/// What every dialer slot of the node is spawned with.
#[derive(Clone)]
struct DialerShared {
    endpoints: Vec<quinn::Endpoint>,
    /// A dial-only node on an ephemeral port dials each QUIC connection from a port of its
    /// own (see `tunnel::dialer`); otherwise dialers share the node's endpoints.
    fresh_ports: bool,
    reset_key_seed: Arc<[u8]>,
    registry: Arc<DialEndpoints>,
    carrier_choice: CarrierChoice,
    max_backoff: tokio::sync::watch::Receiver<Duration>,
    session: Arc<SessionContext>,
}

/// The node's dialers once started: what a reload changes in them.
struct Dialing {
    /// Endpoints dialers opened for their connections (dial-only nodes).
    endpoints: Arc<DialEndpoints>,
    /// Dialing TLS config per peer address.
    peer_clients: Vec<(String, Arc<ArcSwap<quic::DialConfig>>)>,
    /// `tunnel.reconnect_max_backoff`, read by every dialer before each wait.
    backoff: tokio::sync::watch::Sender<Duration>,
}

impl NodeAddresses {
    fn of(tunnel: &TunnelSockets, imports: &ImportListeners, admin: &AdminListeners) -> Self {
        NodeAddresses {
            tunnel: tunnel.addr,
            tunnel_tcp: tunnel.tcp.as_ref().map(|tcp| tcp.addr),
            admin: admin.tcp_addr,
            admin_socket: admin.socket_file.path().to_path_buf(),
            admin_remote: admin.remote_addr,
            health: admin.health_addr,
            imports: imports.addresses.clone(),
            gateway: imports.gateway,
        }
    }
}

/// Lets `acl apply` warn about destinations that neither this node nor a connected peer
/// exports (allowed — the service may not exist yet — but usually a typo).
fn track_known_destinations(state: &Arc<NodeState>) {
    let known_state = Arc::downgrade(state);
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
}

/// Where the tunnel's UDP sockets bind: `tunnel.listen` on a listening node, else
/// `tunnel.bind`. TLS/TCP tunnels take the same port number, so an ephemeral listen port must
/// be free for both; a port the workers share (`share_port`) is resolved by a plain bind.
fn tunnel_bind_address(config: &Config, share_port: bool) -> anyhow::Result<SocketAddr> {
    let mut bind = match config.tunnel.listen {
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
    Ok(bind)
}

impl Startup {
    fn new(
        config: Config,
        material: TlsMaterial,
        workers: Arc<Workers>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let tuning = TransportTuning {
            keepalive: config.tunnel.keepalive,
            idle_timeout: config.tunnel.idle_timeout,
            congestion: config.tunnel.congestion,
            ..TransportTuning::default()
        };
        Startup {
            config,
            material,
            workers,
            metrics,
            tuning,
            background: TaskTracker::new(),
            requests: TaskTracker::new(),
            stop_listeners: CancellationToken::new(),
            stop_tunnels: CancellationToken::new(),
            stop_rest: CancellationToken::new(),
        }
    }

    /// Starts an upstream for each export: the export side of the node.
    async fn start_exports(&self, acl: &Arc<AclService>) -> anyhow::Result<Arc<ExportContext>> {
        let config = &self.config;
        let mut services = HashMap::new();
        for export in &config.exports {
            let upstream =
                Upstream::start(&export.name, &export.upstream, self.stop_rest.child_token())
                    .await
                    .with_context(|| {
                        format!("{}: export `{}`", config.source.display(), export.name)
                    })?;
            services.insert(export.name.to_string(), upstream);
        }
        Ok(Arc::new(ExportContext {
            acl: acl.clone(),
            services: ArcSwap::from_pointee(services),
            escaped_slashes: ArcSwap::from_pointee(escaped_slashes_by_export(config)),
            metrics: self.metrics.clone(),
        }))
    }

    /// Binds the tunnel's QUIC endpoints, then its TLS/TCP listener.
    fn bind_tunnel(&self) -> anyhow::Result<TunnelSockets> {
        let (config, workers, material) = (&self.config, &self.workers, &self.material);
        let server_config = match config.tunnel.listen {
            Some(_) => Some(quic::server_config(
                material,
                tunnel_expectation(config),
                &self.tuning,
            )?),
            None => None,
        };
        let per_worker = tunnel_per_worker(config, workers);
        let share_port = per_worker && config.tunnel.listen.is_some();
        let bind = tunnel_bind_address(config, share_port)?;
        let sockets = (0..if per_worker { workers.count() } else { 1 })
            .map(|_| quic::bind_socket(bind, share_port))
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| format!("{}: tunnel", config.source.display()))?;
        let handoff = share_port.then(|| Handoff::new(sockets.len()));
        if let (Some(handoff), Some(first)) = (&handoff, sockets.first())
            && let Err(e) = handoff.steer(first)
        {
            warn!(
                error = %e,
                "the kernel cannot steer tunnel datagrams to their workers' sockets; \
                 the workers hand them to each other instead"
            );
        }
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
        let addr = match config.tunnel.listen {
            Some(_) => Some(
                endpoints[0]
                    .local_addr()
                    .context("reading the tunnel address")?,
            ),
            None => None,
        };
        let tcp = self.bind_tcp_tunnel(addr)?;
        Ok(TunnelSockets {
            server_config,
            endpoints,
            addr,
            tcp,
        })
    }

    /// Binds the TLS/TCP tunnel listener: on the UDP listener's port (`udp`) unless
    /// `tunnel.listen_tcp` names another.
    fn bind_tcp_tunnel(
        &self,
        udp: Option<SocketAddr>,
    ) -> anyhow::Result<Option<TcpTunnelListener>> {
        let config = &self.config;
        let Some(addr) = config.tunnel.tcp_listen_address() else {
            return Ok(None);
        };
        let addr = match (config.tunnel.listen_tcp, udp) {
            (None, Some(udp)) => udp,
            _ => addr,
        };
        let (local, listeners) = bind_tcp(&self.workers, addr).with_context(|| {
            format!(
                "{}: tunnel: binding the tunnel TCP listener {addr}",
                config.source.display()
            )
        })?;
        let tls = Arc::new(ArcSwap::new(tcp::server_config(
            &self.material,
            tunnel_expectation(config),
        )?));
        let limits = self.metrics.listener(ListenerLimits::new(
            format!("tunnel-tcp@{local}"),
            config.limits.max_connections,
            config.limits.idle_timeout,
        ));
        Ok(Some(TcpTunnelListener {
            addr: local,
            listeners,
            tls,
            limits,
        }))
    }

    /// The certificate checks every live tunnel and mTLS connection is held to; CRLs
    /// already stale are warned about now.
    fn trust(&self) -> anyhow::Result<TrustUpdates> {
        let config = &self.config;
        let trust = TrustUpdates::new(Trust::new(
            &self.material,
            &config.node.trust_domain,
            &config.tunnel.allowed_sites,
            config.tls.crl.as_deref(),
        )?);
        crate::trust::warn_stale_crls(&trust.current());
        Ok(trust)
    }

    /// Binds every import listener, then the gateway.
    fn bind_imports(&self) -> anyhow::Result<ImportListeners> {
        let config = &self.config;
        let mut settings = listener_settings(config).into_iter();
        let mut bound = ImportListeners {
            listeners: Vec::new(),
            addresses: Vec::new(),
            gateway: None,
        };
        for import in &config.imports {
            let (local, listener) = bind_tcp(&self.workers, import.listen).with_context(|| {
                format!(
                    "{}: import `{}`: binding {}",
                    config.source.display(),
                    import.service,
                    import.listen
                )
            })?;
            bound.addresses.push((import.service.to_string(), local));
            let spec = self.listener_spec(
                ListenerTarget::Service(import.service.to_string()),
                &import.caller,
                settings.next(),
                format!("import:{}@{local}", import.service),
            )?;
            bound.listeners.push((listener, spec));
        }
        if let Some(gateway) = &config.gateway {
            let (local, listener) = bind_tcp(&self.workers, gateway.listen).with_context(|| {
                format!(
                    "{}: gateway: binding {}",
                    config.source.display(),
                    gateway.listen
                )
            })?;
            bound.gateway = Some(local);
            let spec = self.listener_spec(
                ListenerTarget::Gateway {
                    suffix: gateway.suffix.clone(),
                },
                &gateway.caller,
                settings.next(),
                format!("gateway@{local}"),
            )?;
            bound.listeners.push((listener, spec));
        }
        Ok(bound)
    }

    /// The spec of an import or gateway listener: the TLS config of an `mtls` listener, its
    /// settings, and its connection limits under `name`.
    fn listener_spec(
        &self,
        target: ListenerTarget,
        caller: &CallerIdentity,
        settings: Option<ListenerSettings>,
        name: String,
    ) -> anyhow::Result<ListenerSpec> {
        let tls = if *caller == CallerIdentity::Mtls {
            Some(import_tls_config(
                &self.material,
                &self.config.node.trust_domain,
            )?)
        } else {
            None
        };
        let settings = settings
            .map(ArcSwap::from_pointee)
            .context("a listener without settings")?;
        Ok(ListenerSpec {
            target,
            caller: caller.clone(),
            tls: arc_swap::ArcSwapOption::new(tls),
            settings,
            limits: self.metrics.listener(ListenerLimits::new(
                name,
                self.config.limits.max_connections,
                self.config.limits.idle_timeout,
            )),
        })
    }

    /// Binds the read-only admin listener, the health-only one, the admin socket and the
    /// remote mTLS listener, in that order.
    async fn bind_admin(&self) -> anyhow::Result<AdminListeners> {
        let config = &self.config;
        let source = config.source.display();
        let tcp = TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("{source}: admin: binding {}", config.admin.listen))?;
        let tcp_addr = tcp.local_addr()?;
        let health = match config.admin.health_listen {
            None => None,
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("{source}: admin: binding health_listen {addr}"))?,
            ),
        };
        let health_addr = health.as_ref().map(TcpListener::local_addr).transpose()?;
        let AdminSocket {
            listener: socket,
            file: socket_file,
        } = AdminSocket::bind(&config.admin.socket).with_context(|| format!("{source}: admin"))?;
        let remote = match &config.admin.remote {
            None => None,
            Some(remote) => {
                let listener = TcpListener::bind(remote.listen).await.with_context(|| {
                    format!("{source}: admin.remote: binding {}", remote.listen)
                })?;
                let tls = admin_remote_tls(&self.material, config)?;
                Some((listener, Arc::new(ArcSwap::from_pointee(tls))))
            }
        };
        let remote_addr = remote
            .as_ref()
            .map(|(listener, _)| listener.local_addr())
            .transpose()?;
        Ok(AdminListeners {
            tcp,
            tcp_addr,
            health,
            health_addr,
            socket,
            socket_file,
            remote,
            remote_addr,
        })
    }

    /// What every tunnel session of the node runs with: our hello, built fresh for each
    /// connection, and the export side serving the peer's request streams.
    fn session_context(&self, state: &Arc<NodeState>) -> Arc<SessionContext> {
        let hello_state = Arc::downgrade(state);
        let hello_id = state.identity.to_string();
        let export_ctx = state.export.clone();
        Arc::new(SessionContext {
            peers: state.peers.clone(),
            serving: state.serving.clone(),
            trust: state.trust.subscribe(),
            metrics: self.metrics.clone(),
            tasks: self.requests.clone(),
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
            keepalive: self.config.tunnel.keepalive,
            dial_states: state.dial_states.clone(),
        })
    }

    /// Accepts tunnels on each worker's QUIC endpoint and TLS/TCP listener.
    fn start_tunnel_listeners(
        &self,
        tunnel: TunnelSockets,
        session_ctx: &Arc<SessionContext>,
    ) -> TunnelListening {
        let server = tunnel
            .server_config
            .map(|config| Arc::new(ArcSwap::from_pointee(config)));
        if let (Some(_), Some(server)) = (tunnel.addr, &server) {
            for (worker, endpoint) in tunnel.endpoints.iter().enumerate() {
                self.workers.spawn_on(
                    worker,
                    &self.background,
                    accept_loop(
                        endpoint.clone(),
                        Arc::clone(server),
                        session_ctx.clone(),
                        self.metrics.clone(),
                        self.stop_tunnels.clone(),
                        self.background.clone(),
                    ),
                );
            }
        }
        let tcp_server = tunnel.tcp.map(|tcp| {
            let balance = Balance::new(self.workers.count());
            for (worker, listener) in tcp.listeners.into_iter().enumerate() {
                let accepting = TcpAccepting {
                    tls: tcp.tls.clone(),
                    limits: tcp.limits.clone(),
                    tuning: self.tuning.clone(),
                    ctx: session_ctx.clone(),
                    cancel: self.stop_tunnels.clone(),
                    tasks: self.background.clone(),
                    workers: self.workers.clone(),
                    balance: balance.clone(),
                    worker,
                };
                self.workers.spawn_on(
                    worker,
                    &self.background,
                    tcp_accept_loop(listener, accepting),
                );
            }
            tcp.tls
        });
        TunnelListening {
            endpoints: tunnel.endpoints,
            server,
            tcp_server,
        }
    }

    /// Starts the dialer slots of every configured peer — its configured number of
    /// connections, and at least one per endpoint so every worker has a tunnel of its own —
    /// and, for a peer with `member_networks`, the task that follows its site's members.
    fn start_dialers(
        &self,
        endpoints: &[quinn::Endpoint],
        peers: &Arc<PeerSet>,
        session_ctx: &Arc<SessionContext>,
    ) -> anyhow::Result<Dialing> {
        let config = &self.config;
        let (backoff, max_backoff) =
            tokio::sync::watch::channel(config.tunnel.reconnect_max_backoff);
        let shared = DialerShared {
            endpoints: endpoints.to_vec(),
            fresh_ports: config.tunnel.listen.is_none() && config.tunnel.bind.port() == 0,
            reset_key_seed: Arc::from(self.material.key.secret_der()),
            registry: Arc::new(DialEndpoints::default()),
            carrier_choice: CarrierChoice {
                transport: config.tunnel.transport,
                tcp_fallback_after: config.tunnel.tcp_fallback_after,
                quic_reprobe_interval: config.tunnel.quic_reprobe_interval,
            },
            max_backoff,
            session: session_ctx.clone(),
        };
        let mut peer_clients = Vec::new();
        for peer in &config.peers {
            let client = Arc::new(ArcSwap::from_pointee(peer_client_config(
                &self.material,
                &config.node.trust_domain,
                peer,
                &self.tuning,
            )?));
            peer_clients.push((peer.address.to_string(), client.clone()));
            let spawn_slot = self.slot_spawner(client, shared.clone());
            for index in 0..usize::from(peer.connections).max(endpoints.len()) {
                spawn_slot(Slot::configured(peer, index));
            }
            if !peer.member_networks.is_empty() {
                self.background.spawn(crate::tunnel::members::follow(
                    peer.clone(),
                    peers.clone(),
                    spawn_slot,
                    self.stop_tunnels.clone(),
                ));
            }
        }
        Ok(Dialing {
            endpoints: shared.registry,
            peer_clients,
            backoff,
        })
    }

    /// Spawns a dialer for each slot of one peer it is handed, on the workers in turn.
    fn slot_spawner(
        &self,
        client: Arc<ArcSwap<quic::DialConfig>>,
        shared: DialerShared,
    ) -> SpawnSlot {
        let next_worker = std::sync::atomic::AtomicUsize::new(0);
        let (workers, background) = (self.workers.clone(), self.background.clone());
        let stop_tunnels = self.stop_tunnels.clone();
        let bind = self.config.tunnel.bind;
        Arc::new(move |slot| {
            let worker = next_worker.fetch_add(1, Ordering::Relaxed) % shared.endpoints.len();
            let source = if shared.fresh_ports {
                DialSource::Fresh {
                    bind,
                    reset_key_seed: shared.reset_key_seed.clone(),
                    registry: shared.registry.clone(),
                }
            } else {
                DialSource::Shared(shared.endpoints[worker].clone())
            };
            workers.spawn_on(
                worker,
                &background,
                crate::tunnel::dialer::run(
                    source,
                    slot,
                    client.clone(),
                    shared.carrier_choice,
                    shared.max_backoff.clone(),
                    shared.session.clone(),
                    stop_tunnels.clone(),
                ),
            );
        })
    }

    /// Serves every import listener and the gateway on each worker's socket; returns their
    /// specs, which a reload changes.
    fn start_imports(
        &self,
        listeners: Vec<(Vec<TcpListener>, ListenerSpec)>,
        state: &NodeState,
    ) -> Vec<Arc<ListenerSpec>> {
        let import_ctx = Arc::new(ImportContext {
            peers: state.peers.clone(),
            serving: state.serving.clone(),
            trust: state.trust.subscribe(),
            acl: state.acl.clone(),
            site: Arc::from(self.config.node.site.as_str()),
            metrics: self.metrics.clone(),
            tasks: self.requests.clone(),
        });
        let mut specs = Vec::new();
        for (per_worker, spec) in listeners {
            let spec = Arc::new(spec);
            specs.push(spec.clone());
            for (worker, listener) in per_worker.into_iter().enumerate() {
                self.workers.spawn_on(
                    worker,
                    &self.background,
                    import::serve(
                        listener,
                        spec.clone(),
                        import_ctx.clone(),
                        self.stop_listeners.clone(),
                    ),
                );
            }
        }
        specs
    }

    /// Serves the admin API on each admin listener; returns the remote listener's TLS config
    /// (a reload swaps it) and the admin socket's file (removed when the node is gone).
    fn start_admin(
        &self,
        admin: AdminListeners,
        state: &Arc<NodeState>,
    ) -> (Option<Arc<ArcSwap<rustls::ServerConfig>>>, SocketFile) {
        let stop = &self.stop_rest;
        self.background.spawn(crate::admin::serve_tcp(
            admin.tcp,
            state.clone(),
            ListenerKind::ReadOnly,
            stop.clone(),
        ));
        if let Some(listener) = admin.health {
            self.background.spawn(crate::admin::serve_tcp(
                listener,
                state.clone(),
                ListenerKind::HealthOnly,
                stop.clone(),
            ));
        }
        self.background.spawn(crate::admin::serve_socket(
            admin.socket,
            state.clone(),
            stop.clone(),
        ));
        let remote_tls = admin.remote.map(|(listener, tls)| {
            self.background.spawn(crate::admin::serve_remote(
                listener,
                tls.clone(),
                node_certificate_names(&self.material),
                state.clone(),
                stop.clone(),
            ));
            tls
        });
        (remote_tls, admin.socket_file)
    }

    /// The running node. Its reload server starts last: a reload may change every part
    /// started before it.
    fn into_node(
        self,
        state: Arc<NodeState>,
        live: Reloadable,
        reload_queue: tokio::sync::mpsc::Receiver<ReloadRequest>,
        admin_socket: SocketFile,
    ) -> Node {
        let live = Arc::new(live);
        self.background.spawn(reload::serve_requests(
            reload_queue,
            live.clone(),
            self.stop_rest.clone(),
        ));
        Node {
            state,
            live,
            workers: self.workers,
            background: self.background,
            requests: self.requests,
            stop_listeners: self.stop_listeners,
            stop_tunnels: self.stop_tunnels,
            stop_rest: self.stop_rest,
            admin_socket,
        }
    }
}

impl Node {
    /// Starts every part of the node on the caller's runtime; returns once all listeners
    /// accept connections.
    pub async fn start(config: Config) -> anyhow::Result<Node> {
        Self::start_on(config, Arc::new(Workers::inline())).await
    }

    /// Starts the node with its data plane spread over `workers` (listeners, tunnels and
    /// request handling on each; admin API and health checks on the caller's runtime).
    ///
    /// Start-up is a plan built, then started: the policy store and the upstreams, then every
    /// socket bound (tunnel, imports, admin), so that a port clash fails the start before
    /// anything accepts; then the tasks, in order: tunnel accept loops, dialers, import
    /// listeners, the admin API, and the reload server last.
    pub async fn start_on(config: Config, workers: Arc<Workers>) -> anyhow::Result<Node> {
        let material = load_tls(&config)?;
        let acl = open_policy_store(&config)?;
        let metrics = Arc::new(Metrics::default());
        count_configured_services(&metrics, &acl, &config);
        let startup = Startup::new(config, material, workers, metrics);
        let export = startup.start_exports(&acl).await?;

        let tunnel = startup.bind_tunnel()?;
        let serving = Arc::new(ServingPolicy::new(acl.clone(), &startup.config));
        let trust = startup.trust()?;
        let imports = startup.bind_imports()?;
        let admin = startup.bind_admin().await?;

        // Few callers reload at once; one more waits for room.
        let (reload_requests, reload_queue) = tokio::sync::mpsc::channel(4);
        let state = Arc::new(NodeState {
            config: ArcSwap::from_pointee(startup.config.clone()),
            identity: startup.material.own_id.clone(),
            peers: Arc::new(PeerSet::default()),
            serving,
            trust,
            acl,
            export,
            metrics: startup.metrics.clone(),
            started: Instant::now(),
            addresses: NodeAddresses::of(&tunnel, &imports, &admin),
            workers: startup.workers.count(),
            dial_states: Arc::default(),
            reload_requests,
            draining: AtomicBool::new(false),
        });
        track_known_destinations(&state);

        let session_ctx = startup.session_context(&state);
        let tunnel = startup.start_tunnel_listeners(tunnel, &session_ctx);
        let dialing = startup.start_dialers(&tunnel.endpoints, &state.peers, &session_ctx)?;
        let listener_specs = startup.start_imports(imports.listeners, &state);
        startup.background.spawn(announce_policy_changes(
            Arc::downgrade(&state),
            state.acl.subscribe_changes(),
            startup.stop_rest.clone(),
        ));
        let (admin_remote_tls, admin_socket) = startup.start_admin(admin, &state);
        startup.background.spawn(crate::trust::watch_crl_freshness(
            state.trust.subscribe(),
            startup.stop_rest.clone(),
        ));
        let addresses = &state.addresses;
        info!(node = %state.identity, tunnel = ?addresses.tunnel, admin = %addresses.admin, admin_socket = %addresses.admin_socket.display(), admin_remote = ?addresses.admin_remote, workers = state.workers, tunnel_endpoints = tunnel.endpoints.len(), "node started");
        let live = Reloadable {
            state: state.clone(),
            endpoints: tunnel.endpoints,
            dial_endpoints: dialing.endpoints,
            peer_clients: dialing.peer_clients,
            tunnel_server: tunnel.server,
            tunnel_tcp_server: tunnel.tcp_server,
            admin_remote_tls,
            listener_specs,
            dial_backoff: dialing.backoff,
            tuning: startup.tuning.clone(),
            stop_rest: startup.stop_rest.clone(),
            one_at_a_time: tokio::sync::Mutex::new(()),
        };
        Ok(startup.into_node(state, live, reload_queue, admin_socket))
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

/// What a worker's TLS/TCP tunnel listener needs to accept and serve tunnels.
struct TcpAccepting {
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    limits: Arc<ListenerLimits>,
    tuning: TransportTuning,
    ctx: Arc<SessionContext>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    workers: Arc<Workers>,
    balance: Arc<Balance>,
    /// This listener's worker, from 0.
    worker: usize,
}

/// Accepts TLS/TCP tunnels on one worker's listener until `cancel` fires. Each tunnel is
/// served by the worker holding the fewest (see [`Balance`]), which may be another one: the
/// socket then moves to that worker's reactor. Handshakes run in their own tasks, each
/// bounded by `tcp::HANDSHAKE_TIMEOUT`, and every connection, handshaking or up, counts
/// under the listener's connection cap.
async fn tcp_accept_loop(listener: TcpListener, accepting: TcpAccepting) {
    loop {
        let accepted = tokio::select! {
            accepted = accepting.limits.accept(&listener) => accepted,
            () = accepting.cancel.cancelled() => break,
        };
        let held = accepting.balance.take(accepting.worker);
        let (remote, permit) = (accepted.peer, accepted.permit);
        let serve = ServeTcpTunnel {
            remote,
            config: accepting.tls.load_full(),
            tuning: accepting.tuning.clone(),
            ctx: accepting.ctx.clone(),
            cancel: accepting.cancel.clone(),
            kept: (permit, held),
        };
        let target = serve.kept.1.worker();
        if target == accepting.worker {
            accepting.tasks.spawn(serve.run(accepted.stream));
            continue;
        }
        match accepted.stream.into_std() {
            Ok(stream) => accepting.workers.spawn_on(target, &accepting.tasks, async move {
                match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => serve.run(stream).await,
                    Err(error) => warn!(%remote, %error, "tunnel TCP connection could not move to its worker"),
                }
            }),
            Err(error) => warn!(%remote, %error, "tunnel TCP connection could not move to its worker"),
        }
    }
}

/// One accepted TLS/TCP tunnel, to be handshaken and served on the worker it was given.
struct ServeTcpTunnel {
    remote: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    tuning: TransportTuning,
    ctx: Arc<SessionContext>,
    cancel: CancellationToken,
    /// Its place under the listener's cap and on its worker, held until it ends.
    kept: (crate::listener::ConnectionPermit, Held),
}

impl ServeTcpTunnel {
    async fn run(self, stream: tokio::net::TcpStream) {
        let Self {
            remote,
            config,
            tuning,
            ctx,
            cancel,
            kept: _kept,
        } = self;
        match tcp::accept(stream, remote, config, &tuning).await {
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
