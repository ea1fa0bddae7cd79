//! Dialing out to a configured peer and keeping the connection up: resolve, connect,
//! run the session, and reconnect with exponential backoff and jitter.
//!
//! One dialer task per (peer, connection slot). It owns no routing; sessions register links.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::connection::TunnelConnection;
use super::handshake::RejectionSlot;
use super::outcome::HandshakeFailure;
use super::peers::Direction;
use super::quic::DialConfig;
use super::session::{self, SessionContext};
use crate::config::PeerConfig;

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// Keeps one connection to `peer` up until `cancel` fires. `max_backoff` is read before each
/// wait, so a reload changes it from the next redial on.
pub async fn run(
    endpoint: quinn::Endpoint,
    peer: PeerConfig,
    slot: usize,
    client_config: Arc<ArcSwap<DialConfig>>,
    max_backoff: watch::Receiver<Duration>,
    ctx: Arc<SessionContext>,
    cancel: CancellationToken,
) {
    let host = peer
        .address
        .rsplit_once(':')
        .map_or(peer.address.as_str(), |(h, _)| h);
    let server_name =
        super::quic::server_name_for(host.trim_start_matches('[').trim_end_matches(']'));
    let mut backoff = INITIAL_BACKOFF;
    while !cancel.is_cancelled() {
        match connect(&endpoint, &peer.address, &server_name, &client_config).await {
            Ok(connection) => {
                let started = tokio::time::Instant::now();
                let reason = session::run(
                    TunnelConnection::Quic(connection),
                    Direction::Dialed,
                    ctx.clone(),
                    cancel.clone(),
                )
                .await;
                // In TLS 1.3 the server checks our certificate after our side of the handshake
                // is done, so a peer that refuses us looks like a session that ends at once.
                // Only a session that stayed up resets the backoff; otherwise a refused node
                // would redial ten times a second forever.
                if started.elapsed() >= *max_backoff.borrow() {
                    backoff = INITIAL_BACKOFF;
                }
                info!(peer = %peer.address, slot, %reason, "tunnel connection ended; reconnecting");
            }
            Err((failure, detail)) => {
                ctx.metrics.handshake_failed(failure);
                warn!(peer = %peer.address, slot, reason = %failure, error = %detail, retry_in_ms = backoff.as_millis() as u64, "tunnel connect failed");
            }
        }
        // Full jitter in [backoff/2, backoff]: many on-prem nodes must not reconnect in lockstep.
        let limit = *max_backoff.borrow();
        backoff = backoff.min(limit);
        let wait = backoff.mul_f64(rand::random_range(0.5..=1.0));
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => break,
        }
        backoff = (backoff * 2).min(limit);
    }
}

/// Resolves and dials `address`; a failure comes with the reason it is counted under and
/// the detail it is logged with.
async fn connect(
    endpoint: &quinn::Endpoint,
    address: &str,
    server_name: &str,
    config: &ArcSwap<DialConfig>,
) -> Result<quinn::Connection, (HandshakeFailure, String)> {
    let other = |detail: String| (HandshakeFailure::Other, detail);
    let addr = tokio::net::lookup_host(address)
        .await
        .map_err(|e| other(format!("resolving {address}: {e}")))?
        .next()
        .ok_or_else(|| other(format!("resolving {address}: no addresses")))?;
    let rejection = RejectionSlot::default();
    let connecting = endpoint
        .connect_with(config.load().for_attempt(&rejection), addr, server_name)
        .map_err(|e| other(format!("connecting to {addr}: {e}")))?;
    connecting.await.map_err(|e| {
        let rejected = rejection.take();
        let failure = HandshakeFailure::of_connection_error(&e, rejected.as_ref());
        let detail = match rejected {
            Some(rejected) => format!("handshake with {addr}: {rejected}"),
            None => format!("handshake with {addr}: {e}"),
        };
        (failure, detail)
    })
}
