//! The autoscaler: load figures from the shared store → desired replicas → a
//! [`Scaler`] (the Deployment's scale subresource in a cluster, local processes in
//! `fal-operator local`).
//!
//! It acts on a tick and, without waiting for one, on every `submit` or `wake`
//! message of the store's pub/sub (a gateway publishes `wake` when it holds a sync call
//! for a function with no free replica): a cold start costs no polling interval.

pub mod decide;
pub mod kube;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fal_sidecar::job::now_ms;
use fal_sidecar::store::redis::{RedisHub, RedisStore};
use fal_sidecar::store::Store;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::sync::{broadcast, watch};

use crate::function::FunctionInfo;
use decide::{decide, Demand, Window};

/// How often every function with replicas or load is re-evaluated.
pub const TICK: Duration = Duration::from_secs(1);
/// Shortest time between two event-driven decisions for a function with replicas.
pub const COALESCE: Duration = Duration::from_millis(100);
/// How often an idle function at zero is looked at anyway (its wakes come by pub/sub).
pub const IDLE_RECHECK: Duration = Duration::from_secs(10);

/// Where replicas come from.
#[async_trait]
pub trait Scaler: Send + Sync + 'static {
    /// Replicas the function has now; `None` when it cannot be scaled yet (its
    /// Deployment does not exist).
    async fn replicas(&self, f: &FunctionInfo) -> Result<Option<u32>, String>;
    /// Sets the replica count (`from` is what [`Scaler::replicas`] said).
    async fn scale(&self, f: &FunctionInfo, from: u32, to: u32) -> Result<(), String>;
}

/// The last decision about one function (for status, `/functions` and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub replicas: u32,
    pub desired: u32,
    pub queued: u64,
    pub running: u64,
    pub sync: u64,
    pub last_activity_ms: u64,
}

struct Tracked {
    info: FunctionInfo,
    store: Arc<RedisStore>,
    window: Window,
    last: Option<Snapshot>,
    checked: Option<Instant>,
}

impl crate::function::FunctionSink for Autoscaler {
    fn upsert(&self, info: FunctionInfo) {
        self.track(info)
    }
    fn remove(&self, key: &str) {
        self.untrack(key)
    }
}

/// Autoscaler metrics.
#[derive(Clone)]
pub struct AutoscaleMetrics {
    pub desired: IntGaugeVec,
    pub actual: IntGaugeVec,
    pub scale_events: IntCounterVec,
}

impl AutoscaleMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<Self> {
        let desired = IntGaugeVec::new(
            Opts::new(
                "fal_autoscaler_desired_replicas",
                "Replicas the autoscaler wants",
            ),
            &["function"],
        )?;
        let actual = IntGaugeVec::new(
            Opts::new("fal_autoscaler_replicas", "Replicas the function has"),
            &["function"],
        )?;
        let scale_events = IntCounterVec::new(
            Opts::new("fal_autoscaler_scale_events_total", "Scale changes made"),
            &["function", "direction"],
        )?;
        r.register(Box::new(desired.clone()))?;
        r.register(Box::new(actual.clone()))?;
        r.register(Box::new(scale_events.clone()))?;
        Ok(AutoscaleMetrics {
            desired,
            actual,
            scale_events,
        })
    }
}

/// See the module docs.
pub struct Autoscaler {
    hub: Arc<RedisHub>,
    scaler: Arc<dyn Scaler>,
    functions: Mutex<HashMap<String, Tracked>>,
    metrics: AutoscaleMetrics,
    /// Serialises evaluations of one function (a wake and a tick at once).
    busy: tokio::sync::Mutex<()>,
    decided: watch::Sender<u64>,
}

impl Autoscaler {
    pub fn new(hub: Arc<RedisHub>, scaler: Arc<dyn Scaler>, metrics: AutoscaleMetrics) -> Self {
        Autoscaler {
            hub,
            scaler,
            functions: Mutex::new(HashMap::new()),
            metrics,
            busy: tokio::sync::Mutex::new(()),
            decided: watch::channel(0).0,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.functions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking a function, or updates its bounds.
    pub fn track(&self, info: FunctionInfo) {
        let key = info.key();
        let mut map = self.map();
        match map.get_mut(&key) {
            Some(t) => t.info = info,
            None => {
                let store = self.hub.store(&key, 3);
                map.insert(
                    key,
                    Tracked {
                        info,
                        store,
                        window: Window::default(),
                        last: None,
                        checked: None,
                    },
                );
            }
        }
    }

    /// Stops tracking a function (deleted).
    pub fn untrack(&self, key: &str) {
        self.map().remove(key);
        let _ = self.metrics.desired.remove_label_values(&[key]);
        let _ = self.metrics.actual.remove_label_values(&[key]);
    }

    /// The last decision about `key`.
    pub fn snapshot(&self, key: &str) -> Option<Snapshot> {
        self.map().get(key).and_then(|t| t.last)
    }

    /// Every tracked function's last decision.
    pub fn snapshots(&self) -> Vec<(FunctionInfo, Option<Snapshot>)> {
        let mut v: Vec<_> = self
            .map()
            .values()
            .map(|t| (t.info.clone(), t.last))
            .collect();
        v.sort_by_key(|(f, _)| f.key());
        v
    }

    /// Moves after every evaluation (tests and `local` wait on it).
    pub fn decisions(&self) -> watch::Receiver<u64> {
        self.decided.subscribe()
    }

    /// Runs until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut activity = self.hub.activity();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = activity.recv() => match msg {
                    Ok(a) if matches!(a.kind.as_str(), "submit" | "wake" | "release" | "sweep") => {
                        if !self.recently_warm(&a.function) {
                            self.evaluate(&a.function).await;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => self.evaluate_all(true).await,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => self.evaluate_all(false).await,
                _ = fal_sidecar::shutdown::wait_true(&mut stop) => return,
            }
        }
    }

    /// True when `key` had replicas at a decision less than [`COALESCE`] ago: a burst
    /// of submits to a warm function costs one decision per window, not one each
    /// (the next tick sees what the window skipped). A function at zero is never
    /// coalesced: its wake-up stays immediate.
    fn recently_warm(&self, key: &str) -> bool {
        self.map().get(key).is_some_and(|t| {
            t.last.is_some_and(|s| s.replicas > 0)
                && t.checked.is_some_and(|c| c.elapsed() < COALESCE)
        })
    }

    async fn evaluate_all(&self, force: bool) {
        let keys: Vec<String> = self
            .map()
            .iter()
            .filter(|(_, t)| {
                force
                    || t.checked.is_none_or(|c| c.elapsed() >= IDLE_RECHECK)
                    || t.last.is_none_or(|s| {
                        s.replicas > 0 || s.desired > 0 || s.queued + s.running + s.sync > 0
                    })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.evaluate(&k).await;
        }
    }

    /// One decision for one function; returns it.
    pub async fn evaluate(&self, key: &str) -> Option<Snapshot> {
        let _one = self.busy.lock().await;
        let (info, store) = {
            let map = self.map();
            let t = map.get(key)?;
            (t.info.clone(), t.store.clone())
        };
        let load = match store.load().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(function = key, error = %e, "autoscaler: cannot read the load");
                return None;
            }
        };
        let current = match self.scaler.replicas(&info).await {
            Ok(Some(n)) => n,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(function = key, error = %e, "autoscaler: cannot read the replicas");
                return None;
            }
        };
        let demand = Demand {
            queued: load.queued,
            running: load.in_flight,
            sync: load.sync,
            last_activity_ms: load.last_activity_ms,
        };
        let now = now_ms();
        let desired = {
            let mut map = self.map();
            let t = map.get_mut(key)?;
            decide(&info.bounds, &demand, current, now, &mut t.window)
        };
        let mut replicas = current;
        if desired != current {
            let direction = if desired > current { "up" } else { "down" };
            match self.scaler.scale(&info, current, desired).await {
                Ok(()) => {
                    tracing::info!(
                        function = key,
                        from = current,
                        to = desired,
                        queued = load.queued,
                        running = load.in_flight,
                        sync = load.sync,
                        "scaled {direction}"
                    );
                    self.metrics
                        .scale_events
                        .with_label_values(&[key, direction])
                        .inc();
                    replicas = desired;
                }
                Err(e) => {
                    tracing::warn!(function = key, from = current, to = desired, error = %e, "autoscaler: scaling failed");
                }
            }
        }
        let snap = Snapshot {
            replicas,
            desired,
            queued: load.queued,
            running: load.in_flight,
            sync: load.sync,
            last_activity_ms: load.last_activity_ms,
        };
        self.metrics
            .desired
            .with_label_values(&[key])
            .set(desired.into());
        self.metrics
            .actual
            .with_label_values(&[key])
            .set(replicas.into());
        if let Some(t) = self.map().get_mut(key) {
            t.last = Some(snap);
            t.checked = Some(Instant::now());
        }
        self.decided.send_modify(|v| *v = v.wrapping_add(1));
        Some(snap)
    }
}
