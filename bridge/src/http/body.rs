//! Moving HTTP bodies across the tunnel: hyper body → DATA/TRAILERS frames, and frames →
//! a streaming hyper body.
//!
//! Backpressure is the transport's: the pump awaits each write, so a slow reader slows the
//! writer and nothing is buffered beyond one chunk. Which frame may come next is asked of
//! `tunnel::exchange`, both ways. No routing or header policy here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body::Body;
use http_body_util::{BodyExt, StreamBody};

use super::headers;
use crate::tunnel::exchange::{Event, Exchange, ExchangeError};
use crate::tunnel::frame::{self, Frame};
use crate::tunnel::stream::{RecvHalf, SendHalf, StreamError, codes, encoded};

/// Error type of bodies the bridge hands to hyper.
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;
/// The body type used on both sides of the bridge.
pub(crate) type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

pub(crate) use crate::upstream::RequestBodyAborted;

/// A complete in-memory body.
pub(crate) fn full(bytes: Bytes) -> BoxBody {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub(crate) fn empty() -> BoxBody {
    full(Bytes::new())
}

/// Why pumping a body into the tunnel stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PumpError {
    #[error("reading the body failed: {0}")]
    Source(String),
    #[error(transparent)]
    Tunnel(#[from] StreamError),
    #[error("trailers could not be encoded: {0}")]
    Encode(#[from] frame::FrameError),
    #[error("the body would break the exchange: {0}")]
    Exchange(#[from] ExchangeError),
}

/// One polled body frame: `None` is the end of the body.
pub(crate) type PolledFrame<E> = Option<Result<http_body::Frame<Bytes>, E>>;

/// Sends `body` as DATA frames and optional TRAILERS, then finishes the stream; `first` is a
/// frame the caller already polled from it. `sending` is the exchange of `send`, past a head
/// that said a body follows.
///
/// On a body error, or a body frame the exchange refuses (DATA after TRAILERS), the stream is
/// reset so the other side sees an aborted body, never a truncated one that looks complete.
/// `bytes` counts payload bytes sent.
pub(crate) async fn pump_to_tunnel<B>(
    first: Option<PolledFrame<B::Error>>,
    mut body: B,
    send: &mut SendHalf,
    sending: &mut Exchange,
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
        if forward_frame(frame, &body, send, sending, bytes).await? == Forwarded::End {
            return Ok(());
        }
    }
}

/// Whether the body continues after a forwarded frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Forwarded {
    More,
    End,
}

/// Forwards one frame polled from `body` (`None`: the body ended, so the stream is finished).
///
/// A body that knows it has ended after this frame (a declared length reached) is finished
/// at once, without another poll: the FIN then leaves in the same packet as the data.
pub(crate) async fn forward_frame<B>(
    frame: PolledFrame<B::Error>,
    body: &B,
    send: &mut SendHalf,
    sending: &mut Exchange,
    bytes: &AtomicU64,
) -> Result<Forwarded, PumpError>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let forwarded = forward_one(frame, send, sending, bytes).await?;
    if forwarded == Forwarded::More && body.is_end_stream() {
        return finish(send, sending);
    }
    Ok(forwarded)
}

/// Ends the stream, if the exchange allows it here.
fn finish(send: &mut SendHalf, sending: &mut Exchange) -> Result<Forwarded, PumpError> {
    admit(send, sending, Event::End)?;
    send.finish();
    Ok(Forwarded::End)
}

/// Records `event` as sent; one the exchange refuses resets the stream instead.
fn admit(send: &mut SendHalf, sending: &mut Exchange, event: Event) -> Result<(), PumpError> {
    if let Err(e) = sending.on(event) {
        send.reset(codes::CANCELLED);
        return Err(e.into());
    }
    Ok(())
}

async fn forward_one<E: std::fmt::Display>(
    frame: PolledFrame<E>,
    send: &mut SendHalf,
    sending: &mut Exchange,
    bytes: &AtomicU64,
) -> Result<Forwarded, PumpError> {
    match frame {
        None => finish(send, sending),
        Some(Ok(frame)) => match frame.into_data() {
            Ok(data) => {
                // An empty chunk is no frame on the wire.
                if !data.is_empty() {
                    admit(send, sending, Event::Data)?;
                }
                bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                if let Err(e) = send.write_data(data).await {
                    send.reset(codes::CANCELLED);
                    return Err(e.into());
                }
                Ok(Forwarded::More)
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    admit(send, sending, Event::Trailers)?;
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

/// A body from the tunnel that did not arrive whole: the sender's side went away (a caller
/// that hung up mid-upload, a reset stream), which is never the receiver's fault.
fn aborted(detail: impl ToString) -> BodyError {
    Box::new(RequestBodyAborted(detail.to_string()))
}

/// A hyper body that streams DATA frames (and final TRAILERS) from the tunnel.
///
/// `receiving` is the exchange of `recv`, past a head that said a body follows; a frame it
/// refuses stops the stream and aborts the body. `keep` is held until the body ends or is
/// dropped (e.g. the stream's active-count guard). `bytes` counts payload bytes received.
pub(crate) fn from_tunnel(
    recv: RecvHalf,
    receiving: Exchange,
    keep: impl Send + 'static,
    bytes: Arc<AtomicU64>,
) -> BoxBody {
    struct State<K> {
        recv: RecvHalf,
        receiving: Exchange,
        _keep: K,
        bytes: Arc<AtomicU64>,
    }
    let state = State {
        recv,
        receiving,
        _keep: keep,
        bytes,
    };
    let stream = futures_util::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            let frame = match state.recv.read_frame().await {
                Ok(frame) => frame,
                Err(e) => return Some((Err(aborted(e)), None)),
            };
            if let Err(e) = state.receiving.on(Event::of(frame.as_ref())) {
                state.recv.stop(codes::PROTOCOL);
                return Some((Err(aborted(format!("peer broke the exchange: {e}"))), None));
            }
            return match frame {
                Some(Frame::Data(data)) => {
                    if data.is_empty() {
                        continue;
                    }
                    state.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    Some((Ok(http_body::Frame::data(data)), Some(state)))
                }
                Some(Frame::Trailers(pairs)) => match headers::from_pairs(pairs) {
                    Ok(map) => Some((Ok(http_body::Frame::trailers(map)), Some(state))),
                    Err(e) => {
                        state.recv.stop(codes::PROTOCOL);
                        Some((Err(aborted(e)), None))
                    }
                },
                // The exchange lets nothing else into a body: this is its end.
                _ => None,
            };
        }
    });
    BodyExt::boxed_unsync(StreamBody::new(stream))
}
