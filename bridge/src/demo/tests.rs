//! Tests of the demo upstream through real sockets: a real `DemoUpstream` on port 0,
//! real hyper clients speaking HTTP/1.1 and h2c, exact bodies, headers and trailers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{DemoUpstream, UPSTREAM_HEADER, pattern_byte};

type ClientBody = BoxBody<Bytes, Infallible>;

const VERSIONS: [Version; 2] = [Version::HTTP_11, Version::HTTP_2];

/// A started upstream and the token that stops it (cancelled when dropped).
struct Fixture {
    upstream: DemoUpstream,
    cancel: CancellationToken,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn fixture(name: &str) -> Fixture {
    let cancel = CancellationToken::new();
    let upstream = DemoUpstream::start(name, "127.0.0.1:0".parse().unwrap(), cancel.clone())
        .await
        .expect("demo upstream starts");
    Fixture { upstream, cancel }
}

/// One client connection, HTTP/1.1 or h2c with prior knowledge.
enum Client {
    Http1(hyper::client::conn::http1::SendRequest<ClientBody>),
    Http2(hyper::client::conn::http2::SendRequest<ClientBody>),
}

impl Client {
    async fn connect(addr: SocketAddr, version: Version) -> Self {
        let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
        if version == Version::HTTP_2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2 handshake");
            tokio::spawn(connection);
            Client::Http2(sender)
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("h1 handshake");
            tokio::spawn(connection);
            Client::Http1(sender)
        }
    }

    async fn send(&mut self, request: Request<ClientBody>) -> hyper::Result<Response<Incoming>> {
        match self {
            Client::Http1(sender) => sender.send_request(request).await,
            Client::Http2(sender) => sender.send_request(request).await,
        }
    }
}

fn request(
    addr: SocketAddr,
    version: Version,
    method: Method,
    path_and_query: &str,
) -> http::request::Builder {
    // h2 carries :scheme and :authority; HTTP/1.1 uses origin-form plus Host.
    let builder = Request::builder().method(method);
    let builder = if version == Version::HTTP_2 {
        builder.uri(format!("http://{addr}{path_and_query}"))
    } else {
        builder.uri(path_and_query).header("host", addr.to_string())
    };
    builder.version(version)
}

fn empty() -> ClientBody {
    Empty::new().boxed()
}

fn full(data: impl Into<Bytes>) -> ClientBody {
    Full::new(data.into()).boxed()
}

/// Sends one request on a new connection and reads the whole answer.
async fn exchange(
    addr: SocketAddr,
    version: Version,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: ClientBody,
) -> (StatusCode, HeaderMap, Bytes, Option<HeaderMap>) {
    let mut client = Client::connect(addr, version).await;
    let mut builder = request(addr, version, method, path_and_query);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = client
        .send(builder.body(body).unwrap())
        .await
        .expect("response");
    assert_eq!(response.version(), version);
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("response body");
    let trailers = collected.trailers().cloned();
    (parts.status, parts.headers, collected.to_bytes(), trailers)
}

fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(pattern_byte).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[tokio::test]
async fn echo_describes_the_request_exactly() {
    let fixture = fixture("echo-a").await;
    let addr = fixture.upstream.local_addr();
    for version in VERSIONS {
        let (status, headers, body, _) = exchange(
            addr,
            version,
            Method::POST,
            "/echo/some/where?x=1&y=two",
            &[
                ("x-test", "a"),
                ("x-test", "b"),
                ("content-type", "text/plain"),
            ],
            full("hello demo"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[UPSTREAM_HEADER], "echo-a");
        assert_eq!(headers["content-type"], "application/json");
        let document: Value = serde_json::from_slice(&body).expect("json");
        let (version_text, authority, host) = if version == Version::HTTP_2 {
            ("HTTP/2.0", json!(addr.to_string()), None)
        } else {
            ("HTTP/1.1", Value::Null, Some(addr.to_string()))
        };
        let mut expected_headers = json!({
            "content-length": ["10"],
            "content-type": ["text/plain"],
            "x-test": ["a", "b"],
        });
        if let Some(host) = host {
            expected_headers["host"] = json!([host]);
        }
        assert_eq!(
            document,
            json!({
                "upstream": "echo-a",
                "method": "POST",
                "path": "/echo/some/where",
                "query": "x=1&y=two",
                "authority": authority,
                "version": version_text,
                "headers": expected_headers,
                "body_len": 10,
                "body_sha256": sha256_hex(b"hello demo"),
            }),
            "{version:?}"
        );
    }
}

#[tokio::test]
async fn unknown_paths_echo_with_any_method_and_no_query() {
    let fixture = fixture("echo-b").await;
    let addr = fixture.upstream.local_addr();
    for version in VERSIONS {
        let (status, _, body, _) = exchange(addr, version, Method::DELETE, "/", &[], empty()).await;
        assert_eq!(status, StatusCode::OK);
        let document: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(document["method"], "DELETE");
        assert_eq!(document["path"], "/");
        assert_eq!(document["query"], Value::Null);
        assert_eq!(document["body_len"], 0);
        assert_eq!(document["body_sha256"], sha256_hex(b""));
    }
}

#[tokio::test]
async fn bytes_streams_the_pattern() {
    let fixture = fixture("bytes").await;
    let addr = fixture.upstream.local_addr();
    for version in VERSIONS {
        for (path, len) in [
            ("/bytes/200000", 200_000u64),
            ("/bytes/1000?chunk=7", 1000),
            ("/bytes/0", 0),
            ("/bytes/251?chunk=251", 251),
        ] {
            let (status, headers, body, _) =
                exchange(addr, version, Method::GET, path, &[], empty()).await;
            assert_eq!(status, StatusCode::OK, "{path} {version:?}");
            assert_eq!(
                headers.get("content-length").map(|v| v.to_str().unwrap()),
                Some(len.to_string().as_str()),
                "{path} {version:?}"
            );
            assert_eq!(headers["content-type"], "application/octet-stream");
            assert_eq!(body.as_ref(), pattern(len).as_slice(), "{path} {version:?}");
        }
    }
}

#[tokio::test]
async fn bad_input_is_a_400_not_a_panic() {
    let fixture = fixture("strict").await;
    let addr = fixture.upstream.local_addr();
    for version in VERSIONS {
        for path in [
            "/bytes/abc",
            "/bytes/-1",
            "/bytes/",
            "/bytes/18446744073709551616",
            "/bytes/10?chunk=0",
            "/bytes/10?chunk=x",
            "/bytes/10?chunk=16777217",
            "/status/99",
            "/status/600",
            "/status/abc",
            "/status/",
            "/slow?ms=soon",
            "/slow?ms=600001",
        ] {
            let (status, headers, _, _) =
                exchange(addr, version, Method::GET, path, &[], empty()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {version:?}");
            assert_eq!(headers[UPSTREAM_HEADER], "strict");
        }
    }
}

#[tokio::test]
async fn sha256_hashes_a_streamed_upload() {
    let fixture = fixture("hasher").await;
    let addr = fixture.upstream.local_addr();
    let chunk = Bytes::from(pattern(16 * 1024));
    let mut whole = Vec::new();
    for _ in 0..64 {
        whole.extend_from_slice(&chunk);
    }
    for version in VERSIONS {
        // A stream without a length: chunked on HTTP/1.1, DATA frames on h2.
        let frames = (0..64).map({
            let chunk = chunk.clone();
            move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))
        });
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let (status, _, body, _) =
            exchange(addr, version, Method::POST, "/sha256", &[], body).await;
        assert_eq!(status, StatusCode::OK);
        let document: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            document,
            json!({"len": 1024 * 1024, "sha256": sha256_hex(&whole)})
        );
    }
}

#[tokio::test]
async fn status_answers_the_code_asked_for() {
    let fixture = fixture("status").await;
    let addr = fixture.upstream.local_addr();
    for version in VERSIONS {
        for (code, expected_body) in [
            (418u16, "status 418\n"),
            (503, "status 503\n"),
            (200, "status 200\n"),
            (204, ""),
        ] {
            let path = format!("/status/{code}");
            let (status, headers, body, _) =
                exchange(addr, version, Method::GET, &path, &[], empty()).await;
            assert_eq!(status.as_u16(), code);
            assert_eq!(body.as_ref(), expected_body.as_bytes());
            assert_eq!(headers[UPSTREAM_HEADER], "status");
        }
    }
}

#[tokio::test]
async fn trailers_arrive_on_h2_and_on_http1_when_asked_for() {
    let fixture = fixture("trailing").await;
    let addr = fixture.upstream.local_addr();
    let checksum = sha256_hex(super::routes::TRAILERS_BODY);
    for (version, te) in [
        (Version::HTTP_2, true),
        (Version::HTTP_11, true),
        (Version::HTTP_11, false),
    ] {
        let headers: &[(&str, &str)] = if te { &[("te", "trailers")] } else { &[] };
        let (status, response_headers, body, trailers) =
            exchange(addr, version, Method::GET, "/trailers", headers, empty()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(response_headers["trailer"], "x-checksum");
        assert_eq!(body.as_ref(), super::routes::TRAILERS_BODY);
        if te {
            let trailers = trailers.unwrap_or_else(|| panic!("trailers {version:?}"));
            assert_eq!(trailers["x-checksum"], checksum.as_str(), "{version:?}");
        } else {
            // Without `TE: trailers` an HTTP/1.1 client must not be sent any.
            assert!(trailers.is_none());
        }
    }
}

#[tokio::test]
async fn health_is_ok_and_not_counted_in_hits() {
    let fixture = fixture("counted").await;
    let addr = fixture.upstream.local_addr();
    assert_eq!(fixture.upstream.name(), "counted");
    for version in VERSIONS {
        let (status, _, body, _) =
            exchange(addr, version, Method::GET, "/health", &[], empty()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.as_ref(), b"ok\n");
    }
    assert_eq!(fixture.upstream.hits(), 0);

    // Several requests on one connection each count.
    for version in VERSIONS {
        let mut client = Client::connect(addr, version).await;
        for _ in 0..3 {
            let request = request(addr, version, Method::GET, "/echo")
                .body(empty())
                .unwrap();
            let response = client.send(request).await.expect("response");
            assert_eq!(response.status(), StatusCode::OK);
            response.into_body().collect().await.expect("body");
        }
    }
    assert_eq!(fixture.upstream.hits(), 6);
}

#[tokio::test]
async fn slow_answers_after_the_delay() {
    let fixture = fixture("slow").await;
    let addr = fixture.upstream.local_addr();
    for version in VERSIONS {
        let started = Instant::now();
        let (status, _, body, _) =
            exchange(addr, version, Method::GET, "/slow?ms=30", &[], empty()).await;
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.as_ref(), b"slept 30 ms\n");
    }
}

#[tokio::test]
async fn upload_and_drop_fails_the_exchange_without_an_answer() {
    let fixture = fixture("dropper").await;
    let addr = fixture.upstream.local_addr();
    for version in VERSIONS {
        let mut client = Client::connect(addr, version).await;
        let frames = (0..256).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(pattern(4096)))));
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let request = request(addr, version, Method::POST, "/upload-and-drop")
            .body(body)
            .unwrap();
        let outcome = client.send(request).await;
        assert!(outcome.is_err(), "{version:?}: got {outcome:?}");
    }
    assert_eq!(fixture.upstream.hits(), 2);
}

#[tokio::test]
async fn cancel_stops_listening_and_cuts_slow_requests_short() {
    let fixture = fixture("stopping").await;
    let addr = fixture.upstream.local_addr();
    let mut client = Client::connect(addr, Version::HTTP_2).await;
    let request = request(addr, Version::HTTP_2, Method::GET, "/slow?ms=600000")
        .body(empty())
        .unwrap();
    let in_flight = tokio::spawn(async move {
        let response = client.send(request).await.expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, body)
    });
    // Readiness: the server has counted the request once its head arrived.
    tokio::time::timeout(Duration::from_secs(10), async {
        while fixture.upstream.hits() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("request reaches the upstream");

    fixture.cancel.cancel();
    let (status, body) = in_flight.await.expect("client task");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body.as_ref(), b"shutting down\n");
    tokio::time::timeout(Duration::from_secs(10), fixture.upstream.closed())
        .await
        .expect("upstream closes");
    assert!(TcpStream::connect(addr).await.is_err());
}
