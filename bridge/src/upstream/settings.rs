//! Configuration of one exported service's upstream: the serde types the node config embeds,
//! their defaults, and a pure validation pass (no I/O) whose errors name the offending field.

use std::time::Duration;

use serde::Deserialize;

use crate::config::HostPort;

/// Upstream of one exported service (`[services.NAME.upstream]` in the node config).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamSettings {
    /// `"host:port"` entries. An IP address is used as it is; a host name stands for every
    /// address it resolves to (of the family the system resolver ranks first), looked up
    /// again every `dns_refresh`.
    pub(crate) endpoints: Vec<HostPort>,
    /// How often host names in `endpoints` are resolved again; the endpoint set follows the
    /// answers without a restart. `"0s"` resolves once, at start.
    #[serde(
        default = "default_dns_refresh",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) dns_refresh: Duration,
    /// Wire protocol spoken to the endpoints.
    #[serde(default)]
    pub(crate) protocol: UpstreamProtocol,
    /// Active HTTP health checking; off when absent.
    #[serde(default)]
    pub(crate) health_check: Option<HealthCheckSettings>,
    /// Limit on TCP connect plus protocol handshake to one endpoint.
    #[serde(
        default = "default_connect_timeout",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) connect_timeout: Duration,
    /// Deadline for the response *head* (status and headers), counted from the moment the
    /// request has been handed whole to the upstream connection (so the time a slow upload
    /// takes does not count; `request_body_idle_timeout` bounds that) and shared by all
    /// attempts. Bodies may stream for as long
    /// as they need, so long-lived gRPC streams are not cut. `"0s"` disables the deadline.
    #[serde(
        default = "default_request_timeout",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) request_timeout: Option<Duration>,
    /// Longest wait for the next request body bytes from the caller; past it the request
    /// fails with `request-body-timeout` (408). `"0s"` disables it.
    #[serde(
        default = "default_request_body_idle_timeout",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) request_body_idle_timeout: Option<Duration>,
    /// Load-shedding limits.
    #[serde(default)]
    pub(crate) circuit_breaker: CircuitBreakerSettings,
    /// Retries of idempotent, body-less requests.
    #[serde(default)]
    pub(crate) retry: RetrySettings,
    /// Outlier ejection driven by real traffic.
    #[serde(default)]
    pub(crate) passive_health: PassiveHealthSettings,
}

/// Protocol used on connections to the endpoints.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum UpstreamProtocol {
    /// HTTP/1.1 with a pool of keep-alive connections per endpoint.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (gRPC); requests are multiplexed.
    H2c,
}

/// Active health checking: `GET path` against every endpoint each `interval`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthCheckSettings {
    /// Path (origin form, starting with `/`) of the health check request.
    pub(crate) path: String,
    #[serde(
        default = "default_health_interval",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) interval: Duration,
    #[serde(
        default = "default_health_timeout",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) timeout: Duration,
    /// Consecutive passing checks that bring an unhealthy endpoint back.
    #[serde(default = "default_healthy_threshold")]
    pub(crate) healthy_threshold: u32,
    /// Consecutive failing checks (status outside 200-399, error or timeout) that take an
    /// endpoint out of rotation.
    #[serde(default = "default_unhealthy_threshold")]
    pub(crate) unhealthy_threshold: u32,
}

/// Limits that answer `503 overloaded` instead of queueing without bound. The defaults are
/// generous: a healthy service never reaches them, a melting one is protected.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct CircuitBreakerSettings {
    /// Requests in flight to this service (until their response head arrives).
    #[serde(default = "default_max_active_requests")]
    pub(crate) max_active_requests: usize,
    /// Requests waiting for a connection (being dialled or waiting for a free one).
    #[serde(default = "default_max_pending_requests")]
    pub(crate) max_pending_requests: usize,
    /// Connections per endpoint (HTTP/1.1; h2c uses a small fixed set per endpoint).
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: usize,
}

/// Retry policy. Only idempotent methods without a request body are retried, only after a
/// connect failure, a reset before the response head, or a `503` from the upstream.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetrySettings {
    /// Extra attempts per request; at most 2.
    #[serde(default = "default_max_retries")]
    pub(crate) max_retries: u32,
    /// Retries in flight may add at most this percentage on top of active requests ...
    #[serde(default = "default_budget_percent")]
    pub(crate) budget_percent: u32,
    /// ... but this many concurrent retries are always allowed.
    #[serde(default = "default_min_concurrent_retries")]
    pub(crate) min_concurrent_retries: usize,
}

/// Passive outlier ejection: an endpoint failing `consecutive_failures` requests in a row
/// (connect error, reset, timeout, 5xx) is taken out of rotation for
/// `base_ejection × times ejected`, capped at `max_ejection`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct PassiveHealthSettings {
    #[serde(default = "default_consecutive_failures")]
    pub(crate) consecutive_failures: u32,
    #[serde(
        default = "default_base_ejection",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) base_ejection: Duration,
    #[serde(
        default = "default_max_ejection",
        with = "hybridge_ca::duration::setting"
    )]
    pub(crate) max_ejection: Duration,
    /// Never eject more than this share of the endpoints (at least one may always be
    /// ejected unless this is 0, which disables ejection).
    #[serde(default = "default_max_ejection_percent")]
    pub(crate) max_ejection_percent: u32,
}

/// Envoy's `dns_refresh_rate`: a change is followed within the record's TTL plus 5 s, for a
/// lookup per name every 5 s (within the TTL the resolver's cache answers it).
fn default_dns_refresh() -> Duration {
    Duration::from_secs(5)
}
/// Below this, re-resolving would mostly load the resolver.
const MIN_DNS_REFRESH: Duration = Duration::from_millis(100);
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_request_timeout() -> Option<Duration> {
    Some(Duration::from_secs(30))
}
/// nginx's `client_body_timeout`: a minute without a byte is a caller that is gone.
fn default_request_body_idle_timeout() -> Option<Duration> {
    Some(Duration::from_secs(60))
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_max_active_requests() -> usize {
    10_000
}
fn default_max_pending_requests() -> usize {
    1_024
}
fn default_max_connections() -> usize {
    1_024
}
fn default_max_retries() -> u32 {
    2
}
fn default_budget_percent() -> u32 {
    20
}
fn default_min_concurrent_retries() -> usize {
    3
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ejection_percent() -> u32 {
    50
}

/// Most retries a request may get, whatever the configuration says.
pub(crate) const MAX_RETRIES_CAP: u32 = 2;

impl Default for CircuitBreakerSettings {
    fn default() -> Self {
        Self {
            max_active_requests: default_max_active_requests(),
            max_pending_requests: default_max_pending_requests(),
            max_connections: default_max_connections(),
        }
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_retries: default_max_retries(),
            budget_percent: default_budget_percent(),
            min_concurrent_retries: default_min_concurrent_retries(),
        }
    }
}

impl Default for PassiveHealthSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

impl HealthCheckSettings {
    /// Settings for `path` with every other field at its default.
    #[cfg(test)]
    pub(crate) fn new(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            interval: default_health_interval(),
            timeout: default_health_timeout(),
            healthy_threshold: default_healthy_threshold(),
            unhealthy_threshold: default_unhealthy_threshold(),
        }
    }
}

impl UpstreamSettings {
    /// Settings for `endpoints` with every other field at its default.
    #[cfg(test)]
    pub(crate) fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints
                .into_iter()
                .map(|e| HostPort::parse(&e.into()).expect("a valid test endpoint"))
                .collect(),
            dns_refresh: default_dns_refresh(),
            protocol: UpstreamProtocol::default(),
            health_check: None,
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            request_body_idle_timeout: default_request_body_idle_timeout(),
            circuit_breaker: CircuitBreakerSettings::default(),
            retry: RetrySettings::default(),
            passive_health: PassiveHealthSettings::default(),
        }
    }

    /// The response-head deadline, `None` when disabled (absent from Rust, `"0s"` in TOML).
    pub(crate) fn response_head_timeout(&self) -> Option<Duration> {
        self.request_timeout.filter(|timeout| !timeout.is_zero())
    }

    /// The request body's idle limit, `None` when disabled (`"0s"` in TOML).
    pub(crate) fn body_idle_timeout(&self) -> Option<Duration> {
        self.request_body_idle_timeout
            .filter(|timeout| !timeout.is_zero())
    }

    /// Checks everything that can be checked without I/O. `service` only names the
    /// service in messages. DNS resolution happens in `Upstream::start`.
    pub(crate) fn validate(&self, service: &str) -> Result<(), UpstreamConfigError> {
        self.validate_endpoints(service)?;
        self.check_settings()
            .map_err(|(field, reason)| UpstreamConfigError::InvalidSetting {
                service: service.to_owned(),
                field,
                reason: reason.to_owned(),
            })
    }

    /// At least one endpoint (each was checked as it was deserialised).
    fn validate_endpoints(&self, service: &str) -> Result<(), UpstreamConfigError> {
        if self.endpoints.is_empty() {
            return Err(UpstreamConfigError::NoEndpoints {
                service: service.to_owned(),
            });
        }
        Ok(())
    }

    /// The first setting out of range: timers, then the health check, the circuit breaker,
    /// retries and passive health.
    fn check_settings(&self) -> Result<(), SettingProblem> {
        if !self.dns_refresh.is_zero() && self.dns_refresh < MIN_DNS_REFRESH {
            return Err(("dns_refresh", "must be \"0s\" or at least 100ms"));
        }
        if self.connect_timeout.is_zero() {
            return Err(("connect_timeout", "must be greater than 0"));
        }
        if let Some(check) = &self.health_check {
            check.check()?;
        }
        self.circuit_breaker.check()?;
        self.retry.check()?;
        self.passive_health.check()
    }
}

/// A setting [`UpstreamSettings::validate`] refuses: the field's name under the export
/// (`health_check.path`) and why.
type SettingProblem = (&'static str, &'static str);

impl HealthCheckSettings {
    /// A request path, non-zero timers and thresholds of at least 1.
    fn check(&self) -> Result<(), SettingProblem> {
        if !self.path.starts_with('/') {
            return Err(("health_check.path", "must start with '/'"));
        }
        if self.path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(("health_check.path", "is not a valid request path"));
        }
        if self.interval.is_zero() {
            return Err(("health_check.interval", "must be greater than 0"));
        }
        if self.timeout.is_zero() {
            return Err(("health_check.timeout", "must be greater than 0"));
        }
        if self.healthy_threshold == 0 {
            return Err(("health_check.healthy_threshold", "must be at least 1"));
        }
        if self.unhealthy_threshold == 0 {
            return Err(("health_check.unhealthy_threshold", "must be at least 1"));
        }
        Ok(())
    }
}

impl CircuitBreakerSettings {
    /// Every limit at least 1.
    fn check(&self) -> Result<(), SettingProblem> {
        if self.max_active_requests == 0 {
            return Err(("circuit_breaker.max_active_requests", "must be at least 1"));
        }
        if self.max_pending_requests == 0 {
            return Err(("circuit_breaker.max_pending_requests", "must be at least 1"));
        }
        if self.max_connections == 0 {
            return Err(("circuit_breaker.max_connections", "must be at least 1"));
        }
        Ok(())
    }
}

impl RetrySettings {
    /// At most [`MAX_RETRIES_CAP`] retries and a budget of at most 100 percent.
    fn check(&self) -> Result<(), SettingProblem> {
        if self.max_retries > MAX_RETRIES_CAP {
            return Err(("retry.max_retries", "must be at most 2"));
        }
        if self.budget_percent > 100 {
            return Err(("retry.budget_percent", "must be at most 100"));
        }
        Ok(())
    }
}

impl PassiveHealthSettings {
    /// At least one failure to eject, a non-zero base ejection no longer than the maximum,
    /// and at most 100 percent of endpoints ejected.
    fn check(&self) -> Result<(), SettingProblem> {
        if self.consecutive_failures == 0 {
            return Err(("passive_health.consecutive_failures", "must be at least 1"));
        }
        if self.base_ejection.is_zero() {
            return Err(("passive_health.base_ejection", "must be greater than 0"));
        }
        if self.max_ejection < self.base_ejection {
            return Err((
                "passive_health.max_ejection",
                "must be at least base_ejection",
            ));
        }
        if self.max_ejection_percent > 100 {
            return Err(("passive_health.max_ejection_percent", "must be at most 100"));
        }
        Ok(())
    }
}

/// A configuration mistake, naming the service and the field.
#[derive(thiserror::Error, Debug)]
pub(crate) enum UpstreamConfigError {
    #[error("service {service}: upstream.endpoints must list at least one \"host:port\"")]
    NoEndpoints { service: String },
    #[error("service {service}: upstream endpoint {endpoint:?} did not resolve: {source}")]
    Resolve {
        service: String,
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("service {service}: upstream.{field} {reason}")]
    InvalidSetting {
        service: String,
        field: &'static str,
        reason: String,
    },
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn minimal_toml_gets_documented_defaults() {
        let settings: UpstreamSettings =
            toml::from_str(r#"endpoints = ["127.0.0.1:8080"]"#).unwrap();
        assert_eq!(settings, UpstreamSettings::new(["127.0.0.1:8080"]));
        assert_eq!(settings.protocol, UpstreamProtocol::Http1);
        assert_eq!(settings.dns_refresh, Duration::from_secs(5));
        assert_eq!(settings.connect_timeout, Duration::from_secs(2));
        assert_eq!(settings.request_timeout, Some(Duration::from_secs(30)));
        assert_eq!(settings.circuit_breaker.max_active_requests, 10_000);
        assert_eq!(settings.circuit_breaker.max_pending_requests, 1_024);
        assert_eq!(settings.circuit_breaker.max_connections, 1_024);
        assert_eq!(settings.retry.max_retries, 2);
        assert_eq!(settings.retry.budget_percent, 20);
        assert_eq!(settings.passive_health.consecutive_failures, 5);
        assert_eq!(
            settings.passive_health.base_ejection,
            Duration::from_secs(30)
        );
        assert_eq!(settings.passive_health.max_ejection_percent, 50);
        settings.validate("svc").unwrap();
    }

    #[test]
    fn full_toml_parses() {
        let settings: UpstreamSettings = toml::from_str(
            r#"
            endpoints = ["a.internal:80", "[::1]:81"]
            protocol = "h2c"
            dns_refresh = "30s"
            connect_timeout = "250ms"
            request_timeout = "0s"
            [health_check]
            path = "/healthz"
            interval = "2s"
            [circuit_breaker]
            max_active_requests = 5
            [retry]
            max_retries = 1
            [passive_health]
            base_ejection = "10s"
            "#,
        )
        .unwrap();
        settings.validate("svc").unwrap();
        assert_eq!(settings.protocol, UpstreamProtocol::H2c);
        assert_eq!(settings.dns_refresh, Duration::from_secs(30));
        assert_eq!(settings.response_head_timeout(), None);
        let check = settings.health_check.unwrap();
        assert_eq!(check.interval, Duration::from_secs(2));
        assert_eq!(check.timeout, Duration::from_secs(1));
        assert_eq!(check.healthy_threshold, 2);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let error =
            toml::from_str::<UpstreamSettings>("endpoints = [\"x:1\"]\n[retry]\nmax_retires = 1\n")
                .unwrap_err();
        assert!(error.to_string().contains("max_retires"), "{error}");
    }

    #[test]
    fn validation_names_the_field() {
        let mut settings = UpstreamSettings::new(["x:1"]);
        settings.retry.max_retries = 3;
        let message = settings.validate("billing").unwrap_err().to_string();
        assert_eq!(
            message,
            "service billing: upstream.retry.max_retries must be at most 2"
        );
        let mut settings = UpstreamSettings::new(["x:1"]);
        settings.dns_refresh = Duration::from_millis(10);
        assert_eq!(
            settings.validate("billing").unwrap_err().to_string(),
            "service billing: upstream.dns_refresh must be \"0s\" or at least 100ms"
        );
        settings.dns_refresh = Duration::ZERO;
        settings.validate("billing").unwrap();
        for bad in ["nohost", ":80", "x:0", "x:http", "::1:80", "[::1:80"] {
            let error =
                toml::from_str::<UpstreamSettings>(&format!("endpoints = [{bad:?}]")).unwrap_err();
            assert!(
                error.message().contains(&format!("{bad:?} is invalid: ")),
                "{bad}: {error}"
            );
        }
        assert!(matches!(
            UpstreamSettings::new(Vec::<String>::new()).validate("s"),
            Err(UpstreamConfigError::NoEndpoints { .. })
        ));
    }
}
