//! Webhooks: payloads, Ed25519 signatures, the SSRF guard, and the delivery loop that
//! drains the store's outbox (so a pending notification survives restarts and, with a
//! shared store, the death of the replica that was sending it).

pub mod signing;
pub mod ssrf;

use std::sync::Arc;
use std::time::Duration;

use crate::job::{now_ms, Completion, StoredResult};
use crate::metrics::Metrics;
use crate::store::{Delivery, Store};
use signing::Signer;

/// The fal webhook body for a completed request.
pub fn payload(
    request_id: &str,
    result: &StoredResult,
    completion: Option<&Completion>,
) -> serde_json::Value {
    let ok = (200..300).contains(&result.status);
    let mut body = serde_json::json!({
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": if ok { "OK" } else { "ERROR" },
    });
    if !ok {
        let app_error = completion
            .and_then(|c| c.error_type.as_deref())
            .is_none_or(|t| t == "app_error");
        let error = match completion.and_then(|c| c.error.clone()) {
            Some(e) if !app_error => e,
            _ => format!("Invalid status code: {}", result.status),
        };
        body["error"] = error.into();
    }
    match serde_json::from_slice::<serde_json::Value>(&result.body) {
        Ok(v) => body["payload"] = v,
        Err(e) => {
            body["payload"] = serde_json::Value::Null;
            body["payload_error"] = format!("Response payload is not valid JSON: {e}").into();
        }
    }
    body
}

/// Least time between two outbox reads that store changes trigger (a webhook waits at
/// most this much longer; a thousand submits a second cost ~200 outbox reads, not 1,000).
const RECHECK_FLOOR: Duration = Duration::from_millis(5);

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Delays between attempts; attempts = `retry_delays.len() + 1`.
    pub retry_delays: Vec<Duration>,
    pub attempt_timeout: Duration,
    /// Outbox poll interval when nothing wakes the loop (a replica: 200 ms; a gateway
    /// watching many functions polls less, change events still wake it at once).
    pub idle_poll: Duration,
}

impl DeliveryConfig {
    /// fal's schedule: 10 attempts over about two hours.
    pub fn default_delays() -> Vec<Duration> {
        [15u64, 60, 120, 300, 600, 900, 1200, 1500, 2700]
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect()
    }
}

pub struct Deliverer {
    store: Arc<dyn Store>,
    signer: Arc<Signer>,
    client: reqwest::Client,
    policy: Arc<ssrf::Policy>,
    cfg: DeliveryConfig,
    metrics: Arc<Metrics>,
}

impl Deliverer {
    pub fn new(
        store: Arc<dyn Store>,
        signer: Arc<Signer>,
        policy: Arc<ssrf::Policy>,
        cfg: DeliveryConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Deliverer> {
        let client = Self::client(&policy, &cfg)?;
        Ok(Self::with_client(
            store, signer, policy, cfg, metrics, client,
        ))
    }

    /// The HTTP client of webhook deliveries (no redirects, no proxy, the SSRF guard on
    /// every resolved address). One can serve many deliverers (a gateway's functions).
    pub fn client(
        policy: &Arc<ssrf::Policy>,
        cfg: &DeliveryConfig,
    ) -> anyhow::Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(cfg.attempt_timeout)
            .connect_timeout(cfg.attempt_timeout.min(Duration::from_secs(5)))
            .dns_resolver(Arc::new(ssrf::GuardedResolver(policy.clone())))
            .user_agent(concat!("fal-sidecar/", env!("CARGO_PKG_VERSION")))
            .build()?)
    }

    /// A deliverer over an existing client (see [`Deliverer::client`]).
    pub fn with_client(
        store: Arc<dyn Store>,
        signer: Arc<Signer>,
        policy: Arc<ssrf::Policy>,
        cfg: DeliveryConfig,
        metrics: Arc<Metrics>,
        client: reqwest::Client,
    ) -> Deliverer {
        Deliverer {
            store,
            signer,
            client,
            policy,
            cfg,
            metrics,
        }
    }

    /// Runs until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut changes = self.store.outbox_changes();
        loop {
            if *stop.borrow() {
                return;
            }
            changes.borrow_and_update();
            let read_at = tokio::time::Instant::now();
            match self.deliver_due().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "reading the webhook outbox failed; retrying"),
            }
            tokio::select! {
                _ = changes.changed() => {
                    // With the embedded store every submit is a change (with Redis,
                    // only jobs that end are): under a burst, read the outbox at most
                    // every RECHECK_FLOOR, and meanwhile nobody waits on the change
                    // signal, so a submit wakes no other thread for it.
                    tokio::select! {
                        _ = tokio::time::sleep_until(read_at + RECHECK_FLOOR) => {}
                        _ = stop.changed() => {}
                    }
                }
                _ = tokio::time::sleep(self.cfg.idle_poll) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One pass over the outbox: sends what is due (in parallel) and records each
    /// attempt. `Ok(true)` when something was due (there may be more).
    pub async fn deliver_due(self: &Arc<Self>) -> Result<bool, crate::store::StoreError> {
        let lease = self.cfg.attempt_timeout * 2 + Duration::from_secs(5);
        let due = self.store.due_deliveries(now_ms(), 64, lease).await?;
        if due.is_empty() {
            return Ok(false);
        }
        let mut set = tokio::task::JoinSet::new();
        for d in due {
            let me = self.clone();
            set.spawn(async move { me.deliver(d).await });
        }
        while set.join_next().await.is_some() {}
        Ok(true)
    }

    async fn deliver(&self, d: Delivery) {
        let attempt = d.attempts + 1;
        let outcome = self.attempt(&d).await;
        let next = match &outcome {
            Ok(status) => {
                tracing::info!(request_id = %d.request_id, attempt, status, "webhook delivered");
                self.metrics
                    .webhooks
                    .with_label_values(&["delivered"])
                    .inc();
                None
            }
            Err(why) if (attempt as usize) > self.cfg.retry_delays.len() => {
                tracing::error!(request_id = %d.request_id, attempt, error = %why, "webhook failed for the last time; giving up (the result stays fetchable)");
                self.metrics.webhooks.with_label_values(&["gave_up"]).inc();
                None
            }
            Err(why) => {
                let delay = self.cfg.retry_delays[attempt as usize - 1];
                tracing::warn!(request_id = %d.request_id, attempt, error = %why, retry_in = ?delay, "webhook attempt failed");
                self.metrics.webhooks.with_label_values(&["retry"]).inc();
                Some(now_ms() + delay.as_millis() as u64)
            }
        };
        if let Err(e) = self
            .store
            .delivery_attempted(&d.request_id, attempt, next)
            .await
        {
            tracing::warn!(request_id = %d.request_id, error = %e, "recording a webhook attempt failed; it will be retried");
        }
    }

    /// One POST. `Ok(status)` on 2xx.
    async fn attempt(&self, d: &Delivery) -> Result<u16, String> {
        let status = self
            .store
            .status(&d.request_id)
            .await
            .map_err(|e| e.to_string())?;
        let result = self
            .store
            .result(&d.request_id)
            .await
            .map_err(|e| e.to_string())?;
        let (Some(status), Some(result)) = (status, result) else {
            // Purged: nothing left to say. Treat as done.
            return Ok(0);
        };
        // Literal IPs do not go through the resolver hook: check them here.
        let url = reqwest::Url::parse(&d.url).map_err(|e| e.to_string())?;
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.policy.check_ip(ip.into())?,
            Some(url::Host::Ipv6(ip)) => self.policy.check_ip(ip.into())?,
            _ => {}
        }
        let body = serde_json::to_vec(&payload(
            &d.request_id,
            &result,
            status.record.completion.as_ref(),
        ))
        .map_err(|e| e.to_string())?;
        let ts = now_ms() / 1000;
        let sig = self.signer.sign(&d.request_id, &d.owner, ts, &body);
        let resp = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("x-fal-webhook-request-id", &d.request_id)
            .header("x-fal-webhook-user-id", &d.owner)
            .header("x-fal-webhook-timestamp", ts.to_string())
            .header("x-fal-webhook-signature", sig)
            .body(body)
            .send()
            .await
            .map_err(|e| crate::upstream::error_chain(&e))?;
        let code = resp.status().as_u16();
        if resp.status().is_success() {
            Ok(code)
        } else {
            Err(format!("receiver answered {code}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_changes_reads_the_outbox_at_most_every_recheck_floor() {
        use crate::store::testing::{FlakyStore, Renew};
        use std::sync::atomic::Ordering;
        let store = Arc::new(FlakyStore::new(Renew::Ok));
        let policy = Arc::new(ssrf::Policy::new(&[], false).unwrap());
        let cfg = DeliveryConfig {
            retry_delays: vec![],
            attempt_timeout: Duration::from_secs(5),
            // No idle polls in the window: every read here is one a change asked for.
            idle_poll: Duration::from_secs(3600),
        };
        let deliverer = Arc::new(
            Deliverer::new(
                store.clone(),
                Arc::new(Signer::from_seed([7; 32])),
                policy,
                cfg,
                Arc::new(Metrics::new()),
            )
            .unwrap(),
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(deliverer.run(stop_rx));
        // The loop's first read, before the burst.
        while store.outbox_reads.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let before = store.outbox_reads.load(Ordering::Relaxed);
        let started = std::time::Instant::now();
        // 640 submits from 64 tasks: 640 changes, each one used to wake the loop.
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let store = store.clone();
            tasks.spawn(async move {
                for _ in 0..10 {
                    let spec = crate::store::conformance::spec(crate::job::Priority::Normal);
                    store.submit(spec, Bytes::new(), usize::MAX).await.unwrap();
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let elapsed = started.elapsed();
        let during = store.outbox_reads.load(Ordering::Relaxed) - before;
        let most = (elapsed.as_millis() / RECHECK_FLOOR.as_millis()) as usize + 2;
        assert!(
            during <= most,
            "{during} outbox reads for 640 changes in {elapsed:?}: more than one per {RECHECK_FLOOR:?}"
        );
        // The last changes are not forgotten: the loop reads again after them.
        let after_burst = store.outbox_reads.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.outbox_reads.load(Ordering::Relaxed) == after_burst {
            let s = crate::store::conformance::spec(crate::job::Priority::Normal);
            store.submit(s, Bytes::new(), usize::MAX).await.unwrap();
            assert!(
                std::time::Instant::now() < deadline,
                "no outbox read after a change"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop_tx.send(true).unwrap();
        run.await.unwrap();
    }

    fn result(status: u16, body: &'static str) -> StoredResult {
        StoredResult {
            status,
            headers: vec![],
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn payload_shapes() {
        let ok = payload("r", &result(200, "{\"x\":1}"), None);
        assert_eq!(
            ok,
            serde_json::json!({"request_id": "r", "gateway_request_id": "r", "status": "OK", "payload": {"x": 1}})
        );
        let err = payload("r", &result(422, "{\"detail\":\"bad\"}"), None);
        assert_eq!(err["status"], "ERROR");
        assert_eq!(err["error"], "Invalid status code: 422");
        assert_eq!(err["payload"]["detail"], "bad");
        let text = payload("r", &result(200, "plain"), None);
        assert_eq!(text["payload"], serde_json::Value::Null);
        assert!(text["payload_error"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"));
        let (c, r) = crate::job::system_end(crate::job::SystemEnd::StartTimeout, 1, 0);
        assert!(payload("r", &r, Some(&c))["error"]
            .as_str()
            .unwrap()
            .contains("timed out"));
    }
}
