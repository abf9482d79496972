//! Wiring of `fal-operator gateway` and `fal-operator local`: config → store, key,
//! listeners → serve → drain. `main` parses flags into these structs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fal_sidecar::auth::keys::{KeyRecord, KeyRing};
use fal_sidecar::auth::ratelimit::Leased;
use fal_sidecar::auth::Authorizer;
use fal_sidecar::server::{self, ConnLimits};
use fal_sidecar::store::redis::{RedisHub, Subscribe};
use fal_sidecar::webhook::signing::Signer;
use fal_sidecar::webhook::ssrf::Policy;
use prometheus::Registry;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::autoscale::{AutoscaleMetrics, Autoscaler};
use crate::gateway::{self, Admin, Gateway, GatewayConfig};
use crate::local::{LocalConfig, LocalFunction, LocalScaler};
use crate::{Error, Result};

/// Listeners and shared settings of a gateway process.
#[derive(Debug, Clone)]
pub struct Listen {
    pub run: String,
    pub queue: String,
    pub admin: String,
}

/// Connects to the store and checks it answers (a clear error when it does not).
/// `replicas`: Redis replicas that must confirm a write (submits through the gateway)
/// before it is acknowledged.
pub async fn connect_store(url: &str, replicas: u32) -> Result<Arc<RedisHub>> {
    if !url.starts_with("redis") {
        return Err(Error::Scale(format!(
            "--store {:?}: the gateway needs the shared Redis store (redis://HOST:PORT/DB, \
             redis+cluster://H:P[,H:P…] or redis+sentinel://S:P[,S:P…]/MASTER[/DB])",
            fal_sidecar::store::redis_conn::redact(url)
        )));
    }
    let durability = fal_sidecar::store::redis::Durability {
        replicas,
        ..Default::default()
    };
    let hub = RedisHub::connect_with(url, Subscribe::All, durability)?;
    hub.ping().await.map_err(|e| {
        Error::Scale(format!(
            "cannot reach the store at {}: {e}. Start Redis (e.g. `redis-server --port 6379`) or pass --store redis://HOST:PORT/DB",
            hub.server()
        ))
    })?;
    Ok(hub)
}

/// Binds and serves the gateway's three listeners until `stop`; returns the threads
/// and tasks to join.
pub struct Served {
    threads: Vec<std::thread::JoinHandle<()>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Served {
    pub async fn join(mut self) {
        while self.tasks.join_next().await.is_some() {}
        let threads = std::mem::take(&mut self.threads);
        let _ =
            tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join())))
                .await;
    }
}

pub async fn serve_listeners(
    gw: Arc<Gateway>,
    admin: Arc<Admin>,
    listen: &Listen,
    stop: watch::Receiver<bool>,
    quit: watch::Receiver<bool>,
) -> Result<Served> {
    let io = |e: anyhow::Error| Error::Scale(format!("{e:#}"));
    drop(
        server::bind(&listen.run, "the run host (--listen)")
            .await
            .map_err(io)?,
    );
    drop(
        server::bind(&listen.queue, "the queue host (--queue-listen)")
            .await
            .map_err(io)?,
    );
    let admin_l = server::bind(&listen.admin, "metrics and probes (--admin-listen)")
        .await
        .map_err(io)?;
    let limits = ConnLimits::default();
    let drain = Duration::from_secs(30);
    let mut threads = server::serve_per_thread(
        &listen.run,
        "the run host (--listen)",
        fal_sidecar::runtime::http_threads(),
        gw.clone(),
        gateway::handle_run,
        limits,
        Some(fal_sidecar::api::fast::lane(Arc::new(gateway::Lane(
            gw.clone(),
        )))),
        stop.clone(),
        drain,
    )
    .map_err(io)?;
    // Where the fal clients submit: per-thread servers too (a Redis connection each).
    threads.extend(
        server::serve_per_thread(
            &listen.queue,
            "the queue host (--queue-listen)",
            fal_sidecar::runtime::http_threads(),
            gw.clone(),
            gateway::handle_queue,
            limits,
            None,
            stop,
            drain,
        )
        .map_err(io)?,
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(server::serve(
        admin_l,
        admin,
        gateway::handle_admin,
        limits,
        None,
        quit.clone(),
        drain,
    ));
    tasks.spawn(gw.clone().run_maintenance(quit.clone()));
    tasks.spawn(gw.run_reporter(quit));
    Ok(Served { threads, tasks })
}

/// Waits for SIGTERM or SIGINT.
pub async fn terminated() -> Result<()> {
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::Scale(format!("installing the SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::Scale(format!("installing the SIGINT handler: {e}")))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}

/// The webhook signing key: `--signing-key FILE`, else one kept in `dir`.
pub fn signer(key_file: Option<&std::path::Path>, dir: &std::path::Path) -> Result<Arc<Signer>> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    Signer::load_or_create(key_file, dir)
        .map(Arc::new)
        .map_err(|e| Error::Scale(format!("webhook signing key: {e}")))
}

/// Everything `local` needs.
pub struct LocalOptions {
    pub functions: Vec<LocalFunction>,
    /// FalKeys of the `-f` files: with any, every call needs one of them.
    pub keys: Vec<KeyRecord>,
    /// Keys required even with none declared.
    pub require_auth: bool,
    pub store_url: String,
    pub store_replicas: u32,
    pub listen: Listen,
    pub sidecar_bin: PathBuf,
    pub state_dir: PathBuf,
    pub gateway: GatewayConfig,
    pub webhook_allow: Vec<String>,
}

/// `fal-operator local`: gateway + autoscaler + local replicas until SIGTERM, then
/// every replica drained and stopped.
pub async fn run_local(mut opts: LocalOptions) -> Result<()> {
    let hub = connect_store(&opts.store_url, opts.store_replicas).await?;
    let signer = signer(None, &opts.state_dir)?;
    let signing_key = opts.state_dir.join("webhook-signing.key");
    // Loopback webhook targets are fine on one's own machine (as in `fal-sidecar run`).
    let policy = Arc::new(Policy::new(&opts.webhook_allow, true).map_err(Error::Scale)?);
    let registry = Registry::new();
    let required = opts.require_auth || !opts.keys.is_empty();
    if !required {
        tracing::warn!(
            listen = %opts.listen.run, queue_listen = %opts.listen.queue,
            "no FalKey declared: every function is open to anyone who reaches these addresses (declare FalKeys in the -f files, or pass --require-auth)"
        );
    }
    let ring = Arc::new(KeyRing::new());
    ring.replace_all(std::mem::take(&mut opts.keys));
    fal_sidecar::runtime::release_freed_memory();
    let auth = Arc::new(Authorizer::new(
        ring,
        signer.clone(),
        Arc::new(Leased::new(hub.clone())),
        required,
    ));
    let gw = Gateway::new(
        hub.clone(),
        opts.gateway.clone(),
        signer,
        policy,
        auth,
        &registry,
    )?;
    for f in &opts.functions {
        gw.upsert_function(f.info.clone());
    }
    let workdir = std::env::current_dir().map_err(|source| Error::Io {
        path: ".".into(),
        source,
    })?;
    let scaler = LocalScaler::new(
        gw.clone(),
        LocalConfig {
            sidecar_bin: opts.sidecar_bin.clone(),
            store_url: opts.store_url.clone(),
            store_replicas: opts.store_replicas,
            state_dir: opts.state_dir.clone(),
            signing_key,
            workdir,
            webhook_retry_delays: opts.gateway.delivery.retry_delays.clone(),
            webhook_allow: opts.webhook_allow.clone(),
        },
        opts.functions.clone(),
    );
    let metrics = AutoscaleMetrics::new(&registry).map_err(|e| Error::Scale(e.to_string()))?;
    let autoscaler = Arc::new(Autoscaler::new(hub.clone(), scaler.clone(), metrics));
    for f in &opts.functions {
        autoscaler.track(f.info.clone());
    }
    // `function serve --local`: decorated Python files registered at run time.
    let python = std::env::var("FAL_PYTHON").unwrap_or_else(|_| "python3".into());
    let deployer = Arc::new(crate::deploy::local::LocalDeployer::new(
        &opts.state_dir,
        python,
        &opts.listen.run,
        gw.clone(),
        scaler.clone(),
        autoscaler.clone(),
    )?);
    let (describe_scaler, describe_deployer) = (scaler.clone(), deployer.clone());
    let admin = Arc::new(Admin {
        gw: gw.clone(),
        registry,
        autoscaler: Some(autoscaler.clone()),
        describe: Some(Box::new(move |key: &str| {
            let mut v = describe_scaler.describe(key);
            if let Some(r) = describe_deployer.revisions(key) {
                v["served"] = r;
            }
            v
        })),
        deployer: Some(deployer),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let (quit_tx, quit_rx) = watch::channel(false);
    let served = serve_listeners(
        gw.clone(),
        admin,
        &opts.listen,
        stop_rx.clone(),
        quit_rx.clone(),
    )
    .await?;
    let scaling = tokio::spawn(autoscaler.clone().run(quit_rx.clone()));
    tracing::info!(
        listen = %opts.listen.run, queue_listen = %opts.listen.queue, admin_listen = %opts.listen.admin,
        functions = opts.functions.len(), store = %hub.server(), "fal-operator local ready"
    );
    terminated().await?;
    // Stop scaling first (nothing new starts), then drain every replica, then the
    // listeners: held calls get their answers while replicas drain.
    let _ = quit_tx.send(true);
    let _ = scaling.await;
    scaler.shutdown(Duration::from_secs(150)).await;
    let _ = stop_tx.send(true);
    gw.drain_sockets(tokio::time::Instant::now() + Duration::from_secs(30))
        .await;
    served.join().await;
    tracing::info!("stopped");
    Ok(())
}

/// Everything `gateway` needs.
pub struct GatewayOptions {
    pub store_url: String,
    pub store_replicas: u32,
    pub listen: Listen,
    pub gateway: GatewayConfig,
    pub signing_key: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub webhook_allow: Vec<String>,
    /// After SIGTERM: readiness fails at once, but the listeners keep serving this long
    /// (the Service's endpoints drop this pod meanwhile), then they drain.
    pub shutdown_delay: Duration,
}

/// `fal-operator gateway`: functions and replicas from the cluster.
pub async fn run_gateway(opts: GatewayOptions) -> Result<()> {
    let hub = connect_store(&opts.store_url, opts.store_replicas).await?;
    if opts.signing_key.is_none() {
        tracing::warn!("no --signing-key: webhooks sent from here are signed with a key of this gateway's own (mount the sidecars' key so one JWKS verifies them all)");
    }
    let signer = signer(opts.signing_key.as_deref(), &opts.data_dir)?;
    let policy = Arc::new(Policy::new(&opts.webhook_allow, false).map_err(Error::Scale)?);
    let registry = Registry::new();
    // A cluster gateway always checks keys: with no FalKey only public functions answer.
    let ring = Arc::new(KeyRing::new());
    let auth = Arc::new(Authorizer::new(
        ring,
        signer.clone(),
        Arc::new(Leased::new(hub.clone())),
        true,
    ));
    let gw = Gateway::new(hub, opts.gateway.clone(), signer, policy, auth, &registry)?;
    let client = kube::Client::try_default().await.map_err(|e| {
        Error::Scale(format!(
            "connecting to the Kubernetes API (in-cluster or KUBECONFIG): {e}"
        ))
    })?;
    let admin = Arc::new(Admin {
        gw: gw.clone(),
        registry,
        autoscaler: None,
        describe: None,
        deployer: None,
    });
    // Ready only once the cluster's functions and keys are known.
    gw.functions_synced
        .store(false, std::sync::atomic::Ordering::Relaxed);
    gw.keys_synced
        .store(false, std::sync::atomic::Ordering::Relaxed);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (quit_tx, quit_rx) = watch::channel(false);
    let served = serve_listeners(gw.clone(), admin, &opts.listen, stop_rx, quit_rx).await?;
    let functions = tokio::spawn(gateway::kube::watch_functions(client.clone(), gw.clone()));
    let keys = tokio::spawn(gateway::kube::watch_keys(client.clone(), gw.clone()));
    let endpoints = tokio::spawn(gateway::kube::watch_endpoints(client, gw.clone()));
    tracing::info!(listen = %opts.listen.run, queue_listen = %opts.listen.queue, admin_listen = %opts.listen.admin, "fal-operator gateway ready");
    terminated().await?;
    // Kubernetes removes a terminating pod from its endpoints while it sends SIGTERM:
    // kube-proxy and the Ingress still route here for a moment. Keep serving (readiness
    // failing) until they have caught up, then stop taking connections.
    gw.terminating
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(opts.shutdown_delay).await;
    let _ = stop_tx.send(true);
    gw.drain_sockets(tokio::time::Instant::now() + Duration::from_secs(30))
        .await;
    let _ = quit_tx.send(true);
    functions.abort();
    keys.abort();
    endpoints.abort();
    served.join().await;
    Ok(())
}

/// The autoscaler of `fal-operator controller`: functions from FalFunction watch
/// events, replica counts from a Deployment cache, load and wake-ups from the store.
pub async fn run_cluster_autoscaler(
    client: kube::Client,
    store_url: &str,
    registry: &Registry,
    instance: Option<String>,
    publish: impl FnOnce(Arc<Autoscaler>),
) -> Result<()> {
    use futures_util::StreamExt;
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::runtime::{reflector, watcher, WatchStreamExt};

    let hub = connect_store(store_url, 0).await?;
    let (reader, writer) = reflector::store::<Deployment>();
    let deployments: kube::Api<Deployment> = kube::Api::all(client.clone());
    let cfg = watcher::Config::default().labels(crate::labels::MANAGED_SELECTOR);
    let cache = reflector::reflector(writer, watcher::watcher(deployments, cfg))
        .default_backoff()
        .for_each(|_| std::future::ready(()));
    let scaler = Arc::new(crate::autoscale::kube::KubeScaler::new(
        client.clone(),
        reader.clone(),
        Arc::new(crate::autoscale::kube::StoreBusy(hub.clone())),
        instance,
    ));
    let metrics = AutoscaleMetrics::new(registry).map_err(|e| Error::Scale(e.to_string()))?;
    let autoscaler = Arc::new(Autoscaler::new(hub, scaler, metrics));
    publish(autoscaler.clone());
    let (_stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(cache);
    // Decisions wait for the cache: an empty one would read as "no Deployment".
    let _ = reader.wait_until_ready().await;
    tokio::spawn(gateway::kube::watch_functions(client, autoscaler.clone()));
    tracing::info!("autoscaler started");
    autoscaler.run(stop_rx).await;
    Ok(())
}
