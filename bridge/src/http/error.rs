//! Responses the bridge produces itself: one closed set of reasons ([`Reason`]), each owning
//! its HTTP status, its gRPC code, its `x-hybridge-error` text and its metric label, and the
//! rendering of a [`BridgeError`] for a plain or a gRPC caller. No I/O here.
//!
//! gRPC callers get a trailers-only gRPC response whose code says what happened (a bridge
//! timeout is DEADLINE_EXCEEDED, a refused path INVALID_ARGUMENT), so a gRPC client sees a
//! gRPC error, not a protocol error. The README's "Errors you will see" table lists
//! [`Reason::ALL`]; a test keeps the two equal.

use http::{HeaderMap, HeaderValue, StatusCode};

use super::headers::ERROR_HEADER;
use super::path::PathError;

/// gRPC status codes the bridge answers with (the gRPC spec's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcCode {
    Cancelled = 1,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

impl GrpcCode {
    /// The number sent in `grpc-status`.
    pub fn number(self) -> u16 {
        self as u16
    }

    /// The name the gRPC spec gives the code, e.g. `PERMISSION_DENIED`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cancelled => "CANCELLED",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
        }
    }
}

/// Why the bridge answered a request itself instead of forwarding the upstream's answer.
///
/// The set is closed: it bounds the `reason` label of `hybridge_bridge_errors_total`, and
/// every value is documented in the README.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The ACL denies the caller (at the import pre-check or the export decision).
    AclDenied,
    /// The path has no canonical form (see `path`).
    InvalidPath,
    /// The gateway could not read a service name from `Host`/`:authority`.
    UnknownHost,
    /// The request head exceeds the listener's limit or a frame's.
    HeadersTooLarge,
    /// The request is malformed: its target and `Host` name different hosts, it has two
    /// `Host` headers, or the export node could not rebuild it from the stream header.
    BadRequest,
    /// No connected peer of a site allowed to serve the service exports it, or the export
    /// node does not export it.
    NoRoute,
    /// Opening a stream on the chosen tunnel failed.
    TunnelUnavailable,
    /// The tunnel stream failed or closed before the answer.
    TunnelStreamFailed,
    /// The peer answered with frames that break the protocol.
    TunnelProtocol,
    /// No response head within the request timeout (import) or the caller's deadline
    /// (export).
    Timeout,
    /// The upstream's circuit breaker is full.
    Overloaded,
    /// Every endpoint of the upstream is unhealthy or ejected.
    NoHealthyUpstream,
    /// Connecting to the upstream endpoint failed.
    UpstreamConnectFailed,
    /// The upstream connection closed or reset before the response head.
    UpstreamReset,
    /// The upstream gave no response head within the export's `request_timeout` of the
    /// request being sent whole.
    UpstreamTimeout,
    /// The caller sent no request body bytes for the export's `request_body_idle_timeout`.
    RequestBodyTimeout,
    /// The export node is shutting the upstream down.
    ShuttingDown,
    /// The caller went away before its answer (nginx's 499; recorded, never sent).
    ClientAborted,
    /// A state the bridge should never reach.
    Internal,
}

impl Reason {
    /// Every reason, in the README's order.
    pub const ALL: [Reason; 19] = [
        Self::AclDenied,
        Self::InvalidPath,
        Self::UnknownHost,
        Self::HeadersTooLarge,
        Self::BadRequest,
        Self::NoRoute,
        Self::TunnelUnavailable,
        Self::TunnelStreamFailed,
        Self::TunnelProtocol,
        Self::Timeout,
        Self::Overloaded,
        Self::NoHealthyUpstream,
        Self::UpstreamConnectFailed,
        Self::UpstreamReset,
        Self::UpstreamTimeout,
        Self::RequestBodyTimeout,
        Self::ShuttingDown,
        Self::ClientAborted,
        Self::Internal,
    ];

    /// The value of `x-hybridge-error`, also the `reason` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AclDenied => "acl-denied",
            Self::InvalidPath => "invalid-path",
            Self::UnknownHost => "unknown-host",
            Self::HeadersTooLarge => "headers-too-large",
            Self::BadRequest => "bad-request",
            Self::NoRoute => "no-route",
            Self::TunnelUnavailable => "tunnel-unavailable",
            Self::TunnelStreamFailed => "tunnel-stream-failed",
            Self::TunnelProtocol => "tunnel-protocol",
            Self::Timeout => "timeout",
            Self::Overloaded => "overloaded",
            Self::NoHealthyUpstream => "no-healthy-upstream",
            Self::UpstreamConnectFailed => "upstream-connect-failed",
            Self::UpstreamReset => "upstream-reset",
            Self::UpstreamTimeout => "upstream-timeout",
            Self::RequestBodyTimeout => "request-body-timeout",
            Self::ShuttingDown => "shutting-down",
            Self::ClientAborted => "client-aborted",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status a plain caller gets (and the status class counted).
    pub fn status(self) -> StatusCode {
        match self {
            Self::AclDenied => StatusCode::FORBIDDEN,
            Self::InvalidPath | Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::UnknownHost => StatusCode::NOT_FOUND,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::NoRoute | Self::Overloaded | Self::NoHealthyUpstream | Self::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::TunnelUnavailable
            | Self::TunnelStreamFailed
            | Self::TunnelProtocol
            | Self::UpstreamConnectFailed
            | Self::UpstreamReset => StatusCode::BAD_GATEWAY,
            Self::Timeout | Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::ClientAborted => client_closed_request(),
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status a gRPC caller gets: what happened, not the spec's status table (a
    /// bridge timeout is DEADLINE_EXCEEDED, not the table's UNAVAILABLE for 504).
    pub fn grpc_code(self) -> GrpcCode {
        match self {
            Self::AclDenied => GrpcCode::PermissionDenied,
            Self::InvalidPath | Self::BadRequest => GrpcCode::InvalidArgument,
            Self::UnknownHost => GrpcCode::Unimplemented,
            Self::HeadersTooLarge => GrpcCode::ResourceExhausted,
            Self::NoRoute
            | Self::TunnelUnavailable
            | Self::TunnelStreamFailed
            | Self::Overloaded
            | Self::NoHealthyUpstream
            | Self::UpstreamConnectFailed
            | Self::UpstreamReset
            | Self::ShuttingDown => GrpcCode::Unavailable,
            Self::Timeout | Self::UpstreamTimeout | Self::RequestBodyTimeout => {
                GrpcCode::DeadlineExceeded
            }
            Self::ClientAborted => GrpcCode::Cancelled,
            Self::TunnelProtocol | Self::Internal => GrpcCode::Internal,
        }
    }

    /// Position in [`Reason::ALL`], for per-reason counters.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl prometheus_client::encoding::EncodeLabelValue for Reason {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// nginx's 499 "client closed request": recorded in logs and metrics, never sent.
fn client_closed_request() -> StatusCode {
    StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
}

/// A response generated by the bridge.
#[derive(Debug)]
pub(crate) struct BridgeError {
    pub(crate) reason: Reason,
    /// Human-readable detail for the body / grpc-message.
    pub(crate) detail: String,
}

impl BridgeError {
    pub(crate) fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }

    /// 400 `invalid-path`, the refusal of a path with no canonical form, saying why.
    pub(crate) fn invalid_path(error: &PathError) -> Self {
        Self::new(Reason::InvalidPath, error.to_string())
    }

    /// The HTTP status of the reason.
    pub(crate) fn status(&self) -> StatusCode {
        self.reason.status()
    }

    /// Status, headers and body to send, shaped for a gRPC caller when `grpc` is set.
    pub(crate) fn render(&self, grpc: bool) -> (StatusCode, HeaderMap, bytes::Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.reason.as_str()));
        if grpc {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(
                "grpc-status",
                HeaderValue::from(self.reason.grpc_code().number()),
            );
            let message = percent_encode(&format!("hybridge: {}: {}", self.reason, self.detail));
            if let Ok(v) = HeaderValue::from_str(&message) {
                headers.insert("grpc-message", v);
            }
            return (StatusCode::OK, headers, bytes::Bytes::new());
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        let body = format!("hybridge: {}: {}\n", self.reason, self.detail);
        (self.status(), headers, bytes::Bytes::from(body))
    }
}

/// Whether a request is gRPC (by content type).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// grpc-message is percent-encoded (gRPC spec: bytes outside 0x20..=0x7E and '%').
fn percent_encode(s: &str) -> String {
    super::percent::encode_except(s, |b| (0x20..=0x7e).contains(&b) && b != b'%')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_grpc_renderings() {
        let e = BridgeError::new(Reason::AclDenied, "web may not call billing");
        let (status, headers, body) = e.render(false);
        assert_eq!(status, 403);
        assert_eq!(headers[ERROR_HEADER], "acl-denied");
        assert!(!headers.contains_key("x-hybridge-acl-rule"));
        assert_eq!(
            &body[..],
            b"hybridge: acl-denied: web may not call billing\n"
        );
        let (status, headers, body) = e.render(true);
        assert_eq!(status, 200);
        assert_eq!(headers["grpc-status"], "7");
        assert_eq!(
            headers["grpc-message"],
            "hybridge: acl-denied: web may not call billing"
        );
        assert!(body.is_empty());
        assert_eq!(percent_encode("a%b\n"), "a%25b%0A");
    }

    #[test]
    fn invalid_path_is_400_and_invalid_argument() {
        let e = BridgeError::invalid_path(&PathError::Backslash);
        let (status, headers, body) = e.render(false);
        assert_eq!(status, 400);
        assert_eq!(headers[ERROR_HEADER], "invalid-path");
        assert_eq!(
            &body[..],
            b"hybridge: invalid-path: backslash in the path: some servers treat it as `/`\n"
        );
        let (status, headers, _) = e.render(true);
        assert_eq!(status, 200);
        assert_eq!(headers["grpc-status"], "3");
        assert_eq!(
            headers["grpc-message"],
            "hybridge: invalid-path: backslash in the path: some servers treat it as `/`"
        );
    }

    #[test]
    fn each_reason_owns_its_status_code_and_label() {
        let table: Vec<(&str, u16, u16)> = Reason::ALL
            .iter()
            .map(|r| (r.as_str(), r.status().as_u16(), r.grpc_code().number()))
            .collect();
        assert!(table.contains(&("timeout", 504, 4)));
        assert!(table.contains(&("upstream-timeout", 504, 4)));
        assert!(table.contains(&("request-body-timeout", 408, 4)));
        assert!(table.contains(&("invalid-path", 400, 3)));
        assert!(table.contains(&("acl-denied", 403, 7)));
        assert!(table.contains(&("client-aborted", 499, 1)));
        for unavailable in ["no-route", "overloaded", "no-healthy-upstream"] {
            assert!(table.contains(&(unavailable, 503, 14)), "{unavailable}");
        }
        // ALL is every variant once, in index order.
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        let mut labels: Vec<&str> = table.iter().map(|t| t.0).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Reason::ALL.len());
    }
}
