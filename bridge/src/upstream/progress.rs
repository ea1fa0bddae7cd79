//! A request body on its way to an upstream: when it has been handed whole to the upstream
//! connection (the moment the response deadlines start) and whether it stalled (no bytes for
//! `request_body_idle_timeout`).
//!
//! It wraps the body and reports; choosing endpoints, retrying and answering are `Upstream`'s.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::{BodyError, BoxBody};

/// Where a request body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyState {
    /// Bytes are still to come from the caller.
    Streaming,
    /// The last byte was handed to the upstream connection at this instant.
    Sent(Instant),
    /// No byte arrived from the caller for this long; the body failed.
    Stalled(Duration),
}

/// The error a stalled request body yields to the upstream connection.
#[derive(Debug, thiserror::Error)]
#[error("no request body bytes arrived for {0:?}")]
pub(crate) struct RequestBodyStalled(pub(crate) Duration);

/// What `Upstream::send` watches of a request's body.
pub(crate) enum BodyProgress {
    /// The request had no body (or all of it was there): sent as soon as it goes out.
    Whole(Instant),
    Tracked(watch::Receiver<BodyState>),
}

impl BodyProgress {
    /// Resolves with when the body was handed over whole; pending for a body that stalled (its
    /// attempt fails with that). A body dropped before its end (its request was given up) starts
    /// the clock when it is noticed, so a deadline still bounds the wait.
    pub(crate) async fn sent(&self) -> Instant {
        let mut state = match self {
            Self::Whole(at) => return *at,
            Self::Tracked(state) => state.clone(),
        };
        let outcome = state
            .wait_for(|s| !matches!(s, BodyState::Streaming))
            .await
            .map(|s| *s);
        match outcome {
            Ok(BodyState::Sent(at)) => at,
            Ok(BodyState::Stalled(_)) => std::future::pending().await,
            Ok(BodyState::Streaming) | Err(_) => Instant::now(),
        }
    }

    /// How long the body went without bytes, if that is why it failed.
    pub(crate) fn stalled(&self) -> Option<Duration> {
        match self {
            Self::Tracked(state) => match *state.borrow() {
                BodyState::Stalled(after) => Some(after),
                _ => None,
            },
            Self::Whole(_) => None,
        }
    }
}

/// Wraps `request`'s body so its progress can be watched and a stall (no bytes for
/// `idle_timeout`, if set) fails it. A request whose body is already complete is not wrapped.
pub(crate) fn track(
    request: http::Request<BoxBody>,
    idle_timeout: Option<Duration>,
) -> (http::Request<BoxBody>, BodyProgress) {
    if request.body().is_end_stream() {
        return (request, BodyProgress::Whole(Instant::now()));
    }
    let (state, watched) = watch::channel(BodyState::Streaming);
    let request = request.map(|inner| {
        http_body_util::BodyExt::boxed_unsync(TrackedBody {
            inner,
            idle_timeout,
            stall: None,
            state,
        })
    });
    (request, BodyProgress::Tracked(watched))
}

struct TrackedBody {
    inner: BoxBody,
    idle_timeout: Option<Duration>,
    /// Armed while the caller keeps us waiting (reset, not reallocated, on each wait); `None`
    /// until the first wait or without an idle timeout.
    stall: Option<(bool, Pin<Box<Sleep>>)>,
    state: watch::Sender<BodyState>,
}

impl TrackedBody {
    fn progressed(&mut self) {
        if let Some((armed, _)) = &mut self.stall {
            *armed = false;
        }
    }

    fn mark_sent(&self) {
        self.state.send_replace(BodyState::Sent(Instant::now()));
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.progressed();
                this.mark_sent();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.progressed();
                if this.inner.is_end_stream() {
                    this.mark_sent();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.progressed();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                let Some(limit) = this.idle_timeout else {
                    return Poll::Pending;
                };
                // The clock runs only while we wait for the caller: an upstream that reads
                // slowly (and so polls late) is not a stalled caller.
                let (armed, sleep) = this
                    .stall
                    .get_or_insert_with(|| (false, Box::pin(tokio::time::sleep(limit))));
                if !*armed {
                    sleep.as_mut().reset(Instant::now() + limit);
                    *armed = true;
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    *armed = false;
                    this.state.send_replace(BodyState::Stalled(limit));
                    return Poll::Ready(Some(Err(Box::new(RequestBodyStalled(limit)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn streaming(chunks: tokio::sync::mpsc::Receiver<Bytes>) -> http::Request<BoxBody> {
        let stream = futures_util::stream::unfold(chunks, |mut chunks| async move {
            let chunk = chunks.recv().await?;
            Some((Ok::<_, BodyError>(Frame::data(chunk)), chunks))
        });
        http::Request::new(http_body_util::StreamBody::new(stream).boxed_unsync())
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_is_sent_when_its_last_byte_is_taken_and_stalls_only_while_awaited() {
        let (chunks, rx) = tokio::sync::mpsc::channel(1);
        let (request, progress) = track(streaming(rx), Some(Duration::from_secs(5)));
        let mut body = request.into_body();
        let started = Instant::now();
        for _ in 0..3 {
            // 4 s between chunks: under the 5 s idle timeout each time.
            let send = chunks.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(4)).await;
                send.send(Bytes::from_static(b"x")).await.unwrap();
            });
            assert!(body.frame().await.unwrap().is_ok());
        }
        // The reader goes away for longer than the timeout: that is not a stall.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(progress.stalled(), None);
        drop(chunks);
        assert!(body.frame().await.is_none());
        let sent = progress.sent().await;
        assert!(sent >= started + Duration::from_secs(42), "{sent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_with_no_bytes_for_the_idle_timeout_fails_as_stalled() {
        let (chunks, rx) = tokio::sync::mpsc::channel(1);
        let (request, progress) = track(streaming(rx), Some(Duration::from_secs(5)));
        let mut body = request.into_body();
        chunks.send(Bytes::from_static(b"x")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(
            error.downcast_ref::<RequestBodyStalled>().is_some(),
            "{error}"
        );
        assert_eq!(progress.stalled(), Some(Duration::from_secs(5)));
        drop(chunks);
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_body_is_sent_at_once() {
        let request = http::Request::new(crate::http::body::empty());
        let (_, progress) = track(request, Some(Duration::from_secs(5)));
        let now = Instant::now();
        assert_eq!(progress.sent().await, now);
    }
}
