//! The export side: a request stream arrives from a peer node and is answered by a local
//! upstream.
//!
//! Owns the authoritative ACL decision (the caller named in the stream header, qualified by
//! the site in the mTLS certificate of the peer node that vouches for it — never by anything
//! in the frame; the path is made canonical again here, whatever the peer sent), turning
//! frames back into an HTTP request, and streaming the upstream's
//! answer back. Load balancing, health and retries are `upstream`'s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{HeaderValue, Method, Request, Uri};
use tracing::{debug, info};

use super::body;
use super::error::{BridgeError, Reason};
use super::headers;
use super::path::{self, EscapedSlashes, PathError};
use crate::acl::AclService;
use crate::metrics::{Metrics, Side};
use crate::tunnel::exchange::{Direction, Event, Exchange, ExchangeError};
use crate::tunnel::frame::{self, Frame, RequestHead, ResponseHead};
use crate::tunnel::peers::PeerNode;
use crate::tunnel::stream::{RecvHalf, SendHalf, StreamError, codes, encoded};
use crate::upstream::Upstream;

/// Shared state of the export side of a node.
pub struct ExportContext {
    pub(crate) acl: Arc<AclService>,
    /// Exported services by name; swapped whole on reload.
    pub services: ArcSwap<HashMap<String, Arc<Upstream>>>,
    /// Each export's `escaped_slashes`, by name; swapped whole on reload.
    pub(crate) escaped_slashes: ArcSwap<HashMap<String, EscapedSlashes>>,
    pub(crate) metrics: Arc<Metrics>,
}

impl ExportContext {
    /// What `service` does with `%2F`/`%5C` (refuse, the default, for a service not exported).
    fn escaped_slashes(&self, service: &str) -> EscapedSlashes {
        self.escaped_slashes
            .load()
            .get(service)
            .copied()
            .unwrap_or_default()
    }
}

/// Serves one request stream opened by `peer`.
pub(crate) async fn serve_stream(
    mut send: SendHalf,
    mut recv: RecvHalf,
    peer: Arc<PeerNode>,
    ctx: Arc<ExportContext>,
) {
    let peer_id = &peer.id;
    let started = Instant::now();
    let mut receiving = Exchange::new(Direction::Request);
    let mut head = match read_head(&mut recv, &mut receiving).await {
        Ok(Some(head)) => head,
        Ok(None) => return,
        Err(e) => {
            debug!(peer = %peer_id, error = %e, "request stream refused");
            send.reset(codes::PROTOCOL);
            recv.stop(codes::PROTOCOL);
            return;
        }
    };
    let stats = ctx.metrics.service(Side::Export, &head.service);
    let _active = stats.start();
    let bytes_in = Arc::new(AtomicU64::new(0));
    // A request without a body is held open to the end of the exchange, by which time its
    // FIN has arrived: dropped earlier, the stream may be stopped one packet short of it
    // (STOP_SENDING, an extra packet and ACK per request).
    let (body_recv, _held) = if head.end_stream {
        (None, Some(recv))
    } else {
        (Some((recv, receiving)), None)
    };
    // The import node sent its canonical path; this node decides authoritatively, so it makes
    // the path canonical again under its own `escaped_slashes` (a no-op for a canonical
    // path) before the decision, the upstream request and the access log see it.
    let outcome = match canonicalise(&mut head.path, ctx.escaped_slashes(&head.service)) {
        Ok(()) => {
            exchange(
                &mut send,
                body_recv,
                &head,
                &peer.site,
                &ctx,
                &stats,
                bytes_in.clone(),
            )
            .await
        }
        Err(e) => {
            stats.bridge_error(Reason::InvalidPath);
            let status =
                write_error(&mut send, &BridgeError::invalid_path(&e), is_grpc(&head)).await;
            (status, None, "-".to_owned(), 0)
        }
    };
    let (status, endpoint, rule, bytes_out) = outcome;
    let bytes_in = bytes_in.load(Ordering::Relaxed);
    stats.add_bytes(bytes_in, bytes_out);
    stats.responded(status, started.elapsed());
    info!(
        target: "hybridge::access",
        side = "export",
        request_id = %head.request_id,
        caller = %head.caller,
        caller_site = %peer.site,
        peer = %peer_id,
        service = %head.service,
        method = %head.method,
        path = %head.path,
        status,
        upstream = %UpstreamField(endpoint),
        acl_rule = %rule,
        bytes_in,
        bytes_out,
        duration_us = started.elapsed().as_micros() as u64,
    );
    // The handler (which a draining node waits for before closing its tunnels) lasts until
    // the peer holds the whole response: closing throws away unacknowledged bytes, seen as
    // truncated bodies in rolling restarts. Metrics and the access log above do not wait.
    send.delivered().await;
}

/// Why a request stream does not open with a REQUEST head.
#[derive(Debug, thiserror::Error)]
enum HeadError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    #[error("the exchange admitted a first frame that is not a head")]
    NotAHead,
}

/// Reads the REQUEST head a stream opens with; `Ok(None)`: the stream closed before it, which
/// asks for nothing. An error is an unreadable stream or one that broke the exchange.
async fn read_head(
    recv: &mut RecvHalf,
    receiving: &mut Exchange,
) -> Result<Option<Box<RequestHead>>, HeadError> {
    let first = recv.read_frame().await?;
    match (receiving.on(Event::of(first.as_ref())), first) {
        (Ok(_), Some(Frame::Request(head))) => Ok(Some(head)),
        (Err(ExchangeError::EndedBeforeHead(_)), _) => Ok(None),
        (Err(e), _) => Err(e.into()),
        (Ok(_), _) => Err(HeadError::NotAHead),
    }
}

/// Replaces `target` (a frame's `path?query`) by its canonical form.
fn canonicalise(target: &mut String, escaped_slashes: EscapedSlashes) -> Result<(), PathError> {
    let canonical = path::canonical_target(target, escaped_slashes)?;
    if !canonical.is_unchanged() {
        *target = canonical.to_origin_form();
    }
    Ok(())
}

/// Whether the caller speaks gRPC (by content type), so errors are shaped for it.
fn is_grpc(head: &RequestHead) -> bool {
    head.headers
        .iter()
        .any(|(n, v)| n.as_ref() == b"content-type" && v.starts_with(b"application/grpc"))
}

/// The upstream endpoint of an access-log line, `-` for none; formatted only when the
/// line is written (an address formatted per request was 1% of bridge CPU with the access
/// log off).
struct UpstreamField(Option<SocketAddr>);

impl std::fmt::Display for UpstreamField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Runs the exchange; returns the status sent, the upstream endpoint used, the ACL rule and
/// the response body bytes sent. Request body bytes read are counted into `bytes_in`.
async fn exchange(
    send: &mut SendHalf,
    recv: Option<(RecvHalf, Exchange)>,
    head: &RequestHead,
    site: &str,
    ctx: &ExportContext,
    stats: &Arc<crate::metrics::ServiceStats>,
    bytes_in: Arc<AtomicU64>,
) -> (u16, Option<SocketAddr>, String, u64) {
    let grpc = is_grpc(head);
    let path_only = head.path.split('?').next().unwrap_or("/");
    // A caller name is a service name; anything else (`*`, an empty or oversized name) is
    // not a caller the peer can vouch for, whatever a rule would say.
    let caller_valid = head.caller != "*" && crate::acl::model::check_service(&head.caller).is_ok();
    let decision = if caller_valid {
        ctx.acl
            .decide(site, &head.caller, &head.service, &head.method, path_only)
    } else {
        crate::acl::Decision::default_deny()
    };
    let rule = decision.rule_label().to_owned();
    let fail = |e: BridgeError| (e, rule.clone());
    let result = async {
        if !caller_valid {
            return Err(fail(BridgeError::new(
                Reason::AclDenied,
                "the caller named by the peer is not a service name",
            )));
        }
        if !decision.allowed() {
            return Err(fail(BridgeError::new(
                Reason::AclDenied,
                format!("{}@{site} may not call {}", head.caller, head.service),
            )));
        }
        let upstream = ctx
            .services
            .load()
            .get(&head.service)
            .cloned()
            .ok_or_else(|| {
                fail(BridgeError::new(
                    Reason::NoRoute,
                    format!("`{}` is not exported by this node", head.service),
                ))
            })?;
        let request = build_request(head, recv, bytes_in)
            .map_err(|e| fail(BridgeError::new(Reason::BadRequest, e)))?;
        // The caller's deadline counts, like the export's own, from when the request has
        // been sent whole to the upstream, not while its body is still arriving.
        let deadline =
            (head.deadline_ms > 0).then(|| Duration::from_millis(u64::from(head.deadline_ms)));
        let upstream_answer = upstream.send_within(request, deadline);
        // A caller that goes away while the upstream works (its node stops reading the
        // stream) ends the upstream request too, instead of holding it to completion.
        let outcome = tokio::select! {
            biased;
            outcome = upstream_answer => outcome,
            () = send.abandoned_by_peer() => Err(crate::upstream::UpstreamError::ClientAborted {
                detail: "the calling node stopped waiting for the response".into(),
            }),
        };
        outcome.map_err(|e| fail(BridgeError::new(e.reason(), e.to_string())))
    }
    .await;

    match result {
        Ok(answer) => {
            let (status, bytes_out) = relay_response(send, answer.response).await;
            (status, Some(answer.endpoint), rule, bytes_out)
        }
        Err((e, rule)) => {
            stats.bridge_error(e.reason);
            let status = write_error(send, &e, grpc).await;
            (status, None, rule, 0)
        }
    }
}

/// Streams the upstream's response back over the tunnel; returns the status sent and the
/// response body bytes sent.
async fn relay_response(
    send: &mut SendHalf,
    response: http::Response<hyper::body::Incoming>,
) -> (u16, u64) {
    let (mut parts, mut response_body) = response.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    let end_stream = http_body::Body::is_end_stream(&response_body);
    // A small body of known length is awaited before the head is written, so head, body and
    // FIN leave in one packet: written apart, the head went out alone while hyper fetched the
    // body (2 datagrams a response, and 2 for the peer to ACK).
    let first = if !end_stream && holds_small_body(&response_body) {
        Some(http_body_util::BodyExt::frame(&mut response_body).await)
    } else {
        None
    };
    let head = ResponseHead {
        status: parts.status.as_u16(),
        end_stream,
        headers: headers::to_pairs(&parts.headers),
    };
    let status = head.status;
    let Ok(bytes) = encoded(|b| frame::encode_response(&head, b)) else {
        send.reset(codes::CANCELLED);
        return (502, 0);
    };
    if send.write_encoded(bytes).await.is_err() {
        return (status, 0);
    }
    if end_stream {
        send.finish();
        return (status, 0);
    }
    let mut sending = Exchange::after_head(Direction::Response, end_stream);
    let sent = AtomicU64::new(0);
    let pumped = body::pump_to_tunnel(first, response_body, send, &mut sending, &sent);
    if let Err(e) = pumped.await {
        debug!(error = %e, "response body did not reach the tunnel");
    }
    (status, sent.load(Ordering::Relaxed))
}

/// Bodies up to this declared length are awaited whole-or-first-chunk before the head goes
/// out (see `relay_response`); a client cannot use such a head before its body anyway.
const SMALL_RESPONSE: u64 = 64 * 1024;

fn holds_small_body(body: &impl http_body::Body) -> bool {
    body.size_hint()
        .exact()
        .is_some_and(|n| n <= SMALL_RESPONSE)
}

/// Sends a bridge-generated response over the stream and finishes it.
async fn write_error(send: &mut SendHalf, e: &BridgeError, grpc: bool) -> u16 {
    let (status, headers, body) = e.render(grpc);
    let head = ResponseHead {
        status: status.as_u16(),
        end_stream: body.is_empty(),
        headers: headers::to_pairs(&headers),
    };
    if let Ok(bytes) = encoded(|b| frame::encode_response(&head, b))
        && send.write_encoded(bytes).await.is_ok()
        && (body.is_empty() || send.write_data(body).await.is_ok())
    {
        send.finish();
    }
    status.as_u16()
}

/// Rebuilds the caller's request from the stream header; the body streams from `recv`, past
/// the head in its exchange (`None`: the request has no body).
fn build_request(
    head: &RequestHead,
    recv: Option<(RecvHalf, Exchange)>,
    bytes_in: Arc<AtomicU64>,
) -> Result<Request<body::BoxBody>, String> {
    let method = Method::from_bytes(head.method.as_bytes())
        .map_err(|_| format!("invalid method `{}`", head.method))?;
    let uri: Uri = head
        .path
        .parse()
        .map_err(|_| format!("invalid path `{}`", head.path))?;
    let mut headers = headers::from_pairs(head.headers.clone())?;
    headers::remove_untrusted(&mut headers);
    if !headers.contains_key(http::header::HOST) && !head.authority.is_empty() {
        let host =
            HeaderValue::from_str(&head.authority).map_err(|_| "invalid authority".to_owned())?;
        headers.insert(http::header::HOST, host);
    }
    let body = match recv {
        Some((recv, receiving)) => body::from_tunnel(recv, receiving, (), bytes_in),
        None => body::empty(),
    };
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}
