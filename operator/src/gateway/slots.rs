//! Replica slots: each ready replica takes `maxConcurrency` sync calls from this gateway
//! at a time; a call takes a slot on the least busy replica and gives it back when its
//! response (or WebSocket) ends. With no slot free a call is held here, bounded by the
//! cold-start timeout and the caller's `X-Fal-Request-Timeout`, and the autoscaler is
//! woken; a replica that refuses a call (`X-Fal-Replica`) gets none for a moment.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fal_sidecar::api::{self as api, error};
use fal_sidecar::job::now_ms;
use fal_sidecar::upstream::Body;
use http::{HeaderMap, HeaderValue, Response, StatusCode};

use super::{Entry, Gateway, Replica, REPORT_INTERVAL};

/// How long a replica that answered `X-Fal-Replica: full` gets no new call from here
/// (unless one of this gateway's own calls on it ends first).
const FULL_BACKOFF: Duration = Duration::from_millis(20);

impl Entry {
    /// Takes a slot on the least busy replica with one free.
    pub(super) fn try_acquire(&self) -> Option<Arc<Replica>> {
        let max = self
            .info
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .bounds
            .max_concurrency;
        let replicas = self.replicas();
        let now = now_ms();
        loop {
            let best = replicas
                .iter()
                .filter(|r| r.refused_until_ms.load(Ordering::Relaxed) <= now)
                .map(|r| (r.in_flight(), r))
                .filter(|(n, _)| *n < max)
                .min_by_key(|(n, _)| *n)?;
            let (n, r) = best;
            if r.in_flight
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return Some(r.clone());
            }
        }
    }

    /// The earliest moment a replica's refusal runs out, if one is in force: a held call
    /// looks again then.
    fn next_unrefused(&self) -> Option<tokio::time::Instant> {
        let now = now_ms();
        let until = self
            .replicas()
            .iter()
            .map(|r| r.refused_until_ms.load(Ordering::Relaxed))
            .filter(|&t| t > now)
            .min()?;
        Some(tokio::time::Instant::now() + Duration::from_millis(until - now))
    }

    pub(super) fn mark_cold(&self) {
        let mut c = self.cold_since.lock().unwrap_or_else(|e| e.into_inner());
        if c.is_none() {
            *c = Some(Instant::now());
        }
    }
}

/// Gives a replica slot back when a forwarded call's response body is done.
pub(super) struct SlotGuard {
    pub(super) entry: Arc<Entry>,
    pub(super) replica: Option<Arc<Replica>>,
}

impl SlotGuard {
    /// Gives the replica slot back (the call goes on: not counted as ended).
    pub(super) fn release(&mut self) {
        if let Some(r) = self.replica.take() {
            r.in_flight.fetch_sub(1, Ordering::AcqRel);
            // One of this gateway's calls on it ended: worth trying it again at once.
            r.refused_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.release();
        // keepAlive counts from the end of a call (a WebSocket's close, too).
        self.entry.last_sync_ms.store(now_ms(), Ordering::Relaxed);
        self.entry.sync.fetch_sub(1, Ordering::AcqRel);
        self.entry.capacity.notify_waiters();
    }
}

/// The start deadline a caller set with `X-Fal-Request-Timeout` (seconds).
/// Parsed like a submit's (`api::options`); a sync call ignores a bad value.
fn request_deadline(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("x-fal-request-timeout")?;
    api::options::parse_request_timeout(v.as_bytes())
        .ok()
        .flatten()
}

/// A replica answered a call with `X-Fal-Replica` (it did not run it): counted, and no
/// call goes there from here for [`FULL_BACKOFF`] (the slot was given back already).
pub(super) fn refused<B>(gw: &Gateway, entry: &Entry, replica: &Replica, resp: &Response<B>) {
    let reason = resp
        .headers()
        .get(fal_sidecar::slots::REPLICA_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("full");
    refused_for(gw, entry, replica, reason);
}

/// [`refused`], with the header's value (`full`, `restarting`) at hand.
pub(super) fn refused_for(gw: &Gateway, entry: &Entry, replica: &Replica, reason: &str) {
    gw.metrics
        .not_run
        .with_label_values(&[entry.key.as_str(), reason])
        .inc();
    replica.refused_until_ms.store(
        now_ms() + FULL_BACKOFF.as_millis() as u64,
        Ordering::Relaxed,
    );
}

/// One replica slot taken for a WebSocket handshake (and then its socket).
pub(super) struct ReplicaSlot {
    pub(super) entry: Arc<Entry>,
    pub(super) replica: Arc<Replica>,
}

impl Drop for ReplicaSlot {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.entry.capacity.notify_waiters();
    }
}

/// How long a sync call may wait for a replica slot: the cold-start timeout, or the
/// caller's `X-Fal-Request-Timeout` when shorter; counted once for all of its tries.
pub(super) struct Wait {
    deadline: tokio::time::Instant,
    limit: Duration,
    by_user: bool,
}

impl Wait {
    pub(super) fn new(gw: &Gateway, entry: &Entry, headers: &HeaderMap) -> Wait {
        let cold = gw
            .cfg
            .cold_start_timeout
            .unwrap_or(entry.info().startup_timeout);
        let (limit, by_user) = match request_deadline(headers) {
            Some(u) if u < cold => (u, true),
            _ => (cold, false),
        };
        Wait {
            deadline: tokio::time::Instant::now() + limit,
            limit,
            by_user,
        }
    }
}

/// A free replica slot now, or [`hold`] until one is.
pub(super) async fn acquire(
    gw: &Gateway,
    entry: &Arc<Entry>,
    wait: &Wait,
) -> Result<Arc<Replica>, Response<Body>> {
    match entry.try_acquire() {
        Some(r) => Ok(r),
        // Boxed: the rare wait keeps every call's future small.
        None => Box::pin(hold(gw, entry, wait)).await,
    }
}

/// Holds a sync call until a replica slot is free: wakes the autoscaler, then waits
/// (bounded by the cold-start timeout and the caller's `X-Fal-Request-Timeout`).
async fn hold(
    gw: &Gateway,
    entry: &Arc<Entry>,
    wait: &Wait,
) -> Result<Arc<Replica>, Response<Body>> {
    let info = entry.info();
    let key = entry.key.as_str();
    entry.held.fetch_add(1, Ordering::AcqRel);
    let held_gauge = gw.metrics.held.with_label_values(&[key]);
    held_gauge.inc();
    struct Unhold<'a>(&'a Entry, prometheus::IntGauge);
    impl Drop for Unhold<'_> {
        fn drop(&mut self) {
            self.0.held.fetch_sub(1, Ordering::AcqRel);
            self.1.dec();
        }
    }
    let _unhold = Unhold(entry, held_gauge);
    if entry.replicas().is_empty() {
        entry.mark_cold();
    }
    let ttl = REPORT_INTERVAL * 3 + Duration::from_secs(2);
    let n = entry.sync.load(Ordering::Relaxed);
    let last = entry.last_sync_ms.load(Ordering::Relaxed);
    if let Err(e) = entry.store.report_sync(&gw.id, n, last, ttl, true).await {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{key} has no free replica and the store that wakes it is unavailable ({e}); retry shortly"),
            Some("runner_scheduling_failure"),
        );
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return Err(r);
    }
    entry.reported.store(n, Ordering::Relaxed);
    let (deadline, limit, by_user) = (wait.deadline, wait.limit, wait.by_user);
    loop {
        let notified = entry.capacity.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(r) = entry.try_acquire() {
            return Ok(r);
        }
        if gw.entry(key).is_none() {
            return Err(error(
                StatusCode::NOT_FOUND,
                &format!("function {key} was deleted while the call waited"),
                None,
            ));
        }
        // A replica that refused a call is looked at again when its moment runs out.
        let recheck = entry.next_unrefused();
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(recheck.unwrap_or(deadline)), if recheck.is_some() => {}
            _ = tokio::time::sleep_until(deadline) => {
                let secs = limit.as_secs_f64();
                let mut r = if by_user {
                    let mut r = error(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!("no replica of {key} could take the call within X-Fal-Request-Timeout ({secs} s)"),
                        Some("request_timeout"),
                    );
                    r.headers_mut().insert("x-fal-request-timeout-type", HeaderValue::from_static("user"));
                    r
                } else {
                    error(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!(
                            "no replica of {key} became ready within {secs} s (cold start); check its pods (kubectl get pods -n {}), raise startupTimeout, or submit to the queue instead",
                            info.namespace
                        ),
                        Some("startup_timeout"),
                    )
                };
                r.headers_mut().insert("retry-after", HeaderValue::from_static("5"));
                return Err(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeout_header() {
        let mut h = HeaderMap::new();
        assert_eq!(request_deadline(&h), None);
        h.insert("x-fal-request-timeout", "2.5".parse().unwrap());
        assert_eq!(request_deadline(&h), Some(Duration::from_millis(2500)));
        h.insert("x-fal-request-timeout", "-1".parse().unwrap());
        assert_eq!(request_deadline(&h), None);
        h.insert("x-fal-request-timeout", "soon".parse().unwrap());
        assert_eq!(request_deadline(&h), None);
    }
}
