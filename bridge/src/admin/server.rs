//! Serving the admin API: one accept loop per listener (TCP, the Unix socket, the mTLS
//! listener), each bounded in connections, and the router every request that `access` let
//! through goes to. Refusals are answered 403 with their reason and logged once.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::access::{self, Caller, ListenerKind, ListenerPolicy, NOT_AUTHORISED, RequestHead};
use super::status;
use super::unix::PeerCredentials;
use crate::listener::{ConnectionActivity, ListenerLimits};
use crate::node::{NodeState, ReloadFailed};

/// Connections one admin listener serves at once; more wait in the kernel's backlog. An
/// operator needs a handful; this keeps a flood from taking the control plane's memory.
const MAX_CONNECTIONS: usize = 64;
/// An admin connection with no request in flight for this long is closed, so connections
/// that send nothing (or stop half-way into an HTTP/2 preface) cannot hold every slot.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a remote client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long stopping waits for open admin connections to finish their request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// One listener: its name in logs and what it serves.
struct Listener {
    name: String,
    policy: ListenerPolicy,
}

/// Everything a request on one connection needs.
struct ConnectionContext {
    state: Arc<NodeState>,
    listener: Arc<Listener>,
    caller: Caller,
    /// The connection's local address (none on the socket): what `Host` must name.
    local: Option<SocketAddr>,
}

/// The connections of one listener, served until the listener stops.
struct Connections {
    builder: auto::Builder<TokioExecutor>,
    graceful: GracefulShutdown,
    tasks: TaskTracker,
    limit: Arc<Semaphore>,
    /// The idle timeout of this listener's connections.
    idle: Arc<ListenerLimits>,
}

impl Connections {
    fn new(name: &str) -> Connections {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        Connections {
            builder,
            graceful: GracefulShutdown::new(),
            tasks: TaskTracker::new(),
            limit: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            idle: Arc::new(ListenerLimits::new(
                format!("admin {name}"),
                MAX_CONNECTIONS,
                IDLE_TIMEOUT,
            )),
        }
    }

    /// Waits for a free connection slot, or `None` once `cancel` fires.
    async fn slot(&self, cancel: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            () = cancel.cancelled() => None,
            permit = self.limit.clone().acquire_owned() => permit.ok(),
        }
    }

    /// Serves one connection; `revoked`, when given, resolves with a reason once the peer's
    /// certificate is no longer trusted, and the connection is closed then.
    fn serve<I>(
        &self,
        io: I,
        context: ConnectionContext,
        permit: OwnedSemaphorePermit,
        revoked: Option<Pin<Box<dyn Future<Output = String> + Send>>>,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let context = Arc::new(context);
        let (listener, caller) = (context.listener.clone(), context.caller.clone());
        let activity = Arc::new(ConnectionActivity::default());
        let requests = activity.clone();
        let service = hyper::service::service_fn(move |req| {
            let in_flight = requests.request();
            let answered = route(req, context.clone());
            async move {
                let response = answered.await;
                drop(in_flight);
                response
            }
        });
        let connection = self
            .builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let watched = self.graceful.watch(connection);
        let revoked = revoked.unwrap_or_else(|| Box::pin(std::future::pending()));
        let idle = self.idle.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = watched => {}
                reason = revoked => {
                    warn!(listener = %listener.name, %caller, %reason, "closing a remote admin connection: the administrator's certificate is no longer trusted");
                }
                // Dropping the connection closes it: nothing was asked of it for a while.
                () = idle.idle(&activity) => {}
            }
            drop(permit);
        });
    }

    async fn shutdown(self) {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.graceful.shutdown()).await;
        self.tasks.close();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.tasks.wait()).await;
    }
}

/// After a failed accept: log it and pause (or stop when cancelled).
async fn accept_failed(name: &str, error: &std::io::Error, cancel: &CancellationToken) {
    warn!(listener = name, %error, "admin listener accept failed");
    tokio::select! {
        () = cancel.cancelled() => {}
        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
    }
}

fn policy(state: &NodeState, kind: ListenerKind, extra_hosts: Vec<String>) -> ListenerPolicy {
    ListenerPolicy {
        kind,
        extra_hosts,
        socket: state.addresses.admin_socket.display().to_string(),
        remote: state.addresses.admin_remote,
    }
}

/// Serves the read-only (`admin.listen`) or health-only (`admin.health_listen`) listener until
/// `cancel` fires.
pub(crate) async fn serve_tcp(
    listener: TcpListener,
    state: Arc<NodeState>,
    kind: ListenerKind,
    cancel: CancellationToken,
) {
    let local = listener.local_addr().ok();
    let listener_info = Arc::new(Listener {
        name: format!(
            "{} {}",
            match kind {
                ListenerKind::HealthOnly => "health",
                _ => "tcp",
            },
            local.map_or_else(|| "?".to_string(), |a| a.to_string())
        ),
        policy: policy(&state, kind, Vec::new()),
    });
    let connections = Connections::new(&listener_info.name);
    while let Some(permit) = connections.slot(&cancel).await {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let context = ConnectionContext {
                    state: state.clone(),
                    listener: listener_info.clone(),
                    caller: Caller::Network(peer),
                    local: stream.local_addr().ok(),
                };
                connections.serve(stream, context, permit, None);
            }
            Err(e) => accept_failed(&listener_info.name, &e, &cancel).await,
        }
    }
    connections.shutdown().await;
}

/// Serves the whole API on the admin socket until `cancel` fires; each connection's caller is
/// named from `SO_PEERCRED`.
pub(crate) async fn serve_socket(
    listener: UnixListener,
    state: Arc<NodeState>,
    cancel: CancellationToken,
) {
    let listener_info = Arc::new(Listener {
        name: format!("socket {}", state.addresses.admin_socket.display()),
        policy: policy(&state, ListenerKind::Socket, Vec::new()),
    });
    let connections = Connections::new(&listener_info.name);
    while let Some(permit) = connections.slot(&cancel).await {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => match PeerCredentials::of(&stream) {
                Ok(credentials) => {
                    let context = ConnectionContext {
                        state: state.clone(),
                        listener: listener_info.clone(),
                        caller: Caller::Local(credentials),
                        local: None,
                    };
                    connections.serve(stream, context, permit, None);
                }
                // Without credentials nobody can be audited: no service.
                Err(error) => {
                    warn!(listener = %listener_info.name, %error, "admin socket peer credentials unreadable; connection closed");
                }
            },
            Err(e) => accept_failed(&listener_info.name, &e, &cancel).await,
        }
    }
    connections.shutdown().await;
}

/// Serves the whole API to administrator certificates over TLS 1.3 until `cancel` fires. The
/// TLS config (CA, CRL, node certificate) is read per handshake, so a reload applies to the
/// next connection.
pub(crate) async fn serve_remote(
    listener: TcpListener,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    extra_hosts: Vec<String>,
    state: Arc<NodeState>,
    cancel: CancellationToken,
) {
    let local = listener.local_addr().ok();
    let listener_info = Arc::new(Listener {
        name: format!(
            "remote {}",
            local.map_or_else(|| "?".to_string(), |a| a.to_string())
        ),
        policy: policy(&state, ListenerKind::Remote, extra_hosts),
    });
    let connections = Connections::new(&listener_info.name);
    let mut handshakes: JoinSet<Handshake> = JoinSet::new();
    // A connection slot is taken before accepting, so a full listener leaves clients in the
    // backlog instead of accepting and dropping them.
    let mut slot: Option<OwnedSemaphorePermit> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                if let Ok(Some((stream, caller, local, permit, trust))) = done {
                    // A reload that revokes the administrator (or the certificate's expiry)
                    // ends the connection, not only the next handshake.
                    let chain = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(<[_]>::to_vec)
                        .unwrap_or_default();
                    let revoked = crate::trust::lost(
                        trust,
                        chain,
                        crate::trust::PeerKind::Admin,
                        hybridge_ca::tls::PeerRole::Client,
                    );
                    let context = ConnectionContext {
                        state: state.clone(),
                        listener: listener_info.clone(),
                        caller,
                        local,
                    };
                    connections.serve(stream, context, permit, Some(Box::pin(revoked)));
                }
            }
            acquired = connections.limit.clone().acquire_owned(), if slot.is_none() => {
                match acquired {
                    Ok(permit) => slot = Some(permit),
                    Err(_) => break,
                }
            }
            accepted = listener.accept(), if slot.is_some() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_failed(&listener_info.name, &e, &cancel).await;
                        continue;
                    }
                };
                let Some(permit) = slot.take() else { continue };
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
                let name = listener_info.name.clone();
                let cancel = cancel.clone();
                // Subscribed before the handshake, so a reload during it is not missed.
                let trust = state.trust.subscribe();
                handshakes.spawn(async move {
                    let (stream, caller, local) =
                        handshake(acceptor, stream, peer, name, cancel).await?;
                    Some((stream, caller, local, permit, trust))
                });
            }
        }
    }
    handshakes.shutdown().await;
    connections.shutdown().await;
}

/// A remote connection ready to serve: the TLS stream, its administrator, its local address,
/// its connection slot, and the trust in force when its handshake began.
type Handshake = Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Caller,
    Option<SocketAddr>,
    OwnedSemaphorePermit,
    TrustReceiver,
)>;

type TrustReceiver = tokio::sync::watch::Receiver<Arc<crate::trust::Trust>>;

/// Runs one TLS handshake; a refused one is logged once, naming the peer and the failed check.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    name: String,
    cancel: CancellationToken,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Caller,
    Option<SocketAddr>,
)> {
    let local = stream.local_addr().ok();
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let result = tokio::select! {
        () = cancel.cancelled() => return None,
        result = handshake => result,
    };
    let stream = match result {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            warn!(listener = %name, %peer, %error, "admin TLS handshake refused");
            return None;
        }
        Err(_) => {
            warn!(listener = %name, %peer, "admin TLS handshake timed out");
            return None;
        }
    };
    // The verifier admitted only administrators; name the one it admitted.
    let id = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(hybridge_ca::tls::peer_spiffe_id);
    match id {
        Some(Ok(id @ hybridge_ca::SpiffeId::Admin { .. })) => {
            Some((stream, Caller::Admin(id), local))
        }
        other => {
            let identity = other.map(|r| r.map(|id| id.to_uri()).map_err(|e| e.to_string()));
            warn!(listener = %name, %peer, ?identity, "admin TLS peer is not an administrator; connection closed");
            None
        }
    }
}

type AdminResponse = Response<Full<Bytes>>;

/// `POST /v1/reload` (socket and remote listeners only): the same reload as SIGHUP, answered
/// when it is done with the report (200), or the reason the configuration was refused (422,
/// `reload-refused`); audited with the caller like every admin write.
async fn reload(method: &Method, context: &ConnectionContext) -> AdminResponse {
    if method != Method::POST {
        return failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "POST /v1/reload\n",
        );
    }
    let outcome = context.state.reload(context.caller.actor()).await;
    let (status, code, body) = match &outcome {
        Ok(report) => (StatusCode::OK, None, serde_json::to_vec(report)),
        Err(failed @ ReloadFailed::Refused(_)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("reload-refused"),
            serde_json::to_vec(&serde_json::json!({ "error": failed.to_string() })),
        ),
        Err(failed @ ReloadFailed::Stopping) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("node-stopping"),
            serde_json::to_vec(&serde_json::json!({ "error": failed.to_string() })),
        ),
    };
    info!(
        listener = %context.listener.name,
        caller = %context.caller,
        method = %method,
        path = "/v1/reload",
        status = status.as_u16(),
        "admin write"
    );
    let mut response = text(status, "application/json", body.unwrap_or_default());
    if let Some(code) = code {
        response
            .headers_mut()
            .insert("x-hybridge-error", HeaderValue::from_static(code));
    }
    response
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> AdminResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn failure(status: StatusCode, code: &'static str, message: &'static str) -> AdminResponse {
    let mut response = text(status, "text/plain", message);
    response
        .headers_mut()
        .insert("x-hybridge-error", HeaderValue::from_static(code));
    response
}

fn refused(reason: &str) -> AdminResponse {
    let body = serde_json::to_vec(&serde_json::json!({ "error": reason })).unwrap_or_default();
    let mut response = text(StatusCode::FORBIDDEN, "application/json", body);
    response
        .headers_mut()
        .insert("x-hybridge-error", HeaderValue::from_static(NOT_AUTHORISED));
    response
}

/// Answers one admin request: the listener's access policy first, then the endpoint its
/// kind exposes.
async fn route(
    req: Request<Incoming>,
    context: Arc<ConnectionContext>,
) -> Result<AdminResponse, Infallible> {
    let head = RequestHead {
        method: req.method(),
        uri: req.uri(),
        headers: req.headers(),
    };
    if let Err(refusal) = access::check(&context.listener.policy, context.local, &head) {
        warn!(
            listener = %context.listener.name,
            caller = %context.caller,
            method = %req.method(),
            path = req.uri().path(),
            reason = %refusal.reason,
            "admin request refused"
        );
        return Ok(refused(&refusal.reason));
    }
    let state = &context.state;
    let kind = context.listener.policy.kind;
    let path = req.uri().path().to_owned();
    if kind == ListenerKind::HealthOnly && path != "/healthz" && path != "/readyz" {
        return Ok(failure(StatusCode::NOT_FOUND, "not-found", "not found\n"));
    }
    if kind.is_full() && path.starts_with("/v1/acl") {
        return Ok(route_acl(req, &context, &path).await);
    }
    if kind.is_full() && path == "/v1/reload" {
        return Ok(reload(req.method(), &context).await);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(failure(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "method not allowed\n",
        ));
    }
    Ok(read(&path, state))
}

/// The ACL API (`/v1/acl…`) of a full listener; a write is logged with the policy version it
/// left in force.
async fn route_acl(
    req: Request<Incoming>,
    context: &ConnectionContext,
    path: &str,
) -> AdminResponse {
    let state = &context.state;
    let actor = context.caller.actor();
    let method = req.method().clone();
    let Some(response) = crate::acl::api::handle_admin(&state.acl, req, &actor).await else {
        return failure(StatusCode::NOT_FOUND, "not-found", "not found\n");
    };
    if method != Method::GET && method != Method::HEAD {
        info!(
            listener = %context.listener.name,
            caller = %context.caller,
            %method,
            path,
            status = response.status().as_u16(),
            version = state.acl.version(),
            "admin write"
        );
    }
    response
}

/// The read-only endpoints: health, readiness, metrics and status.
fn read(path: &str, state: &NodeState) -> AdminResponse {
    match path {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let readiness = state.readiness();
            if readiness.is_ready() {
                text(StatusCode::OK, "text/plain", "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", readiness.summary()),
                )
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            status::metrics_text(state),
        ),
        "/v1/status" => {
            let body = serde_json::to_vec_pretty(&status::status_json(state)).unwrap_or_default();
            text(StatusCode::OK, "application/json", body)
        }
        _ => failure(StatusCode::NOT_FOUND, "not-found", "not found\n"),
    }
}
