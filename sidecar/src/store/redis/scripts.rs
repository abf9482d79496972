//! The store's Lua scripts (`lua/`, one file a command, each prepended with
//! `lua/prelude.lua`) and the keys each one declares.

use redis::Script;

/// Helpers every script shares (prepended to each script's source).
const PRELUDE: &str = include_str!("lua/prelude.lua");

// The scripts, one file a command; each file's header says what it does, its KEYS and
// ARGV, and what it returns.
const SUBMIT: &str = include_str!("lua/submit.lua");
const CLAIM: &str = include_str!("lua/claim.lua");
const RENEW: &str = include_str!("lua/renew.lua");
const RELEASE: &str = include_str!("lua/release.lua");
const COMPLETE: &str = include_str!("lua/complete.lua");
const CANCEL: &str = include_str!("lua/cancel.lua");
const APPEND_LOGS: &str = include_str!("lua/append_logs.lua");
const SWEEP: &str = include_str!("lua/sweep.lua");
const DUE_DELIVERIES: &str = include_str!("lua/due_deliveries.lua");
const DELIVERY_ATTEMPTED: &str = include_str!("lua/delivery_attempted.lua");
const LOAD: &str = include_str!("lua/load.lua");
const RUNNING_WORKERS: &str = include_str!("lua/running_workers.lua");
const SYNC_REPORT: &str = include_str!("lua/sync_report.lua");
const STATUS: &str = include_str!("lua/status.lua");

/// A script and the keys it declares (suffixes of the function's prefix). Every key a
/// script names is declared; `per_id` keys are completed with the script's id
/// argument. The job hashes that claim, sweep, deliveries and load reach through the
/// function's own indexes cannot be named before the script runs: they carry the same
/// hash tag, so they live in the declared keys' slot (what Redis Cluster checks).
pub(super) struct Scripted {
    pub(super) script: Script,
    /// The source (for EVAL when a node does not have the script cached).
    pub(super) script_source: String,
    pub(super) keys: &'static [&'static str],
    pub(super) per_id: &'static [&'static str],
    /// A write that `--store-replicas` must see replicated before it is acknowledged.
    pub(super) durable: bool,
}

pub(super) struct Scripts {
    pub(super) status: Scripted,
    pub(super) submit: Scripted,
    pub(super) claim: Scripted,
    pub(super) renew: Scripted,
    pub(super) release: Scripted,
    pub(super) complete: Scripted,
    pub(super) cancel: Scripted,
    pub(super) append_logs: Scripted,
    pub(super) sweep: Scripted,
    pub(super) due_deliveries: Scripted,
    pub(super) delivery_attempted: Scripted,
    pub(super) load: Scripted,
    pub(super) sync_report: Scripted,
    pub(super) running_workers: Scripted,
}

impl Scripts {
    /// Every script the store sends (what a readiness probe puts in the script cache).
    pub(super) fn all(&self) -> [&Scripted; 14] {
        [
            &self.status,
            &self.submit,
            &self.claim,
            &self.renew,
            &self.release,
            &self.complete,
            &self.cancel,
            &self.append_logs,
            &self.sweep,
            &self.due_deliveries,
            &self.delivery_attempted,
            &self.load,
            &self.sync_report,
            &self.running_workers,
        ]
    }

    pub(super) fn new() -> Scripts {
        let s = |body: &str, keys: &'static [&'static str], per_id: &'static [&'static str]| {
            let source = format!("{PRELUDE}{body}");
            Scripted {
                script: Script::new(&source),
                script_source: source,
                keys,
                per_id,
                durable: [SUBMIT, COMPLETE, CANCEL, DELIVERY_ATTEMPTED].contains(&body),
            }
        };
        const ENDS: &[&str] = &[
            "queue",
            "deadlines",
            "running",
            "completed",
            "activity",
            "outbox",
            "outbox_attempts",
        ];
        Scripts {
            status: s(STATUS, &["queue"], &["job:", "logs:"]),
            submit: s(
                SUBMIT,
                &["queue", "deadlines", "seq", "activity"],
                &["job:"],
            ),
            claim: s(
                CLAIM,
                &[
                    "queue",
                    "deadlines",
                    "running",
                    "completed",
                    "outbox",
                    "outbox_attempts",
                    "token",
                    "activity",
                ],
                &[],
            ),
            renew: s(RENEW, &["running"], &["job:"]),
            release: s(
                RELEASE,
                &["running", "queue", "deadlines"],
                &["job:", "logs:"],
            ),
            complete: s(COMPLETE, ENDS, &["job:"]),
            cancel: s(CANCEL, ENDS, &["job:"]),
            append_logs: s(APPEND_LOGS, &[], &["job:", "logs:"]),
            sweep: s(SWEEP, ENDS, &[]),
            due_deliveries: s(DUE_DELIVERIES, &["outbox", "outbox_attempts"], &[]),
            delivery_attempted: s(DELIVERY_ATTEMPTED, &["outbox", "outbox_attempts"], &[]),
            load: s(LOAD, &["queue", "running", "activity", "sync"], &[]),
            sync_report: s(SYNC_REPORT, &["sync", "activity"], &[]),
            running_workers: s(RUNNING_WORKERS, &["running"], &[]),
        }
    }
}
