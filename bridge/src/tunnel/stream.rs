//! One tunnel stream: the two halves of a bidirectional byte stream and frame I/O over them.
//!
//! This is half of the transport seam: HTTP code sees `SendHalf`/`RecvHalf` and frames, never
//! quinn or h2. Each carrier (QUIC, TLS/TCP) is a variant here and in `connection`.

use bytes::{Bytes, BytesMut};

use super::frame::{self, FRAME_HEADER_LEN, Frame, FrameError, FrameType, MAX_DATA_FRAME};
use super::tcp::Piece;

/// The largest first piece sent on an HTTP/2 stream without waiting for capacity: any request
/// or response head short of a very large one, and well inside the 64 KiB initial window
/// every HTTP/2 peer starts with.
const FIRST_PIECE_UNRESERVED: usize = 16 * 1024;

/// Application error codes used when resetting a stream or closing a connection.
pub(crate) mod codes {
    /// Normal close of a connection.
    pub(crate) const CLOSED: u32 = 0;
    /// The node is draining: finish what is in flight, send nothing new.
    pub(crate) const GOING_AWAY: u32 = 1;
    /// The peer violated the protocol.
    pub(crate) const PROTOCOL: u32 = 2;
    /// The other side of this HTTP exchange went away (client or upstream).
    pub(crate) const CANCELLED: u32 = 3;
}

/// Why reading or writing a tunnel stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("tunnel stream read failed: {0}")]
    Read(#[from] ReadError),
    #[error("tunnel stream write failed: {0}")]
    Write(#[from] WriteError),
    #[error("peer sent a malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("tunnel stream ended in the middle of a frame")]
    Truncated,
    #[error("peer sent an unexpected {0} frame")]
    Unexpected(&'static str),
}

/// Why reading a tunnel stream failed: the carrier's error, or what the stream said.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Quic(#[from] quinn::ReadError),
    #[error(transparent)]
    H2(#[from] h2::Error),
    /// The peer answered a stream this side opened with something other than 200.
    #[error("peer refused the stream ({0})")]
    Refused(http::StatusCode),
    /// This side had stopped reading the stream (`RecvHalf::stop`).
    #[error("tunnel stream stopped")]
    Stopped,
    /// A CONTROL frame whose JSON is not a control message.
    #[error("malformed control message: {0}")]
    MalformedControl(serde_json::Error),
}

/// Why writing a tunnel stream failed: the carrier's error, or what could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Quic(#[from] quinn::WriteError),
    #[error(transparent)]
    H2(#[from] h2::Error),
    /// The HTTP/2 stream will take no more data.
    #[error("tunnel stream closed")]
    Closed,
    /// A control message that could not be encoded as JSON.
    #[error("{0}")]
    EncodeControl(serde_json::Error),
}

/// The sending half of a tunnel stream.
pub enum SendHalf {
    Quic(quinn::SendStream),
    Tcp(H2Send),
}

/// The sending side of an HTTP/2 stream.
pub struct H2Send {
    stream: H2Stream,
    /// Nothing has been written on it yet.
    fresh: bool,
}

enum H2Stream {
    Open(h2::SendStream<Piece>),
    /// A stream the peer opened, not answered yet. Its answer (the response HEADERS) is the
    /// peer's acknowledgement that this node has the stream, and it goes out with the first
    /// bytes written, in the same TCP write and the same wake-up of the peer; a stream with
    /// nothing to write for `ACK_DELAY` is answered alone (see [`SendHalf::abandoned_by_peer`]).
    Unanswered(h2::server::SendResponse<Piece>),
}

/// The longest a stream the peer opened waits for its answer: the acknowledgement delay a
/// QUIC receiver may take (quinn's `max_ack_delay`), so the peer learns as soon on either
/// carrier that a request arrived.
pub(super) const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(25);

impl H2Send {
    /// The stream to write on, answering it first if it has not been.
    fn stream(&mut self) -> Result<&mut h2::SendStream<Piece>, h2::Error> {
        if let H2Stream::Unanswered(respond) = &mut self.stream {
            self.stream = H2Stream::Open(respond.send_response(http::Response::new(()), false)?);
        }
        match &mut self.stream {
            H2Stream::Open(stream) => Ok(stream),
            H2Stream::Unanswered(_) => Err(h2::Reason::INTERNAL_ERROR.into()),
        }
    }

    /// Sends the answer now if nothing was written within `ACK_DELAY`; resolves at once if
    /// the stream is answered, or when the peer resets it first (`true`).
    async fn answer_within_ack_delay(&mut self) -> bool {
        let H2Stream::Unanswered(respond) = &mut self.stream else {
            return false;
        };
        let due = tokio::time::sleep(ACK_DELAY);
        tokio::pin!(due);
        let reset = std::future::poll_fn(|cx| {
            if respond.poll_reset(cx).is_ready() {
                return std::task::Poll::Ready(true);
            }
            due.as_mut().poll(cx).map(|()| false)
        })
        .await;
        reset || self.stream().is_err()
    }
}

impl SendHalf {
    pub(crate) fn tcp(stream: h2::SendStream<Piece>) -> Self {
        Self::Tcp(H2Send {
            stream: H2Stream::Open(stream),
            fresh: true,
        })
    }

    /// A stream the peer opened on a TLS/TCP tunnel, answered with the first bytes written.
    pub(crate) fn tcp_unanswered(respond: h2::server::SendResponse<Piece>) -> Self {
        Self::Tcp(H2Send {
            stream: H2Stream::Unanswered(respond),
            fresh: true,
        })
    }

    /// Writes already-encoded frame bytes.
    pub async fn write_encoded(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        match self {
            Self::Quic(s) => s
                .write_chunk(bytes)
                .await
                .map_err(|e| WriteError::from(e).into()),
            Self::Tcp(s) => send_h2(s, Piece::new(bytes, Bytes::new())).await,
        }
    }

    /// Writes body bytes as one or more DATA frames without copying the payload.
    pub async fn write_data(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_FRAME));
            let head =
                Bytes::copy_from_slice(&frame::encode_frame_head(FrameType::Data, chunk.len()));
            match self {
                Self::Quic(s) => s
                    .write_all_chunks(&mut [head, chunk])
                    .await
                    .map_err(WriteError::from)?,
                Self::Tcp(s) => send_h2(s, Piece::new(head, chunk)).await?,
            }
        }
        Ok(())
    }

    /// Ends this direction cleanly (FIN).
    pub fn finish(&mut self) {
        match self {
            Self::Quic(s) => {
                let _ = s.finish();
            }
            Self::Tcp(s) => {
                if let Ok(stream) = s.stream() {
                    let _ = stream.send_data(Piece::default(), true);
                }
            }
        }
    }

    /// Waits until the peer has acknowledged everything written, FIN included (or stopped
    /// reading, or the connection is gone). Closing a connection discards data the peer has
    /// not acknowledged, so a draining node waits on this before it closes its tunnels.
    /// TCP delivers what the connection has written; a closing TLS/TCP connection writes
    /// what is buffered before its socket goes, so there is nothing to wait for per stream.
    pub(crate) async fn delivered(&mut self) {
        match self {
            Self::Quic(s) => {
                let _ = s.stopped().await;
            }
            Self::Tcp(_) => {}
        }
    }

    /// Resolves when the peer stops reading this stream (its caller went away) or the
    /// connection is lost; pending while the peer still wants what we send. Meant to be
    /// raced against work done before anything is written. A TLS/TCP stream the peer opened
    /// is meanwhile answered once `ACK_DELAY` has passed, so the peer knows it arrived.
    pub(crate) async fn abandoned_by_peer(&mut self) {
        match self {
            Self::Quic(s) => {
                // Finished and read to the end is not abandoned: never resolve then.
                if let Ok(None) = s.stopped().await {
                    std::future::pending::<()>().await;
                }
            }
            // Pending while the stream is open or ended cleanly; ready on a reset or when
            // the connection is gone.
            Self::Tcp(s) => {
                if s.answer_within_ack_delay().await {
                    return;
                }
                if let Ok(stream) = s.stream() {
                    let _ = std::future::poll_fn(|cx| stream.poll_reset(cx)).await;
                }
            }
        }
    }

    /// Abandons this direction: the peer's reader sees an error, not a clean end.
    pub(crate) fn reset(&mut self, code: u32) {
        match self {
            Self::Quic(s) => {
                let _ = s.reset(quinn::VarInt::from_u32(code));
            }
            Self::Tcp(s) => match &mut s.stream {
                H2Stream::Open(stream) => stream.send_reset(h2::Reason::from(code)),
                H2Stream::Unanswered(respond) => respond.send_reset(h2::Reason::from(code)),
            },
        }
    }
}

/// Sends `piece` on an HTTP/2 stream as the peer's flow-control window allows: waiting
/// for capacity is the backpressure (h2 would otherwise buffer without bound).
async fn send_h2(send: &mut H2Send, mut piece: Piece) -> Result<(), StreamError> {
    use bytes::Buf;
    let fresh = std::mem::take(&mut send.fresh);
    let stream = send.stream().map_err(WriteError::from)?;
    // A stream this node opened has no capacity until the connection task has sent its
    // HEADERS; waiting for capacity would let that task write the HEADERS alone, and the
    // first piece (a request head) would take a write of its own. Queued at once, it leaves
    // with the HEADERS. h2 holds at most this one piece for the stream before the window
    // the peer announced lets it go.
    if fresh && piece.remaining() <= FIRST_PIECE_UNRESERVED {
        return stream
            .send_data(piece, false)
            .map_err(|e| WriteError::from(e).into());
    }
    while piece.has_remaining() {
        stream.reserve_capacity(piece.remaining());
        let granted = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(granted) => granted.map_err(WriteError::from)?,
            None => return Err(WriteError::Closed.into()),
        };
        if granted == 0 {
            continue;
        }
        let now = piece.split_to(granted.min(piece.remaining()));
        stream.send_data(now, false).map_err(WriteError::from)?;
    }
    Ok(())
}

/// The receiving half of a tunnel stream, decoding frames.
pub struct RecvHalf {
    inner: RecvInner,
    /// Bytes of the current DATA frame not yet handed out: bodies are passed on in the
    /// transport's own chunks, never copied into a frame-sized buffer.
    data_remaining: usize,
    /// The end of the stream was read (or reading was stopped).
    ended: bool,
}

impl Drop for RecvHalf {
    /// A reader often stops at the end of what it needs (a request without a body, a
    /// response of declared length), one step before the peer's FIN, which has usually
    /// arrived in the same packet. Dropping a QUIC stream before its FIN is read tells the
    /// peer STOP_SENDING: an extra packet, and an ACK for it, on every request (3 datagrams
    /// per request per node instead of 1–2). So take the FIN if it is already here; if data or
    /// nothing is, the stream is stopped as before.
    fn drop(&mut self) {
        if self.ended || self.data_remaining > 0 {
            return;
        }
        match &mut self.inner {
            RecvInner::Quic(s) => {
                let _ = futures_util::FutureExt::now_or_never(s.read_chunk(1, true));
            }
            RecvInner::Tcp(r) => r.linger(),
        }
    }
}

enum RecvInner {
    Quic(quinn::RecvStream),
    Tcp(H2Recv),
}

/// How long a dropped HTTP/2 body waits for the peer's END_STREAM.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// The receiving side of an HTTP/2 stream, with the bytes of the last DATA frame not yet
/// handed out.
struct H2Recv {
    /// The response whose body this is, until it arrives (a stream this side opened).
    response: Option<h2::client::ResponseFuture>,
    body: Option<h2::RecvStream>,
    buffer: Bytes,
}

impl H2Recv {
    /// Keeps the body until the peer's END_STREAM. h2 resets a stream whose handles are all
    /// gone before the peer finished it, and the peer may then lose the end of a response
    /// it had already received (a reset overrides what is buffered). The END_STREAM
    /// follows the last frame at once, so it is usually here already; otherwise a small
    /// task waits for it, bounded.
    fn linger(&mut self) {
        use futures_util::FutureExt;
        let Some(mut body) = self.body.take() else {
            return;
        };
        loop {
            match body.data().now_or_never() {
                Some(Some(Ok(data))) => {
                    let _ = body.flow_control().release_capacity(data.len());
                }
                Some(Some(Err(_)) | None) => return,
                None => break,
            }
        }
        if body.is_end_stream() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let drain = async {
                    while let Some(Ok(data)) = body.data().await {
                        let _ = body.flow_control().release_capacity(data.len());
                    }
                };
                let _ = tokio::time::timeout(LINGER, drain).await;
            });
        }
    }

    /// Up to `max` bytes; `Ok(None)` at a clean end.
    async fn chunk(&mut self, max: usize) -> Result<Option<Bytes>, StreamError> {
        while self.buffer.is_empty() {
            if let Some(response) = self.response.take() {
                let response = response.await.map_err(ReadError::from)?;
                if response.status() != http::StatusCode::OK {
                    return Err(ReadError::Refused(response.status()).into());
                }
                self.body = Some(response.into_body());
            }
            let Some(body) = self.body.as_mut() else {
                return Err(ReadError::Stopped.into());
            };
            match body.data().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ReadError::from(e).into()),
                Some(Ok(data)) => {
                    // Our reader is the backpressure: window is given back as bytes are
                    // taken out of h2, not before.
                    let _ = body.flow_control().release_capacity(data.len());
                    self.buffer = data;
                }
            }
        }
        let n = max.min(self.buffer.len());
        Ok(Some(self.buffer.split_to(n)))
    }
}

impl RecvHalf {
    pub fn quic(stream: quinn::RecvStream) -> Self {
        Self::new(RecvInner::Quic(stream))
    }

    /// The request body of a stream the peer opened (or of an offer it took).
    pub(crate) fn tcp(body: h2::RecvStream) -> Self {
        Self::new(RecvInner::Tcp(H2Recv {
            response: None,
            body: Some(body),
            buffer: Bytes::new(),
        }))
    }

    /// The response body of a stream this side opened, once the peer answers.
    pub(crate) fn tcp_response(response: h2::client::ResponseFuture) -> Self {
        Self::new(RecvInner::Tcp(H2Recv {
            response: Some(response),
            body: None,
            buffer: Bytes::new(),
        }))
    }

    fn new(inner: RecvInner) -> Self {
        Self {
            inner,
            data_remaining: 0,
            ended: false,
        }
    }

    /// Reads the next frame. `Ok(None)` is a clean end of stream at a frame boundary.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            if self.data_remaining > 0 {
                let chunk = self.read_chunk(self.data_remaining).await?;
                self.data_remaining -= chunk.len();
                return Ok(Some(Frame::Data(chunk)));
            }
            let mut head = [0u8; FRAME_HEADER_LEN];
            if !self.read_exact_or_eof(&mut head).await? {
                return Ok(None);
            }
            let head = frame::decode_frame_head(head)?;
            if head.kind == FrameType::Data {
                self.data_remaining = head.len;
                continue;
            }
            let mut payload = BytesMut::zeroed(head.len);
            if !self.read_exact_or_eof(&mut payload).await? && head.len > 0 {
                return Err(StreamError::Truncated);
            }
            return Ok(Some(frame::decode_payload(head.kind, payload.freeze())?));
        }
    }

    /// Tells the peer we will read no more (it sees its writes fail).
    pub(crate) fn stop(&mut self, code: u32) {
        self.ended = true;
        match &mut self.inner {
            RecvInner::Quic(s) => {
                let _ = s.stop(quinn::VarInt::from_u32(code));
            }
            // HTTP/2 has no STOP_SENDING: dropping the body makes h2 discard what arrives
            // and give the window back, and the stream is reset once both halves are gone.
            RecvInner::Tcp(r) => {
                r.response = None;
                r.body = None;
                r.buffer = Bytes::new();
            }
        }
    }

    async fn read_chunk(&mut self, max: usize) -> Result<Bytes, StreamError> {
        match &mut self.inner {
            RecvInner::Quic(s) => match s.read_chunk(max, true).await {
                Ok(Some(chunk)) => Ok(chunk.bytes),
                Ok(None) => {
                    self.ended = true;
                    Err(StreamError::Truncated)
                }
                Err(e) => Err(ReadError::from(e).into()),
            },
            RecvInner::Tcp(r) => match r.chunk(max).await? {
                Some(chunk) => Ok(chunk),
                None => {
                    self.ended = true;
                    Err(StreamError::Truncated)
                }
            },
        }
    }

    /// Fills `buf`; returns false on a clean end of stream before the first byte.
    async fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool, StreamError> {
        if buf.is_empty() {
            return Ok(true);
        }
        match &mut self.inner {
            RecvInner::Quic(s) => match s.read_exact(buf).await {
                Ok(()) => Ok(true),
                Err(quinn::ReadExactError::FinishedEarly(n)) => {
                    self.ended = true;
                    if n == 0 {
                        Ok(false)
                    } else {
                        Err(StreamError::Truncated)
                    }
                }
                Err(quinn::ReadExactError::ReadError(e)) => Err(ReadError::from(e).into()),
            },
            RecvInner::Tcp(r) => {
                let mut filled = 0;
                while filled < buf.len() {
                    match r.chunk(buf.len() - filled).await? {
                        Some(chunk) => {
                            buf[filled..filled + chunk.len()].copy_from_slice(&chunk);
                            filled += chunk.len();
                        }
                        None => {
                            self.ended = true;
                            return if filled == 0 {
                                Ok(false)
                            } else {
                                Err(StreamError::Truncated)
                            };
                        }
                    }
                }
                Ok(true)
            }
        }
    }
}

/// Encodes `frame`-producing closures into fresh bytes; small helper for callers.
pub fn encoded(
    f: impl FnOnce(&mut BytesMut) -> Result<(), FrameError>,
) -> Result<Bytes, FrameError> {
    let mut out = BytesMut::with_capacity(512);
    f(&mut out)?;
    Ok(out.freeze())
}
