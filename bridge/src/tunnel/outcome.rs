//! Why a tunnel handshake failed and why a tunnel connection ended, as closed sets: the
//! `reason` labels of the tunnel metrics. Derived from typed errors (the CA verifier's
//! [`RejectionKind`], quinn's `ConnectionError`), never from their text; the text, with its
//! details (serial, peer address), belongs in the log line beside the count.

use hybridge_ca::tls::{PeerRejected, RejectionKind};
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

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
    pub fn index(self) -> usize {
        self as usize
    }

    /// The reason of a certificate our verifier refused.
    pub fn of_rejection(rejection: &PeerRejected) -> Self {
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
    pub fn of_connection_error(
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
    pub const ALL: [DisconnectReason; 9] = [
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
    pub fn of_connection_error(error: &quinn::ConnectionError) -> Self {
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
}
