//! Upstream side of an exported service: composes pooled connections, per-request
//! power-of-two-choices balancing, active and passive health, circuit breaking and
//! retries into `Upstream::send`. Knows nothing about tunnels, ACLs or callers.

mod balancer;
mod breaker;
mod health;
mod pool;
mod progress;
mod resolver;
mod retry;
mod settings;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::StatusCode;

use crate::http::error::Reason;
use hyper::body::Incoming;
use rand::Rng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use breaker::OverloadLimit;
pub(crate) use settings::{
    CircuitBreakerSettings, HealthCheckSettings, PassiveHealthSettings, RetrySettings,
    UpstreamConfigError, UpstreamProtocol, UpstreamSettings,
};

use balancer::Endpoint;
use breaker::CircuitBreaker;
use health::{ActiveHealth, PassiveHealth};
use pool::{EndpointPool, adapt_request};
use progress::BodyProgress;
use resolver::{EndpointName, EndpointSet};
use retry::RetryPolicy;

/// Request and response bodies are the bridge's one body type (streaming, boxed).
pub(crate) use crate::http::body::{BodyError, BoxBody};

/// A response head from an endpoint; the body streams from the upstream connection.
#[derive(Debug)]
pub(crate) struct UpstreamResponse {
    pub(crate) response: http::Response<Incoming>,
    /// The endpoint that answered.
    pub(crate) endpoint: SocketAddr,
    /// Attempts made, 1 when the first one answered.
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the retry unit tests read it; Debug shows it")
    )]
    pub(crate) attempts: u32,
}

/// Why a request got no response from the upstream. `reason()` gives what the bridge answers
/// the caller (status, gRPC code and `x-hybridge-error`).
#[derive(thiserror::Error, Debug)]
pub(crate) enum UpstreamError {
    #[error("service {service}: overloaded, circuit_breaker.{limit} reached")]
    Overloaded {
        service: String,
        limit: OverloadLimit,
    },
    #[error("service {service}: no healthy upstream endpoint")]
    NoHealthyEndpoint { service: String },
    #[error("upstream {endpoint}: connect failed: {source}")]
    Connect {
        endpoint: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream {endpoint}: no response head within {after:?} of the request being sent")]
    Timeout {
        endpoint: SocketAddr,
        after: Duration,
    },
    /// The caller's own deadline (the importing listener's `request_timeout`) passed, counted
    /// like `Timeout` from when the request was sent whole.
    #[error("no upstream response within {after:?} of the request being sent")]
    DeadlineExceeded { after: Duration },
    /// The caller sent no request body bytes for `request_body_idle_timeout`.
    #[error("the request body stalled: no bytes arrived for {after:?}")]
    RequestBodyStalled { after: Duration },
    #[error("upstream {endpoint}: connection closed or reset before the response head: {source}")]
    Reset {
        endpoint: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("service {service}: upstream is shutting down")]
    ShuttingDown { service: String },
    /// The request body stopped arriving (the caller went away mid-request): not the
    /// endpoint's failure, and nobody is left to retry for.
    #[error("the caller went away before the upstream answered: {detail}")]
    ClientAborted { detail: String },
}

/// The error a request body yields when it did not arrive whole because its sender went
/// away. `Upstream::send` recognises it in a failed attempt and blames nobody.
#[derive(Debug, thiserror::Error)]
#[error("request body aborted: {0}")]
pub(crate) struct RequestBodyAborted(pub(crate) String);

/// The `RequestBodyAborted` somewhere in `error`'s source chain, if any.
fn body_aborted<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a RequestBodyAborted> {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(aborted) = current.downcast_ref::<RequestBodyAborted>() {
            return Some(aborted);
        }
        next = current.source();
    }
    None
}

impl UpstreamError {
    /// What the bridge answers the caller with: status, gRPC code and `x-hybridge-error`.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            Self::Overloaded { .. } => Reason::Overloaded,
            Self::NoHealthyEndpoint { .. } => Reason::NoHealthyUpstream,
            Self::Connect { .. } => Reason::UpstreamConnectFailed,
            Self::Timeout { .. } => Reason::UpstreamTimeout,
            Self::DeadlineExceeded { .. } => Reason::Timeout,
            Self::RequestBodyStalled { .. } => Reason::RequestBodyTimeout,
            Self::Reset { .. } => Reason::UpstreamReset,
            Self::ShuttingDown { .. } => Reason::ShuttingDown,
            Self::ClientAborted { .. } => Reason::ClientAborted,
        }
    }

    /// Failures another attempt may cure (on another endpoint or a fresh connection).
    fn is_retryable(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Reset { .. })
    }

    /// Failures that count against the endpoint's passive health.
    fn blames_endpoint(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Reset { .. } | Self::Timeout { .. }
        )
    }
}

/// Snapshot of one service's upstream, for `/v1/status` and metrics.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamStats {
    pub(crate) service: String,
    /// One per address, ordered by configured name, then address.
    pub endpoints: Vec<EndpointStats>,
    /// One per configured `endpoints` entry, in configuration order.
    pub(crate) names: Vec<EndpointNameStats>,
    /// Requests in flight (until their response head).
    pub(crate) active_requests: usize,
    /// Requests waiting for a connection.
    pub(crate) pending_requests: usize,
    pub(crate) circuit_breaker_trips: u64,
    pub(crate) retries: u64,
}

/// Snapshot of one endpoint (one address of a configured name).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EndpointStats {
    /// The configured `host:port` this address was resolved from.
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    /// Verdict of active health checks (always true without them).
    pub healthy: bool,
    /// Currently ejected by passive health.
    pub ejected: bool,
    pub(crate) active: usize,
    pub(crate) total_requests: u64,
    pub failures: u64,
    /// HTTP/1.1 keep-alive connections waiting for a request (0 for h2c).
    pub(crate) idle_connections: usize,
}

/// Snapshot of one configured `endpoints` entry: its addresses and its lookups.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct EndpointNameStats {
    /// As configured (`host:port`).
    pub(crate) name: String,
    /// True for a host name looked up again every `dns_refresh`; false for an IP address,
    /// or with `dns_refresh = "0s"`.
    pub(crate) refreshed: bool,
    /// The addresses requests go to now, sorted.
    pub(crate) addresses: Vec<SocketAddr>,
    /// Requests sent to every address this name has had, including ones it lost.
    pub(crate) total_requests: u64,
    /// Failures of every address this name has had, including ones it lost.
    pub(crate) failures: u64,
    /// Lookups that failed (the name kept its last addresses each time).
    pub(crate) dns_failures: u64,
    /// Why the last lookup failed; `None` when it succeeded.
    pub(crate) dns_error: Option<String>,
}

/// The upstream of one exported service, shared by all requests to it.
pub struct Upstream {
    service: String,
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    max_connections: usize,
    /// The configured `endpoints` entries, in order; `Endpoint::name` indexes this.
    names: Vec<EndpointName>,
    set: ArcSwap<EndpointSet>,
    /// Serialises changes of `set`.
    changing: std::sync::Mutex<()>,
    /// Re-resolution interval; `None` when nothing is looked up again.
    dns_refresh: Option<Duration>,
    /// Held for a whole re-resolution round, so rounds never interleave.
    dns_round: tokio::sync::Mutex<()>,
    breaker: CircuitBreaker,
    retry: RetryPolicy,
    passive: PassiveHealth,
    active_health: Option<ActiveHealth>,
    health_rounds: watch::Sender<u64>,
    head_timeout: Option<Duration>,
    body_idle_timeout: Option<Duration>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// One failed attempt, with the request when it never reached the wire.
struct AttemptFailure {
    error: UpstreamError,
    unsent: Option<http::Request<BoxBody>>,
}

impl Upstream {
    /// Validates `settings`, resolves every endpoint name (each host name stands for all
    /// its addresses) and starts the active health checker and the re-resolution loop when
    /// configured. Connections are dialled on demand. Everything this upstream spawns stops
    /// when `cancel` fires or the upstream is dropped.
    pub(crate) async fn start(
        service: &str,
        settings: &UpstreamSettings,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, UpstreamConfigError> {
        settings.validate(service)?;
        let cancel = cancel.child_token();
        let tasks = TaskTracker::new();
        let names: Vec<EndpointName> = settings.endpoints.iter().map(EndpointName::new).collect();
        let lookups = futures_util::future::join_all(names.iter().map(EndpointName::lookup)).await;
        let mut endpoints = Vec::new();
        let mut pools = Vec::new();
        for (index, (name, lookup)) in names.iter().zip(lookups).enumerate() {
            let addresses = lookup.map_err(|source| UpstreamConfigError::Resolve {
                service: service.to_owned(),
                endpoint: name.name.clone(),
                source,
            })?;
            for addr in addresses {
                endpoints.push(Arc::new(Endpoint::new(index, addr, name.authority.clone())));
                pools.push(Arc::new(EndpointPool::new(
                    addr,
                    settings.protocol,
                    settings.connect_timeout,
                    settings.circuit_breaker.max_connections,
                    tasks.clone(),
                    cancel.clone(),
                )));
            }
        }
        let dns_refresh = (!settings.dns_refresh.is_zero()
            && names.iter().any(EndpointName::is_host_name))
        .then_some(settings.dns_refresh);
        let upstream = Arc::new(Self {
            service: service.to_owned(),
            protocol: settings.protocol,
            connect_timeout: settings.connect_timeout,
            max_connections: settings.circuit_breaker.max_connections,
            names,
            set: ArcSwap::from_pointee(EndpointSet { endpoints, pools }),
            changing: std::sync::Mutex::new(()),
            dns_refresh,
            dns_round: tokio::sync::Mutex::new(()),
            breaker: CircuitBreaker::new(
                settings.circuit_breaker.max_active_requests,
                settings.circuit_breaker.max_pending_requests,
            ),
            retry: RetryPolicy::new(&settings.retry),
            passive: PassiveHealth::new(settings.passive_health.clone()),
            active_health: settings.health_check.clone().map(ActiveHealth::new),
            health_rounds: watch::Sender::new(0),
            head_timeout: settings.response_head_timeout(),
            body_idle_timeout: settings.body_idle_timeout(),
            tasks,
            cancel,
        });
        if let Some(active) = &upstream.active_health {
            let interval = active.interval();
            let weak = Arc::downgrade(&upstream);
            let cancel = upstream.cancel.clone();
            upstream
                .tasks
                .spawn(run_health_checks(weak, interval, cancel));
        }
        if let Some(interval) = upstream.dns_refresh {
            let weak = Arc::downgrade(&upstream);
            let cancel = upstream.cancel.clone();
            upstream
                .tasks
                .spawn(resolver::run_dns_refresh(weak, interval, cancel));
        }
        Ok(upstream)
    }

    /// A pool for a new address, dialled on demand.
    fn new_pool(&self, addr: SocketAddr) -> EndpointPool {
        EndpointPool::new(
            addr,
            self.protocol,
            self.connect_timeout,
            self.max_connections,
            self.tasks.clone(),
            self.cancel.clone(),
        )
    }

    /// Sends `request` to one endpoint chosen for this request, retrying where safe, and
    /// returns the response head. Never waits on a full breaker: over a limit it answers
    /// `Overloaded` at once.
    #[cfg(test)]
    pub(crate) async fn send(
        &self,
        request: http::Request<BoxBody>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        self.send_within(request, None).await
    }

    /// [`Upstream::send`], also bounded by the caller's `deadline` for the response head.
    /// Both it and `request_timeout` start once the request has been handed whole to the
    /// upstream connection, so a slow upload is bounded by `request_body_idle_timeout` (no
    /// bytes for that long), not by the time the whole body takes.
    pub(crate) async fn send_within(
        &self,
        request: http::Request<BoxBody>,
        deadline: Option<Duration>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        if self.cancel.is_cancelled() {
            return Err(UpstreamError::ShuttingDown {
                service: self.service.clone(),
            });
        }
        let _active = self
            .breaker
            .try_active()
            .map_err(|limit| self.overloaded(limit))?;
        let (request, body) = progress::track(request, self.body_idle_timeout);
        // The head of a replayable request is kept to rebuild it for retries.
        let template = retry::is_replayable(&request).then(|| ReplayTemplate::of(&request));
        let mut request = request;
        // Every attempt picks from the set in force when the request began, so `tried`
        // keeps naming the same endpoints while names are re-resolved.
        let set = self.set.load_full();
        let mut tried: Vec<usize> = Vec::new();
        let mut attempts = 0u32;
        // Held while a retry is in flight: the budget counts concurrent retries.
        let mut _retry_token = None;
        loop {
            attempts += 1;
            let index = balancer::pick(&set.endpoints, &tried).ok_or_else(|| {
                UpstreamError::NoHealthyEndpoint {
                    service: self.service.clone(),
                }
            })?;
            let endpoint = &set.endpoints[index];
            // The deadlines are shared by all attempts: they count from when the body was
            // sent, which a later attempt (body-less, or never sent) does not move.
            let result = tokio::select! {
                biased;
                result = self.attempt(&set, index, request, &body) => result,
                error = self.expired(&body, deadline, endpoint.addr) => {
                    Err(Box::new(AttemptFailure { error, unsent: None }))
                }
            };
            let may_retry = attempts < self.retry.max_attempts();
            match result {
                Ok(response) => {
                    let status = response.status();
                    if status.is_server_error() {
                        self.passive
                            .record_failure(&self.service, &set.endpoints, index);
                    } else {
                        self.passive.record_success(endpoint);
                    }
                    if status == StatusCode::SERVICE_UNAVAILABLE
                        && may_retry
                        && let Some(template) = &template
                        && let Some(token) = self.retry.try_budget(self.breaker.active())
                    {
                        tracing::debug!(service = %self.service, endpoint = %endpoint.addr, attempts, "retrying after 503");
                        _retry_token = Some(token);
                        tried.push(index);
                        request = template.rebuild();
                        continue;
                    }
                    return Ok(UpstreamResponse {
                        response,
                        endpoint: endpoint.addr,
                        attempts,
                    });
                }
                Err(failure) => {
                    let AttemptFailure { error, unsent } = *failure;
                    if error.blames_endpoint() {
                        self.passive
                            .record_failure(&self.service, &set.endpoints, index);
                    }
                    if !error.is_retryable() || !may_retry {
                        return Err(error);
                    }
                    // A request that never reached the wire is safe to send again whatever
                    // its method; otherwise only a rebuilt body-less idempotent request is.
                    let Some(again) =
                        unsent.or_else(|| template.as_ref().map(ReplayTemplate::rebuild))
                    else {
                        return Err(error);
                    };
                    let Some(token) = self.retry.try_budget(self.breaker.active()) else {
                        return Err(error);
                    };
                    tracing::debug!(service = %self.service, endpoint = %endpoint.addr, %error, attempts, "retrying");
                    _retry_token = Some(token);
                    tried.push(index);
                    request = again;
                }
            }
        }
    }

    /// Resolves with the error of the first response deadline to pass (`request_timeout`,
    /// then the caller's `deadline`), both counted from when `body` was sent whole; pending
    /// without deadlines.
    async fn expired(
        &self,
        body: &BodyProgress,
        deadline: Option<Duration>,
        endpoint: SocketAddr,
    ) -> UpstreamError {
        let sent = body.sent().await;
        // An absurdly long timeout that overflows the clock means no deadline.
        let head = self.head_timeout.and_then(|after| {
            let at = sent.checked_add(after)?;
            Some((at, UpstreamError::Timeout { endpoint, after }))
        });
        let caller = deadline.and_then(|after| {
            let at = sent.checked_add(after)?;
            Some((at, UpstreamError::DeadlineExceeded { after }))
        });
        let first = match (head, caller) {
            (Some(head), Some(caller)) => Some(if caller.0 < head.0 { caller } else { head }),
            (head, caller) => head.or(caller),
        };
        match first {
            Some((at, error)) => {
                tokio::time::sleep_until(at).await;
                error
            }
            None => std::future::pending().await,
        }
    }

    /// One attempt on `set.endpoints[index]`, up to the response head.
    async fn attempt(
        &self,
        set: &EndpointSet,
        index: usize,
        request: http::Request<BoxBody>,
        body: &BodyProgress,
    ) -> Result<http::Response<Incoming>, Box<AttemptFailure>> {
        let endpoint = &set.endpoints[index];
        let pool = &set.pools[index];
        let _in_flight = endpoint.begin();
        let connection = match pool.try_checkout() {
            Some(connection) => connection,
            None => {
                let _pending = match self.breaker.try_pending() {
                    Ok(slot) => slot,
                    Err(limit) => {
                        return Err(Box::new(AttemptFailure {
                            error: self.overloaded(limit),
                            unsent: Some(request),
                        }));
                    }
                };
                match pool.checkout().await {
                    Ok(connection) => connection,
                    Err(source) => {
                        return Err(Box::new(AttemptFailure {
                            error: UpstreamError::Connect {
                                endpoint: endpoint.addr,
                                source,
                            },
                            unsent: Some(request),
                        }));
                    }
                }
            }
        };
        let request = adapt_request(self.protocol, &endpoint.authority, request);
        connection.send(request).await.map_err(|failure| {
            // The body's own record first: over h2 the connection reports a stalled body as
            // a stream reset, without the cause.
            let error = match (body.stalled(), body_aborted(&failure.error)) {
                (Some(after), _) => UpstreamError::RequestBodyStalled { after },
                (None, Some(aborted)) => UpstreamError::ClientAborted {
                    detail: aborted.0.clone(),
                },
                (None, None) => UpstreamError::Reset {
                    endpoint: endpoint.addr,
                    source: failure.error,
                },
            };
            Box::new(AttemptFailure {
                error,
                unsent: failure.unsent,
            })
        })
    }

    fn overloaded(&self, limit: OverloadLimit) -> UpstreamError {
        UpstreamError::Overloaded {
            service: self.service.clone(),
            limit,
        }
    }

    /// Runs one round of active health checks now (no-op without `health_check`) and
    /// returns when every endpoint's verdict is updated.
    pub(crate) async fn check_now(&self) {
        if let Some(active) = &self.active_health {
            let set = self.set.load_full();
            active
                .run_round(&self.service, self.protocol, &set.endpoints, &set.pools)
                .await;
            self.health_rounds.send_modify(|rounds| *rounds += 1);
        }
    }

    /// Counts completed health check rounds; changes after each one.
    #[cfg(test)]
    pub(crate) fn subscribe_health(&self) -> watch::Receiver<u64> {
        self.health_rounds.subscribe()
    }

    /// Counters and health of this upstream now.
    pub fn stats(&self) -> UpstreamStats {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::Instant::now();
        // Under the lock that changes the set, a departed address is counted once: in the
        // set or in its name's retired totals, never neither (a counter must not go down).
        let changing = self.changing.lock();
        let set = self.set.load_full();
        let name_of = |endpoint: &Endpoint| {
            self.names
                .get(endpoint.name)
                .map(|name| name.name.clone())
                .unwrap_or_default()
        };
        let names = self
            .names
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let current = set.endpoints.iter().filter(|e| e.name == index);
                EndpointNameStats {
                    name: name.name.clone(),
                    refreshed: name.is_host_name() && self.dns_refresh.is_some(),
                    addresses: set.addresses_of(index),
                    total_requests: name.retired_requests.load(Relaxed)
                        + current.clone().map(|e| e.total.load(Relaxed)).sum::<u64>(),
                    failures: name.retired_failures.load(Relaxed)
                        + current.map(|e| e.failures.load(Relaxed)).sum::<u64>(),
                    dns_failures: name.dns_failures.load(Relaxed),
                    dns_error: name.dns_error(),
                }
            })
            .collect();
        drop(changing);
        UpstreamStats {
            service: self.service.clone(),
            names,
            endpoints: set
                .endpoints
                .iter()
                .zip(&set.pools)
                .map(|(endpoint, pool)| EndpointStats {
                    name: name_of(endpoint),
                    addr: endpoint.addr,
                    healthy: endpoint.is_healthy(),
                    ejected: endpoint.is_ejected(now),
                    active: endpoint.active(),
                    total_requests: endpoint.total.load(Relaxed),
                    failures: endpoint.failures.load(Relaxed),
                    idle_connections: pool.idle_connections(),
                })
                .collect(),
            active_requests: self.breaker.active(),
            pending_requests: self.breaker.pending(),
            circuit_breaker_trips: self.breaker.trips(),
            retries: self.retry.total(),
        }
    }

    /// Stops health checks and closes every connection, then waits for all spawned tasks.
    /// Responses already returned stop streaming.
    #[cfg(test)]
    pub(crate) async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("service", &self.service)
            .field("protocol", &self.protocol)
            .field(
                "endpoints",
                &self
                    .set
                    .load()
                    .endpoints
                    .iter()
                    .map(|e| e.addr)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Active health check loop: a round at start, then one per `interval` (±10% jitter so
/// many bridges do not probe in lockstep). Holds the upstream only during a round.
async fn run_health_checks(
    upstream: Weak<Upstream>,
    interval: Duration,
    cancel: CancellationToken,
) {
    loop {
        let Some(strong) = upstream.upgrade() else {
            return;
        };
        tokio::select! {
            () = strong.check_now() => {}
            () = cancel.cancelled() => return,
        }
        drop(strong);
        let factor: f64 = rand::rng().random_range(0.9..=1.1);
        let wait = Duration::try_from_secs_f64(interval.as_secs_f64() * factor).unwrap_or(interval);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Method, URI, version and headers of a body-less request, kept to send it again on a
/// retry: the request itself went to the failed attempt.
struct ReplayTemplate {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl ReplayTemplate {
    fn of<B>(request: &http::Request<B>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: request.headers().clone(),
        }
    }

    fn rebuild(&self) -> http::Request<BoxBody> {
        let mut request = http::Request::new(crate::http::body::empty());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}
