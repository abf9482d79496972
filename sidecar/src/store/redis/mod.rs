//! The Redis store: one queue per function, shared by every replica and the gateway.
//!
//! Every key of a function lives under `fal:{NAMESPACE/NAME}:` (the braces are a Redis
//! Cluster hash tag: one function's keys share a slot, so its Lua scripts stay legal).
//!
//! | key                      | type   | holds                                                   |
//! |--------------------------|--------|---------------------------------------------------------|
//! | `P seq`                  | string | INCR counter: submit order                              |
//! | `P token`                | string | INCR counter: fencing tokens                            |
//! | `P job:<id>`             | hash   | `spec` (JSON), `body`, `seq`, `prio`, `phase` (q/r/c), `attempts`, `token`, `lease`, `started`, `cancel`, `submitted`, `deadline`, `owner`, `webhook`, `idem`, `completion` (JSON), `result` (encoded) |
//! | `P logs:<id>`            | list   | log lines (JSON), the last 2000                         |
//! | `P queue`                | zset   | queued ids, score `prio * 2^50 + seq` (ZRANK = position) |
//! | `P deadlines`            | zset   | queued ids with a start deadline, score = deadline ms   |
//! | `P running`              | zset   | claimed ids, score = lease expiry (Redis clock, ms)     |
//! | `P completed`            | zset   | completed ids, score = completion ms (retention)        |
//! | `P outbox`               | zset   | pending webhooks, score = next attempt ms               |
//! | `P outbox_attempts`      | hash   | id → webhook attempts made                              |
//! | `P activity`             | string | last submit/claim/completion (ms)                       |
//! | `P idem:<key>`           | string | Idempotency-Key (hashed) → `fingerprint id position`; written by the submit script with the job, deleted with it |
//! | channel `P events`       | pubsub | "something changed": wakes workers and status streams   |
//! | channel `P cancel`       | pubsub | ids of running jobs whose cancel was requested          |
//!
//! Every state change is one Lua script (atomic, one round trip), one file a script in
//! `lua/` (its header: what it does, its KEYS and ARGV). Lease expiries are computed
//! from Redis' own clock (`TIME`), so replicas with skewed clocks agree. The results the
//! sidecar writes itself (start timeout, lost, cancelled) are built in Rust by
//! `job::system_end` before the script runs and passed in, so ending a job is as atomic
//! as completing it.

use std::sync::Arc;
use std::time::Duration;

pub mod rate_limit;
pub mod ready;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use redis::{Script, Value};
use tokio::sync::{broadcast, watch};

use super::embedded::{decode_result, encode_result};
use super::redis_conn::{Conn, Target};
use super::{
    CancelOutcome, Claimed, Delivery, JobStatus, Lease, Load, Store, StoreError, StoreResult,
    Submitted, Sweep,
};
use crate::job::{
    now_ms, system_end, Completion, JobRecord, JobSpec, LogLine, Phase, StoredResult, SystemEnd,
};

/// Log lines kept per request (older lines are dropped first).
const MAX_LOG_LINES: usize = 2000;
/// Upper bound on one store call (a stalled Redis must not stall callers).
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Items one claim or sweep script handles at most (keeps scripts short).
const SCRIPT_BATCH: u32 = 500;
/// Connections for writes that WAIT for replicas (`--store-replicas`).
const WAIT_CONNECTIONS: usize = 8;
/// Stand-in for the attempt count in the prebuilt "lost" result; the claim script
/// substitutes the real count.
const ATTEMPTS_PLACEHOLDER: u32 = u32::MAX;

/// Helpers every script shares (prepended to each script's source).
const PRELUDE: &str = include_str!("lua/prelude.lua");

// The scripts, one file a command; each file's header says what it does, its KEYS and
// ARGV, and what it returns.
const SUBMIT: &str = include_str!("lua/submit.lua");
const CLAIM: &str = include_str!("lua/claim.lua");
const RENEW: &str = include_str!("lua/renew.lua");
const RELEASE: &str = include_str!("lua/release.lua");
const COMPLETE: &str = include_str!("lua/complete.lua");
const CANCEL: &str = include_str!("lua/cancel.lua");
const APPEND_LOGS: &str = include_str!("lua/append_logs.lua");
const SWEEP: &str = include_str!("lua/sweep.lua");
const DUE_DELIVERIES: &str = include_str!("lua/due_deliveries.lua");
const DELIVERY_ATTEMPTED: &str = include_str!("lua/delivery_attempted.lua");
const LOAD: &str = include_str!("lua/load.lua");
const RUNNING_WORKERS: &str = include_str!("lua/running_workers.lua");
const SYNC_REPORT: &str = include_str!("lua/sync_report.lua");
const STATUS: &str = include_str!("lua/status.lua");

/// A script and the keys it declares (suffixes of the function's prefix). Every key a
/// script names is declared; `per_id` keys are completed with the script's id
/// argument. The job hashes that claim, sweep, deliveries and load reach through the
/// function's own indexes cannot be named before the script runs: they carry the same
/// hash tag, so they live in the declared keys' slot (what Redis Cluster checks).
struct Scripted {
    script: Script,
    /// The source (for EVAL when a node does not have the script cached).
    script_source: String,
    keys: &'static [&'static str],
    per_id: &'static [&'static str],
    /// A write that `--store-replicas` must see replicated before it is acknowledged.
    durable: bool,
}

struct Scripts {
    status: Scripted,
    submit: Scripted,
    claim: Scripted,
    renew: Scripted,
    release: Scripted,
    complete: Scripted,
    cancel: Scripted,
    append_logs: Scripted,
    sweep: Scripted,
    due_deliveries: Scripted,
    delivery_attempted: Scripted,
    load: Scripted,
    sync_report: Scripted,
    running_workers: Scripted,
}

impl Scripts {
    /// Every script the store sends (what a readiness probe puts in the script cache).
    fn all(&self) -> [&Scripted; 14] {
        [
            &self.status,
            &self.submit,
            &self.claim,
            &self.renew,
            &self.release,
            &self.complete,
            &self.cancel,
            &self.append_logs,
            &self.sweep,
            &self.due_deliveries,
            &self.delivery_attempted,
            &self.load,
            &self.sync_report,
            &self.running_workers,
        ]
    }

    fn new() -> Scripts {
        let s = |body: &str, keys: &'static [&'static str], per_id: &'static [&'static str]| {
            let source = format!("{PRELUDE}{body}");
            Scripted {
                script: Script::new(&source),
                script_source: source,
                keys,
                per_id,
                durable: [SUBMIT, COMPLETE, CANCEL, DELIVERY_ATTEMPTED].contains(&body),
            }
        };
        const ENDS: &[&str] = &[
            "queue",
            "deadlines",
            "running",
            "completed",
            "activity",
            "outbox",
            "outbox_attempts",
        ];
        Scripts {
            status: s(STATUS, &["queue"], &["job:", "logs:"]),
            submit: s(
                SUBMIT,
                &["queue", "deadlines", "seq", "activity"],
                &["job:"],
            ),
            claim: s(
                CLAIM,
                &[
                    "queue",
                    "deadlines",
                    "running",
                    "completed",
                    "outbox",
                    "outbox_attempts",
                    "token",
                    "activity",
                ],
                &[],
            ),
            renew: s(RENEW, &["running"], &["job:"]),
            release: s(
                RELEASE,
                &["running", "queue", "deadlines"],
                &["job:", "logs:"],
            ),
            complete: s(COMPLETE, ENDS, &["job:"]),
            cancel: s(CANCEL, ENDS, &["job:"]),
            append_logs: s(APPEND_LOGS, &[], &["job:", "logs:"]),
            sweep: s(SWEEP, ENDS, &[]),
            due_deliveries: s(DUE_DELIVERIES, &["outbox", "outbox_attempts"], &[]),
            delivery_attempted: s(DELIVERY_ATTEMPTED, &["outbox", "outbox_attempts"], &[]),
            load: s(LOAD, &["queue", "running", "activity", "sync"], &[]),
            sync_report: s(SYNC_REPORT, &["sync", "activity"], &[]),
            running_workers: s(RUNNING_WORKERS, &["running"], &[]),
        }
    }
}

/// What one shared connection subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscribe {
    /// The channels of one function (a sidecar: it hears only its own queue).
    One(String),
    /// Every function's channels (the gateway and the autoscaler), by pattern.
    All,
}

/// Pub/sub fan-out of one function: status streams and workers wait on `changed`,
/// workers hear cancels on `cancels`.
struct Channels {
    changed: watch::Sender<u64>,
    cancels: broadcast::Sender<String>,
}

impl Channels {
    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// A message on a function's events channel, as the autoscaler hears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// `NAMESPACE/NAME`.
    pub function: String,
    /// `submit`, `claim`, `complete`, `wake`, …
    pub kind: String,
}

/// One Redis connection (multiplexed) and one subscription, shared by the stores of
/// every function a process serves: a gateway that knows a thousand functions holds
/// two connections, not two thousand.
pub struct RedisHub {
    conn: Conn,
    /// With `--store-replicas`: connections for the writes that WAIT. A WAIT holds its
    /// connection until the replicas answer, so every other command sent on it queues
    /// behind; several connections keep one WAIT from stalling every write.
    wait_pool: Vec<Conn>,
    next_wait: std::sync::atomic::AtomicUsize,
    /// The server, for error messages (no credentials).
    server: String,
    durability: Durability,
    scripts: Scripts,
    channels: std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<Channels>>>,
    activity: broadcast::Sender<Activity>,
    subscriber: std::sync::OnceLock<tokio::task::AbortHandle>,
    /// Subscribed to every function ([`Subscribe::All`]).
    follows_all: bool,
    /// A Redis Cluster: a probe of every primary needs a key in each one's slots.
    cluster: bool,
    /// The last probe of every primary ([`RedisHub::ready`]).
    ready_all: ready::ProbeCell,
}

impl Drop for RedisHub {
    fn drop(&mut self) {
        if let Some(s) = self.subscriber.get() {
            s.abort();
        }
    }
}

/// See the module docs.
pub struct RedisStore {
    hub: Arc<RedisHub>,
    prefix: String,
    max_attempts: u32,
    chans: Arc<Channels>,
    opened_at_ms: u64,
    /// The last probe of this function's primary ([`Store::ready`]).
    ready: ready::ProbeCell,
}

/// How many replicas must confirm a write before it is acknowledged (`WAIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    /// 0: acknowledge once the primary has it (Redis' asynchronous replication).
    pub replicas: u32,
    /// Longest wait for them; past it the caller gets `Unavailable` (503), never a
    /// silent acknowledgement.
    pub timeout: Duration,
}

impl Default for Durability {
    fn default() -> Self {
        Durability {
            replicas: 0,
            timeout: Duration::from_secs(1),
        }
    }
}

impl RedisHub {
    /// Connects to `url` (see [`super::redis_conn`]: one server, a cluster, or a
    /// Sentinel-managed master). Does not fail when Redis is down: calls return
    /// `Unavailable` until it is back.
    pub fn connect(url: &str, subscribe: Subscribe) -> StoreResult<Arc<RedisHub>> {
        Self::connect_with(url, subscribe, Durability::default())
    }

    /// [`RedisHub::connect`] with writes acknowledged only once `durability.replicas`
    /// replicas have them.
    pub fn connect_with(
        url: &str,
        subscribe: Subscribe,
        durability: Durability,
    ) -> StoreResult<Arc<RedisHub>> {
        let target = Target::parse(url)
            .map_err(|e| StoreError::Unavailable(format!("invalid redis URL: {e}")))?;
        let server = target.describe();
        let connect = || {
            target
                .connect()
                .map_err(|e| StoreError::Unavailable(format!("redis at {server}: {e}")))
        };
        let conn = connect()?;
        let wait_pool = if durability.replicas > 0 {
            (0..WAIT_CONNECTIONS)
                .map(|_| connect())
                .collect::<StoreResult<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let (activity, _) = broadcast::channel(4096);
        let follows_all = subscribe == Subscribe::All;
        let hub = Arc::new(RedisHub {
            follows_all,
            cluster: matches!(target, Target::Cluster { .. }),
            ready_all: Default::default(),
            conn,
            wait_pool,
            next_wait: Default::default(),
            server,
            durability,
            scripts: Scripts::new(),
            channels: Default::default(),
            activity,
            subscriber: std::sync::OnceLock::new(),
        });
        let task = tokio::spawn(subscribe_loop(target, subscribe, Arc::downgrade(&hub)));
        let _ = hub.subscriber.set(task.abort_handle());
        Ok(hub)
    }

    /// The server address (for messages).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Messages on every function's events channel (with [`Subscribe::All`]).
    pub fn activity(&self) -> broadcast::Receiver<Activity> {
        self.activity.subscribe()
    }

    /// Round trip to the server.
    pub async fn ping(&self) -> StoreResult<()> {
        let cmd = &redis::cmd("PING");
        self.guard(|mut c| async move { cmd.query_async::<Value>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// The store of `function` (NAMESPACE/NAME) over this hub's connection.
    pub fn store(self: &Arc<Self>, function: &str, max_attempts: u32) -> Arc<RedisStore> {
        let prefix = key_prefix(function);
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let chans = match map.get(&prefix).and_then(std::sync::Weak::upgrade) {
            Some(c) => c,
            None => {
                // Only a replica's workers listen to cancels; a gateway or autoscaler
                // following many functions keeps each channel tiny.
                let capacity = if self.follows_all { 4 } else { 1024 };
                let c = Arc::new(Channels {
                    changed: watch::channel(0u64).0,
                    cancels: broadcast::channel(capacity).0,
                });
                map.retain(|_, w| w.strong_count() > 0);
                map.insert(prefix.clone(), Arc::downgrade(&c));
                c
            }
        };
        Arc::new(RedisStore {
            hub: self.clone(),
            prefix,
            max_attempts,
            chans,
            opened_at_ms: now_ms(),
            ready: Default::default(),
        })
    }

    fn channels_of(&self, prefix: &str) -> Option<Arc<Channels>> {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(prefix)
            .and_then(std::sync::Weak::upgrade)
    }

    fn bump_all(&self) {
        let live: Vec<Arc<Channels>> = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        live.iter().for_each(|c| c.bump());
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("redis at {}: {e}", self.server))
    }

    /// Runs one request with a time bound. A refused connection means the request was
    /// never sent (and the manager reconnects when it sees one), so that case is tried
    /// once more: the first call after Redis comes back does not fail for nothing.
    async fn guard<T, F, Fut>(&self, op: F) -> StoreResult<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.guard_on(&self.conn, op).await
    }

    /// The next connection for a write that WAITs (round robin).
    fn wait_conn(&self) -> &Conn {
        match self.wait_pool.len() {
            0 => &self.conn,
            n => {
                let i = self
                    .next_wait
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                &self.wait_pool[i % n]
            }
        }
    }

    /// [`RedisHub::guard`] on a given connection.
    async fn guard_on<T, F, Fut>(&self, conn: &Conn, mut op: F) -> StoreResult<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            match op(conn.clone()).await {
                Err(e) if e.is_connection_refusal() => op(conn.clone()).await,
                other => other,
            }
        };
        match tokio::time::timeout(OP_TIMEOUT, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(e)),
            Err(_) => Err(self.unavailable(format!("no answer within {OP_TIMEOUT:?}"))),
        }
    }
}

/// The key prefix of a function's queue.
pub fn key_prefix(function: &str) -> String {
    format!("fal:{{{function}}}:")
}

fn phase_of(v: &[u8]) -> Option<Phase> {
    match v {
        b"q" => Some(Phase::Queued),
        b"r" => Some(Phase::Running),
        b"c" => Some(Phase::Completed),
        _ => None,
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("redis data: {what}"))
}

/// A reply value as bytes (`None` for nil).
fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.trim().parse().ok(),
        Value::SimpleString(s) => s.trim().parse().ok(),
        Value::Double(d) => Some(*d as i64),
        _ => None,
    }
}

fn num<T: TryFrom<i64>>(v: Option<&Value>, what: &str) -> StoreResult<T> {
    v.and_then(int_of)
        .and_then(|i| T::try_from(i).ok())
        .ok_or_else(|| corrupt(format!("{what} is not a number")))
}

fn array(v: Value) -> StoreResult<Vec<Value>> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(format!("unexpected reply {other:?}"))),
    }
}

fn text(v: Option<&Value>, what: &str) -> StoreResult<String> {
    v.and_then(bytes_of)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| corrupt(format!("{what} is missing")))
}

fn parse_spec(v: Option<&Value>) -> StoreResult<JobSpec> {
    let raw = v
        .and_then(bytes_of)
        .ok_or_else(|| corrupt("job spec is missing"))?;
    serde_json::from_slice(&raw).map_err(|e| corrupt(format!("job spec: {e}")))
}

impl RedisStore {
    /// Connects to `url` (redis://HOST:PORT/DB) for the queue of `function`
    /// (NAMESPACE/NAME), with a connection of its own. Does not fail when Redis is
    /// down: calls return `Unavailable` until it is back.
    pub async fn open(
        url: &str,
        function: &str,
        max_attempts: u32,
    ) -> StoreResult<Arc<RedisStore>> {
        Self::open_with(url, function, max_attempts, Durability::default()).await
    }

    /// [`RedisStore::open`] with writes acknowledged once `durability` says.
    pub async fn open_with(
        url: &str,
        function: &str,
        max_attempts: u32,
        durability: Durability,
    ) -> StoreResult<Arc<RedisStore>> {
        let hub = RedisHub::connect_with(url, Subscribe::One(key_prefix(function)), durability)?;
        let store = hub.store(function, max_attempts);
        // The readiness probe makes every connection (and caches the scripts) now, so
        // the first requests do not; it is run again by every `/readyz`.
        match store.ready().await {
            Ok(()) => {
                tracing::info!(server = %hub.server, prefix = %store.prefix, "using the redis store")
            }
            Err(e) => {
                tracing::warn!(error = %e, "the redis store cannot take writes yet; /readyz fails and requests get 503 until it can")
            }
        }
        Ok(store)
    }

    fn bump(&self) {
        self.chans.bump();
    }

    async fn guard<T, F, Fut>(&self, op: F) -> StoreResult<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.hub.guard(op).await
    }

    /// Puts a claimed job back in the queue; `refund` uncounts its attempt.
    async fn give_back(&self, id: &str, token: u64, refund: bool) -> StoreResult<bool> {
        let token = token.to_string();
        let refund: &[u8] = if refund { b"1" } else { b"0" };
        let reply = self
            .run(
                &self.hub.scripts.release,
                &[id.as_bytes(), token.as_bytes(), refund],
                &[],
            )
            .await?;
        let ok = int_of(&reply) == Some(1);
        if ok {
            self.bump();
        }
        Ok(ok)
    }

    /// Runs one script with its declared KEYS (plus `extra`) and ARGV = [prefix,
    /// args...]; `args[0]` is the id its `per_id` keys name.
    async fn run(&self, s: &Scripted, args: &[&[u8]], extra: &[String]) -> StoreResult<Value> {
        if self.hub.durability.replicas > 0 && s.durable {
            return self.run_replicated(s, args, extra).await;
        }
        let mut inv = s.script.prepare_invoke();
        for k in s.keys {
            inv.key(format!("{}{k}", self.prefix));
        }
        if let Some(id) = args.first().filter(|_| !s.per_id.is_empty()) {
            let id = String::from_utf8_lossy(id);
            for k in s.per_id {
                inv.key(format!("{}{k}{id}", self.prefix));
            }
        }
        for k in extra {
            inv.key(k);
        }
        inv.arg(self.prefix.as_str());
        for a in args {
            inv.arg(*a);
        }
        let inv = &inv;
        self.guard(|mut c| async move { inv.invoke_async::<Value>(&mut c).await })
            .await
    }

    /// With `--store-replicas N`: the script and `WAIT N` go out as one pipeline on one
    /// connection (in a cluster: to the node that owns the function's slot), so the
    /// WAIT counts the replicas that have *this* write. A pipeline the cluster client
    /// re-sends after a failover runs the script again on the new primary (the submit
    /// script recognises its own job) and waits there. Fewer replicas than N within the
    /// bound, or any error: `Unavailable` (503), never a silent acknowledgement.
    async fn run_replicated(
        &self,
        s: &Scripted,
        args: &[&[u8]],
        extra: &[String],
    ) -> StoreResult<Value> {
        let Durability { replicas, timeout } = self.hub.durability;
        let mut keys: Vec<String> = s
            .keys
            .iter()
            .map(|k| format!("{}{k}", self.prefix))
            .collect();
        if let Some(id) = args.first().filter(|_| !s.per_id.is_empty()) {
            let id = String::from_utf8_lossy(id);
            keys.extend(s.per_id.iter().map(|k| format!("{}{k}{id}", self.prefix)));
        }
        keys.extend(extra.iter().cloned());
        let pipe = |eval: &str, script: &[u8]| {
            let mut p = redis::pipe();
            let c = p.cmd(eval).arg(script).arg(keys.len()).arg(&keys);
            c.arg(self.prefix.as_str());
            for a in args {
                c.arg(*a);
            }
            p.cmd("WAIT").arg(replicas).arg(timeout.as_millis() as u64);
            p
        };
        let hash = s.script.get_hash().to_string();
        let by_hash = pipe("EVALSHA", hash.as_bytes());
        let by_hash = &by_hash;
        let conn = self.hub.wait_conn();
        let reply = self
            .hub
            .guard_on(conn, |mut c| async move {
                by_hash.query_async::<(Value, i64)>(&mut c).await
            })
            .await;
        let (value, confirmed) = match reply {
            Err(StoreError::Unavailable(why)) if why.to_ascii_uppercase().contains("NOSCRIPT") => {
                // Not cached on this node yet (a new or restarted primary): send it whole.
                let whole = pipe("EVAL", s.script_source.as_bytes());
                let whole = &whole;
                self.hub
                    .guard_on(conn, |mut c| async move {
                        whole.query_async::<(Value, i64)>(&mut c).await
                    })
                    .await?
            }
            other => other?,
        };
        if confirmed < i64::from(replicas) {
            return Err(StoreError::Unavailable(format!(
                "only {confirmed} of {replicas} redis replicas confirmed the write within {timeout:?} \
                 (--store-replicas); it is not acknowledged (a retry with the same \
                 Idempotency-Key cannot run it twice)"
            )));
        }
        Ok(value)
    }

    /// A gateway's report of the sync calls it holds or has in flight for this
    /// function: counted in [`Load::sync`] until `ttl` passes without a new report;
    /// `last_ms` (the latest sync call) counts as activity for keep-alive; `wake`
    /// publishes a `wake` event so the autoscaler acts at once.
    pub async fn report_sync(
        &self,
        gateway: &str,
        count: u64,
        last_ms: u64,
        ttl: Duration,
        wake: bool,
    ) -> StoreResult<()> {
        let count = count.to_string();
        let last = last_ms.to_string();
        let ttl = (ttl.as_millis() as u64).to_string();
        self.run(
            &self.hub.scripts.sync_report,
            &[
                gateway.as_bytes(),
                count.as_bytes(),
                last.as_bytes(),
                ttl.as_bytes(),
                if wake { b"1" } else { b"0" },
            ],
            &[],
        )
        .await?;
        Ok(())
    }

    /// Running requests per replica (the part of the worker name before `/`): a
    /// scaler removes the idlest replicas first.
    pub async fn running_by_replica(&self) -> StoreResult<std::collections::HashMap<String, u64>> {
        let r = array(
            self.run(&self.hub.scripts.running_workers, &[], &[])
                .await?,
        )?;
        let mut out = std::collections::HashMap::new();
        for pair in r.chunks_exact(2) {
            let worker = text(pair.first(), "worker").unwrap_or_default();
            let replica = worker
                .rsplit_once('/')
                .map_or(worker.as_str(), |(r, _)| r)
                .to_string();
            *out.entry(replica).or_insert(0) += num::<u64>(pair.get(1), "running count")?;
        }
        Ok(out)
    }

    /// The hub this store runs on.
    pub fn hub(&self) -> &Arc<RedisHub> {
        &self.hub
    }

    fn record(&self, f: &[Value], logs: Vec<LogLine>) -> StoreResult<JobRecord> {
        // f: spec, seq, phase, attempts, token, lease, started, cancel, completion
        let spec = parse_spec(f.first())?;
        let phase = f
            .get(2)
            .and_then(bytes_of)
            .and_then(|p| phase_of(&p))
            .ok_or_else(|| corrupt("job phase"))?;
        let completion = match f.get(8).and_then(bytes_of) {
            Some(raw) => Some(
                serde_json::from_slice::<Completion>(&raw)
                    .map_err(|e| corrupt(format!("completion: {e}")))?,
            ),
            None => None,
        };
        Ok(JobRecord {
            spec,
            seq: num(f.get(1), "seq")?,
            phase,
            attempts: num(f.get(3), "attempts")?,
            token: num(f.get(4), "token")?,
            lease_until_ms: num(f.get(5), "lease")?,
            started_at_ms: num(f.get(6), "started")?,
            cancel_requested: num::<i64>(f.get(7), "cancel")? != 0,
            completion,
            logs,
        })
    }

    fn system_args(kind: SystemEnd, now: u64, attempts: u32) -> (Vec<u8>, Vec<u8>) {
        let (c, r) = system_end(kind, now, attempts);
        (
            serde_json::to_vec(&c).expect("serialize completion"),
            encode_result(&r),
        )
    }
}

/// `NAMESPACE/NAME` and the channel kind (`events` or `cancel`) of a channel name.
fn parse_channel(channel: &str) -> Option<(&str, &str)> {
    let rest = channel.strip_prefix("fal:{")?;
    let (function, kind) = rest.rsplit_once("}:")?;
    Some((function, kind))
}

/// Feeds every store's `changes()` and `cancellations()` (and the hub's `activity()`)
/// from pub/sub; reconnects with backoff when Redis goes away (and bumps every store
/// on reconnect: messages may have been missed meanwhile).
async fn subscribe_loop(target: Target, subscribe: Subscribe, hub: std::sync::Weak<RedisHub>) {
    let server = target.describe();
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    let mut attempt = 0usize;
    loop {
        attempt += 1;
        let connect = async {
            let mut pubsub = target.pubsub(attempt).await?;
            match &subscribe {
                Subscribe::One(prefix) => {
                    pubsub
                        .subscribe(&[format!("{prefix}events"), format!("{prefix}cancel")])
                        .await?
                }
                Subscribe::All => {
                    pubsub
                        .psubscribe(&["fal:{*}:events", "fal:{*}:cancel"])
                        .await?
                }
            }
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(3), connect).await {
            Ok(Ok(pubsub)) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(%server, "redis subscription restored");
                }
                backoff = Duration::from_millis(100);
                match hub.upgrade() {
                    Some(h) => h.bump_all(),
                    None => return,
                }
                let (mut sink, mut stream) = pubsub.split();
                let mut ping = tokio::time::interval(Duration::from_secs(5));
                ping.tick().await;
                loop {
                    tokio::select! {
                        msg = stream.next() => match msg {
                            None => break,
                            Some(msg) => {
                                let Some(hub) = hub.upgrade() else { return };
                                let channel = msg.get_channel_name();
                                let Some((function, kind)) = parse_channel(channel) else { continue };
                                let prefix = key_prefix(function);
                                let chans = hub.channels_of(&prefix);
                                if kind == "cancel" {
                                    if let (Some(c), Ok(id)) = (&chans, msg.get_payload::<String>()) {
                                        let _ = c.cancels.send(id);
                                    }
                                } else if hub.activity.receiver_count() > 0 {
                                    let _ = hub.activity.send(Activity {
                                        function: function.to_string(),
                                        kind: msg.get_payload::<String>().unwrap_or_default(),
                                    });
                                }
                                if let Some(c) = chans {
                                    c.bump();
                                }
                            }
                        },
                        _ = ping.tick() => {
                            let alive = tokio::time::timeout(Duration::from_secs(3), sink.ping::<Value>()).await;
                            if !matches!(alive, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                tracing::warn!(%server, "lost the redis subscription; reconnecting");
                failing = true;
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(%server, error = %e, "cannot subscribe to redis; retrying");
                }
                failing = true;
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(%server, "subscribing to redis timed out; retrying");
                }
                failing = true;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn submit(
        &self,
        mut spec: JobSpec,
        body: Bytes,
        max_queue: usize,
    ) -> StoreResult<Submitted> {
        // The key lives in the job's `idem` field and its own key, not in the spec.
        let idempotency = spec.idempotency.take();
        let spec_json = serde_json::to_vec(&spec).expect("serialize job spec");
        let prio = spec.priority.index().to_string();
        let deadline = spec
            .start_deadline_ms
            .map(|d| d.to_string())
            .unwrap_or_default();
        let max_queue = max_queue.to_string();
        let submitted = spec.submitted_at_ms.to_string();
        let webhook = spec.webhook_url.clone().unwrap_or_default();
        let at = now_ms().to_string();
        let (idem_key, fingerprint) = idempotency
            .as_ref()
            .map_or(("", ""), |i| (i.key.as_str(), i.fingerprint.as_str()));
        let idem_keys: Vec<String> = idempotency
            .iter()
            .map(|i| format!("{}idem:{}", self.prefix, i.key))
            .collect();
        let reply = self
            .run(
                &self.hub.scripts.submit,
                &[
                    spec.id.as_bytes(),
                    &spec_json,
                    &body,
                    prio.as_bytes(),
                    deadline.as_bytes(),
                    max_queue.as_bytes(),
                    submitted.as_bytes(),
                    webhook.as_bytes(),
                    spec.owner.as_bytes(),
                    at.as_bytes(),
                    idem_key.as_bytes(),
                    fingerprint.as_bytes(),
                ],
                &idem_keys,
            )
            .await?;
        let r = array(reply)?;
        match num::<i64>(r.first(), "submit status")? {
            -3 => Err(StoreError::IdempotencyMismatch(text(
                r.get(2),
                "first request id",
            )?)),
            -2 => Err(StoreError::Duplicate(spec.id)),
            -1 => Err(StoreError::QueueFull(num(r.get(1), "queue length")?)),
            1 => Ok(Submitted {
                id: text(r.get(2), "first request id")?,
                position: num(r.get(1), "queue position")?,
                replayed: true,
            }),
            _ => {
                self.bump();
                Ok(Submitted {
                    id: spec.id,
                    position: num(r.get(1), "queue position")?,
                    replayed: false,
                })
            }
        }
    }

    async fn status(&self, id: &str) -> StoreResult<Option<JobStatus>> {
        // One script (not MULTI): atomic, one round trip, and routable in a cluster.
        let reply = self
            .run(&self.hub.scripts.status, &[id.as_bytes()], &[])
            .await?;
        let mut parts = array(reply)?.into_iter();
        let fields = array(parts.next().unwrap_or(Value::Nil))?;
        if fields.first().is_none_or(|v| matches!(v, Value::Nil)) {
            return Ok(None);
        }
        let rank = parts.next().as_ref().and_then(int_of);
        let logs = array(parts.next().unwrap_or(Value::Nil))?
            .iter()
            .filter_map(bytes_of)
            .filter_map(|b| serde_json::from_slice::<LogLine>(&b).ok())
            .collect();
        let record = self.record(&fields, logs)?;
        let queue_position = if record.phase == Phase::Queued {
            rank.and_then(|r| u64::try_from(r).ok())
        } else {
            None
        };
        Ok(Some(JobStatus {
            record,
            queue_position,
        }))
    }

    async fn result(&self, id: &str) -> StoreResult<Option<StoredResult>> {
        let jk = format!("{}job:{id}", self.prefix);
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&jk).arg("phase").arg("result");
        let cmd = &cmd;
        let f = array(
            self.guard(|mut c| async move { cmd.query_async::<Value>(&mut c).await })
                .await?,
        )?;
        if f.first().and_then(bytes_of).as_deref() != Some(b"c") {
            return Ok(None);
        }
        match f.get(1).and_then(bytes_of) {
            Some(raw) => decode_result(&raw).map(Some),
            None => Ok(None),
        }
    }

    async fn cancel(&self, id: &str) -> StoreResult<CancelOutcome> {
        let now = now_ms();
        let (c, r) = Self::system_args(SystemEnd::Cancelled, now, 0);
        let at = now.to_string();
        let reply = self
            .run(
                &self.hub.scripts.cancel,
                &[id.as_bytes(), &c, &r, at.as_bytes()],
                &[],
            )
            .await?;
        let r = array(reply)?;
        let outcome = match text(r.first(), "cancel outcome")?.as_str() {
            "notfound" => CancelOutcome::NotFound,
            "done" => CancelOutcome::AlreadyCompleted,
            "removed" => CancelOutcome::Removed,
            "running" => {
                let spec = parse_spec(r.get(1))?;
                // The pub/sub message reaches every replica; this one learns at once.
                let _ = self.chans.cancels.send(id.to_string());
                CancelOutcome::Running {
                    endpoint: spec.endpoint,
                }
            }
            other => return Err(corrupt(format!("cancel outcome {other:?}"))),
        };
        if outcome != CancelOutcome::NotFound && outcome != CancelOutcome::AlreadyCompleted {
            self.bump();
        }
        Ok(outcome)
    }

    async fn claim(&self, worker: &str, lease: Duration) -> StoreResult<Option<Claimed>> {
        loop {
            let now = now_ms();
            let (tc, tr) = Self::system_args(SystemEnd::StartTimeout, now, 0);
            let (lc, lr) = Self::system_args(SystemEnd::Lost, now, ATTEMPTS_PLACEHOLDER);
            let max = self.max_attempts.to_string();
            let lease_ms = (lease.as_millis() as u64).max(1).to_string();
            let at = now.to_string();
            let batch = SCRIPT_BATCH.to_string();
            let reply = self
                .run(
                    &self.hub.scripts.claim,
                    &[
                        max.as_bytes(),
                        lease_ms.as_bytes(),
                        &tc,
                        &tr,
                        &lc,
                        &lr,
                        at.as_bytes(),
                        batch.as_bytes(),
                        worker.as_bytes(),
                    ],
                    &[],
                )
                .await?;
            let r = array(reply)?;
            let ended: u32 = num(r.first(), "ended count")?;
            if ended > 0 {
                self.bump();
            }
            if r.len() < 10 {
                if ended >= SCRIPT_BATCH {
                    continue; // more expired jobs ahead: keep going
                }
                return Ok(None);
            }
            // {ended, id, spec, seq, attempts, token, lease, started, cancel, body}
            let spec = parse_spec(r.get(2))?;
            let token: u64 = num(r.get(5), "token")?;
            let record = JobRecord {
                spec,
                seq: num(r.get(3), "seq")?,
                phase: Phase::Running,
                attempts: num(r.get(4), "attempts")?,
                token,
                lease_until_ms: num(r.get(6), "lease")?,
                started_at_ms: num(r.get(7), "started")?,
                cancel_requested: num::<i64>(r.get(8), "cancel")? != 0,
                completion: None,
                logs: Vec::new(),
            };
            let body = Bytes::from(r.get(9).and_then(bytes_of).unwrap_or_default());
            self.bump();
            return Ok(Some(Claimed {
                record,
                body,
                token,
            }));
        }
    }

    async fn renew(&self, id: &str, token: u64, lease: Duration) -> StoreResult<Lease> {
        let token = token.to_string();
        let lease_ms = (lease.as_millis() as u64).max(1).to_string();
        let reply = self
            .run(
                &self.hub.scripts.renew,
                &[id.as_bytes(), token.as_bytes(), lease_ms.as_bytes()],
                &[],
            )
            .await?;
        Ok(match int_of(&reply) {
            Some(-1) | None => Lease::Lost,
            Some(flag) => Lease::Held {
                cancel_requested: flag != 0,
            },
        })
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
        let token = token.to_string();
        let at = completion.completed_at_ms.to_string();
        let c = serde_json::to_vec(&completion).expect("serialize completion");
        let r = encode_result(&result);
        let reply = self
            .run(
                &self.hub.scripts.complete,
                &[id.as_bytes(), token.as_bytes(), &c, &r, at.as_bytes()],
                &[],
            )
            .await?;
        let ok = int_of(&reply) == Some(1);
        if ok {
            self.bump();
        }
        Ok(ok)
    }

    async fn append_logs(&self, id: &str, lines: Vec<LogLine>) -> StoreResult<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let encoded: Vec<Vec<u8>> = lines
            .iter()
            .skip(lines.len().saturating_sub(MAX_LOG_LINES))
            .map(|l| serde_json::to_vec(l).expect("serialize log line"))
            .collect();
        let max = MAX_LOG_LINES.to_string();
        let mut args: Vec<&[u8]> = vec![id.as_bytes(), max.as_bytes()];
        args.extend(encoded.iter().map(|l| l.as_slice()));
        let reply = self.run(&self.hub.scripts.append_logs, &args, &[]).await?;
        if int_of(&reply) == Some(1) {
            self.bump();
        }
        Ok(())
    }

    async fn sweep(&self, now: u64, retention: Duration) -> StoreResult<Sweep> {
        let at = now_ms();
        let (tc, tr) = Self::system_args(SystemEnd::StartTimeout, at, 0);
        let cutoff = now.saturating_sub(retention.as_millis() as u64).to_string();
        let now_s = now.to_string();
        let at_s = at.to_string();
        let batch = SCRIPT_BATCH.to_string();
        let reply = self
            .run(
                &self.hub.scripts.sweep,
                &[
                    now_s.as_bytes(),
                    cutoff.as_bytes(),
                    &tc,
                    &tr,
                    at_s.as_bytes(),
                    batch.as_bytes(),
                ],
                &[],
            )
            .await?;
        let r = array(reply)?;
        let sweep = Sweep {
            start_timeouts: num(r.first(), "start timeouts")?,
            leases_expired: num(r.get(1), "leases expired")?,
            lost: 0,
            purged: num(r.get(2), "purged")?,
        };
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
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now_s = now.to_string();
        let limit = limit.to_string();
        let lease_ms = (lease.as_millis() as u64).to_string();
        let reply = self
            .run(
                &self.hub.scripts.due_deliveries,
                &[now_s.as_bytes(), limit.as_bytes(), lease_ms.as_bytes()],
                &[],
            )
            .await?;
        let r = array(reply)?;
        r.chunks_exact(5)
            .map(|c| {
                Ok(Delivery {
                    request_id: text(c.first(), "outbox id")?,
                    url: text(c.get(1), "webhook url")?,
                    owner: text(c.get(2), "owner")?,
                    attempts: num(c.get(3), "webhook attempts")?,
                    next_attempt_ms: num(c.get(4), "next attempt")?,
                })
            })
            .collect()
    }

    async fn delivery_attempted(
        &self,
        request_id: &str,
        attempts: u32,
        next_attempt_ms: Option<u64>,
    ) -> StoreResult<()> {
        let attempts = attempts.to_string();
        let next = next_attempt_ms.map(|n| n.to_string()).unwrap_or_default();
        self.run(
            &self.hub.scripts.delivery_attempted,
            &[request_id.as_bytes(), attempts.as_bytes(), next.as_bytes()],
            &[],
        )
        .await?;
        Ok(())
    }

    async fn load(&self) -> StoreResult<Load> {
        let r = array(self.run(&self.hub.scripts.load, &[], &[]).await?)?;
        let oldest: i64 = num(r.get(2), "oldest")?;
        let activity: i64 = num(r.get(3), "activity")?;
        Ok(Load {
            queued: num(r.first(), "queued")?,
            in_flight: num(r.get(1), "in flight")?,
            oldest_queued_ms: u64::try_from(oldest).ok(),
            last_activity_ms: u64::try_from(activity).unwrap_or(self.opened_at_ms),
            sync: num(r.get(4), "sync calls")?,
        })
    }

    async fn ready(&self) -> StoreResult<()> {
        self.probe_ready().await
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.chans.changed.subscribe()
    }

    fn cancellations(&self) -> broadcast::Receiver<String> {
        self.chans.cancels.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::OnceLock;

    /// A `redis-server` on a free port, in a temp dir, with `extra` arguments; it dies
    /// with the test process (PR_SET_PDEATHSIG from a thread that never exits).
    pub(crate) fn spawn_server(extra: &'static [&'static str]) -> u16 {
        spawn_server_with(extra.iter().map(|s| s.to_string()).collect())
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn spawn_server_with(extra: Vec<String>) -> u16 {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::os::unix::process::CommandExt;
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("fal-redis-test-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut cmd = std::process::Command::new(
                std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()),
            );
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(&extra)
                .arg("--dir")
                .arg(&dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            // SAFETY: prctl is async-signal-safe; nothing else runs before exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            // Lives as long as the test process (PR_SET_PDEATHSIG reaps it).
            #[allow(clippy::zombie_processes)]
            let _child = cmd.spawn().expect("start redis-server (is it installed?)");
            tx.send(port).unwrap();
            loop {
                std::thread::park();
            }
        });
        let port = rx.recv().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !matches!(ask(port, b"PING\r\n").as_deref(), Ok(r) if r.starts_with("+PONG")) {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on port {port} did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        port
    }

    /// One inline command, the first reply read raw.
    pub(crate) fn ask(port: u16, cmd: &[u8]) -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(cmd)?;
        let mut buf = vec![0u8; 8192];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// One standalone server per test process.
    pub(crate) fn server_port() -> u16 {
        static PORT: OnceLock<u16> = OnceLock::new();
        *PORT.get_or_init(|| spawn_server(&[]))
    }

    /// One 3-master Redis Cluster per test process (made with `redis-cli --cluster
    /// create`): its `redis+cluster://` URL.
    pub(crate) fn cluster_url() -> String {
        static URL: OnceLock<String> = OnceLock::new();
        URL.get_or_init(|| {
            let ports: Vec<u16> = (0..3)
                .map(|_| {
                    // The bus port is explicit: the default (port + 10000) is past 65535
                    // for high ports.
                    let bus = free_port().to_string();
                    spawn_server_with(
                        ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
                            .into_iter()
                            .chain(["--cluster-port", bus.as_str()])
                            .map(String::from)
                            .collect(),
                    )
                })
                .collect();
            let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            let out = std::process::Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&nodes)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
                .expect("run redis-cli --cluster create");
            assert!(out.status.success(), "redis-cli --cluster create: {out:?}");
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            for p in &ports {
                while !ask(*p, b"CLUSTER INFO\r\n").is_ok_and(|r| r.contains("cluster_state:ok")) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "cluster never became ok"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            format!("redis+cluster://{}", nodes.join(","))
        })
        .clone()
    }

    pub(crate) async fn test_store(max_attempts: u32) -> Arc<RedisStore> {
        let url = format!("redis://127.0.0.1:{}/0", server_port());
        let function = format!("test/{}", uuid::Uuid::new_v4());
        RedisStore::open(&url, &function, max_attempts)
            .await
            .unwrap()
    }

    #[test]
    fn prefix_is_a_hash_tag() {
        assert_eq!(key_prefix("default/app"), "fal:{default/app}:");
    }

    #[tokio::test]
    async fn unavailable_when_redis_is_down() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = RedisStore::open(&format!("redis://127.0.0.1:{port}/0"), "t/down", 3)
            .await
            .unwrap();
        let spec = crate::store::conformance::spec(crate::job::Priority::Normal);
        match store.submit(spec, Bytes::new(), 10).await {
            Err(StoreError::Unavailable(why)) => assert!(why.contains("redis"), "{why}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(matches!(
            store.status("x").await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.load().await,
            Err(StoreError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn positions_are_shared_between_replicas() {
        let url = format!("redis://127.0.0.1:{}/0", server_port());
        let function = format!("test/{}", uuid::Uuid::new_v4());
        let a = RedisStore::open(&url, &function, 3).await.unwrap();
        let b = RedisStore::open(&url, &function, 3).await.unwrap();
        let mut woken = b.changes();
        woken.borrow_and_update();
        let mut ids = Vec::new();
        for i in 0..5 {
            let s = crate::store::conformance::spec(crate::job::Priority::Normal);
            ids.push(s.id.clone());
            let pos = if i % 2 == 0 { &a } else { &b }
                .submit(s, Bytes::new(), 100)
                .await
                .unwrap();
            assert_eq!(pos.position, i);
        }
        tokio::time::timeout(Duration::from_secs(5), woken.changed())
            .await
            .unwrap()
            .unwrap();
        let c = b
            .claim("w", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.record.spec.id, ids[0]);
        assert_eq!(
            a.status(&ids[4]).await.unwrap().unwrap().queue_position,
            Some(3)
        );
        assert_eq!(a.load().await.unwrap().in_flight, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_hand_out_each_job_once() {
        let url = format!("redis://127.0.0.1:{}/0", server_port());
        let function = format!("test/{}", uuid::Uuid::new_v4());
        let a = RedisStore::open(&url, &function, 3).await.unwrap();
        let b = RedisStore::open(&url, &function, 3).await.unwrap();
        let mut ids = std::collections::HashSet::new();
        for _ in 0..200 {
            let s = crate::store::conformance::spec(crate::job::Priority::Normal);
            ids.insert(s.id.clone());
            a.submit(s, Bytes::new(), 1000).await.unwrap();
        }
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..8 {
            let s: Arc<RedisStore> = if n % 2 == 0 { a.clone() } else { b.clone() };
            tasks.spawn(async move {
                let mut got = Vec::new();
                while let Some(c) = s.claim("w", Duration::from_secs(30)).await.unwrap() {
                    got.push(c.record.spec.id);
                }
                got
            });
        }
        let mut claimed = Vec::new();
        while let Some(r) = tasks.join_next().await {
            claimed.extend(r.unwrap());
        }
        assert_eq!(claimed.len(), 200, "each job handed out once");
        assert_eq!(
            claimed
                .into_iter()
                .collect::<std::collections::HashSet<_>>(),
            ids
        );
        assert_eq!(a.load().await.unwrap().in_flight, 200);
    }

    #[tokio::test]
    async fn pending_webhooks_do_not_block_purges_and_logs_are_bounded() {
        let s = test_store(3).await;
        let mut hooked = crate::store::conformance::spec(crate::job::Priority::Normal);
        hooked.webhook_url = Some("http://127.0.0.1:9/hook".into());
        let plain = crate::store::conformance::spec(crate::job::Priority::Normal);
        for spec in [hooked.clone(), plain.clone()] {
            s.submit(spec, Bytes::new(), 10).await.unwrap();
            let c = s
                .claim("w", Duration::from_secs(30))
                .await
                .unwrap()
                .unwrap();
            let lines = (0..2100)
                .map(|i| LogLine::new(format!("l{i}"), "STDOUT"))
                .collect();
            s.append_logs(&c.record.spec.id, lines).await.unwrap();
            let st = s.status(&c.record.spec.id).await.unwrap().unwrap();
            assert_eq!(st.record.logs.len(), MAX_LOG_LINES);
            assert_eq!(st.record.logs.last().unwrap().message, "l2099");
            let (done, result) = system_end(SystemEnd::Cancelled, now_ms(), 1);
            assert!(s
                .complete(&c.record.spec.id, c.token, done, result)
                .await
                .unwrap());
        }
        let sweep = s
            .sweep(now_ms() + 10_000, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(sweep.purged, 1, "the job with a pending webhook stays");
        assert!(s.status(&hooked.id).await.unwrap().is_some());
        assert!(s.status(&plain.id).await.unwrap().is_none());
        s.delivery_attempted(&hooked.id, 1, None).await.unwrap();
        let sweep = s
            .sweep(now_ms() + 10_000, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(sweep.purged, 1);
        assert!(s.result(&hooked.id).await.unwrap().is_none());
    }

    crate::conformance_tests!(|_dir: std::path::PathBuf| async move {
        test_store(3).await as std::sync::Arc<dyn Store>
    });

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_replicas_wait_for_a_replica_or_refuse() {
        let spec = crate::store::conformance::spec;
        let durable = |timeout_ms| Durability {
            replicas: 1,
            timeout: Duration::from_millis(timeout_ms),
        };
        // No replica: the write lands on the primary but is not acknowledged.
        let lonely = spawn_server(&[]);
        let url = format!("redis://127.0.0.1:{lonely}/0");
        let s = RedisStore::open_with(&url, "test/wait", 3, durable(200))
            .await
            .unwrap();
        let j = spec(crate::job::Priority::Normal);
        match s.submit(j.clone(), Bytes::new(), 10).await {
            Err(StoreError::Unavailable(why)) => {
                assert!(why.contains("0 of 1 redis replicas"), "{why}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        // A primary with one replica attached: acknowledged.
        let primary = spawn_server(&[]);
        let replica = spawn_server(&[]);
        ask(
            replica,
            format!("REPLICAOF 127.0.0.1 {primary}\r\n").as_bytes(),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ask(primary, b"INFO replication\r\n").is_ok_and(|r| r.contains("state=online")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the replica never attached"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let url = format!("redis://127.0.0.1:{primary}/0");
        let s = RedisStore::open_with(&url, "test/wait", 3, durable(2000))
            .await
            .unwrap();
        let j = spec(crate::job::Priority::Normal);
        let sub = s.submit(j.clone(), Bytes::new(), 10).await.unwrap();
        assert_eq!(sub.id, j.id);
        let c = s
            .claim("w", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        let result = StoredResult {
            status: 200,
            headers: vec![],
            body: Bytes::from_static(b"{}"),
        };
        let done = crate::job::app_end(200, now_ms(), 0.1);
        assert!(s.complete(&j.id, c.token, done, result).await.unwrap());
        // What the replica has is what was acknowledged.
        let on_replica = ask(
            replica,
            format!("HGET fal:{{test/wait}}:job:{} phase\r\n", j.id).as_bytes(),
        )
        .unwrap();
        assert!(on_replica.contains("\r\nc\r\n"), "{on_replica:?}");
    }

    /// The same suite on a 3-master Redis Cluster: every script routes by its declared
    /// keys and runs on the node that owns the function's slot.
    mod cluster {
        use super::*;

        pub(crate) async fn cluster_store(max_attempts: u32) -> Arc<RedisStore> {
            let function = format!("test/{}", uuid::Uuid::new_v4());
            RedisStore::open(&cluster_url(), &function, max_attempts)
                .await
                .unwrap()
        }

        crate::conformance_tests!(|_dir: std::path::PathBuf| async move {
            cluster_store(3).await as std::sync::Arc<dyn Store>
        });

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn functions_spread_over_shards_and_replicas_hear_each_other() {
            let url = cluster_url();
            for _ in 0..12 {
                let function = format!("spread/{}", uuid::Uuid::new_v4());
                let a = RedisStore::open(&url, &function, 3).await.unwrap();
                // A second replica of the function, with its own connections (its
                // subscription may sit on any node of the cluster).
                let b = RedisStore::open(&url, &function, 3).await.unwrap();
                let mut woken = b.changes();
                woken.borrow_and_update();
                let mut received = false;
                for _ in 0..50 {
                    let spec = crate::store::conformance::spec(crate::job::Priority::Normal);
                    a.submit(spec.clone(), Bytes::new(), 100).await.unwrap();
                    assert!(b.status(&spec.id).await.unwrap().is_some());
                    // The subscription connects in the background: submit until heard.
                    if tokio::time::timeout(Duration::from_millis(100), woken.changed())
                        .await
                        .is_ok()
                    {
                        received = true;
                        break;
                    }
                }
                assert!(received, "replica b never heard a submit on a");
            }
            let ports: Vec<u16> = url
                .trim_start_matches("redis+cluster://")
                .split(',')
                .map(|h| h.rsplit(':').next().unwrap().parse().unwrap())
                .collect();
            let holding = ports
                .iter()
                .filter(|p| ask(**p, b"KEYS fal:{spread/*\r\n").is_ok_and(|r| !r.starts_with("*0")))
                .count();
            assert!(holding > 1, "12 functions all landed on one shard");
        }
    }
}
