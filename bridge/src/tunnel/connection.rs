//! An authenticated connection to a peer node that opens and accepts bidirectional streams.
//!
//! The other half of the transport seam (see `stream`). It owns no routing or HTTP logic.
//! Two carriers: QUIC, and TLS 1.3 over TCP (`tcp`) where UDP does not get through.

use std::time::Duration;

use hybridge_ca::spiffe::SpiffeId;

use super::outcome::{DisconnectReason, HandshakeFailure};
use super::stream::{RecvHalf, SendHalf};
use super::tcp::{TcpConnection, TcpLost};

/// A live tunnel connection to one peer node.
#[derive(Clone)]
pub enum TunnelConnection {
    Quic(quinn::Connection),
    Tcp(TcpConnection),
}

/// Which carrier a tunnel connection runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Carrier {
    Quic,
    Tcp,
}

impl Carrier {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl prometheus_client::encoding::EncodeLabelValue for Carrier {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Counters a connection can report for metrics and status.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ConnectionStats {
    pub(crate) rtt: Duration,
    pub(crate) lost_packets: u64,
    pub(crate) sent_packets: u64,
    /// Largest UDP payload the path currently carries (grows with path-MTU discovery).
    pub(crate) path_mtu: u16,
    /// Streams this side stopped reading before their end (STOP_SENDING sent): an abandoned
    /// exchange, e.g. a caller that hung up.
    pub(crate) streams_stopped: u64,
    /// Streams this side abandoned while sending (RESET_STREAM sent).
    pub(crate) streams_reset: u64,
}

/// Why a tunnel connection is gone.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectionLost {
    #[error("{0}")]
    Quic(quinn::ConnectionError),
    #[error("{0}")]
    Tcp(TcpLost),
}

impl ConnectionLost {
    /// The reason counted for a connection that ended this way.
    pub(crate) fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            Self::Quic(e) => DisconnectReason::of_connection_error(e),
            Self::Tcp(e) => e.disconnect_reason(),
        }
    }

    /// The reason counted for a handshake that ended this way.
    pub(crate) fn handshake_failure(&self) -> HandshakeFailure {
        match self {
            Self::Quic(e) => HandshakeFailure::of_connection_error(e, None),
            Self::Tcp(e) => e.handshake_failure(),
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
            Self::Tcp(c) => c.open_stream().await.map_err(ConnectionLost::Tcp),
        }
    }

    /// Waits for the peer to open a stream; `Err` once the connection is gone.
    pub(crate) async fn accept_stream(&self) -> Result<(SendHalf, RecvHalf), ConnectionLost> {
        match self {
            Self::Quic(c) => {
                let (send, recv) = c.accept_bi().await.map_err(ConnectionLost::Quic)?;
                Ok((SendHalf::Quic(send), RecvHalf::quic(recv)))
            }
            Self::Tcp(c) => c.accept_stream().await.map_err(ConnectionLost::Tcp),
        }
    }

    /// Why the connection is gone, or `None` while it is up.
    pub(crate) fn lost(&self) -> Option<ConnectionLost> {
        match self {
            Self::Quic(c) => c.close_reason().map(ConnectionLost::Quic),
            Self::Tcp(c) => c.lost().map(ConnectionLost::Tcp),
        }
    }

    /// The peer's identity from its certificate (checked during the handshake).
    pub(crate) fn peer_id(&self) -> Option<SpiffeId> {
        hybridge_ca::tls::peer_spiffe_id(&self.peer_leaf()?).ok()
    }

    /// The leaf certificate the peer presented in the handshake.
    fn peer_leaf(&self) -> Option<rustls_pki_types::CertificateDer<'static>> {
        self.peer_chain().into_iter().next()
    }

    /// The chain the peer presented in the handshake, leaf first (empty if none).
    pub(crate) fn peer_chain(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
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
            Self::Tcp(c) => c.peer_chain(),
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

    pub(crate) fn remote_address(&self) -> std::net::SocketAddr {
        match self {
            Self::Quic(c) => c.remote_address(),
            Self::Tcp(c) => c.remote_address(),
        }
    }

    pub(crate) fn stats(&self) -> ConnectionStats {
        match self {
            Self::Quic(c) => {
                let s = c.stats();
                ConnectionStats {
                    rtt: c.rtt(),
                    lost_packets: s.path.lost_packets,
                    sent_packets: s.path.sent_packets,
                    path_mtu: s.path.current_mtu,
                    streams_stopped: s.frame_tx.stop_sending,
                    streams_reset: s.frame_tx.reset_stream,
                }
            }
            // Loss and MTU are the kernel's business on TCP.
            Self::Tcp(c) => ConnectionStats {
                rtt: c.rtt(),
                ..ConnectionStats::default()
            },
        }
    }

    /// A count that grows whenever anything arrives from the peer (QUIC datagrams, TCP
    /// reads). Acknowledgements arrive this way too, so a request written when the count
    /// was N cannot have been acknowledged while it is still N.
    pub(crate) fn received(&self) -> u64 {
        match self {
            Self::Quic(c) => c.stats().udp_rx.datagrams,
            Self::Tcp(c) => c.received(),
        }
    }

    pub fn carrier(&self) -> Carrier {
        match self {
            Self::Quic(_) => Carrier::Quic,
            Self::Tcp(_) => Carrier::Tcp,
        }
    }

    /// Closes the connection with an application code and a reason the peer logs.
    pub fn close(&self, code: u32, reason: &str) {
        match self {
            Self::Quic(c) => c.close(quinn::VarInt::from_u32(code), reason.as_bytes()),
            Self::Tcp(c) => c.close(
                matches!(
                    code,
                    super::stream::codes::CLOSED | super::stream::codes::GOING_AWAY
                ),
                reason,
            ),
        }
    }

    /// Resolves when the connection is closed, with the reason.
    pub(crate) async fn closed(&self) -> ConnectionLost {
        match self {
            Self::Quic(c) => ConnectionLost::Quic(c.closed().await),
            Self::Tcp(c) => ConnectionLost::Tcp(c.closed().await),
        }
    }

    /// A stable id for this connection within the process.
    pub(crate) fn stable_id(&self) -> usize {
        match self {
            Self::Quic(c) => c.stable_id(),
            Self::Tcp(c) => c.stable_id(),
        }
    }
}
