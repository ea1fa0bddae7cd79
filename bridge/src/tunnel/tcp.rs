//! The TLS-over-TCP carrier: the same mTLS identities and the same frames as QUIC, for
//! networks that block or throttle UDP.
//!
//! One TCP connection per link, TLS 1.3 (the QUIC tunnel's rustls configs with their own
//! ALPN), and HTTP/2 (`h2`) as the stream multiplexer: per-stream and per-connection flow
//! control, stream limits and pings come from a hardened implementation, as in cloudflared.
//! Each tunnel stream is one HTTP/2 stream whose DATA carries our frames, so nothing above
//! the transport seam knows which carrier it runs on.
//!
//! HTTP/2 lets only the client (the dialling node) open streams, but tunnels carry requests
//! both ways. The dialler therefore keeps a few *offers* open: streams it started that the
//! listener takes when it needs a stream of its own, answering with response headers; the
//! dialler then sees a stream the peer opened and makes a new offer. A stream the listener
//! opens costs no round trip while offers are left.
//!
//! Liveness: every byte read counts as hearing from the peer; pings every keepalive measure
//! the RTT and keep a quiet link heard. A link silent for the idle timeout is closed.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::outcome::{DisconnectReason, HandshakeError, HandshakeFailure};
use super::quic::TransportTuning;
use super::stream::{RecvHalf, SendHalf};

/// ALPN of the tunnel protocol over TLS/TCP.
pub(crate) const ALPN: &[u8] = b"hybridge-tcp/1";

/// Offers the dialler keeps open for the listener's streams.
const OFFERS: usize = 32;

/// How long a stream waits for the driver to say why the connection went.
const REASON_WAIT: Duration = Duration::from_millis(500);

/// How long a closing connection may take to write what is buffered before the socket goes.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// Paths that tell the listener what a stream the dialler opens is for.
const FORWARD: &str = "https://hybridge/s";
const OFFER: &str = "https://hybridge/r";

/// A frame head and the payload after it, sent as one piece so a body chunk is never copied
/// to sit behind its 5-byte head.
#[derive(Default)]
pub struct Piece {
    head: Bytes,
    body: Bytes,
}

impl Piece {
    pub(crate) fn new(head: Bytes, body: Bytes) -> Self {
        Self { head, body }
    }

    /// Splits off the first `n` bytes (at most `remaining()`).
    pub(crate) fn split_to(&mut self, n: usize) -> Piece {
        if n <= self.head.len() {
            Piece {
                head: self.head.split_to(n),
                body: Bytes::new(),
            }
        } else {
            let rest = n - self.head.len();
            Piece {
                head: std::mem::take(&mut self.head),
                body: self.body.split_to(rest),
            }
        }
    }
}

impl Buf for Piece {
    fn remaining(&self) -> usize {
        self.head.len() + self.body.len()
    }

    fn chunk(&self) -> &[u8] {
        if self.head.is_empty() {
            &self.body
        } else {
            &self.head
        }
    }

    fn advance(&mut self, mut n: usize) {
        let from_head = n.min(self.head.len());
        self.head.advance(from_head);
        n -= from_head;
        self.body.advance(n);
    }
}

/// Why a TCP link ended; the reason it is counted under comes from the variant.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TcpLost {
    /// HTTP/2 (or the TLS and TCP under it) failed.
    #[error("tunnel TCP connection failed: {0}")]
    Failed(Arc<h2::Error>),
    /// The peer ended the connection cleanly.
    #[error("peer closed the tunnel TCP connection")]
    PeerClosed,
    /// Nothing arrived from the peer within the idle timeout.
    #[error("nothing heard from the peer for {} ms", .0.as_millis())]
    Silent(Duration),
    /// This side closed the connection, for the reason given.
    #[error("closed locally: {0}")]
    ClosedLocally(Arc<str>),
    /// The connection is gone and its driver recorded no reason.
    #[error("tunnel TCP connection closed")]
    Closed,
}

impl TcpLost {
    fn of_h2(error: h2::Error) -> Self {
        Self::Failed(Arc::new(error))
    }

    /// The reason counted for a connection that ended this way.
    pub(crate) fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            Self::Failed(error) => DisconnectReason::of_h2_error(error),
            Self::PeerClosed => DisconnectReason::PeerClosed,
            Self::Silent(_) => DisconnectReason::IdleTimeout,
            Self::ClosedLocally(_) | Self::Closed => DisconnectReason::ClosedLocally,
        }
    }

    /// The reason counted for a handshake that ended this way.
    pub(crate) fn handshake_failure(&self) -> HandshakeFailure {
        match self.disconnect_reason() {
            DisconnectReason::PeerClosed => HandshakeFailure::RefusedByPeer,
            DisconnectReason::IdleTimeout => HandshakeFailure::Timeout,
            _ => HandshakeFailure::Protocol,
        }
    }
}

/// A live TLS/TCP tunnel connection. Cheap to clone; the connection closes when `close` is
/// called or the peer goes, not when the last clone drops (the driver task owns the socket).
#[derive(Clone)]
pub struct TcpConnection {
    shared: Arc<Shared>,
}

struct Shared {
    /// How this side opens streams.
    opener: Opener,
    /// Streams the peer opened (forward streams on the listener, taken offers on the dialler).
    accepted: tokio::sync::Mutex<mpsc::UnboundedReceiver<(SendHalf, RecvHalf)>>,
    peer_chain: Vec<CertificateDer<'static>>,
    remote: SocketAddr,
    /// Set once, when the connection is gone.
    lost: OnceLock<TcpLost>,
    /// `true` once the driver has finished (socket closed).
    finished: watch::Receiver<bool>,
    /// Asks the driver to close: `Some(graceful)`.
    close: watch::Sender<Option<bool>>,
    /// Smoothed round-trip time from pings, in microseconds.
    rtt_micros: AtomicU64,
    heard: Arc<HeardState>,
}

enum Opener {
    /// The dialler: an HTTP/2 client (taken out on close so the connection can end).
    Client(Mutex<Option<h2::client::SendRequest<Piece>>>),
    /// The listener: takes the dialler's offers.
    Server(Offers),
}

/// Offers the dialler made that the listener has not taken yet.
#[derive(Default)]
struct Offers {
    queue: Mutex<OfferQueue>,
    arrived: tokio::sync::Notify,
}

#[derive(Default)]
struct OfferQueue {
    offers: std::collections::VecDeque<Offer>,
    /// No more offers will come (the connection is closing or gone).
    closed: bool,
}

type Offer = (h2::RecvStream, h2::server::SendResponse<Piece>);

impl Offers {
    fn push(&self, offer: Offer) {
        let mut queue = lock(&self.queue);
        if !queue.closed {
            queue.offers.push_back(offer);
            drop(queue);
            self.arrived.notify_one();
        }
    }

    /// Refuses every offer left and any later one: the dialler's streams end, so a
    /// closing connection is not kept open by them.
    fn close(&self) {
        let offers = {
            let mut queue = lock(&self.queue);
            queue.closed = true;
            std::mem::take(&mut queue.offers)
        };
        for (_, mut respond) in offers {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
        self.arrived.notify_waiters();
    }

    /// The next offer; `None` once closed.
    async fn take(&self) -> Option<Offer> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut queue = lock(&self.queue);
                if let Some(offer) = queue.offers.pop_front() {
                    return Some(offer);
                }
                if queue.closed {
                    return None;
                }
            }
            arrived.await;
        }
    }
}

/// When the peer was last heard from, and how often: every read from the socket counts.
#[derive(Default)]
struct HeardState {
    /// Milliseconds since the connection's epoch.
    last_ms: AtomicU64,
    reads: AtomicU64,
}

/// Counts reads from the socket as proof the peer is alive.
struct Heard<T> {
    io: T,
    state: Arc<HeardState>,
    epoch: Instant,
}

impl<T> Heard<T> {
    fn new(io: T, epoch: Instant) -> (Self, Arc<HeardState>) {
        let state = Arc::new(HeardState::default());
        (
            Self {
                io,
                state: state.clone(),
                epoch,
            },
            state,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = self.epoch.elapsed().as_millis() as u64;
            self.state.last_ms.store(now, Ordering::Relaxed);
            self.state.reads.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// What the driver needs to watch the link.
struct Liveness {
    heard: Arc<HeardState>,
    epoch: Instant,
    keepalive: Duration,
    idle_timeout: Duration,
}

impl Liveness {
    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.heard.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

fn h2_window(tuning: &TransportTuning) -> (u32, u32) {
    (tuning.stream_window, tuning.connection_window)
}

/// Sets the socket options a tunnel TCP connection wants: no Nagle delay (frames are
/// written whole, and a small request must not wait for an ACK), kernel keepalive as a
/// backstop for a peer that vanished while we had nothing to send, and the congestion
/// controller of `tunnel.congestion` for what this node sends.
pub(crate) fn tune_socket(socket: &tokio::net::TcpStream, tuning: &TransportTuning) {
    let _ = socket.set_nodelay(true);
    let _ = rustix::net::sockopt::set_socket_keepalive(socket, true);
    let algorithm = tuning.congestion.kernel_name();
    if let Err(e) = rustix::net::sockopt::set_tcp_congestion(socket, algorithm) {
        // The connection still works, on the kernel's default controller; say so once.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                algorithm,
                error = %e,
                "the kernel refused TCP congestion control `{algorithm}` for TLS/TCP tunnels, \
                 so they use its default; fix: modprobe tcp_{algorithm} and add it to \
                 net.ipv4.tcp_allowed_congestion_control (or grant CAP_NET_ADMIN)"
            );
        });
    }
}

impl TcpConnection {
    /// Runs the HTTP/2 client handshake over an established TLS stream (the dialling side).
    pub(crate) async fn client<T>(
        io: T,
        peer_chain: Vec<CertificateDer<'static>>,
        remote: SocketAddr,
        tuning: &TransportTuning,
    ) -> Result<TcpConnection, TcpLost>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let epoch = Instant::now();
        let (io, heard) = Heard::new(io, epoch);
        let (stream_window, connection_window) = h2_window(tuning);
        let (send_request, mut connection) = h2::client::Builder::new()
            .initial_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .max_concurrent_streams(tuning.max_streams)
            .max_frame_size(MAX_H2_FRAME)
            .enable_push(false)
            .handshake::<_, Piece>(io)
            .await
            .map_err(TcpLost::of_h2)?;
        let ping = connection.ping_pong();
        let opener = Opener::Client(Mutex::new(Some(send_request.clone())));
        let (
            shared,
            Driving {
                accepted_tx,
                finished_tx,
                close_rx,
                liveness,
            },
        ) = Shared::start(opener, peer_chain, remote, heard, epoch, tuning);
        let weak = Arc::downgrade(&shared);
        tokio::spawn(offer_streams(
            send_request,
            accepted_tx,
            close_rx.clone(),
            weak.clone(),
        ));
        tokio::spawn(async move {
            tokio::pin!(connection);
            let done = drive(
                poll_fn(|cx| connection.as_mut().poll(cx)),
                ping,
                liveness,
                close_rx,
                &weak,
                |_graceful| {},
            )
            .await;
            // With every request handle dropped, the connection ends once its streams have;
            // until then it keeps writing what is buffered (the last DATA, a GOAWAY).
            if done.is_none() {
                let _ = tokio::time::timeout(CLOSE_FLUSH, connection.as_mut()).await;
            }
            finished_tx.send_replace(true);
        });
        Ok(TcpConnection { shared })
    }

    /// Runs the HTTP/2 server handshake over an accepted TLS stream (the listening side).
    pub(crate) async fn server<T>(
        io: T,
        peer_chain: Vec<CertificateDer<'static>>,
        remote: SocketAddr,
        tuning: &TransportTuning,
    ) -> Result<TcpConnection, TcpLost>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let epoch = Instant::now();
        let (io, heard) = Heard::new(io, epoch);
        let (stream_window, connection_window) = h2_window(tuning);
        let mut connection = h2::server::Builder::new()
            .initial_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .max_concurrent_streams(tuning.max_streams)
            .max_frame_size(MAX_H2_FRAME)
            .handshake::<_, Piece>(io)
            .await
            .map_err(TcpLost::of_h2)?;
        let ping = connection.ping_pong();
        let opener = Opener::Server(Offers::default());
        let (shared, driving) = Shared::start(opener, peer_chain, remote, heard, epoch, tuning);
        tokio::spawn(Self::serve_h2(
            connection,
            ping,
            driving,
            Arc::downgrade(&shared),
        ));
        Ok(TcpConnection { shared })
    }

    /// Drives an accepted connection's HTTP/2 server until it ends: hands each stream the
    /// peer opens to `classify`, and on a local close lets the connection flush.
    async fn serve_h2<T>(
        connection: h2::server::Connection<Heard<T>, Piece>,
        ping: Option<h2::PingPong>,
        driving: Driving,
        weak: std::sync::Weak<Shared>,
    ) where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Driving {
            accepted_tx,
            finished_tx,
            close_rx,
            liveness,
        } = driving;
        // Shared by the accept poll and the shutdown call; never contended (one task).
        let connection = Mutex::new(connection);
        let accept = poll_fn(|cx| {
            let mut connection = lock(&connection);
            loop {
                match connection.poll_accept(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready(Some(Ok((request, respond)))) => {
                        if let Some(shared) = weak.upgrade() {
                            shared.classify(request, respond, &accepted_tx);
                        }
                    }
                }
            }
        });
        let done = drive(accept, ping, liveness, close_rx, &weak, |graceful| {
            let mut connection = lock(&connection);
            if graceful {
                connection.graceful_shutdown();
            } else {
                connection.abrupt_shutdown(h2::Reason::CANCEL);
            }
        })
        .await;
        if let Some(Opener::Server(offers)) = weak.upgrade().as_ref().map(|s| &s.opener) {
            offers.close();
        }
        if done.is_none() {
            Self::flush_refusing(&connection).await;
        }
        finished_tx.send_replace(true);
    }

    /// Lets a closing server connection write its GOAWAY and what streams still have
    /// buffered (bounded by `CLOSE_FLUSH`), refusing any stream the peer opens meanwhile.
    async fn flush_refusing<T>(connection: &Mutex<h2::server::Connection<Heard<T>, Piece>>)
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let flush = poll_fn(|cx| {
            let mut connection = lock(connection);
            loop {
                match connection.poll_accept(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None | Some(Err(_))) => return Poll::Ready(()),
                    Poll::Ready(Some(Ok((_, mut respond)))) => {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    }
                }
            }
        });
        let _ = tokio::time::timeout(CLOSE_FLUSH, flush).await;
    }

    /// Opens a stream to the peer.
    pub(crate) async fn open_stream(&self) -> Result<(SendHalf, RecvHalf), TcpLost> {
        match &self.shared.opener {
            Opener::Client(send_request) => {
                let send_request = lock(send_request).clone();
                let Some(send_request) = send_request else {
                    return Err(self.why_gone().await);
                };
                let mut send_request = match send_request.ready().await {
                    Ok(ready) => ready,
                    Err(e) => return Err(self.lost().unwrap_or_else(|| TcpLost::of_h2(e))),
                };
                let (response, send) = send_request
                    .send_request(post(FORWARD), false)
                    .map_err(|e| self.lost_or(TcpLost::of_h2(e)))?;
                Ok((SendHalf::tcp(send), RecvHalf::tcp_response(response)))
            }
            Opener::Server(offers) => loop {
                let Some((body, mut respond)) = offers.take().await else {
                    return Err(self.why_gone().await);
                };
                // An offer the dialler gave up on (reset) fails here; take the next.
                if let Ok(send) = respond.send_response(http::Response::new(()), false) {
                    return Ok((SendHalf::tcp(send), RecvHalf::tcp(body)));
                }
            },
        }
    }

    /// Waits for the peer to open a stream.
    pub(crate) async fn accept_stream(&self) -> Result<(SendHalf, RecvHalf), TcpLost> {
        let mut accepted = self.shared.accepted.lock().await;
        match accepted.recv().await {
            Some(stream) => Ok(stream),
            None => Err(self.why_gone().await),
        }
    }

    /// Why the connection went, once the driver says: a stream task can notice the end a
    /// moment before the driver has recorded its reason.
    async fn why_gone(&self) -> TcpLost {
        if let Some(lost) = self.lost() {
            return lost;
        }
        let _ = tokio::time::timeout(REASON_WAIT, self.closed()).await;
        self.lost_or_closed()
    }

    /// Why the connection is gone, or `None` while it is up.
    pub(crate) fn lost(&self) -> Option<TcpLost> {
        self.shared.lost.get().cloned()
    }

    fn lost_or(&self, otherwise: TcpLost) -> TcpLost {
        self.lost().unwrap_or(otherwise)
    }

    fn lost_or_closed(&self) -> TcpLost {
        self.lost_or(TcpLost::Closed)
    }

    pub(crate) fn peer_chain(&self) -> Vec<CertificateDer<'static>> {
        self.shared.peer_chain.clone()
    }

    pub(crate) fn remote_address(&self) -> SocketAddr {
        self.shared.remote
    }

    /// A count that grows whenever anything arrives from the peer.
    pub(crate) fn received(&self) -> u64 {
        self.shared.heard.reads.load(Ordering::Relaxed)
    }

    pub(crate) fn rtt(&self) -> Duration {
        Duration::from_micros(self.shared.rtt_micros.load(Ordering::Relaxed))
    }

    /// Closes the connection: `graceful` lets streams in flight finish and what is
    /// buffered be written; otherwise streams are cancelled.
    pub(crate) fn close(&self, graceful: bool, reason: &str) {
        let _ = self.shared.lost.set(TcpLost::ClosedLocally(reason.into()));
        if let Opener::Client(send_request) = &self.shared.opener {
            lock(send_request).take();
        }
        self.shared.close.send_if_modified(|close| {
            if close.is_none() {
                *close = Some(graceful);
                true
            } else {
                false
            }
        });
    }

    /// Resolves once the connection is gone and its socket closed.
    pub(crate) async fn closed(&self) -> TcpLost {
        let mut finished = self.shared.finished.clone();
        let _ = finished.wait_for(|done| *done).await;
        self.lost_or_closed()
    }

    /// A stable id for this connection within the process.
    pub(crate) fn stable_id(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }
}

/// What a connection's driver task keeps of the state [`Shared::start`] sets up.
struct Driving {
    accepted_tx: mpsc::UnboundedSender<(SendHalf, RecvHalf)>,
    finished_tx: watch::Sender<bool>,
    close_rx: watch::Receiver<Option<bool>>,
    liveness: Liveness,
}

impl Shared {
    /// The state of a connection that has just finished its handshakes, and the driver's
    /// end of its channels.
    fn start(
        opener: Opener,
        peer_chain: Vec<CertificateDer<'static>>,
        remote: SocketAddr,
        heard: Arc<HeardState>,
        epoch: Instant,
        tuning: &TransportTuning,
    ) -> (Arc<Shared>, Driving) {
        let (accepted_tx, accepted_rx) = mpsc::unbounded_channel();
        let (finished_tx, finished) = watch::channel(false);
        let (close, close_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            opener,
            accepted: tokio::sync::Mutex::new(accepted_rx),
            peer_chain,
            remote,
            lost: OnceLock::new(),
            finished,
            close,
            rtt_micros: AtomicU64::new(0),
            heard: heard.clone(),
        });
        let liveness = Liveness {
            heard,
            epoch,
            keepalive: tuning.keepalive,
            idle_timeout: tuning.idle_timeout,
        };
        let driving = Driving {
            accepted_tx,
            finished_tx,
            close_rx,
            liveness,
        };
        (shared, driving)
    }

    /// Sorts a stream the dialler opened: a forward stream is handed to the session, to be
    /// answered with the first bytes it writes; an offer waits until this side needs a
    /// stream.
    fn classify(
        &self,
        request: http::Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Piece>,
        accepted: &mpsc::UnboundedSender<(SendHalf, RecvHalf)>,
    ) {
        match (request.uri().path(), &self.opener) {
            ("/s", _) => {
                let _ = accepted.send((
                    SendHalf::tcp_unanswered(respond),
                    RecvHalf::tcp(request.into_body()),
                ));
            }
            ("/r", Opener::Server(offers)) => offers.push((request.into_body(), respond)),
            _ => respond.send_reset(h2::Reason::PROTOCOL_ERROR),
        }
    }
}

/// Largest HTTP/2 frame we accept: big enough that a body chunk is rarely split.
const MAX_H2_FRAME: u32 = 256 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn post(uri: &'static str) -> http::Request<()> {
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(uri);
    request
}

/// Polls the connection (`connection` resolves when it ends), pings, watches for silence
/// and for a close request. Returns `Some(())` when the connection ended by itself, `None`
/// when this side closed it (`shutdown` has been called; the caller flushes).
async fn drive<C>(
    connection: C,
    mut ping: Option<h2::PingPong>,
    liveness: Liveness,
    mut close: watch::Receiver<Option<bool>>,
    shared: &std::sync::Weak<Shared>,
    shutdown: impl Fn(bool),
) -> Option<()>
where
    C: std::future::Future<Output = Result<(), h2::Error>>,
{
    tokio::pin!(connection);
    let mut keepalive = tokio::time::interval(liveness.keepalive);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_sent: Option<Instant> = None;
    let set_lost = |lost: TcpLost| {
        if let Some(shared) = shared.upgrade() {
            let _ = shared.lost.set(lost);
        }
    };
    loop {
        let pong = async {
            match (&mut ping, ping_sent) {
                (Some(ping), Some(_)) => poll_fn(|cx| ping.poll_pong(cx)).await.is_ok(),
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut connection => {
                set_lost(match result {
                    Ok(()) => TcpLost::PeerClosed,
                    Err(e) => TcpLost::of_h2(e),
                });
                return Some(());
            }
            ok = pong => {
                if ok {
                    if let (Some(sent), Some(shared)) = (ping_sent.take(), shared.upgrade()) {
                        let sample = sent.elapsed().as_micros() as u64;
                        let old = shared.rtt_micros.load(Ordering::Relaxed);
                        let smoothed = if old == 0 { sample } else { (old * 7 + sample) / 8 };
                        shared.rtt_micros.store(smoothed, Ordering::Relaxed);
                    }
                } else {
                    ping_sent = None;
                }
            }
            _ = keepalive.tick() => {
                let silent = liveness.silent_for();
                if silent >= liveness.idle_timeout {
                    set_lost(TcpLost::Silent(silent));
                    return Some(());
                }
                if ping_sent.is_none()
                    && let Some(ping) = ping.as_mut()
                    && ping.send_ping(h2::Ping::opaque()).is_ok()
                {
                    ping_sent = Some(Instant::now());
                }
            }
            changed = close.changed() => {
                let graceful = match changed {
                    Ok(()) => close.borrow().unwrap_or(false),
                    Err(_) => false,
                };
                shutdown(graceful);
                return None;
            }
        }
    }
}

/// The dialler's offers: keeps [`OFFERS`] streams open for the listener and hands each one
/// it takes to the session as a stream the peer opened.
async fn offer_streams(
    send_request: h2::client::SendRequest<Piece>,
    accepted: mpsc::UnboundedSender<(SendHalf, RecvHalf)>,
    mut close: watch::Receiver<Option<bool>>,
    shared: std::sync::Weak<Shared>,
) {
    // The first to see the peer's GOAWAY (or a broken connection) is often this task: it
    // records why, so the session does not mistake the end for one of its own making.
    let gone = |e: h2::Error| {
        if let Some(shared) = shared.upgrade() {
            let _ = shared.lost.set(TcpLost::of_h2(e));
        }
    };
    let mut pending = FuturesUnordered::new();
    loop {
        while pending.len() < OFFERS {
            let ready = tokio::select! {
                ready = send_request.clone().ready() => ready,
                _ = close.changed() => return,
            };
            let mut ready = match ready {
                Ok(ready) => ready,
                Err(e) => return gone(e),
            };
            let (response, send) = match ready.send_request(post(OFFER), false) {
                Ok(sent) => sent,
                Err(e) => return gone(e),
            };
            pending.push(async move { (response.await, send) });
        }
        tokio::select! {
            Some((response, send)) = pending.next() => {
                let Ok(response) = response else { continue };
                if response.status() != http::StatusCode::OK {
                    continue;
                }
                let recv = RecvHalf::tcp(response.into_body());
                if accepted.send((SendHalf::tcp(send), recv)).is_err() {
                    return;
                }
            }
            // Dropping the offers resets them, so a closing connection can end.
            _ = close.changed() => return,
        }
    }
}

/// How long an accepted TCP connection may take over its TLS and HTTP/2 handshakes. A dial
/// is bounded by the tunnel's idle timeout instead, as quinn bounds a QUIC handshake: a
/// redial that a load balancer hashed to a dead node then fails as fast on TCP as on QUIC.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS config of the listening side: client certificates required, checked against `expect`.
pub(crate) fn server_config(
    material: &hybridge_ca::tls::TlsMaterial,
    expect: hybridge_ca::tls::PeerExpectation,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    Ok(Arc::new(hybridge_ca::tls::server_config(
        material,
        expect,
        &[ALPN],
        true,
    )?))
}

/// TLS config of the dialling side.
pub(crate) fn client_config(
    material: &hybridge_ca::tls::TlsMaterial,
    expect: hybridge_ca::tls::PeerExpectation,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(hybridge_ca::tls::client_config(
        material,
        expect,
        &[ALPN],
    )?))
}

/// Dials `addr` over TCP from a fresh local port and runs the TLS and HTTP/2 handshakes.
pub(crate) async fn dial(
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    tuning: &TransportTuning,
) -> Result<TcpConnection, HandshakeError> {
    bounded(addr, tuning.idle_timeout, async {
        let socket = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|error| HandshakeError::TcpConnect { addr, error })?;
        tune_socket(&socket, tuning);
        let name =
            rustls_pki_types::ServerName::try_from(server_name.to_owned()).map_err(|error| {
                HandshakeError::ServerName {
                    name: server_name.to_owned(),
                    error,
                }
            })?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, socket)
            .await
            .map_err(|error| HandshakeError::Tls {
                remote: addr,
                error,
            })?;
        let chain = chain_of(stream.get_ref().1.peer_certificates());
        Ok(TcpConnection::client(stream, chain, addr, tuning).await)
    })
    .await
}

/// Runs the TLS and HTTP/2 handshakes on a connection accepted on the tunnel TCP port.
pub(crate) async fn accept(
    socket: tokio::net::TcpStream,
    remote: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    tuning: &TransportTuning,
) -> Result<TcpConnection, HandshakeError> {
    tune_socket(&socket, tuning);
    bounded(remote, HANDSHAKE_TIMEOUT, async {
        let stream = tokio_rustls::TlsAcceptor::from(tls)
            .accept(socket)
            .await
            .map_err(|error| HandshakeError::Tls { remote, error })?;
        let chain = chain_of(stream.get_ref().1.peer_certificates());
        Ok(TcpConnection::server(stream, chain, remote, tuning).await)
    })
    .await
}

/// Runs a handshake with `remote` within `limit`; an HTTP/2 handshake that fails is
/// counted by why the connection went.
async fn bounded(
    remote: SocketAddr,
    limit: Duration,
    handshake: impl std::future::Future<Output = Result<Result<TcpConnection, TcpLost>, HandshakeError>>,
) -> Result<TcpConnection, HandshakeError> {
    match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(Ok(connection))) => Ok(connection),
        Ok(Ok(Err(lost))) => Err(HandshakeError::Http2 { remote, lost }),
        Ok(Err(failed)) => Err(failed),
        Err(_) => Err(HandshakeError::TcpTimedOut {
            remote,
            after: limit,
        }),
    }
}

/// The chain the peer presented, leaf first, owned.
fn chain_of(certificates: Option<&[CertificateDer<'_>]>) -> Vec<CertificateDer<'static>> {
    certificates
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::frame::Frame;

    /// A dialling and a listening connection over an in-memory pipe: the multiplexing
    /// without TLS.
    async fn pair() -> (TcpConnection, TcpConnection) {
        let (dialler, listener) = tokio::io::duplex(1 << 20);
        let tuning = TransportTuning::default();
        let remote: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let (client, server) = tokio::join!(
            TcpConnection::client(dialler, Vec::new(), remote, &tuning),
            TcpConnection::server(listener, Vec::new(), remote, &tuning),
        );
        (client.unwrap(), server.unwrap())
    }

    /// Sends `body` on a new stream of `client`; the listener's halves of it.
    async fn request(
        client: &TcpConnection,
        server: &TcpConnection,
        body: &'static [u8],
    ) -> (RecvHalf, SendHalf) {
        let (mut send, recv) = client.open_stream().await.unwrap();
        send.write_data(Bytes::from_static(body)).await.unwrap();
        send.finish();
        let (answer, mut incoming) = server.accept_stream().await.unwrap();
        match incoming.read_frame().await.unwrap() {
            Some(Frame::Data(data)) => assert_eq!(data, body),
            _ => panic!("the request did not arrive"),
        }
        (recv, answer)
    }

    /// The listener's answer to a stream (its response HEADERS) tells the dialler the
    /// stream arrived. It leaves with the first bytes written, not alone ahead of them (one
    /// write and one wake-up of the dialler fewer per request); with nothing to write, it
    /// leaves alone after the acknowledgement delay, so the dialler still learns in time
    /// that a request it might resend has arrived.
    #[tokio::test(start_paused = true)]
    async fn a_stream_is_answered_with_its_first_bytes_or_after_the_ack_delay() {
        let (client, server) = pair().await;
        // A prompt answer arrives whole.
        let (mut recv, mut answer) = request(&client, &server, b"first").await;
        answer
            .write_data(Bytes::from_static(b"answer"))
            .await
            .unwrap();
        answer.finish();
        match recv.read_frame().await.unwrap() {
            Some(Frame::Data(data)) => assert_eq!(data, "answer"),
            _ => panic!("the answer did not arrive"),
        }

        // A listener busy elsewhere (an upstream slower than the acknowledgement delay).
        let reads = client.received();
        let started = Instant::now();
        let (_recv, mut answer) = request(&client, &server, b"second").await;
        let working = tokio::spawn(async move {
            tokio::select! {
                () = answer.abandoned_by_peer() => panic!("the dialler did not abandon it"),
                () = tokio::time::sleep(Duration::from_secs(10)) => answer,
            }
        });
        let step = Duration::from_millis(1);
        while client.received() == reads {
            assert!(started.elapsed() < Duration::from_secs(1), "never answered");
            tokio::time::sleep(step).await;
        }
        let answered_after = started.elapsed();
        assert!(
            answered_after >= super::super::stream::ACK_DELAY
                && answered_after <= super::super::stream::ACK_DELAY + step * 2,
            "answered after {answered_after:?}"
        );
        working.abort();
    }
}
