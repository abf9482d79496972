//! `fal-operator`: config → runtime → serve. The work lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use fal_operator::catalog::MachineCatalog;
use fal_operator::config::{self, OperatorConfig};
use fal_operator::controller::{self, Context};
use fal_operator::metrics::{self, Metrics};
use fal_operator::render;

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
    /// Print the FalFunction CRD as YAML (the content of crds/falfunctions.yaml).
    Crd,
    /// Print the objects a FalFunction manifest becomes, without a cluster.
    Render {
        /// FalFunction manifest (multi-document YAML allowed); `-` reads stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        objects: ObjectArgs,
    },
    /// Reconcile FalFunctions in the current cluster.
    Controller {
        #[command(flatten)]
        objects: ObjectArgs,
        /// Address of /metrics and /healthz.
        #[arg(long, env = config::ENV_METRICS_ADDR, default_value = "0.0.0.0:8080")]
        metrics_addr: SocketAddr,
    },
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
    /// Job store URL given to every sidecar (redis://… or file:…).
    #[arg(long, env = config::ENV_STORE_URL, default_value = config::DEFAULT_STORE_URL)]
    store_url: String,
    /// Public domain of the gateway, used for status URLs (e.g. fal.example.com).
    #[arg(long, env = config::ENV_GATEWAY_DOMAIN)]
    gateway_domain: Option<String>,
    /// Secret (in each function's namespace) holding the webhook signing key.
    #[arg(long, env = config::ENV_SIGNING_KEY_SECRET)]
    signing_key_secret: Option<String>,
}

impl ObjectArgs {
    fn load(self) -> anyhow::Result<(MachineCatalog, OperatorConfig)> {
        let catalog = MachineCatalog::load(self.catalog.as_deref())?;
        let config = OperatorConfig {
            sidecar_image: self.sidecar_image,
            store_url: self.store_url,
            gateway_domain: self.gateway_domain,
            signing_key_secret: self.signing_key_secret,
        };
        Ok((catalog, config))
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
        Command::Crd => {
            print!("{}", render::crd_yaml()?);
            Ok(())
        }
        Command::Render { file, objects } => {
            let (catalog, config) = objects.load()?;
            let (text, origin) = read_input(&file)?;
            print!("{}", render::render(&text, &origin, &catalog, &config)?);
            Ok(())
        }
        Command::Controller {
            objects,
            metrics_addr,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info,kube=warn".into()),
                )
                .init();
            let (catalog, config) = objects.load()?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run_controller(catalog, config, metrics_addr))
        }
    }
}

async fn run_controller(
    catalog: MachineCatalog,
    config: OperatorConfig,
    metrics_addr: SocketAddr,
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
    tokio::spawn(metrics::serve(listener, registry));
    let instance = std::env::var("POD_NAME").ok();
    let ctx = Arc::new(Context::new(client, catalog, config, metrics, instance));
    tracing::info!(%metrics_addr, "fal-operator controller started");
    controller::run(ctx).await;
    tracing::info!("fal-operator controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_fill_the_config() {
        let cli = Cli::try_parse_from([
            "fal-operator",
            "controller",
            "--sidecar-image",
            "reg/sidecar:1",
            "--store-url",
            "redis://redis:6379",
            "--gateway-domain",
            "fal.example.com",
            "--metrics-addr",
            "127.0.0.1:9000",
        ])
        .unwrap();
        let Command::Controller {
            objects,
            metrics_addr,
        } = cli.command
        else {
            panic!("parsed the wrong subcommand");
        };
        assert_eq!(metrics_addr, "127.0.0.1:9000".parse().unwrap());
        let (catalog, config) = objects.load().unwrap();
        assert!(catalog.get("GPU-T4").is_some());
        assert_eq!(config.sidecar_image, "reg/sidecar:1");
        assert_eq!(config.store_url, "redis://redis:6379");
        assert_eq!(config.gateway_domain.as_deref(), Some("fal.example.com"));
        assert_eq!(config.signing_key_secret, None);
    }
}
