//! Workers: claim a job, call the app (with fal's retry policy), keep the lease alive,
//! forward cancels, store the result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Limited};
use tokio::sync::watch;

use crate::api::proxy::APP_EXIT_GRACE;
use crate::job::{app_end, now_ms, Completion, StoredResult};
use crate::logs::Running;
use crate::metrics::Metrics;
use crate::slots::Slots;
use crate::store::{Claimed, Lease, Store};
use crate::supervisor::AppHealth;
use crate::upstream::{error_chain, is_hop_by_hop, Body, Upstream};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// This replica's name (the pod name in a cluster): claims record it, so a scaler
    /// can tell busy replicas from idle ones.
    pub replica: String,
    pub concurrency: usize,
    pub lease: Duration,
    /// Delays between app-call retries (503/504/429/connection errors).
    pub retry_delays: Vec<Duration>,
    pub max_result_bytes: usize,
    /// Longest one request may run in the app (`--request-timeout`); then it completes
    /// with 504 and the app is sent a cancel.
    pub request_timeout: Option<Duration>,
    /// Claims of one request before it completes as lost (`--max-attempts`): also how
    /// many times a request may see the app die under it.
    pub max_attempts: u32,
}

pub struct Workers {
    pub store: Arc<dyn Store>,
    pub upstream: Upstream,
    pub cfg: WorkerConfig,
    pub running: Running,
    pub metrics: Arc<Metrics>,
    /// `run` mode: the supervised app's state (no claims while it is down).
    pub app: Option<AppHealth>,
    /// The call slots shared with direct calls: a worker claims only with one in hand.
    pub slots: Option<Arc<Slots>>,
}

/// What the app call produced.
enum Called {
    Done(StoredResult, f64),
    /// The sidecar failed the request itself (timeout, app unreachable): the error type
    /// is ours, not the app's.
    Failed(StoredResult, f64, &'static str),
    /// Drain deadline passed: give the job back.
    Abandoned,
    /// The lease was lost (another worker may run it): drop the outcome.
    LeaseLost,
    /// `run` mode: the app was down, the request never reached it: give it back to the
    /// queue uncharged (it runs once the app is back).
    AppDown,
    /// `run` mode: the app exited while it had the request (how it ended).
    AppDied(String),
    /// No renew succeeded in time (the store is unreachable or too slow): the lease may
    /// expire any moment and another worker run the job, so this run is given up.
    LeaseExpired,
}

/// A worker's view of its lease, on its own clock.
///
/// The store computes the expiry when a claim or renew runs there, after the worker
/// sent it, so the lease surely lasts until `sent + lease` of the last success. The
/// worker gives the run up a little earlier (`margin`: a tenth of the lease, at most
/// 1 s), so that its own timer firing late or the app taking the cancel do not make it
/// overlap a run that another replica starts right at the expiry.
#[derive(Debug, Clone, Copy)]
struct LeaseClock {
    lease: Duration,
    margin: Duration,
    /// Give the run up from this instant on (the lease may be about to expire).
    held_until: tokio::time::Instant,
    /// When the next renew is due (a third of a lease after the last one was sent).
    next_renew: tokio::time::Instant,
    /// When the renew in flight was sent.
    sent: tokio::time::Instant,
}

impl LeaseClock {
    /// `claimed_at`: when the claim was sent.
    fn new(claimed_at: tokio::time::Instant, lease: Duration) -> LeaseClock {
        let margin = (lease / 10).min(Duration::from_secs(1));
        LeaseClock {
            lease,
            margin,
            held_until: claimed_at + (lease - margin),
            next_renew: claimed_at + lease / 3,
            sent: claimed_at,
        }
    }

    fn renew_sent(&mut self, at: tokio::time::Instant) {
        self.sent = at;
        // Due again a third of a lease after this one was sent, at once if it takes
        // longer than that to answer.
        self.next_renew = at + self.lease / 3;
    }

    /// The renew sent last succeeded: the store's expiry is at least a lease after it.
    fn renewed(&mut self) {
        self.held_until = self.held_until.max(self.sent + (self.lease - self.margin));
    }
}

fn retryable(status: u16) -> bool {
    matches!(status, 503 | 504 | 429)
}

impl Workers {
    /// Runs `concurrency` workers until `stop_claiming` turns true; a worker still busy
    /// when `abandon` turns true gives its job back to the queue.
    pub async fn run(
        self: Arc<Self>,
        stop_claiming: watch::Receiver<bool>,
        abandon: watch::Receiver<bool>,
    ) {
        let mut set = tokio::task::JoinSet::new();
        // One idle worker at a time looks for work (see `work`).
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        // 0 workers = API only: submits, status and cancel are served, another replica
        // runs the requests (the gateway's mode).
        for n in 0..self.cfg.concurrency {
            let me = self.clone();
            let (stop, abandon, turn) = (stop_claiming.clone(), abandon.clone(), turn.clone());
            let name = format!("{}/worker-{n}", me.cfg.replica);
            set.spawn(async move { me.work(name, turn, stop, abandon).await });
        }
        while set.join_next().await.is_some() {}
    }

    /// One worker's loop. Idle workers take turns (`turn`): only the holder claims and,
    /// finding nothing, waits for the queue to change while the others wait for the
    /// turn; a claim that finds a job hands the turn on at once, so a burst is taken
    /// one claim after the other by as many workers as it needs. An idle replica thus
    /// costs the store one claim a second and a submit one claim, whatever
    /// `maxConcurrency`, and idle workers hold no call slot.
    async fn work(
        &self,
        name: String,
        turn: Arc<tokio::sync::Mutex<()>>,
        mut stop: watch::Receiver<bool>,
        abandon: watch::Receiver<bool>,
    ) {
        let mut changes = self.store.changes();
        loop {
            if *stop.borrow() {
                return;
            }
            if let Some(app) = self.app.as_ref().filter(|a| !a.is_up()) {
                // The app is down or restarting: claims would only burn attempts. Queued
                // requests wait (their start timeout still applies).
                app.wait_up(&mut stop).await;
                continue;
            }
            let my_turn = tokio::select! {
                t = turn.lock() => t,
                _ = stop.changed() => continue,
            };
            if self.app.as_ref().is_some_and(|a| !a.is_up()) {
                continue; // went down while this worker waited for its turn
            }
            changes.borrow_and_update();
            // A slot first (direct calls may hold them all), kept for the run; given back
            // when there is nothing to claim.
            let slot = match &self.slots {
                Some(slots) => tokio::select! {
                    s = slots.take() => Some(s),
                    _ = stop.changed() => continue,
                },
                None => None,
            };
            // The lease runs from when the claim executes in the store, which is after it
            // is sent: counted from the send, the worker's idea of the lease never
            // outlives the real one.
            let sent = tokio::time::Instant::now();
            match self.store.claim(&name, self.cfg.lease).await {
                Ok(Some(job)) => {
                    drop(my_turn); // there may be more: the next worker looks at once
                    self.process(job, sent, abandon.clone()).await;
                    drop(slot);
                }
                Ok(None) => {
                    drop(slot);
                    tokio::select! {
                        _ = changes.changed() => {}
                        _ = stop.changed() => {}
                        // Start deadlines and leases of other processes expire silently.
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => {
                    drop(slot);
                    tracing::warn!(error = %e, "claiming from the store failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }

    /// Runs a claimed job (claim sent at `claimed_at`) to its end.
    async fn process(
        &self,
        job: Claimed,
        claimed_at: tokio::time::Instant,
        mut abandon: watch::Receiver<bool>,
    ) {
        let id = job.record.spec.id.clone();
        let token = job.token;
        self.running.start(&id);
        let mut cancels = self.store.cancellations();
        let mut cancel_sent = job.record.cancel_requested;
        if cancel_sent {
            self.send_cancel(&job);
        }
        let call = async {
            match self.cfg.request_timeout {
                None => self.call_app(&job).await,
                Some(limit) => match tokio::time::timeout(limit, self.call_app(&job)).await {
                    Ok(called) => called,
                    Err(_) => {
                        self.send_cancel(&job);
                        let detail = format!(
                            "the app did not finish within the request timeout ({} s)",
                            limit.as_secs_f64()
                        );
                        let body =
                            serde_json::json!({"detail": detail, "error_type": "request_timeout"});
                        let r = StoredResult::json(
                            504,
                            &body,
                            &[("x-fal-error-type", "request_timeout")],
                        );
                        Called::Failed(r, limit.as_secs_f64(), "request_timeout")
                    }
                },
            }
        };
        let mut call = Box::pin(call);
        // The lease is surely ours until `lease.held_until` (local clock; see
        // `LeaseClock`). Once that passes without a successful renew, another worker may
        // soon claim the job: this run is given up before it could start there. A renew
        // runs alongside the app call and that deadline, so a store call that hangs (up
        // to the store's own timeout) delays neither.
        let mut lease = LeaseClock::new(claimed_at, self.cfg.lease);
        let mut renewing = None;
        let outcome = loop {
            // In this order when several are ready at once (e.g. after the process was
            // stopped): an answer of the app is stored if the token still allows it, a
            // renew that succeeded counts before the deadline is looked at.
            tokio::select! {
                biased;
                r = &mut call => break r,
                r = async { renewing.as_mut().expect("guarded by is_some").await }, if renewing.is_some() => {
                    renewing = None;
                    match r {
                        Ok(Lease::Held { cancel_requested }) => {
                            lease.renewed();
                            if cancel_requested && !cancel_sent {
                                cancel_sent = true;
                                self.send_cancel(&job);
                            }
                        }
                        Ok(Lease::Lost) => break Called::LeaseLost,
                        Err(e) => tracing::warn!(request_id = %id, error = %e, "renewing the lease failed"),
                    }
                }
                _ = tokio::time::sleep_until(lease.held_until) => break Called::LeaseExpired,
                c = cancels.recv() => {
                    if matches!(c, Ok(ref cid) if *cid == id) && !cancel_sent {
                        cancel_sent = true;
                        self.send_cancel(&job);
                    }
                }
                _ = crate::shutdown::wait_true(&mut abandon) => break Called::Abandoned,
                _ = tokio::time::sleep_until(lease.next_renew), if renewing.is_none() => {
                    lease.renew_sent(tokio::time::Instant::now());
                    renewing = Some(self.store.renew(&id, token, self.cfg.lease));
                }
            }
        };
        drop(renewing);
        if matches!(outcome, Called::LeaseLost | Called::LeaseExpired) {
            self.give_up(&job, call, lease.margin).await;
        } else {
            // An app call still going (drain) is dropped: its connection closes.
            drop(call);
        }
        match outcome {
            Called::Done(result, secs) => {
                let completion = app_end(result.status, now_ms(), secs);
                self.finish(&id, token, completion, result, secs).await;
            }
            Called::Failed(result, secs, error_type) => {
                let detail = serde_json::from_slice::<serde_json::Value>(&result.body)
                    .ok()
                    .and_then(|v| v["detail"].as_str().map(str::to_string));
                let completion = Completion {
                    completed_at_ms: now_ms(),
                    error: detail
                        .or_else(|| Some(format!("Invalid status code: {}", result.status))),
                    error_type: Some(error_type.to_string()),
                    inference_time: Some(secs),
                };
                self.finish(&id, token, completion, result, secs).await;
            }
            Called::Abandoned => {
                tracing::warn!(request_id = %id, "drain deadline passed; giving the request back to the queue");
                if let Err(e) = self.store.release(&id, token).await {
                    tracing::error!(request_id = %id, error = %e, "releasing the request failed; its lease will expire");
                }
            }
            Called::LeaseLost => {
                tracing::warn!(request_id = %id, "lease lost while the app ran it; dropped this run (cancel sent to the app)");
            }
            Called::LeaseExpired => {
                tracing::warn!(
                    request_id = %id,
                    lease_s = self.cfg.lease.as_secs_f64(),
                    "no lease renewal succeeded in time (store unreachable or slow): the lease may expire any moment and another replica take the request over; gave this run up (cancel sent to the app)"
                );
            }
            Called::AppDown => {
                tracing::info!(request_id = %id, "the app is down; the request goes back to the queue until it is back");
                if let Err(e) = self.store.release(&id, token).await {
                    tracing::error!(request_id = %id, error = %e, "releasing the request failed; its lease will expire");
                }
            }
            Called::AppDied(exit) => self.app_died(&job, &exit).await,
        }
        self.running.finish(&id);
    }

    /// The app exited while running this request: run it again on the restarted app
    /// (the attempt stays counted), unless it had its last attempt or asked for no
    /// retries: then it fails, so a request that kills the app every time ends.
    async fn app_died(&self, job: &Claimed, exit: &str) {
        let spec = &job.record.spec;
        let (attempt, max) = (job.record.attempts, self.cfg.max_attempts);
        if !spec.no_retry && attempt < max {
            tracing::warn!(request_id = %spec.id, status = %exit, attempt, max_attempts = max,
                "the app exited while running the request; it runs again once the app is back");
            match self.store.requeue(&spec.id, job.token).await {
                Ok(true) => return,
                Ok(false) => {
                    tracing::warn!(request_id = %spec.id, "the request was taken over meanwhile");
                    return;
                }
                // Cannot requeue: fail it rather than leave it to the lease.
                Err(e) => {
                    tracing::error!(request_id = %spec.id, error = %e, "requeueing the request failed; failing it")
                }
            }
        }
        let why = if spec.no_retry {
            "X-Fal-No-Retry: not run again".to_string()
        } else {
            format!("attempt {attempt} of {max} (--max-attempts); not run again")
        };
        let detail = format!("the app exited ({exit}) while running this request; {why}");
        tracing::error!(request_id = %spec.id, %detail, "request failed");
        let body = serde_json::json!({"detail": detail, "error_type": "runner_disconnected"});
        let result = StoredResult::json(503, &body, &[("x-fal-error-type", "runner_disconnected")]);
        let completion = Completion {
            completed_at_ms: now_ms(),
            error: Some(detail),
            error_type: Some("runner_disconnected".to_string()),
            inference_time: None,
        };
        self.finish(&spec.id, job.token, completion, result, 0.0)
            .await;
    }

    /// `run` mode: how the app of `generation` ended, if it exited (now or within a
    /// moment: a dying app breaks its connections just before its exit is seen).
    async fn app_exited(&self, generation: Option<u64>) -> Option<String> {
        match (&self.app, generation) {
            (Some(app), Some(g)) => app.exited_since(g, APP_EXIT_GRACE).await,
            _ => None,
        }
    }

    async fn finish(
        &self,
        id: &str,
        token: u64,
        completion: Completion,
        result: StoredResult,
        secs: f64,
    ) {
        let outcome = match completion.error_type.as_deref() {
            None => "ok",
            Some("app_error") => "app_error",
            Some(_) => "failed",
        };
        self.metrics.inference_seconds.observe(secs);
        // A store outage must not throw the app's work away: keep trying while the lease
        // (renewed by nobody now) could still be ours; after that the job runs again.
        let give_up = tokio::time::Instant::now() + self.cfg.lease;
        let mut delay = Duration::from_millis(100);
        loop {
            match self
                .store
                .complete(id, token, completion.clone(), result.clone())
                .await
            {
                Ok(true) => {
                    self.metrics.completed.with_label_values(&[outcome]).inc();
                    return;
                }
                Ok(false) => {
                    tracing::warn!(request_id = %id, "result dropped: the lease was lost and the job was taken over");
                    return;
                }
                Err(e) if tokio::time::Instant::now() + delay < give_up => {
                    tracing::warn!(request_id = %id, error = %e, "storing the result failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    tracing::error!(request_id = %id, error = %e, "storing the result failed; the request will run again once its lease expires");
                    return;
                }
            }
        }
    }

    fn build(&self, job: &Claimed, path: &str, body: Bytes) -> Result<Request<Body>, http::Error> {
        let spec = &job.record.spec;
        let pq = match &spec.query {
            Some(q) if !q.is_empty() => format!("{path}?{q}"),
            _ => path.to_string(),
        };
        let mut req = Request::builder()
            .method(spec.method.as_str())
            .uri(self.upstream.uri(&pq)?);
        let headers = req.headers_mut().expect("fresh builder");
        for (k, v) in &spec.headers {
            if is_hop_by_hop(k) {
                continue;
            }
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.append(k, v);
            }
        }
        headers.insert("x-fal-request-id", HeaderValue::from_str(&spec.id)?);
        headers.insert("x-fal-endpoint", HeaderValue::from_str(&spec.endpoint)?);
        req.body(Body::full(body))
    }

    async fn call_app(&self, job: &Claimed) -> Called {
        let spec = &job.record.spec;
        let started = Instant::now();
        let mut attempt = 0usize;
        loop {
            let can_retry = !spec.no_retry && attempt < self.cfg.retry_delays.len();
            let generation = self.app.as_ref().map(|a| a.generation());
            let req = match self.build(job, &spec.endpoint, job.body.clone()) {
                Ok(r) => r,
                Err(e) => {
                    let body = serde_json::json!({"detail": format!("the request cannot be sent to the app: {e}")});
                    return Called::Done(StoredResult::json(400, &body, &[]), 0.0);
                }
            };
            match self.upstream.client.request(req).await {
                Ok(resp) if retryable(resp.status().as_u16()) && can_retry => {
                    tracing::info!(request_id = %spec.id, status = resp.status().as_u16(), attempt, "app asked for a retry");
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let mut headers = Vec::new();
                    for (k, v) in resp.headers() {
                        if is_hop_by_hop(k.as_str()) || k == http::header::CONTENT_LENGTH {
                            continue;
                        }
                        if let Ok(v) = v.to_str() {
                            headers.push((k.as_str().to_string(), v.to_string()));
                        }
                    }
                    let body = match Limited::new(resp.into_body(), self.cfg.max_result_bytes)
                        .collect()
                        .await
                    {
                        Ok(b) => b.to_bytes(),
                        Err(e) => {
                            if let Some(exit) = self.app_exited(generation).await {
                                return Called::AppDied(exit);
                            }
                            let detail = if crate::upstream::is_length_limit(e.as_ref()) {
                                format!("the app's response is larger than --max-result-bytes ({} bytes)", self.cfg.max_result_bytes)
                            } else {
                                format!(
                                    "the app's response body broke off: {}",
                                    error_chain(e.as_ref())
                                )
                            };
                            let body = serde_json::json!({"detail": detail, "error_type": "runner_disconnected"});
                            return Called::Failed(
                                StoredResult::json(
                                    502,
                                    &body,
                                    &[("x-fal-error-type", "runner_disconnected")],
                                ),
                                started.elapsed().as_secs_f64(),
                                "runner_disconnected",
                            );
                        }
                    };
                    return Called::Done(
                        StoredResult {
                            status,
                            headers,
                            body,
                        },
                        started.elapsed().as_secs_f64(),
                    );
                }
                Err(e) if self.app.is_some() && self.app_exited(generation).await.is_some() => {
                    // Not sent (no connection): not the request's fault. Sent: it may be.
                    return if e.is_connect() {
                        Called::AppDown
                    } else {
                        Called::AppDied(self.app_exited(generation).await.unwrap_or_default())
                    };
                }
                Err(e) if can_retry => {
                    tracing::info!(request_id = %spec.id, error = %error_chain(&e), attempt, "app unreachable; retrying");
                }
                Err(e) => {
                    let body = serde_json::json!({
                        "detail": format!("the app at {} could not be reached: {}", self.upstream.authority(), error_chain(&e)),
                        "error_type": "runner_connection_timeout",
                    });
                    let r = StoredResult::json(
                        503,
                        &body,
                        &[("x-fal-error-type", "runner_connection_timeout")],
                    );
                    return Called::Failed(
                        r,
                        started.elapsed().as_secs_f64(),
                        "runner_connection_timeout",
                    );
                }
            }
            self.metrics.app_retries.inc();
            tokio::time::sleep(self.cfg.retry_delays[attempt]).await;
            attempt += 1;
        }
    }

    /// `POST {endpoint}/cancel` to the app, with the same `x-fal-request-id`, in the
    /// background.
    fn send_cancel(&self, job: &Claimed) {
        tokio::spawn(self.cancel_call(job));
    }

    /// The cancel of [`send_cancel`](Self::send_cancel), to await: a worker that gives
    /// a run up waits for the app to take the cancel (at most `CANCEL_WAIT`) before it
    /// claims again, so the cancel cannot reach the app after the same request was
    /// claimed here again.
    fn cancel_call(&self, job: &Claimed) -> impl std::future::Future<Output = ()> + Send + 'static {
        let endpoint = job.record.spec.endpoint.trim_end_matches('/');
        let path = format!("{endpoint}/cancel");
        let req = self.build(job, &path, Bytes::new()).map(|mut r| {
            *r.method_mut() = http::Method::POST;
            r
        });
        let client = self.upstream.client.clone();
        let id = job.record.spec.id.clone();
        async move {
            let Ok(req) = req else { return };
            match client.request(req).await {
                Ok(resp) => {
                    tracing::info!(request_id = %id, status = resp.status().as_u16(), "cancel forwarded to the app")
                }
                Err(e) => {
                    tracing::warn!(request_id = %id, error = %error_chain(&e), "forwarding the cancel to the app failed")
                }
            }
        }
    }

    /// Stops a run whose lease is gone or about to go. The app is sent a cancel first,
    /// so that it takes it for the run going on; then the call is dropped (its
    /// connection closes, for apps that watch for a hang-up rather than cancels) once
    /// the app took the cancel or after `grace` at the latest. The worker claims again
    /// only once the app took the cancel (or `CANCEL_WAIT` passed), so the cancel
    /// cannot reach the app after the same request was claimed here again.
    async fn give_up<C>(&self, job: &Claimed, call: C, grace: Duration) {
        let mut cancel = std::pin::pin!(self.cancel_call(job));
        let taken = tokio::time::timeout(grace, &mut cancel).await.is_ok();
        drop(call);
        if !taken && tokio::time::timeout(CANCEL_WAIT, cancel).await.is_err() {
            tracing::warn!(request_id = %job.record.spec.id, "the app did not take the cancel in time");
        }
    }
}

/// How long a worker that gives a run up waits for the app to take the cancel.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    use super::*;
    use crate::job::{Phase, Priority};
    use crate::store::conformance::spec;
    use crate::store::testing::{FlakyStore, Renew};

    #[test]
    fn lease_clock_counts_from_the_send_with_a_margin() {
        let t0 = tokio::time::Instant::now();
        let lease = Duration::from_secs(3);
        let mut c = LeaseClock::new(t0, lease);
        assert_eq!(c.held_until, t0 + Duration::from_millis(2700));
        assert_eq!(c.next_renew, t0 + Duration::from_secs(1));
        // A renew sent at 1 s that succeeds (whenever its answer comes): held until 3.7 s.
        c.renew_sent(t0 + Duration::from_secs(1));
        assert_eq!(c.next_renew, t0 + Duration::from_secs(2));
        c.renewed();
        assert_eq!(c.held_until, t0 + Duration::from_millis(3700));
        // A failed renew moves only the schedule, never the deadline.
        c.renew_sent(t0 + Duration::from_secs(2));
        assert_eq!(c.held_until, t0 + Duration::from_millis(3700));
        // The margin is at most 1 s.
        let c = LeaseClock::new(t0, Duration::from_secs(30));
        assert_eq!(c.held_until, t0 + Duration::from_secs(29));
    }

    /// An app on a loopback port: `POST /test` answers after `answer_after` (never when
    /// `None`), `POST /test/cancel` at once; reports "call", "cancel" and "hung up" (the
    /// caller closed a call before the answer).
    async fn fake_app(
        answer_after: Option<Duration>,
    ) -> (u16, mpsc::UnboundedReceiver<&'static str>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    loop {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            match sock.read(&mut byte).await {
                                Ok(1) => head.push(byte[0]),
                                _ => return,
                            }
                        }
                        let head = String::from_utf8_lossy(&head).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        let mut body = vec![0u8; len];
                        sock.read_exact(&mut body).await.unwrap();
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";
                        if head.starts_with("post /test/cancel ") {
                            let _ = tx.send("cancel");
                        } else {
                            let _ = tx.send("call");
                            let wait = async {
                                match answer_after {
                                    Some(d) => tokio::time::sleep(d).await,
                                    None => std::future::pending().await,
                                }
                            };
                            tokio::select! {
                                _ = wait => {}
                                // the caller sends nothing more: a read ends only at its hang-up
                                _ = sock.read(&mut byte) => {
                                    let _ = tx.send("hung up");
                                    return;
                                }
                            }
                        }
                        if sock.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, rx)
    }

    async fn setup(
        renew: Renew,
        lease: Duration,
        answer_after: Option<Duration>,
    ) -> (
        Arc<Workers>,
        Arc<FlakyStore>,
        mpsc::UnboundedReceiver<&'static str>,
    ) {
        let store = Arc::new(FlakyStore::new(renew));
        let (port, events) = fake_app(answer_after).await;
        let workers = Arc::new(Workers {
            store: store.clone(),
            upstream: Upstream::new(&format!("http://127.0.0.1:{port}")).unwrap(),
            cfg: WorkerConfig {
                replica: "test".into(),
                concurrency: 1,
                lease,
                retry_delays: Vec::new(),
                max_result_bytes: 1 << 20,
                request_timeout: None,
                max_attempts: 3,
            },
            running: Running::default(),
            metrics: Arc::new(Metrics::new()),
            app: None,
            slots: Some(Slots::new(1)),
        });
        (workers, store, events)
    }

    /// Submits a job, claims it and runs it to the end; returns its id and how long the
    /// run took.
    async fn run_one(w: &Workers, store: &FlakyStore) -> (String, Duration) {
        let s = spec(Priority::Normal);
        let id = s.id.clone();
        store
            .submit(s, Bytes::from_static(b"{}"), 10)
            .await
            .unwrap();
        let sent = tokio::time::Instant::now();
        let job = store.claim("test", w.cfg.lease).await.unwrap().unwrap();
        let (_keep, abandon) = watch::channel(false);
        tokio::time::timeout(Duration::from_secs(30), w.process(job, sent, abandon))
            .await
            .expect("the run ended");
        (id, sent.elapsed())
    }

    async fn drain(events: &mut mpsc::UnboundedReceiver<&'static str>) -> Vec<&'static str> {
        // The app notices a hang-up a moment after the worker returns.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(e);
        }
        seen.sort_unstable();
        seen
    }

    async fn gives_up(renew: Renew) {
        let lease = Duration::from_millis(600);
        let (w, store, mut events) = setup(renew, lease, None).await;
        let (id, took) = run_one(&w, &store).await;
        // Not before the lease could have expired (minus the margin), and not forever.
        assert!(took >= lease - lease / 10, "gave up after {took:?}");
        assert_eq!(drain(&mut events).await, ["call", "cancel", "hung up"]);
        // No result was stored: the job waits for its lease to expire and runs again.
        let status = store.status(&id).await.unwrap().unwrap();
        assert_eq!(status.record.phase, Phase::Running);
        assert!(w.running.count() == 0);
    }

    #[tokio::test]
    async fn a_run_is_given_up_when_renewals_fail() {
        gives_up(Renew::Fail).await;
    }

    #[tokio::test]
    async fn a_run_is_given_up_when_renewals_hang() {
        // A renew that never answers must not hold the deadline back.
        gives_up(Renew::Hang).await;
    }

    #[tokio::test]
    async fn renewed_leases_keep_a_run_going_past_the_lease() {
        let lease = Duration::from_secs(1);
        let (w, store, mut events) = setup(Renew::Ok, lease, Some(lease * 3)).await;
        let (id, took) = run_one(&w, &store).await;
        assert!(took >= lease * 3);
        assert_eq!(drain(&mut events).await, ["call"]);
        let status = store.status(&id).await.unwrap().unwrap();
        assert_eq!(status.record.phase, Phase::Completed);
        assert_eq!(store.result(&id).await.unwrap().unwrap().status, 200);
    }
}
