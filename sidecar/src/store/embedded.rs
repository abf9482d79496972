//! The embedded store: single process, durable under a data directory.
//!
//! State lives in memory (queue order, positions, leases) and every change is written
//! to a redb file by one writer thread that commits in groups: a submit is acknowledged
//! only after the commit that holds it, but many submits share one fsync. After a crash,
//! `open` rebuilds memory from the file; jobs that were running go back to the queue
//! (their attempt stays counted, so a job that keeps crashing the process ends as lost).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot, watch};

use super::position::Queue;
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

fn unavailable(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(e.into().to_string())
}

/// The committed record of a job.
fn read_record(db: &Database, id: &str) -> StoreResult<Option<JobRecord>> {
    let txn = db.begin_read().map_err(unavailable)?;
    let t = txn.open_table(JOBS).map_err(unavailable)?;
    let Some(v) = t.get(id).map_err(unavailable)? else {
        return Ok(None);
    };
    serde_json::from_slice(v.value())
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("job {id}: {e}")))
}

/// A request id as memory keeps it: the 16 bytes of a UUID in its canonical form (every
/// id the API makes), any other string as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum JobKey {
    Uuid([u8; 16]),
    Other(Box<str>),
}

impl JobKey {
    fn new(id: &str) -> JobKey {
        if id.len() == uuid::fmt::Hyphenated::LENGTH {
            if let Ok(u) = uuid::Uuid::try_parse(id) {
                let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
                if u.hyphenated().encode_lower(&mut buf) == id {
                    return JobKey::Uuid(*u.as_bytes());
                }
            }
        }
        JobKey::Other(id.into())
    }

    fn id(&self) -> String {
        match self {
            JobKey::Uuid(b) => uuid::Uuid::from_bytes(*b).hyphenated().to_string(),
            JobKey::Other(s) => s.to_string(),
        }
    }
}

/// What memory keeps of one job.
enum Entry {
    /// Queued and never claimed since it was committed: the file holds its record as it
    /// is; memory only where it waits (and its submit time, for `load`).
    Waiting {
        priority: Priority,
        seq: u64,
        submitted_at_ms: u64,
    },
    /// Completed, committed and published: the file holds the record and the result
    /// (`completed` has its completion time).
    Done {
        /// It carries an Idempotency-Key (to drop from `idem` when purged).
        keyed: bool,
    },
    /// Running, completed but not committed yet, or queued again after a claim: the
    /// whole record (about as many as run at once).
    Full(Box<JobRecord>),
}

impl Entry {
    fn phase(&self) -> Phase {
        match self {
            Entry::Waiting { .. } => Phase::Queued,
            Entry::Done { .. } => Phase::Completed,
            Entry::Full(r) => r.phase,
        }
    }
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<JobKey, Entry>,
    queue: Queue<JobKey>,
    running: HashSet<JobKey>,
    deadlines: BTreeSet<(u64, JobKey)>,
    completed: BTreeSet<(u64, JobKey)>,
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
    fn enqueue(&mut self, key: &JobKey, priority: Priority, seq: u64, deadline: Option<u64>) {
        self.queue.insert(priority, seq, key.clone());
        if let Some(d) = deadline {
            self.deadlines.insert((d, key.clone()));
        }
    }

    fn dequeue(&mut self, key: &JobKey, rec: &JobRecord) {
        self.queue.remove(rec.spec.priority, rec.seq);
        if let Some(d) = rec.spec.start_deadline_ms {
            self.deadlines.remove(&(d, key.clone()));
        }
    }

    /// The whole record of a job that is queued or running (a waiting one's from the
    /// file), taken out of `jobs` when memory held it: put it back (or `finish` it).
    /// `None` for unknown and completed jobs.
    fn take(&mut self, db: &Database, key: &JobKey) -> StoreResult<Option<JobRecord>> {
        match self.jobs.get(key) {
            Some(Entry::Waiting { .. }) => read_record(db, &key.id())?.map(Some).ok_or_else(|| {
                StoreError::Corrupt(format!("queued job {} is not in the file", key.id()))
            }),
            Some(Entry::Full(r)) if r.phase != Phase::Completed => match self.jobs.remove(key) {
                Some(Entry::Full(r)) => Ok(Some(*r)),
                _ => unreachable!("checked above"),
            },
            _ => Ok(None),
        }
    }

    /// Marks a job completed in memory and returns the ops that make it durable. `rec`
    /// is its whole record as `take` gave it.
    fn finish(
        &mut self,
        key: &JobKey,
        mut rec: JobRecord,
        completion: Completion,
        result: StoredResult,
    ) -> Vec<Op> {
        match rec.phase {
            Phase::Queued => self.dequeue(key, &rec),
            Phase::Running => {
                self.running.remove(key);
            }
            Phase::Completed => {
                self.jobs.insert(key.clone(), Entry::Full(Box::new(rec)));
                return Vec::new();
            }
        }
        let id = &rec.spec.id;
        self.completed
            .insert((completion.completed_at_ms, key.clone()));
        self.last_activity_ms = completion.completed_at_ms;
        rec.phase = Phase::Completed;
        rec.completion = Some(completion);
        let mut ops = vec![
            Op::Job(id.clone(), encode_record(&rec)),
            Op::Result(id.clone(), encode_result(&result)),
            Op::DropBody(id.clone()),
        ];
        if let Some(url) = &rec.spec.webhook_url {
            let d = Delivery {
                request_id: id.clone(),
                url: url.clone(),
                owner: rec.spec.owner.clone(),
                attempts: 0,
                next_attempt_ms: 0,
            };
            ops.push(Op::Outbox(
                id.clone(),
                serde_json::to_vec(&d).expect("serialize delivery"),
            ));
        }
        self.fresh_results.insert(id.clone(), result);
        self.jobs.insert(key.clone(), Entry::Full(Box::new(rec)));
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
        {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let jobs = txn.open_table(JOBS).map_err(unavailable)?;
                txn.open_table(BODIES).map_err(unavailable)?;
                txn.open_table(RESULTS).map_err(unavailable)?;
                let outbox = txn.open_table(OUTBOX).map_err(unavailable)?;
                // Idempotency keys come back from the records that carry them; a replay
                // after a restart reports the position the job has now.
                let mut keyed: Vec<(String, IdemEntry)> = Vec::new();
                for row in jobs.iter().map_err(unavailable)? {
                    let (k, v) = row.map_err(unavailable)?;
                    let mut rec: JobRecord = serde_json::from_slice(v.value())
                        .map_err(|e| StoreError::Corrupt(format!("job {}: {e}", k.value())))?;
                    inner.next_seq = inner.next_seq.max(rec.seq + 1);
                    inner.next_token = inner.next_token.max(rec.token + 1);
                    let key = JobKey::new(&rec.spec.id);
                    if let Some(i) = &rec.spec.idempotency {
                        keyed.push((
                            i.key.clone(),
                            IdemEntry {
                                fingerprint: i.fingerprint.clone(),
                                id: rec.spec.id.clone(),
                                position: Some(0),
                            },
                        ));
                    }
                    let entry = match rec.phase {
                        Phase::Completed => {
                            let at = rec.completion.as_ref().map_or(0, |c| c.completed_at_ms);
                            inner.completed.insert((at, key.clone()));
                            Entry::Done {
                                keyed: rec.spec.idempotency.is_some(),
                            }
                        }
                        Phase::Queued => {
                            inner.enqueue(
                                &key,
                                rec.spec.priority,
                                rec.seq,
                                rec.spec.start_deadline_ms,
                            );
                            Entry::Waiting {
                                priority: rec.spec.priority,
                                seq: rec.seq,
                                submitted_at_ms: rec.spec.submitted_at_ms,
                            }
                        }
                        Phase::Running => {
                            // The process died while the app ran it: run it again (the
                            // attempt stays counted). Memory keeps it whole until the
                            // file holds it as queued.
                            rec.phase = Phase::Queued;
                            rec.logs.clear();
                            recovered.push(Op::Job(rec.spec.id.clone(), encode_record(&rec)));
                            inner.enqueue(
                                &key,
                                rec.spec.priority,
                                rec.seq,
                                rec.spec.start_deadline_ms,
                            );
                            Entry::Full(Box::new(rec))
                        }
                    };
                    inner.jobs.insert(key, entry);
                }
                for (k, mut e) in keyed {
                    e.position = match inner.jobs.get(&JobKey::new(&e.id)) {
                        Some(Entry::Waiting { priority, seq, .. }) => {
                            Some(inner.queue.position(*priority, *seq))
                        }
                        Some(Entry::Full(rec)) if rec.phase == Phase::Queued => {
                            Some(inner.queue.position(rec.spec.priority, rec.seq))
                        }
                        _ => Some(0),
                    };
                    inner.idem.insert(k, e);
                }
                for row in outbox.iter().map_err(unavailable)? {
                    let (k, v) = row.map_err(unavailable)?;
                    let d: Delivery = serde_json::from_slice(v.value())
                        .map_err(|e| StoreError::Corrupt(format!("outbox {}: {e}", k.value())))?;
                    inner.outbox.insert(d.request_id.clone(), d);
                }
            }
            txn.commit().map_err(unavailable)?;
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
        let txn = self.db.begin_read().map_err(unavailable)?;
        let t = txn.open_table(table).map_err(unavailable)?;
        let v = t.get(id).map_err(unavailable)?;
        Ok(v.map(|g| f(g.value())))
    }

    /// After the ops of `finish` committed: the result is readable from disk and the
    /// webhook may go out; memory keeps only what retention needs.
    fn after_finish(&self, keys: &[JobKey]) {
        let mut inner = self.lock();
        for key in keys {
            let id = key.id();
            // Even when retention purged it meanwhile: the file holds the result now.
            inner.fresh_results.remove(&id);
            let rec = match inner.jobs.get(key) {
                Some(Entry::Full(r)) if r.phase == Phase::Completed => r,
                _ => continue,
            };
            let delivery = rec.spec.webhook_url.clone().map(|url| Delivery {
                request_id: id.clone(),
                url,
                owner: rec.spec.owner.clone(),
                attempts: 0,
                next_attempt_ms: 0,
            });
            let done = Entry::Done {
                keyed: rec.spec.idempotency.is_some(),
            };
            inner.jobs.insert(key.clone(), done);
            if let Some(d) = delivery {
                inner.outbox.insert(id, d);
            }
        }
        drop(inner);
        self.bump();
    }

    /// Ends queued jobs for the sidecar's own reasons (under the caller's lock); returns
    /// the jobs actually ended and the ops that make it durable, and the first error
    /// (reading a waiting job's record) if there was one (the others still end).
    fn end_queued(
        &self,
        inner: &mut Inner,
        ends: Vec<(JobKey, SystemEnd)>,
    ) -> (Vec<JobKey>, Vec<Op>, Option<StoreError>) {
        let now = now_ms();
        let mut ops = Vec::new();
        let mut keys = Vec::new();
        let mut err = None;
        for (key, kind) in ends {
            if inner.jobs.get(&key).map(Entry::phase) != Some(Phase::Queued) {
                continue;
            }
            let rec = match inner.take(&self.db, &key) {
                Ok(Some(rec)) => rec,
                Ok(None) => continue,
                Err(e) => {
                    err.get_or_insert(e);
                    continue;
                }
            };
            let (c, r) = system_end(kind, now, rec.attempts);
            ops.extend(inner.finish(&key, rec, c, r));
            keys.push(key);
        }
        (keys, ops, err)
    }

    /// Waits for `finish` ops to commit, then publishes the results.
    async fn commit_finished(&self, keys: Vec<JobKey>, ops: Vec<Op>) -> StoreResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        committed(self.writer.send(ops)).await?;
        self.after_finish(&keys);
        Ok(())
    }

    /// Puts a claimed job back in the queue; `refund` uncounts its attempt.
    async fn give_back(&self, id: &str, token: u64, refund: bool) -> StoreResult<bool> {
        let key = JobKey::new(id);
        let rx = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            let rec = match inner.jobs.get_mut(&key) {
                Some(Entry::Full(rec)) if rec.phase == Phase::Running && rec.token == token => rec,
                _ => return Ok(false),
            };
            inner.running.remove(&key);
            rec.phase = Phase::Queued;
            if refund {
                rec.attempts = rec.attempts.saturating_sub(1);
            }
            rec.logs.clear();
            let (priority, seq, deadline) =
                (rec.spec.priority, rec.seq, rec.spec.start_deadline_ms);
            let rx = self
                .writer
                .send(vec![Op::Job(id.to_string(), encode_record(rec))]);
            inner.enqueue(&key, priority, seq, deadline);
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
        let key = JobKey::new(&id);
        let (priority, deadline, submitted_at_ms) =
            (spec.priority, spec.start_deadline_ms, spec.submitted_at_ms);
        let idem_key = spec.idempotency.as_ref().map(|i| i.key.clone());
        let (seq, rx) = {
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
            if inner.jobs.contains_key(&key) {
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
            (seq, rx)
        };
        let durable = committed(rx).await;
        let position = {
            let mut inner = self.lock();
            inner.pending_submits -= 1;
            if let Err(e) = durable {
                if let Some(k) = &idem_key {
                    inner.idem.remove(k);
                }
                return Err(e);
            }
            // Committed: from here on the file holds the record; memory keeps its place.
            inner.enqueue(&key, priority, seq, deadline);
            inner.last_activity_ms = submitted_at_ms;
            let p = inner.queue.position(priority, seq);
            if let Some(e) = idem_key.as_ref().and_then(|k| inner.idem.get_mut(k)) {
                e.position = Some(p);
            }
            inner.jobs.insert(
                key,
                Entry::Waiting {
                    priority,
                    seq,
                    submitted_at_ms,
                },
            );
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
        let key = JobKey::new(id);
        let queue_position = {
            let inner = self.lock();
            match inner.jobs.get(&key) {
                None => return Ok(None),
                // Not committed yet, or running: memory holds the whole record.
                Some(Entry::Full(rec)) => {
                    return Ok(Some(JobStatus {
                        queue_position: (rec.phase == Phase::Queued)
                            .then(|| inner.queue.position(rec.spec.priority, rec.seq)),
                        record: (**rec).clone(),
                    }))
                }
                // The file holds the record as it is now (a waiting job's does not
                // change until it leaves the queue): read it outside the lock.
                Some(Entry::Waiting { priority, seq, .. }) => {
                    Some(inner.queue.position(*priority, *seq))
                }
                Some(Entry::Done { .. }) => None,
            }
        };
        // It may have been claimed (or ended) since: a position only while the record
        // read says queued.
        let record = read_record(&self.db, id)?;
        Ok(record.map(|record| JobStatus {
            queue_position: queue_position.filter(|_| record.phase == Phase::Queued),
            record,
        }))
    }

    async fn result(&self, id: &str) -> StoreResult<Option<StoredResult>> {
        {
            let inner = self.lock();
            match inner.jobs.get(&JobKey::new(id)) {
                Some(e) if e.phase() == Phase::Completed => {}
                _ => return Ok(None),
            }
            if let Some(r) = inner.fresh_results.get(id) {
                return Ok(Some(r.clone()));
            }
        }
        self.read(RESULTS, id, decode_result)?.transpose()
    }

    async fn cancel(&self, id: &str) -> StoreResult<CancelOutcome> {
        let key = JobKey::new(id);
        let (keys, ops, err) = {
            let mut inner = self.lock();
            match inner.jobs.get_mut(&key) {
                None => return Ok(CancelOutcome::NotFound),
                Some(Entry::Done { .. }) => return Ok(CancelOutcome::AlreadyCompleted),
                Some(Entry::Full(rec)) if rec.phase == Phase::Completed => {
                    return Ok(CancelOutcome::AlreadyCompleted)
                }
                Some(Entry::Full(rec)) if rec.phase == Phase::Running => {
                    rec.cancel_requested = true;
                    let endpoint = rec.spec.endpoint.clone();
                    let op = Op::Job(id.to_string(), encode_record(rec));
                    self.writer.send_nowait(vec![op]);
                    drop(inner);
                    let _ = self.cancels.send(id.to_string());
                    self.bump();
                    return Ok(CancelOutcome::Running { endpoint });
                }
                Some(_) => self.end_queued(&mut inner, vec![(key, SystemEnd::Cancelled)]),
            }
        };
        self.commit_finished(keys, ops).await?;
        match err {
            Some(e) => Err(e),
            None => Ok(CancelOutcome::Removed),
        }
    }

    async fn claim(&self, _worker: &str, lease: Duration) -> StoreResult<Option<Claimed>> {
        let now = now_ms();
        let mut ends = Vec::new();
        let mut failed = None;
        let claimed = {
            let mut inner = self.lock();
            let mut claimed = None;
            while let Some((priority, seq, key)) =
                inner.queue.first().map(|(p, s, k)| (p, s, k.clone()))
            {
                let mut rec = match inner.take(&self.db, &key) {
                    Ok(Some(rec)) => rec,
                    Ok(None) => {
                        inner.queue.remove(priority, seq);
                        continue;
                    }
                    Err(StoreError::Corrupt(e)) => {
                        // Its record is gone or unreadable: it can never run, and left
                        // at the head it would stop every claim behind it.
                        tracing::error!(error = %e, "dropping a queued request whose record cannot be read");
                        inner.queue.remove(priority, seq);
                        inner.deadlines.retain(|(_, k)| *k != key);
                        inner.jobs.remove(&key);
                        continue;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
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
                    ends.push((key.clone(), inner.finish(&key, rec, c, r)));
                    continue;
                }
                inner.dequeue(&key, &rec);
                rec.phase = Phase::Running;
                rec.attempts += 1;
                rec.token = inner.next_token;
                inner.next_token += 1;
                rec.started_at_ms = now;
                rec.lease_until_ms = now + lease.as_millis() as u64;
                rec.logs.clear();
                inner.running.insert(key.clone());
                inner.last_activity_ms = now;
                self.writer
                    .send_nowait(vec![Op::Job(rec.spec.id.clone(), encode_record(&rec))]);
                inner.jobs.insert(key, Entry::Full(Box::new(rec.clone())));
                claimed = Some(rec);
                break;
            }
            claimed
        };
        let keys: Vec<JobKey> = ends.iter().map(|(k, _)| k.clone()).collect();
        self.commit_finished(keys, ends.into_iter().flat_map(|(_, ops)| ops).collect())
            .await?;
        if let Some(e) = failed {
            return Err(e);
        }
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
        match inner.jobs.get_mut(&JobKey::new(id)) {
            Some(Entry::Full(rec)) if rec.phase == Phase::Running && rec.token == token => {
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
        let key = JobKey::new(id);
        let rx = {
            let mut inner = self.lock();
            let rec = match inner.jobs.remove(&key) {
                Some(Entry::Full(rec)) if rec.phase == Phase::Running && rec.token == token => *rec,
                Some(other) => {
                    inner.jobs.insert(key, other);
                    return Ok(false);
                }
                None => return Ok(false),
            };
            let ops = inner.finish(&key, rec, completion, result);
            self.writer.send(ops)
        };
        committed(rx).await?;
        self.after_finish(&[key]);
        Ok(true)
    }

    async fn append_logs(&self, id: &str, lines: Vec<LogLine>) -> StoreResult<()> {
        {
            let mut inner = self.lock();
            let Some(Entry::Full(rec)) = inner.jobs.get_mut(&JobKey::new(id)) else {
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
        let (keys, end_ops, err) = {
            let mut inner = self.lock();
            let inner = &mut *inner;
            // Start deadlines that passed while queued.
            let due: Vec<(JobKey, SystemEnd)> = inner
                .deadlines
                .iter()
                .take_while(|(d, _)| *d <= now)
                .map(|(_, key)| (key.clone(), SystemEnd::StartTimeout))
                .collect();
            // Leases that ran out: back to the queue (the attempt stays counted).
            let expired: Vec<JobKey> = inner
                .running
                .iter()
                .filter(|key| {
                    matches!(inner.jobs.get(*key), Some(Entry::Full(r)) if r.lease_until_ms < now)
                })
                .cloned()
                .collect();
            let mut ops = Vec::new();
            for key in expired {
                let Some(Entry::Full(rec)) = inner.jobs.get_mut(&key) else {
                    continue;
                };
                inner.running.remove(&key);
                rec.phase = Phase::Queued;
                rec.logs.clear();
                ops.push(Op::Job(rec.spec.id.clone(), encode_record(rec)));
                let (priority, seq, deadline) =
                    (rec.spec.priority, rec.seq, rec.spec.start_deadline_ms);
                inner.enqueue(&key, priority, seq, deadline);
                sweep.leases_expired += 1;
            }
            // Results past retention (kept while a webhook for them is still pending).
            let cutoff = now.saturating_sub(retention.as_millis() as u64);
            let old: Vec<(u64, JobKey)> = inner
                .completed
                .iter()
                .take_while(|(at, _)| *at < cutoff)
                .cloned()
                .collect();
            for (at, key) in old {
                let id = key.id();
                if inner.outbox.contains_key(&id) {
                    continue;
                }
                let idempotency = match inner.jobs.get(&key) {
                    Some(Entry::Full(rec)) => rec.spec.idempotency.clone(),
                    Some(Entry::Done { keyed: true, .. }) => match read_record(&self.db, &id) {
                        Ok(rec) => rec.and_then(|r| r.spec.idempotency),
                        Err(e) => {
                            // Kept for the next sweep: its key must go with it.
                            tracing::warn!(error = %e, id, "cannot read a record past retention");
                            continue;
                        }
                    },
                    _ => None,
                };
                inner.completed.remove(&(at, key.clone()));
                inner.jobs.remove(&key);
                if let Some(i) = idempotency {
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
            let ended = self.end_queued(inner, due);
            sweep.start_timeouts = ended.0.len() as u64;
            let retention_ms = retention.as_millis() as u64;
            sweep.next_due_ms = [
                inner.deadlines.first().map(|(d, _)| *d),
                inner
                    .running
                    .iter()
                    .filter_map(|key| match inner.jobs.get(key) {
                        Some(Entry::Full(r)) => Some(r.lease_until_ms),
                        _ => None,
                    })
                    .min(),
                inner.completed.first().map(|(at, _)| at + retention_ms),
                inner.outbox.values().map(|d| d.next_attempt_ms).min(),
            ]
            .into_iter()
            .flatten()
            .min();
            ended
        };
        self.commit_finished(keys, end_ops).await?;
        if let Some(e) = err {
            return Err(e);
        }
        if sweep.changed() {
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
            .filter_map(|p| inner.queue.first_of(*p))
            .filter_map(|(_, key)| match inner.jobs.get(key)? {
                Entry::Waiting {
                    submitted_at_ms, ..
                } => Some(*submitted_at_ms),
                Entry::Full(rec) => Some(rec.spec.submitted_at_ms),
                Entry::Done { .. } => None,
            })
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

    /// Queued requests are read back from the file after a restart (memory keeps only
    /// their place): status, claim (headers, query, body), cancel, start timeouts, and
    /// ids that are not UUIDs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_requests_after_a_restart() {
        use crate::store::conformance::spec;
        let dir = std::env::temp_dir().join(format!("fal-reopen-{}", uuid::Uuid::new_v4()));
        let lease = Duration::from_secs(30);
        let mut first = spec(Priority::Normal);
        first
            .headers
            .push(("user-agent".into(), "fal-client".into()));
        first.query = Some("x=1".into());
        let cancel_me = spec(Priority::Normal);
        let mut times_out = spec(Priority::Low);
        times_out.start_deadline_ms = Some(now_ms() + 60_000);
        let mut custom = spec(Priority::Low);
        custom.id = "not-a-uuid".into();
        let mut upper = spec(Priority::Low);
        upper.id = upper.id.to_uppercase();
        {
            let s = EmbeddedStore::open(&dir, 3).unwrap();
            for (j, body) in [
                (&first, &b"{\"a\":1}"[..]),
                (&cancel_me, b"{}"),
                (&times_out, b"{}"),
                (&custom, b"{\"c\":1}"),
                (&upper, b"{}"),
            ] {
                s.submit(j.clone(), Bytes::copy_from_slice(body), 10)
                    .await
                    .unwrap();
            }
            assert!(matches!(
                s.submit(custom.clone(), Bytes::new(), 10).await,
                Err(StoreError::Duplicate(_))
            ));
            assert!(s.status(&upper.id.to_lowercase()).await.unwrap().is_none());
        }
        let s = EmbeddedStore::open(&dir, 3).unwrap();
        assert_eq!(s.load().await.unwrap().queued, 5);
        let st = s.status(&first.id).await.unwrap().unwrap();
        assert_eq!(
            (
                st.queue_position,
                &st.record.spec.headers,
                &st.record.spec.query
            ),
            (Some(0), &first.headers, &first.query)
        );
        assert_eq!(
            s.status(&custom.id).await.unwrap().unwrap().queue_position,
            Some(3)
        );
        assert_eq!(
            s.status(&upper.id).await.unwrap().unwrap().record.spec.id,
            upper.id
        );
        assert_eq!(
            s.cancel(&cancel_me.id).await.unwrap(),
            CancelOutcome::Removed
        );
        assert_eq!(s.result(&cancel_me.id).await.unwrap().unwrap().status, 499);
        let sweep = s.sweep(now_ms() + 120_000, lease).await.unwrap();
        assert_eq!(sweep.start_timeouts, 1);
        let st = s.status(&times_out.id).await.unwrap().unwrap();
        assert_eq!(st.record.phase, Phase::Completed);
        assert_eq!(
            st.record.spec.start_deadline_ms,
            times_out.start_deadline_ms
        );
        assert_eq!(s.result(&times_out.id).await.unwrap().unwrap().status, 504);
        let c = s.claim("w", lease).await.unwrap().unwrap();
        assert_eq!(
            (
                c.record.spec.id.as_str(),
                &c.record.spec.headers,
                &c.record.spec.query,
                c.body.as_ref()
            ),
            (
                first.id.as_str(),
                &first.headers,
                &first.query,
                &b"{\"a\":1}"[..]
            )
        );
        // Given back: queued again in its place, whole in memory until it runs.
        assert!(s.requeue(&first.id, c.token).await.unwrap());
        assert_eq!(
            s.status(&first.id).await.unwrap().unwrap().queue_position,
            Some(0)
        );
        let c = s.claim("w", lease).await.unwrap().unwrap();
        assert_eq!(
            (c.record.spec.id.as_str(), c.record.attempts),
            (first.id.as_str(), 2)
        );
        let c = s.claim("w", lease).await.unwrap().unwrap();
        assert_eq!(
            (c.record.spec.id.as_str(), c.body.as_ref()),
            ("not-a-uuid", &b"{\"c\":1}"[..])
        );
        assert_eq!(
            s.claim("w", lease).await.unwrap().unwrap().record.spec.id,
            upper.id
        );
        assert!(s.claim("w", lease).await.unwrap().is_none());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two restarts with every kind of job in the file: waiting (never claimed), given
    /// back (queued again after a claim), running, cancelled and completed. Positions,
    /// claim order, attempts, fencing tokens, results and retention hold across both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restarts_with_queued_running_and_completed_jobs() {
        use crate::job::app_end;
        use crate::store::conformance::spec;
        let dir = std::env::temp_dir().join(format!("fal-reopen-{}", uuid::Uuid::new_v4()));
        let lease = Duration::from_secs(30);
        let ok = |body: &'static [u8]| StoredResult {
            status: 200,
            headers: vec![],
            body: Bytes::from_static(body),
        };
        let [a, b, c, d, e, f] = [
            spec(Priority::Normal),
            spec(Priority::Normal),
            spec(Priority::Low),
            spec(Priority::Normal),
            spec(Priority::Normal),
            spec(Priority::Low),
        ];
        let stale_b;
        {
            let s = EmbeddedStore::open(&dir, 3).unwrap();
            for j in [&a, &b, &c, &d, &e, &f] {
                let body = Bytes::from(format!("{{\"id\":\"{}\"}}", j.id));
                s.submit(j.clone(), body, 10).await.unwrap();
            }
            let ca = s.claim("w", lease).await.unwrap().unwrap();
            assert!(s
                .complete(&a.id, ca.token, app_end(200, now_ms(), 0.1), ok(b"a"))
                .await
                .unwrap());
            let cb = s.claim("w", lease).await.unwrap().unwrap();
            assert_eq!(cb.record.spec.id, b.id);
            stale_b = cb.token;
            let cd = s.claim("w", lease).await.unwrap().unwrap();
            assert_eq!(cd.record.spec.id, d.id);
            assert!(s.requeue(&d.id, cd.token).await.unwrap());
            assert_eq!(s.cancel(&e.id).await.unwrap(), CancelOutcome::Removed);
            // Before the restart: b runs; d (given back), c, f wait.
            let pos = |st: Option<JobStatus>| st.unwrap().queue_position;
            assert_eq!(pos(s.status(&d.id).await.unwrap()), Some(0));
            assert_eq!(pos(s.status(&c.id).await.unwrap()), Some(1));
            assert_eq!(pos(s.status(&f.id).await.unwrap()), Some(2));
        }

        let s = EmbeddedStore::open(&dir, 3).unwrap();
        let load = s.load().await.unwrap();
        assert_eq!((load.queued, load.in_flight), (4, 0));
        assert_eq!(load.oldest_queued_ms, Some(b.submitted_at_ms));
        // b is back in its place (it was submitted before d), its attempt counted.
        for (j, p, attempts) in [(&b, 0, 1), (&d, 1, 1), (&c, 2, 0), (&f, 3, 0)] {
            let st = s.status(&j.id).await.unwrap().unwrap();
            assert_eq!(
                (st.record.phase, st.queue_position, st.record.attempts),
                (Phase::Queued, Some(p), attempts),
                "{}",
                j.id
            );
        }
        for (j, status) in [(&a, 200), (&e, 499)] {
            let st = s.status(&j.id).await.unwrap().unwrap();
            assert_eq!(
                (st.record.phase, st.queue_position),
                (Phase::Completed, None)
            );
            assert_eq!(s.result(&j.id).await.unwrap().unwrap().status, status);
            assert_eq!(
                s.cancel(&j.id).await.unwrap(),
                CancelOutcome::AlreadyCompleted
            );
        }
        assert_eq!(s.result(&a.id).await.unwrap().unwrap().body.as_ref(), b"a");
        assert!(s.result(&b.id).await.unwrap().is_none());
        assert!(!s
            .complete(&b.id, stale_b, app_end(200, now_ms(), 0.1), ok(b"stale"))
            .await
            .unwrap());
        let cb = s.claim("w", lease).await.unwrap().unwrap();
        assert_eq!(
            (cb.record.spec.id.as_str(), cb.record.attempts),
            (b.id.as_str(), 2)
        );
        assert!(cb.token > stale_b);
        assert_eq!(cb.body, Bytes::from(format!("{{\"id\":\"{}\"}}", b.id)));
        assert!(matches!(
            s.renew(&b.id, stale_b, lease).await.unwrap(),
            Lease::Lost
        ));
        assert!(s
            .complete(&b.id, cb.token, app_end(200, now_ms(), 0.1), ok(b"b"))
            .await
            .unwrap());
        let cd = s.claim("w", lease).await.unwrap().unwrap();
        assert_eq!(
            (cd.record.spec.id.as_str(), cd.record.attempts),
            (d.id.as_str(), 2)
        );
        assert_eq!(
            s.status(&c.id).await.unwrap().unwrap().queue_position,
            Some(0)
        );
        drop(s);

        // Second restart: d was running again.
        let s = EmbeddedStore::open(&dir, 3).unwrap();
        assert_eq!(s.result(&b.id).await.unwrap().unwrap().body.as_ref(), b"b");
        for (j, p) in [(&d, 0), (&c, 1), (&f, 2)] {
            assert_eq!(
                s.status(&j.id).await.unwrap().unwrap().queue_position,
                Some(p)
            );
        }
        let cd2 = s.claim("w", lease).await.unwrap().unwrap();
        assert_eq!(
            (cd2.record.spec.id.as_str(), cd2.record.attempts),
            (d.id.as_str(), 3)
        );
        assert!(!s
            .complete(&d.id, cd.token, app_end(200, now_ms(), 0.1), ok(b"stale"))
            .await
            .unwrap());
        assert!(s
            .complete(&d.id, cd2.token, app_end(200, now_ms(), 0.1), ok(b"d"))
            .await
            .unwrap());
        for j in [&c, &f] {
            let cl = s.claim("w", lease).await.unwrap().unwrap();
            assert_eq!(cl.record.spec.id, j.id);
            assert_eq!(cl.body, Bytes::from(format!("{{\"id\":\"{}\"}}", j.id)));
            assert!(s
                .complete(&j.id, cl.token, app_end(200, now_ms(), 0.1), ok(b"x"))
                .await
                .unwrap());
        }
        assert!(s.claim("w", lease).await.unwrap().is_none());
        let sweep = s
            .sweep(now_ms() + 10_000, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(sweep.purged, 6);
        for j in [&a, &b, &c, &d, &e, &f] {
            assert!(s.status(&j.id).await.unwrap().is_none());
        }
        drop(s);
        let s = EmbeddedStore::open(&dir, 3).unwrap();
        assert!(
            s.status(&a.id).await.unwrap().is_none(),
            "purged in the file too"
        );
        assert_eq!(s.load().await.unwrap().queued, 0);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    crate::conformance_tests!(|dir: std::path::PathBuf| async move {
        EmbeddedStore::open(&dir, 3).unwrap() as std::sync::Arc<dyn Store>
    });
}
