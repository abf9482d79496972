//! Command line and environment configuration (every flag has a `FAL_SIDECAR_*`
//! equivalent, which is how the operator configures the in-pod sidecar).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "fal-sidecar",
    version,
    about = "fal queue, webhooks and direct calls in front of any HTTP app"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the app command as a child (it must listen on $PORT) and serve it: local
    /// development, no cluster needed.
    Run(RunArgs),
    /// Serve an app that runs elsewhere (another container of the pod): the mode the
    /// operator injects.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: Common,
    /// Port the app must listen on (passed as $PORT); a free port when omitted.
    #[arg(long, env = "FAL_SIDECAR_APP_PORT")]
    pub app_port: Option<u16>,
    /// Time the app gets to start listening.
    #[arg(long, env = "FAL_SIDECAR_STARTUP_TIMEOUT", default_value = "300", value_parser = secs)]
    pub startup_timeout: Duration,
    /// When the app exits it is started again (same $PORT) after this delay, which
    /// doubles per restart up to --restart-delay-max. Meanwhile /readyz fails, direct
    /// calls get 503 + Retry-After, queued requests wait, and a request that was running
    /// goes back to the queue (--max-attempts bounds a request that keeps killing it).
    #[arg(long, env = "FAL_SIDECAR_RESTART_DELAY", default_value = "1", value_parser = secs)]
    pub restart_delay: Duration,
    /// Longest delay between restarts.
    #[arg(long, env = "FAL_SIDECAR_RESTART_DELAY_MAX", default_value = "30", value_parser = secs)]
    pub restart_delay_max: Duration,
    /// An app that stayed up this long restarts after --restart-delay again.
    #[arg(long, env = "FAL_SIDECAR_RESTART_RESET_AFTER", default_value = "60", value_parser = secs)]
    pub restart_reset_after: Duration,
    /// Restarts in a row that fail (the app exits before it listens, or does not listen
    /// within --startup-timeout) before `run` gives up and exits non-zero. The first
    /// start gets no second chance: a broken command ends `run` at once.
    #[arg(long, env = "FAL_SIDECAR_MAX_RESTART_FAILURES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_restart_failures: u32,
    /// The app command and its arguments (after `--`).
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub common: Common,
    /// The app's base URL, e.g. http://127.0.0.1:8000.
    #[arg(long, env = "FAL_SIDECAR_UPSTREAM")]
    pub upstream: String,
}

#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Run API: direct calls to the app and the /fal/queue/* paths.
    #[arg(long, env = "FAL_SIDECAR_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Queue-host API (queue.fal.run style): /{owner}/{alias}/…
    #[arg(
        long,
        env = "FAL_SIDECAR_QUEUE_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    pub queue_listen: String,
    /// Optional run host (fal.run style): POST /{owner}/{alias}[/{path}] answered
    /// synchronously by the app's /{path} (what `fal_client.run` calls).
    #[arg(long, env = "FAL_SIDECAR_RUN_HOST_LISTEN")]
    pub run_host_listen: Option<String>,
    /// Admin: /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "FAL_SIDECAR_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: String,
    /// Where the embedded store and the webhook key live
    /// [default: ./fal-data for run, /var/lib/fal-sidecar for serve].
    #[arg(long, env = "FAL_SIDECAR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Queue store: `file:DIR` (embedded, single process; the default, in the data dir),
    /// or shared by every replica of the function: `redis://[USER:PW@]HOST:PORT/DB`,
    /// `redis+cluster://H:P[,H:P…]` (Redis Cluster), `redis+sentinel://S:P[,S:P…]/MASTER[/DB]`
    /// (the master Sentinel names, followed across failovers); `rediss…` for TLS with
    /// the system's CAs. Credentials not in the URL come from FAL_STORE_USERNAME /
    /// FAL_STORE_PASSWORD.
    #[arg(long, env = "FAL_SIDECAR_STORE")]
    pub store: Option<String>,
    /// Redis replicas that must have a submit, a completion or a webhook-outbox write
    /// before it is acknowledged (`WAIT`); 0 acknowledges once the primary has it.
    /// Past --store-replicas-timeout the answer is 503 + Retry-After.
    #[arg(long, env = "FAL_SIDECAR_STORE_REPLICAS", default_value_t = 0)]
    pub store_replicas: u32,
    /// Longest wait for --store-replicas confirmations, in milliseconds (at most 2500).
    #[arg(
        long,
        env = "FAL_SIDECAR_STORE_REPLICAS_TIMEOUT",
        default_value_t = 1000
    )]
    pub store_replicas_timeout: u64,
    /// The function this sidecar serves, NAMESPACE/NAME (names the queue in a shared store).
    #[arg(long, env = "FAL_SIDECAR_FUNCTION", default_value = "default/app")]
    pub function: String,
    /// API keys: a YAML file of FalKey documents (as `fal-operator key create` prints
    /// them). Given, every call needs one of these keys (or a token of `/tokens/`);
    /// the file is read again when it changes. Without it the sidecar is open.
    #[arg(long, env = "FAL_SIDECAR_KEYS")]
    pub keys: Option<PathBuf>,
    /// With --keys: who may call (private: keys of --function's namespace; shared: any
    /// key in the file; public: no key needed).
    #[arg(long, env = "FAL_SIDECAR_AUTH", default_value = "private")]
    pub auth: crate::auth::AuthMode,
    /// Webhook user id for /fal/queue submits (the queue host uses the owner in the path).
    #[arg(long, env = "FAL_SIDECAR_OWNER", default_value = "local")]
    pub owner: String,
    /// Requests run at once against the app (0: serve the API only; other replicas
    /// sharing the store run the requests).
    #[arg(long, env = "FAL_SIDECAR_MAX_CONCURRENCY", default_value_t = 1)]
    pub max_concurrency: usize,
    /// Requests allowed to wait; more get 429 with Retry-After.
    #[arg(long, env = "FAL_SIDECAR_MAX_QUEUE", default_value_t = 100_000)]
    pub max_queue: usize,
    /// Largest request body accepted (413 beyond).
    #[arg(long, env = "FAL_SIDECAR_MAX_BODY_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest app response stored as a queue result.
    #[arg(long, env = "FAL_SIDECAR_MAX_RESULT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_result_bytes: usize,
    /// Largest request head (431 beyond).
    #[arg(long, env = "FAL_SIDECAR_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Time a client gets to send its request head.
    #[arg(long, env = "FAL_SIDECAR_HEADER_TIMEOUT", default_value = "30", value_parser = secs)]
    pub header_timeout: Duration,
    /// How long results are kept (seconds, or 1h, 30m…).
    #[arg(long, env = "FAL_SIDECAR_RETENTION", default_value = "3600", value_parser = secs)]
    pub retention: Duration,
    /// Lease a worker holds on a running request (renewed while the app runs).
    #[arg(long, env = "FAL_SIDECAR_LEASE", default_value = "30", value_parser = secs)]
    pub lease: Duration,
    /// Longest one request may run in the app (seconds); then it fails with 504 and the
    /// app is sent a cancel. Also bounds how long a direct call waits for the app.
    #[arg(long, env = "FAL_SIDECAR_REQUEST_TIMEOUT", value_parser = secs)]
    pub request_timeout: Option<Duration>,
    /// Claims of one request before it completes as lost.
    #[arg(long, env = "FAL_SIDECAR_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Delays between retries of an app call that got 503/504/429 or no connection
    /// (comma-separated seconds; attempts = delays + 1).
    #[arg(long, env = "FAL_SIDECAR_APP_RETRY_DELAYS", default_value = "0.5,1,2,4,8,15,30,30,30", value_parser = secs_list)]
    pub app_retry_delays: DelayList,
    /// Upper bound on app calls per claim, retries included (fal: 10).
    #[arg(long, env = "FAL_SIDECAR_MAX_APP_ATTEMPTS", default_value_t = 10)]
    pub max_app_attempts: usize,
    /// Allow webhooks to this CIDR, IP or host name (repeatable). `run` allows loopback by default.
    #[arg(
        long = "webhook-allow",
        env = "FAL_SIDECAR_WEBHOOK_ALLOW",
        value_delimiter = ','
    )]
    pub webhook_allow: Vec<String>,
    /// In `run` mode, refuse loopback webhooks too (as `serve` does).
    #[arg(long, env = "FAL_SIDECAR_WEBHOOK_DENY_LOOPBACK")]
    pub webhook_deny_loopback: bool,
    /// Delays between webhook attempts (comma-separated seconds; fal: 10 attempts over ~2 h).
    #[arg(long, env = "FAL_SIDECAR_WEBHOOK_RETRY_DELAYS", default_value = "15,60,120,300,600,900,1200,1500,2700", value_parser = secs_list)]
    pub webhook_retry_delays: DelayList,
    /// Time one webhook attempt may take.
    #[arg(long, env = "FAL_SIDECAR_WEBHOOK_TIMEOUT", default_value = "15", value_parser = secs)]
    pub webhook_timeout: Duration,
    /// Ed25519 webhook signing key (32 bytes raw, hex or base64); generated in the data dir when omitted.
    #[arg(long, env = "FAL_SIDECAR_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
    /// Close a WebSocket after this long without a byte either way [default: never].
    #[arg(long, env = "FAL_SIDECAR_WEBSOCKET_IDLE_TIMEOUT", value_parser = secs)]
    pub websocket_idle_timeout: Option<Duration>,
    /// On SIGTERM, how long in-flight requests (and open WebSockets) get to finish.
    #[arg(long, env = "FAL_SIDECAR_DRAIN_TIMEOUT", default_value = "30", value_parser = secs)]
    pub drain_timeout: Duration,
    /// Direct calls on the run listener take the fast lane (a proxy path without hyper
    /// for plain requests; everything else goes through hyper either way). `false`
    /// sends every request through hyper.
    #[arg(long, env = "FAL_SIDECAR_FAST_LANE", default_value_t = true, action = clap::ArgAction::Set)]
    pub fast_lane: bool,
}

/// A list of delays (a newtype so clap treats it as one value).
#[derive(Debug, Clone, PartialEq)]
pub struct DelayList(pub Vec<Duration>);

/// Seconds as a number (`1.5`) or a humantime string (`250ms`, `1h`).
pub fn secs(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        if v.is_finite() && v >= 0.0 {
            return Ok(Duration::from_secs_f64(v));
        }
        return Err(format!("{s:?} must be a non-negative number of seconds"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use seconds like 1.5 or 250ms"))
}

pub fn secs_list(s: &str) -> Result<DelayList, String> {
    if s.trim().is_empty() || s.trim() == "none" {
        return Ok(DelayList(Vec::new()));
    }
    s.split(',')
        .map(secs)
        .collect::<Result<Vec<_>, _>>()
        .map(DelayList)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_lists() {
        assert_eq!(secs("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(secs("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(secs("1h").unwrap(), Duration::from_secs(3600));
        assert!(secs("-1").is_err());
        assert!(secs("soon").is_err());
        assert_eq!(
            secs_list("0.1, 2").unwrap().0,
            vec![Duration::from_millis(100), Duration::from_secs(2)]
        );
        assert!(secs_list("none").unwrap().0.is_empty());
        assert!(secs_list("1,x").is_err());
    }

    #[test]
    fn run_needs_a_command_and_parses_flags() {
        let cli = Cli::try_parse_from([
            "fal-sidecar",
            "run",
            "--max-concurrency",
            "2",
            "--",
            "python3",
            "app.py",
        ])
        .unwrap();
        match cli.command {
            Command::Run(r) => {
                assert_eq!(r.command, vec!["python3", "app.py"]);
                assert_eq!(r.common.max_concurrency, 2);
                assert_eq!(r.common.webhook_retry_delays.0.len(), 9);
            }
            _ => panic!("run expected"),
        }
        assert!(Cli::try_parse_from(["fal-sidecar", "run"]).is_err());
        assert!(
            Cli::try_parse_from(["fal-sidecar", "serve"]).is_err(),
            "serve needs --upstream"
        );
    }
}
