//! Why a tunnel handshake failed and why a tunnel connection ended: the typed errors of
//! dialling, accepting and running a session, and the closed sets they are counted under
//! (the `reason` labels of the tunnel metrics). A label is a function of the error's variant
//! and its typed cause (the CA verifier's [`RejectionKind`], quinn's `ConnectionError`, the
//! `rustls::Error` inside an I/O error), never of its text; the text, with its details
//! (serial, peer address), belongs in the log line beside the count.

use std::net::SocketAddr;
use std::time::Duration;

use hybridge_ca::spiffe::SpiffeId;
use hybridge_ca::tls::{PeerRejected, RejectionKind};
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use super::connection::ConnectionLost;
use super::control::HelloError;
use super::stream::StreamError;
use super::tcp::TcpLost;

/// Why a tunnel handshake (TLS, then the control-stream hello) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HandshakeFailure {
    /// The peer's certificate is not from a CA in our bundle.
    UnknownCa,
    /// The peer's certificate is past its notAfter.
    Expired,
    /// The peer's certificate is before its notBefore.
    NotYetValid,
    /// The peer's certificate is revoked by a CRL in force.
    Revoked,
    /// The peer's certificate is not a node identity of our trust domain (or not the one
    /// configured for the peer).
    WrongIdentity,
    /// A node of a site this side does not accept.
    WrongSite,
    /// The peer's certificate lacks the extended key usage for its side.
    BadEku,
    /// The peer's certificate could not be parsed or checked.
    BadCertificate,
    /// Our CRL is past its nextUpdate and `tls.crl_stale = "refuse"` refuses every peer.
    StaleCrl,
    /// The peer closed the connection during the handshake: it refused us (in TLS 1.3 a
    /// server checks the client's certificate after the client is done).
    RefusedByPeer,
    /// The TLS or QUIC handshake, or the control hello, broke the protocol.
    Protocol,
    /// The peer stopped answering before the handshake finished.
    Timeout,
    /// Anything else (resolving the peer's address, a local error).
    Other,
}

impl HandshakeFailure {
    /// Every reason, in declaration order.
    pub const ALL: [HandshakeFailure; 13] = [
        Self::UnknownCa,
        Self::Expired,
        Self::NotYetValid,
        Self::Revoked,
        Self::WrongIdentity,
        Self::WrongSite,
        Self::BadEku,
        Self::BadCertificate,
        Self::StaleCrl,
        Self::RefusedByPeer,
        Self::Protocol,
        Self::Timeout,
        Self::Other,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown-ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not-yet-valid",
            Self::Revoked => "revoked",
            Self::WrongIdentity => "wrong-identity",
            Self::WrongSite => "wrong-site",
            Self::BadEku => "bad-eku",
            Self::BadCertificate => "bad-certificate",
            Self::StaleCrl => "stale-crl",
            Self::RefusedByPeer => "refused-by-peer",
            Self::Protocol => "protocol",
            Self::Timeout => "timeout",
            Self::Other => "other",
        }
    }

    /// Position in [`HandshakeFailure::ALL`], for per-reason counters.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The reason of a certificate our verifier refused.
    pub(crate) fn of_rejection(rejection: &PeerRejected) -> Self {
        match rejection.kind {
            RejectionKind::UnknownCa => Self::UnknownCa,
            RejectionKind::Expired => Self::Expired,
            RejectionKind::NotYetValid => Self::NotYetValid,
            RejectionKind::Revoked => Self::Revoked,
            RejectionKind::BadEku => Self::BadEku,
            RejectionKind::WrongIdentity => Self::WrongIdentity,
            RejectionKind::WrongSite => Self::WrongSite,
            RejectionKind::Malformed => Self::BadCertificate,
            RejectionKind::StaleCrl => Self::StaleCrl,
        }
    }

    /// The reason of a QUIC handshake that failed with `error`, given the rejection our
    /// verifier made during it, if any.
    pub(crate) fn of_connection_error(
        error: &quinn::ConnectionError,
        rejection: Option<&PeerRejected>,
    ) -> Self {
        if let Some(rejection) = rejection {
            return Self::of_rejection(rejection);
        }
        use quinn::ConnectionError as E;
        match error {
            E::TimedOut => Self::Timeout,
            E::ConnectionClosed(_) | E::ApplicationClosed(_) => Self::RefusedByPeer,
            E::TransportError(_) | E::VersionMismatch | E::Reset => Self::Protocol,
            E::LocallyClosed | E::CidsExhausted => Self::Other,
        }
    }

    /// The reason of a TLS handshake over TCP that failed with `error` (tokio-rustls hands
    /// rustls' error inside an I/O error): our verifier's typed rejection when it made one,
    /// the peer's alert otherwise.
    pub(crate) fn of_tls_error(error: &std::io::Error) -> Self {
        let tls = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(e) => match hybridge_ca::tls::rejection_of(e) {
                Some(rejected) => Self::of_rejection(rejected),
                None => match e {
                    rustls::Error::AlertReceived(_) => Self::RefusedByPeer,
                    _ => Self::Protocol,
                },
            },
            None => match error.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe => Self::RefusedByPeer,
                std::io::ErrorKind::TimedOut => Self::Timeout,
                _ => Self::Other,
            },
        }
    }
}

impl std::fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for HandshakeFailure {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Why an established tunnel connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DisconnectReason {
    /// The peer closed the connection.
    PeerClosed,
    /// Nothing arrived from the peer within the idle timeout.
    IdleTimeout,
    /// The connection broke (a transport error or a reset).
    ConnectionError,
    /// The peer finished its control stream while the connection stayed up.
    ControlClosed,
    /// Reading or writing the control stream failed while the connection stayed up.
    ControlFailed,
    /// A reload or the certificate's expiry made the peer's certificate untrusted.
    Untrusted,
    /// This node is shutting down.
    ShuttingDown,
    /// This node closed the connection for another reason.
    ClosedLocally,
    /// A link on another carrier took over (TCP retired once QUIC worked again).
    Replaced,
}

impl DisconnectReason {
    /// Every reason, in declaration order.
    #[cfg(test)]
    pub(crate) const ALL: [DisconnectReason; 9] = [
        Self::PeerClosed,
        Self::IdleTimeout,
        Self::ConnectionError,
        Self::ControlClosed,
        Self::ControlFailed,
        Self::Untrusted,
        Self::ShuttingDown,
        Self::ClosedLocally,
        Self::Replaced,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerClosed => "peer-closed",
            Self::IdleTimeout => "idle-timeout",
            Self::ConnectionError => "connection-error",
            Self::ControlClosed => "control-closed",
            Self::ControlFailed => "control-failed",
            Self::Untrusted => "untrusted",
            Self::ShuttingDown => "shutting-down",
            Self::ClosedLocally => "closed-locally",
            Self::Replaced => "replaced",
        }
    }

    /// The reason of a connection that ended with `error`.
    pub(crate) fn of_connection_error(error: &quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match error {
            E::ConnectionClosed(_) | E::ApplicationClosed(_) => Self::PeerClosed,
            E::TimedOut => Self::IdleTimeout,
            E::TransportError(_) | E::VersionMismatch | E::Reset | E::CidsExhausted => {
                Self::ConnectionError
            }
            E::LocallyClosed => Self::ClosedLocally,
        }
    }

    /// The reason of a TLS/TCP connection whose HTTP/2 layer failed with `error`.
    pub(crate) fn of_h2_error(error: &h2::Error) -> Self {
        // In TLS 1.3 the server checks our certificate after our side of the handshake is
        // done: a refusal arrives as an alert on the first read, inside h2's I/O error.
        let refused = error
            .get_io()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)));
        if refused || (error.is_go_away() && error.is_remote()) {
            Self::PeerClosed
        } else if error.is_io() {
            Self::ConnectionError
        } else if error.is_go_away() {
            Self::ClosedLocally
        } else {
            Self::ConnectionError
        }
    }
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for DisconnectReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// A tunnel handshake that failed before a session could start: dialling (resolving,
/// QUIC or TCP, TLS, HTTP/2) or accepting a TLS/TCP connection. [`HandshakeError::failure`]
/// is the reason it is counted under; Display is the detail logged and shown in status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("resolving {address}: {error}")]
    Resolve {
        address: String,
        error: std::io::Error,
    },
    #[error("resolving {address}: no addresses")]
    NoAddress { address: String },
    /// A fresh dial endpoint (its own UDP socket) could not be set up.
    #[error("{0:#}")]
    Endpoint(anyhow::Error),
    /// quinn refused to start the connection (no handshake took place).
    #[error("connecting to {addr}: {error}")]
    QuicConnect {
        addr: SocketAddr,
        error: quinn::ConnectError,
    },
    #[error("QUIC handshake with {addr}: {error}")]
    Quic {
        addr: SocketAddr,
        error: QuicHandshakeError,
    },
    #[error("TCP connect to {addr}: {error}")]
    TcpConnect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("server name {name}: {error}")]
    ServerName {
        name: String,
        error: rustls_pki_types::InvalidDnsNameError,
    },
    /// The TLS handshake over TCP failed; rustls' error is inside the I/O error.
    #[error("TLS handshake with {remote}: {error}")]
    Tls {
        remote: SocketAddr,
        error: std::io::Error,
    },
    /// The HTTP/2 handshake after TLS failed: the connection went.
    #[error("handshake with {remote}: {lost}")]
    Http2 { remote: SocketAddr, lost: TcpLost },
    #[error("TCP/TLS handshake with {remote} unfinished after {after:?}")]
    TcpTimedOut { remote: SocketAddr, after: Duration },
}

impl HandshakeError {
    /// The reason counted for this failure.
    pub(crate) fn failure(&self) -> HandshakeFailure {
        match self {
            Self::Resolve { .. }
            | Self::NoAddress { .. }
            | Self::Endpoint(_)
            | Self::QuicConnect { .. }
            | Self::ServerName { .. } => HandshakeFailure::Other,
            Self::Quic { error, .. } => error.failure(),
            Self::TcpConnect { error, .. } => match error.kind() {
                std::io::ErrorKind::TimedOut => HandshakeFailure::Timeout,
                _ => HandshakeFailure::Other,
            },
            Self::Tls { error, .. } => HandshakeFailure::of_tls_error(error),
            Self::Http2 { lost, .. } => lost.handshake_failure(),
            Self::TcpTimedOut { .. } => HandshakeFailure::Timeout,
        }
    }
}

/// A QUIC handshake that failed: quinn's error, and the rejection our verifier made during
/// the handshake if it made one (quinn keeps only an alert number and a text of it, see
/// `tunnel::handshake`). Displays the rejection when there is one: it names the check and
/// the certificate.
#[derive(Debug)]
pub(crate) struct QuicHandshakeError {
    pub(crate) error: quinn::ConnectionError,
    pub(crate) rejected: Option<PeerRejected>,
}

impl QuicHandshakeError {
    /// The reason counted for this failure.
    pub(crate) fn failure(&self) -> HandshakeFailure {
        HandshakeFailure::of_connection_error(&self.error, self.rejected.as_ref())
    }
}

impl std::fmt::Display for QuicHandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.rejected {
            Some(rejected) => rejected.fmt(f),
            None => self.error.fmt(f),
        }
    }
}

impl std::error::Error for QuicHandshakeError {}

/// Why a connection was refused after its TLS handshake, before it became a link: the
/// peer's identity, or the control-stream hello.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionRefused {
    #[error("peer presented no usable identity")]
    NoIdentity,
    #[error("peer {0} is not a node identity")]
    NotANode(SpiffeId),
    #[error("control handshake failed: {0}")]
    Hello(HelloFailed),
    #[error("control handshake timed out")]
    HelloTimedOut,
}

impl SessionRefused {
    /// The reason counted for this refusal.
    pub(crate) fn failure(&self) -> HandshakeFailure {
        match self {
            Self::NoIdentity | Self::NotANode(_) => HandshakeFailure::WrongIdentity,
            Self::Hello(failed) => failed.failure(),
            Self::HelloTimedOut => HandshakeFailure::Timeout,
        }
    }
}

/// Why the hello exchange on the control stream failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloFailed {
    /// The control stream could not be opened or accepted: the connection is gone.
    #[error(transparent)]
    Connection(ConnectionLost),
    #[error(transparent)]
    Stream(StreamError),
    #[error("peer closed the control stream")]
    Closed,
    #[error(transparent)]
    Hello(HelloError),
    /// `during` failed because the connection went: a peer that refused our certificate
    /// closes it right after the TLS handshake.
    #[error("{during} ({lost})")]
    ConnectionGone {
        during: Box<HelloFailed>,
        lost: ConnectionLost,
    },
}

impl HelloFailed {
    /// The reason counted for this failure: why the connection went, if it did.
    pub(crate) fn failure(&self) -> HandshakeFailure {
        match self {
            Self::Connection(lost) | Self::ConnectionGone { lost, .. } => lost.handshake_failure(),
            Self::Stream(_) | Self::Closed | Self::Hello(_) => HandshakeFailure::Protocol,
        }
    }
}

/// The disconnect detail of a peer whose certificate stopped passing.
pub(crate) const UNTRUSTED: &str = "peer certificate no longer trusted";

/// Why an established tunnel link ended. [`Disconnect::reason`] is the reason it is counted
/// under; Display is the detail logged and shown by readiness.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Disconnect {
    #[error(transparent)]
    Lost(ConnectionLost),
    #[error("replaced by a link on another carrier")]
    Replaced,
    #[error("{}", UNTRUSTED)]
    Untrusted,
    /// The peer finished its control stream while the connection stayed up.
    #[error("peer closed the control stream")]
    ControlClosed,
    #[error("control stream read failed: {0}")]
    ControlReadFailed(StreamError),
    #[error("control stream write failed: {0}")]
    ControlWriteFailed(StreamError),
    /// This side's control writer ended while the connection stayed up.
    #[error("control stream writer stopped")]
    ControlWriterStopped,
    #[error("node shutting down")]
    ShuttingDown,
}

impl Disconnect {
    /// The reason counted for this end.
    pub(crate) fn reason(&self) -> DisconnectReason {
        match self {
            Self::Lost(lost) => lost.disconnect_reason(),
            Self::Replaced => DisconnectReason::Replaced,
            Self::Untrusted => DisconnectReason::Untrusted,
            Self::ControlClosed => DisconnectReason::ControlClosed,
            Self::ControlReadFailed(_) | Self::ControlWriteFailed(_) => {
                DisconnectReason::ControlFailed
            }
            Self::ControlWriterStopped => DisconnectReason::ClosedLocally,
            Self::ShuttingDown => DisconnectReason::ShuttingDown,
        }
    }
}

/// How a session ended: refused before it became a link, or a link that went down.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionEnd {
    #[error(transparent)]
    Refused(SessionRefused),
    #[error(transparent)]
    Disconnected(Disconnect),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_sets_are_listed_in_order_with_distinct_labels() {
        for (i, reason) in HandshakeFailure::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        let mut labels: Vec<&str> = HandshakeFailure::ALL.iter().map(|r| r.as_str()).collect();
        labels.extend(DisconnectReason::ALL.iter().map(|r| r.as_str()));
        let before = labels.len();
        labels.sort_unstable();
        labels.dedup();
        // `DisconnectReason` and `HandshakeFailure` share no label either.
        assert_eq!(labels.len(), before);
    }

    #[test]
    fn a_verifier_rejection_wins_over_the_transport_error() {
        let rejection = PeerRejected::new(RejectionKind::Expired, "certificate expired");
        let error = quinn::ConnectionError::TimedOut;
        assert_eq!(
            HandshakeFailure::of_connection_error(&error, Some(&rejection)),
            HandshakeFailure::Expired
        );
        assert_eq!(
            HandshakeFailure::of_connection_error(&error, None),
            HandshakeFailure::Timeout
        );
        assert_eq!(
            DisconnectReason::of_connection_error(&quinn::ConnectionError::LocallyClosed),
            DisconnectReason::ClosedLocally
        );
    }

    const REMOTE: &str = "10.0.0.1:4433";

    fn remote() -> SocketAddr {
        REMOTE.parse().unwrap()
    }

    /// How tokio-rustls hands a rustls error to the caller.
    fn in_io(error: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, error)
    }

    #[test]
    fn a_tls_failure_is_counted_by_the_rustls_error_inside_it() {
        let revoked = PeerRejected::new(RejectionKind::Revoked, "certificate 0a is revoked");
        let ours =
            rustls::CertificateError::Other(rustls::OtherError(std::sync::Arc::new(revoked)));
        let io = std::io::Error::from;
        let cases = [
            (
                in_io(rustls::Error::InvalidCertificate(ours)),
                HandshakeFailure::Revoked,
            ),
            (
                in_io(rustls::Error::AlertReceived(
                    rustls::AlertDescription::BadCertificate,
                )),
                HandshakeFailure::RefusedByPeer,
            ),
            // A rejection our verifier did not make says nothing about which check failed.
            (
                in_io(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired,
                )),
                HandshakeFailure::Protocol,
            ),
            (
                io(std::io::ErrorKind::UnexpectedEof),
                HandshakeFailure::RefusedByPeer,
            ),
            (
                io(std::io::ErrorKind::ConnectionReset),
                HandshakeFailure::RefusedByPeer,
            ),
            (io(std::io::ErrorKind::TimedOut), HandshakeFailure::Timeout),
            (
                io(std::io::ErrorKind::PermissionDenied),
                HandshakeFailure::Other,
            ),
        ];
        for (error, expected) in cases {
            let error = HandshakeError::Tls {
                remote: remote(),
                error,
            };
            assert_eq!(error.failure(), expected, "{error}");
        }
        let refused = HandshakeError::Tls {
            remote: remote(),
            error: in_io(rustls::Error::AlertReceived(
                rustls::AlertDescription::BadCertificate,
            )),
        };
        assert_eq!(
            refused.to_string(),
            format!("TLS handshake with {REMOTE}: received fatal alert: BadCertificate")
        );
    }

    #[test]
    fn dial_failures_are_counted_by_their_variant() {
        let quic = |error, rejected| HandshakeError::Quic {
            addr: remote(),
            error: QuicHandshakeError { error, rejected },
        };
        let unknown = PeerRejected::new(RejectionKind::UnknownCa, "issuer not in the bundle");
        let rejected = quic(quinn::ConnectionError::TimedOut, Some(unknown));
        assert_eq!(rejected.failure(), HandshakeFailure::UnknownCa);
        assert_eq!(
            rejected.to_string(),
            format!("QUIC handshake with {REMOTE}: issuer not in the bundle")
        );
        let timed_out = quic(quinn::ConnectionError::TimedOut, None);
        assert_eq!(timed_out.failure(), HandshakeFailure::Timeout);
        assert_eq!(
            timed_out.to_string(),
            format!("QUIC handshake with {REMOTE}: timed out")
        );

        let connect = |kind| HandshakeError::TcpConnect {
            addr: remote(),
            error: std::io::Error::from(kind),
        };
        assert_eq!(
            connect(std::io::ErrorKind::TimedOut).failure(),
            HandshakeFailure::Timeout
        );
        let refused = connect(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(refused.failure(), HandshakeFailure::Other);
        assert!(
            refused
                .to_string()
                .starts_with(&format!("TCP connect to {REMOTE}: ")),
            "{refused}"
        );

        let http2 = |lost| HandshakeError::Http2 {
            remote: remote(),
            lost,
        };
        assert_eq!(
            http2(TcpLost::PeerClosed).failure(),
            HandshakeFailure::RefusedByPeer
        );
        assert_eq!(
            http2(TcpLost::Silent(Duration::from_secs(5))).failure(),
            HandshakeFailure::Timeout
        );
        assert_eq!(
            http2(TcpLost::Failed(std::sync::Arc::new(h2::Error::from(
                h2::Reason::PROTOCOL_ERROR
            ))))
            .failure(),
            HandshakeFailure::Protocol
        );
        assert_eq!(
            HandshakeError::TcpTimedOut {
                remote: remote(),
                after: Duration::from_secs(5)
            }
            .failure(),
            HandshakeFailure::Timeout
        );
        let unresolved = HandshakeError::NoAddress {
            address: "cloud.invalid:4433".into(),
        };
        assert_eq!(unresolved.failure(), HandshakeFailure::Other);
        assert_eq!(
            unresolved.to_string(),
            "resolving cloud.invalid:4433: no addresses"
        );
        assert_eq!(
            HandshakeError::Endpoint(anyhow::anyhow!("no socket")).failure(),
            HandshakeFailure::Other
        );
    }

    #[test]
    fn refusals_after_tls_are_counted_by_their_variant() {
        assert_eq!(
            SessionRefused::NoIdentity.failure(),
            HandshakeFailure::WrongIdentity
        );
        assert_eq!(
            SessionRefused::HelloTimedOut.failure(),
            HandshakeFailure::Timeout
        );
        let hello = |failed| SessionRefused::Hello(failed);
        assert_eq!(
            hello(HelloFailed::Hello(HelloError::Version(9))).failure(),
            HandshakeFailure::Protocol
        );
        assert_eq!(
            hello(HelloFailed::Connection(ConnectionLost::Quic(
                quinn::ConnectionError::TimedOut
            )))
            .failure(),
            HandshakeFailure::Timeout
        );
        // A hello that failed because the peer closed the connection: it refused us.
        let gone = hello(HelloFailed::ConnectionGone {
            during: Box::new(HelloFailed::Closed),
            lost: ConnectionLost::Tcp(TcpLost::PeerClosed),
        });
        assert_eq!(gone.failure(), HandshakeFailure::RefusedByPeer);
        assert_eq!(
            gone.to_string(),
            "control handshake failed: peer closed the control stream \
             (peer closed the tunnel TCP connection)"
        );
        assert_eq!(
            hello(HelloFailed::Closed).failure(),
            HandshakeFailure::Protocol
        );
    }

    #[test]
    fn disconnects_are_counted_by_their_variant() {
        let cases = [
            (
                Disconnect::Lost(ConnectionLost::Quic(quinn::ConnectionError::TimedOut)),
                DisconnectReason::IdleTimeout,
                "timed out",
            ),
            (
                Disconnect::Lost(ConnectionLost::Tcp(TcpLost::Silent(Duration::from_secs(5)))),
                DisconnectReason::IdleTimeout,
                "nothing heard from the peer for 5000 ms",
            ),
            (
                Disconnect::Lost(ConnectionLost::Tcp(TcpLost::ClosedLocally(
                    "link replaced".into(),
                ))),
                DisconnectReason::ClosedLocally,
                "closed locally: link replaced",
            ),
            (
                Disconnect::Lost(ConnectionLost::Tcp(TcpLost::PeerClosed)),
                DisconnectReason::PeerClosed,
                "peer closed the tunnel TCP connection",
            ),
            (
                Disconnect::Replaced,
                DisconnectReason::Replaced,
                "replaced by a link on another carrier",
            ),
            (
                Disconnect::Untrusted,
                DisconnectReason::Untrusted,
                UNTRUSTED,
            ),
            (
                Disconnect::ControlWriterStopped,
                DisconnectReason::ClosedLocally,
                "control stream writer stopped",
            ),
            (
                Disconnect::ShuttingDown,
                DisconnectReason::ShuttingDown,
                "node shutting down",
            ),
        ];
        for (disconnect, reason, detail) in cases {
            assert_eq!(
                (disconnect.reason(), disconnect.to_string()),
                (reason, detail.to_owned())
            );
        }
        assert_eq!(
            DisconnectReason::of_h2_error(&h2::Error::from(h2::Reason::PROTOCOL_ERROR)),
            DisconnectReason::ConnectionError
        );
    }
}
