//! `fal-operator`: config → runtime → serve. The work lives in the library.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use fal_operator::catalog::MachineCatalog;
use fal_operator::config::{self, EnvironmentsConfig, NetworkPolicyConfig, OperatorConfig};
use fal_operator::controller::{self, Context};
use fal_operator::gateway::GatewayConfig;
use fal_operator::keycmd;
use fal_operator::local::LocalFunction;
use fal_operator::metrics::{self, Metrics};
use fal_operator::render;
use fal_operator::serve::{self, GatewayOptions, Listen, LocalOptions};

#[derive(Parser)]
#[command(
    name = "fal-operator",
    version,
    about = "Kubernetes operator for self-hosted fal-serverless"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The seed's deploy flow: a decorated Python file becomes a function.
    #[command(subcommand)]
    Function(FunctionCommand),
    /// Print the CRDs (FalFunction, FalKey) as multi-document YAML: the files of crds/.
    Crd {
        /// Write crds/falfunctions.yaml and crds/falkeys.yaml into DIR instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the objects a FalFunction manifest becomes, without a cluster.
    Render {
        /// FalFunction manifest (multi-document YAML allowed); `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        objects: ObjectArgs,
    },
    /// The always-on entry point: queue API, sync calls, wake-ups (in a cluster).
    Gateway(GatewayArgs),
    /// Gateway + autoscaler on this machine, replicas as local processes: try a
    /// function's scale-to-zero behaviour before deploying it.
    Local(LocalArgs),
    /// Reconcile FalFunctions in the current cluster.
    Controller {
        #[command(flatten)]
        objects: ObjectArgs,
        /// Address of /metrics and /healthz.
        #[arg(long, env = config::ENV_METRICS_ADDR, default_value = "0.0.0.0:8080")]
        metrics_addr: SocketAddr,
        /// Act only while holding a Lease (run two replicas safely).
        #[arg(long, env = "FAL_LEADER_ELECT", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
        leader_elect: bool,
        /// Name of the Lease.
        #[arg(long, env = "FAL_LEASE_NAME", default_value = "fal-operator")]
        lease_name: String,
        /// Namespace of the Lease [default: POD_NAMESPACE].
        #[arg(long, env = "FAL_LEASE_NAMESPACE")]
        lease_namespace: Option<String>,
        /// FalFunctions reconciled at the same time. Each reconcile holds a few API
        /// requests (and their connections) open: unbounded, a restart with 1,000
        /// functions opened ~1,000 connections at once (150 MiB, every reconcile slow).
        #[arg(long, env = "FAL_RECONCILE_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
        reconcile_concurrency: u16,
    },
    /// API keys (FalKey objects): create, list, revoke.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a key: the FalKey YAML on stdout (or created with --apply) and the one line
    /// FAL_KEY=<keyId>:<secret> on stderr, the only place the secret ever appears.
    Create {
        /// Name of the FalKey.
        name: String,
        /// Namespace of the key: its requests belong to this tenant [default: the
        /// kubeconfig context's namespace].
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Only this function, NAME (of the key's namespace) or NAMESPACE/NAME
        /// (repeatable; default: every function the auth modes allow).
        #[arg(long = "function", value_name = "FUNCTION")]
        functions: Vec<String>,
        /// Requests per second allowed with the key (default: unlimited).
        #[arg(long)]
        rps: Option<f64>,
        /// Requests allowed at once above --rps [default: --rps rounded up].
        #[arg(long, requires = "rps")]
        burst: Option<i32>,
        /// Expiry: a duration from now (30d, 12h) or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
        /// Create the FalKey in the kubeconfig's cluster instead of printing it.
        #[arg(long)]
        apply: bool,
    },
    /// List keys: namespace, name, key id, functions, rate, expiry, disabled.
    List {
        /// Namespace [default: the kubeconfig context's namespace].
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long, conflicts_with = "namespace")]
        all_namespaces: bool,
    },
    /// Delete a key (or with --disable keep it, refused): the gateway refuses it at once.
    Revoke {
        /// Name of the FalKey.
        name: String,
        /// Namespace [default: the kubeconfig context's namespace].
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Set spec.disabled: true instead of deleting.
        #[arg(long)]
        disable: bool,
    },
}

#[derive(Subcommand)]
enum FunctionCommand {
    /// Serve FUNCTION of FILE (decorated with fal_serverless's @isolated) as a function:
    /// a new revision when the file changed, then the seed's two lines (revision, URL).
    Serve {
        /// The Python file.
        file: PathBuf,
        /// The decorated function in it.
        function: String,
        /// The function's name [default: FUNCTION, '_' as '-'].
        #[arg(long)]
        alias: Option<String>,
        /// Namespace (the owner in URLs) [default: the kubeconfig context's; `default`
        /// with --local].
        #[arg(short = 'n', long = "namespace")]
        namespace: Option<String>,
        /// Who may call it.
        #[arg(long, default_value = "private", value_parser = ["private", "shared", "public"])]
        auth: String,
        /// Register with a running `fal-operator local` at this admin address (without
        /// it: the cluster of the current kubeconfig).
        #[arg(long, env = "FAL_LOCAL_ADMIN")]
        local: Option<String>,
        /// In a cluster: longest wait for the environment build and the rollout.
        #[arg(long, default_value = "30m", value_parser = fal_sidecar::config::secs)]
        timeout: Duration,
        /// pip index for the environment (air-gapped: your mirror).
        #[arg(long)]
        index_url: Option<String>,
        /// pip --find-links (a local wheelhouse), repeatable.
        #[arg(long)]
        find_links: Vec<String>,
        /// pip --no-index (only --find-links).
        #[arg(long)]
        no_index: bool,
    },
}

/// Settings the gateway and `local` share.
#[derive(Args)]
struct GatewayFlags {
    /// Routes `Host: {name}.{namespace}.{domain}` to a function (per-app host).
    #[arg(long, env = "FAL_GATEWAY_DOMAIN")]
    domain: Option<String>,
    /// Longest a sync call waits for a replica (seconds) [default: the function's startupTimeout].
    #[arg(long, env = "FAL_COLD_START_TIMEOUT", value_parser = fal_sidecar::config::secs)]
    cold_start_timeout: Option<Duration>,
    /// Allow webhooks to this CIDR, IP or host name (repeatable).
    #[arg(
        long = "webhook-allow",
        env = "FAL_WEBHOOK_ALLOW",
        value_delimiter = ','
    )]
    webhook_allow: Vec<String>,
    /// Largest request body accepted (413 beyond).
    #[arg(long, env = "FAL_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Requests allowed to wait per function; more get 429 with Retry-After.
    #[arg(long, env = "FAL_MAX_QUEUE", default_value_t = 100_000)]
    max_queue: usize,
    /// How long results are kept (seconds, or 1h, 30m…).
    #[arg(long, env = "FAL_RETENTION", default_value = "3600", value_parser = fal_sidecar::config::secs)]
    retention: Duration,
    /// Close a WebSocket after this long without a byte either way (seconds) [default: never].
    #[arg(long, env = "FAL_WEBSOCKET_IDLE_TIMEOUT", value_parser = fal_sidecar::config::secs)]
    websocket_idle_timeout: Option<Duration>,
    /// Delays between webhook attempts (comma-separated seconds).
    #[arg(long, env = "FAL_WEBHOOK_RETRY_DELAYS", default_value = "15,60,120,300,600,900,1200,1500,2700", value_parser = fal_sidecar::config::secs_list)]
    webhook_retry_delays: fal_sidecar::config::DelayList,
}

impl GatewayFlags {
    fn config(&self) -> GatewayConfig {
        let mut c = GatewayConfig {
            domain: self.domain.clone(),
            cold_start_timeout: self.cold_start_timeout,
            max_body_bytes: self.max_body_bytes,
            max_queue: self.max_queue,
            retention: self.retention,
            websocket_idle_timeout: self.websocket_idle_timeout,
            ..GatewayConfig::default()
        };
        c.delivery.retry_delays = self.webhook_retry_delays.0.clone();
        c
    }
}

#[derive(Args)]
struct GatewayArgs {
    /// The shared Redis store: redis://HOST:PORT/DB, redis+cluster://H:P[,H:P…] or
    /// redis+sentinel://S:P[,S:P…]/MASTER[/DB] (rediss… for TLS).
    #[arg(long, env = config::ENV_STORE_URL)]
    store: String,
    /// Redis replicas that must confirm a submit before it is acknowledged (WAIT).
    #[arg(long, env = config::ENV_STORE_REPLICAS, default_value_t = 0)]
    store_replicas: u32,
    /// Run host: sync calls (`fal.run` style) and /{namespace}/{name}/fal/queue/….
    #[arg(long, env = "FAL_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    listen: String,
    /// Queue host (`queue.fal.run` style).
    #[arg(long, env = "FAL_GATEWAY_QUEUE_LISTEN", default_value = "0.0.0.0:8081")]
    queue_listen: String,
    /// /metrics, /healthz, /readyz, /functions.
    #[arg(long, env = "FAL_GATEWAY_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    admin_listen: String,
    /// Ed25519 webhook signing key file (the sidecars' key, so one JWKS verifies all).
    #[arg(long, env = "FAL_SIGNING_KEY_FILE")]
    signing_key: Option<PathBuf>,
    /// After SIGTERM, seconds to keep serving with readiness failing (while Services
    /// and Ingresses stop routing here), before the listeners drain.
    #[arg(long, env = "FAL_SHUTDOWN_DELAY", default_value = "5", value_parser = fal_sidecar::config::secs)]
    shutdown_delay: Duration,
    /// Where a generated signing key is kept when --signing-key is not given.
    #[arg(long, env = "FAL_GATEWAY_DATA_DIR", default_value = "/tmp/fal-gateway")]
    data_dir: PathBuf,
    #[command(flatten)]
    flags: GatewayFlags,
}

#[derive(Args)]
struct LocalArgs {
    /// FalFunction manifests (multi-document YAML); each needs spec.command. FalKey
    /// documents may sit beside them: then every call needs one of those keys.
    /// (Optional: functions can also be registered later with `function serve --local`.)
    #[arg(short = 'f', long = "filename", num_args = 1..)]
    files: Vec<PathBuf>,
    /// Refuse calls without a valid key even when no FalKey is declared (only public
    /// functions answer then).
    #[arg(long, env = "FAL_REQUIRE_AUTH")]
    require_auth: bool,
    /// The shared Redis store (redis://…, redis+cluster://…, redis+sentinel://…).
    #[arg(long, env = config::ENV_STORE_URL, default_value = "redis://127.0.0.1:6379/0")]
    store: String,
    /// Redis replicas that must confirm a write before it is acknowledged (WAIT), for
    /// the gateway and every replica.
    #[arg(long, env = config::ENV_STORE_REPLICAS, default_value_t = 0)]
    store_replicas: u32,
    /// Run host: sync calls and /{namespace}/{name}/fal/queue/….
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Queue host.
    #[arg(long, default_value = "127.0.0.1:8081")]
    queue_listen: String,
    /// /metrics, /healthz, /readyz, /functions.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: String,
    /// The fal-sidecar binary [default: next to this binary, then PATH].
    #[arg(long, env = "FAL_SIDECAR_BIN")]
    sidecar_bin: Option<PathBuf>,
    /// Replica data dirs and the webhook signing key.
    #[arg(long, default_value = "./fal-local")]
    state_dir: PathBuf,
    #[command(flatten)]
    flags: GatewayFlags,
}

/// `fal-sidecar` next to this binary, else on PATH.
fn default_sidecar_bin() -> PathBuf {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("fal-sidecar")));
    match sibling {
        Some(p) if p.is_file() => p,
        _ => PathBuf::from("fal-sidecar"),
    }
}

/// What the rendered objects depend on; shared by `render` and `controller`.
#[derive(Args)]
struct ObjectArgs {
    /// Machine catalog YAML overriding and extending the built-in machine types.
    #[arg(long, env = config::ENV_CATALOG)]
    catalog: Option<PathBuf>,
    /// Image of the injected fal-sidecar.
    #[arg(long, env = config::ENV_SIDECAR_IMAGE, default_value = config::DEFAULT_SIDECAR_IMAGE)]
    sidecar_image: String,
    /// Job store URL given to every sidecar (redis://…, redis+cluster://…,
    /// redis+sentinel://… or file:…).
    #[arg(long, env = config::ENV_STORE_URL, default_value = config::DEFAULT_STORE_URL)]
    store_url: String,
    /// Redis replicas that must confirm a sidecar's write before it is acknowledged
    /// (FAL_SIDECAR_STORE_REPLICAS of every sidecar).
    #[arg(long, env = config::ENV_STORE_REPLICAS, default_value_t = 0)]
    store_replicas: u32,
    /// Secret (NAME:KEY, in each function's namespace) the sidecars read the store URL
    /// from, instead of a plaintext --store-url in their pod spec.
    #[arg(long, env = config::ENV_STORE_SECRET, value_parser = secret_ref)]
    store_secret: Option<(String, String)>,
    /// Public domain of the gateway, used for status URLs (e.g. fal.example.com).
    #[arg(long, env = config::ENV_GATEWAY_DOMAIN)]
    gateway_domain: Option<String>,
    /// Secret (in each function's namespace) holding the webhook signing key.
    #[arg(long, env = config::ENV_SIGNING_KEY_SECRET)]
    signing_key_secret: Option<String>,
    /// In-cluster URL of the gateway's run host (its Service), for status URLs when
    /// there is no --gateway-domain (e.g. http://fal-gateway.fal-system.svc.cluster.local).
    #[arg(long, env = config::ENV_GATEWAY_URL, requires = "gateway_queue_url")]
    gateway_url: Option<String>,
    /// In-cluster URL of the gateway's queue host (…svc.cluster.local:8081).
    #[arg(long, env = config::ENV_GATEWAY_QUEUE_URL, requires = "gateway_url")]
    gateway_queue_url: Option<String>,
    /// Give every function a NetworkPolicy: its pods admit only the gateway (and
    /// --metrics-namespace on the metrics port). false: none, and the ones made are removed.
    #[arg(long, env = config::ENV_NETWORK_POLICY, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    network_policy: bool,
    /// Namespace of the gateway pods [default: POD_NAMESPACE, else fal-system].
    #[arg(long, env = config::ENV_GATEWAY_NAMESPACE)]
    gateway_namespace: Option<String>,
    /// Labels of the gateway pods, KEY=VALUE[,KEY=VALUE…].
    #[arg(long, env = config::ENV_GATEWAY_POD_LABELS, default_value = config::DEFAULT_GATEWAY_POD_LABELS, value_parser = config::parse_labels)]
    gateway_pod_labels: BTreeMap<String, String>,
    /// Webhook targets every sidecar may call despite the SSRF guard (CIDR, IP or host
    /// name; the gateway's --webhook-allow list: both deliver from one outbox).
    #[arg(long = "webhook-allow", env = config::ENV_WEBHOOK_ALLOW, value_delimiter = ',')]
    webhook_allow: Vec<String>,
    /// Namespace allowed to scrape the sidecars' metrics port (Prometheus's).
    #[arg(long, env = config::ENV_METRICS_NAMESPACE)]
    metrics_namespace: Option<String>,
    /// Image of the Python runner: runs served files (`function serve`) and builds
    /// their environments.
    #[arg(long, env = config::ENV_RUNNER_IMAGE, default_value = config::DEFAULT_RUNNER_IMAGE)]
    runner_image: String,
    /// PersistentVolumeClaim of each function namespace holding built environments
    /// (created when missing; an existing one is used as it is).
    #[arg(long, env = config::ENV_ENVIRONMENTS_CLAIM, default_value = config::DEFAULT_ENVIRONMENTS_CLAIM)]
    environments_claim: String,
    /// Size of an environments claim the operator creates.
    #[arg(long, env = config::ENV_ENVIRONMENTS_SIZE, default_value = config::DEFAULT_ENVIRONMENTS_SIZE)]
    environments_size: String,
    /// StorageClass of an environments claim the operator creates [default: the
    /// cluster's default class].
    #[arg(long, env = config::ENV_ENVIRONMENTS_STORAGE_CLASS)]
    environments_storage_class: Option<String>,
    /// Access mode of an environments claim the operator creates: ReadWriteMany lets
    /// pods on every node mount it; ReadWriteOnce suits one node.
    #[arg(long, env = config::ENV_ENVIRONMENTS_ACCESS_MODE, default_value = config::DEFAULT_ENVIRONMENTS_ACCESS_MODE, value_parser = ["ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"])]
    environments_access_mode: String,
    /// Environment of the build Jobs, KEY=VALUE (repeatable; comma-separated in the
    /// variable), e.g. PIP_INDEX_URL=https://mirror/simple.
    #[arg(long = "build-env", env = config::ENV_BUILD_ENV, value_delimiter = ',', value_parser = key_value)]
    build_env: Vec<(String, String)>,
}

/// `KEY=VALUE` of an environment variable.
fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v))
            if !k.is_empty()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !k.as_bytes()[0].is_ascii_digit() =>
        {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!(
            "{s:?}: expected KEY=VALUE with KEY an environment variable name"
        )),
    }
}

impl ObjectArgs {
    /// `pod_namespace`: this process's POD_NAMESPACE, the default gateway namespace.
    fn load(
        self,
        pod_namespace: Option<String>,
    ) -> anyhow::Result<(MachineCatalog, OperatorConfig)> {
        let catalog = MachineCatalog::load(self.catalog.as_deref())?;
        let network_policy = if self.network_policy {
            let gateway_namespace = self
                .gateway_namespace
                .or(pod_namespace)
                .filter(|ns| !ns.is_empty())
                .unwrap_or_else(|| config::DEFAULT_GATEWAY_NAMESPACE.to_string());
            let metrics_namespace = self.metrics_namespace.filter(|ns| !ns.is_empty());
            for (flag, ns) in [
                ("--gateway-namespace", Some(&gateway_namespace)),
                ("--metrics-namespace", metrics_namespace.as_ref()),
            ] {
                if let Some(ns) = ns.filter(|ns| !fal_sidecar::auth::keys::is_label(ns)) {
                    anyhow::bail!("{flag}: {ns:?} is not a namespace name");
                }
            }
            Some(NetworkPolicyConfig {
                gateway_namespace,
                gateway_pod_labels: self.gateway_pod_labels,
                metrics_namespace,
            })
        } else {
            None
        };
        let config = OperatorConfig {
            sidecar_image: self.sidecar_image,
            store_url: self.store_url,
            store_secret: self.store_secret,
            gateway_domain: self.gateway_domain,
            gateway_urls: self.gateway_url.zip(self.gateway_queue_url),
            signing_key_secret: self.signing_key_secret,
            store_replicas: self.store_replicas,
            webhook_allow: self.webhook_allow,
            network_policy,
            environments: EnvironmentsConfig {
                runner_image: self.runner_image,
                claim: self.environments_claim,
                size: self.environments_size,
                storage_class: self.environments_storage_class.filter(|c| !c.is_empty()),
                access_mode: self.environments_access_mode,
                build_env: self.build_env,
            },
        };
        Ok((catalog, config))
    }
}

/// `NAME:KEY` of a Secret.
fn secret_ref(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((n, k)) if !n.is_empty() && !k.is_empty() => Ok((n.to_string(), k.to_string())),
        _ => Err(format!(
            "{s:?}: expected NAME:KEY (a Secret and the key holding the store URL)"
        )),
    }
}

fn read_input(path: &PathBuf) -> anyhow::Result<(String, String)> {
    if path.as_os_str() == "-" {
        let text = std::io::read_to_string(std::io::stdin()).context("reading stdin")?;
        return Ok((text, "<stdin>".to_string()));
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((text, path.display().to_string()))
}

fn main() {
    // The error chain on one line, no backtrace: these are user-facing messages
    // (`render` names the field at fault).
    if let Err(e) = run(Cli::parse()) {
        eprintln!("fal-operator: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd { dir: None } => {
            print!("{}", render::crd_yaml()?);
            Ok(())
        }
        Command::Crd { dir: Some(dir) } => {
            for (file, yaml) in render::crd_files()? {
                let path = dir.join(file);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
        Command::Render { file, objects } => {
            let (catalog, config) = objects.load(pod_namespace())?;
            let (text, origin) = read_input(&file)?;
            print!("{}", render::render(&text, &origin, &catalog, &config)?);
            Ok(())
        }
        Command::Gateway(a) => {
            init_tracing();
            let opts = GatewayOptions {
                store_url: a.store,
                store_replicas: a.store_replicas,
                listen: Listen {
                    run: a.listen,
                    queue: a.queue_listen,
                    admin: a.admin_listen,
                },
                gateway: a.flags.config(),
                signing_key: a.signing_key,
                data_dir: a.data_dir,
                webhook_allow: a.flags.webhook_allow,
                shutdown_delay: a.shutdown_delay,
            };
            runtime()?.block_on(serve::run_gateway(opts))?;
            Ok(())
        }
        Command::Local(a) => {
            init_tracing();
            let mut functions = Vec::new();
            let mut keys = Vec::new();
            for file in &a.files {
                let (text, origin) = read_input(file)?;
                let (ffs, ks) = render::parse_functions_and_keys(&text, &origin)?;
                for ff in ffs {
                    functions.push(LocalFunction::from_object(&ff)?);
                }
                keys.extend(ks);
            }
            if functions.is_empty() && !a.files.is_empty() {
                anyhow::bail!("no FalFunction in {:?}", a.files);
            }
            let opts = LocalOptions {
                functions,
                keys,
                require_auth: a.require_auth,
                store_url: a.store,
                store_replicas: a.store_replicas,
                listen: Listen {
                    run: a.listen,
                    queue: a.queue_listen,
                    admin: a.admin_listen,
                },
                sidecar_bin: a.sidecar_bin.unwrap_or_else(default_sidecar_bin),
                state_dir: a.state_dir,
                gateway: a.flags.config(),
                webhook_allow: a.flags.webhook_allow,
            };
            runtime()?.block_on(serve::run_local(opts))?;
            Ok(())
        }
        Command::Controller {
            objects,
            metrics_addr,
            leader_elect,
            lease_name,
            lease_namespace,
            reconcile_concurrency,
        } => {
            init_tracing();
            let (catalog, config) = objects.load(pod_namespace())?;
            let lease = leader_elect.then(|| {
                let ns = lease_namespace
                    .or_else(|| std::env::var("POD_NAMESPACE").ok())
                    .unwrap_or_else(|| "default".into());
                (ns, lease_name)
            });
            runtime()?.block_on(run_controller(
                catalog,
                config,
                metrics_addr,
                lease,
                reconcile_concurrency,
            ))
        }
        Command::Key(cmd) => run_key(cmd),
        Command::Function(FunctionCommand::Serve {
            file,
            function,
            alias,
            namespace,
            auth,
            local,
            timeout,
            index_url,
            find_links,
            no_index,
        }) => serve_function(
            file, function, alias, namespace, auth, local, timeout, index_url, find_links, no_index,
        ),
    }
}

fn pod_namespace() -> Option<String> {
    std::env::var("POD_NAMESPACE").ok()
}

/// A client of the kubeconfig's cluster and the namespace to use: `-n`, else the
/// kubeconfig context's.
async fn kube_client(namespace: Option<String>) -> anyhow::Result<(kube::Client, String)> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster)")?;
    let ns = namespace.unwrap_or_else(|| client.default_namespace().to_string());
    Ok((client, ns))
}

fn run_key(cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Create {
            name,
            namespace,
            functions,
            rps,
            burst,
            expires,
            apply,
        } => {
            let opts = keycmd::CreateOptions {
                name,
                namespace,
                functions,
                requests_per_second: rps,
                burst,
                expires,
            };
            let key = keycmd::new_key(&opts, std::time::SystemTime::now(), &mut keycmd::os_random)?;
            if apply {
                let stored = runtime()?.block_on(async {
                    let (client, ns) = kube_client(opts.namespace.clone()).await?;
                    anyhow::Ok(keycmd::create(&client, &ns, &key.object).await?)
                })?;
                println!(
                    "falkey.fal.serverless.dev/{} created in namespace {} (key id {})",
                    opts.name,
                    stored.metadata.namespace.unwrap_or_default(),
                    key.object.spec.key_id
                );
            } else {
                print!("{}", keycmd::to_yaml(&key.object)?);
            }
            // The only place the secret is ever written: stderr, so `> key.yaml` keeps
            // it out of the file.
            eprintln!("FAL_KEY={}", key.fal_key());
            Ok(())
        }
        KeyCommand::List {
            namespace,
            all_namespaces,
        } => runtime()?.block_on(async {
            let (client, ns) = kube_client(namespace).await?;
            let scope = (!all_namespaces).then_some(ns.as_str());
            let keys = keycmd::list(&client, scope).await?;
            if keys.is_empty() {
                match scope {
                    Some(ns) => eprintln!("No FalKeys in namespace {ns}."),
                    None => eprintln!("No FalKeys in any namespace."),
                }
            } else {
                print!("{}", keycmd::table(&keys, std::time::SystemTime::now()));
            }
            Ok(())
        }),
        KeyCommand::Revoke {
            name,
            namespace,
            disable,
        } => runtime()?.block_on(async {
            let (client, ns) = kube_client(namespace).await?;
            if disable {
                keycmd::disable(&client, &ns, &name).await?;
                println!("falkey.fal.serverless.dev/{name} disabled in namespace {ns}");
            } else {
                keycmd::delete(&client, &ns, &name).await?;
                println!("falkey.fal.serverless.dev/{name} deleted from namespace {ns}");
            }
            Ok(())
        }),
    }
}

#[allow(clippy::too_many_arguments)]
fn serve_function(
    file: PathBuf,
    function: String,
    alias: Option<String>,
    namespace: Option<String>,
    auth: String,
    local: Option<String>,
    timeout: Duration,
    index_url: Option<String>,
    find_links: Vec<String>,
    no_index: bool,
) -> anyhow::Result<()> {
    use fal_operator::deploy::{self, Deployment, IndexSettings};
    let python = std::env::var("FAL_PYTHON").unwrap_or_else(|_| "python3".into());
    let isolated = deploy::inspect(&python, &file, &function)?;
    for ignored in &isolated.ignored {
        eprintln!("note: @isolated({ignored}=…) is not used by this deploy flow; ignored");
    }
    let source =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    // Wheelhouses as absolute paths: the build runs elsewhere.
    let find_links = find_links
        .into_iter()
        .map(|f| {
            std::fs::canonicalize(&f)
                .map(|p| p.display().to_string())
                .unwrap_or(f)
        })
        .collect();
    let rt = runtime()?;
    // The cluster's client, and the namespace it defaults to.
    let (client, namespace) = match (&local, namespace) {
        (Some(_), ns) => (None, ns.unwrap_or_else(|| "default".into())),
        (None, ns) => {
            let (client, ns) = rt.block_on(kube_client(ns))?;
            (Some(client), ns)
        }
    };
    let d = Deployment {
        namespace,
        alias: alias.unwrap_or_else(|| function.replace('_', "-")),
        filename: file.display().to_string(),
        source,
        isolated,
        auth: serde_json::from_value(serde_json::Value::String(auth))?,
        index: IndexSettings {
            index_url,
            find_links,
            no_index,
        },
    };
    d.validate(&MachineCatalog::builtin())?;
    let deployed = match (local, client) {
        (Some(admin), _) => rt.block_on(deploy::local::register(&admin, &d)),
        (None, Some(client)) => {
            let opts = deploy::cluster::Options { timeout };
            rt.block_on(deploy::cluster::register(client, &d, &opts))
        }
        (None, None) => unreachable!("a client is made whenever --local is absent"),
    }
    .map_err(anyhow::Error::msg)?;
    print!(
        "{}",
        deploy::announce(&d.alias, &deployed.revision, &deployed.url)
    );
    Ok(())
}

fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

async fn run_controller(
    catalog: MachineCatalog,
    config: OperatorConfig,
    metrics_addr: SocketAddr,
    lease: Option<(String, String)>,
    reconcile_concurrency: u16,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    if let Err(hint) = controller::check_crd_installed(&client).await {
        anyhow::bail!(hint);
    }
    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(&registry)?;
    let listener = metrics::bind(metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {metrics_addr}"))?;
    tokio::spawn(metrics::serve(listener, registry.clone()));
    let instance = std::env::var("POD_NAME").ok();
    if let Some((ns, name)) = &lease {
        let me = instance
            .clone()
            .unwrap_or_else(|| format!("fal-operator-{}", std::process::id()));
        fal_operator::leader::lead(client.clone(), ns, name, &me).await;
    }
    let store_url = config.store_url.clone();
    let ctx = Arc::new(Context::new(
        client.clone(),
        catalog,
        config,
        metrics,
        instance.clone(),
    ));
    // The autoscaler needs the shared store; with the per-pod file store there is no
    // load to read (every function keeps its one replica).
    if store_url.starts_with("redis") {
        let registry = registry.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let publish = move |a| {
                let _ = ctx.autoscaler.set(a);
            };
            if let Err(e) =
                serve::run_cluster_autoscaler(client, &store_url, &registry, instance, publish)
                    .await
            {
                tracing::error!(error = %e, "the autoscaler stopped");
            }
        });
    } else {
        tracing::warn!(store = %store_url, "no shared store (--store-url redis://…): the autoscaler is off");
    }
    tracing::info!(%metrics_addr, "fal-operator controller started");
    controller::run(ctx, reconcile_concurrency).await;
    tracing::info!("fal-operator controller stopped");
    Ok(())
}

#[cfg(test)]
#[path = "main_tests.rs"]
mod tests;
