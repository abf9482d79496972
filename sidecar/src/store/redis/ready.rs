//! Readiness of the Redis store: "a submit would be stored now", checked the way a
//! submit goes, not with a `PING`.
//!
//! A probe ([`RedisHub::ready`]: every primary, since a gateway writes to every shard;
//! a sidecar's store: the primary of its function's slot) does three things:
//! 1. puts the store's scripts in the script cache of the primaries (`SCRIPT EXISTS`,
//!    `SCRIPT LOAD` of what is missing; in a cluster both go to every primary).
//!    Otherwise the first write of each script gets `NOSCRIPT` and is sent again, and
//!    with `--store-replicas` the `WAIT` that followed the refused `EVALSHA` blocks
//!    first: a fresh primary's first submit took two `WAIT` bounds (about 2 s) and
//!    could be refused. (A primary promoted by a failover has an empty cache until the
//!    next probe; meanwhile the `EVAL` fallback of `run_replicated` covers it.)
//! 2. writes one fixed key (`SET … PX`) per probed primary on every connection that
//!    writes: those connections are made lazily, and for Sentinel each one asks the
//!    sentinels for the master; the probe makes them before the first request, not
//!    during it.
//! 3. with `--store-replicas N`, follows each write on a `WAIT` connection with
//!    `WAIT N` (bounded by `min(--store-replicas-timeout, 1 s)`): N replicas must *have*
//!    the probe write, not only be attached. A replica that has just synced is listed
//!    by its primary before the primary streams writes to it — Redis starts the stream
//!    on the replica's next `REPLCONF ACK`, up to a second later — and meanwhile a
//!    `WAIT` takes up to that second or times out: the refused first submits of a
//!    fresh replica set. That same replica's first ACK confirms the writes its copy
//!    already held, so one confirmed write is not proof: the probe first has one
//!    write confirmed, then writes again on every connection.
//!
//! The probe is bounded by [`READY_TIMEOUT`]; concurrent probes share one run and a
//! result is reused for [`REUSE`], so a readiness probe every few seconds costs a few
//! round trips and no new key.

use std::future::Future;
use std::time::Duration;

use redis::Value;

use super::reply::int_of;
use super::{Durability, RedisHub, RedisStore};
use crate::job::now_ms;
use crate::store::redis_conn::Conn;
use crate::store::{StoreError, StoreResult, READY_TIMEOUT};

/// How long a probe result is reused (probes from several clients at once run once).
const REUSE: Duration = Duration::from_millis(200);
/// Longest `WAIT` of a probe: the whole probe stays under [`READY_TIMEOUT`].
const PROBE_WAIT_MAX: Duration = Duration::from_secs(1);
/// The probe keys expire unless probed again (a function that is gone leaves nothing).
const PROBE_TTL_MS: u64 = 300_000;
/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The last probe's outcome, shared by concurrent callers.
#[derive(Default)]
pub(crate) struct ProbeCell {
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Result<(), String>)>>,
}

impl ProbeCell {
    /// The outcome of a probe run at most [`REUSE`] ago, else of `probe` (bounded by
    /// [`READY_TIMEOUT`]).
    pub(crate) async fn get<F, Fut>(&self, probe: F) -> StoreResult<()>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = StoreResult<()>>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, outcome)) = last.as_ref() {
            if at.elapsed() < REUSE {
                return outcome.clone().map_err(StoreError::Unavailable);
            }
        }
        let outcome = match tokio::time::timeout(READY_TIMEOUT, probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(StoreError::Unavailable(why))) => Err(why),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the store did not finish a probe write within {READY_TIMEOUT:?}"
            )),
        };
        *last = Some((tokio::time::Instant::now(), outcome.clone()));
        outcome.map_err(StoreError::Unavailable)
    }
}

impl RedisHub {
    /// Whether a submit to any function would be stored now (see the module docs):
    /// every primary takes a probe write on every connection that writes, confirmed by
    /// `--store-replicas` replicas. The gateway's `/readyz`.
    pub async fn ready(&self) -> StoreResult<()> {
        self.ready_all
            .get(|| async {
                let keys = self.probe_keys_everywhere().await?;
                self.probe(&keys).await
            })
            .await
    }

    /// One probe key per primary: with a cluster, a key in a slot of each primary
    /// (from `CLUSTER SLOTS`); else one key.
    async fn probe_keys_everywhere(&self) -> StoreResult<Vec<String>> {
        if !self.cluster {
            return Ok(vec![probe_key(0)]);
        }
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let cmd = &cmd;
        let reply = self
            .guard(|mut c| async move { cmd.query_async::<Value>(&mut c).await })
            .await?;
        let ranges = parse_cluster_slots(&reply)
            .ok_or_else(|| self.unavailable(format!("unexpected CLUSTER SLOTS reply {reply:?}")))?;
        Ok(keys_per_primary(&ranges))
    }

    /// Scripts cached, then a write of each of `keys` on every connection that
    /// writes (with `WAIT` on the connections durable writes use).
    pub(crate) async fn probe(&self, keys: &[String]) -> StoreResult<()> {
        self.cache_scripts().await?;
        let value = now_ms().to_string();
        // First one confirmed write per key, then the writes on every connection. A
        // replica's first `REPLCONF ACK` after a sync can confirm writes older than its
        // copy (they were in it) before the primary streams new writes to it; a write
        // sent after a confirmed one is confirmed only by a replica that is streamed to.
        if let Some(first) = self.wait_pool.first() {
            futures_util::future::try_join_all(
                keys.iter()
                    .map(|key| self.probe_write(first, key, &value, true)),
            )
            .await?;
        }
        let mut writes = Vec::new();
        for key in keys {
            writes.push(self.probe_write(&self.conn, key, &value, false));
            for conn in &self.wait_pool {
                writes.push(self.probe_write(conn, key, &value, true));
            }
        }
        futures_util::future::try_join_all(writes).await?;
        Ok(())
    }

    /// `SCRIPT EXISTS` every script the store sends; `SCRIPT LOAD` the missing ones (the
    /// cluster client sends both to every primary; EXISTS answers the AND of theirs).
    async fn cache_scripts(&self) -> StoreResult<()> {
        let all = self.scripts.all();
        let mut exists = redis::cmd("SCRIPT");
        exists.arg("EXISTS");
        for s in &all {
            exists.arg(s.script.get_hash());
        }
        let exists = &exists;
        let reply = self
            .guard(|mut c| async move { exists.query_async::<Value>(&mut c).await })
            .await?;
        let cached: Vec<bool> = match &reply {
            Value::Array(items) => items
                .iter()
                .map(|v| matches!(v, Value::Boolean(true)) || int_of(v) == Some(1))
                .collect(),
            _ => vec![false; all.len()],
        };
        for (s, cached) in all
            .iter()
            .zip(cached.into_iter().chain(std::iter::repeat(false)))
        {
            if cached {
                continue;
            }
            let mut load = redis::cmd("SCRIPT");
            load.arg("LOAD").arg(s.script_source.as_str());
            let load = &load;
            self.guard(|mut c| async move { load.query_async::<Value>(&mut c).await })
                .await?;
        }
        Ok(())
    }

    /// `SET key value PX ttl` on `conn`, followed by `WAIT` when `wait` and
    /// `--store-replicas` is set (one pipeline: the `WAIT` counts this very write).
    async fn probe_write(
        &self,
        conn: &Conn,
        key: &str,
        value: &str,
        wait: bool,
    ) -> StoreResult<()> {
        let Durability { replicas, timeout } = self.durability;
        let bound = timeout.min(PROBE_WAIT_MAX);
        let wait = wait && replicas > 0;
        let mut p = redis::pipe();
        p.cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(PROBE_TTL_MS)
            .ignore();
        if wait {
            p.cmd("WAIT").arg(replicas).arg(bound.as_millis() as u64);
        }
        let p = &p;
        let reply = self
            .guard_on(
                conn,
                |mut c| async move { p.query_async::<Value>(&mut c).await },
            )
            .await?;
        if !wait {
            return Ok(());
        }
        let confirmed = match &reply {
            Value::Array(items) => items.first().and_then(int_of),
            other => int_of(other),
        }
        .unwrap_or(0);
        if confirmed < i64::from(replicas) {
            return Err(self.unavailable(format!(
                "only {confirmed} of {replicas} replicas confirmed a probe write within {bound:?} \
                 (--store-replicas {replicas}), so a submit now would be refused: check that \
                 {replicas} replica(s) of the primary are up with their link up (INFO \
                 replication on the primary)"
            )));
        }
        Ok(())
    }
}

impl RedisStore {
    /// [`crate::store::Store::ready`]: the probe of the primary that holds this
    /// function's slot.
    pub(crate) async fn probe_ready(&self) -> StoreResult<()> {
        let key = format!("{}ready", self.prefix);
        self.ready
            .get(|| async { self.hub.probe(std::slice::from_ref(&key)).await })
            .await
    }
}

/// The `n`-th hub probe key (its own hash tag: no function's keys share it, since a
/// function's tag holds a `/`).
fn probe_key(n: u32) -> String {
    format!("fal:{{ready-{n}}}:probe")
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the part between
/// the first `{` and the next `}`, when not empty), else of the whole key.
pub(crate) fn key_slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&c| c == b'{').and_then(|open| {
        let rest = &b[open + 1..];
        rest.iter()
            .position(|&c| c == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(b) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// `CLUSTER SLOTS` as `(first slot, last slot, primary "host:port")` ranges.
fn parse_cluster_slots(reply: &Value) -> Option<Vec<(u16, u16, String)>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    ranges
        .iter()
        .map(|r| {
            let Value::Array(f) = r else { return None };
            let first = u16::try_from(int_of(f.first()?)?).ok()?;
            let last = u16::try_from(int_of(f.get(1)?)?).ok()?;
            let Value::Array(node) = f.get(2)? else {
                return None;
            };
            let host = match node.first()? {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let port = int_of(node.get(1)?)?;
            Some((first, last, format!("{host}:{port}")))
        })
        .collect()
}

/// One probe key in a slot of each primary of `ranges` (in the order the primaries
/// first appear).
fn keys_per_primary(ranges: &[(u16, u16, String)]) -> Vec<String> {
    let mut primaries: Vec<&str> = Vec::new();
    for (_, _, p) in ranges {
        if !primaries.contains(&p.as_str()) {
            primaries.push(p);
        }
    }
    let mut keys: Vec<Option<String>> = vec![None; primaries.len()];
    let mut left = primaries.len();
    // A primary that holds a single slot is hit once in 16384 keys on average.
    for n in 0..(u32::from(SLOTS) * 64) {
        if left == 0 {
            break;
        }
        let key = probe_key(n);
        let slot = key_slot(&key);
        let Some((_, _, owner)) = ranges.iter().find(|(a, b, _)| (*a..=*b).contains(&slot)) else {
            continue;
        };
        let i = primaries.iter().position(|p| p == owner).expect("listed");
        if keys[i].is_none() {
            keys[i] = Some(key);
            left -= 1;
        }
    }
    keys.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_cluster_slots() {
        // Values from `CLUSTER KEYSLOT` of a real Redis 7.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"));
        assert_ne!(
            key_slot("foo{}{bar}"),
            key_slot("bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(
            key_slot("fal:{default/app}:queue"),
            key_slot("fal:{default/app}:job:x")
        );
    }

    #[test]
    fn every_primary_gets_a_key_in_its_slots() {
        let ranges = vec![
            (0, 5460, "a:1".to_string()),
            (5461, 10922, "b:1".to_string()),
            (10923, 16382, "c:1".to_string()),
            // a primary with one slot only
            (16383, 16383, "d:1".to_string()),
        ];
        let keys = keys_per_primary(&ranges);
        assert_eq!(keys.len(), 4);
        let owners: Vec<&str> = keys
            .iter()
            .map(|k| {
                let s = key_slot(k);
                ranges
                    .iter()
                    .find(|(a, b, _)| (*a..=*b).contains(&s))
                    .unwrap()
                    .2
                    .as_str()
            })
            .collect();
        assert_eq!(owners, ["a:1", "b:1", "c:1", "d:1"]);
        assert!(keys.iter().all(|k| !k.contains('/')));
    }

    #[test]
    fn parses_cluster_slots() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(5460),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(7000), bulk("id")]),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(7003), bulk("id2")]),
        ])]);
        assert_eq!(
            parse_cluster_slots(&reply),
            Some(vec![(0, 5460, "127.0.0.1:7000".to_string())])
        );
        assert_eq!(parse_cluster_slots(&Value::Nil), None);
    }

    /// What `/readyz` reports with `--store-replicas 1`: not ready while no replica
    /// confirms a write, ready once one is attached, not ready again when it leaves;
    /// the scripts are cached by the probe even while it fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ready_means_a_write_the_replicas_confirm() {
        use crate::store::redis::tests::{ask, spawn_server};
        use crate::store::Store;
        let durability = Durability {
            replicas: 1,
            timeout: Duration::from_millis(300),
        };
        let primary = spawn_server(&[]);
        let url = format!("redis://127.0.0.1:{primary}/0");
        let s = RedisStore::open_with(&url, "test/probed", 3, durability)
            .await
            .unwrap();
        let e = s.ready().await.unwrap_err().to_string();
        assert!(e.contains("0 of 1 replicas confirmed a probe write"), "{e}");
        let shas: String = s
            .hub
            .scripts
            .all()
            .iter()
            .map(|x| format!(" {}", x.script.get_hash()))
            .collect();
        let exists = ask(primary, format!("SCRIPT EXISTS{shas}\r\n").as_bytes()).unwrap();
        assert_eq!(exists, format!("*14\r\n{}", ":1\r\n".repeat(14)));

        let replica = spawn_server(&[]);
        ask(
            replica,
            format!("REPLICAOF 127.0.0.1 {primary}\r\n").as_bytes(),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while let Err(e) = s.ready().await {
            assert!(std::time::Instant::now() < deadline, "never ready: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Ready means the next submits are confirmed (within 300 ms here).
        for _ in 0..20 {
            let spec = crate::store::conformance::spec(crate::job::Priority::Normal);
            s.submit(spec, bytes::Bytes::new(), 100).await.unwrap();
        }

        ask(replica, b"REPLICAOF NO ONE\r\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while s.ready().await.is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "still ready without a replica"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // One probe key, however many probes ran.
        let keys = ask(primary, b"KEYS *:ready\r\n").unwrap();
        assert_eq!(keys, "*1\r\n$23\r\nfal:{test/probed}:ready\r\n", "{keys}");
    }

    /// The gateway's probe writes to every primary of a cluster.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hub_probes_every_primary_of_a_cluster() {
        use crate::store::redis::tests::{ask, cluster_url};
        let url = cluster_url();
        let hub = RedisHub::connect(&url, super::super::Subscribe::All).unwrap();
        hub.ready().await.unwrap();
        for hostport in url.trim_start_matches("redis+cluster://").split(',') {
            let port: u16 = hostport.rsplit(':').next().unwrap().parse().unwrap();
            let keys = ask(port, b"KEYS fal:{ready-*}:probe\r\n").unwrap();
            assert!(keys.starts_with("*1\r\n"), "node {port}: {keys:?}");
        }
    }
}
