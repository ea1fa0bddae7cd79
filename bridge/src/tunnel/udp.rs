//! The tunnel's UDP socket for quinn: quinn's own tokio socket minus two wasted system calls
//! per request at one connection (strace: 8 → 6 per small request per node).
//!
//! - A receive that drains the kernel queue clears the socket's readiness at once. quinn's
//!   tokio socket learns that the queue is empty only from a receive that fails with EAGAIN,
//!   one `recvmmsg` more than it reads on every wake-up. A batch that comes back shorter than
//!   it could have been has emptied the queue; tokio's own TCP reads clear readiness on a
//!   short read for the same reason. It is safe with edge-triggered epoll: a datagram that
//!   arrives after the receive raises a new event, which the clear does not erase.
//! - The socket is registered for reading only. Registered for writing too, every datagram
//!   sent raises an EPOLLOUT edge once the kernel frees its buffer, and the node wakes up for
//!   nothing: one `epoll_wait` per datagram. Sends rarely block (the send buffer is 8 MiB), so
//!   a send that does (EAGAIN) is retried after a millisecond, in which the kernel drains far
//!   more than a full buffer's worth at any link rate below 60 Gbit/s.
//!
//! Workers that share a listen port (`SO_REUSEPORT`) each own a socket of the group, and the
//! kernel picks one by the peer's address. A peer whose address changes (a NAT rebinding)
//! can therefore reach another worker's socket. As Envoy does, every connection ID an
//! endpoint issues names its worker ([`Handoff::cid_generator`]), and a socket that receives
//! a datagram for another worker's connection hands it over ([`Handoff`]), so the
//! connection migrates instead of being reset by an endpoint that does not know it. New
//! connections are dealt to the workers in turn (by their first packet's connection ID)
//! rather than left to the kernel's hash, which put both tunnels of a peer with two on one
//! worker half of the time.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A bound UDP socket registered with the tokio reactor, for `quinn::Endpoint`.
#[derive(Debug)]
pub(crate) struct TunnelSocket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// The last send hit EAGAIN: quinn asks the poller before every send, and only then does
    /// the poller have to wait for the kernel.
    blocked: AtomicBool,
    /// For a socket of a shared port: the hand-off between the workers, and this worker.
    handoff: Option<(Arc<Handoff>, usize)>,
}

impl TunnelSocket {
    /// Takes over `socket`; must be called within a tokio runtime.
    pub(crate) fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let io = register(socket, Interest::READABLE)?;
        Ok(Self {
            io,
            state,
            blocked: AtomicBool::new(false),
            handoff: None,
        })
    }

    /// `new` for worker `worker`'s socket of a shared port.
    pub(crate) fn sharing(
        socket: std::net::UdpSocket,
        handoff: Arc<Handoff>,
        worker: usize,
    ) -> io::Result<Self> {
        Ok(Self {
            handoff: Some((handoff, worker)),
            ..Self::new(socket)?
        })
    }
}

/// Length of the connection IDs a sharing endpoint issues: 6 random bytes and a 2-byte tag.
const CID_LEN: usize = 8;
/// The tag is two bytes so that it names any worker: the default is one worker per CPU, and
/// with a one-byte tag a machine of more than 256 CPUs had workers whose IDs named another
/// worker, which then reset their connections.
const RANDOM_LEN: usize = CID_LEN - 2;
/// Datagrams waiting for a worker; more are dropped (QUIC retransmits), so a worker that
/// stopped reading cannot grow another's memory.
const INBOX_LIMIT: usize = 1024;

/// Connections being set up, by the ID their client chose, are remembered this long: long
/// enough for the client to learn the ID our endpoint issued (one round trip).
const SETUP_MEMORY: Duration = Duration::from_secs(10);
/// Connections being set up that are remembered at most; beyond (a flood of Initial
/// packets), new ones stay on the worker the kernel chose.
const SETUP_LIMIT: usize = 4096;

/// The hand-off between the sockets of workers sharing one UDP port.
pub(crate) struct Handoff {
    /// Keys the tag byte, so the worker a connection ID names is hidden from observers
    /// (RFC 9000 §5.1: IDs must not be correlatable by anyone but their issuer).
    key: RandomState,
    inboxes: Vec<Inbox>,
    /// The worker dealt each connection being set up, by its client's initial ID.
    setup: Mutex<HashMap<Vec<u8>, (usize, Instant)>>,
    next: AtomicUsize,
}

#[derive(Default)]
struct Inbox {
    queue: Mutex<VecDeque<(Vec<u8>, RecvMeta)>>,
    waker: AtomicWaker,
}

impl fmt::Debug for Handoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handoff")
            .field("workers", &self.inboxes.len())
            .finish_non_exhaustive()
    }
}

impl Handoff {
    pub(crate) fn new(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            key: RandomState::new(),
            inboxes: (0..workers).map(|_| Inbox::default()).collect(),
            setup: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
        })
    }

    /// The connection-ID generator of worker `worker`'s endpoint.
    pub(crate) fn cid_generator(
        self: &Arc<Self>,
        worker: usize,
    ) -> impl Fn() -> Box<dyn ConnectionIdGenerator> + Send + Sync + 'static {
        let handoff = self.clone();
        move || {
            Box::new(WorkerCids {
                handoff: handoff.clone(),
                worker,
            })
        }
    }

    fn tag(&self, random: &[u8]) -> u16 {
        let hash = self.key.hash_one(random).to_le_bytes();
        u16::from_le_bytes([hash[0], hash[1]])
    }

    /// The worker a datagram is for: the one its destination connection ID names, if the
    /// ID is one of ours; for the Initial and 0-RTT packets of a new connection, whose ID
    /// the client chose, the worker dealt that connection.
    fn owner(&self, datagram: &[u8]) -> Option<usize> {
        let first = *datagram.first()?;
        if first & 0x80 == 0 {
            return self.named(datagram.get(1..1 + CID_LEN)?);
        }
        let cid = datagram.get(6..6 + usize::from(*datagram.get(5)?))?;
        match (first >> 4) & 0x03 {
            0 | 1 => self.named(cid).or_else(|| self.deal(cid)),
            2 => self.named(cid),
            _ => None,
        }
    }

    /// The worker a connection ID of ours names.
    fn named(&self, cid: &[u8]) -> Option<usize> {
        if cid.len() != CID_LEN {
            return None;
        }
        let (random, tag) = cid.split_at(RANDOM_LEN);
        let worker = usize::from(u16::from_le_bytes([tag[0], tag[1]]) ^ self.tag(random));
        (worker < self.inboxes.len()).then_some(worker)
    }

    /// The worker dealt the new connection whose client chose `cid`: the next in turn the
    /// first time, the same one for its retransmissions.
    fn deal(&self, cid: &[u8]) -> Option<usize> {
        let mut setup = self.setup.lock().ok()?;
        if let Some((worker, _)) = setup.get(cid) {
            return Some(*worker);
        }
        let now = Instant::now();
        if setup.len() >= SETUP_LIMIT / 2 {
            setup.retain(|_, (_, at)| now.duration_since(*at) < SETUP_MEMORY);
        }
        if setup.len() >= SETUP_LIMIT {
            return None;
        }
        let worker = self.next.fetch_add(1, Ordering::Relaxed) % self.inboxes.len();
        setup.insert(cid.to_vec(), (worker, now));
        Some(worker)
    }

    /// Moves the received datagrams of other workers' connections to their inboxes; the
    /// rest move up to the front, in order. Returns how many stay.
    fn route(
        &self,
        worker: usize,
        received: usize,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let mut kept = 0;
        for i in 0..received {
            let datagram = &bufs[i][..meta[i].len];
            match self.owner(datagram) {
                Some(owner) if owner != worker => self.deliver(owner, datagram, meta[i]),
                // Copied, not swapped: a caller may read its buffers by position.
                _ if kept == i => kept += 1,
                _ => {
                    let len = meta[i].len;
                    let (front, rest) = bufs.split_at_mut(i);
                    if let Some(slot) = front[kept].get_mut(..len) {
                        slot.copy_from_slice(&rest[0][..len]);
                        meta[kept] = meta[i];
                        kept += 1;
                    }
                }
            }
        }
        kept
    }

    fn deliver(&self, worker: usize, datagram: &[u8], meta: RecvMeta) {
        let inbox = &self.inboxes[worker];
        if let Ok(mut queue) = inbox.queue.lock()
            && queue.len() < INBOX_LIMIT
        {
            queue.push_back((datagram.to_vec(), meta));
        }
        inbox.waker.wake();
    }

    /// Copies datagrams handed to `worker` into the receive buffers, after registering the
    /// reader to be woken by the next one.
    fn take(
        &self,
        worker: usize,
        cx: &Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let inbox = &self.inboxes[worker];
        inbox.waker.register(cx.waker());
        let Ok(mut queue) = inbox.queue.lock() else {
            return 0;
        };
        let mut taken = 0;
        while taken < bufs.len().min(meta.len()) {
            let Some((datagram, received)) = queue.pop_front() else {
                break;
            };
            // Every worker's buffers have the same size; one that does not fit is dropped.
            if let Some(buf) = bufs[taken].get_mut(..datagram.len()) {
                buf.copy_from_slice(&datagram);
                meta[taken] = received;
                taken += 1;
            }
        }
        taken
    }
}

/// Random connection IDs whose last byte, keyed, names the issuing worker.
struct WorkerCids {
    handoff: Arc<Handoff>,
    worker: usize,
}

impl ConnectionIdGenerator for WorkerCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut cid = [0u8; CID_LEN];
        let (random, tag) = cid.split_at_mut(RANDOM_LEN);
        rand::fill(random);
        // Past 65,535 workers the tag names none, and datagrams stay where they land.
        let worker = u16::try_from(self.worker).unwrap_or(u16::MAX);
        tag.copy_from_slice(&(worker ^ self.handoff.tag(random)).to_le_bytes());
        ConnectionId::new(&cid)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// `AsyncFd::with_interest` is deprecated for types whose descriptor could change under the
/// reactor (its replacement is `unsafe`, which this workspace forbids); a
/// `std::net::UdpSocket` owns one descriptor for its whole life and is never swapped.
#[allow(deprecated)]
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    AsyncFd::with_interest(socket, interest)
}

impl AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            retry: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // Non-blocking: EAGAIN comes back as WouldBlock, and quinn then waits on the poller.
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if sent
            .as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        {
            self.blocked.store(true, Ordering::Release);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if let Some((handoff, worker)) = &self.handoff {
            let taken = handoff.take(*worker, cx, bufs, meta);
            if taken > 0 {
                return Poll::Ready(Ok(taken));
            }
        }
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            let batch = bufs.len().min(meta.len());
            if let Ok(received) =
                guard.try_io(|socket| self.state.recv(socket.get_ref().into(), bufs, meta))
            {
                if received.as_ref().is_ok_and(|&n| n < batch) {
                    guard.clear_ready();
                }
                let received = match (received, &self.handoff) {
                    (Ok(n), Some((handoff, worker))) => handoff.route(*worker, n, bufs, meta),
                    (other, _) => return Poll::Ready(other),
                };
                // All of them went to other workers: read on (or wait for readiness).
                if received > 0 {
                    return Poll::Ready(Ok(received));
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// How long a send that hit EAGAIN waits before quinn tries it again.
const SEND_RETRY: Duration = Duration::from_millis(1);

/// Ready at once unless a send hit EAGAIN; then ready after [`SEND_RETRY`]. Each connection
/// has its own, so several can wait at once.
struct Writable {
    socket: Arc<TunnelSocket>,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let Self { socket, retry } = self.get_mut();
        if retry.is_none() && !socket.blocked.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let wait = retry.get_or_insert_with(|| Box::pin(tokio::time::sleep(SEND_RETRY)));
        ready!(wait.as_mut().poll(cx));
        *retry = None;
        socket.blocked.store(false, Ordering::Release);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// One `poll_recv` with a batch of `slots` buffers; returns the datagrams it read.
    async fn receive(socket: &TunnelSocket, slots: usize) -> Vec<Vec<u8>> {
        let received = receive_from(socket, slots).await;
        received.into_iter().map(|(datagram, _)| datagram).collect()
    }

    /// [`receive`], with each datagram's source address.
    async fn receive_from(socket: &TunnelSocket, slots: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        let mut bufs = vec![vec![0u8; 1024]; slots];
        let mut meta = vec![RecvMeta::default(); slots];
        let n = tokio::time::timeout(
            WAIT,
            std::future::poll_fn(|cx| {
                let mut slices: Vec<_> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                socket.poll_recv(cx, &mut slices, &mut meta)
            }),
        )
        .await
        .expect("a datagram sent after a readiness clear never woke the receiver")
        .unwrap();
        (0..n)
            .map(|i| (bufs[i][..meta[i].len].to_vec(), meta[i].addr))
            .collect()
    }

    /// One socket per worker of `handoff`, each on a port of its own (the hand-off does not
    /// care how a datagram reached a socket).
    fn sharing_sockets(handoff: &Arc<Handoff>) -> Vec<TunnelSocket> {
        (0..handoff.inboxes.len())
            .map(|worker| {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                TunnelSocket::sharing(socket, handoff.clone(), worker).unwrap()
            })
            .collect()
    }

    #[test]
    fn connection_ids_name_their_worker_on_machines_of_more_than_256_cpus() {
        let handoff = Handoff::new(300);
        for worker in [0, 1, 255, 256, 299] {
            let cid = (handoff.cid_generator(worker))().generate_cid();
            assert_eq!(handoff.named(&cid), Some(worker));
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn new_connections_are_dealt_to_the_workers_in_turn_and_keep_their_worker() {
        let handoff = Handoff::new(2);
        let sockets = sharing_sockets(&handoff);
        let to_second = sockets[1].local_addr().unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Initial packets with 20-byte IDs, as quinn's clients choose them.
        let initial =
            |id: u8, payload: &[u8]| [&[0xc0, 0, 0, 0, 1, 20][..], &[id; 20], payload].concat();
        let (a, b, a_again, c) = (
            initial(1, b"a"),
            initial(2, b"b"),
            initial(1, b"a again"),
            initial(3, b"c"),
        );
        // All land on the second worker's socket; they are dealt 0, 1, (a's) 0, 0.
        for datagram in [&a, &b, &a_again, &c] {
            peer.send_to(datagram, to_second).unwrap();
        }
        assert_eq!(receive(&sockets[1], 8).await, [b]);
        assert_eq!(receive(&sockets[0], 8).await, [a, a_again, c]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_datagram_for_another_workers_connection_is_handed_to_that_worker() {
        let handoff = Handoff::new(2);
        let sockets = sharing_sockets(&handoff);
        let to_first = sockets[0].local_addr().unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let packet = |header: &[u8], worker: usize, payload: &[u8]| {
            let cid = (handoff.cid_generator(worker))().generate_cid();
            assert_eq!(cid.len(), CID_LEN);
            [header, &cid[..], payload].concat()
        };
        let for_second = packet(&[0x40], 1, b"short header, worker 1");
        // A client's Initial packets carry our ID once it has learnt it.
        let initial = packet(&[0xc0, 0, 0, 0, 1, CID_LEN as u8], 1, b"initial");
        let handshake = packet(
            &[0xe0, 0, 0, 0, 1, CID_LEN as u8],
            1,
            b"handshake, worker 1",
        );
        let for_first = packet(&[0x40], 0, b"short header, worker 0");
        for datagram in [&for_second, &initial, &handshake, &for_first] {
            peer.send_to(datagram, to_first).unwrap();
        }
        assert_eq!(receive(&sockets[0], 8).await, [for_first]);
        let from = peer.local_addr().unwrap();
        assert_eq!(
            receive_from(&sockets[1], 8).await,
            [(for_second, from), (initial, from), (handshake, from)]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_drained_queue_clears_readiness_and_the_next_datagram_still_wakes_the_reader() {
        let socket = TunnelSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let to = socket.local_addr().unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // A batch of 1 that reads 1 is not short: readiness stays and the next poll reads the
        // second queued datagram without waiting for a new event.
        peer.send_to(b"one", to).unwrap();
        peer.send_to(b"two", to).unwrap();
        assert_eq!(receive(&socket, 1).await, [b"one"]);
        assert_eq!(receive(&socket, 1).await, [b"two"]);
        // Short batches: each receive empties the queue and clears readiness; the datagram
        // sent afterwards must raise a new event.
        for round in 0..5u8 {
            peer.send_to(&[round], to).unwrap();
            assert_eq!(receive(&socket, 2).await, [[round]]);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_writability_poller_waits_only_after_a_send_hit_eagain() {
        let socket =
            Arc::new(TunnelSocket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap());
        let mut poller = socket.clone().create_io_poller();
        let ready = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx));
        tokio::time::timeout(WAIT, ready).await.unwrap().unwrap();
        // As after EAGAIN: the poller registers a duplicate descriptor for writing, which an
        // idle socket reports writable at once, and the flag is cleared.
        socket.blocked.store(true, Ordering::Release);
        let ready = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx));
        tokio::time::timeout(WAIT, ready).await.unwrap().unwrap();
        assert!(!socket.blocked.load(Ordering::Acquire));
    }
}
