//! Connections to one endpoint: dialling (TCP_NODELAY, connect timeout, handshake), a
//! bounded idle pool of HTTP/1.1 keep-alive connections, or a small set of multiplexed h2c
//! connections re-dialled when closed. Knows nothing about balancing, health or retries.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::BoxBody;
use super::settings::UpstreamProtocol;
use crate::workers::PerWorker;

/// Idle HTTP/1.1 connections kept per endpoint and worker; more are closed once their
/// response ends. Above the 100 concurrent streams of one HTTP/2 caller (a common
/// SETTINGS_MAX_CONCURRENT_STREAMS), each of which needs its own HTTP/1.1 connection: at
/// 64, such a caller made 5% of its requests dial the upstream anew.
pub(crate) const MAX_IDLE_HTTP1_CONNECTIONS: usize = 128;
/// HTTP/2 connections per endpoint. Requests are spread over them round-robin; each one
/// multiplexes as many streams as the server allows.
const H2_CONNECTIONS_PER_ENDPOINT: usize = 2;
/// HTTP/2 PING interval that detects dead connections the kernel has not noticed.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Spawns hyper's background futures (connection drivers, h2 stream pipes) on the
/// upstream's `TaskTracker`, so every task has an owner.
#[derive(Clone)]
struct TrackedExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        self.0.spawn(future);
    }
}

/// All connections to one endpoint.
pub(crate) struct EndpointPool {
    addr: SocketAddr,
    connect_timeout: Duration,
    kind: PoolKind,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

enum PoolKind {
    Http1(Arc<Http1Idle>),
    H2(H2Slots),
}

/// One worker's idle HTTP/1.1 connections, each tagged with the worker that drives it.
type IdleList = Mutex<Vec<(usize, http1::SendRequest<BoxBody>)>>;

pub(crate) struct Http1Idle {
    /// Idle connections by the worker whose runtime drives them (see `crate::workers`): a
    /// worker takes its own, so a request does not cross threads, and returns them to a
    /// list no other worker locks. Each is tagged with its worker too, for a worker that
    /// shares its slot.
    idle: PerWorker<IdleList>,
    /// Signalled when a connection goes back to `idle`.
    returned: Notify,
    /// One permit per open connection (`circuit_breaker.max_connections`).
    permits: Arc<Semaphore>,
    /// Set once the endpoint left the service: connections whose response ends close
    /// instead of going back to `idle`.
    retired: AtomicBool,
}

impl Http1Idle {
    fn put(&self, worker: usize, sender: http1::SendRequest<BoxBody>) {
        if self.retired.load(Ordering::Acquire) {
            return;
        }
        // The limit is per worker, like the connections: counted over all of them, one
        // worker's idle connections crowded out another's, whose connections were then
        // closed after every request (bench/run, h2 load: a new upstream connection for
        // 95% of requests).
        if let Ok(mut idle) = self.idle.get(worker).lock()
            && idle.iter().filter(|(owner, _)| *owner == worker).count()
                < MAX_IDLE_HTTP1_CONNECTIONS
        {
            idle.push((worker, sender));
        }
        self.returned.notify_one();
    }

    /// Open idle connections (closed ones wait in the list until a checkout drops them).
    fn len(&self) -> usize {
        self.idle
            .iter()
            .map(|slot| {
                slot.lock().map_or(0, |idle| {
                    idle.iter()
                        .filter(|(_, sender)| !sender.is_closed())
                        .count()
                })
            })
            .sum()
    }

    /// An idle connection of `worker`'s, or of any worker's with `None`. Most recently
    /// used first: it is the least likely to have been closed by the server's idle
    /// timeout. Closed or busy ones met on the way are dropped.
    fn take_ready(&self, worker: Option<usize>) -> Option<(usize, http1::SendRequest<BoxBody>)> {
        match worker {
            Some(worker) => Self::take_from(self.idle.get(worker), Some(worker)),
            None => self
                .idle
                .iter()
                .find_map(|slot| Self::take_from(slot, None)),
        }
    }

    /// `take_ready` within one worker's slot.
    fn take_from(
        slot: &IdleList,
        worker: Option<usize>,
    ) -> Option<(usize, http1::SendRequest<BoxBody>)> {
        let mut idle = slot.lock().ok()?;
        let mut index = idle.len();
        while index > 0 {
            index -= 1;
            let (owner, sender) = &idle[index];
            if worker.is_some_and(|w| w != *owner) {
                continue;
            }
            let usable = sender.is_ready() && !sender.is_closed();
            let entry = idle.remove(index);
            if usable {
                return Some(entry);
            }
        }
        None
    }
}

/// A worker and its multiplexed connections.
type WorkerGroup = (usize, Arc<H2Group>);

/// Each worker's own multiplexed connections (see `crate::workers`), made on its first
/// request: a stream on a connection another thread drives would cost a cross-thread
/// wake-up per request.
#[derive(Default)]
struct H2Slots {
    /// Each worker's group, tagged with the worker, for a worker that shares its slot.
    per_worker: PerWorker<Mutex<Vec<WorkerGroup>>>,
}

impl H2Slots {
    fn group(&self) -> Option<Arc<H2Group>> {
        let worker = crate::workers::current();
        let mut groups = self.per_worker.get(worker).lock().ok()?;
        if let Some((_, group)) = groups.iter().find(|(owner, _)| *owner == worker) {
            return Some(group.clone());
        }
        let group = Arc::new(H2Group {
            slots: (0..H2_CONNECTIONS_PER_ENDPOINT)
                .map(|_| tokio::sync::Mutex::new(H2Slot::default()))
                .collect(),
            next: AtomicUsize::new(0),
        });
        groups.push((worker, group.clone()));
        Some(group)
    }
}

struct H2Group {
    slots: Vec<tokio::sync::Mutex<H2Slot>>,
    next: AtomicUsize,
}

/// One multiplexed connection, dialled on demand.
#[derive(Default)]
struct H2Slot {
    sender: Option<http2::SendRequest<BoxBody>>,
    /// When and why the last dial failed: requests that queued behind that dial share
    /// its failure instead of each waiting out its own connect timeout in turn.
    last_failure: Option<(tokio::time::Instant, io::ErrorKind, String)>,
}

/// A connection checked out for one request.
pub(crate) enum Connection {
    Http1 {
        worker: usize,
        sender: http1::SendRequest<BoxBody>,
        idle: Arc<Http1Idle>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    },
    H2(http2::SendRequest<BoxBody>),
}

/// A request that failed before a response head arrived. `unsent` holds the request when
/// it never reached the wire (a stale pooled connection), so it can be sent elsewhere
/// whatever its method and body.
pub(crate) struct SendFailure {
    pub(crate) error: hyper::Error,
    pub(crate) unsent: Option<http::Request<BoxBody>>,
}

impl EndpointPool {
    pub(crate) fn new(
        addr: SocketAddr,
        protocol: UpstreamProtocol,
        connect_timeout: Duration,
        max_connections: usize,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let kind = match protocol {
            UpstreamProtocol::Http1 => PoolKind::Http1(Arc::new(Http1Idle {
                idle: PerWorker::default(),
                returned: Notify::new(),
                permits: Arc::new(Semaphore::new(max_connections)),
                retired: AtomicBool::new(false),
            })),
            UpstreamProtocol::H2c => PoolKind::H2(H2Slots::default()),
        };
        Self {
            addr,
            connect_timeout,
            kind,
            tasks,
            cancel,
        }
    }

    /// Idle HTTP/1.1 keep-alive connections (0 for h2c, whose connections are never idle
    /// in that sense: each carries any number of requests).
    pub(crate) fn idle_connections(&self) -> usize {
        match &self.kind {
            PoolKind::Http1(idle) => idle.len(),
            PoolKind::H2(_) => 0,
        }
    }

    /// Drains this endpoint's connections once it has left the service (its name no longer
    /// resolves to it): idle HTTP/1.1 connections close now, busy ones when their exchange
    /// ends, and h2c connections once their streams finish. Requests in flight complete.
    pub(crate) fn retire(&self) {
        match &self.kind {
            PoolKind::Http1(idle) => {
                idle.retired.store(true, Ordering::Release);
                for slot in idle.idle.iter() {
                    let closing = slot.lock().map(|mut idle| std::mem::take(&mut *idle));
                    drop(closing);
                }
            }
            PoolKind::H2(slots) => {
                for slot in slots.per_worker.iter() {
                    let closing = slot.lock().map(|mut groups| std::mem::take(&mut *groups));
                    drop(closing);
                }
            }
        }
    }

    /// A connection usable right now without dialling or waiting, if there is one.
    pub(crate) fn try_checkout(&self) -> Option<Connection> {
        match &self.kind {
            PoolKind::Http1(idle) => idle
                .take_ready(Some(crate::workers::current()))
                .map(|(worker, sender)| self.http1(worker, sender, idle)),
            PoolKind::H2(slots) => {
                let h2 = slots.group()?;
                // Advance the round-robin only on success, so that `checkout` dials the
                // very slot found empty here and every slot gets its connection.
                let index = h2.next.load(Ordering::Relaxed);
                let guard = h2.slots[index % h2.slots.len()].try_lock().ok()?;
                let sender = guard.sender.as_ref().filter(|sender| !sender.is_closed())?;
                h2.next.fetch_add(1, Ordering::Relaxed);
                Some(Connection::H2(sender.clone()))
            }
        }
    }

    /// A connection, dialling one or waiting for one to be free as needed.
    pub(crate) async fn checkout(&self) -> io::Result<Connection> {
        match &self.kind {
            PoolKind::Http1(idle) => loop {
                // Own idle connection, else a new one, else another worker's idle one
                // (better than waiting for a free slot), else wait for either.
                let worker = crate::workers::current();
                if let Some((worker, sender)) = idle.take_ready(Some(worker)) {
                    return Ok(self.http1(worker, sender, idle));
                }
                if let Ok(permit) = idle.permits.clone().try_acquire_owned() {
                    let sender = self.dial_http1(permit).await?;
                    return Ok(self.http1(worker, sender, idle));
                }
                if let Some((worker, sender)) = idle.take_ready(None) {
                    return Ok(self.http1(worker, sender, idle));
                }
                tokio::select! {
                    permit = idle.permits.clone().acquire_owned() => {
                        let permit = permit.map_err(io::Error::other)?;
                        let sender = self.dial_http1(permit).await?;
                        return Ok(self.http1(worker, sender, idle));
                    }
                    () = idle.returned.notified() => {}
                }
            },
            PoolKind::H2(slots) => {
                let h2 = slots
                    .group()
                    .ok_or_else(|| io::Error::other("upstream connection pool poisoned"))?;
                let slot = &h2.slots[h2.next.fetch_add(1, Ordering::Relaxed) % h2.slots.len()];
                // Holding the slot while dialling makes concurrent requests share one dial.
                let queued_at = tokio::time::Instant::now();
                let mut guard = slot.lock().await;
                if let Some(sender) = guard.sender.as_ref().filter(|sender| !sender.is_closed()) {
                    return Ok(Connection::H2(sender.clone()));
                }
                guard.sender = None;
                if let Some((failed_at, kind, message)) = &guard.last_failure
                    && *failed_at >= queued_at
                {
                    return Err(io::Error::new(*kind, message.clone()));
                }
                match self.dial_h2().await {
                    Ok(sender) => {
                        guard.sender = Some(sender.clone());
                        guard.last_failure = None;
                        Ok(Connection::H2(sender))
                    }
                    Err(error) => {
                        guard.last_failure =
                            Some((tokio::time::Instant::now(), error.kind(), error.to_string()));
                        Err(error)
                    }
                }
            }
        }
    }

    fn http1(
        &self,
        worker: usize,
        sender: http1::SendRequest<BoxBody>,
        idle: &Arc<Http1Idle>,
    ) -> Connection {
        Connection::Http1 {
            worker,
            sender,
            idle: idle.clone(),
            tasks: self.tasks.clone(),
            cancel: self.cancel.clone(),
        }
    }

    async fn connect_tcp(&self) -> io::Result<TokioIo<TcpStream>> {
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(TokioIo::new(stream))
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no connection within {:?}", self.connect_timeout),
        )
    }

    async fn dial_http1(
        &self,
        permit: OwnedSemaphorePermit,
    ) -> io::Result<http1::SendRequest<BoxBody>> {
        let handshake = async {
            let io = self.connect_tcp().await?;
            http1::handshake::<_, BoxBody>(io)
                .await
                .map_err(io::Error::other)
        };
        let (sender, connection) = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| self.timed_out())??;
        let cancel = self.cancel.clone();
        let addr = self.addr;
        self.tasks.spawn(async move {
            tokio::select! {
                result = connection.with_upgrades() => {
                    if let Err(error) = result {
                        tracing::debug!(endpoint = %addr, %error, "upstream http1 connection ended");
                    }
                }
                () = cancel.cancelled() => {}
            }
            drop(permit);
        });
        Ok(sender)
    }

    async fn dial_h2(&self) -> io::Result<http2::SendRequest<BoxBody>> {
        let handshake = async {
            let io = self.connect_tcp().await?;
            http2::Builder::new(TrackedExecutor(self.tasks.clone()))
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
                .adaptive_window(true)
                .handshake::<_, BoxBody>(io)
                .await
                .map_err(io::Error::other)
        };
        let (sender, connection) = tokio::time::timeout(self.connect_timeout, handshake)
            .await
            .map_err(|_| self.timed_out())??;
        let cancel = self.cancel.clone();
        let addr = self.addr;
        self.tasks.spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(endpoint = %addr, %error, "upstream h2 connection ended");
                    }
                }
                () = cancel.cancelled() => {}
            }
        });
        Ok(sender)
    }
}

impl Connection {
    /// Sends `request` and waits for the response head. An HTTP/1.1 connection goes back
    /// to the idle pool once the response (and request) body has been fully transferred.
    pub(crate) async fn send(
        self,
        request: http::Request<BoxBody>,
    ) -> Result<http::Response<Incoming>, SendFailure> {
        match self {
            Connection::Http1 {
                worker,
                mut sender,
                idle,
                tasks,
                cancel,
            } => match sender.try_send_request(request).await {
                Ok(response) => {
                    tasks.spawn(async move {
                        tokio::select! {
                            ready = sender.ready() => {
                                if ready.is_ok() && !sender.is_closed() {
                                    idle.put(worker, sender);
                                }
                            }
                            () = cancel.cancelled() => {}
                        }
                    });
                    Ok(response)
                }
                Err(mut error) => Err(SendFailure {
                    unsent: error.take_message(),
                    error: error.into_error(),
                }),
            },
            Connection::H2(mut sender) => match sender.try_send_request(request).await {
                Ok(response) => Ok(response),
                Err(mut error) => Err(SendFailure {
                    unsent: error.take_message(),
                    error: error.into_error(),
                }),
            },
        }
    }
}

/// Shapes `request` for the wire protocol without touching anything HTTP does not require:
/// HTTP/1.1 gets origin form (and a `Host` header only when the request has none, since
/// HTTP/1.1 requires one); HTTP/2 gets an absolute URI, as `:scheme` and `:authority` are
/// mandatory, with the authority taken from `Host`, else the URI, else the endpoint.
pub(crate) fn adapt_request(
    protocol: UpstreamProtocol,
    endpoint: &http::uri::Authority,
    mut request: http::Request<BoxBody>,
) -> http::Request<BoxBody> {
    use http::header::HOST;
    use http::{Uri, Version};

    let uri = request.uri().clone();
    match protocol {
        UpstreamProtocol::Http1 => {
            if !matches!(request.version(), Version::HTTP_10 | Version::HTTP_11) {
                *request.version_mut() = Version::HTTP_11;
            }
            if !request.headers().contains_key(HOST) {
                let authority = uri.authority().unwrap_or(endpoint);
                if let Ok(value) = http::HeaderValue::from_str(authority.as_str()) {
                    request.headers_mut().insert(HOST, value);
                }
            }
            if uri.scheme().is_some() {
                let path = uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
                *request.uri_mut() = Uri::from(path);
            }
        }
        UpstreamProtocol::H2c => {
            *request.version_mut() = Version::HTTP_2;
            let authority = request
                .headers()
                .get(HOST)
                .and_then(|host| http::uri::Authority::try_from(host.as_bytes()).ok())
                .or_else(|| uri.authority().cloned())
                .unwrap_or_else(|| endpoint.clone());
            let path = uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = Some(authority);
            parts.path_and_query = Some(path);
            if let Ok(absolute) = Uri::from_parts(parts) {
                *request.uri_mut() = absolute;
            }
        }
    }
    request
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};

    fn request(uri: &str, host: Option<&str>) -> http::Request<BoxBody> {
        let mut builder = http::Request::get(uri);
        if let Some(host) = host {
            builder = builder.header("host", host);
        }
        builder
            .body(Empty::new().map_err(|never| match never {}).boxed_unsync())
            .unwrap()
    }

    #[test]
    fn http1_keeps_origin_form_and_headers() {
        let endpoint: http::uri::Authority = "10.0.0.1:80".parse().unwrap();
        let adapted = adapt_request(
            UpstreamProtocol::Http1,
            &endpoint,
            request("/a?b=1", Some("svc.example")),
        );
        assert_eq!(adapted.uri(), "/a?b=1");
        assert_eq!(adapted.headers().len(), 1);
        assert_eq!(adapted.headers()["host"], "svc.example");

        let adapted = adapt_request(
            UpstreamProtocol::Http1,
            &endpoint,
            request("http://svc.example:8080/x", None),
        );
        assert_eq!(adapted.uri(), "/x");
        assert_eq!(adapted.headers()["host"], "svc.example:8080");
        assert_eq!(adapted.version(), http::Version::HTTP_11);
    }

    #[test]
    fn h2_gets_absolute_uri_from_host_or_endpoint() {
        let endpoint: http::uri::Authority = "10.0.0.1:80".parse().unwrap();
        let adapted = adapt_request(
            UpstreamProtocol::H2c,
            &endpoint,
            request("/pkg.Svc/Call", Some("svc.example")),
        );
        assert_eq!(adapted.uri(), "http://svc.example/pkg.Svc/Call");
        assert_eq!(adapted.headers()["host"], "svc.example");
        assert_eq!(adapted.version(), http::Version::HTTP_2);

        let adapted = adapt_request(UpstreamProtocol::H2c, &endpoint, request("/x", None));
        assert_eq!(adapted.uri(), "http://10.0.0.1:80/x");
        assert!(adapted.headers().is_empty());
    }
}
