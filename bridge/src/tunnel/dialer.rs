//! Dialing out to a configured peer and keeping the connection up: resolve, pick a carrier,
//! connect, run the session, and reconnect with exponential backoff and jitter.
//!
//! With `tunnel.transport = "auto"` a dial starts QUIC and, when its handshake is still
//! unanswered after `tcp_fallback_after` (or failed), races TLS/TCP beside it; the first
//! to come up carries the link. After three QUIC attempts in a row that did not come up,
//! dials go straight to TCP. While a link runs on TCP, QUIC is tried again every
//! `quic_reprobe_interval`; once it works, the QUIC link takes new requests and the TCP link
//! drains (nothing in flight fails).
//!
//! One dialer task per (peer, connection slot). It owns no routing; sessions register links.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::connection::{Carrier, TunnelConnection};
use super::handshake::RejectionSlot;
use super::outcome::HandshakeFailure;
use super::peers::Direction;
use super::quic::DialConfig;
use super::session::{self, SessionContext};
use super::tcp;
use crate::config::{PeerConfig, Transport};

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// QUIC attempts in a row that did not come up before `auto` stops trying QUIC first.
const QUIC_FAILURES_BEFORE_TCP_FIRST: u32 = 3;

/// How a dialer chooses its carrier.
#[derive(Clone, Copy, Debug)]
pub struct CarrierChoice {
    pub transport: Transport,
    pub tcp_fallback_after: Duration,
    pub quic_reprobe_interval: Duration,
}

/// A failed dial: the reason it is counted under and the detail it is logged with.
type DialError = (HandshakeFailure, String);

/// Keeps one connection to `peer` up until `cancel` fires. `max_backoff` is read before each
/// wait, so a reload changes it from the next redial on.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    endpoint: quinn::Endpoint,
    peer: PeerConfig,
    slot: usize,
    client_config: Arc<ArcSwap<DialConfig>>,
    choice: CarrierChoice,
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
    let dialer = Dialer {
        endpoint,
        address: peer.address.clone(),
        server_name,
        config: client_config,
        choice,
    };
    let mut quic_failures = 0;
    let mut backoff = INITIAL_BACKOFF;
    while !cancel.is_cancelled() {
        let dialled = tokio::select! {
            dialled = dialer.connect(&mut quic_failures) => dialled,
            () = cancel.cancelled() => break,
        };
        match dialled {
            Ok((connection, why)) => {
                let carrier = connection.carrier();
                ctx.metrics.tunnel_carrier_chosen(carrier);
                info!(peer = %peer.address, slot, %carrier, why, "tunnel carrier chosen");
                let started = tokio::time::Instant::now();
                let reason = if carrier == Carrier::Tcp && choice.transport == Transport::Auto {
                    dialer
                        .run_tcp_until_quic(connection, &ctx, &cancel, &mut quic_failures)
                        .await
                } else {
                    session::run(
                        connection,
                        Direction::Dialed,
                        ctx.clone(),
                        cancel.clone(),
                        CancellationToken::new(),
                    )
                    .await
                };
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

/// What one dialer slot dials with.
struct Dialer {
    endpoint: quinn::Endpoint,
    address: String,
    server_name: String,
    config: Arc<ArcSwap<DialConfig>>,
    choice: CarrierChoice,
}

impl Dialer {
    /// Dials the peer on the configured carrier(s); on success, says why that carrier.
    async fn connect(
        &self,
        quic_failures: &mut u32,
    ) -> Result<(TunnelConnection, String), DialError> {
        let addr = resolve(&self.address).await?;
        match self.choice.transport {
            Transport::Quic => {
                let connection = self.quic(addr).await?;
                Ok((
                    TunnelConnection::Quic(connection),
                    "tunnel.transport = quic".into(),
                ))
            }
            Transport::Tcp => {
                let connection = self.tcp(addr).await?;
                Ok((
                    TunnelConnection::Tcp(connection),
                    "tunnel.transport = tcp".into(),
                ))
            }
            Transport::Auto if *quic_failures >= QUIC_FAILURES_BEFORE_TCP_FIRST => {
                let connection = self.tcp(addr).await?;
                Ok((
                    TunnelConnection::Tcp(connection),
                    format!(
                        "QUIC did not come up {quic_failures}× in a row — UDP may be blocked; \
                         using TCP and trying QUIC again every {}s",
                        self.choice.quic_reprobe_interval.as_secs()
                    ),
                ))
            }
            Transport::Auto => self.race(addr, quic_failures).await,
        }
    }

    /// Happy eyeballs: QUIC first, TLS/TCP beside it once QUIC is late or failed; the first
    /// to come up wins.
    async fn race(
        &self,
        addr: SocketAddr,
        quic_failures: &mut u32,
    ) -> Result<(TunnelConnection, String), DialError> {
        let quic = self.quic(addr);
        tokio::pin!(quic);
        let quic_error = tokio::select! {
            result = &mut quic => match result {
                Ok(connection) => {
                    *quic_failures = 0;
                    return Ok((TunnelConnection::Quic(connection), "QUIC handshake completed".into()));
                }
                Err(e) => Some(e),
            },
            () = tokio::time::sleep(self.choice.tcp_fallback_after) => None,
        };
        let tcp = self.tcp(addr);
        tokio::pin!(tcp);
        let Some((quic_failure, quic_detail)) = quic_error else {
            // QUIC is late: race it against TCP.
            return tokio::select! {
                result = &mut quic => match result {
                    Ok(connection) => {
                        *quic_failures = 0;
                        Ok((TunnelConnection::Quic(connection), "QUIC handshake completed".into()))
                    }
                    Err((_, quic_detail)) => {
                        *quic_failures += 1;
                        let connection = tcp.await?;
                        Ok((TunnelConnection::Tcp(connection), format!("QUIC failed ({quic_detail}); using TCP")))
                    }
                },
                result = &mut tcp => {
                    *quic_failures += 1;
                    let connection = result?;
                    Ok((
                        TunnelConnection::Tcp(connection),
                        format!(
                            "QUIC handshake unanswered after {} ms (attempt {quic_failures}) — UDP may be blocked; using TCP",
                            self.choice.tcp_fallback_after.as_millis()
                        ),
                    ))
                }
            };
        };
        // A refusal of our certificate or theirs is not the network: TCP would fail alike.
        if is_verdict(quic_failure) {
            return Err((quic_failure, quic_detail));
        }
        *quic_failures += 1;
        let connection = tcp.await?;
        Ok((
            TunnelConnection::Tcp(connection),
            format!("QUIC failed ({quic_detail}); using TCP"),
        ))
    }

    async fn quic(&self, addr: SocketAddr) -> Result<quinn::Connection, DialError> {
        let rejection = RejectionSlot::default();
        let connecting = self
            .endpoint
            .connect_with(
                self.config.load().for_attempt(&rejection),
                addr,
                &self.server_name,
            )
            .map_err(|e| {
                (
                    HandshakeFailure::Other,
                    format!("connecting to {addr}: {e}"),
                )
            })?;
        connecting.await.map_err(|e| {
            let rejected = rejection.take();
            let failure = HandshakeFailure::of_connection_error(&e, rejected.as_ref());
            let detail = match rejected {
                Some(rejected) => format!("QUIC handshake with {addr}: {rejected}"),
                None => format!("QUIC handshake with {addr}: {e}"),
            };
            (failure, detail)
        })
    }

    async fn tcp(&self, addr: SocketAddr) -> Result<tcp::TcpConnection, DialError> {
        let config = self.config.load_full();
        tcp::dial(addr, &self.server_name, config.tcp.clone(), &config.tuning).await
    }

    /// Runs a session on a TLS/TCP link and tries QUIC every re-probe interval; once QUIC
    /// comes up, the TCP link is retired (it drains in the background) and the session
    /// moves to QUIC. Returns why the last session ended.
    async fn run_tcp_until_quic(
        &self,
        connection: TunnelConnection,
        ctx: &Arc<SessionContext>,
        cancel: &CancellationToken,
        quic_failures: &mut u32,
    ) -> String {
        let retire = CancellationToken::new();
        let mut tcp_session = tokio::spawn(session::run(
            connection,
            Direction::Dialed,
            ctx.clone(),
            cancel.clone(),
            retire.clone(),
        ));
        loop {
            tokio::select! {
                ended = &mut tcp_session => {
                    return ended.unwrap_or_else(|e| format!("tunnel session task failed: {e}"));
                }
                () = tokio::time::sleep(self.choice.quic_reprobe_interval) => {}
            }
            let probe = async {
                let addr = resolve(&self.address).await?;
                self.quic(addr).await
            };
            let probed = tokio::select! {
                probed = probe => probed,
                ended = &mut tcp_session => {
                    return ended.unwrap_or_else(|e| format!("tunnel session task failed: {e}"));
                }
            };
            match probed {
                Ok(quic) => {
                    // The QUIC link must be routable before the TCP link stops taking
                    // requests, or requests in between would find no route.
                    let quic = TunnelConnection::Quic(quic);
                    let quic_id = quic.stable_id();
                    let mut quic_session = tokio::spawn(session::run(
                        quic,
                        Direction::Dialed,
                        ctx.clone(),
                        cancel.clone(),
                        CancellationToken::new(),
                    ));
                    let up = ctx.peers.wait_until(|links| {
                        links.iter().any(|l| l.id() == quic_id && !l.is_draining())
                    });
                    tokio::select! {
                        () = up => {}
                        ended = &mut quic_session => {
                            let reason = ended.unwrap_or_else(|e| format!("tunnel session task failed: {e}"));
                            debug!(peer = %self.address, %reason, "QUIC re-probe connected but its session ended; staying on TCP");
                            continue;
                        }
                        ended = &mut tcp_session => {
                            // The QUIC session goes on by itself; the TCP one is what ended.
                            let reason = ended.unwrap_or_else(|e| format!("tunnel session task failed: {e}"));
                            return quic_session.await.unwrap_or(reason);
                        }
                    }
                    *quic_failures = 0;
                    ctx.metrics.tunnel_carrier_switched(Carrier::Quic);
                    ctx.metrics.tunnel_carrier_chosen(Carrier::Quic);
                    info!(peer = %self.address, "QUIC works again: new requests move to it and the TCP link drains");
                    retire.cancel();
                    // The TCP session ends by itself once drained; it is not waited for.
                    drop(tcp_session);
                    return quic_session
                        .await
                        .unwrap_or_else(|e| format!("tunnel session task failed: {e}"));
                }
                Err((failure, detail)) => {
                    debug!(peer = %self.address, reason = %failure, error = %detail, "QUIC re-probe failed; staying on TCP");
                }
            }
        }
    }
}

/// Whether a handshake failure is a verdict on a certificate (ours or the peer's) rather
/// than the network's doing.
fn is_verdict(failure: HandshakeFailure) -> bool {
    !matches!(
        failure,
        HandshakeFailure::Timeout | HandshakeFailure::Protocol | HandshakeFailure::Other
    )
}

async fn resolve(address: &str) -> Result<SocketAddr, DialError> {
    let other = |detail: String| (HandshakeFailure::Other, detail);
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| other(format!("resolving {address}: {e}")))?
        .next()
        .ok_or_else(|| other(format!("resolving {address}: no addresses")))
}
