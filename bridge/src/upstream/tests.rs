//! Behaviour of `Upstream` against real HTTP/1.1 and h2c servers on loopback: balancing,
//! ejection, health checks, circuit breaking, retries, streaming and mid-body resets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::*;

/// `count` endpoints on 127.0.0.1 ports 1000, 1001, ... (nothing listens), for the balancer
/// and health tests.
pub(super) fn endpoints(count: u16) -> Vec<Arc<Endpoint>> {
    (0..count)
        .map(|i| {
            let addr = SocketAddr::from(([127, 0, 0, 1], 1000 + i));
            Arc::new(Endpoint::new(
                usize::from(i),
                addr,
                addr.to_string().parse().unwrap(),
            ))
        })
        .collect()
}

type ServerBody = UnsyncBoxBody<Bytes, BodyError>;

const BIG_CHUNK: usize = 64 * 1024;
const BIG_CHUNKS: usize = 256; // 16 MiB

/// What a test server has seen, and the knobs a test turns.
struct ServerState {
    id: String,
    path_hits: Mutex<HashMap<String, usize>>,
    health_status: AtomicU16,
    /// `/block` waits here until a test adds a permit.
    gate: Semaphore,
    /// Number of `/block` requests that arrived.
    blocked: watch::Sender<usize>,
    /// Signalled when `/echo` received its first body chunk.
    first_chunk: Notify,
    /// `/midbody` resets its response once the test has read the first chunk.
    reset_now: Arc<Notify>,
    /// TCP connections accepted.
    connections: AtomicUsize,
    /// TCP connections that ended.
    closed: watch::Sender<usize>,
}

struct TestServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    task: JoinSet<()>,
}

impl TestServer {
    async fn start(id: &str) -> Self {
        Self::start_on(id, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    async fn start_on(id: &str, addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState {
            id: id.to_owned(),
            path_hits: Mutex::new(HashMap::new()),
            health_status: AtomicU16::new(200),
            gate: Semaphore::new(0),
            blocked: watch::Sender::new(0),
            first_chunk: Notify::new(),
            reset_now: Arc::new(Notify::new()),
            connections: AtomicUsize::new(0),
            closed: watch::Sender::new(0),
        });
        let mut task = JoinSet::new();
        let server_state = state.clone();
        task.spawn(async move {
            // Dropping this set (with the server) aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                server_state.connections.fetch_add(1, Ordering::SeqCst);
                let state = server_state.clone();
                connections.spawn(async move {
                    let handler_state = state.clone();
                    let service = hyper::service::service_fn(move |request| {
                        handle(handler_state.clone(), request)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    state.closed.send_modify(|closed| *closed += 1);
                });
            }
        });
        Self { addr, state, task }
    }

    /// Closes the listener and every connection, and waits until they are gone.
    async fn stop(mut self) {
        self.task.shutdown().await;
    }

    fn hits(&self, path: &str) -> usize {
        self.state
            .path_hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

fn boxed<B>(body: B) -> ServerBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BodyError>,
{
    body.map_err(Into::into).boxed_unsync()
}

fn text(body: impl Into<String>) -> ServerBody {
    boxed(Full::new(Bytes::from(body.into())))
}

async fn handle(
    state: Arc<ServerState>,
    request: http::Request<Incoming>,
) -> Result<http::Response<ServerBody>, BodyError> {
    let path = request.uri().path().to_owned();
    let hits = {
        let mut path_hits = state.path_hits.lock().unwrap();
        let hits = path_hits.entry(path.clone()).or_insert(0);
        *hits += 1;
        *hits
    };
    let response = match path.as_str() {
        "/health" => http::Response::builder()
            .status(state.health_status.load(Ordering::SeqCst))
            .body(text(state.id.clone()))?,
        "/block" => {
            state.blocked.send_modify(|count| *count += 1);
            let _permit = state.gate.acquire().await?;
            http::Response::new(text(state.id.clone()))
        }
        // Resets the first request, answers the others.
        "/flaky" if hits == 1 => return Err("flaky: reset".into()),
        "/fail" => return Err("fail: reset".into()),
        // What the upstream saw as authority, Host, and the x-custom header.
        "/authority" => http::Response::new(text(format!(
            "{} {} {}",
            request.uri().authority().map_or("-", |a| a.as_str()),
            request
                .headers()
                .get("host")
                .map_or("-", |h| h.to_str().unwrap_or("?")),
            request
                .headers()
                .get("x-custom")
                .map_or("-", |h| h.to_str().unwrap_or("?")),
        ))),
        "/unavailable" if hits == 1 => http::Response::builder()
            .status(503)
            .body(text(state.id.clone()))?,
        "/echo" => {
            let mut body = request.into_body();
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    if total == 0 && !data.is_empty() {
                        state.first_chunk.notify_one();
                    }
                    total += data.len();
                }
            }
            http::Response::new(text(total.to_string()))
        }
        "/big" => {
            let chunks = (0..BIG_CHUNKS)
                .map(|_| Ok::<_, BodyError>(Frame::data(Bytes::from(vec![7u8; BIG_CHUNK]))));
            http::Response::new(boxed(StreamBody::new(futures_util::stream::iter(chunks))))
        }
        "/midbody" => {
            let reset_now = state.reset_now.clone();
            let frames = futures_util::stream::unfold(0, move |step| {
                let reset_now = reset_now.clone();
                async move {
                    match step {
                        0 => Some((Ok(Frame::data(Bytes::from_static(b"partial"))), 1)),
                        1 => {
                            reset_now.notified().await;
                            Some((Err::<Frame<Bytes>, BodyError>("midbody: reset".into()), 2))
                        }
                        _ => None,
                    }
                }
            });
            http::Response::new(boxed(StreamBody::new(frames)))
        }
        _ => http::Response::new(text(state.id.clone())),
    };
    Ok(response)
}

/// An address nothing listens on: bound, then closed.
async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

async fn start_upstream(
    addrs: &[SocketAddr],
    protocol: UpstreamProtocol,
    adjust: impl FnOnce(&mut UpstreamSettings),
) -> Arc<Upstream> {
    let mut settings = UpstreamSettings::new(addrs.iter().map(ToString::to_string));
    settings.protocol = protocol;
    adjust(&mut settings);
    Upstream::start("svc", &settings, CancellationToken::new())
        .await
        .unwrap()
}

fn get(path: &str) -> http::Request<BoxBody> {
    http::Request::get(path)
        .header("host", "svc.test")
        .body(crate::http::body::empty())
        .unwrap()
}

fn get_without_host(path: &str) -> http::Request<BoxBody> {
    http::Request::get(path)
        .body(crate::http::body::empty())
        .unwrap()
}

async fn body_text(response: UpstreamResponse) -> String {
    let bytes = response
        .response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Bounds every wait in these tests: a hang fails instead of blocking CI.
async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("timed out")
}

const PROTOCOLS: [UpstreamProtocol; 2] = [UpstreamProtocol::Http1, UpstreamProtocol::H2c];

async fn assert_spread(protocol: UpstreamProtocol) {
    let servers = [
        TestServer::start("a").await,
        TestServer::start("b").await,
        TestServer::start("c").await,
    ];
    let addrs: Vec<_> = servers.iter().map(|server| server.addr).collect();
    let upstream = start_upstream(&addrs, protocol, |_| {}).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let response = within(upstream.send(get("/id"))).await.unwrap();
        assert_eq!(response.response.status(), 200);
        assert_eq!(response.attempts, 1);
        *counts.entry(body_text(response).await).or_default() += 1;
    }
    for id in ["a", "b", "c"] {
        let count = counts.get(id).copied().unwrap_or(0);
        assert!(
            count >= 60,
            "{protocol:?}: endpoint {id} got {count} of 300: {counts:?}"
        );
    }
    let stats = upstream.stats();
    let total: u64 = stats
        .endpoints
        .iter()
        .map(|endpoint| endpoint.total_requests)
        .sum();
    assert_eq!(total, 300);
    assert_eq!(stats.active_requests, 0);
}

#[tokio::test]
async fn h2c_spreads_every_request_over_all_endpoints() {
    assert_spread(UpstreamProtocol::H2c).await;
}

#[tokio::test]
async fn http1_spreads_every_request_over_all_endpoints() {
    assert_spread(UpstreamProtocol::Http1).await;
}

#[tokio::test]
async fn dead_endpoint_is_retried_around_and_ejected() {
    for protocol in PROTOCOLS {
        let live = [TestServer::start("a").await, TestServer::start("b").await];
        let dead = dead_addr().await;
        let upstream = start_upstream(&[live[0].addr, live[1].addr, dead], protocol, |_| {}).await;
        for _ in 0..60 {
            let response = within(upstream.send(get("/id"))).await.unwrap();
            assert_eq!(response.response.status(), 200);
            assert_ne!(response.endpoint, dead);
        }
        let stats = upstream.stats();
        let dead_stats = stats.endpoints.iter().find(|e| e.addr == dead).unwrap();
        assert!(dead_stats.ejected, "{protocol:?}: {stats:?}");
        assert!(dead_stats.failures >= 5, "{stats:?}");
        assert!(stats.retries >= 5, "{stats:?}");
        assert!(stats.endpoints.iter().filter(|e| e.ejected).count() == 1);
    }
}

#[tokio::test]
async fn all_endpoints_down_fails_with_connect_error() {
    for protocol in PROTOCOLS {
        let upstream =
            start_upstream(&[dead_addr().await, dead_addr().await], protocol, |_| {}).await;
        for _ in 0..10 {
            let error = within(upstream.send(get("/id"))).await.unwrap_err();
            assert!(matches!(error, UpstreamError::Connect { .. }), "{error:?}");
            assert_eq!(error.reason().status(), http::StatusCode::BAD_GATEWAY);
            assert_eq!(error.reason().as_str(), "upstream-connect-failed");
        }
        // Panic mode: with everything ejected, both endpoints are still tried.
        let stats = upstream.stats();
        assert!(
            stats.endpoints.iter().all(|e| e.total_requests > 0),
            "{stats:?}"
        );
    }
}

#[tokio::test]
async fn failing_health_checks_take_an_endpoint_out_and_back() {
    for protocol in PROTOCOLS {
        let servers = [
            TestServer::start("a").await,
            TestServer::start("b").await,
            TestServer::start("c").await,
        ];
        let addrs: Vec<_> = servers.iter().map(|server| server.addr).collect();
        let upstream = start_upstream(&addrs, protocol, |settings| {
            let mut check = HealthCheckSettings::new("/health");
            // Only `check_now` drives rounds after the first one.
            check.interval = Duration::from_secs(3600);
            settings.health_check = Some(check);
        })
        .await;
        // Let the round run at start finish before changing what the servers answer.
        let mut rounds = upstream.subscribe_health();
        within(rounds.wait_for(|&count| count >= 1)).await.unwrap();
        let sick = &servers[2];
        sick.state.health_status.store(500, Ordering::SeqCst);
        let healthy = |upstream: &Upstream| upstream.stats().endpoints[2].healthy;

        within(upstream.check_now()).await;
        within(upstream.check_now()).await;
        assert!(healthy(&upstream), "unhealthy_threshold is 3");
        within(upstream.check_now()).await;
        assert!(!healthy(&upstream));

        for _ in 0..60 {
            let response = within(upstream.send(get("/id"))).await.unwrap();
            assert_ne!(response.endpoint, sick.addr);
        }
        assert_eq!(sick.hits("/id"), 0);

        sick.state.health_status.store(200, Ordering::SeqCst);
        within(upstream.check_now()).await;
        assert!(!healthy(&upstream), "healthy_threshold is 2");
        within(upstream.check_now()).await;
        assert!(healthy(&upstream));
        for _ in 0..150 {
            within(upstream.send(get("/id"))).await.unwrap();
        }
        assert!(
            sick.hits("/id") >= 20,
            "back in rotation: {}",
            sick.hits("/id")
        );
    }
}

#[tokio::test]
async fn breaker_refuses_past_max_active_requests_at_once() {
    for protocol in PROTOCOLS {
        let server = TestServer::start("a").await;
        let upstream = start_upstream(&[server.addr], protocol, |settings| {
            settings.circuit_breaker.max_active_requests = 2;
        })
        .await;
        let mut blocked = JoinSet::new();
        for _ in 0..2 {
            let upstream = upstream.clone();
            blocked.spawn(async move {
                upstream
                    .send(get("/block"))
                    .await
                    .map(|r| r.response.status())
            });
        }
        let mut arrived = server.state.blocked.subscribe();
        within(arrived.wait_for(|&count| count == 2)).await.unwrap();

        let error = tokio::time::timeout(Duration::from_secs(1), upstream.send(get("/id")))
            .await
            .expect("an overloaded upstream answers at once")
            .unwrap_err();
        assert!(matches!(
            error,
            UpstreamError::Overloaded {
                limit: OverloadLimit::ActiveRequests,
                ..
            }
        ));
        assert_eq!(
            error.reason().status(),
            http::StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(error.reason().as_str(), "overloaded");
        assert_eq!(upstream.stats().circuit_breaker_trips, 1);

        server.state.gate.add_permits(1);
        while let Some(status) = within(blocked.join_next()).await {
            assert_eq!(status.unwrap().unwrap(), 200);
        }
        let response = within(upstream.send(get("/id"))).await.unwrap();
        assert_eq!(response.response.status(), 200);
        assert_eq!(upstream.stats().circuit_breaker_trips, 1);
    }
}

#[tokio::test]
async fn default_breaker_never_trips_on_200_concurrent_requests() {
    for protocol in PROTOCOLS {
        let server = TestServer::start("a").await;
        let upstream = start_upstream(&[server.addr], protocol, |_| {}).await;
        let mut requests = JoinSet::new();
        for _ in 0..200 {
            let upstream = upstream.clone();
            requests.spawn(async move {
                upstream
                    .send(get("/block"))
                    .await
                    .map(|r| r.response.status())
            });
        }
        let mut arrived = server.state.blocked.subscribe();
        within(arrived.wait_for(|&count| count == 200))
            .await
            .unwrap();
        assert_eq!(upstream.stats().active_requests, 200);
        server.state.gate.add_permits(1);
        let mut ok = 0;
        while let Some(status) = within(requests.join_next()).await {
            assert_eq!(status.unwrap().unwrap(), 200);
            ok += 1;
        }
        assert_eq!(ok, 200);
        let stats = upstream.stats();
        assert_eq!(stats.circuit_breaker_trips, 0, "{protocol:?}");
        assert_eq!(stats.retries, 0);
    }
}

#[tokio::test]
async fn post_with_body_is_never_retried() {
    for protocol in PROTOCOLS {
        let server = TestServer::start("a").await;
        let upstream = start_upstream(&[server.addr], protocol, |_| {}).await;
        let request = http::Request::post("/fail")
            .header("host", "svc.test")
            .body(boxed(Full::new(Bytes::from_static(b"hello"))))
            .unwrap();
        let error = within(upstream.send(request)).await.unwrap_err();
        assert!(matches!(error, UpstreamError::Reset { .. }), "{error:?}");
        assert_eq!(error.reason().status(), http::StatusCode::BAD_GATEWAY);
        assert_eq!(error.reason().as_str(), "upstream-reset");
        assert_eq!(server.hits("/fail"), 1, "{protocol:?}");
        assert_eq!(upstream.stats().retries, 0);
    }
}

#[tokio::test]
async fn bodyless_get_is_retried_once_on_reset() {
    for protocol in PROTOCOLS {
        let server = TestServer::start("a").await;
        let upstream = start_upstream(&[server.addr], protocol, |_| {}).await;
        let response = within(upstream.send(get("/flaky"))).await.unwrap();
        assert_eq!(response.response.status(), 200);
        assert_eq!(response.attempts, 2);
        assert_eq!(server.hits("/flaky"), 2, "{protocol:?}");
        assert_eq!(upstream.stats().retries, 1);
    }
}

#[tokio::test]
async fn large_response_body_streams_through() {
    for protocol in PROTOCOLS {
        let server = TestServer::start("a").await;
        let upstream = start_upstream(&[server.addr], protocol, |_| {}).await;
        let response = within(upstream.send(get("/big"))).await.unwrap();
        assert_eq!(response.response.status(), 200);
        let mut body = response.response.into_body();
        let mut total = 0usize;
        while let Some(frame) = within(body.frame()).await {
            if let Ok(data) = frame.unwrap().into_data() {
                total += data.len();
            }
        }
        assert_eq!(total, 16 * 1024 * 1024, "{protocol:?}");
    }
}

#[tokio::test]
async fn request_body_streams_to_the_upstream() {
    for protocol in PROTOCOLS {
        let server = TestServer::start("a").await;
        let upstream = start_upstream(&[server.addr], protocol, |_| {}).await;
        let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
        let chunks = futures_util::stream::unfold(receiver, |mut receiver| async move {
            let chunk = receiver.recv().await?;
            Some((Ok::<_, BodyError>(Frame::data(chunk)), receiver))
        });
        let request = http::Request::post("/echo")
            .header("host", "svc.test")
            .body(StreamBody::new(chunks).boxed_unsync())
            .unwrap();
        let sending = {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let response = upstream.send(request).await.unwrap();
                body_text(response).await
            })
        };
        let chunk = Bytes::from(vec![1u8; 64 * 1024]);
        sender.send(chunk.clone()).await.unwrap();
        // The upstream sees the first chunk while the rest has not been produced yet.
        within(server.state.first_chunk.notified()).await;
        for _ in 1..64 {
            within(sender.send(chunk.clone())).await.unwrap();
        }
        drop(sender);
        let echoed = within(sending).await.unwrap();
        assert_eq!(echoed, (64 * 64 * 1024).to_string(), "{protocol:?}");
    }
}

#[tokio::test]
async fn reset_mid_body_surfaces_as_a_body_error() {
    for protocol in PROTOCOLS {
        let server = TestServer::start("a").await;
        let upstream = start_upstream(&[server.addr], protocol, |_| {}).await;
        let response = within(upstream.send(get("/midbody"))).await.unwrap();
        assert_eq!(response.response.status(), 200);
        let mut body = response.response.into_body();
        let mut received = Vec::new();
        let mut failed = false;
        while let Some(frame) = within(body.frame()).await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        received.extend_from_slice(&data);
                        server.state.reset_now.notify_one();
                    }
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(
            failed,
            "{protocol:?}: body ended cleanly after {received:?}"
        );
        assert_eq!(received, b"partial");
        // The upstream still serves the next request.
        let response = within(upstream.send(get("/id"))).await.unwrap();
        assert_eq!(body_text(response).await, "a");
    }
}

#[tokio::test]
async fn http1_connections_are_reused() {
    let server = TestServer::start("a").await;
    let upstream = start_upstream(&[server.addr], UpstreamProtocol::Http1, |_| {}).await;
    for _ in 0..20 {
        let response = within(upstream.send(get("/id"))).await.unwrap();
        assert_eq!(body_text(response).await, "a");
    }
    let connections = server.state.connections.load(Ordering::SeqCst);
    assert!(
        connections <= 2,
        "20 sequential requests used {connections} connections"
    );
}

#[tokio::test]
async fn h2c_request_carries_authority_from_host() {
    let server = TestServer::start("a").await;
    let upstream = start_upstream(&[server.addr], UpstreamProtocol::H2c, |_| {}).await;
    let request = http::Request::get("/authority")
        .header("host", "svc.test")
        .header("x-custom", "1")
        .body(boxed(Empty::<Bytes>::new()))
        .unwrap();
    let response = within(upstream.send(request)).await.unwrap();
    assert_eq!(response.response.version(), http::Version::HTTP_2);
    assert_eq!(body_text(response).await, "svc.test svc.test 1");
    // Without Host, the endpoint as configured is the authority.
    let response = within(upstream.send(get_without_host("/authority")))
        .await
        .unwrap();
    assert_eq!(body_text(response).await, format!("{} - -", server.addr));
    for _ in 0..50 {
        within(upstream.send(get("/id"))).await.unwrap();
    }
    assert_eq!(
        server.state.connections.load(Ordering::SeqCst),
        2,
        "two h2 connections per endpoint"
    );
}

/// Each worker thread multiplexes over h2 connections of its own (two per endpoint), so a
/// request never waits on a connection another thread drives. A pool shared by the
/// workers would serve both workers' requests over the same two connections.
#[tokio::test]
async fn h2c_connections_belong_to_the_worker_that_made_them() {
    let server = TestServer::start("a").await;
    let upstream = start_upstream(&[server.addr], UpstreamProtocol::H2c, |_| {}).await;
    let workers = crate::workers::Workers::spawn(2).unwrap();
    let tasks = tokio_util::task::TaskTracker::new();
    for worker in 0..2 {
        let (done, finished) = tokio::sync::oneshot::channel();
        let upstream = upstream.clone();
        workers.spawn_on(worker, &tasks, async move {
            for _ in 0..10 {
                let response = upstream.send(get("/id")).await.unwrap();
                assert_eq!(body_text(response).await, "a");
            }
            let _ = done.send(());
        });
        within(finished).await.unwrap();
    }
    assert_eq!(
        server.state.connections.load(Ordering::SeqCst),
        4,
        "two h2 connections per endpoint per worker"
    );
    upstream.shutdown().await;
    workers.stop();
}

/// Idle HTTP/1.1 connections are capped per worker: a worker whose idle list is full must
/// not leave another worker closing its connection after every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_workers_idle_connections_do_not_crowd_out_anothers() {
    const FULL: usize = super::pool::MAX_IDLE_HTTP1_CONNECTIONS;
    let server = TestServer::start("a").await;
    let upstream = start_upstream(&[server.addr], UpstreamProtocol::Http1, |_| {}).await;
    let workers = crate::workers::Workers::spawn(2).unwrap();
    let tasks = tokio_util::task::TaskTracker::new();
    // The first worker holds FULL requests open at once (FULL connections), then idles them.
    let (done, finished) = tokio::sync::oneshot::channel();
    let first = upstream.clone();
    workers.spawn_on(0, &tasks, async move {
        let mut requests = JoinSet::new();
        for _ in 0..FULL {
            let upstream = first.clone();
            requests
                .spawn(async move { body_text(upstream.send(get("/block")).await.unwrap()).await });
        }
        while let Some(text) = requests.join_next().await {
            assert_eq!(text.unwrap(), "a");
        }
        let _ = done.send(());
    });
    let mut arrived = server.state.blocked.subscribe();
    within(arrived.wait_for(|&count| count == FULL))
        .await
        .unwrap();
    server.state.gate.add_permits(FULL);
    within(finished).await.unwrap();
    within(async {
        while upstream.stats().endpoints[0].idle_connections < FULL {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(server.state.connections.load(Ordering::SeqCst), FULL);

    let (done, finished) = tokio::sync::oneshot::channel();
    let second = upstream.clone();
    workers.spawn_on(1, &tasks, async move {
        for _ in 0..10 {
            assert_eq!(body_text(second.send(get("/id")).await.unwrap()).await, "a");
        }
        let _ = done.send(());
    });
    within(finished).await.unwrap();
    let dialled = server.state.connections.load(Ordering::SeqCst) - FULL;
    assert!(
        dialled <= 2,
        "the second worker dialled {dialled} connections for 10 sequential requests"
    );
    upstream.shutdown().await;
    workers.stop();
}

#[tokio::test]
async fn http1_request_keeps_origin_form_and_host() {
    let server = TestServer::start("a").await;
    let upstream = start_upstream(&[server.addr], UpstreamProtocol::Http1, |_| {}).await;
    let response = within(upstream.send(get("/authority"))).await.unwrap();
    assert_eq!(response.response.version(), http::Version::HTTP_11);
    assert_eq!(body_text(response).await, "- svc.test -");
    // An absolute URI (as from an HTTP/2 caller) goes out in origin form with its
    // authority as Host, the one header HTTP/1.1 requires.
    let response = within(upstream.send(get_without_host("http://svc.other/authority")))
        .await
        .unwrap();
    assert_eq!(body_text(response).await, "- svc.other -");
}

#[tokio::test]
async fn shutdown_stops_everything() {
    let server = TestServer::start("a").await;
    let upstream = start_upstream(&[server.addr], UpstreamProtocol::H2c, |settings| {
        settings.health_check = Some(HealthCheckSettings::new("/health"));
    })
    .await;
    within(upstream.send(get("/id"))).await.unwrap();
    within(upstream.shutdown()).await;
    let error = upstream.send(get("/id")).await.unwrap_err();
    assert_eq!(error.reason().as_str(), "shutting-down");
}

#[tokio::test]
async fn slow_response_head_times_out() {
    for protocol in PROTOCOLS {
        let server = TestServer::start("a").await;
        let upstream = start_upstream(&[server.addr], protocol, |settings| {
            settings.request_timeout = Some(Duration::from_millis(200));
        })
        .await;
        let error = within(upstream.send(get("/block"))).await.unwrap_err();
        assert!(matches!(error, UpstreamError::Timeout { .. }), "{error:?}");
        assert_eq!(error.reason().status(), http::StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(error.reason().as_str(), "upstream-timeout");
        assert_eq!(server.hits("/block"), 1, "a timeout is not retried");
        server.state.gate.add_permits(1);
    }
}

#[tokio::test]
async fn upstream_503_is_retried_for_bodyless_get() {
    for protocol in PROTOCOLS {
        let server = TestServer::start("a").await;
        let upstream = start_upstream(&[server.addr], protocol, |_| {}).await;
        let response = within(upstream.send(get("/unavailable"))).await.unwrap();
        assert_eq!(response.response.status(), 200);
        assert_eq!(response.attempts, 2);
        assert_eq!(server.hits("/unavailable"), 2);
    }
}

#[tokio::test]
async fn all_endpoints_failing_health_checks_still_get_traffic() {
    let servers = [TestServer::start("a").await, TestServer::start("b").await];
    let addrs: Vec<_> = servers.iter().map(|server| server.addr).collect();
    let upstream = start_upstream(&addrs, UpstreamProtocol::Http1, |settings| {
        let mut check = HealthCheckSettings::new("/health");
        check.interval = Duration::from_secs(3600);
        check.unhealthy_threshold = 1;
        settings.health_check = Some(check);
    })
    .await;
    within(upstream.subscribe_health().wait_for(|&count| count >= 1))
        .await
        .unwrap();
    for server in &servers {
        server.state.health_status.store(503, Ordering::SeqCst);
    }
    within(upstream.check_now()).await;
    assert!(
        upstream
            .stats()
            .endpoints
            .iter()
            .all(|endpoint| !endpoint.healthy)
    );
    // Panic mode: serving from "unhealthy" endpoints beats failing every request.
    for _ in 0..20 {
        let response = within(upstream.send(get("/id"))).await.unwrap();
        assert_eq!(response.response.status(), 200);
    }
    assert!(servers.iter().all(|server| server.hits("/id") > 0));
}

#[tokio::test]
async fn breaker_refuses_past_max_pending_and_waiters_reuse_freed_connections() {
    let server = TestServer::start("a").await;
    let upstream = start_upstream(&[server.addr], UpstreamProtocol::Http1, |settings| {
        settings.circuit_breaker.max_connections = 1;
        settings.circuit_breaker.max_pending_requests = 1;
    })
    .await;
    let mut requests = JoinSet::new();
    let first = upstream.clone();
    requests.spawn(async move {
        let response = first.send(get("/block")).await.unwrap();
        body_text(response).await
    });
    within(
        server
            .state
            .blocked
            .subscribe()
            .wait_for(|&count| count == 1),
    )
    .await
    .unwrap();
    // The only connection is busy: the next request waits for it.
    let second = upstream.clone();
    requests.spawn(async move {
        let response = second.send(get("/id")).await.unwrap();
        body_text(response).await
    });
    within(async {
        while upstream.stats().pending_requests != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let error = within(upstream.send(get("/id"))).await.unwrap_err();
    assert!(
        matches!(
            error,
            UpstreamError::Overloaded {
                limit: OverloadLimit::PendingRequests,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.reason().as_str(), "overloaded");
    server.state.gate.add_permits(1);
    while let Some(body) = within(requests.join_next()).await {
        assert_eq!(body.unwrap(), "a");
    }
    assert_eq!(server.state.connections.load(Ordering::SeqCst), 1);
    assert_eq!(upstream.stats().circuit_breaker_trips, 1);
}

#[tokio::test]
async fn post_that_never_left_is_sent_to_another_endpoint_once() {
    for protocol in PROTOCOLS {
        let live = TestServer::start("a").await;
        let upstream = start_upstream(&[dead_addr().await, live.addr], protocol, |_| {}).await;
        for _ in 0..8 {
            let request = http::Request::post("/echo")
                .header("host", "svc.test")
                .body(boxed(Full::new(Bytes::from_static(b"hello"))))
                .unwrap();
            let response = within(upstream.send(request)).await.unwrap();
            assert_eq!(response.endpoint, live.addr);
            assert_eq!(body_text(response).await, "5");
        }
        // A connect failure means the upstream never saw the request: no duplicates.
        assert_eq!(live.hits("/echo"), 8, "{protocol:?}");
    }
}

#[tokio::test]
async fn upstream_restart_is_survived() {
    for protocol in PROTOCOLS {
        let server = TestServer::start("before").await;
        let addr = server.addr;
        let upstream = start_upstream(&[addr], protocol, |_| {}).await;
        let response = within(upstream.send(get("/id"))).await.unwrap();
        assert_eq!(body_text(response).await, "before");
        // Kill the server with the pooled connection open, start another on the same port.
        within(server.stop()).await;
        let server = TestServer::start_on("after", addr).await;
        for _ in 0..5 {
            let response = within(upstream.send(get("/id"))).await.unwrap();
            assert_eq!(body_text(response).await, "after", "{protocol:?}");
        }
        assert_eq!(server.hits("/id"), 5);
    }
}

/// A host name's endpoint set follows its addresses (handed in here as a refresh round hands
/// in the system resolver's answers): an address that stays keeps its counters and its
/// pooled connections, one that leaves has its connections closed, and a failed lookup
/// keeps the last addresses.
#[tokio::test]
async fn endpoints_follow_the_addresses_of_a_name() {
    for protocol in PROTOCOLS {
        let a = TestServer::start_on("a", SocketAddr::from(([127, 0, 0, 2], 0))).await;
        let b = TestServer::start_on("b", SocketAddr::from(([127, 0, 0, 3], 0))).await;
        let mut settings = UpstreamSettings::new(["localhost:9"]);
        settings.protocol = protocol;
        settings.dns_refresh = Duration::ZERO;
        let upstream = Upstream::start("svc", &settings, CancellationToken::new())
            .await
            .unwrap();
        assert!(!upstream.stats().names[0].refreshed);

        upstream.apply_lookup(0, Ok(vec![a.addr]));
        for _ in 0..4 {
            assert_eq!(
                body_text(within(upstream.send(get("/id"))).await.unwrap()).await,
                "a"
            );
        }
        within(upstream.send(get("/fail"))).await.unwrap_err();
        let pool_of_a = upstream.set.load().pools[0].clone();

        // `b` joins: `a` is the same endpoint, with its counters and its connections.
        upstream.apply_lookup(0, Ok(vec![b.addr, a.addr]));
        let stats = upstream.stats();
        let by_addr = |stats: &UpstreamStats, addr| {
            stats
                .endpoints
                .iter()
                .find(|e| e.addr == addr)
                .cloned()
                .unwrap()
        };
        assert_eq!(stats.names[0].addresses, [a.addr, b.addr]);
        let a_stats = by_addr(&stats, a.addr);
        assert_eq!(
            (a_stats.total_requests, a_stats.failures),
            (5 + 2, 3),
            "{protocol:?}"
        );
        assert_eq!(a_stats.name, "localhost:9");
        assert_eq!(by_addr(&stats, b.addr).total_requests, 0);
        assert!(Arc::ptr_eq(&upstream.set.load().pools[0], &pool_of_a));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            seen.insert(body_text(within(upstream.send(get("/id"))).await.unwrap()).await);
        }
        assert_eq!(seen.len(), 2, "{protocol:?}: {seen:?}");

        // `a` leaves: its connections close, the name's totals keep what it served.
        let requests_so_far = upstream.stats().names[0].total_requests;
        upstream.apply_lookup(0, Ok(vec![b.addr]));
        drop(pool_of_a);
        let opened = a.state.connections.load(Ordering::SeqCst);
        assert!(opened >= 1);
        within(
            a.state
                .closed
                .subscribe()
                .wait_for(|&closed| closed == opened),
        )
        .await
        .unwrap();
        let stats = upstream.stats();
        assert_eq!(stats.names[0].addresses, [b.addr]);
        assert_eq!(stats.names[0].total_requests, requests_so_far);
        for _ in 0..5 {
            assert_eq!(
                body_text(within(upstream.send(get("/id"))).await.unwrap()).await,
                "b"
            );
        }

        // The name stops resolving: the last addresses stay, the failure is counted.
        upstream.apply_lookup(0, Err(io::Error::new(io::ErrorKind::NotFound, "gone")));
        upstream.apply_lookup(0, Ok(Vec::new()));
        let stats = upstream.stats();
        assert_eq!(stats.names[0].addresses, [b.addr]);
        assert_eq!(stats.names[0].dns_failures, 2);
        assert_eq!(stats.names[0].dns_error.as_deref(), Some("no addresses"));
        assert_eq!(
            body_text(within(upstream.send(get("/id"))).await.unwrap()).await,
            "b"
        );
        upstream.apply_lookup(0, Ok(vec![b.addr]));
        assert_eq!(upstream.stats().names[0].dns_error, None);
        upstream.shutdown().await;
    }
}

/// IP addresses are used as written and never looked up; a refresh round leaves them be.
#[tokio::test]
async fn ip_literals_are_never_re_resolved() {
    let server = TestServer::start("a").await;
    let upstream = start_upstream(&[server.addr], UpstreamProtocol::Http1, |_| {}).await;
    within(upstream.refresh_addresses()).await;
    let stats = upstream.stats();
    assert!(!stats.names[0].refreshed);
    assert_eq!(stats.names[0].addresses, [server.addr]);
    assert_eq!(stats.names[0].dns_failures, 0);
    assert_eq!(stats.endpoints[0].name, server.addr.to_string());
}
