//! Import listeners: where local callers enter the bridge (HTTP/1.1, h2c, or TLS with ALPN).
//!
//! Owns: who the caller is (listener binding or service certificate, never a header), which
//! service is meant (listener binding or Host = `SERVICE.SUFFIX`), making the path canonical
//! (`path`), the early ACL check on it, choosing a tunnel link and streaming the exchange over
//! it. It does not talk to upstreams.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::body::{self, BoxBody};
use super::error::{BridgeError, Reason, is_grpc};
use super::headers;
use super::path::{self, EscapedSlashes};
use crate::acl::AclService;
use crate::config::CallerIdentity;
use crate::listener::{AcceptedConnection, ConnectionActivity, ListenerLimits};
use crate::metrics::{Metrics, Side};
use crate::tunnel::exchange::{Direction, Event, Exchange, ExchangeError};
use crate::tunnel::frame::{self, Frame, RequestHead, ResponseHead};
use crate::tunnel::peers::{PeerLink, PeerSet, StreamGuard};
use crate::tunnel::serving::ServingPolicy;
use crate::tunnel::stream::{RecvHalf, SendHalf, StreamError, codes, encoded};

/// What a listener forwards to.
#[derive(Clone, Debug)]
pub(crate) enum ListenerTarget {
    /// One remote service per port.
    Service(String),
    /// Any remote service, chosen by `Host: SERVICE.SUFFIX`.
    Gateway { suffix: String },
}

/// A configured import listener.
pub(crate) struct ListenerSpec {
    pub(crate) target: ListenerTarget,
    pub(crate) caller: CallerIdentity,
    /// TLS for `mtls` listeners (client certificate required); swapped on reload.
    pub(crate) tls: arc_swap::ArcSwapOption<rustls::ServerConfig>,
    /// Read per connection and per request; swapped on reload.
    pub(crate) settings: arc_swap::ArcSwap<ListenerSettings>,
    /// Open-connection cap and idle timeout, shared by the workers accepting on the port.
    pub(crate) limits: Arc<ListenerLimits>,
}

/// The settings of a listener a reload may change while it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ListenerSettings {
    /// Deadline for the response head.
    pub(crate) request_timeout: Option<Duration>,
    /// Largest request header block (431 beyond it); new connections get parser limits to
    /// match.
    pub(crate) max_header_bytes: usize,
    /// Whether `%2F`/`%5C` in a path is refused or kept.
    pub(crate) escaped_slashes: EscapedSlashes,
}

/// Shared state of all import listeners of a node.
pub(crate) struct ImportContext {
    pub(crate) peers: Arc<PeerSet>,
    /// Which peers may serve which services; requests go only to those.
    pub(crate) serving: Arc<ServingPolicy>,
    /// The certificate checks in force; a caller whose certificate stops passing them
    /// (revoked by a reloaded CRL, expired) loses its connection.
    pub(crate) trust: tokio::sync::watch::Receiver<Arc<crate::trust::Trust>>,
    pub(crate) acl: Arc<AclService>,
    /// This node's site: the site every local caller is qualified by.
    pub(crate) site: Arc<str>,
    pub(crate) metrics: Arc<Metrics>,
    /// Tracks request-body pumps so draining waits for them.
    pub(crate) tasks: TaskTracker,
}

/// Per-connection facts.
struct ConnectionInfo {
    client: SocketAddr,
    caller: Arc<str>,
    proto: &'static str,
    /// Requests in flight on the connection, for its idle timeout.
    activity: Arc<ConnectionActivity>,
}

/// Accepts connections on `listener` until `shutdown` fires, then lets open connections
/// finish their in-flight requests (HTTP/2 GOAWAY, HTTP/1.1 close after the response).
pub(crate) async fn serve(
    listener: TcpListener,
    spec: Arc<ListenerSpec>,
    ctx: Arc<ImportContext>,
    shutdown: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut max_header_bytes = spec.settings.load().max_header_bytes;
    let mut builder = connection_builder(max_header_bytes);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = spec.limits.accept(&listener) => accepted,
        };
        let _ = accepted.stream.set_nodelay(true);
        // A reloaded header limit applies to the parsers of connections accepted from now on.
        let configured = spec.settings.load().max_header_bytes;
        if configured != max_header_bytes {
            max_header_bytes = configured;
            builder = connection_builder(max_header_bytes);
        }
        let (spec, ctx, builder, watcher) = (
            spec.clone(),
            ctx.clone(),
            builder.clone(),
            graceful.watcher(),
        );
        let trust = ctx.trust.clone();
        ctx.tasks.clone().spawn(serve_connection(
            accepted, spec, ctx, builder, watcher, trust,
        ));
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Serves one accepted connection until it closes, goes idle, the listener shuts down or
/// (mTLS) its caller's certificate stops being trusted.
async fn serve_connection(
    accepted: AcceptedConnection,
    spec: Arc<ListenerSpec>,
    ctx: Arc<ImportContext>,
    builder: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    trust: tokio::sync::watch::Receiver<Arc<crate::trust::Trust>>,
) {
    let AcceptedConnection {
        stream,
        peer: client,
        permit,
    } = accepted;
    // The connection's place under the listener's cap, until the task ends.
    let _permit = permit;
    let Some(IdentifiedConnection { caller, proto, io }) =
        identify_caller(stream, client, &spec).await
    else {
        return;
    };
    let activity = Arc::new(ConnectionActivity::default());
    let info = Arc::new(ConnectionInfo {
        client,
        caller,
        proto,
        activity: activity.clone(),
    });
    let limits = spec.limits.clone();
    let idle = limits.idle(&activity);
    let service =
        hyper::service::service_fn(move |req| handle(req, info.clone(), spec.clone(), ctx.clone()));
    let served = async {
        match io {
            Io::Plain(s) => {
                watcher
                    .watch(
                        builder
                            .serve_connection(TokioIo::new(s), service)
                            .into_owned(),
                    )
                    .await
            }
            Io::Tls(s) => {
                let untrusted = caller_trust_lost(&s, trust);
                let served = watcher.watch(
                    builder
                        .serve_connection(TokioIo::new(s), service)
                        .into_owned(),
                );
                tokio::select! {
                    result = served => result,
                    why = untrusted => {
                        // Dropping the connection closes it, in-flight requests included:
                        // the caller is no longer who the policy allowed.
                        warn!(%client, reason = %why, "closing an mTLS import connection: the caller's certificate is no longer trusted");
                        Ok(())
                    }
                }
            }
        }
    };
    // A connection with no request in flight for the idle timeout is dropped, which
    // closes it: an idle keep-alive, or one that never sent a whole request.
    let result = tokio::select! {
        result = served => result,
        () = idle => Ok(()),
    };
    if let Err(e) = result {
        debug!(%client, error = %e, "import connection ended with an error");
    }
}

/// Resolves with the reason once the certificate the caller of `tls` presented stops
/// passing the trust in force.
fn caller_trust_lost(
    tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    trust: tokio::sync::watch::Receiver<Arc<crate::trust::Trust>>,
) -> impl std::future::Future<Output = String> + use<> {
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    crate::trust::lost(
        trust,
        chain,
        crate::trust::PeerKind::Service,
        hybridge_ca::tls::PeerRole::Client,
    )
}

/// A connection whose caller is known, ready to be served.
struct IdentifiedConnection {
    /// The service identity requests on it are made as.
    caller: Arc<str>,
    /// `http` or `https`, for the forwarded headers.
    proto: &'static str,
    io: Io,
}

/// Finishes the TLS handshake of a TLS listener's connection and names its caller: the
/// listener's fixed caller, or (mTLS) the service in the client certificate. `None` (logged)
/// when the connection is refused.
async fn identify_caller(
    stream: tokio::net::TcpStream,
    client: SocketAddr,
    spec: &ListenerSpec,
) -> Option<IdentifiedConnection> {
    let tls = spec.tls.load_full();
    let (caller, proto, io): (Arc<str>, &'static str, _) = match (&tls, &spec.caller) {
        (None, CallerIdentity::Fixed(name)) => {
            (Arc::from(name.as_str()), "http", Io::Plain(stream))
        }
        (Some(tls), _) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            let tls_stream = match tokio::time::timeout(
                Duration::from_secs(10),
                acceptor.accept(stream),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    info!(%client, error = %e, "import TLS handshake refused");
                    return None;
                }
                Err(_) => {
                    info!(%client, "import TLS handshake timed out");
                    return None;
                }
            };
            let caller = match (&spec.caller, caller_from_certificate(&tls_stream)) {
                (CallerIdentity::Fixed(name), _) => Arc::from(name.as_str()),
                (CallerIdentity::Mtls, Ok(name)) => Arc::from(name.as_str()),
                (CallerIdentity::Mtls, Err(e)) => {
                    info!(%client, error = %e, "import caller certificate is not a service identity");
                    return None;
                }
            };
            (caller, "https", Io::Tls(Box::new(tls_stream)))
        }
        (None, CallerIdentity::Mtls) => {
            warn!("mtls listener without TLS configuration; refusing connection");
            return None;
        }
    };
    Some(IdentifiedConnection { caller, proto, io })
}

/// The HTTP/1.1 and HTTP/2 server settings of a listener's connections.
fn connection_builder(
    max_header_bytes: usize,
) -> Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024)
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(8 * 1024 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    Arc::new(builder)
}

enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

fn caller_from_certificate(
    tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Result<String, String> {
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no client certificate")?;
    let leaf = certs.first().ok_or("empty client certificate chain")?;
    match hybridge_ca::tls::peer_spiffe_id(leaf).map_err(|e| e.to_string())? {
        hybridge_ca::spiffe::SpiffeId::Service { name, .. } => Ok(name),
        other => Err(format!("{other} is not a service identity")),
    }
}

/// Serves one request: settles its path, host and service, forwards it and answers,
/// counting and logging it whatever the outcome.
async fn handle(
    req: Request<Incoming>,
    info: Arc<ConnectionInfo>,
    spec: Arc<ListenerSpec>,
    ctx: Arc<ImportContext>,
) -> Result<Response<BoxBody>, Infallible> {
    let started = Instant::now();
    let _in_flight = info.activity.request();
    let grpc = is_grpc(req.headers());
    let method = req.method().clone();
    let (mut parts, body) = req.into_parts();
    // The one canonical path: the ACL pre-check, the frame (so the export's decision and
    // the upstream request) and the access log all see it. A refused target stays as sent.
    // One reading of the settings for the whole request, even across a reload.
    let settings = spec.settings.load_full();
    let canonical = path::canonicalise_uri(&mut parts.uri, settings.escaped_slashes);
    let path = parts.uri.path().to_owned();
    // The body stays here until the request is really forwarded; a refused request's body
    // is drained after the answer (see `linger`).
    let mut body = Some(body);
    let expects_continue = parts.headers.contains_key(http::header::EXPECT);
    let mut parts = parts;
    let service =
        match reconcile_host(&mut parts).and_then(|()| resolve_service(&spec.target, &parts)) {
            Ok(s) => s,
            Err(e) => {
                linger(expects_continue, body, &ctx.tasks);
                return Ok(refuse_unresolved(
                    &e,
                    grpc,
                    started,
                    &spec.target,
                    &ctx.metrics,
                ));
            }
        };
    let stats = service_stats(&spec.target, &ctx, &service);
    let active = stats.start();
    let mut unanswered = Unanswered {
        stats: &stats,
        started,
        info: &info,
        site: &ctx.site,
        service: &service,
        method: &method,
        path: &path,
        answered: false,
    };
    let outcome = match canonical {
        Ok(()) => forward(parts, &mut body, &info, &settings, &ctx, &service, &stats).await,
        Err(e) => Err((BridgeError::invalid_path(&e), None)),
    };
    unanswered.answered();
    linger(expects_continue, body, &ctx.tasks);
    drop(active);
    let (response, request_id) = match outcome {
        Ok((response, id)) => (response, Some(id)),
        Err((e, id)) => {
            stats.bridge_error(e.reason);
            (render(&e, grpc, id.as_deref()), id)
        }
    };
    stats.responded(response.status().as_u16(), started.elapsed());
    log_access(&unanswered, request_id.as_deref(), &response);
    Ok(response)
}

/// Counts and renders the refusal of a request whose service could not be told.
fn refuse_unresolved(
    e: &BridgeError,
    grpc: bool,
    started: Instant,
    target: &ListenerTarget,
    metrics: &Metrics,
) -> Response<BoxBody> {
    // A listener bound to a service counts under it; a gateway that could not
    // tell the service counts with every other name this node does not know.
    let stats = match target {
        ListenerTarget::Service(service) => metrics.service(Side::Import, service),
        ListenerTarget::Gateway { .. } => {
            metrics.service(Side::Import, crate::metrics::UNKNOWN_SERVICE)
        }
    };
    stats.bridge_error(e.reason);
    stats.responded(e.status().as_u16(), started.elapsed());
    render(e, grpc, None)
}

/// The stats a request for `service` is counted under.
fn service_stats(
    target: &ListenerTarget,
    ctx: &ImportContext,
    service: &str,
) -> Arc<crate::metrics::ServiceStats> {
    // Series only for configured services: a gateway's services are those its policy names
    // (operator-controlled); a made-up host shares the `unknown` series.
    match target {
        ListenerTarget::Service(_) => ctx.metrics.service(Side::Import, service),
        ListenerTarget::Gateway { .. } => ctx.metrics.service_if(Side::Import, service, || {
            ctx.acl.snapshot().names_destination(service)
        }),
    }
}

/// Writes the access-log line of an answered request.
fn log_access(request: &Unanswered<'_>, request_id: Option<&str>, response: &Response<BoxBody>) {
    let (info, service, method, path) =
        (request.info, request.service, request.method, request.path);
    info!(
        target: "hybridge::access",
        side = "import",
        request_id = request_id.unwrap_or("-"),
        caller = &*info.caller,
        caller_site = request.site,
        client = %info.client,
        service = %service,
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        bridge_error = response.headers().get(headers::ERROR_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-"),
        duration_us = request.started.elapsed().as_micros() as u64,
    );
}

/// Logs and counts a request whose caller went away before it was answered: hyper drops the
/// handler future on `RST_STREAM` or a closed connection, and the request would otherwise
/// leave no access-log line and no metric. Recorded as nginx's 499 `client-aborted`.
struct Unanswered<'a> {
    stats: &'a Arc<crate::metrics::ServiceStats>,
    started: Instant,
    info: &'a ConnectionInfo,
    site: &'a str,
    service: &'a str,
    method: &'a http::Method,
    path: &'a str,
    answered: bool,
}

impl Unanswered<'_> {
    /// The request got an answer (of any kind); nothing to record on drop.
    fn answered(&mut self) {
        self.answered = true;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let status = Reason::ClientAborted.status().as_u16();
        self.stats.bridge_error(Reason::ClientAborted);
        self.stats.responded(status, self.started.elapsed());
        info!(
            target: "hybridge::access",
            side = "import",
            request_id = "-",
            caller = &*self.info.caller,
            caller_site = self.site,
            client = %self.info.client,
            service = self.service,
            method = %self.method,
            path = self.path,
            status,
            bridge_error = Reason::ClientAborted.as_str(),
            duration_us = self.started.elapsed().as_micros() as u64,
        );
    }
}

/// At most this much of a refused request's body is read and discarded.
const LINGER_BYTES: u64 = 1024 * 1024;
/// For at most this long.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// nginx's "lingering close" for a request refused before its body was read (403, 404, 431,
/// 503…): closing a socket with unread bytes makes the kernel send a reset, and a client that
/// writes its whole body before reading would see "connection reset" instead of our answer.
/// So the rest of the body is read and discarded after the answer — up to `LINGER_BYTES` and
/// `LINGER_TIME`; the connection then stays usable. Larger bodies are not waited for.
/// `body` is `None` when the request was forwarded (its body went with it).
fn linger(expects_continue: bool, body: Option<Incoming>, tasks: &TaskTracker) {
    let Some(mut body) = body else { return };
    // A client waiting for `100 Continue` has not sent its body: reading it would ask for it.
    if expects_continue || http_body::Body::is_end_stream(&body) {
        return;
    }
    if http_body::Body::size_hint(&body)
        .exact()
        .is_some_and(|len| len > LINGER_BYTES)
    {
        return;
    }
    tasks.spawn(async move {
        let drain = async {
            let mut read = 0u64;
            while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

fn render(e: &BridgeError, grpc: bool, request_id: Option<&str>) -> Response<BoxBody> {
    let (status, mut headers, body) = e.render(grpc);
    if let Some(id) = request_id.and_then(|id| http::HeaderValue::from_str(id).ok()) {
        headers.insert(headers::REQUEST_ID, id);
    }
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Makes the host a request is routed and decided on the one it is forwarded with. Two
/// `Host` headers are refused (RFC 9112 §3.2). An HTTP/1.1 absolute-form target names the
/// host and its `Host` header is replaced (RFC 9112 §3.2.2: the server ignores the received
/// one); an HTTP/2 request whose `host` header differs from `:authority` is malformed (RFC
/// 9113 §8.3.1) and refused. Otherwise a gateway would route on one host while an upstream
/// behind a host-routing ingress served the other.
fn reconcile_host(req: &mut http::request::Parts) -> Result<(), BridgeError> {
    let refuse = |detail: String| BridgeError::new(Reason::BadRequest, detail);
    if req
        .headers
        .get_all(http::header::HOST)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(refuse("more than one Host header".into()));
    }
    let Some(authority) = req.uri.authority().filter(|_| req.uri.scheme().is_some()) else {
        return Ok(());
    };
    let differs = req.headers.get(http::header::HOST).is_some_and(|host| {
        !host
            .as_bytes()
            .eq_ignore_ascii_case(authority.as_str().as_bytes())
    });
    if req.version == http::Version::HTTP_2 {
        if differs {
            return Err(refuse(format!(
                "the host header names another host than :authority {authority}"
            )));
        }
        return Ok(());
    }
    if let Ok(value) = http::HeaderValue::from_str(authority.as_str()) {
        req.headers.insert(http::header::HOST, value);
    }
    Ok(())
}

/// Which remote service a request is for.
fn resolve_service(
    target: &ListenerTarget,
    req: &http::request::Parts,
) -> Result<String, BridgeError> {
    match target {
        ListenerTarget::Service(s) => Ok(s.clone()),
        ListenerTarget::Gateway { suffix } => {
            let host = req
                .uri
                .host()
                .or_else(|| {
                    req.headers
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                })
                .unwrap_or_default();
            service_from_host(host, suffix).ok_or_else(|| {
                BridgeError::new(
                    Reason::UnknownHost,
                    format!(
                        "host `{host}` is not SERVICE.{suffix}; the gateway routes by host name"
                    ),
                )
            })
        }
    }
}

/// `billing.hybridge:8080` with suffix `hybridge` → `billing`.
pub(crate) fn service_from_host(host: &str, suffix: &str) -> Option<String> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let service = host.strip_suffix(suffix)?.strip_suffix('.')?;
    crate::acl::model::check_service_name(service)
        .is_ok()
        .then(|| service.to_owned())
}

type Failure = (BridgeError, Option<String>);

/// Forwards the request; takes the body out of `body` only once the request is on its way,
/// so a refused request leaves it for `linger`.
async fn forward(
    mut parts: http::request::Parts,
    body: &mut Option<Incoming>,
    info: &ConnectionInfo,
    settings: &ListenerSettings,
    ctx: &ImportContext,
    service: &str,
    stats: &Arc<crate::metrics::ServiceStats>,
) -> Result<(Response<BoxBody>, String), Failure> {
    if headers::header_block_size(&parts.headers) > settings.max_header_bytes {
        return Err((
            BridgeError::new(
                Reason::HeadersTooLarge,
                format!("request headers exceed {} bytes", settings.max_header_bytes),
            ),
            None,
        ));
    }
    let request_id = headers::prepare_request(&mut parts.headers, info.client.ip(), info.proto);
    let fail = |e: BridgeError| (e, Some(request_id.clone()));
    // Early check with the local snapshot: a denied request never crosses the boundary.
    // The export node decides again, authoritatively.
    check_acl(&parts, info, ctx, service).map_err(fail)?;
    let may_serve = |link: &PeerLink| ctx.serving.permits(service, link.site());
    let (mut in_flight, mut send) = open_on_route(ctx, service, &may_serve)
        .await
        .map_err(fail)?;
    let Some(mut body) = body.take() else {
        return Err(fail(BridgeError::new(
            Reason::Internal,
            "request body already taken",
        )));
    };
    let end_stream = http_body::Body::is_end_stream(&body);
    let head = request_head(&parts, info, settings, service, &request_id, end_stream);
    let encoded_head = encoded(|b| frame::encode_request(&head, b))
        .map_err(|e| fail(BridgeError::new(Reason::HeadersTooLarge, e.to_string())))?;
    send.write_encoded(encoded_head.clone())
        .await
        .map_err(|e| fail(BridgeError::new(Reason::TunnelStreamFailed, e.to_string())))?;

    let mut sending = Exchange::after_head(Direction::Request, end_stream);
    let request_bytes = Arc::new(AtomicU64::new(0));
    let start = send_ready_body(
        end_stream,
        &mut body,
        &mut send,
        &mut sending,
        &request_bytes,
    )
    .await;
    // The request timeout starts once the whole request is in the tunnel: the time a slow
    // upload takes is the export's `request_body_idle_timeout`'s to bound.
    let body_sent = if start.done {
        stats.add_bytes(request_bytes.load(std::sync::atomic::Ordering::Relaxed), 0);
        None
    } else {
        let pump = BodyPump {
            body,
            send,
            sending,
        };
        Some(pump.spawn(&request_bytes, stats, &ctx.tasks))
    };
    let expired = request_deadline(settings.request_timeout, body_sent);
    let replay = start.replay.map(|body| Replay {
        head: encoded_head,
        body,
    });
    let first = await_answer(&mut in_flight, ctx, service, &may_serve, replay, expired)
        .await
        .map_err(fail)?;
    let response = into_response(first, in_flight, info, stats).map_err(fail)?;
    Ok((response, request_id))
}

/// Opens a tunnel stream for the request on a link `ctx.peers` routes `service` to.
async fn open_on_route(
    ctx: &ImportContext,
    service: &str,
    may_serve: &(dyn Fn(&PeerLink) -> bool + Sync),
) -> Result<(InFlight, SendHalf), BridgeError> {
    let Some((link, guard)) = ctx.peers.route(service, may_serve) else {
        return Err(BridgeError::new(
            Reason::NoRoute,
            format!("no connected peer of a site allowed to serve `{service}` exports it"),
        ));
    };
    // Anything that arrives on the link after this point may acknowledge the request.
    let heard_before = link.connection.received();
    let (send, recv) = link.connection.open_stream().await.map_err(|e| {
        BridgeError::new(
            Reason::TunnelUnavailable,
            format!("opening a tunnel stream failed: {e}"),
        )
    })?;
    let in_flight = InFlight {
        link,
        guard,
        recv,
        heard_before,
    };
    Ok((in_flight, send))
}

/// The early ACL decision on the request, with the local snapshot.
fn check_acl(
    parts: &http::request::Parts,
    info: &ConnectionInfo,
    ctx: &ImportContext,
    service: &str,
) -> Result<(), BridgeError> {
    let decision = ctx.acl.decide(
        &ctx.site,
        &info.caller,
        service,
        parts.method.as_str(),
        parts.uri.path(),
    );
    if !decision.allowed() {
        return Err(BridgeError::new(
            Reason::AclDenied,
            format!("{}@{} may not call {service}", info.caller, ctx.site),
        ));
    }
    Ok(())
}

/// The REQUEST head that opens the request's tunnel stream.
fn request_head(
    parts: &http::request::Parts,
    info: &ConnectionInfo,
    settings: &ListenerSettings,
    service: &str,
    request_id: &str,
    end_stream: bool,
) -> RequestHead {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    RequestHead {
        service: service.to_owned(),
        end_stream,
        caller: info.caller.to_string(),
        request_id: request_id.to_owned(),
        deadline_ms: settings
            .request_timeout
            .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
        method: parts.method.as_str().to_owned(),
        authority,
        path,
        version: match parts.version {
            http::Version::HTTP_10 => 10,
            http::Version::HTTP_2 => 20,
            _ => 11,
        },
        headers: headers::to_pairs(&parts.headers),
    }
}

/// A request on its way: the link and stream it went out on, and how much had been heard on
/// the link before (anything heard after may be the peer acknowledging it).
struct InFlight {
    link: Arc<PeerLink>,
    /// Keeps the tunnel stream counted on its link.
    guard: StreamGuard,
    recv: RecvHalf,
    heard_before: u64,
}

/// A request that went out whole, so it can be sent again: its encoded head and its body.
struct Replay {
    head: Bytes,
    body: Bytes,
}

/// How much of the request body went out right behind its head.
struct BodyStart {
    /// The whole body is in the tunnel (or failed to get there): no pump task is needed.
    done: bool,
    /// The whole body, when it had arrived whole and may be sent again on another link.
    replay: Option<Bytes>,
}

/// Sends the body behind the head when it is already whole: a small body that has arrived
/// goes out without a pump task. A request whose body had arrived whole when it was sent
/// (most API calls) can be sent again if its link goes silent before the peer acknowledged
/// it.
async fn send_ready_body(
    end_stream: bool,
    body: &mut Incoming,
    send: &mut SendHalf,
    sending: &mut Exchange,
    request_bytes: &AtomicU64,
) -> BodyStart {
    if end_stream {
        send.finish();
        return BodyStart {
            done: true,
            replay: Some(Bytes::new()),
        };
    }
    let Some(first) =
        futures_util::FutureExt::now_or_never(http_body_util::BodyExt::frame(&mut *body))
    else {
        return BodyStart {
            done: false,
            replay: None,
        };
    };
    let whole = match &first {
        None => Some(Bytes::new()),
        Some(Ok(frame)) if http_body::Body::is_end_stream(&*body) => frame.data_ref().cloned(),
        Some(_) => None,
    };
    match body::forward_frame(first, &*body, send, sending, request_bytes).await {
        Ok(body::Forwarded::More) => BodyStart {
            done: false,
            replay: None,
        },
        Ok(body::Forwarded::End) => BodyStart {
            done: true,
            replay: whole,
        },
        Err(e) => {
            debug!(error = %e, "request body did not reach the tunnel");
            BodyStart {
                done: true,
                replay: None,
            }
        }
    }
}

/// The rest of a request body still arriving from the caller, and the stream it goes to.
struct BodyPump {
    body: Incoming,
    send: SendHalf,
    sending: Exchange,
}

impl BodyPump {
    /// Streams the body into the tunnel on a tracked task while the answer is awaited;
    /// the returned receiver resolves (or fails) once the body is in or has failed.
    fn spawn(
        self,
        request_bytes: &Arc<AtomicU64>,
        stats: &Arc<crate::metrics::ServiceStats>,
        tasks: &TaskTracker,
    ) -> tokio::sync::oneshot::Receiver<()> {
        let (sent, body_sent) = tokio::sync::oneshot::channel::<()>();
        let request_bytes = request_bytes.clone();
        let stats = stats.clone();
        let Self {
            body,
            mut send,
            mut sending,
        } = self;
        tasks.spawn(async move {
            let mut body = body;
            let pumped =
                body::pump_to_tunnel(None, &mut body, &mut send, &mut sending, &request_bytes);
            if let Err(e) = pumped.await {
                debug!(error = %e, "request body did not reach the tunnel");
            }
            // A failed body also starts the clock (dropping `sent` does): the answer, an
            // error, is due all the same.
            let _ = sent.send(());
            stats.add_bytes(request_bytes.load(std::sync::atomic::Ordering::Relaxed), 0);
        });
        body_sent
    }
}

/// Resolves with the request timeout once it has passed since the whole request went into
/// the tunnel (`body_sent`, when the body was still streaming); never without a timeout.
async fn request_deadline(
    limit: Option<Duration>,
    body_sent: Option<tokio::sync::oneshot::Receiver<()>>,
) -> Duration {
    match limit {
        Some(limit) => {
            if let Some(body_sent) = body_sent {
                let _ = body_sent.await;
            }
            tokio::time::sleep(limit).await;
            limit
        }
        None => std::future::pending().await,
    }
}

/// Waits for the first frame of the answer. A link that goes silent meanwhile is not waited
/// on until the idle timeout: a request the peer cannot have acknowledged (nothing arrived on
/// the link since it was sent) and that can be sent again (`replay`: the request as it
/// went out) goes to another link; any other fails now with the reason. Only a request
/// sent whole is sent again, so `expired` (which waits for the end of a streamed body) is
/// waited on once.
async fn await_answer(
    in_flight: &mut InFlight,
    ctx: &ImportContext,
    service: &str,
    may_serve: &(dyn Fn(&PeerLink) -> bool + Sync),
    replay: Option<Replay>,
    expired: impl std::future::Future<Output = Duration>,
) -> Result<Result<Option<Frame>, StreamError>, BridgeError> {
    tokio::pin!(expired);
    let mut retries = 0;
    loop {
        tokio::select! {
            biased;
            first = in_flight.recv.read_frame() => return Ok(first),
            limit = &mut expired => {
                in_flight.recv.stop(codes::CANCELLED);
                return Err(BridgeError::new(
                    Reason::Timeout,
                    format!("no response within {limit:?} of the request being sent"),
                ));
            }
            () = in_flight.link.went_silent() => {}
        }
        in_flight.recv.stop(codes::CANCELLED);
        let unacknowledged = in_flight.link.connection.received() == in_flight.heard_before;
        let retry = match (&replay, unacknowledged) {
            (Some(whole), true) if retries < MAX_SILENT_RETRIES => ctx
                .peers
                .reroute(service, may_serve, in_flight.link.id())
                .map(|next| (whole, next)),
            _ => None,
        };
        let Some((whole, (next, next_guard))) = retry else {
            let why = if !unacknowledged {
                "the request may have reached it, so it is not sent again"
            } else if replay.is_none() {
                "its body was streaming, so it cannot be sent again"
            } else {
                "no other link can take it"
            };
            return Err(BridgeError::new(
                Reason::TunnelStreamFailed,
                format!(
                    "nothing heard from peer {} for over a keepalive interval; {why}",
                    in_flight.link.peer
                ),
            ));
        };
        retries += 1;
        ctx.metrics.tunnel_retried();
        debug!(from = %in_flight.link.peer, to = %next.peer, retries, "link went silent before the peer acknowledged the request; sending it again");
        (in_flight.link, in_flight.guard) = (next, next_guard);
        in_flight.heard_before = in_flight.link.connection.received();
        // The request went out whole: its sending half has nothing left to do.
        (_, in_flight.recv) =
            resend(&in_flight.link, whole.head.clone(), whole.body.clone()).await?;
    }
}

/// The caller's response from the answer's first frame; its body streams from the tunnel
/// and keeps the stream counted until done.
fn into_response(
    first: Result<Option<Frame>, StreamError>,
    in_flight: InFlight,
    info: &ConnectionInfo,
    stats: &Arc<crate::metrics::ServiceStats>,
) -> Result<Response<BoxBody>, BridgeError> {
    let mut receiving = Exchange::new(Direction::Response);
    let head = response_head(first, &mut receiving)?;
    let mut response_headers = headers::from_pairs(head.headers)
        .map_err(|e| BridgeError::new(Reason::TunnelProtocol, e))?;
    headers::remove_hop_by_hop(&mut response_headers);
    let status = StatusCode::from_u16(head.status)
        .map_err(|_| BridgeError::new(Reason::TunnelProtocol, "invalid status"))?;
    let response_bytes = Arc::new(AtomicU64::new(0));
    // The response body keeps the tunnel stream counted, reports its bytes when done, and
    // keeps the caller's connection from being idle while it streams.
    let keep = (
        in_flight.guard,
        ByteReport {
            stats: stats.clone(),
            bytes: response_bytes.clone(),
        },
        info.activity.request(),
    );
    let response_body = if head.end_stream {
        body::empty()
    } else {
        body::from_tunnel(in_flight.recv, receiving, keep, response_bytes)
    };
    let mut response = Response::new(response_body);
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    Ok(response)
}

/// The RESPONSE head an answer opens with, its first frame checked against `receiving`.
fn response_head(
    first: Result<Option<Frame>, StreamError>,
    receiving: &mut Exchange,
) -> Result<ResponseHead, BridgeError> {
    let first = first.map_err(|e| BridgeError::new(Reason::TunnelStreamFailed, e.to_string()))?;
    match (receiving.on(Event::of(first.as_ref())), first) {
        (Ok(_), Some(Frame::Response(head))) => Ok(head),
        (Err(ExchangeError::EndedBeforeHead(_)), _) => Err(BridgeError::new(
            Reason::TunnelStreamFailed,
            "peer closed the stream without answering",
        )),
        (Err(e), _) => Err(BridgeError::new(
            Reason::TunnelProtocol,
            format!("peer answered with an unexpected frame: {e}"),
        )),
        (Ok(_), _) => Err(BridgeError::new(
            Reason::TunnelProtocol,
            "peer answered with an unexpected frame",
        )),
    }
}

/// How many times a request that never reached its peer is sent again on another link.
const MAX_SILENT_RETRIES: u32 = 2;

/// Sends a request whose body arrived whole on a fresh stream of `link`.
async fn resend(
    link: &crate::tunnel::peers::PeerLink,
    head: Bytes,
    body: Bytes,
) -> Result<(SendHalf, RecvHalf), BridgeError> {
    let (mut send, recv) = link.connection.open_stream().await.map_err(|e| {
        BridgeError::new(
            Reason::TunnelUnavailable,
            format!("opening a tunnel stream failed: {e}"),
        )
    })?;
    let write = |e: crate::tunnel::stream::StreamError| {
        BridgeError::new(Reason::TunnelStreamFailed, e.to_string())
    };
    send.write_encoded(head).await.map_err(write)?;
    if !body.is_empty() {
        send.write_data(body).await.map_err(write)?;
    }
    send.finish();
    Ok((send, recv))
}

/// Adds the response body's byte count to the service stats when the body is done.
struct ByteReport {
    stats: Arc<crate::metrics::ServiceStats>,
    bytes: Arc<AtomicU64>,
}

impl Drop for ByteReport {
    fn drop(&mut self) {
        self.stats
            .add_bytes(0, self.bytes.load(std::sync::atomic::Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::service_from_host;

    #[test]
    fn gateway_host_routing() {
        assert_eq!(
            service_from_host("billing.hybridge", "hybridge").as_deref(),
            Some("billing")
        );
        assert_eq!(
            service_from_host("Billing.Hybridge:8080", "hybridge").as_deref(),
            Some("billing")
        );
        assert_eq!(
            service_from_host("billing.svc.corp.", "svc.corp").as_deref(),
            Some("billing")
        );
        assert_eq!(service_from_host("hybridge", "hybridge"), None);
        assert_eq!(service_from_host("billing.example.com", "hybridge"), None);
        assert_eq!(service_from_host("127.0.0.1:80", "hybridge"), None);
    }
}
