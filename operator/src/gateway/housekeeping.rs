//! The gateway's background work, so a function's queue goes on at zero replicas: the
//! store's sweep and the webhook outbox of every function, the sync-call reports the
//! autoscaler counts as load, and cutting the WebSockets left open at shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fal_sidecar::job::now_ms;
use fal_sidecar::store::Store;
use tokio::sync::watch;

use super::{Gateway, MAINTENANCE_INTERVAL, QUIET_SWEEP_INTERVAL, REPORT_INTERVAL};

impl Gateway {
    /// Housekeeping of every function, every [`MAINTENANCE_INTERVAL`]: the store's sweep
    /// (start deadlines, expired leases of dead replicas, retention) and the webhook
    /// outbox, so both go on at zero replicas. One loop, not a task per function: a
    /// gateway knowing a thousand idle functions stays small. A quiet function (no
    /// request through here since its last sweep) is swept again when its store said
    /// something falls due, at the latest after [`QUIET_SWEEP_INTERVAL`]: a thousand
    /// idle functions are not a thousand sweeps every round.
    pub async fn run_maintenance(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let retention = self.cfg.retention;
        loop {
            for e in self.entries() {
                let now = now_ms();
                let active = e.active.swap(false, Ordering::Relaxed);
                if !active && now < e.next_sweep_ms.load(Ordering::Relaxed) {
                    continue;
                }
                let sweep = match e.store.sweep(now, retention).await {
                    Ok(sweep) => sweep,
                    Err(err) => {
                        tracing::debug!(function = %e.key, error = %err, "gateway housekeeping failed");
                        e.next_sweep_ms.store(0, Ordering::Relaxed);
                        continue;
                    }
                };
                // Drain what is due now (bounded passes; the rest waits a round).
                let mut busy = sweep.changed();
                for _ in 0..8 {
                    match e.deliverer.deliver_due().await {
                        Ok(true) => busy = true,
                        Ok(false) => break,
                        Err(err) => {
                            tracing::debug!(function = %e.key, error = %err, "reading the webhook outbox failed");
                            busy = true;
                            break;
                        }
                    }
                }
                let next = if busy {
                    0
                } else {
                    let quiet = now + QUIET_SWEEP_INTERVAL.as_millis() as u64;
                    sweep.next_due_ms.map_or(quiet, |due| due.min(quiet))
                };
                e.next_sweep_ms.store(next, Ordering::Relaxed);
            }
            tokio::select! {
                _ = tokio::time::sleep(MAINTENANCE_INTERVAL) => {}
                _ = fal_sidecar::shutdown::wait_true(&mut stop) => return,
            }
        }
    }

    /// Lets the WebSockets open through this gateway run until `deadline`, then cuts
    /// them (a stopping gateway: its listeners no longer take new ones).
    pub async fn drain_sockets(&self, deadline: tokio::time::Instant) {
        let open = || {
            self.entries()
                .iter()
                .map(|e| e.app.sockets.open())
                .sum::<usize>()
        };
        while open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for e in self.entries() {
            e.app.sockets.cut_all();
        }
    }

    /// Reports sync-call counts to the store every [`REPORT_INTERVAL`] (the autoscaler
    /// counts them as load, and their arrival as activity for keep-alive).
    pub async fn run_reporter(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let ttl = REPORT_INTERVAL * 3 + Duration::from_secs(2);
        loop {
            for e in self.entries() {
                let n = e.sync.load(Ordering::Relaxed);
                if n == 0 && e.reported.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                let last = e.last_sync_ms.load(Ordering::Relaxed);
                if e.store
                    .report_sync(&self.id, n, last, ttl, false)
                    .await
                    .is_ok()
                {
                    e.reported.store(n, Ordering::Relaxed);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(REPORT_INTERVAL) => {}
                _ = fal_sidecar::shutdown::wait_true(&mut stop) => return,
            }
        }
    }
}
