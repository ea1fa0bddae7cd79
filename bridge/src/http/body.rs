//! Moving HTTP bodies across the tunnel: hyper body → DATA/TRAILERS frames, and frames →
//! a streaming hyper body.
//!
//! Backpressure is the transport's: the pump awaits each write, so a slow reader slows the
//! writer and nothing is buffered beyond one chunk. No routing or header policy here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, StreamBody};

use super::headers;
use crate::tunnel::frame::{self, Frame};
use crate::tunnel::stream::{RecvHalf, SendHalf, StreamError, codes, encoded};

/// Error type of bodies the bridge hands to hyper.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;
/// The body type used on both sides of the bridge.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

pub use crate::upstream::RequestBodyAborted;

/// A complete in-memory body.
pub fn full(bytes: Bytes) -> BoxBody {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> BoxBody {
    full(Bytes::new())
}

/// Why pumping a body into the tunnel stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("reading the body failed: {0}")]
    Source(String),
    #[error(transparent)]
    Tunnel(#[from] StreamError),
    #[error("trailers could not be encoded: {0}")]
    Encode(#[from] frame::FrameError),
}

/// One polled body frame: `None` is the end of the body.
pub type PolledFrame<E> = Option<Result<http_body::Frame<Bytes>, E>>;

/// Sends `body` as DATA frames and optional TRAILERS, then finishes the stream; `first` is a
/// frame the caller already polled from it.
///
/// On a body error the stream is reset so the other side sees an aborted body, never a
/// truncated one that looks complete. `bytes` counts payload bytes sent.
pub async fn pump_to_tunnel<B>(
    first: Option<PolledFrame<B::Error>>,
    mut body: B,
    send: &mut SendHalf,
    bytes: &AtomicU64,
) -> Result<(), PumpError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut next = first;
    loop {
        let frame = match next.take() {
            Some(frame) => frame,
            None => body.frame().await,
        };
        if forward_frame(frame, &body, send, bytes).await? == Forwarded::End {
            return Ok(());
        }
    }
}

/// Whether the body continues after a forwarded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Forwarded {
    More,
    End,
}

/// Forwards one frame polled from `body` (`None`: the body ended, so the stream is finished).
///
/// A body that knows it has ended after this frame (a declared length reached) is finished
/// at once, without another poll: the FIN then leaves in the same packet as the data.
pub async fn forward_frame<B>(
    frame: PolledFrame<B::Error>,
    body: &B,
    send: &mut SendHalf,
    bytes: &AtomicU64,
) -> Result<Forwarded, PumpError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let forwarded = forward_one(frame, send, bytes).await?;
    if forwarded == Forwarded::More && body.is_end_stream() {
        send.finish();
        return Ok(Forwarded::End);
    }
    Ok(forwarded)
}

async fn forward_one<E: std::fmt::Display>(
    frame: PolledFrame<E>,
    send: &mut SendHalf,
    bytes: &AtomicU64,
) -> Result<Forwarded, PumpError> {
    match frame {
        None => {
            send.finish();
            Ok(Forwarded::End)
        }
        Some(Ok(frame)) => match frame.into_data() {
            Ok(data) => {
                bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Err(e) = send.write_data(data).await {
                    send.reset(codes::CANCELLED);
                    return Err(e.into());
                }
                Ok(Forwarded::More)
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let pairs = headers::to_pairs(&trailers);
                    let encoded = match encoded(|b| frame::encode_trailers(&pairs, b)) {
                        Ok(e) => e,
                        Err(e) => {
                            send.reset(codes::CANCELLED);
                            return Err(e.into());
                        }
                    };
                    send.write_encoded(encoded).await?;
                }
                Ok(Forwarded::More)
            }
        },
        Some(Err(e)) => {
            send.reset(codes::CANCELLED);
            Err(PumpError::Source(e.to_string()))
        }
    }
}

/// A hyper body that streams DATA frames (and final TRAILERS) from the tunnel.
///
/// `keep` is held until the body ends or is dropped (e.g. the stream's active-count guard).
/// `bytes` counts payload bytes received.
/// A body from the tunnel that did not arrive whole: the sender's side went away (a caller
/// that hung up mid-upload, a reset stream), which is never the receiver's fault.
fn aborted(detail: impl ToString) -> BodyError {
    Box::new(RequestBodyAborted(detail.to_string()))
}

pub fn from_tunnel(recv: RecvHalf, keep: impl Send + 'static, bytes: Arc<AtomicU64>) -> BoxBody {
    struct State<K> {
        recv: RecvHalf,
        _keep: K,
        bytes: Arc<AtomicU64>,
        trailers_seen: bool,
    }
    let state = State {
        recv,
        _keep: keep,
        bytes,
        trailers_seen: false,
    };
    let stream = futures_util::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            return match state.recv.read_frame().await {
                Ok(Some(Frame::Data(data))) if !state.trailers_seen => {
                    if data.is_empty() {
                        continue;
                    }
                    state.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    Some((Ok(http_body::Frame::data(data)), Some(state)))
                }
                Ok(Some(Frame::Trailers(pairs))) if !state.trailers_seen => {
                    match headers::from_pairs(pairs) {
                        Ok(map) => {
                            state.trailers_seen = true;
                            Some((Ok(http_body::Frame::trailers(map)), Some(state)))
                        }
                        Err(e) => {
                            state.recv.stop(codes::PROTOCOL);
                            Some((Err(aborted(e)), None))
                        }
                    }
                }
                Ok(None) => None,
                Ok(Some(_)) => {
                    state.recv.stop(codes::PROTOCOL);
                    Some((
                        Err(aborted("peer sent an unexpected frame inside a body")),
                        None,
                    ))
                }
                Err(e) => Some((Err(aborted(e)), None)),
            };
        }
    });
    BodyExt::boxed_unsync(StreamBody::new(stream))
}
