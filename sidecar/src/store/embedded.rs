//! The embedded store: single process, durable under a data directory.
//!
//! State lives in memory (queue order, positions, leases) and every change is written
//! to a redb file by one writer thread that commits in groups: a submit is acknowledged
//! only after the commit that holds it, but many submits share one fsync. After a crash,
//! `open` rebuilds memory from the file; jobs that were running go back to the queue
//! (their attempt stays counted, so a job that keeps crashing the process ends as lost).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot, watch};

use super::position::PositionIndex;
use super::{
    CancelOutcome, Claimed, Delivery, JobStatus, Lease, Load, Store, StoreError, StoreResult,
    Submitted, Sweep,
};
use crate::job::{
    claim_decision, now_ms, system_end, ClaimDecision, Completion, JobRecord, JobSpec, LogLine,
    Phase, Priority, StoredResult, SystemEnd,
};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
const OUTBOX: TableDefinition<&str, &[u8]> = TableDefinition::new("outbox");

/// redb's page cache. Its default (1 GiB) keeps every page the writer ever wrote in
/// memory, about 340 bytes per queued request (850 after a restart, which reads the
/// whole table): memory keeps what the queue needs, and the rare reads of a record
/// (claim, status, cancel) find the file in the OS page cache.
const CACHE_BYTES: usize = 16 << 20;

/// Log lines kept per request (older lines are dropped first).
const MAX_LOG_LINES: usize = 2000;

enum Op {
    Job(String, Vec<u8>),
    Body(String, Bytes),
    Result(String, Vec<u8>),
    Outbox(String, Vec<u8>),
    DropOutbox(String),
    /// A completed job: its request body is no longer needed.
    DropBody(String),
    /// Past retention: everything about the job goes.
    Purge(String),
}

type Ack = oneshot::Sender<Result<(), String>>;
/// One submission to the writer: ops, and who waits for their commit.
type Batch = (Vec<Op>, Option<Ack>);

/// Handle to the writer thread. Dropping it flushes what is queued and closes the file.
struct Writer {
    tx: Mutex<Option<mpsc::Sender<Batch>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(db: Arc<Database>) -> Writer {
        let (tx, rx) = mpsc::channel::<Batch>();
        let thread = std::thread::Builder::new()
            .name("fal-store-writer".into())
            .spawn(move || writer_loop(&db, rx))
            .expect("spawn store writer thread");
        Writer {
            tx: Mutex::new(Some(tx)),
            thread: Some(thread),
        }
    }

    fn push(&self, ops: Vec<Op>, ack: Option<Ack>) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send((ops, ack));
        }
    }

    /// Queues ops; the returned receiver resolves once they are committed.
    fn send(&self, ops: Vec<Op>) -> oneshot::Receiver<Result<(), String>> {
        let (ack, rx) = oneshot::channel();
        self.push(ops, Some(ack));
        rx
    }

    /// Queues ops without waiting for them (ordering with later ops is kept).
    fn send_nowait(&self, ops: Vec<Op>) {
        if !ops.is_empty() {
            self.push(ops, None);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn committed(rx: oneshot::Receiver<Result<(), String>>) -> StoreResult<()> {
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!(
            "writing the data directory failed: {e}"
        ))),
        Err(_) => Err(StoreError::Unavailable("the store writer stopped".into())),
    }
}

fn writer_loop(db: &Database, rx: mpsc::Receiver<Batch>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        // Group commit: everything that queued up while the last fsync ran.
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let outcome =
            apply(db, batch.iter().flat_map(|(ops, _)| ops.iter())).map_err(|e| e.to_string());
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "embedded store commit failed");
        }
        for (_, ack) in batch {
            if let Some(ack) = ack {
                let _ = ack.send(outcome.clone());
            }
        }
    }
}

#[allow(clippy::result_large_err)] // redb's own error type; one per commit, not per request
fn apply<'a>(db: &Database, ops: impl Iterator<Item = &'a Op>) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut jobs = txn.open_table(JOBS)?;
        let mut bodies = txn.open_table(BODIES)?;
        let mut results = txn.open_table(RESULTS)?;
        let mut outbox = txn.open_table(OUTBOX)?;
        for op in ops {
            match op {
                Op::Job(id, v) => {
                    jobs.insert(id.as_str(), v.as_slice())?;
                }
                Op::Body(id, v) => {
                    bodies.insert(id.as_str(), v.as_ref())?;
                }
                Op::Result(id, v) => {
                    results.insert(id.as_str(), v.as_slice())?;
                }
                Op::Outbox(id, v) => {
                    outbox.insert(id.as_str(), v.as_slice())?;
                }
                Op::DropOutbox(id) => {
                    outbox.remove(id.as_str())?;
                }
                Op::DropBody(id) => {
                    bodies.remove(id.as_str())?;
                }
                Op::Purge(id) => {
                    jobs.remove(id.as_str())?;
                    bodies.remove(id.as_str())?;
                    results.remove(id.as_str())?;
                    outbox.remove(id.as_str())?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// What memory keeps of a completed job whose record is committed: enough for
/// retention, cancel and webhook bookkeeping; logs and forwarded headers are read back
/// from the file when a status asks for them.
fn slim(rec: &mut JobRecord) {
    rec.logs = Vec::new();
    rec.spec.headers = Vec::new();
    rec.spec.query = None;
}

/// Stored result encoding: u32 length of a JSON head (status, headers), the head, the body.
pub(crate) fn encode_result(r: &StoredResult) -> Vec<u8> {
    let head = serde_json::to_vec(&(r.status, &r.headers)).expect("serialize result head");
    let mut out = Vec::with_capacity(4 + head.len() + r.body.len());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&r.body);
    out
}

pub(crate) fn decode_result(bytes: &[u8]) -> StoreResult<StoredResult> {
    let bad = || StoreError::Corrupt("stored result".into());
    let len = u32::from_le_bytes(
        bytes
            .get(..4)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let head = bytes.get(4..4 + len).ok_or_else(bad)?;
    let (status, headers): (u16, Vec<(String, String)>) =
        serde_json::from_slice(head).map_err(|_| bad())?;
    Ok(StoredResult {
        status,
        headers,
        body: Bytes::copy_from_slice(&bytes[4 + len..]),
    })
}

fn encode_record(r: &JobRecord) -> Vec<u8> {
    serde_json::to_vec(r).expect("serialize job record")
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, JobRecord>,
    queue: BTreeMap<(Priority, u64), String>,
    positions: PositionIndex,
    running: HashSet<String>,
    deadlines: BTreeSet<(u64, String)>,
    completed: BTreeSet<(u64, String)>,
    /// Results written but not yet committed (read from here until they are).
    fresh_results: HashMap<String, StoredResult>,
    outbox: HashMap<String, Delivery>,
    /// Submits accepted but not yet committed (they count against `max_queue`).
    pending_submits: usize,
    /// Idempotency keys of retained jobs (the durable copy is in each job's record).
    idem: HashMap<String, IdemEntry>,
    next_seq: u64,
    next_token: u64,
    last_activity_ms: u64,
}

/// The job an Idempotency-Key names.
struct IdemEntry {
    fingerprint: String,
    id: String,
    /// Queue position of the first submit; `None` while its commit is pending.
    position: Option<u64>,
}

impl Inner {
    fn enqueue(&mut self, rec: &JobRecord) {
        self.queue
            .insert((rec.spec.priority, rec.seq), rec.spec.id.clone());
        self.positions.insert(rec.spec.priority, rec.seq);
        if let Some(d) = rec.spec.start_deadline_ms {
            self.deadlines.insert((d, rec.spec.id.clone()));
        }
    }

    fn dequeue(&mut self, rec: &JobRecord) {
        self.queue.remove(&(rec.spec.priority, rec.seq));
        self.positions.remove(rec.spec.priority, rec.seq);
        if let Some(d) = rec.spec.start_deadline_ms {
            self.deadlines.remove(&(d, rec.spec.id.clone()));
        }
    }

    /// Marks a job completed in memory and returns the ops that make it durable.
    fn finish(&mut self, id: &str, completion: Completion, result: StoredResult) -> Vec<Op> {
        let Some(mut rec) = self.jobs.remove(id) else {
            return Vec::new();
        };
        match rec.phase {
            Phase::Queued => self.dequeue(&rec),
            Phase::Running => {
                self.running.remove(id);
            }
            Phase::Completed => {
                self.jobs.insert(id.to_string(), rec);
                return Vec::new();
            }
        }
        self.completed
            .insert((completion.completed_at_ms, id.to_string()));
        self.last_activity_ms = completion.completed_at_ms;
        rec.phase = Phase::Completed;
        rec.completion = Some(completion);
        let mut ops = vec![
            Op::Job(id.to_string(), encode_record(&rec)),
            Op::Result(id.to_string(), encode_result(&result)),
            Op::DropBody(id.to_string()),
        ];
        if let Some(url) = &rec.spec.webhook_url {
            let d = Delivery {
                request_id: id.to_string(),
                url: url.clone(),
                owner: rec.spec.owner.clone(),
                attempts: 0,
                next_attempt_ms: 0,
            };
            ops.push(Op::Outbox(
                id.to_string(),
                serde_json::to_vec(&d).expect("serialize delivery"),
            ));
        }
        self.fresh_results.insert(id.to_string(), result);
        self.jobs.insert(id.to_string(), rec);
        ops
    }
}

/// See the module docs.
pub struct EmbeddedStore {
    inner: Mutex<Inner>,
    db: Arc<Database>,
    writer: Writer,
    changed: watch::Sender<u64>,
    cancels: broadcast::Sender<String>,
    max_attempts: u32,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, recovering what a previous process left.
    pub fn open(dir: &Path, max_attempts: u32) -> StoreResult<Arc<EmbeddedStore>> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join("queue.redb");
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot open {}: {e} (is another fal-sidecar using this --data-dir?)",
                    path.display()
                ))
            })?;
        let db = Arc::new(db);
        let mut inner = Inner {
            next_seq: 1,
            next_token: 1,
            last_activity_ms: now_ms(),
            ..Inner::default()
        };
        let mut recovered = Vec::new();
        let map = |e: redb::Error| StoreError::Unavailable(e.to_string());
        {
            let txn = db.begin_write().map_err(|e| map(e.into()))?;
            {
                let jobs = txn.open_table(JOBS).map_err(|e| map(e.into()))?;
                txn.open_table(BODIES).map_err(|e| map(e.into()))?;
                txn.open_table(RESULTS).map_err(|e| map(e.into()))?;
                let outbox = txn.open_table(OUTBOX).map_err(|e| map(e.into()))?;
                for row in jobs.iter().map_err(|e| map(e.into()))? {
                    let (k, v) = row.map_err(|e| map(e.into()))?;
                    let mut rec: JobRecord = serde_json::from_slice(v.value())
                        .map_err(|e| StoreError::Corrupt(format!("job {}: {e}", k.value())))?;
                    inner.next_seq = inner.next_seq.max(rec.seq + 1);
                    inner.next_token = inner.next_token.max(rec.token + 1);
                    match rec.phase {
                        Phase::Completed => {
                            let at = rec.completion.as_ref().map_or(0, |c| c.completed_at_ms);
                            inner.completed.insert((at, rec.spec.id.clone()));
                            slim(&mut rec);
                        }
                        Phase::Running | Phase::Queued => {
                            if rec.phase == Phase::Running {
                                // The process died while the app ran it: run it again
                                // (the attempt stays counted).
                                rec.phase = Phase::Queued;
                                rec.logs.clear();
                                recovered.push(Op::Job(rec.spec.id.clone(), encode_record(&rec)));
                            }
                            inner.enqueue(&rec);
                        }
                    }
                    inner.jobs.insert(rec.spec.id.clone(), rec);
                }
                // Idempotency keys come back from the records that carry them; a replay
                // after a restart reports the position the job has now.
                let keyed: Vec<(String, IdemEntry)> = inner
                    .jobs
                    .values()
                    .filter_map(|rec| {
                        let i = rec.spec.idempotency.as_ref()?;
                        let position = if rec.phase == Phase::Queued {
                            inner.positions.position(rec.spec.priority, rec.seq)
                        } else {
                            0
                        };
                        Some((
                            i.key.clone(),
                            IdemEntry {
                                fingerprint: i.fingerprint.clone(),
                                id: rec.spec.id.clone(),
                                position: Some(position),
                            },
                        ))
                    })
                    .collect();
                inner.idem.extend(keyed);
                for row in outbox.iter().map_err(|e| map(e.into()))? {
                    let (k, v) = row.map_err(|e| map(e.into()))?;
                    let d: Delivery = serde_json::from_slice(v.value())
                        .map_err(|e| StoreError::Corrupt(format!("outbox {}: {e}", k.value())))?;
                    inner.outbox.insert(d.request_id.clone(), d);
                }
            }
            txn.commit().map_err(|e| map(e.into()))?;
        }
        if !recovered.is_empty() {
            tracing::warn!(
                count = recovered.len(),
                "requests that were running at the last stop are queued again"
            );
        }
        let writer = Writer::start(db.clone());
        writer.send_nowait(recovered);
        let (changed, _) = watch::channel(0);
        let (cancels, _) = broadcast::channel(1024);
        Ok(Arc::new(EmbeddedStore {
            inner: Mutex::new(inner),
            db,
            writer,
            changed,
            cancels,
            max_attempts,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn read<T>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        id: &str,
        f: impl FnOnce(&[u8]) -> T,
    ) -> StoreResult<Option<T>> {
        let map = |e: redb::Error| StoreError::Unavailable(e.to_string());
        let txn = self.db.begin_read().map_err(|e| map(e.into()))?;
        let t = txn.open_table(table).map_err(|e| map(e.into()))?;
        let v = t.get(id).map_err(|e| map(e.into()))?;
        Ok(v.map(|g| f(g.value())))
    }

    /// After the ops of `finish` committed: the result is readable from disk and the
    /// webhook may go out.
    fn after_finish(&self, ids: &[String]) {
        let mut inner = self.lock();
        for id in ids {
            inner.fresh_results.remove(id);
            if let Some(rec) = inner.jobs.get_mut(id) {
                slim(rec);
                if let Some(url) = rec.spec.webhook_url.clone() {
                    let owner = rec.spec.owner.clone();
                    inner.outbox.insert(
                        id.clone(),
                        Delivery {
                            request_id: id.clone(),
                            url,
                            owner,
                            attempts: 0,
                            next_attempt_ms: 0,
                        },
                    );
                }
            }
        }
        drop(inner);
        self.bump();
    }

    /// Ends queued jobs for the sidecar's own reasons (under the caller's lock); returns
    /// the ids actually ended and the ops that make it durable.
    fn end_queued(inner: &mut Inner, ends: Vec<(String, SystemEnd)>) -> (Vec<String>, Vec<Op>) {
        let now = now_ms();
        let mut ops = Vec::new();
        let mut ids = Vec::new();
        for (id, kind) in ends {
            let Some(rec) = inner.jobs.get(&id) else {
                continue;
            };
            if rec.phase != Phase::Queued {
                continue;
            }
            let (c, r) = system_end(kind, now, rec.attempts);
            ops.extend(inner.finish(&id, c, r));
            ids.push(id);
        }
        (ids, ops)
    }

    /// Waits for `finish` ops to commit, then publishes the results.
    async fn commit_finished(&self, ids: Vec<String>, ops: Vec<Op>) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        committed(self.writer.send(ops)).await?;
        self.after_finish(&ids);
        Ok(())
    }

    /// Puts a claimed job back in the queue; `refund` uncounts its attempt.
    async fn give_back(&self, id: &str, token: u64, refund: bool) -> StoreResult<bool> {
        let rx = {
            let mut inner = self.lock();
            let Some(mut rec) = inner.jobs.remove(id) else {
                return Ok(false);
            };
            if rec.phase != Phase::Running || rec.token != token {
                inner.jobs.insert(id.to_string(), rec);
                return Ok(false);
            }
            inner.running.remove(id);
            rec.phase = Phase::Queued;
            if refund {
                rec.attempts = rec.attempts.saturating_sub(1);
            }
            rec.logs.clear();
            inner.enqueue(&rec);
            let rx = self
                .writer
                .send(vec![Op::Job(id.to_string(), encode_record(&rec))]);
            inner.jobs.insert(id.to_string(), rec);
            rx
        };
        committed(rx).await?;
        self.bump();
        Ok(true)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn submit(&self, spec: JobSpec, body: Bytes, max_queue: usize) -> StoreResult<Submitted> {
        // A duplicate that races the first submit with its key waits for that commit
        // (a few ms) and then gets its answer; 409 only if the commit takes seconds.
        if let Some(i) = &spec.idempotency {
            let mut changes = self.changes();
            let give_up = std::time::Instant::now() + Duration::from_secs(2);
            while self
                .lock()
                .idem
                .get(&i.key)
                .is_some_and(|e| e.position.is_none() && e.fingerprint == i.fingerprint)
                && std::time::Instant::now() < give_up
            {
                let _ = tokio::time::timeout(Duration::from_millis(50), changes.changed()).await;
            }
        }
        let id = spec.id.clone();
        let (rec, rx) = {
            let mut inner = self.lock();
            if let Some(i) = &spec.idempotency {
                if let Some(e) = inner.idem.get(&i.key) {
                    if e.fingerprint != i.fingerprint {
                        return Err(StoreError::IdempotencyMismatch(e.id.clone()));
                    }
                    return match e.position {
                        Some(position) => Ok(Submitted {
                            id: e.id.clone(),
                            position,
                            replayed: true,
                        }),
                        None => Err(StoreError::IdempotencyPending),
                    };
                }
            }
            let waiting = inner.queue.len() + inner.pending_submits;
            if waiting >= max_queue {
                return Err(StoreError::QueueFull(waiting));
            }
            if inner.jobs.contains_key(&id) {
                return Err(StoreError::Duplicate(id));
            }
            inner.pending_submits += 1;
            if let Some(i) = &spec.idempotency {
                // The key goes to disk inside the job's record, in the same commit.
                inner.idem.insert(
                    i.key.clone(),
                    IdemEntry {
                        fingerprint: i.fingerprint.clone(),
                        id: id.clone(),
                        position: None,
                    },
                );
            }
            let seq = inner.next_seq;
            inner.next_seq += 1;
            let rec = JobRecord {
                spec,
                seq,
                phase: Phase::Queued,
                attempts: 0,
                token: 0,
                lease_until_ms: 0,
                started_at_ms: 0,
                cancel_requested: false,
                completion: None,
                logs: Vec::new(),
            };
            let rx = self.writer.send(vec![
                Op::Body(id.clone(), body),
                Op::Job(id.clone(), encode_record(&rec)),
            ]);
            (rec, rx)
        };
        let durable = committed(rx).await;
        let position = {
            let mut inner = self.lock();
            inner.pending_submits -= 1;
            if let Err(e) = durable {
                if let Some(i) = &rec.spec.idempotency {
                    inner.idem.remove(&i.key);
                }
                return Err(e);
            }
            inner.enqueue(&rec);
            inner.last_activity_ms = rec.spec.submitted_at_ms;
            let p = inner.positions.position(rec.spec.priority, rec.seq);
            if let Some(e) = rec
                .spec
                .idempotency
                .as_ref()
                .and_then(|i| inner.idem.get_mut(&i.key))
            {
                e.position = Some(p);
            }
            inner.jobs.insert(id.clone(), rec);
            p
        };
        self.bump();
        Ok(Submitted {
            id,
            position,
            replayed: false,
        })
    }

    async fn status(&self, id: &str) -> StoreResult<Option<JobStatus>> {
        {
            let inner = self.lock();
            let Some(rec) = inner.jobs.get(id) else {
                return Ok(None);
            };
            // Completed and committed: memory holds a slim copy, the file the whole record.
            if rec.phase != Phase::Completed || inner.fresh_results.contains_key(id) {
                return Ok(Some(JobStatus {
                    queue_position: (rec.phase == Phase::Queued)
                        .then(|| inner.positions.position(rec.spec.priority, rec.seq)),
                    record: rec.clone(),
                }));
            }
        }
        let record = self
            .read(JOBS, id, |v| serde_json::from_slice::<JobRecord>(v))?
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("job {id}: {e}")))?;
        Ok(record.map(|record| JobStatus {
            record,
            queue_position: None,
        }))
    }

    async fn result(&self, id: &str) -> StoreResult<Option<StoredResult>> {
        {
            let inner = self.lock();
            match inner.jobs.get(id) {
                Some(rec) if rec.phase == Phase::Completed => {}
                _ => return Ok(None),
            }
            if let Some(r) = inner.fresh_results.get(id) {
                return Ok(Some(r.clone()));
            }
        }
        self.read(RESULTS, id, decode_result)?.transpose()
    }

    async fn cancel(&self, id: &str) -> StoreResult<CancelOutcome> {
        let (ids, ops) = {
            let mut inner = self.lock();
            let Some(rec) = inner.jobs.get_mut(id) else {
                return Ok(CancelOutcome::NotFound);
            };
            match rec.phase {
                Phase::Completed => return Ok(CancelOutcome::AlreadyCompleted),
                Phase::Running => {
                    rec.cancel_requested = true;
                    let endpoint = rec.spec.endpoint.clone();
                    let op = Op::Job(id.to_string(), encode_record(rec));
                    self.writer.send_nowait(vec![op]);
                    drop(inner);
                    let _ = self.cancels.send(id.to_string());
                    self.bump();
                    return Ok(CancelOutcome::Running { endpoint });
                }
                Phase::Queued => {
                    Self::end_queued(&mut inner, vec![(id.to_string(), SystemEnd::Cancelled)])
                }
            }
        };
        self.commit_finished(ids, ops).await?;
        Ok(CancelOutcome::Removed)
    }

    async fn claim(&self, _worker: &str, lease: Duration) -> StoreResult<Option<Claimed>> {
        let now = now_ms();
        let mut ends = Vec::new();
        let claimed = {
            let mut inner = self.lock();
            let mut claimed = None;
            while let Some(id) = inner.queue.values().next().cloned() {
                let Some(mut rec) = inner.jobs.get(&id).cloned() else {
                    inner.queue.pop_first();
                    continue;
                };
                let decision = claim_decision(
                    rec.attempts,
                    self.max_attempts,
                    rec.spec.start_deadline_ms,
                    now,
                );
                if let ClaimDecision::End(kind) = decision {
                    // `finish` takes it out of the queue; the commit below makes it durable.
                    let (c, r) = system_end(kind, now, rec.attempts);
                    ends.push((id.clone(), inner.finish(&id, c, r)));
                    continue;
                }
                inner.dequeue(&rec);
                rec.phase = Phase::Running;
                rec.attempts += 1;
                rec.token = inner.next_token;
                inner.next_token += 1;
                rec.started_at_ms = now;
                rec.lease_until_ms = now + lease.as_millis() as u64;
                rec.logs.clear();
                inner.running.insert(id.clone());
                inner.last_activity_ms = now;
                self.writer
                    .send_nowait(vec![Op::Job(id.clone(), encode_record(&rec))]);
                inner.jobs.insert(id.clone(), rec.clone());
                claimed = Some(rec);
                break;
            }
            claimed
        };
        let ids: Vec<String> = ends.iter().map(|(id, _)| id.clone()).collect();
        self.commit_finished(ids, ends.into_iter().flat_map(|(_, ops)| ops).collect())
            .await?;
        let Some(record) = claimed else {
            return Ok(None);
        };
        self.bump();
        let body = self
            .read(BODIES, &record.spec.id, Bytes::copy_from_slice)?
            .unwrap_or_default();
        let token = record.token;
        Ok(Some(Claimed {
            record,
            body,
            token,
        }))
    }

    async fn renew(&self, id: &str, token: u64, lease: Duration) -> StoreResult<Lease> {
        let mut inner = self.lock();
        match inner.jobs.get_mut(id) {
            Some(rec) if rec.phase == Phase::Running && rec.token == token => {
                rec.lease_until_ms = now_ms() + lease.as_millis() as u64;
                Ok(Lease::Held {
                    cancel_requested: rec.cancel_requested,
                })
            }
            _ => Ok(Lease::Lost),
        }
    }

    async fn release(&self, id: &str, token: u64) -> StoreResult<bool> {
        self.give_back(id, token, true).await
    }

    async fn requeue(&self, id: &str, token: u64) -> StoreResult<bool> {
        self.give_back(id, token, false).await
    }

    async fn complete(
        &self,
        id: &str,
        token: u64,
        completion: Completion,
        result: StoredResult,
    ) -> StoreResult<bool> {
        let rx = {
            let mut inner = self.lock();
            match inner.jobs.get_mut(id) {
                Some(rec) if rec.phase == Phase::Running && rec.token == token => {}
                _ => return Ok(false),
            }
            let ops = inner.finish(id, completion, result);
            self.writer.send(ops)
        };
        committed(rx).await?;
        self.after_finish(&[id.to_string()]);
        Ok(true)
    }

    async fn append_logs(&self, id: &str, lines: Vec<LogLine>) -> StoreResult<()> {
        {
            let mut inner = self.lock();
            let Some(rec) = inner.jobs.get_mut(id) else {
                return Ok(());
            };
            if rec.phase != Phase::Running {
                return Ok(());
            }
            rec.logs.extend(lines);
            if rec.logs.len() > MAX_LOG_LINES {
                let extra = rec.logs.len() - MAX_LOG_LINES;
                rec.logs.drain(..extra);
            }
        }
        self.bump();
        Ok(())
    }

    async fn sweep(&self, now: u64, retention: Duration) -> StoreResult<Sweep> {
        let mut sweep = Sweep::default();
        let mut ends = Vec::new();
        let (ids, end_ops) = {
            let mut inner = self.lock();
            // Start deadlines that passed while queued.
            let due: Vec<String> = inner
                .deadlines
                .iter()
                .take_while(|(d, _)| *d <= now)
                .map(|(_, id)| id.clone())
                .collect();
            for id in due {
                ends.push((id, SystemEnd::StartTimeout));
                sweep.start_timeouts += 1;
            }
            // Leases that ran out: back to the queue (the attempt stays counted).
            let expired: Vec<String> = inner
                .running
                .iter()
                .filter(|id| inner.jobs.get(*id).is_some_and(|r| r.lease_until_ms < now))
                .cloned()
                .collect();
            let mut ops = Vec::new();
            for id in expired {
                let Some(mut rec) = inner.jobs.remove(&id) else {
                    continue;
                };
                inner.running.remove(&id);
                rec.phase = Phase::Queued;
                rec.logs.clear();
                inner.enqueue(&rec);
                ops.push(Op::Job(id.clone(), encode_record(&rec)));
                inner.jobs.insert(id, rec);
                sweep.leases_expired += 1;
            }
            // Results past retention (kept while a webhook for them is still pending).
            let cutoff = now.saturating_sub(retention.as_millis() as u64);
            let old: Vec<(u64, String)> = inner
                .completed
                .iter()
                .take_while(|(at, _)| *at < cutoff)
                .cloned()
                .collect();
            for (at, id) in old {
                if inner.outbox.contains_key(&id) {
                    continue;
                }
                inner.completed.remove(&(at, id.clone()));
                if let Some(i) = inner.jobs.remove(&id).and_then(|r| r.spec.idempotency) {
                    if inner.idem.get(&i.key).is_some_and(|e| e.id == id) {
                        inner.idem.remove(&i.key);
                    }
                }
                ops.push(Op::Purge(id));
                sweep.purged += 1;
            }
            if !ops.is_empty() {
                self.writer.send_nowait(ops);
            }
            Self::end_queued(&mut inner, std::mem::take(&mut ends))
        };
        self.commit_finished(ids, end_ops).await?;
        if sweep != Sweep::default() {
            self.bump();
        }
        Ok(sweep)
    }

    async fn due_deliveries(
        &self,
        now: u64,
        limit: usize,
        lease: Duration,
    ) -> StoreResult<Vec<Delivery>> {
        let mut inner = self.lock();
        let mut due: Vec<Delivery> = inner
            .outbox
            .values()
            .filter(|d| d.next_attempt_ms <= now)
            .cloned()
            .collect();
        due.sort_by_key(|d| d.next_attempt_ms);
        due.truncate(limit);
        for d in &due {
            if let Some(e) = inner.outbox.get_mut(&d.request_id) {
                e.next_attempt_ms = now + lease.as_millis() as u64;
            }
        }
        Ok(due)
    }

    async fn delivery_attempted(
        &self,
        request_id: &str,
        attempts: u32,
        next: Option<u64>,
    ) -> StoreResult<()> {
        let rx = {
            let mut inner = self.lock();
            match next {
                None => {
                    inner.outbox.remove(request_id);
                    self.writer
                        .send(vec![Op::DropOutbox(request_id.to_string())])
                }
                Some(at) => {
                    let Some(d) = inner.outbox.get_mut(request_id) else {
                        return Ok(());
                    };
                    d.attempts = attempts;
                    d.next_attempt_ms = at;
                    let bytes = serde_json::to_vec(&*d).expect("serialize delivery");
                    self.writer
                        .send(vec![Op::Outbox(request_id.to_string(), bytes)])
                }
            }
        };
        committed(rx).await
    }

    async fn load(&self) -> StoreResult<Load> {
        let inner = self.lock();
        let oldest = [Priority::Normal, Priority::Low]
            .iter()
            .filter_map(|p| inner.queue.range((*p, 0)..=(*p, u64::MAX)).next())
            .filter_map(|(_, id)| inner.jobs.get(id).map(|r| r.spec.submitted_at_ms))
            .min();
        Ok(Load {
            queued: inner.queue.len() as u64,
            in_flight: inner.running.len() as u64,
            oldest_queued_ms: oldest,
            last_activity_ms: inner.last_activity_ms,
            sync: 0,
        })
    }

    /// An empty commit through the writer thread, as a submit's would go: the thread
    /// runs and the data directory takes a write (a full disk or a read-only volume
    /// says so here, not on the next submit).
    async fn ready(&self) -> StoreResult<()> {
        match tokio::time::timeout(super::READY_TIMEOUT, committed(self.writer.send(vec![]))).await
        {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!(
                "a commit to the data directory took longer than {:?}",
                super::READY_TIMEOUT
            ))),
        }
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn cancellations(&self) -> broadcast::Receiver<String> {
        self.cancels.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_encoding_round_trips() {
        let r = StoredResult {
            status: 201,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: Bytes::from_static(b"hello"),
        };
        assert_eq!(decode_result(&encode_result(&r)).unwrap(), r);
        assert!(decode_result(b"\x05\x00").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_recovers_everything() {
        use crate::job::{app_end, LogLine};
        use crate::store::conformance::spec;
        let dir = std::env::temp_dir().join(format!("fal-reopen-{}", uuid::Uuid::new_v4()));
        let lease = Duration::from_secs(30);
        let (done, running, mut queued) = (
            spec(Priority::Normal),
            spec(Priority::Normal),
            spec(Priority::Low),
        );
        let idem = crate::job::Idempotency::new("owner", "retry-me", "/test", "", b"");
        queued.idempotency = Some(idem.clone());
        let mut done_hook = done.clone();
        done_hook.webhook_url = Some("http://127.0.0.1:9/hook".into());
        {
            let s = EmbeddedStore::open(&dir, 3).unwrap();
            s.submit(done_hook.clone(), Bytes::from_static(b"{}"), 10)
                .await
                .unwrap();
            s.submit(running.clone(), Bytes::from_static(b"{\"r\":1}"), 10)
                .await
                .unwrap();
            s.submit(queued.clone(), Bytes::new(), 10).await.unwrap();
            let c = s.claim("w", lease).await.unwrap().unwrap();
            s.append_logs(&done_hook.id, vec![LogLine::new("kept", "STDOUT")])
                .await
                .unwrap();
            let result = StoredResult {
                status: 201,
                headers: vec![],
                body: Bytes::from_static(b"ok"),
            };
            assert!(s
                .complete(&done_hook.id, c.token, app_end(201, now_ms(), 0.5), result)
                .await
                .unwrap());
            s.claim("w", lease).await.unwrap().unwrap(); // `running` is mid-flight at the "crash"
        } // dropped: the writer flushes and the file closes, as after a kill the file holds what was committed
        let s = EmbeddedStore::open(&dir, 3).unwrap();
        let st = s.status(&done_hook.id).await.unwrap().unwrap();
        assert_eq!(st.record.phase, Phase::Completed);
        assert_eq!(
            st.record.logs[0].message, "kept",
            "logs come back from the file"
        );
        assert_eq!(s.result(&done_hook.id).await.unwrap().unwrap().status, 201);
        assert_eq!(
            s.due_deliveries(now_ms(), 10, lease).await.unwrap().len(),
            1,
            "the outbox survives"
        );
        let st = s.status(&running.id).await.unwrap().unwrap();
        assert_eq!(
            (st.record.phase, st.record.attempts, st.queue_position),
            (Phase::Queued, 1, Some(0))
        );
        let again = s.claim("w", lease).await.unwrap().unwrap();
        assert_eq!(
            (again.record.spec.id.as_str(), again.body.as_ref()),
            (running.id.as_str(), &b"{\"r\":1}"[..])
        );
        assert_eq!(again.record.attempts, 2);
        assert!(again.token > 2, "tokens keep growing across restarts");
        assert_eq!(
            s.status(&queued.id).await.unwrap().unwrap().queue_position,
            Some(0)
        );
        let mut retry = spec(Priority::Low);
        retry.idempotency = Some(idem);
        let replay = s.submit(retry, Bytes::new(), 10).await.unwrap();
        assert_eq!(
            (replay.id.as_str(), replay.replayed),
            (queued.id.as_str(), true),
            "idempotency keys survive a restart"
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    crate::conformance_tests!(|dir: std::path::PathBuf| async move {
        EmbeddedStore::open(&dir, 3).unwrap() as std::sync::Arc<dyn Store>
    });
}
