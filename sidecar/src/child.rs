//! `run` mode: the app as a child process.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::logs::{pump, Running};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot start the app {cmd:?}: {source}")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("the app exited ({status}) before it listened on port {port}; its output is above")]
    ExitedEarly {
        status: std::process::ExitStatus,
        port: u16,
    },
    #[error("the app did not listen on port {port} within {secs} s (it must listen on $PORT); raise --startup-timeout if it loads slowly")]
    NeverListened { port: u16, secs: u64 },
}

/// Spawns `cmd` with `PORT=port`, pumping its output into logs.
pub fn spawn(
    cmd: &[String],
    port: u16,
    running: Running,
    store: Arc<dyn Store>,
) -> Result<Child, ChildError> {
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .env("PORT", port.to_string())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches only the sidecar (which
        // drains, then stops the app), and the app's own children can be stopped with
        // it (`stop`) or cleaned up after it exits (`kill_group`) so none keeps $PORT.
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl in the child between fork and exec is async-signal-safe. If the
    // sidecar dies without stopping the app (SIGKILL), the app goes too. (The app is
    // spawned from the runtime's long-lived threads, which end only with the process.)
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = c.spawn().map_err(|source| ChildError::Spawn {
        cmd: cmd.join(" "),
        source,
    })?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, "STDOUT", running.clone(), store.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, "STDERR", running, store));
    }
    Ok(child)
}

/// Waits until `127.0.0.1:port` accepts connections, or the child exits, or time runs out.
pub async fn wait_listening(
    child: &mut Child,
    port: u16,
    timeout: Duration,
) -> Result<(), ChildError> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().ok().flatten() {
            return Err(ChildError::ExitedEarly { status, port });
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(ChildError::NeverListened {
                port,
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The app (a process group leader, see `spawn`) and everything in its group: SIGTERM,
/// then SIGKILL after `grace`.
pub async fn stop_group(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else {
        return; // already reaped: `kill_group` cleaned up after it
    };
    // SAFETY: plain kill(2) on the process group our child leads.
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
    kill_group(pid);
}

/// SIGKILL to what is left of the process group `pgid` (the app's children, once the
/// app itself has exited).
pub fn kill_group(pgid: u32) {
    // SAFETY: plain kill(2); ESRCH when the group is already empty.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
    }
}

/// SIGTERM, then SIGKILL after `grace`.
pub async fn stop(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

/// A free loopback port (for the app when `--app-port` is not given).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
