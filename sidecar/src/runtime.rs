//! Wiring: config → store, key, listeners, app → serve → drain. `main` stays thin.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::api::{self, ApiConfig, App};
use crate::auth::keys::KeyRing;
use crate::auth::ratelimit::MemoryLimiter;
use crate::auth::Authorizer;
use crate::child;
use crate::config::Common;
use crate::job::now_ms;
use crate::logs::Running;
use crate::metrics::Metrics;
use crate::server::{self, ConnLimits};
use crate::slots::Slots;
use crate::store::embedded::EmbeddedStore;
use crate::store::redis::RedisStore;
use crate::store::Store;
use crate::supervisor::{AppHealth, Backoff, Supervisor};
use crate::upstream::Upstream;
use crate::webhook::signing::Signer;
use crate::webhook::ssrf::Policy;
use crate::webhook::{Deliverer, DeliveryConfig};
use crate::worker::{WorkerConfig, Workers};

/// How the app is reached.
pub enum Mode {
    /// Spawn it: `run`.
    Child {
        command: Vec<String>,
        port: Option<u16>,
        startup_timeout: Duration,
        backoff: Backoff,
    },
    /// It runs elsewhere: `serve`.
    Upstream { url: String },
}

/// Opens the store named by `--store` (default: the embedded store in the data dir).
pub async fn open_store(
    common: &Common,
    data_dir: &std::path::Path,
) -> anyhow::Result<Arc<dyn Store>> {
    let spec = common
        .store
        .clone()
        .unwrap_or_else(|| format!("file:{}", data_dir.display()));
    if let Some(dir) = spec.strip_prefix("file:") {
        let dir = if dir.is_empty() {
            data_dir.to_path_buf()
        } else {
            PathBuf::from(dir)
        };
        return Ok(EmbeddedStore::open(&dir, common.max_attempts)? as Arc<dyn Store>);
    }
    if spec.starts_with("redis") || spec.starts_with("unix://") {
        let durability = crate::store::redis::Durability {
            replicas: common.store_replicas,
            // WAIT holds its connection: stay under the connections' response timeout.
            timeout: Duration::from_millis(common.store_replicas_timeout.max(1))
                .min(crate::store::redis_conn::MAX_WAIT),
        };
        let store = RedisStore::open_with(&spec, &common.function, common.max_attempts, durability)
            .await
            .with_context(|| {
                format!(
                    "opening the redis store {}",
                    crate::store::redis_conn::redact(&spec)
                )
            })?;
        return Ok(store as Arc<dyn Store>);
    }
    anyhow::bail!(
        "--store {:?} is not supported: use file:DIR (the embedded store), redis://HOST:PORT/DB, \
         redis+cluster://H:P[,H:P…] or redis+sentinel://S:P[,S:P…]/MASTER[/DB]",
        crate::store::redis_conn::redact(&spec)
    )
}

/// This replica's name: `FAL_SIDECAR_REPLICA`, else `HOSTNAME` (the pod name in
/// Kubernetes), else `local`.
pub fn replica_name() -> String {
    ["FAL_SIDECAR_REPLICA", "HOSTNAME"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty() && !v.contains('/'))
        .unwrap_or_else(|| "local".to_string())
}

/// Gives memory freed after a large one-off load (ten thousand FalKeys parsed from
/// YAML or a watch list) back to the system: glibc keeps freed heap otherwise, and the
/// process would look that much bigger for the rest of its life.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Threads serving the run listener: `FAL_SIDECAR_WORKER_THREADS` or the core count.
pub fn http_threads() -> usize {
    std::env::var("FAL_SIDECAR_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(8)
        })
}

/// `--keys FILE`: the key check in front of the app (keys counted in memory: this
/// process is the whole budget).
fn key_gate(
    path: &std::path::Path,
    common: &Common,
    signer: Arc<Signer>,
    metrics: &Metrics,
) -> anyhow::Result<api::Gate> {
    let (namespace, name) = common.function.split_once('/').ok_or_else(|| {
        anyhow::anyhow!(
            "--function {:?} must be NAMESPACE/NAME (the keys' namespace decides who may call)",
            common.function
        )
    })?;
    let ring = Arc::new(KeyRing::new());
    ring.replace_all(read_keys(path)?);
    let authorizer = Arc::new(Authorizer::new(
        ring,
        signer,
        Arc::new(MemoryLimiter::default()),
        true,
    ));
    authorizer.register(&metrics.registry)?;
    tracing::info!(keys = authorizer.ring().len(), file = %path.display(), auth = common.auth.as_str(), "API keys required");
    Ok(api::Gate {
        authorizer,
        namespace: namespace.to_string(),
        name: name.to_string(),
        mode: common.auth,
    })
}

fn read_keys(path: &std::path::Path) -> anyhow::Result<Vec<crate::auth::keys::KeyRecord>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the keys file {} (--keys)", path.display()))?;
    crate::auth::keys::parse_key_file(&text, &path.display().to_string())
        .map_err(anyhow::Error::msg)
}

/// Reads the keys file again when it changes (a revoked key stops working within a
/// second). A file that does not parse keeps the keys already loaded.
async fn reload_keys(path: PathBuf, auth: Arc<Authorizer>) {
    let stamp = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = stamp(&path);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match read_keys(&path) {
            Ok(keys) => {
                auth.ring().replace_all(keys);
                tracing::info!(keys = auth.ring().len(), "keys file reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "keys file not reloaded; the previous keys stay")
            }
        }
    }
}

/// Runs until SIGTERM/SIGINT (or, in `run` mode, until the app cannot be restarted:
/// then an error); returns the exit code.
pub async fn run(common: Common, mode: Mode) -> anyhow::Result<i32> {
    let is_child = matches!(mode, Mode::Child { .. });
    let data_dir = common.data_dir.clone().unwrap_or_else(|| {
        PathBuf::from(if is_child {
            "./fal-data"
        } else {
            "/var/lib/fal-sidecar"
        })
    });
    std::fs::create_dir_all(&data_dir).with_context(|| {
        format!(
            "cannot create the data directory {} (--data-dir)",
            data_dir.display()
        )
    })?;
    let store = open_store(&common, &data_dir).await?;
    let signer = Arc::new(Signer::load_or_create(
        common.signing_key.as_deref(),
        &data_dir,
    )?);
    let policy = Arc::new(
        Policy::new(
            &common.webhook_allow,
            is_child && !common.webhook_deny_loopback,
        )
        .map_err(anyhow::Error::msg)?,
    );
    let metrics = Arc::new(Metrics::new());
    let running = Running::default();

    // Bind first: a port conflict should fail before the app is started. (The run and
    // queue listeners, the hot paths, are bound per server thread below; probe them here.)
    drop(server::bind(&common.listen, "the run API (--listen)").await?);
    drop(server::bind(&common.queue_listen, "the queue API (--queue-listen)").await?);
    let admin_l = server::bind(&common.admin_listen, "metrics and probes (--admin-listen)").await?;
    let run_host_l = match &common.run_host_listen {
        Some(addr) => Some(server::bind(addr, "the run host (--run-host-listen)").await?),
        None => None,
    };

    // `run`: the first start must succeed (a broken command ends `run` here); later
    // exits are the supervisor's (restarts).
    let (upstream_url, supervised) = match mode {
        Mode::Child {
            command,
            port,
            startup_timeout,
            backoff,
        } => {
            let port = match port {
                Some(p) => p,
                None => child::free_port().context("no free port for the app")?,
            };
            let (sup, health) = Supervisor::new(
                command,
                port,
                startup_timeout,
                backoff,
                running.clone(),
                store.clone(),
                metrics.clone(),
            );
            let c = sup.start().await?;
            (format!("http://127.0.0.1:{port}"), Some((sup, c, health)))
        }
        Mode::Upstream { url } => (url, None),
    };
    let app_health: Option<AppHealth> = supervised.as_ref().map(|(_, _, h)| h.clone());
    let upstream = Upstream::new(&upstream_url).map_err(anyhow::Error::msg)?;

    let app = Arc::new(App::new(
        store.clone(),
        Some(upstream.clone()),
        signer.clone(),
        policy.clone(),
        ApiConfig {
            max_body_bytes: common.max_body_bytes,
            max_queue: common.max_queue,
            retention: common.retention,
            owner: common.owner.clone(),
            request_timeout: common.request_timeout,
            socket_idle_timeout: common.websocket_idle_timeout,
        },
        metrics.clone(),
    ));
    if let Some(h) = &app_health {
        let _ = app.app_health.set(h.clone());
    }
    // --max-concurrency slots shared by the workers, direct calls and WebSockets (0: API
    // only, no worker; direct calls are not counted).
    let slots = (common.max_concurrency > 0).then(|| Slots::new(common.max_concurrency));
    if let Some(s) = &slots {
        let _ = app.slots.set(s.clone());
    }
    if let Some(path) = &common.keys {
        let gate = key_gate(path, &common, signer.clone(), &metrics)?;
        tokio::spawn(reload_keys(path.clone(), gate.authorizer.clone()));
        let _ = app.gate.set(gate);
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    // Claiming stops on its own signal: `/drain` (preStop) stops it while the listeners
    // keep answering status and result calls.
    let (claim_stop_tx, claim_stop_rx) = watch::channel(false);
    let (abandon_tx, abandon_rx) = watch::channel(false);
    let (quit_tx, quit_rx) = watch::channel(false);
    let limits = ConnLimits {
        max_header_bytes: common.max_header_bytes,
        max_headers: 100,
        header_read_timeout: common.header_timeout,
    };
    let drain = common.drain_timeout;
    let mut servers = tokio::task::JoinSet::new();
    let mut run_threads = server::serve_per_thread(
        &common.listen,
        "the run API (--listen)",
        http_threads(),
        app.clone(),
        api::handle_run,
        limits,
        common
            .fast_lane
            .then(|| api::fast::lane(Arc::new(api::fast::Direct(app.clone())))),
        stop_rx.clone(),
        drain,
    )?;
    // The queue API is where the fal clients submit: the same per-thread servers (and
    // so a Redis connection per thread), not the shared runtime.
    run_threads.extend(server::serve_per_thread(
        &common.queue_listen,
        "the queue API (--queue-listen)",
        http_threads(),
        app.clone(),
        api::handle_queue_host,
        limits,
        None,
        stop_rx.clone(),
        drain,
    )?);
    if let Some(l) = run_host_l {
        servers.spawn(server::serve(
            l,
            app.clone(),
            api::handle_run_host,
            limits,
            None,
            stop_rx.clone(),
            drain,
        ));
    }
    // Admin keeps answering (readyz says draining) until the very end.
    let admin = tokio::spawn(server::serve(
        admin_l,
        app.clone(),
        api::handle_admin,
        limits,
        None,
        quit_rx.clone(),
        drain,
    ));

    let workers = Arc::new(Workers {
        store: store.clone(),
        upstream,
        cfg: WorkerConfig {
            replica: replica_name(),
            concurrency: common.max_concurrency,
            lease: common.lease,
            retry_delays: common
                .app_retry_delays
                .0
                .iter()
                .copied()
                .take(common.max_app_attempts.saturating_sub(1))
                .collect(),
            max_result_bytes: common.max_result_bytes,
            request_timeout: common.request_timeout,
            max_attempts: common.max_attempts,
        },
        running,
        app: app_health.clone(),
        metrics: metrics.clone(),
        slots,
    });
    let _ = app.drain.set(api::DrainHandle {
        stop_claiming: claim_stop_tx.clone(),
        running: workers.running.clone(),
        timeout: drain,
    });
    let mut workers_task = tokio::spawn(workers.run(claim_stop_rx, abandon_rx));

    let deliverer = Arc::new(Deliverer::new(
        store.clone(),
        signer,
        policy,
        DeliveryConfig {
            retry_delays: common.webhook_retry_delays.0.clone(),
            attempt_timeout: common.webhook_timeout,
            idle_poll: Duration::from_millis(200),
        },
        metrics,
    )?);
    let deliver_task = tokio::spawn(deliverer.run(quit_rx.clone()));
    let sweeper = {
        let store = store.clone();
        let retention = common.retention;
        let mut quit = quit_rx.clone();
        tokio::spawn(async move {
            let mut last_warning = None::<tokio::time::Instant>;
            loop {
                if let Err(e) = store.sweep(now_ms(), retention).await {
                    // Once per 10 s is enough to say the store is down.
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "queue housekeeping failed");
                        last_warning = Some(tokio::time::Instant::now());
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = crate::shutdown::wait_true(&mut quit) => return,
                }
            }
        })
    };

    tracing::info!(
        listen = %common.listen, queue_listen = %common.queue_listen, admin_listen = %common.admin_listen,
        app = %upstream_url, data_dir = %data_dir.display(), "fal-sidecar ready"
    );

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // The supervisor keeps the app up through the drain (running requests need it) and
    // stops it last.
    let (sup_stop_tx, sup_stop_rx) = watch::channel(false);
    let mut supervisor = match supervised {
        Some((sup, c, _)) => tokio::spawn(sup.supervise(c, sup_stop_rx)),
        None => tokio::spawn(std::future::pending::<Result<(), String>>()),
    };
    let mut gave_up = None;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
        r = &mut supervisor => {
            let msg = match r {
                Ok(Err(msg)) => msg,
                Ok(Ok(())) => "the app supervisor stopped".to_string(),
                Err(e) => format!("the app supervisor failed: {e}"),
            };
            tracing::error!(error = %msg, "stopping (queued requests stay in the store)");
            gave_up = Some(msg);
        }
    }

    // Drain: fail readiness, stop accepting and claiming, let running requests finish.
    let deadline = tokio::time::Instant::now() + drain;
    app.draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = claim_stop_tx.send(true);
    if tokio::time::timeout(drain, &mut workers_task)
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            "requests still running at the drain deadline; giving them back to the queue"
        );
        let _ = abandon_tx.send(true);
        let _ = workers_task.await;
    }
    // Open WebSockets run until the drain deadline, then are cut.
    while app.sockets.open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.sockets.cut_all();
    while servers.join_next().await.is_some() {}
    let _ =
        tokio::task::spawn_blocking(move || run_threads.into_iter().for_each(|t| drop(t.join())))
            .await;
    let _ = quit_tx.send(true);
    let _ = tokio::join!(deliver_task, sweeper, admin);
    if gave_up.is_none() {
        let _ = sup_stop_tx.send(true);
        if !is_child {
            supervisor.abort();
        }
        let _ = supervisor.await;
    }
    tracing::info!("stopped");
    match gave_up {
        Some(msg) => Err(anyhow::anyhow!(msg)),
        None => Ok(0),
    }
}
