use clap::Parser;
use fal_sidecar::config::{Cli, Command};
use fal_sidecar::runtime::{self, Mode};
use fal_sidecar::supervisor::Backoff;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAL_SIDECAR_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let (common, mode) = match cli.command {
        Command::Run(r) => (
            r.common,
            Mode::Child {
                command: r.command,
                port: r.app_port,
                startup_timeout: r.startup_timeout,
                backoff: Backoff {
                    initial: r.restart_delay,
                    max: r.restart_delay_max,
                    reset_after: r.restart_reset_after,
                    max_failures: r.max_restart_failures,
                },
            },
        ),
        Command::Serve(s) => (s.common, Mode::Upstream { url: s.upstream }),
    };
    // The run listener has its own per-thread runtimes (server::serve_per_thread); this
    // one runs the queue API, the workers, webhooks and housekeeping.
    let threads = runtime::http_threads();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(runtime::run(common, mode)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("fal-sidecar: error: {e:#}");
            std::process::exit(2);
        }
    }
}
