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
//!   only when one does is a duplicate of the descriptor registered for writing, for the
//!   length of that wait; registering reports a socket that is already writable at once.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A bound UDP socket registered with the tokio reactor, for `quinn::Endpoint`.
#[derive(Debug)]
pub struct TunnelSocket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// The last send hit EAGAIN: quinn asks the poller before every send, and only then does
    /// the poller have to wait for the kernel.
    blocked: AtomicBool,
}

impl TunnelSocket {
    /// Takes over `socket`; must be called within a tokio runtime.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let io = register(socket, Interest::READABLE)?;
        Ok(Self {
            io,
            state,
            blocked: AtomicBool::new(false),
        })
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
            ready: None,
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
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            let batch = bufs.len().min(meta.len());
            if let Ok(received) =
                guard.try_io(|socket| self.state.recv(socket.get_ref().into(), bufs, meta))
            {
                if received.as_ref().is_ok_and(|&n| n < batch) {
                    guard.clear_ready();
                }
                return Poll::Ready(received);
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

/// Ready at once unless a send hit EAGAIN; then waits for the socket to become writable, on a
/// duplicate of its descriptor registered for writing for as long as the wait lasts. Each
/// wait is its own future, so several connections can wait at once.
struct Writable {
    socket: Arc<TunnelSocket>,
    ready: Option<Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>>,
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let Self { socket, ready } = self.get_mut();
        if ready.is_none() && !socket.blocked.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let wait = ready.get_or_insert_with(|| {
            let socket = socket.clone();
            Box::pin(async move {
                let writer = register(socket.io.get_ref().try_clone()?, Interest::WRITABLE)?;
                writer.writable().await.map(|_| ())
            })
        });
        let result = wait.as_mut().poll(cx);
        if result.is_ready() {
            *ready = None;
            socket.blocked.store(false, Ordering::Release);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// One `poll_recv` with a batch of `slots` buffers; returns the datagrams it read.
    async fn receive(socket: &TunnelSocket, slots: usize) -> Vec<Vec<u8>> {
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
        (0..n).map(|i| bufs[i][..meta[i].len].to_vec()).collect()
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
