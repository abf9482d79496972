//! The `Store` trait: one queue state machine, several backends.
//!
//! Designed for a shared backend: claims are atomic and hand out a lease plus a
//! fencing token; a completion from a stale token is rejected; load figures are
//! cheap to read. Every backend passes the same conformance suite
//! (`store::conformance`).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::job::{Completion, JobRecord, JobSpec, LogLine, StoredResult};

pub mod embedded;
pub mod position;
pub mod redis;
pub mod redis_conn;

#[cfg(test)]
pub mod conformance;
#[cfg(test)]
pub(crate) mod testing;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("a request with id {0} already exists")]
    Duplicate(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// The Idempotency-Key was used before for a different request (request id).
    #[error("the Idempotency-Key was already used for a different request ({0})")]
    IdempotencyMismatch(String),
    /// The first submit with this Idempotency-Key is still being stored.
    #[error("a submit with this Idempotency-Key is still being stored")]
    IdempotencyPending,
}

pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// Longest a readiness check of the store takes ([`Store::ready`]): under the 2 s
/// `timeoutSeconds` of the readiness probes the operator and the chart set.
pub const READY_TIMEOUT: Duration = Duration::from_millis(1500);

/// What a submit stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The request id: the new job's, or for a replayed Idempotency-Key the first one's.
    pub id: String,
    /// 0-indexed queue position at submit time (of the first submit when replayed).
    pub position: u64,
    /// The Idempotency-Key matched an earlier submit of the same request: nothing new was
    /// stored.
    pub replayed: bool,
}

/// A job as a worker receives it from a claim.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub record: JobRecord,
    pub body: Bytes,
    /// Fencing token: every later call about this claim must present it.
    pub token: u64,
}

/// What `status` returns: the record plus the live queue position.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub record: JobRecord,
    /// 0-indexed number of requests ahead (only while queued).
    pub queue_position: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Was queued: removed and completed as cancelled.
    Removed,
    /// Is running: the cancel flag is set and the worker that holds it is told.
    Running {
        endpoint: String,
    },
    AlreadyCompleted,
    NotFound,
}

/// State of a lease after a renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Held { cancel_requested: bool },
    Lost,
}

/// A pending webhook notification (the outbox entry).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Delivery {
    pub request_id: String,
    pub url: String,
    pub owner: String,
    /// Attempts made so far.
    pub attempts: u32,
    pub next_attempt_ms: u64,
}

/// Load figures for the autoscaler and metrics; O(1) to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub queued: u64,
    pub in_flight: u64,
    /// Submit time of the oldest queued request (unix ms), if any.
    pub oldest_queued_ms: Option<u64>,
    /// Last submit, claim, completion or sync call through a gateway (unix ms).
    pub last_activity_ms: u64,
    /// Sync calls gateways hold (cold start) or have in flight (shared store only).
    pub sync: u64,
}

/// Results of one housekeeping pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    pub start_timeouts: u64,
    pub leases_expired: u64,
    pub lost: u64,
    pub purged: u64,
    /// When, as far as the store knows after this pass, the next sweep or webhook
    /// delivery would find work (unix ms, the caller's clock): the first start
    /// deadline, lease end, end of retention or outbox entry. `None`: nothing that time
    /// alone brings due (new submits and completions bring their own). A past time when
    /// work is left over now.
    pub next_due_ms: Option<u64>,
}

impl Sweep {
    /// Whether the pass changed anything (waiters are told).
    pub fn changed(&self) -> bool {
        self.start_timeouts + self.leases_expired + self.lost + self.purged > 0
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Accepts a job. Durable when this returns.
    ///
    /// With `spec.idempotency` set, the key is stored atomically with the job and lives
    /// as long as the job is retained: a later submit with the same key and fingerprint
    /// returns the first job (`replayed`), one with a different fingerprint fails with
    /// `IdempotencyMismatch`, and one that races the first one's commit either gets the
    /// first job or `IdempotencyPending`.
    async fn submit(&self, spec: JobSpec, body: Bytes, max_queue: usize) -> StoreResult<Submitted>;

    /// The job's record and queue position, `None` for unknown (or purged) ids.
    async fn status(&self, id: &str) -> StoreResult<Option<JobStatus>>;

    /// The stored result of a completed job.
    async fn result(&self, id: &str) -> StoreResult<Option<StoredResult>>;

    /// Cancels a job (see [`CancelOutcome`]).
    async fn cancel(&self, id: &str) -> StoreResult<CancelOutcome>;

    /// Atomically takes the next runnable job, with a lease of `lease` and a new fencing
    /// token. Jobs whose start deadline passed or whose attempts are exhausted are
    /// completed on the way instead of being handed out.
    async fn claim(&self, worker: &str, lease: Duration) -> StoreResult<Option<Claimed>>;

    /// Extends a lease; tells whether cancellation was requested meanwhile.
    async fn renew(&self, id: &str, token: u64, lease: Duration) -> StoreResult<Lease>;

    /// Gives a claimed job back to the queue (drain): no attempt is charged.
    async fn release(&self, id: &str, token: u64) -> StoreResult<bool>;

    /// Gives a claimed job back to the queue to run again with its attempt still counted
    /// (the app died while running it): a job that keeps killing the app completes as
    /// failed or lost after `max_attempts` claims instead of looping.
    async fn requeue(&self, id: &str, token: u64) -> StoreResult<bool>;

    /// Writes the result once. `false` when the token is stale (the lease was lost and
    /// the job reclaimed or ended): the result is dropped.
    async fn complete(
        &self,
        id: &str,
        token: u64,
        completion: Completion,
        result: StoredResult,
    ) -> StoreResult<bool>;

    /// Attributes log lines to a running job.
    async fn append_logs(&self, id: &str, lines: Vec<LogLine>) -> StoreResult<()>;

    /// Housekeeping: start timeouts, expired leases, results past retention.
    async fn sweep(&self, now_ms: u64, retention: Duration) -> StoreResult<Sweep>;

    /// Webhook outbox entries due at `now_ms`, claimed for `lease` so another delivery
    /// loop (another replica) does not send them at the same time.
    async fn due_deliveries(
        &self,
        now_ms: u64,
        limit: usize,
        lease: Duration,
    ) -> StoreResult<Vec<Delivery>>;

    /// Records a delivery attempt: `next_attempt_ms = None` removes the entry (delivered
    /// or given up).
    async fn delivery_attempted(
        &self,
        request_id: &str,
        attempts: u32,
        next_attempt_ms: Option<u64>,
    ) -> StoreResult<()>;

    async fn load(&self) -> StoreResult<Load>;

    /// Whether a submit would be stored now: a round trip of the kind a submit makes
    /// (the embedded store: a commit through its writer; Redis: a write on every
    /// connection writes use, the scripts cached on the primary, and with
    /// `--store-replicas N` a `WAIT` that N replicas confirm). Cheap enough for a probe
    /// every few seconds (it writes one fixed key, never a new one) and answered within
    /// [`READY_TIMEOUT`]. `/readyz` is this, plus the app.
    async fn ready(&self) -> StoreResult<()>;

    /// A counter that moves whenever something changed that a waiting worker or a status
    /// stream may care about (a submit, a claim, a completion, a cancel, new logs). Keep
    /// one receiver per waiter: check, then `changed().await`, without a race.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// A counter that moves when jobs may have ended, so their webhooks may have been
    /// queued in the outbox (the webhook loop waits on it). A store may move it more
    /// often than that: by default it is [`Store::changes`].
    fn outbox_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes()
    }

    /// Ids of running jobs whose cancellation was requested, as they are requested
    /// (the worker that holds one forwards the cancel to the app).
    fn cancellations(&self) -> tokio::sync::broadcast::Receiver<String>;
}
