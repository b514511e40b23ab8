//! Bodies the proxy passes on: boxed so buffered and streamed ones share a
//! type, and counted so the record knows how much went through once a
//! streamed body ends.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Body, Frame, SizeHint};

/// Any error a body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What the proxy sends either way.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body held in memory.
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

/// Called once with the bytes that went through and whether the body ended
/// normally (false: an error, a limit, or the reader went away).
pub type OnDone = Box<dyn FnOnce(u64, bool) + Send>;

/// Counts the bytes of a streamed body and reports when it ends.
pub struct Counted {
    inner: ProxyBody,
    bytes: u64,
    on_done: Option<OnDone>,
}

impl Counted {
    /// Wraps `inner`; `on_done` runs when it ends or is dropped.
    pub fn new(inner: ProxyBody, on_done: OnDone) -> Self {
        Self { inner, bytes: 0, on_done: Some(on_done) }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(on_done) = self.on_done.take() {
            on_done(self.bytes, complete);
        }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

/// A request body held back until the upstream says it wants it (`100
/// Continue`), or dropped with an error when the upstream answers without
/// wanting it: what the client sends is never read before the upstream decides.
pub struct Gated {
    inner: ProxyBody,
    gate: Option<tokio::sync::oneshot::Receiver<bool>>,
    /// As clients do: an upstream that says nothing for this long gets the body.
    patience: Pin<Box<tokio::time::Sleep>>,
}

/// How long the upstream has to answer `Expect: 100-continue` before the
/// body is sent anyway (curl waits as long).
const CONTINUE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

impl Gated {
    /// Holds `inner` back until `gate` says true (send it) or false, or is
    /// dropped (abandon it), or the upstream has said nothing for a second.
    pub fn new(inner: ProxyBody, gate: tokio::sync::oneshot::Receiver<bool>) -> Self {
        Self { inner, gate: Some(gate), patience: Box::pin(tokio::time::sleep(CONTINUE_PATIENCE)) }
    }
}

impl Body for Gated {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(gate) = this.gate.as_mut() {
            match std::future::Future::poll(Pin::new(gate), cx) {
                Poll::Pending if this.patience.as_mut().poll(cx).is_ready() => this.gate = None,
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(true)) => this.gate = None,
                Poll::Ready(_) => {
                    this.gate = None;
                    return Poll::Ready(Some(Err("the upstream answered without asking for the body".into())));
                }
            }
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn a_streamed_body_reports_its_size_once_when_it_ends() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let body = Counted::new(
            full(Bytes::from_static(b"hello world")),
            Box::new(move |bytes, complete| record.lock().expect("lock").push((bytes, complete))),
        );
        let collected = body.collect().await.expect("collects").to_bytes();
        assert_eq!(&collected[..], b"hello world");
        assert_eq!(*seen.lock().expect("lock"), vec![(11, true)]);
    }
}
