//! [`RedisStore`]: the `Store` of one function over the hub's connection, each state
//! change one script of `lua/`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::Value;
use tokio::sync::{broadcast, watch};

use super::group_wait::{GroupWait, Outcome};
use super::hub::{Channels, Durability, RedisHub, Subscribe};
use super::key_prefix;
use super::ready;
use super::reply::{array, bytes_of, corrupt, int_of, num, parse_spec, phase_of, text};
use super::scripts::Scripted;
use crate::job::{
    now_ms, system_end, Completion, JobRecord, JobSpec, LogLine, Phase, StoredResult, SystemEnd,
};
use crate::store::embedded::{decode_result, encode_result};
use crate::store::redis_conn::Conn;
use crate::store::{
    CancelOutcome, Claimed, Delivery, JobStatus, Lease, Load, Store, StoreError, StoreResult,
    Submitted, Sweep,
};

/// Log lines kept per request (older lines are dropped first).
pub(super) const MAX_LOG_LINES: usize = 2000;
/// Items one claim or sweep script handles at most (keeps scripts short).
const SCRIPT_BATCH: u32 = 500;
/// Stand-in for the attempt count in the prebuilt "lost" result; the claim script
/// substitutes the real count.
const ATTEMPTS_PLACEHOLDER: u32 = u32::MAX;

/// The queue of one function, over a [`RedisHub`] (see [the module docs](super)).
pub struct RedisStore {
    pub(super) hub: Arc<RedisHub>,
    pub(super) prefix: String,
    pub(super) max_attempts: u32,
    pub(super) chans: Arc<Channels>,
    pub(super) opened_at_ms: u64,
    /// The last probe of this function's primary ([`Store::ready`]).
    pub(super) ready: ready::ProbeCell,
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

    /// With `--store-replicas N`: the script goes out in the function's next group of
    /// durable writes, `EVALSHA … WAIT N` on one connection (in a cluster: to the node
    /// that owns the function's slot), so the WAIT counts the replicas that have *this*
    /// write ([`GroupWait`]). A pipeline the cluster client re-sends after a failover
    /// runs the script again on the new primary (the submit script recognises its own
    /// job) and waits there. Fewer replicas than N within the bound, or any error:
    /// `Unavailable` (503), never a silent acknowledgement.
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
        let eval = |eval: &str, script: &[u8]| {
            let mut c = redis::cmd(eval);
            c.arg(script).arg(keys.len()).arg(&keys);
            c.arg(self.prefix.as_str());
            for a in args {
                c.arg(*a);
            }
            c
        };
        let group = self.hub.group.get_or_init(|| GroupWait::start(&self.hub));
        let cmd = eval("EVALSHA", s.script.get_hash().as_bytes());
        match group.run(Arc::from(self.prefix.as_str()), cmd).await {
            Outcome::Done(r) => return r,
            Outcome::NoScript => {}
        }
        // Not cached on this node yet (a new or restarted primary): send it whole, with
        // a WAIT of its own.
        let mut whole = redis::pipe();
        whole
            .add_command(eval("EVAL", s.script_source.as_bytes()))
            .cmd("WAIT")
            .arg(replicas)
            .arg(timeout.as_millis() as u64);
        let whole = &whole;
        let reply = self
            .hub
            .guard_on(self.hub.wait_conn(), |mut c| async move {
                whole.query_async::<(Value, i64)>(&mut c).await
            })
            .await;
        let (value, confirmed) = reply?;
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
            self.chans.bump_ended();
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
                self.chans.bump_ended();
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
            self.chans.bump_ended();
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
            next_due_ms: u64::try_from(num::<i64>(r.get(3), "next due")?).ok(),
        };
        if sweep.changed() {
            self.chans.bump_ended();
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

    fn outbox_changes(&self) -> watch::Receiver<u64> {
        self.chans.ended.subscribe()
    }

    fn cancellations(&self) -> broadcast::Receiver<String> {
        self.chans.cancels.subscribe()
    }
}
