//! Endpoint names and the addresses they stand for: looking a configured `host:port` up, the
//! pure diff that turns a name's new addresses into a new endpoint set keeping the state of
//! the addresses that stay, and the loop that re-resolves names on an interval. Picks no
//! endpoint and dials nothing.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::Upstream;
use super::balancer::Endpoint;
use super::pool::EndpointPool;
use crate::config::HostPort;

/// Bound on one lookup of one name.
pub(crate) const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most addresses one name contributes (the lowest ones): an answer cannot grow the endpoint
/// set, its pools and its health checks without bound.
pub(crate) const MAX_ADDRESSES_PER_NAME: usize = 64;
/// While a name keeps failing to resolve, its warning is repeated at most this often (every
/// failure is counted in `dns_failures`).
const FAILURE_WARNING_INTERVAL: Duration = Duration::from_secs(300);

/// One configured `host:port` entry of `endpoints` and what its lookups did.
pub(crate) struct EndpointName {
    /// As configured.
    pub(crate) name: String,
    /// Sent as authority when a request has none.
    pub(crate) authority: http::uri::Authority,
    /// The address of an IP literal, which is never looked up.
    literal: Option<SocketAddr>,
    /// Lookups that failed (error, timeout or no address).
    pub(crate) dns_failures: AtomicU64,
    /// Requests to and failures of addresses this name no longer resolves to, so that the
    /// name's totals never go down.
    pub(crate) retired_requests: AtomicU64,
    pub(crate) retired_failures: AtomicU64,
    /// Set while the last lookup failed.
    failing: Mutex<Option<Failing>>,
}

/// A name whose last lookup failed.
struct Failing {
    error: String,
    last_warned: Instant,
}

impl EndpointName {
    /// The name of a configured endpoint, not yet looked up.
    pub(crate) fn new(endpoint: &HostPort) -> Self {
        let literal = endpoint
            .host()
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, endpoint.port()));
        Self {
            name: endpoint.to_string(),
            authority: endpoint.authority(),
            literal,
            dns_failures: AtomicU64::new(0),
            retired_requests: AtomicU64::new(0),
            retired_failures: AtomicU64::new(0),
            failing: Mutex::new(None),
        }
    }

    /// A host name (looked up again on refresh), not an IP address.
    pub(crate) fn is_host_name(&self) -> bool {
        self.literal.is_none()
    }

    /// The addresses of this name now: the IP literal itself, or every address the system
    /// resolver returns of the family it ranks first (RFC 6724 puts the family this host
    /// cannot reach last), sorted, without duplicates, at most `MAX_ADDRESSES_PER_NAME`.
    pub(crate) async fn lookup(&self) -> io::Result<Vec<SocketAddr>> {
        if let Some(addr) = self.literal {
            return Ok(vec![addr]);
        }
        let answer =
            tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(self.name.as_str()))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("DNS lookup timed out after {RESOLVE_TIMEOUT:?}"),
                    )
                })??;
        let answer: Vec<SocketAddr> = answer.collect();
        let Some(first) = answer.first() else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no addresses"));
        };
        let ipv4 = first.is_ipv4();
        let mut addresses: Vec<SocketAddr> = answer
            .into_iter()
            .filter(|addr| addr.is_ipv4() == ipv4)
            .collect();
        addresses.sort_unstable();
        addresses.dedup();
        addresses.truncate(MAX_ADDRESSES_PER_NAME);
        Ok(addresses)
    }

    /// Counts a failed lookup; true when it should be logged as a warning: the first of a
    /// run, then at most every `FAILURE_WARNING_INTERVAL`.
    fn record_failure(&self, error: &io::Error, now: Instant) -> bool {
        self.dns_failures.fetch_add(1, Ordering::Relaxed);
        let Ok(mut failing) = self.failing.lock() else {
            return true;
        };
        match failing.as_mut() {
            Some(state)
                if now.saturating_duration_since(state.last_warned) < FAILURE_WARNING_INTERVAL =>
            {
                state.error = error.to_string();
                false
            }
            _ => {
                *failing = Some(Failing {
                    error: error.to_string(),
                    last_warned: now,
                });
                true
            }
        }
    }

    /// Records a good lookup; returns the error the name was failing with, if it was.
    fn record_success(&self) -> Option<String> {
        self.failing
            .lock()
            .ok()
            .and_then(|mut failing| failing.take())
            .map(|state| state.error)
    }

    /// Why the last lookup failed; `None` when it succeeded.
    pub(crate) fn dns_error(&self) -> Option<String> {
        self.failing
            .lock()
            .ok()
            .and_then(|failing| failing.as_ref().map(|state| state.error.clone()))
    }
}

/// The endpoints requests are balanced over, ordered by configured name, then address. It
/// is replaced whole when a name's addresses change; a request keeps the set it started
/// with for all its attempts.
pub(crate) struct EndpointSet {
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    /// `pools[i]` holds the connections to `endpoints[i]`.
    pub(crate) pools: Vec<Arc<EndpointPool>>,
}

/// An endpoint that left the set, with its connections.
pub(crate) type Departed = (Arc<Endpoint>, Arc<EndpointPool>);

impl EndpointSet {
    /// Addresses of the configured name at position `name`, sorted.
    pub(crate) fn addresses_of(&self, name: usize) -> Vec<SocketAddr> {
        let mut addresses: Vec<SocketAddr> = self
            .endpoints
            .iter()
            .filter(|endpoint| endpoint.name == name)
            .map(|endpoint| endpoint.addr)
            .collect();
        addresses.sort_unstable();
        addresses
    }

    /// This set with the addresses of name `name` replaced by `addresses`. An address that
    /// stays keeps its endpoint (health, ejection, counters) and pool (its connections);
    /// `make` builds the endpoint of a new one. Returns the new set and the endpoints that
    /// left it.
    pub(crate) fn with_addresses(
        &self,
        name: usize,
        addresses: &[SocketAddr],
        mut make: impl FnMut(SocketAddr) -> (Arc<Endpoint>, Arc<EndpointPool>),
    ) -> (EndpointSet, Vec<Departed>) {
        let mut members: Vec<(Arc<Endpoint>, Arc<EndpointPool>)> = Vec::new();
        let mut departed = Vec::new();
        for (endpoint, pool) in self.endpoints.iter().zip(&self.pools) {
            let member = (endpoint.clone(), pool.clone());
            if endpoint.name != name || addresses.contains(&endpoint.addr) {
                members.push(member);
            } else {
                departed.push(member);
            }
        }
        for &addr in addresses {
            let known = members
                .iter()
                .any(|(endpoint, _)| endpoint.name == name && endpoint.addr == addr);
            if !known {
                members.push(make(addr));
            }
        }
        members.sort_by_key(|(endpoint, _)| (endpoint.name, endpoint.addr));
        let (endpoints, pools) = members.into_iter().unzip();
        (EndpointSet { endpoints, pools }, departed)
    }
}

impl Upstream {
    /// Looks every host name up once, now, and returns once the answers are applied: the
    /// endpoint set follows each name that resolved, and a name that failed keeps its last
    /// addresses. Rounds never interleave.
    pub(crate) async fn refresh_addresses(&self) {
        let _round = self.dns_round.lock().await;
        let lookups = self
            .names
            .iter()
            .enumerate()
            .filter(|(_, name)| name.is_host_name())
            .map(|(index, name)| async move { (index, name.lookup().await) });
        for (index, result) in futures_util::future::join_all(lookups).await {
            self.apply_lookup(index, result);
        }
    }

    /// Applies one lookup of the name at position `index`.
    pub(crate) fn apply_lookup(&self, index: usize, result: io::Result<Vec<SocketAddr>>) {
        let name = &self.names[index];
        let addresses = match result {
            Ok(addresses) if !addresses.is_empty() => addresses,
            Ok(_) => {
                let error = io::Error::new(io::ErrorKind::NotFound, "no addresses");
                return self.lookup_failed(index, &error);
            }
            Err(error) => return self.lookup_failed(index, &error),
        };
        if let Some(error) = name.record_success() {
            tracing::info!(service = %self.service, endpoint = %name.name, %error, "upstream endpoint name resolves again");
        }
        let Ok(_changing) = self.changing.lock() else {
            return;
        };
        let current = self.set.load_full();
        let before = current.addresses_of(index);
        if before == addresses {
            return;
        }
        let (next, departed) = current.with_addresses(index, &addresses, |addr| {
            (
                Arc::new(Endpoint::new(index, addr, name.authority.clone())),
                Arc::new(self.new_pool(addr)),
            )
        });
        self.set.store(Arc::new(next));
        for (endpoint, pool) in departed {
            name.retired_requests
                .fetch_add(endpoint.total.load(Ordering::Relaxed), Ordering::Relaxed);
            name.retired_failures
                .fetch_add(endpoint.failures.load(Ordering::Relaxed), Ordering::Relaxed);
            pool.retire();
        }
        tracing::info!(service = %self.service, endpoint = %name.name, ?before, after = ?addresses, "upstream endpoint addresses changed");
    }

    fn lookup_failed(&self, index: usize, error: &io::Error) {
        let name = &self.names[index];
        let keeping = self.set.load().addresses_of(index);
        if name.record_failure(error, Instant::now()) {
            tracing::warn!(service = %self.service, endpoint = %name.name, %error, ?keeping, "upstream endpoint name did not resolve; keeping its last addresses");
        } else {
            tracing::debug!(service = %self.service, endpoint = %name.name, %error, "upstream endpoint name still does not resolve");
        }
    }
}

/// Re-resolution loop: a round every `interval` (±10% jitter so many bridges do not query
/// in lockstep). Holds the upstream only during a round.
pub(crate) async fn run_dns_refresh(
    upstream: Weak<Upstream>,
    interval: Duration,
    cancel: CancellationToken,
) {
    loop {
        let factor: f64 = rand::rng().random_range(0.9..=1.1);
        let wait = Duration::try_from_secs_f64(interval.as_secs_f64() * factor).unwrap_or(interval);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => return,
        }
        let Some(strong) = upstream.upgrade() else {
            return;
        };
        tokio::select! {
            () = strong.refresh_addresses() => {}
            () = cancel.cancelled() => return,
        }
    }
}
