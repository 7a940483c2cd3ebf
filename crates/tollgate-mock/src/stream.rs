//! A cheap, pre-rendered SSE body: `head` frames, then `content` frames
//! (cycling over `per_token`), then `tail` frames, with an optional delay
//! between frames and an optional abrupt cut after some content frames.
//!
//! All frames are rendered once per request; emitting a content frame is a
//! reference-count bump on a shared [`Bytes`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

pub(crate) struct SseFrames {
    head: Vec<Bytes>,
    per_token: Vec<Bytes>,
    /// Number of content frames (tokens × choices).
    content_total: u64,
    tail: Vec<Bytes>,
    /// Cut the connection after this many content frames.
    cut_after: Option<u64>,
    /// Frames emitted so far.
    pos: u64,
    done: bool,
    timer: Option<Timer>,
    /// Grace period before the cut (see [`CUT_GRACE`]); created lazily.
    cut_grace: Option<Pin<Box<Sleep>>>,
}

/// hyper drops buffered-but-unflushed response bytes when a body stream
/// fails, so before failing the stream pauses briefly to let everything
/// already emitted reach the socket. Only paid on the failure path.
const CUT_GRACE: Duration = Duration::from_millis(10);

struct Timer {
    interval: Duration,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl SseFrames {
    pub(crate) fn new(
        head: Vec<Bytes>,
        per_token: Vec<Bytes>,
        tokens: u64,
        tail: Vec<Bytes>,
        cut_after: Option<u64>,
        interval: Duration,
    ) -> Self {
        let content_total = tokens.saturating_mul(per_token.len() as u64);
        let timer = (!interval.is_zero()).then(|| Timer {
            interval,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: false,
        });
        Self {
            head,
            per_token,
            content_total,
            tail,
            cut_after: cut_after.map(|k| k.min(content_total)),
            pos: 0,
            done: false,
            timer,
            cut_grace: None,
        }
    }

    /// A body emitting `data`, then failing (connection cut).
    pub(crate) fn truncated(data: Bytes) -> Self {
        Self::new(
            vec![data],
            Vec::new(),
            0,
            Vec::new(),
            Some(0),
            Duration::ZERO,
        )
    }

    /// Wraps the frames in a `200 text/event-stream` response.
    pub(crate) fn into_response(self, request_id_header: &'static str, id: &str) -> Response {
        let mut resp = (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "text/event-stream"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            Body::from_stream(self),
        )
            .into_response();
        crate::common::insert_request_id(&mut resp, request_id_header, id);
        resp
    }

    fn head_len(&self) -> u64 {
        self.head.len() as u64
    }

    /// Total frames (or frames before the cut).
    fn end(&self) -> u64 {
        let content = self.cut_after.unwrap_or(self.content_total);
        let tail = if self.cut_after.is_some() {
            0
        } else {
            self.tail.len() as u64
        };
        self.head_len().saturating_add(content).saturating_add(tail)
    }

    /// Whether the next frame is the cut.
    fn at_cut(&self) -> bool {
        self.cut_after
            .is_some_and(|k| self.pos >= self.head_len() && self.pos - self.head_len() >= k)
    }

    fn next_frame(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        let head_len = self.head_len();
        if self.pos < head_len {
            let frame = self
                .head
                .get_mut(self.pos as usize)
                .map(std::mem::take)
                .unwrap_or_default();
            self.pos += 1;
            return Some(Ok(frame));
        }
        let c = self.pos - head_len;
        if let Some(k) = self.cut_after
            && c >= k
        {
            self.done = true;
            return Some(Err(std::io::Error::other(
                "tollgate-mock: fail_after_chunks (connection cut)",
            )));
        }
        if c < self.content_total {
            let n = self.per_token.len() as u64;
            let idx = c.checked_rem(n).unwrap_or(0) as usize;
            let frame = self.per_token.get(idx).cloned().unwrap_or_default();
            self.pos += 1;
            return Some(Ok(frame));
        }
        let t = (c - self.content_total) as usize;
        match self.tail.get_mut(t) {
            Some(frame) => {
                let frame = std::mem::take(frame);
                self.pos += 1;
                Some(Ok(frame))
            }
            None => {
                self.done = true;
                None
            }
        }
    }
}

impl Stream for SseFrames {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(timer) = this.timer.as_mut()
            && timer.armed
        {
            ready!(timer.sleep.as_mut().poll(cx));
            timer.armed = false;
        }
        if this.at_cut() {
            let grace = this
                .cut_grace
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(CUT_GRACE)));
            ready!(grace.as_mut().poll(cx));
        }
        let item = this.next_frame();
        if matches!(item, Some(Ok(_))) {
            let more = this.pos < this.end() || this.cut_after.is_some();
            if more && let Some(timer) = this.timer.as_mut() {
                let now = Instant::now();
                let deadline = now.checked_add(timer.interval).unwrap_or(now);
                timer.sleep.as_mut().reset(deadline);
                timer.armed = true;
            }
        } else if item.is_none() {
            this.done = true;
        }
        Poll::Ready(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let remaining = self.end().saturating_sub(self.pos);
        let r = usize::try_from(remaining).unwrap_or(usize::MAX);
        (r, Some(r.saturating_add(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[tokio::test]
    async fn frames_in_order() {
        let s = SseFrames::new(
            vec![b("h")],
            vec![b("a"), b("b")],
            2,
            vec![b("t")],
            None,
            Duration::ZERO,
        );
        let out: Vec<_> = s.collect().await;
        let out: Vec<Bytes> = out.into_iter().filter_map(Result::ok).collect();
        assert_eq!(out, vec![b("h"), b("a"), b("b"), b("a"), b("b"), b("t")]);
    }

    #[tokio::test]
    async fn cut_after_content_frames() {
        let s = SseFrames::new(
            vec![b("h")],
            vec![b("a")],
            5,
            vec![b("t")],
            Some(2),
            Duration::ZERO,
        );
        let out: Vec<_> = s.collect().await;
        assert_eq!(out.len(), 4);
        assert!(out.iter().take(3).all(Result::is_ok));
        assert!(out.last().is_some_and(Result::is_err));
    }

    #[tokio::test]
    async fn cut_is_capped_by_content_len() {
        let s = SseFrames::new(
            vec![],
            vec![b("a")],
            1,
            vec![b("t")],
            Some(10),
            Duration::ZERO,
        );
        let out: Vec<_> = s.collect().await;
        assert_eq!(out.len(), 2);
        assert!(out.first().is_some_and(Result::is_ok));
        assert!(out.last().is_some_and(Result::is_err));
    }

    #[tokio::test]
    async fn interval_between_frames() {
        let start = std::time::Instant::now();
        let s = SseFrames::new(
            vec![b("h")],
            vec![b("a")],
            3,
            vec![b("t")],
            None,
            Duration::from_millis(10),
        );
        let out: Vec<_> = s.collect().await;
        assert_eq!(out.len(), 5);
        // 4 gaps between 5 frames, no trailing delay.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(40), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1000), "{elapsed:?}");
    }
}
