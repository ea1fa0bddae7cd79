//! Dialing out to a configured peer and keeping the connection up: resolve, pick a carrier,
//! connect, run the session, and reconnect with exponential backoff and jitter.
//!
//! With `tunnel.transport = "auto"` a dial starts QUIC and, when its handshake is still
//! unanswered after `tcp_fallback_after` (or failed), races TLS/TCP beside it; the first
//! to come up carries the link. After three dials in a row that TCP won, dials go straight
//! to TCP. While a link runs on TCP, QUIC is tried again every
//! `quic_reprobe_interval`; once it works, the QUIC link takes new requests and the TCP link
//! drains (nothing in flight fails).
//!
//! A dial-only node dials every QUIC connection from a fresh local port (`DialSource::Fresh`)
//! and every TCP connection from a fresh ephemeral port, so after a failure a flow-hashing
//! load balancer in front of several cloud nodes hashes the redial anew instead of sending
//! it back to the dead node.
//!
//! One dialer task per (peer, connection slot). It owns no routing; sessions register links.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::connection::{Carrier, TunnelConnection};
use super::handshake::RejectionSlot;
use super::outcome::{HandshakeError, HandshakeFailure, QuicHandshakeError, SessionEnd};
use super::peers::Direction;
use super::quic::DialConfig;
use super::session::{self, SessionContext};
use super::tcp;
use crate::config::{PeerConfig, Transport};

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);

/// Dials in a row where TCP came up and QUIC did not before `auto` stops trying QUIC first
/// (a peer that is simply down fails both, which says nothing about UDP).
const QUIC_FAILURES_BEFORE_TCP_FIRST: u32 = 3;

/// How a dialer chooses its carrier.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CarrierChoice {
    pub(crate) transport: Transport,
    pub(crate) tcp_fallback_after: Duration,
    pub(crate) quic_reprobe_interval: Duration,
}

/// Where a dialer's QUIC connections come from.
#[derive(Clone)]
pub(crate) enum DialSource {
    /// The node's own endpoint (a node that also listens, or dials from a fixed port).
    Shared(quinn::Endpoint),
    /// A fresh endpoint, on a fresh port of `bind`, for every connection.
    Fresh {
        bind: SocketAddr,
        reset_key_seed: Arc<[u8]>,
        registry: Arc<DialEndpoints>,
    },
}

/// The endpoints dialers opened for their live connections, so that moving the node's
/// tunnels to new ports (`Node::rebind_tunnels`) and shutting down reach them.
#[derive(Default)]
pub(crate) struct DialEndpoints {
    live: Mutex<HashMap<u64, (tokio::runtime::Handle, quinn::Endpoint)>>,
    next: AtomicU64,
}

impl DialEndpoints {
    fn register(self: &Arc<Self>, endpoint: quinn::Endpoint) -> EndpointGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let runtime = tokio::runtime::Handle::current();
        lock(&self.live).insert(id, (runtime, endpoint));
        EndpointGuard {
            registry: self.clone(),
            id,
        }
    }

    /// Each live dial endpoint with the runtime that drives it.
    pub(crate) fn all(&self) -> Vec<(tokio::runtime::Handle, quinn::Endpoint)> {
        lock(&self.live).values().cloned().collect()
    }
}

/// Keeps a dial endpoint listed while its connection is in use.
struct EndpointGuard {
    registry: Arc<DialEndpoints>,
    id: u64,
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        lock(&self.registry.live).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What each dialer slot is doing, for `/v1/status`: every configured peer is listed with
/// its state, carrier, last error and next retry, whether or not a link is up.
#[derive(Default)]
pub(crate) struct DialStates {
    slots: Mutex<std::collections::BTreeMap<(String, usize), SlotState>>,
}

/// One dialer slot as status shows it.
#[derive(Clone, Debug)]
pub(crate) struct SlotState {
    pub(crate) address: String,
    pub(crate) site: String,
    pub(crate) slot: usize,
    /// Dialled because the peer site announced this address (`tunnel::members`), not
    /// because it is configured.
    pub(crate) learned: bool,
    /// `connecting`, `up`, `silent` or `failed` (waiting to retry).
    pub(crate) state: &'static str,
    pub(crate) carrier: Option<Carrier>,
    /// Why this carrier (`tunnel.transport`, a fallback, a re-probe).
    pub(crate) carrier_reason: Option<String>,
    pub(crate) last_error: Option<String>,
    /// When the next attempt starts (`failed` only).
    pub(crate) next_retry: Option<tokio::time::Instant>,
    pub(crate) since: tokio::time::Instant,
}

impl DialStates {
    fn update(&self, slot: &Slot, change: impl FnOnce(&mut SlotState)) {
        let mut slots = lock(&self.slots);
        let entry = slots
            .entry((slot.peer.address.to_string(), slot.index))
            .or_insert_with(|| SlotState {
                address: slot.peer.address.to_string(),
                site: slot.peer.site.clone(),
                slot: slot.index,
                learned: slot.learned,
                state: "connecting",
                carrier: None,
                carrier_reason: None,
                last_error: None,
                next_retry: None,
                since: tokio::time::Instant::now(),
            });
        let before = entry.state;
        change(entry);
        if entry.state != before {
            entry.since = tokio::time::Instant::now();
        }
    }

    /// Every slot, by peer address and slot number.
    pub(crate) fn all(&self) -> Vec<SlotState> {
        lock(&self.slots).values().cloned().collect()
    }

    fn remove(&self, slot: &Slot) {
        lock(&self.slots).remove(&(slot.peer.address.to_string(), slot.index));
    }
}

/// One dialer slot: which peer, which of its connections, and when it is no longer wanted.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub(crate) peer: PeerConfig,
    pub(crate) index: usize,
    /// Set for an address the peer site announced (`tunnel::members`).
    pub(crate) learned: bool,
    /// Fired when the slot is no longer wanted: its link drains (nothing in flight fails)
    /// and it is not dialled again. Configured slots keep theirs until the node stops.
    pub(crate) leave: CancellationToken,
}

impl Slot {
    /// Connection `index` of a configured peer.
    pub(crate) fn configured(peer: &PeerConfig, index: usize) -> Self {
        Self {
            peer: peer.clone(),
            index,
            learned: false,
            leave: CancellationToken::new(),
        }
    }
}

/// A dialled connection and what must live as long as it.
struct Dialled {
    connection: TunnelConnection,
    /// Why this carrier.
    why: String,
    _endpoint: Option<EndpointGuard>,
}

/// Keeps one connection to `peer` up until `cancel` fires. `max_backoff` is read before each
/// wait, so a reload changes it from the next redial on.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    source: DialSource,
    slot: Slot,
    client_config: Arc<ArcSwap<DialConfig>>,
    choice: CarrierChoice,
    max_backoff: watch::Receiver<Duration>,
    ctx: Arc<SessionContext>,
    cancel: CancellationToken,
) {
    let states = ctx.dial_states.clone();
    keep_up(
        source,
        &slot,
        client_config,
        choice,
        max_backoff,
        ctx,
        cancel,
    )
    .await;
    states.remove(&slot);
}

/// Dials the slot's peer, follows the session until it ends, then waits out a jittered,
/// doubling backoff before dialling again; stops when `cancel` fires or the slot leaves.
async fn keep_up(
    source: DialSource,
    slot: &Slot,
    client_config: Arc<ArcSwap<DialConfig>>,
    choice: CarrierChoice,
    max_backoff: watch::Receiver<Duration>,
    ctx: Arc<SessionContext>,
    cancel: CancellationToken,
) {
    let peer = &slot.peer;
    let dialer = Dialer::new(slot, source, client_config, choice);
    let mut quic_failures = 0;
    let mut backoff = INITIAL_BACKOFF;
    let states = ctx.dial_states.clone();
    // A slot that leaves stops dialling; its link drains (see `Session::spawn`).
    let leave = &slot.leave;
    while !cancel.is_cancelled() && !leave.is_cancelled() {
        // Counted once status shows the failure, so whoever waits on the count sees both.
        let mut refused = None;
        states.update(slot, |s| {
            s.state = "connecting";
            s.next_retry = None;
        });
        let dialled = tokio::select! {
            dialled = dialer.connect(&mut quic_failures) => dialled,
            () = cancel.cancelled() => break,
            () = leave.cancelled() => break,
        };
        match dialled {
            Ok(Dialled {
                connection,
                why,
                _endpoint,
            }) => {
                let carrier = connection.carrier();
                dialer.announce_carrier(carrier, &why, &ctx);
                let started = tokio::time::Instant::now();
                let session = Session::spawn(connection, &ctx, &cancel, leave);
                let ended = dialer
                    .follow(session, carrier, &ctx, &cancel, &mut quic_failures)
                    .await;
                let reason = match ended {
                    Ended::Closed(reason) => reason,
                    Ended::Silent => {
                        // Dial a replacement now, from a fresh port: the silent link drains
                        // (or goes at its idle timeout) on its own.
                        dialer.replacing_silent(&states);
                        backoff = INITIAL_BACKOFF;
                        continue;
                    }
                };
                // In TLS 1.3 the server checks our certificate after our side of the handshake
                // is done, so a peer that refuses us looks like a session that ends at once.
                // Only a session that stayed up resets the backoff; otherwise a refused node
                // would redial ten times a second forever.
                if started.elapsed() >= *max_backoff.borrow() {
                    backoff = INITIAL_BACKOFF;
                }
                info!(peer = %peer.address, slot = slot.index, %reason, "tunnel connection ended; reconnecting");
                states.update(slot, |s| s.last_error = Some(reason));
            }
            Err(error) => refused = Some(dialer.dial_failed(&error, backoff, &states)),
        }
        let limit = *max_backoff.borrow();
        backoff = backoff.min(limit);
        let wait = dialer.retry_after(backoff, &states);
        if let Some(failure) = refused {
            ctx.metrics.handshake_failed(failure);
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = cancel.cancelled() => break,
            () = leave.cancelled() => break,
        }
        backoff = (backoff * 2).min(limit);
    }
}

/// What one dialer slot dials with.
struct Dialer {
    slot: Slot,
    source: DialSource,
    address: String,
    server_name: String,
    config: Arc<ArcSwap<DialConfig>>,
    choice: CarrierChoice,
}

impl Dialer {
    /// The dialer of `slot`: its peer's address, and the TLS server name taken from it.
    fn new(
        slot: &Slot,
        source: DialSource,
        config: Arc<ArcSwap<DialConfig>>,
        choice: CarrierChoice,
    ) -> Self {
        let peer = &slot.peer;
        let server_name = super::quic::server_name_for(peer.address.host());
        Self {
            slot: slot.clone(),
            source,
            address: peer.address.to_string(),
            server_name,
            config,
            choice,
        }
    }

    /// Counts, logs and shows in status the carrier a fresh connection of the slot runs on.
    fn announce_carrier(&self, carrier: Carrier, why: &str, ctx: &SessionContext) {
        let (peer, slot) = (&self.slot.peer, &self.slot);
        ctx.metrics.tunnel_carrier_chosen(carrier);
        info!(peer = %peer.address, slot = slot.index, learned = slot.learned, %carrier, why, "tunnel carrier chosen");
        ctx.dial_states.update(slot, |s| {
            s.state = "up";
            s.carrier = Some(carrier);
            s.carrier_reason = Some(why.to_owned());
        });
    }

    /// Waits until a session of the slot ends or its link goes silent; a TCP session chosen by
    /// `transport = "auto"` is meanwhile replaced by QUIC once QUIC works again.
    async fn follow(
        &self,
        mut session: Session,
        carrier: Carrier,
        ctx: &Arc<SessionContext>,
        cancel: &CancellationToken,
        quic_failures: &mut u32,
    ) -> Ended {
        if carrier == Carrier::Tcp && self.choice.transport == Transport::Auto {
            self.run_tcp_until_quic(session, ctx, cancel, quic_failures)
                .await
        } else {
            session.ended_or_silent(ctx).await
        }
    }

    /// Shows in status and logs a failed dial; returns the failure to count.
    fn dial_failed(
        &self,
        error: &HandshakeError,
        backoff: Duration,
        states: &DialStates,
    ) -> HandshakeFailure {
        let (peer, slot) = (&self.slot.peer, &self.slot);
        let failure = error.failure();
        states.update(slot, |s| s.last_error = Some(error.to_string()));
        warn!(peer = %peer.address, slot = slot.index, reason = %failure, %error, retry_in_ms = backoff.as_millis() as u64, "tunnel connect failed");
        failure
    }

    /// How long the slot waits before dialling again, shown in status with the slot failed.
    fn retry_after(&self, backoff: Duration, states: &DialStates) -> Duration {
        // Full jitter in [backoff/2, backoff]: many on-prem nodes must not reconnect in lockstep.
        let wait = backoff.mul_f64(rand::random_range(0.5..=1.0));
        states.update(&self.slot, |s| {
            s.state = "failed";
            s.next_retry = Some(tokio::time::Instant::now() + wait);
        });
        wait
    }

    /// Logs and shows in status that the slot's link went silent and a replacement is dialled.
    fn replacing_silent(&self, states: &DialStates) {
        let (peer, slot) = (&self.slot.peer, &self.slot);
        warn!(peer = %peer.address, slot = slot.index, "tunnel link went silent; dialling a replacement");
        states.update(slot, |s| {
            s.state = "silent";
            s.last_error = Some("nothing heard from the peer; dialling a replacement".into());
        });
    }

    /// Dials the peer on the configured carrier(s); on success, says why that carrier.
    async fn connect(&self, quic_failures: &mut u32) -> Result<Dialled, HandshakeError> {
        let addr = resolve(&self.address).await?;
        match self.choice.transport {
            Transport::Quic => {
                let (connection, endpoint) = self.quic(addr).await?;
                Ok(Dialled::quic(
                    connection,
                    endpoint,
                    "tunnel.transport = quic",
                ))
            }
            Transport::Tcp => {
                let connection = self.tcp(addr).await?;
                Ok(Dialled::tcp(connection, "tunnel.transport = tcp"))
            }
            Transport::Auto if *quic_failures >= QUIC_FAILURES_BEFORE_TCP_FIRST => {
                let connection = self.tcp(addr).await?;
                Ok(Dialled::tcp(
                    connection,
                    format!(
                        "TCP came up and QUIC did not {quic_failures}× in a row — UDP may be blocked; \
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
    ) -> Result<Dialled, HandshakeError> {
        let quic = self.quic(addr);
        tokio::pin!(quic);
        let quic_error = tokio::select! {
            result = &mut quic => match result {
                Ok((connection, endpoint)) => {
                    *quic_failures = 0;
                    return Ok(Dialled::quic(connection, endpoint, "QUIC handshake completed"));
                }
                Err(e) => Some(e),
            },
            () = tokio::time::sleep(self.choice.tcp_fallback_after) => None,
        };
        let tcp = self.tcp(addr);
        tokio::pin!(tcp);
        let Some(quic_error) = quic_error else {
            // QUIC is late: race it against TCP.
            return tokio::select! {
                result = &mut quic => match result {
                    Ok((connection, endpoint)) => {
                        *quic_failures = 0;
                        Ok(Dialled::quic(connection, endpoint, "QUIC handshake completed"))
                    }
                    Err(quic_error) => {
                        let connection = tcp.await?;
                        *quic_failures += 1;
                        Ok(Dialled::tcp(connection, format!("QUIC failed ({quic_error}); using TCP")))
                    }
                },
                result = &mut tcp => {
                    let connection = result?;
                    *quic_failures += 1;
                    Ok(Dialled::tcp(
                        connection,
                        format!(
                            "QUIC handshake unanswered after {} ms (attempt {quic_failures}) — UDP may be blocked; using TCP",
                            self.choice.tcp_fallback_after.as_millis()
                        ),
                    ))
                }
            };
        };
        // A refusal of our certificate or theirs is not the network: TCP would fail alike.
        if is_verdict(quic_error.failure()) {
            return Err(quic_error);
        }
        let connection = tcp.await?;
        *quic_failures += 1;
        Ok(Dialled::tcp(
            connection,
            format!("QUIC failed ({quic_error}); using TCP"),
        ))
    }

    /// Dials QUIC; a fresh endpoint comes back with its registration, to keep as long as
    /// the connection.
    async fn quic(
        &self,
        addr: SocketAddr,
    ) -> Result<(quinn::Connection, Option<EndpointGuard>), HandshakeError> {
        let (endpoint, guard) = match &self.source {
            DialSource::Shared(endpoint) => (endpoint.clone(), None),
            DialSource::Fresh {
                bind,
                reset_key_seed,
                registry,
            } => {
                let socket =
                    super::quic::bind_socket(*bind, false).map_err(HandshakeError::Endpoint)?;
                let endpoint = super::quic::endpoint(socket, None, reset_key_seed, None)
                    .map_err(HandshakeError::Endpoint)?;
                let guard = registry.register(endpoint.clone());
                (endpoint, Some(guard))
            }
        };
        let rejection = RejectionSlot::default();
        let connecting = endpoint
            .connect_with(
                self.config.load().for_attempt(&rejection),
                addr,
                &self.server_name,
            )
            .map_err(|error| HandshakeError::QuicConnect { addr, error })?;
        let connection = connecting.await.map_err(|error| HandshakeError::Quic {
            addr,
            error: QuicHandshakeError {
                error,
                rejected: rejection.take(),
            },
        })?;
        Ok((connection, guard))
    }

    async fn tcp(&self, addr: SocketAddr) -> Result<tcp::TcpConnection, HandshakeError> {
        let config = self.config.load_full();
        tcp::dial(addr, &self.server_name, config.tcp.clone(), &config.tuning).await
    }

    /// Runs a session on a TLS/TCP link and tries QUIC every re-probe interval; once QUIC
    /// comes up, the TCP link is retired (it drains in the background) and the session
    /// moves to QUIC. Returns how the last session ended.
    async fn run_tcp_until_quic(
        &self,
        mut tcp_session: Session,
        ctx: &Arc<SessionContext>,
        cancel: &CancellationToken,
        quic_failures: &mut u32,
    ) -> Ended {
        loop {
            tokio::select! {
                ended = tcp_session.ended_or_silent(ctx) => return ended,
                () = tokio::time::sleep(self.choice.quic_reprobe_interval) => {}
            }
            let probe = async {
                let addr = resolve(&self.address).await?;
                self.quic(addr).await
            };
            let probed = tokio::select! {
                probed = probe => probed,
                ended = tcp_session.ended_or_silent(ctx) => return ended,
            };
            let (quic, _endpoint) = match probed {
                Ok(probed) => probed,
                Err(error) => {
                    debug!(peer = %self.address, reason = %error.failure(), %error, "QUIC re-probe failed; staying on TCP");
                    continue;
                }
            };
            // The QUIC link must be routable before the TCP link stops taking requests, or
            // requests in between would find no route.
            let mut quic_session =
                Session::spawn(TunnelConnection::Quic(quic), ctx, cancel, &self.slot.leave);
            tokio::select! {
                up = quic_session.up(ctx) => if !up {
                    debug!(peer = %self.address, "QUIC re-probe connected but its session ended; staying on TCP");
                    continue;
                },
                ended = tcp_session.ended_or_silent(ctx) => {
                    // The TCP link is gone; the QUIC one carries on in its place.
                    drop(ended);
                    return quic_session.ended_or_silent(ctx).await;
                }
            }
            *quic_failures = 0;
            ctx.metrics.tunnel_carrier_switched(Carrier::Quic);
            ctx.metrics.tunnel_carrier_chosen(Carrier::Quic);
            ctx.dial_states.update(&self.slot, |s| {
                s.carrier = Some(Carrier::Quic);
                s.carrier_reason = Some(format!(
                    "QUIC re-probe succeeded after {}s on TCP",
                    s.since.elapsed().as_secs()
                ));
            });
            info!(peer = %self.address, "QUIC works again: new requests move to it and the TCP link drains");
            // The TCP session ends by itself once drained; it is not waited for.
            tcp_session.retire();
            return quic_session.ended_or_silent(ctx).await;
        }
    }
}

/// How a dialled session ended, as far as its dialer is concerned.
enum Ended {
    /// The connection is gone, for this reason.
    Closed(String),
    /// Its link went silent: it is retired, and the slot dials a replacement.
    Silent,
}

/// A session running in its own task, so its dialer can act while it runs.
struct Session {
    id: usize,
    task: tokio::task::JoinHandle<SessionEnd>,
    retire: CancellationToken,
}

impl Session {
    /// `cancel` closes the connection at once (the node stops); `leave` drains it (its slot
    /// is no longer wanted), as retiring the session does.
    fn spawn(
        connection: TunnelConnection,
        ctx: &Arc<SessionContext>,
        cancel: &CancellationToken,
        leave: &CancellationToken,
    ) -> Self {
        let retire = leave.child_token();
        Self {
            id: connection.stable_id(),
            task: tokio::spawn(session::run(
                connection,
                Direction::Dialed,
                ctx.clone(),
                cancel.clone(),
                retire.clone(),
            )),
            retire,
        }
    }

    /// The link of session `id`, once the hello exchange has registered it.
    async fn link(id: usize, ctx: &SessionContext) -> Arc<super::peers::PeerLink> {
        let mut found = None;
        ctx.peers
            .wait_until(|links| {
                found = links.iter().find(|l| l.id() == id).cloned();
                found.is_some()
            })
            .await;
        match found {
            Some(link) => link,
            None => std::future::pending().await,
        }
    }

    /// Whether the link came up (registered, not draining) before the session ended.
    async fn up(&mut self, ctx: &SessionContext) -> bool {
        let id = self.id;
        let up = ctx
            .peers
            .wait_until(|links| links.iter().any(|l| l.id() == id && !l.is_draining()));
        tokio::select! {
            () = up => true,
            _ = &mut self.task => false,
        }
    }

    /// Waits until the session ends, or its link goes silent (then retires it).
    async fn ended_or_silent(&mut self, ctx: &SessionContext) -> Ended {
        let id = self.id;
        let silent = async {
            Self::link(id, ctx).await.went_silent().await;
        };
        tokio::select! {
            ended = &mut self.task => Ended::Closed(match ended {
                Ok(end) => end.to_string(),
                Err(e) => format!("tunnel session task failed: {e}"),
            }),
            () = silent => {
                self.retire.cancel();
                Ended::Silent
            }
        }
    }

    /// Drains the link; the session ends by itself.
    fn retire(self) {
        self.retire.cancel();
    }
}

impl Dialled {
    fn quic(
        connection: quinn::Connection,
        endpoint: Option<EndpointGuard>,
        why: impl Into<String>,
    ) -> Self {
        Self {
            connection: TunnelConnection::Quic(connection),
            why: why.into(),
            _endpoint: endpoint,
        }
    }

    fn tcp(connection: tcp::TcpConnection, why: impl Into<String>) -> Self {
        Self {
            connection: TunnelConnection::Tcp(connection),
            why: why.into(),
            _endpoint: None,
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

async fn resolve(address: &str) -> Result<SocketAddr, HandshakeError> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|error| HandshakeError::Resolve {
            address: address.to_owned(),
            error,
        })?
        .next()
        .ok_or_else(|| HandshakeError::NoAddress {
            address: address.to_owned(),
        })
}
