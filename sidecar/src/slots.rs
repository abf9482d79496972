//! The replica's call slots: `--max-concurrency` of them, shared by the queue workers,
//! direct calls and WebSockets, so the app never has more calls at once than it said it
//! can take (one model in GPU memory: one call).
//!
//! A queue worker waits for a slot before it claims; a direct call or a WebSocket that
//! finds none is answered at once with 503, `Retry-After: 1` and `X-Fal-Replica: full`
//! — never queued inside the pod. A gateway reads that header as "this replica has no
//! free slot": it tries another replica or holds the call; it never returns it to the
//! client. `X-Fal-Replica: restarting` says the same of an app that is restarting. Both
//! mean the call never reached the app, so sending it again runs it once.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::upstream::{Body, BoxError};

/// The header of a 503 that says the call did not reach the app (`full`, `restarting`).
pub const REPLICA_HEADER: &str = "x-fal-replica";

/// `--max-concurrency` slots.
pub struct Slots {
    sem: Arc<Semaphore>,
    max: usize,
}

/// A slot, given back when dropped.
pub type Slot = OwnedSemaphorePermit;

impl Slots {
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            sem: Arc::new(Semaphore::new(max)),
            max,
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        self.max - self.sem.available_permits()
    }

    /// A free slot now, or `None`.
    pub fn try_take(&self) -> Option<Slot> {
        self.sem.clone().try_acquire_owned().ok()
    }

    /// Waits for a free slot.
    pub async fn take(&self) -> Slot {
        self.sem
            .clone()
            .acquire_owned()
            .await
            .expect("the slots' semaphore is never closed")
    }

    /// The answer to a call that found every slot taken.
    pub fn full(&self, what: &str) -> Response<Body> {
        let detail = format!(
            "this replica is running {} calls, its maxConcurrency: the {what} did not reach the app; retry shortly (a gateway sends it to another replica)",
            self.max
        );
        let mut r = crate::api::error(
            StatusCode::SERVICE_UNAVAILABLE,
            &detail,
            Some("runner_scheduling_failure"),
        );
        let h = r.headers_mut();
        h.insert("retry-after", HeaderValue::from_static("1"));
        h.insert(REPLICA_HEADER, HeaderValue::from_static("full"));
        r
    }
}

/// Whether a response says the call never reached the app (see the module docs).
pub fn not_run<B>(r: &Response<B>) -> bool {
    r.status() == StatusCode::SERVICE_UNAVAILABLE && r.headers().contains_key(REPLICA_HEADER)
}

/// A response body that keeps `hold` (a slot, a gateway's slot guard) until it is fully
/// sent or dropped.
pub struct Holding<H> {
    inner: Body,
    _hold: H,
}

impl Holding<Slot> {
    /// `resp` with its body holding a call slot: a streamed answer (the common case)
    /// holds it with no allocation.
    pub fn wrap_slot(resp: Response<Body>, slot: Slot) -> Response<Body> {
        let (parts, body) = resp.into_parts();
        let body = match body {
            Body::Incoming(b) => Body::Held(b, slot),
            other => return Holding::wrap(Response::from_parts(parts, other), slot),
        };
        Response::from_parts(parts, body)
    }
}

impl<H: Send + Unpin + 'static> Holding<H> {
    /// `resp` with its body holding `hold`.
    pub fn wrap(resp: Response<Body>, hold: H) -> Response<Body> {
        let (parts, inner) = resp.into_parts();
        let body = Holding { inner, _hold: hold };
        Response::from_parts(
            parts,
            Body::Boxed(http_body_util::BodyExt::boxed_unsync(body)),
        )
    }
}

impl<H: Unpin> HttpBody for Holding<H> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
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

    #[tokio::test]
    async fn slots_are_shared_and_given_back() {
        let s = Slots::new(2);
        let a = s.try_take().expect("first");
        let _b = s.take().await;
        assert!(s.try_take().is_none(), "two of two taken");
        assert_eq!(s.in_use(), 2);
        let r = s.full("call");
        assert!(not_run(&r));
        assert_eq!(r.headers()["retry-after"], "1");
        drop(a);
        assert!(s.try_take().is_some(), "given back on drop");
    }

    #[tokio::test]
    async fn a_held_body_keeps_its_slot_until_dropped() {
        let s = Slots::new(1);
        let resp = Holding::wrap(Response::new(Body::full("x")), s.try_take().unwrap());
        assert!(s.try_take().is_none());
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&bytes[..], b"x");
        assert!(s.try_take().is_some(), "the body ended: the slot is free");
    }
}
