//! Endpoint health: active checks (`GET path` per endpoint with interval, timeout and
//! thresholds) and passive outlier ejection from real traffic. Decides health; does not
//! pick endpoints.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};

use super::balancer::Endpoint;
use super::pool::{EndpointPool, adapt_request};
use super::settings::{HealthCheckSettings, PassiveHealthSettings, UpstreamProtocol};

/// Health check response bodies are read (so HTTP/1.1 connections can be reused) up to
/// this size, then dropped.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// Consecutive results of active checks against one endpoint (kept in the endpoint, so an
/// address that stays in a re-resolved set keeps its streak).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Streak {
    successes: u32,
    failures: u32,
}

/// Active health checking state of one service.
pub(crate) struct ActiveHealth {
    settings: HealthCheckSettings,
    /// Locked for a whole round, so rounds never interleave.
    round: tokio::sync::Mutex<()>,
}

impl ActiveHealth {
    pub(crate) fn new(settings: HealthCheckSettings) -> Self {
        Self {
            settings,
            round: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn interval(&self) -> std::time::Duration {
        self.settings.interval
    }

    /// Checks every endpoint once, concurrently, and applies the thresholds.
    pub(crate) async fn run_round(
        &self,
        service: &str,
        protocol: UpstreamProtocol,
        endpoints: &[Arc<Endpoint>],
        pools: &[Arc<EndpointPool>],
    ) {
        let _round = self.round.lock().await;
        let probes = endpoints
            .iter()
            .zip(pools)
            .map(|(endpoint, pool)| self.probe(protocol, endpoint, pool));
        let results = futures_util::future::join_all(probes).await;
        for (endpoint, passed) in endpoints.iter().zip(results) {
            let Ok(mut streak) = endpoint.streak.lock() else {
                continue;
            };
            let healthy = endpoint.is_healthy();
            if passed {
                streak.failures = 0;
                streak.successes = streak.successes.saturating_add(1);
                if !healthy && streak.successes >= self.settings.healthy_threshold {
                    endpoint.healthy.store(true, Ordering::Release);
                    tracing::info!(service, endpoint = %endpoint.addr, "upstream endpoint healthy again");
                }
            } else {
                streak.successes = 0;
                streak.failures = streak.failures.saturating_add(1);
                if healthy && streak.failures >= self.settings.unhealthy_threshold {
                    endpoint.healthy.store(false, Ordering::Release);
                    tracing::warn!(service, endpoint = %endpoint.addr, path = %self.settings.path, "upstream endpoint failed health checks");
                }
            }
        }
    }

    /// One `GET path`: passes on a 200-399 status within the timeout.
    async fn probe(
        &self,
        protocol: UpstreamProtocol,
        endpoint: &Endpoint,
        pool: &EndpointPool,
    ) -> bool {
        let check = async {
            let connection = match pool.try_checkout() {
                Some(connection) => connection,
                None => pool.checkout().await.ok()?,
            };
            let request = http::Request::get(self.settings.path.as_str())
                .body(
                    Empty::<Bytes>::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .ok()?;
            let request = adapt_request(protocol, &endpoint.authority, request);
            let response = connection.send(request).await.ok()?;
            let status = response.status();
            let _ = Limited::new(response.into_body(), MAX_HEALTH_BODY)
                .collect()
                .await;
            Some((200..400).contains(&status.as_u16()))
        };
        matches!(
            tokio::time::timeout(self.settings.timeout, check).await,
            Ok(Some(true))
        )
    }
}

/// Passive outlier ejection of one service.
pub(crate) struct PassiveHealth {
    settings: PassiveHealthSettings,
    /// Serialises ejection decisions so the ejection cap holds under concurrency.
    ejecting: Mutex<()>,
}

impl PassiveHealth {
    pub(crate) fn new(settings: PassiveHealthSettings) -> Self {
        Self {
            settings,
            ejecting: Mutex::new(()),
        }
    }

    /// Resets the failure streak. A success after an ejection has expired also lowers
    /// the ejection multiplier by one step, so a recovered endpoint is forgiven over time.
    pub(crate) fn record_success(&self, endpoint: &Endpoint) {
        if let Ok(mut outlier) = endpoint.outlier.lock() {
            outlier.consecutive_failures = 0;
            if outlier
                .ejected_until
                .is_some_and(|until| until <= Instant::now())
            {
                outlier.ejected_until = None;
                outlier.times_ejected = outlier.times_ejected.saturating_sub(1);
            }
        }
    }

    /// Counts a failure (connect error, reset, timeout, 5xx) against `endpoints[index]`
    /// and ejects it once it has failed `consecutive_failures` times in a row, unless
    /// that would eject more than `max_ejection_percent` of the endpoints.
    pub(crate) fn record_failure(&self, service: &str, endpoints: &[Arc<Endpoint>], index: usize) {
        let endpoint = &endpoints[index];
        endpoint.failures.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let reached = match endpoint.outlier.lock() {
            Ok(mut outlier) => {
                outlier.consecutive_failures = outlier.consecutive_failures.saturating_add(1);
                outlier.consecutive_failures >= self.settings.consecutive_failures
                    && !outlier.is_ejected(now)
            }
            Err(_) => false,
        };
        if !reached {
            return;
        }
        let Ok(_deciding) = self.ejecting.lock() else {
            return;
        };
        let ejected = endpoints
            .iter()
            .filter(|other| other.is_ejected(now))
            .count();
        let percent = self.settings.max_ejection_percent as usize;
        let allowed = if percent == 0 {
            0
        } else {
            (endpoints.len() * percent / 100).max(1)
        };
        if ejected >= allowed {
            return;
        }
        if let Ok(mut outlier) = endpoint.outlier.lock() {
            outlier.times_ejected = outlier.times_ejected.saturating_add(1);
            let duration = self
                .settings
                .base_ejection
                .saturating_mul(outlier.times_ejected)
                .min(self.settings.max_ejection);
            outlier.ejected_until = Some(now.checked_add(duration).unwrap_or(now));
            outlier.consecutive_failures = 0;
            tracing::warn!(service, endpoint = %endpoint.addr, ?duration, "upstream endpoint ejected after consecutive failures");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::upstream::tests::endpoints;
    use std::time::Duration;

    #[test]
    fn ejects_after_consecutive_failures_within_the_cap() {
        let passive = PassiveHealth::new(PassiveHealthSettings::default());
        let endpoints = endpoints(3);
        let now = Instant::now();
        for _ in 0..4 {
            passive.record_failure("s", &endpoints, 0);
        }
        passive.record_success(&endpoints[0]);
        passive.record_failure("s", &endpoints, 0);
        assert!(!endpoints[0].is_ejected(now), "a success resets the streak");
        for _ in 0..4 {
            passive.record_failure("s", &endpoints, 0);
        }
        assert!(endpoints[0].is_ejected(Instant::now()));
        // 50% of 3 endpoints is one: the second may not be ejected.
        for _ in 0..10 {
            passive.record_failure("s", &endpoints, 1);
        }
        assert!(!endpoints[1].is_ejected(Instant::now()));
        assert_eq!(endpoints[1].failures.load(Ordering::Relaxed), 10);
        let until = endpoints[0].outlier.lock().unwrap().ejected_until.unwrap();
        assert!(until >= now + Duration::from_secs(29));
    }
}
