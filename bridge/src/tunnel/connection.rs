//! An authenticated connection to a peer node that opens and accepts bidirectional streams.
//!
//! The other half of the transport seam (see `stream`). It owns no routing or HTTP logic;
//! QUIC is the only variant today, a TLS-over-TCP fallback slots in beside it.

use std::time::Duration;

use hybridge_ca::spiffe::SpiffeId;

use super::outcome::{DisconnectReason, HandshakeFailure};
use super::stream::{RecvHalf, SendHalf};

/// A live tunnel connection to one peer node.
#[derive(Clone)]
pub enum TunnelConnection {
    Quic(quinn::Connection),
}

/// Counters a connection can report for metrics and status.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectionStats {
    pub rtt: Duration,
    pub lost_packets: u64,
    pub sent_packets: u64,
    pub congestion_events: u64,
    /// Largest UDP payload the path currently carries (grows with path-MTU discovery).
    pub path_mtu: u16,
    /// Streams this side stopped reading before their end (STOP_SENDING sent): an abandoned
    /// exchange, e.g. a caller that hung up.
    pub streams_stopped: u64,
    /// Streams this side abandoned while sending (RESET_STREAM sent).
    pub streams_reset: u64,
}

/// Why a tunnel connection is gone.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectionLost {
    #[error("{0}")]
    Quic(quinn::ConnectionError),
}

impl ConnectionLost {
    /// The reason counted for a connection that ended this way.
    pub fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            Self::Quic(e) => DisconnectReason::of_connection_error(e),
        }
    }

    /// The reason counted for a handshake that ended this way.
    pub fn handshake_failure(&self) -> HandshakeFailure {
        match self {
            Self::Quic(e) => HandshakeFailure::of_connection_error(e, None),
        }
    }
}

impl TunnelConnection {
    /// Opens a new bidirectional stream.
    pub async fn open_stream(&self) -> Result<(SendHalf, RecvHalf), ConnectionLost> {
        match self {
            Self::Quic(c) => {
                let (send, recv) = c.open_bi().await.map_err(ConnectionLost::Quic)?;
                Ok((SendHalf::Quic(send), RecvHalf::quic(recv)))
            }
        }
    }

    /// Waits for the peer to open a stream; `Err` once the connection is gone.
    pub async fn accept_stream(&self) -> Result<(SendHalf, RecvHalf), ConnectionLost> {
        match self {
            Self::Quic(c) => {
                let (send, recv) = c.accept_bi().await.map_err(ConnectionLost::Quic)?;
                Ok((SendHalf::Quic(send), RecvHalf::quic(recv)))
            }
        }
    }

    /// Why the connection is gone, or `None` while it is up.
    pub fn lost(&self) -> Option<ConnectionLost> {
        match self {
            Self::Quic(c) => c.close_reason().map(ConnectionLost::Quic),
        }
    }

    /// The peer's identity from its certificate (checked during the handshake).
    pub fn peer_id(&self) -> Option<SpiffeId> {
        hybridge_ca::tls::peer_spiffe_id(&self.peer_leaf()?).ok()
    }

    /// The leaf certificate the peer presented in the handshake.
    fn peer_leaf(&self) -> Option<rustls_pki_types::CertificateDer<'static>> {
        self.peer_chain().into_iter().next()
    }

    /// The chain the peer presented in the handshake, leaf first (empty if none).
    pub fn peer_chain(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        match self {
            Self::Quic(c) => c
                .peer_identity()
                .and_then(|identity| {
                    identity
                        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .map(|certs| *certs)
                .unwrap_or_default(),
        }
    }

    /// Serial (lowercase hex) and expiry (RFC 3339) of the certificate the peer presented,
    /// so operators can see which certificate a tunnel runs on after a rotation.
    pub fn peer_certificate(&self) -> Option<(String, String)> {
        let summary = hybridge_ca::inspect::summarize(self.peer_leaf()?.as_ref()).ok()?;
        let not_after = summary
            .not_after
            .format(&time::format_description::well_known::Rfc3339)
            .ok()?;
        Some((summary.serial_hex, not_after))
    }

    pub fn remote_address(&self) -> std::net::SocketAddr {
        match self {
            Self::Quic(c) => c.remote_address(),
        }
    }

    pub fn stats(&self) -> ConnectionStats {
        match self {
            Self::Quic(c) => {
                let s = c.stats();
                ConnectionStats {
                    rtt: c.rtt(),
                    lost_packets: s.path.lost_packets,
                    sent_packets: s.path.sent_packets,
                    congestion_events: s.path.congestion_events,
                    path_mtu: s.path.current_mtu,
                    streams_stopped: s.frame_tx.stop_sending,
                    streams_reset: s.frame_tx.reset_stream,
                }
            }
        }
    }

    /// Closes the connection with an application code and a reason the peer logs.
    pub fn close(&self, code: u32, reason: &str) {
        match self {
            Self::Quic(c) => c.close(quinn::VarInt::from_u32(code), reason.as_bytes()),
        }
    }

    /// Resolves when the connection is closed, with the reason.
    pub async fn closed(&self) -> String {
        match self {
            Self::Quic(c) => c.closed().await.to_string(),
        }
    }

    /// A stable id for this connection within the process.
    pub fn stable_id(&self) -> usize {
        match self {
            Self::Quic(c) => c.stable_id(),
        }
    }
}
