//! One tunnel connection's life after the QUIC/TLS handshake: the control-stream hello,
//! registration in the peer set, control updates (exports, GOAWAY) and accepting the peer's
//! request streams.
//!
//! It hands each accepted stream to a callback and never looks inside; it does not dial or
//! reconnect (that is `dialer`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hybridge_ca::spiffe::SpiffeId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::connection::TunnelConnection;
use super::control::{self, ControlMessage};
use super::outcome::{Disconnect, HelloFailed, SessionEnd, SessionRefused, UNTRUSTED};
use super::peers::{Direction, PeerLink, PeerNode, PeerSet};
use super::serving::ServingPolicy;
use super::stream::{RecvHalf, SendHalf, StreamError, codes};
use crate::metrics::Metrics;
use crate::trust::{self, PeerKind, Trust};

/// How long a fresh connection may take to exchange hellos.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one request stream opened by the peer node.
pub(crate) type StreamHandler = Box<
    dyn Fn(SendHalf, RecvHalf, Arc<PeerNode>) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// What a session needs from its node.
pub(crate) struct SessionContext {
    pub(crate) peers: Arc<PeerSet>,
    /// Which sites may serve which services, for refusing announcements.
    pub(crate) serving: Arc<ServingPolicy>,
    /// The certificate checks in force; a peer that stops passing them is disconnected.
    pub(crate) trust: tokio::sync::watch::Receiver<Arc<Trust>>,
    pub(crate) metrics: Arc<Metrics>,
    /// Spawns and tracks request handlers, so draining can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Our hello, built fresh for every connection (exports and policy change).
    pub(crate) hello: Box<dyn Fn() -> ControlMessage + Send + Sync>,
    /// Serves one request stream from the peer.
    pub(crate) on_stream: StreamHandler,
    /// The keepalive interval: a healthy link is never quiet much longer.
    pub(crate) keepalive: Duration,
    /// What each dialer slot is doing (status).
    pub(crate) dial_states: Arc<super::dialer::DialStates>,
}

/// Runs a session until the connection closes or `cancel` fires; returns why it ended.
///
/// `retire` hands the link over without failing a request: once it fires, no new request
/// goes to the link, the peer is told to send none either (GOAWAY), and the connection
/// closes when both sides' requests on it are done (the dialer retires a TCP link this
/// way once QUIC works again).
pub(crate) async fn run(
    connection: TunnelConnection,
    direction: Direction,
    ctx: Arc<SessionContext>,
    cancel: CancellationToken,
    retire: CancellationToken,
) -> SessionEnd {
    let (peer, peer_node) = match identify_peer(&connection) {
        Ok(identified) => identified,
        Err(refusal) => {
            ctx.metrics.handshake_failed(refusal.failure());
            return SessionEnd::Refused(refusal);
        }
    };
    let peer_name: Arc<str> = peer_node.id.clone();
    let (mut control_send, mut control_recv, announcement, sent) =
        match handshake(&connection, direction, &ctx, &peer_name).await {
            Ok(control) => control,
            Err(refusal) => return refusal,
        };
    let (link, mut control_rx) =
        register_link(&connection, direction, &ctx, &peer_node, peer, announcement);
    catch_up(&link, &ctx, sent);

    let writer = write_control(&mut control_rx, &mut control_send);
    let reader = read_control(&mut control_recv, &link, &ctx, &peer_node, &peer_name);
    let acceptor = accept_streams(&connection, &ctx, &peer_node);
    let untrusted = trust_lost(&connection, direction, &ctx);
    let retirement = async {
        retire.cancelled().await;
        retire_link(&connection, &link, &ctx).await;
    };
    let watchdog = watch_silence(&connection, &link, &ctx);
    let end = tokio::select! {
        lost = acceptor => Disconnect::Lost(lost),
        // The acceptor and the control reader keep running while the link drains: the peer
        // may still send requests until it reads our GOAWAY, and its DrainAck comes on the
        // control stream.
        () = retirement => Disconnect::Replaced,
        never = watchdog => match never {},
        why = untrusted => {
            close_untrusted(&connection, &link, &ctx, &peer_name, &why).await;
            Disconnect::Untrusted
        }
        // A control stream ends with its connection too: then the connection's end is the
        // reason, whichever of the two this node noticed first.
        end = reader => control_ended(&connection, ControlHalf::Reader, end).await,
        end = writer => control_ended(&connection, ControlHalf::Writer, end).await,
        () = cancel.cancelled() => {
            connection.close(codes::GOING_AWAY, "node shutting down");
            Disconnect::ShuttingDown
        }
    };
    record_down(&connection, &ctx, &peer_node, &link, &end);
    // A TLS/TCP connection writes what it has buffered before its socket goes; give it the
    // moment (a QUIC connection's endpoint does the same on its own).
    let _ = tokio::time::timeout(CLOSE_WAIT, connection.closed()).await;
    SessionEnd::Disconnected(end)
}

/// The peer's identity and node, from the certificate the handshake checked. Closes the
/// connection and says why when it names no node.
fn identify_peer(
    connection: &TunnelConnection,
) -> Result<(SpiffeId, Arc<PeerNode>), SessionRefused> {
    let Some(peer) = connection.peer_id() else {
        connection.close(codes::PROTOCOL, "no peer identity");
        return Err(SessionRefused::NoIdentity);
    };
    // The handshake admits node certificates only; anything else is refused here too, since
    // the site of every request the peer sends comes from this identity.
    let Some(peer_node) = PeerNode::of(&peer).map(Arc::new) else {
        connection.close(codes::PROTOCOL, "not a node identity");
        return Err(SessionRefused::NotANode(peer));
    };
    Ok((peer, peer_node))
}

/// Exchanges hellos within `HELLO_TIMEOUT`; returns the control stream and the peer's
/// announcement, or closes the connection, counts and logs the failure and says how the
/// session ended.
async fn handshake(
    connection: &TunnelConnection,
    direction: Direction,
    ctx: &SessionContext,
    peer_name: &str,
) -> Result<
    (
        SendHalf,
        RecvHalf,
        control::PeerAnnouncement,
        ControlMessage,
    ),
    SessionEnd,
> {
    let hello = (ctx.hello)();
    match tokio::time::timeout(
        HELLO_TIMEOUT,
        exchange_hellos(connection, direction, &hello),
    )
    .await
    {
        Ok(Ok((send, recv, announcement))) => Ok((send, recv, announcement, hello)),
        Ok(Err(e)) => {
            connection.close(codes::PROTOCOL, "control handshake failed");
            let failure = e.failure();
            ctx.metrics.handshake_failed(failure);
            warn!(peer = %peer_name, remote = %connection.remote_address(), reason = %failure, error = %e, "tunnel control handshake failed");
            Err(SessionEnd::Refused(SessionRefused::Hello(e)))
        }
        Err(_) => {
            connection.close(codes::PROTOCOL, "control handshake timed out");
            let refusal = SessionRefused::HelloTimedOut;
            ctx.metrics.handshake_failed(refusal.failure());
            warn!(peer = %peer_name, remote = %connection.remote_address(), "tunnel control handshake timed out");
            Err(SessionEnd::Refused(refusal))
        }
    }
}

/// Opens (dialled) or accepts (accepted) the control stream and exchanges hellos on it, the
/// dialler speaking first.
async fn exchange_hellos(
    connection: &TunnelConnection,
    direction: Direction,
    hello: &ControlMessage,
) -> Result<(SendHalf, RecvHalf, control::PeerAnnouncement), HelloFailed> {
    let (mut send, mut recv) = match direction {
        Direction::Dialed => connection.open_stream().await,
        Direction::Accepted => connection.accept_stream().await,
    }
    .map_err(HelloFailed::Connection)?;
    // A control stream that fails because the connection went (a peer that refused our
    // certificate closes it right after the TLS handshake) is counted by why it went.
    let control_failed = |failed: HelloFailed| match connection.lost() {
        Some(lost) => HelloFailed::ConnectionGone {
            during: Box::new(failed),
            lost,
        },
        None => failed,
    };
    let stream_failed = |e: StreamError| control_failed(HelloFailed::Stream(e));
    if direction == Direction::Dialed {
        control::send(&mut send, hello)
            .await
            .map_err(stream_failed)?;
    }
    let theirs = control::receive(&mut recv)
        .await
        .map_err(stream_failed)?
        .ok_or_else(|| control_failed(HelloFailed::Closed))?;
    let announcement = control::check_hello(theirs).map_err(HelloFailed::Hello)?;
    if direction == Direction::Accepted {
        control::send(&mut send, hello)
            .await
            .map_err(stream_failed)?;
    }
    Ok((send, recv, announcement))
}

/// Puts the link in the peer set, counts and logs it up; returns it with the receiving end
/// of its control channel.
fn register_link(
    connection: &TunnelConnection,
    direction: Direction,
    ctx: &SessionContext,
    peer_node: &PeerNode,
    peer: SpiffeId,
    announcement: control::PeerAnnouncement,
) -> (Arc<PeerLink>, mpsc::Receiver<ControlMessage>) {
    let (control_tx, control_rx) = mpsc::channel::<ControlMessage>(16);
    refuse_unservable(ctx, peer_node, &announcement.exports);
    let exports = announcement.exports.clone();
    let policy_digest = announcement.policy_digest.clone();
    let link = Arc::new(PeerLink::new(
        connection.clone(),
        peer,
        direction,
        announcement,
        control_tx,
    ));
    ctx.peers.insert(link.clone());
    ctx.metrics.tunnel_connected(&peer_node.site);
    let peer_name = &peer_node.id;
    info!(peer = %peer_name, remote = %connection.remote_address(), carrier = %connection.carrier(), ?direction, ?exports, %policy_digest, "tunnel up");
    (link, control_rx)
}

/// Sends the peer what changed in this node's announcement (exports, policy, members) since
/// the hello it was sent: a change in between was broadcast only to the links already in the
/// peer set, and the peer would otherwise keep the hello's view of this node until the next.
fn catch_up(link: &PeerLink, ctx: &SessionContext, sent: ControlMessage) {
    let now = (ctx.hello)();
    if now != sent
        && let Some(update) = now.into_update()
    {
        link.send_control(update);
    }
}

/// Writes the messages queued for the peer on the control stream until the queue closes or
/// a write fails.
async fn write_control(
    queued: &mut mpsc::Receiver<ControlMessage>,
    control_send: &mut SendHalf,
) -> ControlEnd {
    while let Some(message) = queued.recv().await {
        if let Err(e) = control::send(control_send, &message).await {
            debug!(error = %e, "control stream write failed");
            return ControlEnd::Failed(e);
        }
    }
    ControlEnd::Finished
}

/// Reads the peer's control messages (exports and policy changes, GOAWAY, its drain
/// acknowledgement) and applies them to the link until the stream ends.
async fn read_control(
    control_recv: &mut RecvHalf,
    link: &Arc<PeerLink>,
    ctx: &SessionContext,
    peer_node: &PeerNode,
    peer_name: &str,
) -> ControlEnd {
    loop {
        match control::receive(control_recv).await {
            Ok(Some(ControlMessage::Exports {
                exports,
                policy_version,
                policy_digest,
                members,
            })) => {
                info!(peer = %peer_name, ?exports, policy_version, %policy_digest, "peer exports or policy changed");
                let previous = link.exports();
                let new: Vec<String> = exports
                    .iter()
                    .filter(|s| !previous.contains(*s))
                    .cloned()
                    .collect();
                refuse_unservable(ctx, peer_node, &new);
                link.announce(control::PeerAnnouncement {
                    exports,
                    policy_version,
                    policy_digest,
                    members: control::parse_members(&members),
                });
                ctx.peers.touch();
            }
            Ok(Some(ControlMessage::GoAway { reason })) => {
                info!(peer = %peer_name, %reason, "peer is draining; sending it no new requests");
                link.mark_draining();
                ctx.peers.touch();
                // Acknowledge once our streams to it are over: the peer closes the
                // connection soon after, and a stream still opening would be cut.
                let link = link.clone();
                ctx.tasks.spawn(async move {
                    link.streams_finished().await;
                    link.send_control(ControlMessage::DrainAck);
                });
            }
            Ok(Some(ControlMessage::DrainAck)) => {
                link.mark_drain_acknowledged();
                ctx.peers.touch();
            }
            Ok(Some(ControlMessage::Hello { .. })) => {
                warn!(peer = %peer_name, "unexpected second hello ignored");
            }
            Ok(None) => break ControlEnd::Finished,
            Err(e) => {
                debug!(peer = %peer_name, error = %e, "control stream ended");
                break ControlEnd::Failed(e);
            }
        }
    }
}

/// Hands every request stream the peer opens to the node's handler, on its own task; returns
/// why the connection went.
async fn accept_streams(
    connection: &TunnelConnection,
    ctx: &SessionContext,
    peer_node: &Arc<PeerNode>,
) -> super::connection::ConnectionLost {
    loop {
        match connection.accept_stream().await {
            Ok((send, recv)) => {
                let handler = (ctx.on_stream)(send, recv, peer_node.clone());
                ctx.tasks.spawn(handler);
            }
            Err(lost) => break lost,
        }
    }
}

/// Resolves with the reason once the peer's certificate chain stops passing the trust in
/// force.
fn trust_lost(
    connection: &TunnelConnection,
    direction: Direction,
    ctx: &SessionContext,
) -> impl Future<Output = String> + use<> {
    // A dialled peer is a TLS server to us, an accepting one a TLS client.
    let role = match direction {
        Direction::Dialed => hybridge_ca::tls::PeerRole::Server,
        Direction::Accepted => hybridge_ca::tls::PeerRole::Client,
    };
    trust::lost(
        ctx.trust.clone(),
        connection.peer_chain(),
        PeerKind::Node,
        role,
    )
}

/// Counts, records and logs the link down and takes it out of the peer set.
fn record_down(
    connection: &TunnelConnection,
    ctx: &SessionContext,
    peer_node: &PeerNode,
    link: &PeerLink,
    end: &Disconnect,
) {
    let reason = end.reason();
    let detail = end.to_string();
    // Counted before the link leaves the set, so whoever waits on the set sees the count.
    ctx.metrics.tunnel_disconnected(&peer_node.site, reason);
    ctx.peers.record_down(&peer_node.site, reason, &detail);
    ctx.peers.remove(link.id());
    let peer_name = &peer_node.id;
    info!(peer = %peer_name, carrier = %connection.carrier(), %reason, %detail, "tunnel down");
}

/// How often a link's watchdog looks for news from the peer.
const WATCH_TICK: Duration = Duration::from_millis(100);

/// Marks the link silent when nothing has arrived from the peer for longer than a healthy
/// link is ever quiet — a keepalive interval (the peer's keepalives and its acknowledgements
/// of ours arrive at least that often) plus two round trips and a margin — and heard again
/// when something arrives. Silent links get no new requests, and requests waiting on one
/// are retried elsewhere or failed (see `http::import`), long before the idle timeout
/// closes the connection. A watchdog that itself ran late (the process was starved of
/// CPU) takes that as news, so a busy node does not declare its peers silent.
async fn watch_silence(
    connection: &TunnelConnection,
    link: &PeerLink,
    ctx: &SessionContext,
) -> std::convert::Infallible {
    let mut count = connection.received();
    let mut heard = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(WATCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let late = now.duration_since(previous) > WATCH_TICK * 3;
        previous = now;
        let received = connection.received();
        if received != count || late {
            count = received;
            heard = now;
            if link.is_silent() {
                link.set_silent(false);
                ctx.peers.touch();
                info!(peer = %link.peer, "tunnel link heard from again");
            }
            continue;
        }
        let limit = ctx.keepalive + connection.stats().rtt * 2 + Duration::from_millis(100);
        let quiet = now.duration_since(heard);
        if quiet >= limit && !link.is_silent() {
            link.set_silent(true);
            ctx.peers.touch();
            ctx.metrics.tunnel_silent();
            warn!(peer = %link.peer, carrier = %connection.carrier(), quiet_ms = quiet.as_millis() as u64, "nothing heard on the tunnel link; routing new requests to other links");
        }
    }
}

/// How long a closing session waits for its connection to be gone.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// How long a retired link may take to finish its requests before it closes anyway.
const RETIRE_GRACE: Duration = Duration::from_secs(30);

/// Drains a link that another link replaces: stop routing to it, ask the peer to do the
/// same, wait for both sides' requests on it to end (bounded), then close it.
async fn retire_link(connection: &TunnelConnection, link: &Arc<PeerLink>, ctx: &SessionContext) {
    link.mark_draining();
    ctx.peers.touch();
    link.send_control(ControlMessage::GoAway {
        reason: "link replaced by one on another carrier".into(),
    });
    let finished = async {
        link.streams_finished().await;
        ctx.peers
            .wait_until(|_| link.drain_acknowledged() || connection.lost().is_some())
            .await;
    };
    let _ = tokio::time::timeout(RETIRE_GRACE, finished).await;
    connection.close(codes::CLOSED, "link replaced");
}

/// Which half of the control stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ControlHalf {
    Reader,
    Writer,
}

/// How a half of the control stream ended.
#[derive(Debug)]
enum ControlEnd {
    /// The peer finished its side (reader), or nothing is left to send (writer).
    Finished,
    /// Reading or writing failed.
    Failed(StreamError),
}

/// How long an ended control stream waits for its connection to report why it went.
const CONNECTION_END_GRACE: Duration = Duration::from_millis(500);

/// Why the session ends after a half of its control stream did. A stream can see its
/// connection's end (an idle timeout during a blackhole, a reset) before the connection
/// reports a reason, so the connection gets a moment to report one: a peer that could not
/// have sent anything must not be blamed for closing the stream. Closes the connection when
/// it is still up.
async fn control_ended(
    connection: &TunnelConnection,
    half: ControlHalf,
    end: ControlEnd,
) -> Disconnect {
    if connection.lost().is_none() {
        let _ = tokio::time::timeout(CONNECTION_END_GRACE, connection.closed()).await;
    }
    let lost = connection.lost();
    let still_up = lost.is_none();
    let disconnect = control_end_reason(lost, half, end);
    if still_up {
        connection.close(codes::PROTOCOL, disconnect.reason().as_str());
    }
    disconnect
}

/// Why the link ended after a control stream half ended as `end`, given how its connection
/// ended (`None`: it is still up).
fn control_end_reason(
    lost: Option<super::connection::ConnectionLost>,
    half: ControlHalf,
    end: ControlEnd,
) -> Disconnect {
    if let Some(lost) = lost {
        return Disconnect::Lost(lost);
    }
    match (half, end) {
        (ControlHalf::Reader, ControlEnd::Finished) => Disconnect::ControlClosed,
        (ControlHalf::Reader, ControlEnd::Failed(e)) => Disconnect::ControlReadFailed(e),
        (ControlHalf::Writer, ControlEnd::Failed(e)) => Disconnect::ControlWriteFailed(e),
        (ControlHalf::Writer, ControlEnd::Finished) => Disconnect::ControlWriterStopped,
    }
}

/// How long a peer that lost trust may take to finish the streams we sent it.
const UNTRUSTED_GRACE: Duration = Duration::from_secs(2);

/// Disconnects a peer whose certificate was revoked, expired or no longer chains to the CA
/// bundle: no new request goes to it, our requests to it get a short grace (an honest peer
/// finishes them), then the connection closes whatever is left. Its own requests to us are
/// not accepted any more (the acceptor is no longer polled).
async fn close_untrusted(
    connection: &TunnelConnection,
    link: &Arc<PeerLink>,
    ctx: &SessionContext,
    peer_name: &str,
    why: &str,
) {
    warn!(peer = %peer_name, reason = %why, "closing the tunnel: the peer's certificate is no longer trusted");
    link.mark_draining();
    ctx.peers.touch();
    let _ = tokio::time::timeout(UNTRUSTED_GRACE, link.streams_finished()).await;
    connection.close(codes::PROTOCOL, UNTRUSTED);
}

/// Logs and counts, once per announcement, each announced service the peer's site may not
/// serve. Routing asks the policy again per request, so a later policy change still counts.
fn refuse_unservable(ctx: &SessionContext, peer: &PeerNode, announced: &[String]) {
    for service in announced {
        let verdict = ctx.serving.verdict(service, &peer.site);
        if !verdict.permits() {
            ctx.metrics.export_refused();
            warn!(
                peer = %peer.id,
                site = %peer.site,
                service = %service,
                why = verdict.explain(),
                "ignoring the peer's announcement of a service its site may not serve"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::connection::ConnectionLost;
    use crate::tunnel::outcome::DisconnectReason;
    use crate::tunnel::stream::{ReadError, WriteError};

    /// What a session counts and records for `disconnect`.
    fn counted(disconnect: Disconnect) -> (DisconnectReason, String) {
        (disconnect.reason(), disconnect.to_string())
    }

    fn read_failed(error: quinn::ConnectionError) -> ControlEnd {
        ControlEnd::Failed(ReadError::from(quinn::ReadError::ConnectionLost(error)).into())
    }

    fn write_failed(error: quinn::WriteError) -> ControlEnd {
        ControlEnd::Failed(WriteError::from(error).into())
    }

    #[test]
    fn a_control_stream_ended_by_its_connection_takes_the_connection_reason() {
        // A blackhole: the stream read fails because the connection timed out; nothing came
        // from the peer, so this is an idle timeout, not a peer close.
        let timed_out = Some(ConnectionLost::Quic(quinn::ConnectionError::TimedOut));
        for end in [
            ControlEnd::Finished,
            read_failed(quinn::ConnectionError::TimedOut),
        ] {
            assert_eq!(
                control_end_reason(timed_out.clone(), ControlHalf::Reader, end).reason(),
                DisconnectReason::IdleTimeout
            );
        }
        assert_eq!(
            control_end_reason(
                Some(ConnectionLost::Quic(quinn::ConnectionError::Reset)),
                ControlHalf::Writer,
                write_failed(quinn::WriteError::ConnectionLost(
                    quinn::ConnectionError::Reset
                ))
            )
            .reason(),
            DisconnectReason::ConnectionError
        );
    }

    #[test]
    fn only_a_finished_control_stream_on_a_live_connection_is_a_peer_close() {
        assert_eq!(
            counted(control_end_reason(
                None,
                ControlHalf::Reader,
                ControlEnd::Finished
            )),
            (
                DisconnectReason::ControlClosed,
                "peer closed the control stream".to_owned()
            )
        );
        let malformed = serde_json::from_slice::<ControlMessage>(b"{").unwrap_err();
        assert_eq!(
            counted(control_end_reason(
                None,
                ControlHalf::Reader,
                ControlEnd::Failed(ReadError::MalformedControl(malformed).into())
            )),
            (
                DisconnectReason::ControlFailed,
                "control stream read failed: tunnel stream read failed: malformed control \
                 message: EOF while parsing an object at line 1 column 1"
                    .to_owned()
            )
        );
        assert_eq!(
            control_end_reason(
                None,
                ControlHalf::Writer,
                write_failed(quinn::WriteError::Stopped(quinn::VarInt::from_u32(0)))
            )
            .reason(),
            DisconnectReason::ControlFailed
        );
    }
}
