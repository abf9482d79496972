//! Test doubles of the store shared by several modules' tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use crate::job::{Completion, JobSpec, LogLine, StoredResult};
use crate::store::embedded::EmbeddedStore;
use crate::store::{
    CancelOutcome, Claimed, Delivery, JobStatus, Lease, Load, Store, StoreError, StoreResult,
    Submitted, Sweep,
};

#[derive(Clone, Copy)]
pub(crate) enum Renew {
    Ok,
    /// The store answers Unavailable (connection refused).
    Fail,
    /// The store never answers (a partition; the real store times out after 5 s).
    Hang,
}

/// The embedded store, with renewals that fail or hang on demand, counting its outbox
/// reads.
pub(crate) struct FlakyStore {
    pub(crate) inner: Arc<EmbeddedStore>,
    pub(crate) renew: Mutex<Renew>,
    /// Calls of `due_deliveries`.
    pub(crate) outbox_reads: AtomicUsize,
}

impl FlakyStore {
    /// Over a fresh embedded store in a temp dir.
    pub(crate) fn new(renew: Renew) -> FlakyStore {
        let dir = std::env::temp_dir().join(format!("fal-flaky-{}", uuid::Uuid::new_v4()));
        FlakyStore {
            inner: EmbeddedStore::open(&dir, 3).expect("open the embedded store"),
            renew: Mutex::new(renew),
            outbox_reads: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Store for FlakyStore {
    async fn submit(&self, spec: JobSpec, body: Bytes, max_queue: usize) -> StoreResult<Submitted> {
        self.inner.submit(spec, body, max_queue).await
    }
    async fn status(&self, id: &str) -> StoreResult<Option<JobStatus>> {
        self.inner.status(id).await
    }
    async fn result(&self, id: &str) -> StoreResult<Option<StoredResult>> {
        self.inner.result(id).await
    }
    async fn cancel(&self, id: &str) -> StoreResult<CancelOutcome> {
        self.inner.cancel(id).await
    }
    async fn claim(&self, worker: &str, lease: Duration) -> StoreResult<Option<Claimed>> {
        self.inner.claim(worker, lease).await
    }
    async fn renew(&self, id: &str, token: u64, lease: Duration) -> StoreResult<Lease> {
        let mode = *self.renew.lock().unwrap();
        match mode {
            Renew::Ok => self.inner.renew(id, token, lease).await,
            Renew::Fail => Err(StoreError::Unavailable("connection refused".into())),
            Renew::Hang => std::future::pending().await,
        }
    }
    async fn release(&self, id: &str, token: u64) -> StoreResult<bool> {
        self.inner.release(id, token).await
    }
    async fn requeue(&self, id: &str, token: u64) -> StoreResult<bool> {
        self.inner.requeue(id, token).await
    }
    async fn complete(
        &self,
        id: &str,
        token: u64,
        completion: Completion,
        result: StoredResult,
    ) -> StoreResult<bool> {
        self.inner.complete(id, token, completion, result).await
    }
    async fn append_logs(&self, id: &str, lines: Vec<LogLine>) -> StoreResult<()> {
        self.inner.append_logs(id, lines).await
    }
    async fn ready(&self) -> StoreResult<()> {
        self.inner.ready().await
    }
    async fn sweep(&self, now_ms: u64, retention: Duration) -> StoreResult<Sweep> {
        self.inner.sweep(now_ms, retention).await
    }
    async fn due_deliveries(
        &self,
        now_ms: u64,
        limit: usize,
        lease: Duration,
    ) -> StoreResult<Vec<Delivery>> {
        self.outbox_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.due_deliveries(now_ms, limit, lease).await
    }
    async fn delivery_attempted(
        &self,
        request_id: &str,
        attempts: u32,
        next_attempt_ms: Option<u64>,
    ) -> StoreResult<()> {
        self.inner
            .delivery_attempted(request_id, attempts, next_attempt_ms)
            .await
    }
    async fn load(&self) -> StoreResult<Load> {
        self.inner.load().await
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes()
    }
    fn outbox_changes(&self) -> watch::Receiver<u64> {
        self.inner.outbox_changes()
    }
    fn cancellations(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.inner.cancellations()
    }
}
