//! The gateway's side of the fast lane (`fal_sidecar::api::fast`): a plain sync call
//! `/{namespace}/{name}[/{path}]` that is admitted without waiting and finds a free
//! replica slot at once goes to the replica without hyper, its target shortened to
//! `/{path}`. Admitted here: no credential where none is needed (keys off, or a public
//! function), or one `Authorization: Key <id>:<secret>` that opens the function, of a
//! key without a rate limit; the key is checked as `Authorizer::check` checks it, and
//! the field does not reach the app. Everything else is handed to `routing.rs` with
//! the bytes already read, and served there as before: refusals (401, 403), rate
//! limits, tokens, other schemes, holding a call while the function scales, the queue
//! API, WebSockets, the per-app host, and a call a replica refused without running it
//! (sent again from there, its bytes intact).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fal_sidecar::api::fast::{Call, Plain, Router};
use fal_sidecar::api::App;
use fal_sidecar::auth::header::{parse_authorization, Credential, Parsed};
use fal_sidecar::auth::AuthMode;
use fal_sidecar::job::now_ms;
use fal_sidecar::upstream::Upstream;

use super::routing::{function_from_host, is_queue_path, split_function, Kind};
use super::slots::{refused_for, SlotGuard};
use super::{Gateway, REPLAY_BODY_BYTES};
use crate::function::is_dns_label;

/// The run listener's router.
pub struct Lane(pub Arc<Gateway>);

/// A sync call with its replica slot.
pub struct LaneCall {
    gw: Arc<Gateway>,
    slot: SlotGuard,
    strip: usize,
    /// It carries a key of ours (checked, or keys are off): the field stays here.
    keyed: bool,
    /// Sent, and not handed back to `routing.rs`: counted once it ends (a call handed
    /// back is counted there).
    sent: AtomicBool,
}

impl Drop for LaneCall {
    fn drop(&mut self) {
        if *self.sent.get_mut() {
            self.gw.count(&self.slot.entry, Kind::Sync);
        }
    }
}

impl Router for Lane {
    type Call = LaneCall;

    fn route(&self, req: &Plain<'_>) -> Option<LaneCall> {
        let gw = &self.0;
        if let (Some(domain), Some(host)) = (gw.cfg.domain.as_deref(), req.field("host")) {
            let host = std::str::from_utf8(host).ok()?;
            if function_from_host(domain, host).is_some() {
                return None;
            }
        }
        // A token in the query: the token check (routing.rs) takes it.
        let target = std::str::from_utf8(req.target).ok()?;
        if target.contains("fal_jwt_token") {
            return None;
        }
        let path = std::str::from_utf8(req.path).ok()?;
        let (ns, name, rest) = split_function(path)?;
        if is_queue_path(rest) || !is_dns_label(ns) || !is_dns_label(name) {
            return None;
        }
        // `{ns}/{name}` on the stack: no allocation for the lookup.
        let mut key = [0u8; 128];
        let n = ns.len() + 1 + name.len();
        if n > key.len() {
            return None;
        }
        key[..ns.len()].copy_from_slice(ns.as_bytes());
        key[ns.len()] = b'/';
        key[ns.len() + 1..n].copy_from_slice(name.as_bytes());
        let entry = gw.entry(std::str::from_utf8(&key[..n]).ok()?)?;
        let mode = entry.info.read().unwrap_or_else(|e| e.into_inner()).auth;
        if req.length > entry.app.cfg.max_body_bytes as u64 {
            return None;
        }
        let keyed = admitted(gw, req, ns, name, mode)?;
        entry.last_sync_ms.store(now_ms(), Ordering::Relaxed);
        entry.sync.fetch_add(1, Ordering::AcqRel);
        let mut slot = SlotGuard {
            entry: entry.clone(),
            replica: None,
        };
        // No slot free now: held in routing.rs (the guard's drop undoes the count).
        slot.replica = Some(entry.try_acquire()?);
        Some(LaneCall {
            gw: gw.clone(),
            slot,
            strip: 2 + n,
            keyed,
            sent: AtomicBool::new(false),
        })
    }
}

/// Whether the lane may take a call to `{ns}/{name}` as its credentials stand, and
/// whether it carries one of ours (`Some(true)`: the field is dropped); `None`: the key
/// check in `routing.rs` decides (and answers a refusal). The rules are
/// `Authorizer::decide`'s, for the cases it admits without a rate limit.
fn admitted(gw: &Gateway, req: &Plain<'_>, ns: &str, name: &str, mode: AuthMode) -> Option<bool> {
    let mut fields = req.fields("authorization");
    let field = fields.next();
    if fields.next().is_some() {
        return None; // more than one: refused there
    }
    let Some(field) = field else {
        return (!gw.auth.required() || mode == AuthMode::Public).then_some(false);
    };
    let Parsed::Ours(Credential::Key { id, secret }) = parse_authorization(field) else {
        return None; // a token, another scheme, a malformed key
    };
    if gw.auth.required() {
        let key = gw.auth.key(id, secret, now_ms()).ok()?;
        if key.rate.is_some() || key.refuses(ns, name, mode).is_some() {
            return None;
        }
    }
    Some(true)
}

impl Call for LaneCall {
    fn app(&self) -> &App {
        &self.slot.entry.app
    }

    fn upstream(&self) -> &Upstream {
        &self
            .slot
            .replica
            .as_ref()
            .expect("a routed call holds its replica until not_run")
            .upstream
    }

    fn strip(&self) -> usize {
        self.strip
    }

    fn sent(&self) {
        self.sent.store(true, Ordering::Relaxed);
    }

    fn replay_bytes(&self) -> u64 {
        REPLAY_BODY_BYTES
    }

    fn last(&self) -> bool {
        self.gw.terminating.load(Ordering::Relaxed)
    }

    fn drops_authorization(&self) -> bool {
        self.keyed
    }

    fn not_run(&mut self, reason: &str) -> bool {
        *self.sent.get_mut() = false;
        if let Some(replica) = self.slot.replica.clone() {
            self.slot.release();
            refused_for(&self.gw, &self.slot.entry, &replica, reason);
        }
        true
    }
}
