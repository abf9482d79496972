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
        // 0 workers = API only: submits, status and cancel are served, another replica
        // runs the requests (the gateway's mode).
        for n in 0..self.cfg.concurrency {
            let me = self.clone();
            let (stop, abandon) = (stop_claiming.clone(), abandon.clone());
            let name = format!("{}/worker-{n}", me.cfg.replica);
            set.spawn(async move { me.work(name, stop, abandon).await });
        }
        while set.join_next().await.is_some() {}
    }

    async fn work(
        &self,
        name: String,
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
            changes.borrow_and_update();
            match self.store.claim(&name, self.cfg.lease).await {
                Ok(Some(job)) => self.process(job, abandon.clone()).await,
                Ok(None) => {
                    tokio::select! {
                        _ = changes.changed() => {}
                        _ = stop.changed() => {}
                        // Start deadlines and leases of other processes expire silently.
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claiming from the store failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    }

    async fn process(&self, job: Claimed, mut abandon: watch::Receiver<bool>) {
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
        tokio::pin!(call);
        let mut renew = tokio::time::interval(self.cfg.lease / 3);
        renew.tick().await;
        let outcome = loop {
            tokio::select! {
                r = &mut call => break r,
                _ = renew.tick() => match self.store.renew(&id, token, self.cfg.lease).await {
                    Ok(Lease::Held { cancel_requested }) => {
                        if cancel_requested && !cancel_sent {
                            cancel_sent = true;
                            self.send_cancel(&job);
                        }
                    }
                    Ok(Lease::Lost) => break Called::LeaseLost,
                    Err(e) => tracing::warn!(request_id = %id, error = %e, "renewing the lease failed"),
                },
                c = cancels.recv() => {
                    if matches!(c, Ok(ref cid) if *cid == id) && !cancel_sent {
                        cancel_sent = true;
                        self.send_cancel(&job);
                    }
                }
                _ = crate::server::wait_true(&mut abandon) => break Called::Abandoned,
            }
        };
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
                tracing::warn!(request_id = %id, "lease lost while the app ran it; dropping this run")
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

    /// `POST {endpoint}/cancel` to the app, with the same `x-fal-request-id`.
    fn send_cancel(&self, job: &Claimed) {
        let endpoint = job.record.spec.endpoint.trim_end_matches('/');
        let path = format!("{endpoint}/cancel");
        let req = self.build(job, &path, Bytes::new()).map(|mut r| {
            *r.method_mut() = http::Method::POST;
            r
        });
        let client = self.upstream.client.clone();
        let id = job.record.spec.id.clone();
        tokio::spawn(async move {
            let Ok(req) = req else { return };
            match client.request(req).await {
                Ok(resp) => {
                    tracing::info!(request_id = %id, status = resp.status().as_u16(), "cancel forwarded to the app")
                }
                Err(e) => {
                    tracing::warn!(request_id = %id, error = %error_chain(&e), "forwarding the cancel to the app failed")
                }
            }
        });
    }
}
