//! `fal-operator gateway`: the always-on entry point of every FalFunction.
//!
//! - The queue API (all three generations) is the sidecar library's own handlers over
//!   the function's store: submit, status, result and cancel never wait for a replica.
//! - Sync calls go to a ready replica with a free slot (`maxConcurrency` per replica,
//!   counted here), streamed both ways; with none free they are held here while the
//!   function scales (from zero, or up), and the autoscaler is woken through the
//!   store's pub/sub at once. The replica's sidecar has the last word: its slots are
//!   shared with its queue workers and with other gateways, and a call it refuses with
//!   `X-Fal-Replica: full` (or `restarting`) never reached the app, so the gateway sends
//!   it to another replica or holds it again; bodies up to [`REPLAY_BODY_BYTES`] are
//!   kept for that (larger ones are streamed, and such a refusal reaches the client).
//! - The webhook outbox and the store's housekeeping keep running here, so retries and
//!   start deadlines go on at zero replicas.
//! - Every path that names a function is checked against the API keys first
//!   ([`Authorizer`]: `Authorization: Key`, tokens of `/tokens/`, the function's auth
//!   mode, the key's rate in the shared store); the queue API then keeps each request
//!   to the tenant that submitted it.
//!
//! Where the functions and their replicas come from is not its business: the cluster
//! (`kube.rs`: FalFunctions and EndpointSlices) or `fal-operator local` call
//! [`Gateway::upsert_function`] and [`Gateway::set_replicas`].
//!
//! Where things are: here, the functions it serves and their replicas; `routing.rs`,
//! request to function (listeners, paths, hosts, key check) and the sync call's
//! forwarding; `slots.rs`, replica slots and the calls held for one; `housekeeping.rs`,
//! the background loops (sweep, webhooks, sync-call reports) and the socket drain;
//! `admin.rs`, the admin listener.

mod admin;
mod housekeeping;
pub mod kube;
mod lane;
mod routing;
mod slots;

pub use admin::{functions_json, handle_admin, Admin, Describe};
pub use lane::Lane;
pub use routing::{function_from_host, handle_queue, handle_run, is_queue_path, split_function};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fal_sidecar::api::{self as api, ApiConfig, App};
use fal_sidecar::auth::Authorizer;
use fal_sidecar::metrics::Metrics as SidecarMetrics;
use fal_sidecar::store::redis::{RedisHub, RedisStore};
use fal_sidecar::store::Store;
use fal_sidecar::upstream::Upstream;
use fal_sidecar::webhook::signing::Signer;
use fal_sidecar::webhook::ssrf::Policy;
use fal_sidecar::webhook::{Deliverer, DeliveryConfig};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{watch, Notify};

use crate::function::FunctionInfo;

/// Largest request body (with a declared length) a sync call keeps, so that a replica's
/// refusal can be sent to another replica; larger bodies are streamed through.
pub const REPLAY_BODY_BYTES: u64 = 1 << 20;

/// How often a gateway reports its sync-call counts to the store.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the gateway sweeps a function's queue (start deadlines, expired leases,
/// retention) and polls its webhook outbox when no change event woke it.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(2);
/// The longest a quiet function goes unswept: one with no request through this gateway
/// since its last sweep, and nothing due (start deadline, lease end, end of retention,
/// webhook) before then. It covers what other processes add meanwhile (a submit or a
/// claim through another gateway or a replica, which sweep it themselves while active).
pub const QUIET_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Settings of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `Host: {name}.{namespace}.{domain}` routes to a function (the seed's per-app host).
    pub domain: Option<String>,
    /// Longest a sync call is held for a replica; default: the function's `startupTimeout`.
    pub cold_start_timeout: Option<Duration>,
    pub max_body_bytes: usize,
    pub max_queue: usize,
    pub retention: Duration,
    /// Claims of one request before it completes as lost (the replicas' setting).
    pub max_attempts: u32,
    pub delivery: DeliveryConfig,
    /// A WebSocket with no byte either way for this long is closed [default: never].
    pub websocket_idle_timeout: Option<Duration>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            domain: None,
            cold_start_timeout: None,
            max_body_bytes: 10 * 1024 * 1024,
            max_queue: 100_000,
            retention: Duration::from_secs(3600),
            max_attempts: 3,
            delivery: DeliveryConfig {
                retry_delays: DeliveryConfig::default_delays(),
                attempt_timeout: Duration::from_secs(15),
                idle_poll: MAINTENANCE_INTERVAL,
            },
            websocket_idle_timeout: None,
        }
    }
}

/// Gateway metrics.
#[derive(Clone)]
pub struct GatewayMetrics {
    pub requests: IntCounterVec,
    /// Calls a replica refused without running them (`X-Fal-Replica`), by reason.
    pub not_run: IntCounterVec,
    pub held: IntGaugeVec,
    pub cold_start: Histogram,
    pub websockets: IntGaugeVec,
}

impl GatewayMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "fal_gateway_requests_total",
                "Requests by function and kind (sync, queue, per_app)",
            ),
            &["function", "kind"],
        )?;
        let held = IntGaugeVec::new(
            Opts::new(
                "fal_gateway_held_sync_calls",
                "Sync calls waiting for a replica",
            ),
            &["function"],
        )?;
        let cold_start = Histogram::with_opts(
            HistogramOpts::new(
                "fal_cold_start_seconds",
                "Wake (first request at zero replicas) to the first ready replica",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
        )?;
        let websockets = IntGaugeVec::new(
            Opts::new(
                "fal_gateway_websockets_open",
                "WebSockets open through the gateway, by function",
            ),
            &["function"],
        )?;
        let not_run = IntCounterVec::new(
            Opts::new(
                "fal_gateway_replica_refusals_total",
                "Sync calls a replica refused without running them (full: no free slot; restarting: the app restarts), sent again",
            ),
            &["function", "reason"],
        )?;
        r.register(Box::new(not_run.clone()))?;
        r.register(Box::new(websockets.clone()))?;
        r.register(Box::new(requests.clone()))?;
        r.register(Box::new(held.clone()))?;
        r.register(Box::new(cold_start.clone()))?;
        Ok(GatewayMetrics {
            requests,
            not_run,
            held,
            cold_start,
            websockets,
        })
    }
}

/// One ready replica of a function: where its sidecar's run API listens.
pub struct Replica {
    pub id: String,
    upstream: Upstream,
    in_flight: AtomicU32,
    /// Until when (ms since the epoch) the replica said it is full or restarting.
    refused_until_ms: AtomicU64,
}

impl Replica {
    /// Sync calls this gateway has in flight on it.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A function as one gateway serves it.
pub struct Entry {
    info: RwLock<FunctionInfo>,
    key: String,
    /// The queue API over the function's store.
    pub app: Arc<App>,
    pub store: Arc<RedisStore>,
    replicas: RwLock<Arc<Vec<Arc<Replica>>>>,
    /// Sync calls held or in flight here.
    sync: AtomicU64,
    held: AtomicU64,
    last_sync_ms: AtomicU64,
    reported: AtomicU64,
    /// A request came through here since the last sweep: sweep at the next round.
    active: AtomicBool,
    /// When housekeeping next has work for this function, as of its last sweep (unix
    /// ms; see [`QUIET_SWEEP_INTERVAL`]).
    next_sweep_ms: AtomicU64,
    /// Woken when a slot frees up or the replica set changes.
    capacity: Notify,
    /// When a request found the function at zero (for `fal_cold_start_seconds`).
    cold_since: Mutex<Option<Instant>>,
    deliverer: Arc<Deliverer>,
    /// `fal_gateway_requests_total` of this function by kind (looked up on the first
    /// request of the kind, not per request; an idle function has no series: each costs
    /// ~0.4 KB, which a gateway that knows thousands of functions keeps for nothing).
    counters: [std::sync::OnceLock<prometheus::IntCounter>; 3],
}

impl Entry {
    pub fn info(&self) -> FunctionInfo {
        self.info.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The ready replicas.
    pub fn replicas(&self) -> Arc<Vec<Arc<Replica>>> {
        self.replicas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sync calls held or in flight in this gateway.
    pub fn sync_calls(&self) -> u64 {
        self.sync.load(Ordering::Relaxed)
    }

    /// Sync calls waiting for a replica.
    pub fn held_calls(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// See the module docs.
pub struct Gateway {
    hub: Arc<RedisHub>,
    /// This gateway's id in the store's sync-call reports.
    id: String,
    cfg: GatewayConfig,
    signer: Arc<Signer>,
    policy: Arc<Policy>,
    /// Who may call (keys from the cluster's FalKeys or `local`'s files).
    pub auth: Arc<Authorizer>,
    webhook_client: reqwest::Client,
    sidecar_metrics: Arc<SidecarMetrics>,
    pub metrics: GatewayMetrics,
    functions: RwLock<HashMap<String, Arc<Entry>>>,
    /// Moves when the set of functions changes.
    changed: watch::Sender<u64>,
    /// Whether the first list of FalFunctions (in a cluster) has been read: until then
    /// the gateway is not ready (it would answer 404 for functions that exist).
    pub functions_synced: std::sync::atomic::AtomicBool,
    /// Whether the first list of FalKeys has been read: until then it is not ready (it
    /// would answer 401 for keys that exist).
    pub keys_synced: std::sync::atomic::AtomicBool,
    /// SIGTERM received: not ready (still serving through the shutdown delay).
    pub terminating: std::sync::atomic::AtomicBool,
}

impl Gateway {
    pub fn new(
        hub: Arc<RedisHub>,
        cfg: GatewayConfig,
        signer: Arc<Signer>,
        policy: Arc<Policy>,
        auth: Arc<Authorizer>,
        registry: &Registry,
    ) -> crate::Result<Arc<Gateway>> {
        let metrics =
            GatewayMetrics::new(registry).map_err(|e| crate::Error::Scale(e.to_string()))?;
        auth.register(registry)
            .map_err(|e| crate::Error::Scale(e.to_string()))?;
        let webhook_client = Deliverer::client(&policy, &cfg.delivery)
            .map_err(|e| crate::Error::Scale(format!("webhook client: {e}")))?;
        Ok(Arc::new(Gateway {
            hub,
            id: format!("gw-{}", uuid::Uuid::new_v4()),
            cfg,
            signer,
            policy,
            auth,
            webhook_client,
            sidecar_metrics: Arc::new(SidecarMetrics::new()),
            metrics,
            functions: RwLock::new(HashMap::new()),
            changed: watch::channel(0).0,
            functions_synced: true.into(),
            keys_synced: true.into(),
            terminating: false.into(),
        }))
    }

    pub fn hub(&self) -> &Arc<RedisHub> {
        &self.hub
    }

    /// The shared queue metrics of every function's API (submits, rejects, …).
    pub fn queue_metrics(&self) -> &SidecarMetrics {
        &self.sidecar_metrics
    }

    /// The function at `namespace/name`.
    pub fn entry(&self, key: &str) -> Option<Arc<Entry>> {
        self.functions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Every known function.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        let mut v: Vec<_> = self
            .functions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Starts serving a function, or updates its bounds.
    pub fn upsert_function(&self, info: FunctionInfo) {
        let key = info.key();
        if let Some(e) = self.entry(&key) {
            *e.info.write().unwrap_or_else(|e| e.into_inner()) = info;
            e.capacity.notify_waiters();
            return;
        }
        let store = self.hub.store(&key, self.cfg.max_attempts);
        let dyn_store: Arc<dyn Store> = store.clone();
        let mut app = App::new(
            dyn_store.clone(),
            None,
            self.signer.clone(),
            self.policy.clone(),
            ApiConfig {
                max_body_bytes: self.cfg.max_body_bytes,
                max_queue: self.cfg.max_queue,
                retention: self.cfg.retention,
                owner: info.namespace.clone(),
                request_timeout: None,
                // Replica slots are counted here, per function (`try_acquire`).
                socket_idle_timeout: self.cfg.websocket_idle_timeout,
            },
            self.sidecar_metrics.clone(),
        );
        app.sockets = Arc::new(api::websocket::Sockets::labelled(
            self.metrics.websockets.clone(),
            &key,
            self.sidecar_metrics.websocket_upgrades.clone(),
        ));
        let app = Arc::new(app);
        // Webhooks and housekeeping go on here whatever the replica count (one loop
        // for every function: see `run_maintenance`).
        let deliverer = Arc::new(Deliverer::with_client(
            dyn_store,
            self.signer.clone(),
            self.policy.clone(),
            self.cfg.delivery.clone(),
            self.sidecar_metrics.clone(),
            self.webhook_client.clone(),
        ));
        let entry = Arc::new(Entry {
            info: RwLock::new(info),
            key: key.clone(),
            app,
            store,
            replicas: RwLock::new(Arc::new(Vec::new())),
            sync: AtomicU64::new(0),
            held: AtomicU64::new(0),
            last_sync_ms: AtomicU64::new(0),
            reported: AtomicU64::new(0),
            active: AtomicBool::new(true),
            next_sweep_ms: AtomicU64::new(0),
            capacity: Notify::new(),
            cold_since: Mutex::new(None),
            deliverer,
            counters: Default::default(),
        });
        self.functions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, entry);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Stops serving a function (deleted).
    pub fn remove_function(&self, key: &str) {
        let gone = self
            .functions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some(e) = gone {
            e.capacity.notify_waiters();
            let _ = self.metrics.held.remove_label_values(&[key]);
            let _ = self.metrics.websockets.remove_label_values(&[key]);
            for kind in routing::Kind::LABELS {
                let _ = self.metrics.requests.remove_label_values(&[key, kind]);
            }
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Replaces the ready replicas of a function: `(id, host:port of its sidecar's run
    /// API)`. Replicas that stay keep their in-flight counts.
    pub fn set_replicas(&self, key: &str, ready: Vec<(String, String)>) {
        let Some(e) = self.entry(key) else { return };
        let old = e.replicas();
        let new: Vec<Arc<Replica>> = ready
            .into_iter()
            .filter_map(|(id, addr)| {
                if let Some(r) = old
                    .iter()
                    .find(|r| r.id == id && r.upstream.authority() == addr)
                {
                    return Some(r.clone());
                }
                match Upstream::new(&format!("http://{addr}")) {
                    Ok(upstream) => Some(Arc::new(Replica {
                        id,
                        upstream,
                        in_flight: AtomicU32::new(0),
                        refused_until_ms: AtomicU64::new(0),
                    })),
                    Err(why) => {
                        tracing::warn!(function = key, %why, "ignoring a replica with a bad address");
                        None
                    }
                }
            })
            .collect();
        if !new.is_empty() {
            if let Some(t) = e
                .cold_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                self.metrics.cold_start.observe(t.elapsed().as_secs_f64());
            }
        }
        *e.replicas.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        e.capacity.notify_waiters();
    }
}

impl crate::function::FunctionSink for Gateway {
    fn upsert(&self, info: FunctionInfo) {
        self.upsert_function(info)
    }
    fn remove(&self, key: &str) {
        self.remove_function(key)
    }
    fn synced(&self) {
        self.functions_synced.store(true, Ordering::Relaxed);
    }
}
