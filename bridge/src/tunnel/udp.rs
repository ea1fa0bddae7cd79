//! The tunnel's UDP socket for quinn: quinn's own tokio socket minus two wasted system calls
//! per small request at one connection.
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
//! Workers that share a listen port (`SO_REUSEPORT`) each own a socket of the group. As
//! Envoy does, every connection ID an endpoint issues names its worker
//! ([`Handoff::cid_generator`]), and a classic BPF program on the group ([`Handoff::steer`])
//! has the kernel deliver each short-header datagram to the socket of the worker its ID
//! names, so a connection's datagrams reach its own thread whatever the peer's address. New
//! connections are dealt to the workers in turn (by their first packet's connection ID)
//! rather than left to the kernel's hash, which put both tunnels of a peer with two on one
//! worker half of the time. Their handshake datagrams, which the program leaves to the
//! kernel's hash, and every datagram when the kernel refused the program, are handed over in
//! user space ([`Handoff`]), so a connection migrates instead of being reset by an endpoint
//! that does not know it.
//!
//! The worker is a keyed linear function of the ID's bytes, modulo 2^16, that the BPF program
//! can compute: the key is the process's secret, so an observer cannot tell which IDs name
//! the same worker (RFC 9000 §5.1).

use std::collections::HashMap;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
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
    /// The secret that maps a connection ID to its worker.
    key: CidKey,
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
            key: CidKey::random(),
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

    /// Has the kernel pick, for each short-header datagram to this port, the socket of the
    /// worker its connection ID names; `socket` is any socket of the group, all of them
    /// bound, worker `i`'s `i`th. A long-header datagram, or an ID naming no worker, is left
    /// to the kernel's hash (and then to the hand-off).
    pub(crate) fn steer(&self, socket: &std::net::UdpSocket) -> io::Result<()> {
        let mut program = self.key.steering_program();
        let filter = nix::libc::sock_fprog {
            len: u16::try_from(program.len()).map_err(io::Error::other)?,
            filter: program.as_mut_ptr(),
        };
        nix::sys::socket::setsockopt(
            socket,
            nix::sys::socket::sockopt::AttachReusePortCbpf,
            &filter,
        )
        .map_err(io::Error::from)
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
        let cid: &[u8; CID_LEN] = cid.try_into().ok()?;
        let worker = usize::from(self.key.worker(cid));
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

/// Random connection IDs whose last two bytes, keyed, name the issuing worker.
struct WorkerCids {
    handoff: Arc<Handoff>,
    worker: usize,
}

impl ConnectionIdGenerator for WorkerCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut cid = [0u8; CID_LEN];
        rand::fill(&mut cid[..RANDOM_LEN]);
        // Past 65,535 workers the tag names none, and datagrams stay where they land.
        let worker = u16::try_from(self.worker).unwrap_or(u16::MAX);
        self.handoff.key.name(&mut cid, worker);
        ConnectionId::new(&cid)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// The secret linear map from a connection ID to the worker it names: the worker is
/// `(k0·b0 + … + k5·b5 + k6·t) mod 2^16` for the ID's six random bytes `b` and its big-endian
/// tag `t`. `k6` is odd, so it has an inverse modulo 2^16 and any worker can be named by
/// solving for `t`.
struct CidKey {
    k: [u16; RANDOM_LEN + 1],
}

impl CidKey {
    fn random() -> Self {
        let mut k = [0u16; RANDOM_LEN + 1];
        for k in &mut k {
            *k = rand::random();
        }
        k[RANDOM_LEN] |= 1;
        Self { k }
    }

    /// `k0·b0 + … + k5·b5`, wrapping as the BPF program's 32-bit arithmetic does.
    fn random_part(&self, cid: &[u8; CID_LEN]) -> u32 {
        cid[..RANDOM_LEN]
            .iter()
            .zip(self.k)
            .fold(0u32, |sum, (&b, k)| {
                sum.wrapping_add(u32::from(b).wrapping_mul(u32::from(k)))
            })
    }

    fn tag(cid: &[u8; CID_LEN]) -> u16 {
        u16::from_be_bytes([cid[RANDOM_LEN], cid[RANDOM_LEN + 1]])
    }

    /// The worker `cid` names (one past the workers for an ID that is not ours).
    fn worker(&self, cid: &[u8; CID_LEN]) -> u16 {
        let tag = u32::from(Self::tag(cid)).wrapping_mul(u32::from(self.k[RANDOM_LEN]));
        (self.random_part(cid).wrapping_add(tag) & 0xffff) as u16
    }

    /// Sets `cid`'s tag so that it names `worker`, given its random bytes.
    fn name(&self, cid: &mut [u8; CID_LEN], worker: u16) {
        let rest = (self.random_part(cid) & 0xffff) as u16;
        let tag = worker
            .wrapping_sub(rest)
            .wrapping_mul(inverse(self.k[RANDOM_LEN]));
        cid[RANDOM_LEN..].copy_from_slice(&tag.to_be_bytes());
    }

    /// The classic BPF program for `SO_ATTACH_REUSEPORT_CBPF`: it sees the UDP payload and
    /// returns the index of the socket to deliver to (the worker), or one the group does not
    /// have, which leaves the choice to the kernel's hash. A short-header QUIC packet's
    /// destination connection ID starts at byte 1; a long-header packet (bit 0x80 of byte 0)
    /// is left to the hash. A packet too short to read makes the program return 0 (worker
    /// 0's socket), whose hand-off passes it on.
    fn steering_program(&self) -> Vec<nix::libc::sock_filter> {
        let op = |code: u16, k: u32| nix::libc::sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        };
        let mut program = vec![op(BPF_LD | BPF_B | BPF_ABS, 0)];
        // Filled in below, once the fall-back's position is known.
        program.push(op(BPF_JMP | BPF_JSET | BPF_K, 0x80));
        for (i, k) in self.k.iter().enumerate() {
            let load = if i < RANDOM_LEN {
                op(BPF_LD | BPF_B | BPF_ABS, 1 + i as u32)
            } else {
                op(BPF_LD | BPF_H | BPF_ABS, 1 + RANDOM_LEN as u32)
            };
            program.push(load);
            program.push(op(BPF_ALU | BPF_MUL | BPF_K, u32::from(*k)));
            if i > 0 {
                program.push(op(BPF_MISC | BPF_TAX, 0));
                program.push(op(BPF_LD | BPF_MEM, 0));
                program.push(op(BPF_ALU | BPF_ADD | BPF_X, 0));
            }
            if i < RANDOM_LEN {
                program.push(op(BPF_ST, 0));
            }
        }
        program.push(op(BPF_ALU | BPF_AND | BPF_K, 0xffff));
        program.push(op(BPF_RET | BPF_A, 0));
        let fallback = program.len();
        program.push(op(BPF_RET | BPF_K, u32::MAX));
        // Jump offsets count from the instruction after the jump.
        program[1].jt = u8::try_from(fallback - 2).unwrap_or(u8::MAX);
        program
    }
}

/// The inverse of odd `k` modulo 2^16 (Newton's iteration: each step doubles the bits).
fn inverse(k: u16) -> u16 {
    let mut x = k;
    for _ in 0..4 {
        x = x.wrapping_mul(2u16.wrapping_sub(k.wrapping_mul(x)));
    }
    x
}

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_ST: u16 = 0x02;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_MISC: u16 = 0x07;
const BPF_H: u16 = 0x08;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_MEM: u16 = 0x60;
const BPF_ADD: u16 = 0x00;
const BPF_MUL: u16 = 0x20;
const BPF_AND: u16 = 0x50;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;
const BPF_X: u16 = 0x08;
const BPF_A: u16 = 0x10;
const BPF_TAX: u16 = 0x00;

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

    #[test]
    fn an_id_names_any_worker_it_is_given_and_odd_keys_invert() {
        for k in [1u16, 3, 0x8001, 0xfffd, 0x1235] {
            assert_eq!(k.wrapping_mul(inverse(k)), 1, "{k}");
        }
        let handoff = Handoff::new(5);
        for worker in 0..5 {
            for _ in 0..100 {
                let cid = (handoff.cid_generator(worker))().generate_cid();
                assert_eq!(handoff.named(&cid), Some(worker));
            }
        }
    }

    /// With the steering program attached, the kernel delivers each short-header datagram to
    /// the socket of the worker its ID names, whatever port it came from; without it, the
    /// kernel's hash would spread these 30 sources over the three sockets at random.
    #[test]
    fn the_kernel_delivers_each_datagram_to_the_socket_of_the_worker_its_id_names() {
        const WORKERS: usize = 3;
        let bind = |addr| crate::tunnel::quic::bind_socket(addr, true).unwrap();
        let first = bind("127.0.0.1:0".parse().unwrap());
        let port = first.local_addr().unwrap();
        let mut sockets = vec![first];
        sockets.extend((1..WORKERS).map(|_| bind(port)));
        let handoff = Handoff::new(WORKERS);
        handoff.steer(&sockets[0]).unwrap();
        for socket in &sockets {
            socket.set_read_timeout(Some(WAIT)).unwrap();
        }
        let mut buf = [0u8; 64];
        for round in 0..30u32 {
            let worker = round as usize % WORKERS;
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let cid = (handoff.cid_generator(worker))().generate_cid();
            let datagram = [&[0x40][..], &cid[..], &round.to_be_bytes()].concat();
            peer.send_to(&datagram, port).unwrap();
            let received = sockets[worker]
                .recv_from(&mut buf)
                .map(|(n, _)| buf[..n].to_vec());
            assert_eq!(
                received.ok(),
                Some(datagram),
                "datagram {round} for worker {worker} did not reach its socket"
            );
        }
        for socket in &sockets {
            socket.set_nonblocking(true).unwrap();
            assert!(
                socket.recv_from(&mut buf).is_err(),
                "a datagram reached the wrong socket"
            );
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
        // As after EAGAIN: the poller is ready again after its retry delay, and the flag is
        // cleared.
        socket.blocked.store(true, Ordering::Release);
        let ready = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx));
        tokio::time::timeout(WAIT, ready).await.unwrap().unwrap();
        assert!(!socket.blocked.load(Ordering::Acquire));
    }
}
