//! `run` mode: keeps the app process alive. When it exits it is started again on the
//! same `$PORT` after a backoff; the API, the workers and readiness follow its state
//! through an [`AppHealth`] handle.
//!
//! - Backoff: `--restart-delay` (1 s) doubling up to `--restart-delay-max` (30 s), back
//!   to the first delay once the app has stayed up `--restart-reset-after` (60 s).
//! - A restart fails when the app exits before it listens or does not listen within
//!   `--startup-timeout`; `--max-restart-failures` (5) failures in a row and `run`
//!   gives up and exits with a message. An app that listens and later exits again is
//!   restarted for ever (slowly: the backoff only resets after a stable run).
//! - While the app is down: `/readyz` fails saying why, direct calls get 503 +
//!   `Retry-After`, workers claim nothing (queued requests wait, up to their start
//!   timeout), and a request that was running is given back to the queue
//!   (`worker.rs`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::Child;
use tokio::sync::watch;

use crate::child::{self, ChildError};
use crate::logs::Running;
use crate::metrics::Metrics;
use crate::shutdown::wait_true;
use crate::store::Store;

/// Time the app gets to exit after SIGTERM when the sidecar stops.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Restart policy (the `--restart-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first restart.
    pub initial: Duration,
    /// Delays double up to this.
    pub max: Duration,
    /// An app that stayed up this long restarts after `initial` again.
    pub reset_after: Duration,
    /// Restarts in a row that never listened before `run` gives up.
    pub max_failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            max_failures: 5,
        }
    }
}

impl Backoff {
    /// The delay before the restart that follows an exit, given the delay planned
    /// (`planned`: the one after the previous restart) and how long the app was up.
    pub fn after_exit(&self, planned: Duration, uptime: Duration) -> Duration {
        if uptime >= self.reset_after {
            self.initial
        } else {
            planned
        }
    }

    /// The delay after `delay` (doubling, capped).
    pub fn next(&self, delay: Duration) -> Duration {
        (delay * 2).min(self.max).max(self.initial)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppPhase {
    /// Spawned, not listening yet.
    Starting,
    /// Listening.
    Up,
    /// Exited; a restart is planned (or `run` gave up).
    Down,
}

/// What the sidecar knows about the app process.
#[derive(Debug, Clone)]
pub struct AppState {
    pub phase: AppPhase,
    /// Processes started so far (1 = the first start).
    pub generation: u64,
    pub restarts: u64,
    pub port: u16,
    /// How the last process ended ("exit status: 1", "signal: 9 (SIGKILL)", …).
    pub last_exit: Option<String>,
    /// While down: when the next start is due (`None` once `run` gave up).
    pub restart_at: Option<Instant>,
}

impl AppState {
    /// Why the app cannot take requests now (`None` when it is up).
    pub fn down_reason(&self) -> Option<String> {
        let exit = self.last_exit.as_deref().unwrap_or("unknown status");
        match self.phase {
            AppPhase::Up => None,
            AppPhase::Starting => Some(format!(
                "the app is restarting (it exited: {exit}): restart {} is waiting for it to listen on port {}",
                self.restarts, self.port
            )),
            AppPhase::Down => Some(match self.restart_at {
                Some(at) => format!(
                    "the app is restarting (it exited: {exit}): next start in {:.1} s",
                    at.saturating_duration_since(Instant::now()).as_secs_f64()
                ),
                None => format!("the app exited ({exit}) and is not restarted any more"),
            }),
        }
    }

    /// Seconds a client should wait before trying again (`Retry-After`).
    pub fn retry_after_secs(&self) -> u64 {
        match (self.phase, self.restart_at) {
            (AppPhase::Down, Some(at)) => {
                at.saturating_duration_since(Instant::now()).as_secs() + 1
            }
            _ => 1,
        }
    }

    /// For `/readyz` and logs.
    pub fn json(&self) -> serde_json::Value {
        let phase = match self.phase {
            AppPhase::Starting => "starting",
            AppPhase::Up => "up",
            AppPhase::Down => "down",
        };
        serde_json::json!({
            "state": phase,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "port": self.port,
        })
    }
}

/// The read side: readiness, direct calls and workers look here.
#[derive(Clone)]
pub struct AppHealth {
    /// `generation << 1 | (phase == Up)`: the direct-call hot path reads this (one
    /// relaxed load) instead of taking the watch's lock.
    live: Arc<AtomicU64>,
    rx: watch::Receiver<AppState>,
}

impl AppHealth {
    pub fn is_up(&self) -> bool {
        self.live.load(Ordering::Relaxed) & 1 == 1
    }

    pub fn state(&self) -> AppState {
        self.rx.borrow().clone()
    }

    pub fn generation(&self) -> u64 {
        self.live.load(Ordering::Relaxed) >> 1
    }

    /// Returns when the app is up, or when `stop` turns true.
    pub async fn wait_up(&self, stop: &mut watch::Receiver<bool>) {
        let mut rx = self.rx.clone();
        let up = async move { rx.wait_for(|s| s.phase == AppPhase::Up).await.is_ok() };
        tokio::select! {
            ok = up => {
                if !ok {
                    // The supervisor is gone (shutting down): only `stop` is left.
                    wait_true(stop).await;
                }
            }
            _ = wait_true(stop) => {}
        }
    }

    /// Whether the app process of `generation` has exited: now, or within `grace` (an
    /// app that just died breaks its connections a moment before its exit is seen).
    /// Returns how it ended.
    pub async fn exited_since(&self, generation: u64, grace: Duration) -> Option<String> {
        let gone = |s: &AppState| s.generation != generation || s.phase != AppPhase::Up;
        let mut rx = self.rx.clone();
        let exited = async move {
            rx.wait_for(gone).await.ok().map(|s| {
                s.last_exit
                    .clone()
                    .unwrap_or_else(|| "unknown status".into())
            })
        };
        tokio::time::timeout(grace, exited).await.ok().flatten()
    }
}

/// Owns the app process: starts it, restarts it, stops it.
pub struct Supervisor {
    command: Vec<String>,
    port: u16,
    startup_timeout: Duration,
    backoff: Backoff,
    running: Running,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    live: Arc<AtomicU64>,
    /// The last app process spawned (its process group), for a stop during a start.
    last_pid: AtomicU32,
    tx: watch::Sender<AppState>,
}

impl Supervisor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        command: Vec<String>,
        port: u16,
        startup_timeout: Duration,
        backoff: Backoff,
        running: Running,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
    ) -> (Supervisor, AppHealth) {
        let (tx, rx) = watch::channel(AppState {
            phase: AppPhase::Starting,
            generation: 0,
            restarts: 0,
            port,
            last_exit: None,
            restart_at: None,
        });
        let live = Arc::new(AtomicU64::new(0));
        let health = AppHealth {
            live: live.clone(),
            rx,
        };
        let sup = Supervisor {
            command,
            port,
            startup_timeout,
            backoff,
            running,
            store,
            metrics,
            live,
            last_pid: AtomicU32::new(0),
            tx,
        };
        (sup, health)
    }

    fn set(&self, f: impl FnOnce(&mut AppState)) {
        self.tx.send_modify(|s| {
            f(s);
            let up = s.phase == AppPhase::Up;
            self.live
                .store(s.generation << 1 | u64::from(up), Ordering::Relaxed);
            self.metrics.app_up.set(i64::from(up));
        });
    }

    /// Spawns the app and waits until it listens. The first start: an error here ends
    /// `run` (a broken command, an app that never listens).
    pub async fn start(&self) -> Result<Child, ChildError> {
        self.set(|s| {
            s.phase = AppPhase::Starting;
            s.generation += 1;
        });
        let mut c = child::spawn(
            &self.command,
            self.port,
            self.running.clone(),
            self.store.clone(),
        )?;
        let pid = c.id();
        self.last_pid.store(pid.unwrap_or(0), Ordering::Relaxed);
        tracing::info!(port = self.port, pid, command = %self.command.join(" "), "started the app; waiting for it to listen");
        if let Err(e) = child::wait_listening(&mut c, self.port, self.startup_timeout).await {
            child::stop_group(&mut c, Duration::from_secs(2)).await;
            if let Some(pid) = pid {
                child::kill_group(pid);
            }
            return Err(e);
        }
        self.set(|s| s.phase = AppPhase::Up);
        Ok(c)
    }

    /// Watches the app (`child`, already up) and restarts it whenever it exits, until
    /// `stop` turns true (then the app is stopped and this returns `Ok`). `Err` says why
    /// it gave up: `--max-restart-failures` restarts in a row never listened.
    pub async fn supervise(
        self,
        mut child: Child,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut planned = self.backoff.initial;
        let mut up_since = Instant::now();
        loop {
            let pid = child.id();
            let status = tokio::select! {
                s = child.wait() => s,
                _ = wait_true(&mut stop) => {
                    child::stop_group(&mut child, STOP_GRACE).await;
                    return Ok(());
                }
            };
            let exited_at = Instant::now();
            // Whatever the app started dies with it: nothing may keep $PORT.
            if let Some(pid) = pid {
                child::kill_group(pid);
            }
            let mut exit = match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown status: {e}"),
            };
            let uptime = up_since.elapsed();
            let mut delay = self.backoff.after_exit(planned, uptime);
            let mut failures = 0u32;
            child = loop {
                let restart_at = Instant::now() + delay;
                let exit_now = exit.clone();
                self.set(|s| {
                    s.phase = AppPhase::Down;
                    s.last_exit = Some(exit_now);
                    s.restart_at = Some(restart_at);
                });
                tracing::error!(status = %exit, uptime_s = uptime.as_secs_f64(), restart_in_s = delay.as_secs_f64(),
                    "the app exited; restarting it (queued requests wait, readiness fails meanwhile)");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wait_true(&mut stop) => return Ok(()),
                }
                delay = self.backoff.next(delay);
                self.set(|s| {
                    s.restarts += 1;
                    s.restart_at = None;
                });
                self.metrics.app_restarts.inc();
                let started = tokio::select! {
                    r = self.start() => r,
                    // Dropping the start kills the half-started app (kill_on_drop); its
                    // children follow below.
                    _ = wait_true(&mut stop) => {
                        let pid = self.last_pid.load(Ordering::Relaxed);
                        if pid != 0 {
                            child::kill_group(pid);
                        }
                        return Ok(());
                    }
                };
                match started {
                    Ok(c) => break c,
                    Err(e) => {
                        failures += 1;
                        tracing::error!(error = %e, failures, max = self.backoff.max_failures, "restarting the app failed");
                        if failures >= self.backoff.max_failures {
                            let msg = format!(
                                "the app could not be restarted: {failures} restarts in a row failed (--max-restart-failures); the last one: {e}"
                            );
                            self.set(|s| {
                                s.phase = AppPhase::Down;
                                s.restart_at = None;
                                s.last_exit = Some(e.to_string());
                            });
                            return Err(msg);
                        }
                        exit = e.to_string();
                    }
                }
            };
            planned = delay;
            up_since = Instant::now();
            let restarts = self.tx.borrow().restarts;
            tracing::info!(
                restarts,
                down_s = exited_at.elapsed().as_secs_f64(),
                "the app is back: listening again on port {}",
                self.port
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn backoff_doubles_caps_and_resets_after_a_stable_run() {
        let b = Backoff::default();
        let mut d = b.initial;
        let mut seen = vec![];
        for _ in 0..8 {
            seen.push(d.as_secs());
            d = b.next(d);
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 30, 30, 30]);
        // A quick crash keeps the planned (grown) delay; a stable run resets it.
        assert_eq!(b.after_exit(secs(16), secs(5)), secs(16));
        assert_eq!(b.after_exit(secs(16), secs(60)), secs(1));
        // --restart-delay 0: restart at once, every time.
        let z = Backoff {
            initial: Duration::ZERO,
            ..b
        };
        assert_eq!(z.next(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn down_reasons_say_what_is_going_on() {
        let mut s = AppState {
            phase: AppPhase::Up,
            generation: 1,
            restarts: 0,
            port: 8000,
            last_exit: None,
            restart_at: None,
        };
        assert_eq!(s.down_reason(), None);
        s.phase = AppPhase::Down;
        s.last_exit = Some("exit status: 1".into());
        s.restart_at = Some(Instant::now() + secs(2));
        let r = s.down_reason().unwrap();
        assert!(
            r.contains("restarting") && r.contains("exit status: 1"),
            "{r}"
        );
        assert!((2..=3).contains(&s.retry_after_secs()));
        s.phase = AppPhase::Starting;
        s.restarts = 2;
        assert!(s.down_reason().unwrap().contains("port 8000"));
        s.phase = AppPhase::Down;
        s.restart_at = None;
        assert!(s.down_reason().unwrap().contains("not restarted"));
    }
}
