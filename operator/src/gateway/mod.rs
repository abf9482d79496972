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

mod admin;
pub mod kube;

pub use admin::{functions_json, handle_admin, Admin, Describe};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fal_sidecar::api::proxy::{self, ConnState};
use fal_sidecar::api::{self as api, error, ApiConfig, App};
use fal_sidecar::auth::{Authorizer, Target};
use fal_sidecar::job::now_ms;
use fal_sidecar::metrics::Metrics as SidecarMetrics;
use fal_sidecar::slots::Holding;
use fal_sidecar::store::redis::{RedisHub, RedisStore};
use fal_sidecar::store::Store;
use fal_sidecar::upstream::{Body, Upstream};
use fal_sidecar::webhook::signing::Signer;
use fal_sidecar::webhook::ssrf::Policy;
use fal_sidecar::webhook::{Deliverer, DeliveryConfig};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Incoming};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{watch, Notify};

use crate::function::{is_dns_label, FunctionInfo};

/// Largest request body (with a declared length) a sync call keeps, so that a replica's
/// refusal can be sent to another replica; larger bodies are streamed through.
pub const REPLAY_BODY_BYTES: u64 = 1 << 20;
/// How long a replica that answered `X-Fal-Replica: full` gets no new call from here
/// (unless one of this gateway's own calls on it ends first).
const FULL_BACKOFF: Duration = Duration::from_millis(20);

/// How often a gateway reports its sync-call counts to the store.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the gateway sweeps a function's queue (start deadlines, expired leases,
/// retention) and polls its webhook outbox when no change event woke it.
pub const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(2);

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
    /// Woken when a slot frees up or the replica set changes.
    capacity: Notify,
    /// When a request found the function at zero (for `fal_cold_start_seconds`).
    cold_since: Mutex<Option<Instant>>,
    deliverer: Arc<Deliverer>,
    /// `fal_gateway_requests_total` of this function by kind (looked up once, not per
    /// request).
    counters: [prometheus::IntCounter; 3],
}

/// Request kinds counted per function.
#[derive(Clone, Copy)]
enum Kind {
    Sync = 0,
    Queue = 1,
    PerApp = 2,
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

    /// Takes a slot on the least busy replica with one free.
    fn try_acquire(&self) -> Option<Arc<Replica>> {
        let max = self
            .info
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .bounds
            .max_concurrency;
        let replicas = self.replicas();
        let now = now_ms();
        loop {
            let best = replicas
                .iter()
                .filter(|r| r.refused_until_ms.load(Ordering::Relaxed) <= now)
                .map(|r| (r.in_flight(), r))
                .filter(|(n, _)| *n < max)
                .min_by_key(|(n, _)| *n)?;
            let (n, r) = best;
            if r.in_flight
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Some(r.clone());
            }
        }
    }

    /// The earliest moment a replica's refusal runs out, if one is in force: a held call
    /// looks again then.
    fn next_unrefused(&self) -> Option<tokio::time::Instant> {
        let now = now_ms();
        let until = self
            .replicas()
            .iter()
            .map(|r| r.refused_until_ms.load(Ordering::Relaxed))
            .filter(|&t| t > now)
            .min()?;
        Some(tokio::time::Instant::now() + Duration::from_millis(until - now))
    }

    fn mark_cold(&self) {
        let mut c = self.cold_since.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_none() {
            *c = Some(Instant::now());
        }
    }
}

/// Gives a replica slot back when a forwarded call's response body is done.
struct SlotGuard {
    entry: Arc<Entry>,
    replica: Option<Arc<Replica>>,
}

impl SlotGuard {
    /// Gives the replica slot back (the call goes on: not counted as ended).
    fn release(&mut self) {
        if let Some(r) = self.replica.take() {
            r.in_flight.fetch_sub(1, Ordering::AcqRel);
            // One of this gateway's calls on it ended: worth trying it again at once.
            r.refused_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.release();
        // keepAlive counts from the end of a call (a WebSocket's close, too).
        self.entry.last_sync_ms.store(now_ms(), Ordering::Relaxed);
        self.entry.sync.fetch_sub(1, Ordering::AcqRel);
        self.entry.capacity.notify_waiters();
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
        app.sockets = Arc::new(api::websocket::Sockets::new(
            self.metrics.websockets.with_label_values(&[key.as_str()]),
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
            capacity: Notify::new(),
            cold_since: Mutex::new(None),
            deliverer,
            counters: ["sync", "queue", "per_app"].map(|kind| {
                self.metrics
                    .requests
                    .with_label_values(&[key.as_str(), kind])
            }),
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
            for kind in ["sync", "queue", "per_app"] {
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

    /// Housekeeping of every function, every [`MAINTENANCE_INTERVAL`]: the store's sweep
    /// (start deadlines, expired leases of dead replicas, retention) and the webhook
    /// outbox, so both go on at zero replicas. One loop, not a task per function: a
    /// gateway knowing a thousand idle functions stays small.
    pub async fn run_maintenance(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let retention = self.cfg.retention;
        loop {
            for e in self.entries() {
                if let Err(err) = e.store.sweep(now_ms(), retention).await {
                    tracing::debug!(function = %e.key, error = %err, "gateway housekeeping failed");
                    continue;
                }
                // Drain what is due now (bounded passes; the rest waits a round).
                for _ in 0..8 {
                    match e.deliverer.deliver_due().await {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(err) => {
                            tracing::debug!(function = %e.key, error = %err, "reading the webhook outbox failed");
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(MAINTENANCE_INTERVAL) => {}
                _ = fal_sidecar::shutdown::wait_true(&mut stop) => return,
            }
        }
    }

    /// Lets the WebSockets open through this gateway run until `deadline`, then cuts
    /// them (a stopping gateway: its listeners no longer take new ones).
    pub async fn drain_sockets(&self, deadline: tokio::time::Instant) {
        let open = || {
            self.entries()
                .iter()
                .map(|e| e.app.sockets.open())
                .sum::<usize>()
        };
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for e in self.entries() {
            e.app.sockets.cut_all();
        }
    }

    /// Reports sync-call counts to the store every [`REPORT_INTERVAL`] (the autoscaler
    /// counts them as load, and their arrival as activity for keep-alive).
    pub async fn run_reporter(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let ttl = REPORT_INTERVAL * 3 + Duration::from_secs(2);
        loop {
            for e in self.entries() {
                let n = e.sync.load(Ordering::Relaxed);
                if n == 0 && e.reported.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let last = e.last_sync_ms.load(Ordering::Relaxed);
                if e.store
                    .report_sync(&self.id, n, last, ttl, false)
                    .await
                    .is_ok()
                {
                    e.reported.store(n, Ordering::Relaxed);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(REPORT_INTERVAL) => {}
                _ = fal_sidecar::shutdown::wait_true(&mut stop) => return,
            }
        }
    }

    /// While terminating (the shutdown delay), every answer closes its connection: a
    /// client's kept-alive connection goes to another gateway next time, while new
    /// connections that still arrive here are served.
    fn close_when_terminating(&self, mut resp: Response<Body>) -> Response<Body> {
        if self.terminating.load(Ordering::Relaxed)
            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    fn jwks(&self) -> Response<Body> {
        let mut r = Response::new(Body::full(self.signer.jwks().to_string()));
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        r
    }

    /// The function a `Host: {name}.{namespace}.{domain}` header names.
    fn host_function(&self, headers: &HeaderMap) -> Option<(String, String)> {
        let domain = self.cfg.domain.as_deref()?;
        function_from_host(domain, headers.get("host")?.to_str().ok()?)
    }

    /// The function's entry, or a 404 that closes the connection: the request body is
    /// left unread, and a client that reuses the connection must not race hyper closing
    /// it.
    #[allow(clippy::result_large_err)] // the error is the response itself
    fn lookup(&self, ns: &str, name: &str) -> Result<Arc<Entry>, Response<Body>> {
        self.find(ns, name).map_err(fal_sidecar::api::closing)
    }

    #[allow(clippy::result_large_err)] // the error is the response itself
    fn find(&self, ns: &str, name: &str) -> Result<Arc<Entry>, Response<Body>> {
        if !is_dns_label(ns) || !is_dns_label(name) {
            return Err(error(
                StatusCode::NOT_FOUND,
                &format!(
                    "{ns:?}/{name:?} is not a function address: use /{{namespace}}/{{name}}[/{{path}}] with the FalFunction's namespace and name"
                ),
                None,
            ));
        }
        self.entry(&format!("{ns}/{name}")).ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no function {ns}/{name}: apply a FalFunction named {name:?} in namespace {ns:?} (kubectl get falfunctions -n {ns})"
                ),
                None,
            )
        })
    }

    fn count(&self, entry: &Entry, kind: Kind) {
        entry.counters[kind as usize].inc();
    }

    /// The key check of a request to `entry` (see [`Authorizer::check`]): refused with
    /// 401/403/429, or admitted with its principal set and its credential removed.
    #[allow(clippy::result_large_err)] // the error is the response itself
    async fn admit(
        &self,
        entry: &Entry,
        req: &mut Request<Incoming>,
    ) -> Result<(), Response<Body>> {
        let mode = entry.info.read().unwrap_or_else(|e| e.into_inner()).auth;
        let (namespace, name) = entry.key.split_once('/').unwrap_or((&entry.key, ""));
        let target = Target {
            namespace,
            name,
            mode,
        };
        self.auth
            .check(target, req)
            .await
            .map_err(|d| api::refused(&d))
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

/// `(namespace, name)` of a `Host: {name}.{namespace}.{domain}[:port]` (the per-app
/// host). Host names are case-insensitive and may end in a dot (`….example.com.`), so
/// both are compared without case and trailing dots; the names come back lower case.
pub fn function_from_host(domain: &str, host: &str) -> Option<(String, String)> {
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_matches('.').to_ascii_lowercase();
    if domain.is_empty() {
        return None;
    }
    let sub = host.strip_suffix(&domain)?.strip_suffix('.')?;
    let (name, ns) = sub.split_once('.')?;
    Some((ns.to_string(), name.to_string()))
}

/// `/{namespace}/{name}` and the rest of a path.
pub fn split_function(path: &str) -> Option<(&str, &str, &str)> {
    let p = path.strip_prefix('/')?;
    let (ns, rest) = p.split_once('/').unwrap_or((p, ""));
    let (name, rest) = rest.split_once('/').map_or((rest, ""), |(n, r)| (n, r));
    if ns.is_empty() || name.is_empty() {
        return None;
    }
    Some((ns, name, rest))
}

/// Whether the rest of a path after `/{namespace}/{name}` is the per-app queue API.
pub fn is_queue_path(rest: &str) -> bool {
    rest == "fal/queue" || rest.starts_with("fal/queue/")
}

/// The run listener: sync calls (`fal.run` style) and the per-app queue API
/// (generations A and B) under `/{namespace}/{name}`, or on the function's own host.
pub async fn handle_run(
    gw: Arc<Gateway>,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Response<Body> {
    let resp = route_run(gw.clone(), conn, req).await;
    gw.close_when_terminating(resp)
}

async fn route_run(
    gw: Arc<Gateway>,
    conn: Arc<ConnState>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if req.uri().path() == "/.well-known/jwks.json" {
        return gw.jwks();
    }
    if let Some((ns, name)) = gw.host_function(req.headers()) {
        let entry = match gw.lookup(&ns, &name) {
            Ok(e) => e,
            Err(r) => return r,
        };
        if let Err(r) = gw.admit(&entry, &mut req).await {
            return r;
        }
        if is_queue_path(req.uri().path().trim_start_matches('/')) {
            gw.count(&entry, Kind::PerApp);
            return api::queue::handle_per_app(&entry.app, req, "").await;
        }
        return sync_call(&gw, entry, &conn, req).await;
    }
    if api::tokens::is_tokens_path(req.uri().path()) {
        return api::tokens::handle(&gw.auth, req).await;
    }
    let path = req.uri().path().to_string();
    let Some((ns, name, rest)) = split_function(&path) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no endpoint at {path}; call /{{namespace}}/{{name}}[/{{path}}] (sync) or /{{namespace}}/{{name}}/fal/queue/…"),
            None,
        );
    };
    let entry = match gw.lookup(ns, name) {
        Ok(e) => e,
        Err(r) => return r,
    };
    if let Err(r) = gw.admit(&entry, &mut req).await {
        return r;
    }
    if is_queue_path(rest) {
        gw.count(&entry, Kind::PerApp);
        let mount = format!("/{ns}/{name}");
        return api::queue::handle_per_app(&entry.app, req, &mount).await;
    }
    if let Err(r) = api::strip_segments(&mut req, 2) {
        return r;
    }
    sync_call(&gw, entry, &conn, req).await
}

/// The queue listener (generation C, `queue.fal.run` style): owner = namespace,
/// alias = name.
pub async fn handle_queue(
    gw: Arc<Gateway>,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Response<Body> {
    let resp = route_queue(gw.clone(), conn, req).await;
    gw.close_when_terminating(resp)
}

async fn route_queue(
    gw: Arc<Gateway>,
    _conn: Arc<ConnState>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if req.uri().path() == "/.well-known/jwks.json" {
        return gw.jwks();
    }
    let path = req.uri().path().to_string();
    let Some((ns, name, _)) = split_function(&path) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no endpoint at {path}; the queue host serves /{{namespace}}/{{name}}[/{{path}}] and /{{namespace}}/{{name}}/requests/{{id}}"),
            None,
        );
    };
    let entry = match gw.lookup(ns, name) {
        Ok(e) => e,
        Err(r) => return r,
    };
    if let Err(r) = gw.admit(&entry, &mut req).await {
        return r;
    }
    gw.count(&entry, Kind::Queue);
    if entry.replicas().is_empty() && req.method() == http::Method::POST {
        entry.mark_cold();
    }
    // The app id is the function's `{namespace}/{name}`, whatever the namespace is called.
    api::queue::handle_queue_host(&entry.app, req, api::queue::AppIdRule::NamespaceName).await
}

/// The start deadline a caller set with `X-Fal-Request-Timeout` (seconds).
/// Parsed like a submit's (`api::options`); a sync call ignores a bad value.
fn request_deadline(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("x-fal-request-timeout")?;
    api::options::parse_request_timeout(v.as_bytes())
        .ok()
        .flatten()
}

/// A sync call: a free replica slot now, or held until one frees up or starts; sent
/// again when the replica refuses it without running it (see the module docs).
async fn sync_call(
    gw: &Gateway,
    entry: Arc<Entry>,
    conn: &ConnState,
    req: Request<Incoming>,
) -> Response<Body> {
    gw.count(&entry, Kind::Sync);
    entry.last_sync_ms.store(now_ms(), Ordering::Relaxed);
    entry.sync.fetch_add(1, Ordering::AcqRel);
    let mut slot = SlotGuard {
        entry: entry.clone(),
        replica: None,
    };
    let wait = Wait::new(gw, &entry, req.headers());
    if api::websocket::is_upgrade(req.headers()) {
        // The socket counts as a sync call for the autoscaler (`slot`) and holds its
        // replica slot until it closes; a replica's refusal picks another.
        let last: Mutex<Option<Arc<Replica>>> = Mutex::new(None);
        let (entry_ref, wait_ref, last_ref) = (&entry, &wait, &last);
        let route: api::websocket::Route<'_> = Box::new(move |refusal| {
            let prev = last_ref.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let (Some(r), Some(prev)) = (&refusal, prev) {
                refused(gw, entry_ref, &prev, r);
            }
            Box::pin(async move {
                let replica = acquire(gw, entry_ref, wait_ref).await?;
                *last_ref.lock().unwrap_or_else(|e| e.into_inner()) = Some(replica.clone());
                let held = ReplicaSlot {
                    entry: entry_ref.clone(),
                    replica: replica.clone(),
                };
                Ok((
                    replica.upstream.clone(),
                    Some(Box::new(held) as Box<dyn Send + Sync>),
                ))
            })
        });
        return api::websocket::forward_routed(&entry.app, req, Some(Box::new(slot)), route).await;
    }
    let (parts, body) = req.into_parts();
    let declared = proxy::declared_length(&parts.headers);
    let max = entry.app.cfg.max_body_bytes as u64;
    let small = declared.is_some_and(|n| n <= REPLAY_BODY_BYTES.min(max)) || body.is_end_stream();
    if !small {
        // Streamed through: a refusal of the replica reaches the client (with Retry-After).
        let replica = match acquire(gw, &entry, &wait).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        slot.replica = Some(replica.clone());
        let req = Request::from_parts(parts, body);
        let resp = proxy::forward(&entry.app, conn, &replica.upstream, req).await;
        return Holding::wrap(resp, slot);
    }
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return api::closing(error(
                StatusCode::BAD_REQUEST,
                &format!("the request body could not be read to its end: {e}"),
                None,
            ))
        }
    };
    loop {
        let replica = match acquire(gw, &entry, &wait).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        slot.replica = Some(replica.clone());
        let mut req = Request::new(Body::full(bytes.clone()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        let resp = proxy::send(&entry.app, conn, &replica.upstream, req).await;
        if !fal_sidecar::slots::not_run(&resp) {
            return Holding::wrap(resp, slot);
        }
        // Not run: the slot goes back, the replica gets a moment, the call goes again.
        slot.release();
        refused(gw, &entry, &replica, &resp);
    }
}

/// A replica answered a call with `X-Fal-Replica` (it did not run it): counted, and no
/// call goes there from here for [`FULL_BACKOFF`] (the slot was given back already).
fn refused<B>(gw: &Gateway, entry: &Entry, replica: &Replica, resp: &Response<B>) {
    let reason = resp
        .headers()
        .get(fal_sidecar::slots::REPLICA_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("full");
    gw.metrics
        .not_run
        .with_label_values(&[entry.key.as_str(), reason])
        .inc();
    replica.refused_until_ms.store(
        now_ms() + FULL_BACKOFF.as_millis() as u64,
        Ordering::Relaxed,
    );
}

/// One replica slot taken for a WebSocket handshake (and then its socket).
struct ReplicaSlot {
    entry: Arc<Entry>,
    replica: Arc<Replica>,
}

impl Drop for ReplicaSlot {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.entry.capacity.notify_waiters();
    }
}

/// How long a sync call may wait for a replica slot: the cold-start timeout, or the
/// caller's `X-Fal-Request-Timeout` when shorter; counted once for all of its tries.
struct Wait {
    deadline: tokio::time::Instant,
    limit: Duration,
    by_user: bool,
}

impl Wait {
    fn new(gw: &Gateway, entry: &Entry, headers: &HeaderMap) -> Wait {
        let cold = gw
            .cfg
            .cold_start_timeout
            .unwrap_or(entry.info().startup_timeout);
        let (limit, by_user) = match request_deadline(headers) {
            Some(u) if u < cold => (u, true),
            _ => (cold, false),
        };
        Wait {
            deadline: tokio::time::Instant::now() + limit,
            limit,
            by_user,
        }
    }
}

/// A free replica slot now, or [`hold`] until one is.
async fn acquire(
    gw: &Gateway,
    entry: &Arc<Entry>,
    wait: &Wait,
) -> Result<Arc<Replica>, Response<Body>> {
    match entry.try_acquire() {
        Some(r) => Ok(r),
        None => hold(gw, entry, wait).await,
    }
}

/// Holds a sync call until a replica slot is free: wakes the autoscaler, then waits
/// (bounded by the cold-start timeout and the caller's `X-Fal-Request-Timeout`).
async fn hold(
    gw: &Gateway,
    entry: &Arc<Entry>,
    wait: &Wait,
) -> Result<Arc<Replica>, Response<Body>> {
    let info = entry.info();
    let key = entry.key.as_str();
    entry.held.fetch_add(1, Ordering::AcqRel);
    let held_gauge = gw.metrics.held.with_label_values(&[key]);
    held_gauge.inc();
    struct Unhold<'a>(&'a Entry, prometheus::IntGauge);
    impl Drop for Unhold<'_> {
        fn drop(&mut self) {
            self.0.held.fetch_sub(1, Ordering::AcqRel);
            self.1.dec();
        }
    }
    let _unhold = Unhold(entry, held_gauge);
    if entry.replicas().is_empty() {
        entry.mark_cold();
    }
    let ttl = REPORT_INTERVAL * 3 + Duration::from_secs(2);
    let n = entry.sync.load(Ordering::Relaxed);
    let last = entry.last_sync_ms.load(Ordering::Relaxed);
    if let Err(e) = entry.store.report_sync(&gw.id, n, last, ttl, true).await {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{key} has no free replica and the store that wakes it is unavailable ({e}); retry shortly"),
            Some("runner_scheduling_failure"),
        );
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return Err(r);
    }
    entry.reported.store(n, Ordering::Relaxed);
    let (deadline, limit, by_user) = (wait.deadline, wait.limit, wait.by_user);
    loop {
        let notified = entry.capacity.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(r) = entry.try_acquire() {
            return Ok(r);
        }
        if gw.entry(key).is_none() {
            return Err(error(
                StatusCode::NOT_FOUND,
                &format!("function {key} was deleted while the call waited"),
                None,
            ));
        }
        // A replica that refused a call is looked at again when its moment runs out.
        let recheck = entry.next_unrefused();
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(recheck.unwrap_or(deadline)), if recheck.is_some() => {}
            _ = tokio::time::sleep_until(deadline) => {
                let secs = limit.as_secs_f64();
                let mut r = if by_user {
                    let mut r = error(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!("no replica of {key} could take the call within X-Fal-Request-Timeout ({secs} s)"),
                        Some("request_timeout"),
                    );
                    r.headers_mut().insert("x-fal-request-timeout-type", HeaderValue::from_static("user"));
                    r
                } else {
                    error(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "no replica of {key} became ready within {secs} s (cold start); check its pods (kubectl get pods -n {}), raise startupTimeout, or submit to the queue instead",
                            info.namespace
                        ),
                        Some("startup_timeout"),
                    )
                };
                r.headers_mut().insert("retry-after", HeaderValue::from_static("5"));
                return Err(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_paths() {
        assert_eq!(split_function("/ns/app"), Some(("ns", "app", "")));
        assert_eq!(split_function("/ns/app/"), Some(("ns", "app", "")));
        assert_eq!(
            split_function("/ns/app/fal/queue/submit/x"),
            Some(("ns", "app", "fal/queue/submit/x"))
        );
        assert_eq!(split_function("/ns"), None);
        assert_eq!(split_function("/"), None);
        assert_eq!(split_function("//app"), None);
        assert!(is_queue_path("fal/queue/submit"));
        assert!(is_queue_path("fal/queue"));
        assert!(!is_queue_path("fal/queueing"));
        assert!(!is_queue_path("predict"));
    }

    #[test]
    fn request_timeout_header() {
        let mut h = HeaderMap::new();
        assert_eq!(request_deadline(&h), None);
        h.insert("x-fal-request-timeout", "2.5".parse().unwrap());
        assert_eq!(request_deadline(&h), Some(Duration::from_millis(2500)));
        h.insert("x-fal-request-timeout", "-1".parse().unwrap());
        assert_eq!(request_deadline(&h), None);
        h.insert("x-fal-request-timeout", "soon".parse().unwrap());
        assert_eq!(request_deadline(&h), None);
    }
}
