//! `fal-operator local -f FILE…`: the gateway and the autoscaler on one machine, with
//! replicas as local processes instead of pods. Each replica is `fal-sidecar run` in
//! front of the function's `command` + `args` (its `env` set, the app on a free
//! `PORT`), sharing the function's queue in Redis.
//!
//! Scale up spawns replicas; one joins the gateway when its sidecar's `/readyz`
//! answers. Scale down takes the idlest replicas out of the gateway, asks each to
//! `/drain` (stop claiming, finish running requests — a pod's preStop hook), then
//! sends SIGTERM (which gives back whatever still runs). A replica that dies is
//! dropped and the autoscaler replaces it on its next look.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http_body_util::{BodyExt, Empty};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::autoscale::Scaler;
use crate::crd::FalFunction;
use crate::function::FunctionInfo;
use crate::gateway::Gateway;
use crate::{Error, Result};

/// How a local replica is started.
#[derive(Debug, Clone)]
pub struct LocalFunction {
    pub info: FunctionInfo,
    /// `command` + `args` of the spec.
    pub command: Vec<String>,
    /// `env` of the spec (plain values; `valueFrom` has no meaning locally).
    pub env: Vec<(String, String)>,
    pub request_timeout: Option<u32>,
}

impl LocalFunction {
    /// From a FalFunction manifest: it needs a `command` to run locally.
    pub fn from_object(ff: &FalFunction) -> Result<Self> {
        let info = FunctionInfo::from_object(ff)?;
        let mut command = ff.spec.command.clone().unwrap_or_default();
        command.extend(ff.spec.args.clone().unwrap_or_default());
        if command.is_empty() {
            return Err(Error::invalid(
                format!("{}: spec.command", info.key()),
                "local mode runs the app as a process: set spec.command (and args), e.g. [python3, app.py]",
            ));
        }
        let mut env = Vec::new();
        for e in ff.spec.env.clone().unwrap_or_default() {
            match e.value {
                Some(v) => env.push((e.name, v)),
                None if e.value_from.is_some() => tracing::warn!(
                    function = %info.key(), var = %e.name,
                    "env valueFrom is not supported locally; the variable is left unset"
                ),
                None => env.push((e.name, String::new())),
            }
        }
        Ok(LocalFunction {
            info,
            command,
            env,
            request_timeout: ff.spec.request_timeout.and_then(|t| u32::try_from(t).ok()),
        })
    }
}

/// Settings of the local replicas.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub sidecar_bin: PathBuf,
    pub store_url: String,
    /// `--store-replicas` of every replica.
    pub store_replicas: u32,
    /// Per-replica data dirs and the shared signing key live here.
    pub state_dir: PathBuf,
    pub signing_key: PathBuf,
    /// Working directory of the replicas (relative commands resolve there).
    pub workdir: PathBuf,
    /// The gateway's webhook retry schedule and allow-list, given to every replica: a
    /// webhook is retried by whichever of them picks it from the shared outbox, so all
    /// follow one schedule and one policy.
    pub webhook_retry_delays: Vec<Duration>,
    pub webhook_allow: Vec<String>,
}

/// How often a ready replica's `/readyz` is looked at (its app may be restarting).
const READY_CHECK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Phase {
    Starting,
    Ready,
    /// Its app is restarting (the sidecar's `/readyz` says `app_restarting`): out of
    /// sync-call routing until it is back; its sidecar still serves and runs the queue.
    Restarting,
    Draining,
}

struct LocalReplica {
    id: String,
    pid: u32,
    run_addr: String,
    queue_addr: String,
    admin_addr: String,
    phase: Phase,
    started: Instant,
    /// Unix ms of the spawn (for benchmarks: submit → spawn).
    started_ms: u64,
    stop: watch::Sender<bool>,
    /// The function's generation it runs (a new revision replaces the older ones).
    generation: u64,
}

/// Runs replicas as local processes (see the module docs).
pub struct LocalScaler {
    gw: Arc<Gateway>,
    cfg: LocalConfig,
    /// Each function and its generation (bumped when its command or environment
    /// changes: a new revision).
    functions: std::sync::RwLock<HashMap<String, (LocalFunction, u64)>>,
    replicas: Mutex<HashMap<String, Vec<LocalReplica>>>,
    seq: AtomicU64,
    /// Replica processes alive (a watch so shutdown can wait for zero).
    alive: watch::Sender<usize>,
    me: std::sync::Weak<LocalScaler>,
}

impl LocalScaler {
    pub fn new(gw: Arc<Gateway>, cfg: LocalConfig, functions: Vec<LocalFunction>) -> Arc<Self> {
        Arc::new_cyclic(|me| LocalScaler {
            me: me.clone(),
            gw,
            cfg,
            functions: std::sync::RwLock::new(
                functions
                    .into_iter()
                    .map(|f| (f.info.key(), (f, 0)))
                    .collect(),
            ),
            replicas: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            alive: watch::channel(0).0,
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<LocalReplica>>> {
        self.replicas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The function `key` and its generation.
    fn function(&self, key: &str) -> Option<(LocalFunction, u64)> {
        self.functions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    /// Adds a function, or replaces one (a new revision): when its command or
    /// environment changed, every replica it has is replaced — as many new ones start
    /// at once, and each old one drains (running requests finish; queued ones wait for
    /// the new replicas) once a new one is ready, or at the latest after the start
    /// timeout.
    pub fn upsert_function(&self, f: LocalFunction) {
        let key = f.info.key();
        let generation = {
            let mut map = self.functions.write().unwrap_or_else(|e| e.into_inner());
            let gen = match map.get(&key) {
                Some((old, g)) if old.command == f.command && old.env == f.env => *g,
                Some((_, g)) => g + 1,
                None => 0,
            };
            map.insert(key.clone(), (f.clone(), gen));
            gen
        };
        let old: Vec<String> = self
            .map()
            .get(&key)
            .map(|v| {
                v.iter()
                    .filter(|r| r.generation < generation && r.phase != Phase::Draining)
                    .map(|r| r.id.clone())
                    .collect()
            })
            .unwrap_or_default();
        if old.is_empty() {
            return;
        }
        tracing::info!(function = %key, generation, replacing = old.len(), "rolling to a new revision");
        let me = self.this();
        for _ in &old {
            if let Err(e) = me.spawn_replica(&f, generation) {
                tracing::warn!(function = %key, error = %e, "starting a replica of the new revision failed");
            }
        }
        let limit = f.info.startup_timeout;
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + limit;
            for id in old {
                // One old replica leaves per ready new one (or all at the deadline).
                loop {
                    let ready_new = me.map().get(&key).map_or(0, |v| {
                        v.iter()
                            .filter(|r| r.generation == generation && r.phase == Phase::Ready)
                            .count()
                    });
                    let leaving = me.map().get(&key).map_or(0, |v| {
                        v.iter()
                            .filter(|r| r.generation < generation && r.phase == Phase::Draining)
                            .count()
                    });
                    if ready_new > leaving || tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if let Some(r) = me
                    .map()
                    .get(&key)
                    .and_then(|v| v.iter().find(|r| r.id == id))
                {
                    let _ = r.stop.send(true);
                }
            }
        });
    }

    /// The replicas of `key` as JSON (for `/functions`).
    pub fn describe(&self, key: &str) -> serde_json::Value {
        let map = self.map();
        let list: Vec<serde_json::Value> = map
            .get(key)
            .map(|v| {
                v.iter()
                    .map(|r| {
                        serde_json::json!({
                            "id": r.id, "pid": r.pid, "phase": r.phase,
                            "run": r.run_addr, "queue": r.queue_addr, "admin": r.admin_addr,
                            "age_s": r.started.elapsed().as_secs_f64(),
                            "started_unix_ms": r.started_ms,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({ "replicas": list })
    }

    fn publish(&self, key: &str) {
        let ready: Vec<(String, String)> = self
            .map()
            .get(key)
            .map(|v| {
                v.iter()
                    .filter(|r| r.phase == Phase::Ready)
                    .map(|r| (r.id.clone(), r.run_addr.clone()))
                    .collect()
            })
            .unwrap_or_default();
        self.gw.set_replicas(key, ready);
    }

    fn spawn_replica(self: &Arc<Self>, f: &LocalFunction, generation: u64) -> Result<()> {
        let key = f.info.key();
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{}-{n}", f.info.namespace, f.info.name);
        let port = || {
            fal_sidecar::child::free_port()
                .map_err(|e| Error::Scale(format!("no free port for a replica: {e}")))
        };
        let (run_port, queue_port, admin_port) = (port()?, port()?, port()?);
        let run_addr = format!("127.0.0.1:{run_port}");
        let admin_addr = format!("127.0.0.1:{admin_port}");
        let data_dir = self.cfg.state_dir.join("replicas").join(&id);
        let drain = f.request_timeout.unwrap_or(120);
        let mut cmd = Command::new(&self.cfg.sidecar_bin);
        cmd.arg("run")
            .arg("--store")
            .arg(&self.cfg.store_url)
            .arg("--store-replicas")
            .arg(self.cfg.store_replicas.to_string())
            .arg("--function")
            .arg(&key)
            .arg("--owner")
            .arg(&f.info.namespace)
            .arg("--listen")
            .arg(&run_addr)
            .arg("--queue-listen")
            .arg(format!("127.0.0.1:{queue_port}"))
            .arg("--admin-listen")
            .arg(&admin_addr)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--signing-key")
            .arg(&self.cfg.signing_key)
            .arg("--max-concurrency")
            .arg(f.info.bounds.max_concurrency.to_string())
            .arg("--startup-timeout")
            .arg(f.info.startup_timeout.as_secs().to_string())
            .arg("--drain-timeout")
            .arg(drain.to_string());
        if !self.cfg.webhook_retry_delays.is_empty() {
            let delays: Vec<String> = self
                .cfg
                .webhook_retry_delays
                .iter()
                .map(|d| d.as_secs_f64().to_string())
                .collect();
            cmd.arg("--webhook-retry-delays").arg(delays.join(","));
        }
        if !self.cfg.webhook_allow.is_empty() {
            cmd.arg("--webhook-allow")
                .arg(self.cfg.webhook_allow.join(","));
        }
        if let Some(t) = f.request_timeout {
            cmd.arg("--request-timeout").arg(t.to_string());
        }
        cmd.arg("--")
            .args(&f.command)
            .envs(f.env.iter().map(|(k, v)| (k, v)))
            // One small server thread per replica: many run on one machine.
            .env("FAL_SIDECAR_WORKER_THREADS", "1")
            .env("FAL_SIDECAR_REPLICA", &id)
            .current_dir(&self.cfg.workdir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        // SAFETY: prctl in the child between fork and exec, async-signal-safe; the
        // replica (and through its own handling, its app) goes when we go.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            Error::Scale(format!(
                "cannot start {} for {key}: {e} (set --sidecar-bin)",
                self.cfg.sidecar_bin.display()
            ))
        })?;
        let pid = child.id().unwrap_or(0);
        let (stop_tx, stop_rx) = watch::channel(false);
        self.map()
            .entry(key.clone())
            .or_default()
            .push(LocalReplica {
                id: id.clone(),
                pid,
                run_addr,
                queue_addr: format!("127.0.0.1:{queue_port}"),
                admin_addr: admin_addr.clone(),
                phase: Phase::Starting,
                started: Instant::now(),
                started_ms: fal_sidecar::job::now_ms(),
                stop: stop_tx,
                generation,
            });
        self.alive.send_modify(|n| *n += 1);
        tracing::info!(function = %key, replica = %id, pid, "replica starting");
        let me = self.clone();
        tokio::spawn(async move { me.supervise(key, id, admin_addr, child, stop_rx).await });
        Ok(())
    }

    /// Owns one replica process: marks it ready, drains and stops it on request,
    /// drops it when it exits.
    async fn supervise(
        self: Arc<Self>,
        key: String,
        id: String,
        admin: String,
        mut child: Child,
        mut stop: watch::Receiver<bool>,
    ) {
        // Starting: poll readiness until ready, exit, or stop.
        let ready = loop {
            tokio::select! {
                _ = child.wait() => break false,
                _ = fal_sidecar::shutdown::wait_true(&mut stop) => break false,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {
                    if http_get(&admin, "/readyz", Duration::from_secs(2)).await == Some(200) {
                        break true;
                    }
                }
            }
        };
        if ready {
            self.set_phase(&key, &id, Phase::Ready);
            tracing::info!(function = %key, replica = %id, "replica ready");
            self.publish(&key);
            let mut check = tokio::time::interval(READY_CHECK);
            loop {
                tokio::select! {
                    _ = child.wait() => break,
                    _ = fal_sidecar::shutdown::wait_true(&mut stop) => break,
                    _ = check.tick() => self.recheck(&key, &id, &admin).await,
                }
            }
        }
        if child.try_wait().ok().flatten().is_none() {
            // Stopping: out of the gateway first, then drain, then SIGTERM.
            self.set_phase(&key, &id, Phase::Draining);
            self.publish(&key);
            // `/drain` returns when running requests are done (or its own deadline).
            let drained = http_get(&admin, "/drain", Duration::from_secs(86_400)).await;
            tracing::info!(function = %key, replica = %id, ?drained, "replica drained; stopping");
            fal_sidecar::child::stop(&mut child, Duration::from_secs(30)).await;
        } else {
            let status = child.wait().await.ok();
            tracing::warn!(function = %key, replica = %id, ?status, "replica exited");
        }
        if let Some(v) = self.map().get_mut(&key) {
            v.retain(|r| r.id != id);
        }
        self.publish(&key);
        self.alive.send_modify(|n| *n = n.saturating_sub(1));
        let _ = std::fs::remove_dir_all(self.cfg.state_dir.join("replicas").join(&id));
    }

    /// A ready replica whose app is restarting leaves sync-call routing, and comes back
    /// once its `/readyz` passes again. Other readiness failures (the store away) leave
    /// routing alone: sync calls do not need the store.
    async fn recheck(&self, key: &str, id: &str, admin: &str) {
        let Some((code, body)) = get(admin, "/readyz", Duration::from_secs(2)).await else {
            return;
        };
        let restarting = code == 503
            && serde_json::from_slice::<serde_json::Value>(&body)
                .is_ok_and(|v| v["error_type"] == "app_restarting");
        let now = self.phase_of(key, id);
        let next = match (now, code, restarting) {
            (Some(Phase::Ready), _, true) => Phase::Restarting,
            (Some(Phase::Restarting), 200, _) => Phase::Ready,
            _ => return,
        };
        tracing::info!(function = %key, replica = %id, phase = ?next, "replica routing changed");
        self.set_phase(key, id, next);
        self.publish(key);
    }

    fn phase_of(&self, key: &str, id: &str) -> Option<Phase> {
        self.map()
            .get(key)
            .and_then(|v| v.iter().find(|r| r.id == id))
            .map(|r| r.phase)
    }

    fn set_phase(&self, key: &str, id: &str, phase: Phase) {
        if let Some(r) = self
            .map()
            .get_mut(key)
            .and_then(|v| v.iter_mut().find(|r| r.id == id))
        {
            r.phase = phase;
        }
    }

    /// Picks `n` replicas to remove: starting or restarting ones first, then the idlest ready ones
    /// (requests running in the replica, plus sync calls the gateway has on it).
    async fn pick_victims(&self, key: &str, n: usize, generation: u64) -> Vec<String> {
        let candidates: Vec<(String, Phase, String)> = self
            .map()
            .get(key)
            .map(|v| {
                v.iter()
                    .filter(|r| r.phase != Phase::Draining && r.generation == generation)
                    .map(|r| (r.id.clone(), r.phase, r.admin_addr.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let gw_load: HashMap<String, u32> = self
            .gw
            .entry(key)
            .map(|e| {
                e.replicas()
                    .iter()
                    .map(|r| (r.id.clone(), r.in_flight()))
                    .collect()
            })
            .unwrap_or_default();
        let mut scored = Vec::new();
        for (id, phase, admin) in candidates {
            let busy = if matches!(phase, Phase::Starting | Phase::Restarting) {
                0
            } else {
                replica_running(&admin).await.unwrap_or(u64::MAX / 2)
                    + u64::from(gw_load.get(&id).copied().unwrap_or(0))
                    + 1
            };
            scored.push((busy, id));
        }
        scored.sort();
        scored.into_iter().take(n).map(|(_, id)| id).collect()
    }

    /// Stops every replica (drain, then SIGTERM) and waits until none is left.
    pub async fn shutdown(&self, limit: Duration) {
        for v in self.map().values() {
            for r in v {
                let _ = r.stop.send(true);
            }
        }
        let mut alive = self.alive.subscribe();
        let _ = tokio::time::timeout(limit, alive.wait_for(|n| *n == 0)).await;
    }
}

#[async_trait]
impl Scaler for LocalScaler {
    async fn replicas(&self, f: &FunctionInfo) -> std::result::Result<Option<u32>, String> {
        let Some((_, generation)) = self.function(&f.key()) else {
            return Ok(None);
        };
        // Replicas of older revisions are leaving: not counted, never picked.
        let n = self.map().get(&f.key()).map_or(0, |v| {
            v.iter()
                .filter(|r| r.phase != Phase::Draining && r.generation == generation)
                .count()
        });
        Ok(Some(n as u32))
    }

    async fn scale(&self, f: &FunctionInfo, from: u32, to: u32) -> std::result::Result<(), String> {
        let key = f.key();
        let Some((lf, generation)) = self.function(&key) else {
            return Err(format!("{key} is not a local function"));
        };
        if to > from {
            let me = self.this();
            for _ in from..to {
                me.spawn_replica(&lf, generation)
                    .map_err(|e| e.to_string())?;
            }
        } else {
            let victims = self
                .pick_victims(&key, (from - to) as usize, generation)
                .await;
            let map = self.map();
            for r in map.get(&key).into_iter().flatten() {
                if victims.contains(&r.id) {
                    let _ = r.stop.send(true);
                }
            }
        }
        Ok(())
    }
}

impl LocalScaler {
    fn this(&self) -> Arc<LocalScaler> {
        self.me.upgrade().expect("LocalScaler lives in an Arc")
    }
}

/// A replica's running requests (its sidecar's `/load`).
async fn replica_running(admin: &str) -> Option<u64> {
    let (_, body) = get(admin, "/load", Duration::from_secs(2)).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["running"].as_u64()
}

/// GET `http://{addr}{path}` → status (one short-lived connection; admin calls only).
pub async fn http_get(addr: &str, path: &str, limit: Duration) -> Option<u16> {
    get(addr, path, limit).await.map(|(s, _)| s)
}

async fn get(addr: &str, path: &str, limit: Duration) -> Option<(u16, bytes::Bytes)> {
    let io = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", addr)
            .body(Empty::<bytes::Bytes>::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    tokio::time::timeout(limit, io).await.ok().flatten()
}
