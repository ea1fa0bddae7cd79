//! The deterministic byte pattern `/bytes/N` streams (byte i = i mod 251) as an
//! `http_body::Body` that produces one chunk per poll without holding the whole body.
//!
//! Pure: no I/O. Chunks are zero-copy slices of one precomputed buffer.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// The pattern's period: a prime, so the pattern never lines up with power-of-two
/// chunk or frame sizes and a misplaced chunk is detected.
const PERIOD: u64 = 251;

/// The byte at offset `index` of every `/bytes/N` body.
pub fn pattern_byte(index: u64) -> u8 {
    // The remainder is below 251, so the cast cannot truncate.
    (index % PERIOD) as u8
}

/// `len` pattern bytes, sent `chunk` bytes at a time.
#[derive(Debug)]
pub(crate) struct PatternBody {
    /// `chunk + PERIOD` pattern bytes starting at offset 0: any chunk, wherever it
    /// starts, is a slice of this buffer.
    window: Bytes,
    chunk: usize,
    offset: u64,
    remaining: u64,
}

impl PatternBody {
    /// `chunk` must be at least 1; callers validate it (the route answers 400).
    pub(crate) fn new(len: u64, chunk: usize) -> Self {
        let chunk = chunk.max(1);
        let window_len = chunk as u64 + PERIOD;
        let window: Bytes = (0..window_len)
            .map(pattern_byte)
            .collect::<Vec<u8>>()
            .into();
        Self {
            window,
            chunk,
            offset: 0,
            remaining: len,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(this.remaining).map_or(this.chunk, |r| r.min(this.chunk));
        // Below PERIOD, so it fits in usize.
        let start = (this.offset % PERIOD) as usize;
        let data = this.window.slice(start..start + len);
        this.offset += len as u64;
        this.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn chunks_follow_the_pattern_across_boundaries() {
        let mut body = PatternBody::new(1000, 300);
        let mut sizes = Vec::new();
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame;
            if let Ok(data) = frame.into_data() {
                sizes.push(data.len());
                all.extend_from_slice(&data);
            }
        }
        assert_eq!(sizes, vec![300, 300, 300, 100]);
        let expected: Vec<u8> = (0..1000).map(pattern_byte).collect();
        assert_eq!(all, expected);
        assert_eq!(all[251], 0);
        assert_eq!(all[250], 250);
    }

    #[test]
    fn empty_body_is_at_end() {
        let body = PatternBody::new(0, 64);
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }
}
