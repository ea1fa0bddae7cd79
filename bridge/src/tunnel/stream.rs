//! One tunnel stream: the two halves of a bidirectional byte stream and frame I/O over them.
//!
//! This is half of the transport seam: HTTP code sees `SendHalf`/`RecvHalf` and frames, never
//! quinn. A TLS-over-TCP fallback adds a variant here and in `connection`, nothing else.

use bytes::{Bytes, BytesMut};

use super::frame::{self, FRAME_HEADER_LEN, Frame, FrameError, FrameType, MAX_DATA_FRAME};

/// Application error codes used when resetting a stream or closing a connection.
pub mod codes {
    /// Normal close of a connection.
    pub const CLOSED: u32 = 0;
    /// The node is draining: finish what is in flight, send nothing new.
    pub const GOING_AWAY: u32 = 1;
    /// The peer violated the protocol.
    pub const PROTOCOL: u32 = 2;
    /// The other side of this HTTP exchange went away (client or upstream).
    pub const CANCELLED: u32 = 3;
}

/// Why reading or writing a tunnel stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("tunnel stream read failed: {0}")]
    Read(String),
    #[error("tunnel stream write failed: {0}")]
    Write(String),
    #[error("peer sent a malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("tunnel stream ended in the middle of a frame")]
    Truncated,
    #[error("peer sent an unexpected {0} frame")]
    Unexpected(&'static str),
}

/// The sending half of a tunnel stream.
pub enum SendHalf {
    Quic(quinn::SendStream),
}

impl SendHalf {
    /// Writes already-encoded frame bytes.
    pub async fn write_encoded(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        match self {
            Self::Quic(s) => s
                .write_chunk(bytes)
                .await
                .map_err(|e| StreamError::Write(e.to_string())),
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
                    .map_err(|e| StreamError::Write(e.to_string()))?,
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
        }
    }

    /// Waits until the peer has acknowledged everything written, FIN included (or stopped
    /// reading, or the connection is gone). Closing a connection discards data the peer has
    /// not acknowledged, so a draining node waits on this before it closes its tunnels.
    pub async fn delivered(&mut self) {
        match self {
            Self::Quic(s) => {
                let _ = s.stopped().await;
            }
        }
    }

    /// Resolves when the peer stops reading this stream (its caller went away) or the
    /// connection is lost; pending while the peer still wants what we send. Meant to be
    /// raced against work done before anything is written.
    pub async fn abandoned_by_peer(&mut self) {
        match self {
            Self::Quic(s) => {
                // Finished and read to the end is not abandoned: never resolve then.
                if let Ok(None) = s.stopped().await {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Abandons this direction: the peer's reader sees an error, not a clean end.
    pub fn reset(&mut self, code: u32) {
        match self {
            Self::Quic(s) => {
                let _ = s.reset(quinn::VarInt::from_u32(code));
            }
        }
    }
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
        }
    }
}

enum RecvInner {
    Quic(quinn::RecvStream),
}

impl RecvHalf {
    pub fn quic(stream: quinn::RecvStream) -> Self {
        Self {
            inner: RecvInner::Quic(stream),
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
    pub fn stop(&mut self, code: u32) {
        self.ended = true;
        match &mut self.inner {
            RecvInner::Quic(s) => {
                let _ = s.stop(quinn::VarInt::from_u32(code));
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
                Err(e) => Err(StreamError::Read(e.to_string())),
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
                Err(quinn::ReadExactError::ReadError(e)) => Err(StreamError::Read(e.to_string())),
            },
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
