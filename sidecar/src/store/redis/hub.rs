//! The connection hub: one command connection (plus one per HTTP server thread, and with
//! `--store-replicas` a pool for the writes that `WAIT`) and one pub/sub subscription,
//! shared by the stores of every function a process serves; the subscription feeds each
//! store's `changes()` and `cancellations()`. Where it connects (one server, a cluster,
//! Sentinel) is `store::redis_conn`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::Value;
use tokio::sync::{broadcast, watch};

use super::group_wait::GroupWait;
use super::scripts::Scripts;
use super::{key_prefix, ready, RedisStore};
use crate::job::now_ms;
use crate::store::redis_conn::{Conn, Target};
use crate::store::{StoreError, StoreResult};

/// Upper bound on one store call (a stalled Redis must not stall callers).
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections for writes that WAIT for replicas (`--store-replicas`).
const WAIT_CONNECTIONS: usize = 8;
/// Server threads that get a command connection of their own (more share `conn`).
const LOCAL_SLOTS: usize = 16;

/// What one shared connection subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscribe {
    /// The channels of one function (a sidecar: it hears only its own queue).
    One(String),
    /// Every function's channels (the gateway and the autoscaler), by pattern.
    All,
}

/// A server thread's own command connection. Its first command starts the
/// connection, on the thread's runtime, and goes on the shared connection meanwhile:
/// no request waits for a connection to be made (a handshake is round trips, and to a
/// distant or slow Redis those would eat into the request's time bound). Once the new
/// connection has answered a `PING` it takes the thread's commands; a failed attempt is
/// retried a second later, on a later command. A connection belongs to the hub's
/// [`RedisHub::epoch`] it was made in: when the subscription breaks (Redis restarted,
/// a failover) the thread goes back to the shared connection, which the background
/// loops keep using and so repair at once, and makes a new one of its own; an idle
/// thread's old connection would fail the first request that used it.
#[derive(Default)]
struct LocalConn {
    conn: std::sync::RwLock<Option<(u64, Conn)>>,
    /// A connection attempt is under way (or waiting out its retry delay).
    starting: std::sync::atomic::AtomicBool,
}

impl LocalConn {
    fn current(&self, epoch: u64) -> Option<Conn> {
        match &*self.conn.read().unwrap_or_else(|e| e.into_inner()) {
            Some((e, c)) if *e == epoch => Some(c.clone()),
            _ => None,
        }
    }

    fn start(self: &Arc<Self>, target: &Target, epoch: u64) {
        use std::sync::atomic::Ordering;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.starting.swap(true, Ordering::AcqRel) {
            return;
        }
        let slot = self.clone();
        let conn = target.connect();
        runtime.spawn(async move {
            let answered = match conn {
                Ok(mut c) => {
                    let ping = redis::cmd("PING");
                    match tokio::time::timeout(OP_TIMEOUT, ping.query_async::<Value>(&mut c)).await
                    {
                        Ok(Ok(_)) => Some(c),
                        _ => None,
                    }
                }
                Err(_) => None,
            };
            match answered {
                Some(c) => {
                    *slot.conn.write().unwrap_or_else(|e| e.into_inner()) = Some((epoch, c));
                }
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
            slot.starting.store(false, Ordering::Release);
        });
    }
}

/// Pub/sub fan-out of one function: status streams and workers wait on `changed`,
/// the webhook loop on `ended`, workers hear cancels on `cancels`.
pub(super) struct Channels {
    pub(super) changed: watch::Sender<u64>,
    /// Moves only when jobs may have ended (and queued their webhooks): see
    /// [`ENDING_EVENTS`].
    pub(super) ended: watch::Sender<u64>,
    pub(super) cancels: broadcast::Sender<String>,
}

/// The events that the scripts which end jobs (`finish` in prelude.lua) publish. A
/// submit, a claim, a release or new logs end nothing, so they do not wake the webhook
/// loop for an outbox read that would find nothing new.
pub(super) const ENDING_EVENTS: &[&[u8]] = &[b"complete", b"cancel", b"end", b"sweep"];

impl Channels {
    pub(super) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A change that may have ended jobs.
    pub(super) fn bump_ended(&self) {
        self.bump();
        self.ended.send_modify(|v| *v = v.wrapping_add(1));
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

/// Multiplexed Redis connections (a shared one, and one per HTTP server thread that
/// sends commands) and one subscription, shared by the stores of every function a
/// process serves: a gateway that knows a thousand functions holds a handful of
/// connections, not two thousand.
pub struct RedisHub {
    pub(super) conn: Conn,
    /// A command connection per server thread ([`crate::server::thread_slot`]), made
    /// by that thread's first command and driven by its runtime: a handler's command
    /// and its answer never cross threads (with one shared connection every submit
    /// woke the thread that drives it and was woken back: 2 of the 3 busy threads'
    /// time went to those wake-ups). Other threads use `conn`, and so does a server
    /// thread until its own connection answers (see [`LocalConn`]).
    local: Box<[Arc<LocalConn>]>,
    /// Moves each time the subscription breaks or comes back: server threads' own
    /// connections from before are not used again.
    epoch: std::sync::atomic::AtomicU64,
    target: Target,
    /// With `--store-replicas`: connections for the writes that WAIT. A WAIT holds its
    /// connection until the replicas answer, so every other command sent on it queues
    /// behind; several connections keep one WAIT from stalling every write.
    pub(super) wait_pool: Vec<Conn>,
    next_wait: std::sync::atomic::AtomicUsize,
    /// The server, for error messages (no credentials).
    pub(super) server: String,
    pub(super) durability: Durability,
    /// The runtime that made the hub: its background tasks run there.
    pub(super) runtime: tokio::runtime::Handle,
    /// With `--store-replicas`: the writers that group durable writes under one WAIT
    /// (started by the first of them).
    pub(super) group: std::sync::OnceLock<GroupWait>,
    pub(super) scripts: Scripts,
    channels: std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<Channels>>>,
    activity: broadcast::Sender<Activity>,
    subscriber: std::sync::OnceLock<tokio::task::AbortHandle>,
    /// Subscribed to every function ([`Subscribe::All`]).
    follows_all: bool,
    /// A Redis Cluster: a probe of every primary needs a key in each one's slots.
    pub(super) cluster: bool,
    /// The last probe of every primary ([`RedisHub::ready`]).
    pub(super) ready_all: ready::ProbeCell,
}

impl Drop for RedisHub {
    fn drop(&mut self) {
        if let Some(s) = self.subscriber.get() {
            s.abort();
        }
    }
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
    /// Connects to `url` (see [`crate::store::redis_conn`]: one server, a cluster, or a
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
            local: (0..LOCAL_SLOTS).map(|_| Arc::default()).collect(),
            epoch: Default::default(),
            target: target.clone(),
            follows_all,
            cluster: matches!(target, Target::Cluster { .. }),
            ready_all: Default::default(),
            conn,
            wait_pool,
            next_wait: Default::default(),
            server,
            durability,
            runtime: tokio::runtime::Handle::current(),
            group: std::sync::OnceLock::new(),
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
                    ended: watch::channel(0u64).0,
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
        live.iter().for_each(|c| c.bump_ended());
    }

    pub(super) fn unavailable(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("redis at {}: {e}", self.server))
    }

    /// Runs one request with a time bound. A refused connection means the request was
    /// never sent (and the manager reconnects when it sees one), so that case is tried
    /// once more: the first call after Redis comes back does not fail for nothing.
    pub(super) async fn guard<T, F, Fut>(&self, op: F) -> StoreResult<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.guard_on(&self.command_conn(), op).await
    }

    /// The command connection for the current thread: its own on a server thread once
    /// that answers (and was made since the subscription last broke), else the shared
    /// one.
    pub(super) fn command_conn(&self) -> Conn {
        let Some(slot) = crate::server::thread_slot().and_then(|i| self.local.get(i)) else {
            return self.conn.clone();
        };
        let epoch = self.epoch.load(std::sync::atomic::Ordering::Acquire);
        if let Some(own) = slot.current(epoch) {
            return own;
        }
        slot.start(&self.target, epoch);
        self.conn.clone()
    }

    #[cfg(test)]
    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The server threads' own connections are made again (see [`LocalConn`]).
    fn renew_thread_connections(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The next connection for a write that WAITs (round robin).
    pub(super) fn wait_conn(&self) -> &Conn {
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
    pub(super) async fn guard_on<T, F, Fut>(&self, conn: &Conn, mut op: F) -> StoreResult<T>
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
                    Some(h) => {
                        h.renew_thread_connections();
                        h.bump_all();
                    }
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
                                    if kind == "events" && ENDING_EVENTS.contains(&msg.get_payload_bytes()) {
                                        c.bump_ended();
                                    } else {
                                        c.bump();
                                    }
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
                if let Some(h) = hub.upgrade() {
                    h.renew_thread_connections();
                }
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
