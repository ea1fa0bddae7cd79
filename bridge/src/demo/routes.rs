//! The demo upstream's routes: one function per route, chosen by path alone (any
//! method). Everything a client sends is parsed here; bad input is a 400, never a panic.
//!
//! Bodies are streamed both ways; nothing here buffers a whole request or response.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, TRAILER};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::UPSTREAM_HEADER;
use super::pattern::PatternBody;

/// Response bodies of every route.
pub(crate) type DemoBody = BoxBody<Bytes, Infallible>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Default `/bytes/N` chunk size.
pub(crate) const DEFAULT_CHUNK: usize = 64 * 1024;
/// Largest `?chunk=K` accepted: bigger chunks would only test memory, not streaming.
pub(crate) const MAX_CHUNK: usize = 16 * 1024 * 1024;
/// Longest `/slow?ms=N` accepted (ten minutes).
pub(crate) const MAX_SLOW_MS: u64 = 600_000;
/// How much `/upload-and-drop` reads before dropping the connection.
pub(crate) const DROP_AFTER_BYTES: u64 = 1024;
/// The body `/trailers` sends; its SHA-256 is the `x-checksum` trailer.
pub(crate) const TRAILERS_BODY: &[u8] = b"trailers follow this body\n";
/// The trailer `/trailers` sends.
pub(crate) const CHECKSUM_TRAILER: &str = "x-checksum";

/// Shared by every connection of one upstream.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) name: String,
    pub(crate) hits: AtomicU64,
    pub(crate) cancel: CancellationToken,
}

/// `/upload-and-drop` fails the request on purpose so hyper drops the connection
/// (HTTP/1.1) or resets the stream (HTTP/2) without answering.
#[derive(Debug, thiserror::Error)]
#[error("dropping the connection as /upload-and-drop asks")]
struct DeliberateDrop;

pub(crate) async fn handle(
    state: Arc<State>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<DemoBody>, BoxError> {
    let path = request.uri().path().to_owned();
    if path != "/health" {
        state.hits.fetch_add(1, Ordering::Relaxed);
    }
    let mut response = match path.as_str() {
        "/health" => Ok(text(StatusCode::OK, "ok")),
        "/sha256" => sha256(request).await,
        "/trailers" => Ok(trailers()),
        "/slow" => Ok(slow(&state, request.uri().query()).await),
        "/upload-and-drop" => upload_and_drop(request).await,
        _ => {
            if let Some(count) = path.strip_prefix("/bytes/") {
                Ok(stream_bytes(count, request.uri().query()))
            } else if let Some(code) = path.strip_prefix("/status/") {
                Ok(status(code))
            } else {
                echo(&state, request).await
            }
        }
    }?;
    if let Ok(value) = HeaderValue::from_str(&state.name) {
        response.headers_mut().insert(UPSTREAM_HEADER, value);
    }
    Ok(response)
}

/// Any path without a route of its own: describes the request as JSON.
async fn echo(
    state: &State,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<DemoBody>, BoxError> {
    let (parts, body) = request.into_parts();
    let (body_len, body_sha256) = hash_body(body).await?;
    let mut headers: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let document = json!({
        "upstream": state.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "authority": parts.uri.authority().map(|a| a.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body_len,
        "body_sha256": body_sha256,
    });
    Ok(json_response(StatusCode::OK, &document))
}

/// `/bytes/N[?chunk=K]`: N pattern bytes in K-byte chunks.
fn stream_bytes(count: &str, query: Option<&str>) -> Response<DemoBody> {
    let Ok(len) = count.parse::<u64>() else {
        return bad_request("N in /bytes/N must be a non-negative integer");
    };
    let chunk = match query_param(query, "chunk") {
        None => DEFAULT_CHUNK,
        Some(value) => match value.parse::<usize>() {
            Ok(chunk) if (1..=MAX_CHUNK).contains(&chunk) => chunk,
            _ => return bad_request("chunk must be an integer from 1 to 16777216"),
        },
    };
    let mut response = Response::new(PatternBody::new(len, chunk).boxed());
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // Explicit, because hyper's h2 server omits it for an empty body.
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    response
}

/// `/sha256`: hashes the request body as it streams in.
async fn sha256(request: Request<hyper::body::Incoming>) -> Result<Response<DemoBody>, BoxError> {
    let (len, digest) = hash_body(request.into_body()).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "len": len, "sha256": digest }),
    ))
}

/// `/status/CODE`: that status, with a one-line body where the status allows one.
fn status(code: &str) -> Response<DemoBody> {
    let status = match code
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
    {
        // 1xx are not final answers; refuse them rather than confuse the client.
        Some(status) if status.as_u16() >= 200 && status.as_u16() <= 599 => status,
        _ => return bad_request("CODE in /status/CODE must be an HTTP status from 200 to 599"),
    };
    if matches!(status.as_u16(), 204 | 205 | 304) {
        let mut response = Response::new(Empty::new().boxed());
        *response.status_mut() = status;
        return response;
    }
    text(status, &format!("status {}", status.as_u16()))
}

/// `/trailers`: a fixed body followed by an `x-checksum` trailer (its SHA-256 hex).
/// HTTP/1.1 clients get the trailer only if they sent `TE: trailers` (hyper drops it
/// otherwise), so the `Trailer` header announces it.
fn trailers() -> Response<DemoBody> {
    let mut trailer_map = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&hex::encode(Sha256::digest(TRAILERS_BODY))) {
        trailer_map.insert(HeaderName::from_static(CHECKSUM_TRAILER), value);
    }
    // A stream of unknown length, so HTTP/1.1 answers chunked: a body with a known
    // length would be sent with Content-Length, which leaves no room for trailers.
    let frames = [
        Frame::data(Bytes::from_static(TRAILERS_BODY)),
        Frame::trailers(trailer_map),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames.map(Ok))).boxed();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(TRAILER, HeaderValue::from_static(CHECKSUM_TRAILER));
    response
}

/// `/slow?ms=N`: answers after N milliseconds (server behaviour for timeout tests);
/// a shutdown cuts the wait short with a 503.
async fn slow(state: &State, query: Option<&str>) -> Response<DemoBody> {
    let ms = match query_param(query, "ms").map(str::parse::<u64>) {
        None => 0,
        Some(Ok(ms)) if ms <= MAX_SLOW_MS => ms,
        Some(_) => return bad_request("ms must be an integer from 0 to 600000"),
    };
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(ms)) => {
            text(StatusCode::OK, &format!("slept {ms} ms"))
        }
        () = state.cancel.cancelled() => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
    }
}

/// `/upload-and-drop`: reads up to `DROP_AFTER_BYTES` of the body, then fails the
/// request so the connection (HTTP/1.1) or stream (HTTP/2) is dropped unanswered.
async fn upload_and_drop(
    request: Request<hyper::body::Incoming>,
) -> Result<Response<DemoBody>, BoxError> {
    let mut body = request.into_body();
    let mut read = 0u64;
    while read < DROP_AFTER_BYTES {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    read += data.len() as u64;
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    tracing::debug!(read, "dropping connection on purpose");
    Err(Box::new(DeliberateDrop))
}

/// Streams a body through SHA-256: (length, lowercase hex digest).
async fn hash_body<B>(mut body: B) -> Result<(u64, String), B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            hasher.update(data);
            len += data.len() as u64;
        }
    }
    Ok((len, hex::encode(hasher.finalize())))
}

/// The value of `key` in a query string (`a=1&b=2`), undecoded: the demo's
/// parameters are all integers.
fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find_map(|(k, v)| (k == key).then_some(v))
}

fn text(status: StatusCode, message: &str) -> Response<DemoBody> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn bad_request(reason: &str) -> Response<DemoBody> {
    text(StatusCode::BAD_REQUEST, reason)
}

fn json_response(status: StatusCode, document: &serde_json::Value) -> Response<DemoBody> {
    let mut body = document.to_string().into_bytes();
    body.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn query_params_are_found_by_key() {
        assert_eq!(query_param(Some("ms=5&chunk=7"), "chunk"), Some("7"));
        assert_eq!(query_param(Some("ms=5&chunk=7"), "ms"), Some("5"));
        assert_eq!(query_param(Some("flag&ms=1"), "flag"), Some(""));
        assert_eq!(query_param(Some("ms=5"), "chunk"), None);
        assert_eq!(query_param(None, "ms"), None);
    }
}
