//! Prometheus metrics (served on the admin listener).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::store::Load;

pub struct Metrics {
    pub registry: Registry,
    pub direct_requests: IntCounter,
    pub direct_errors: IntCounter,
    pub submits: IntCounterVec,
    pub rejected: IntCounterVec,
    pub completed: IntCounterVec,
    pub app_retries: IntCounter,
    pub app_restarts: IntCounter,
    pub app_up: IntGauge,
    pub webhooks: IntCounterVec,
    pub inference_seconds: Histogram,
    pub queued: IntGauge,
    pub in_flight: IntGauge,
    pub oldest_wait_seconds: IntGauge,
    pub websockets_open: IntGauge,
    pub websocket_upgrades: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone())).expect("register metric");
            c
        }
        Metrics {
            direct_requests: reg(
                &r,
                IntCounter::new(
                    "fal_direct_requests_total",
                    "Direct calls proxied to the app",
                )
                .unwrap(),
            ),
            direct_errors: reg(
                &r,
                IntCounter::new(
                    "fal_direct_errors_total",
                    "Direct calls that failed before the app answered",
                )
                .unwrap(),
            ),
            submits: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("fal_queue_submits_total", "Accepted queue submits"),
                    &["priority"],
                )
                .unwrap(),
            ),
            rejected: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("fal_queue_rejected_total", "Refused queue submits"),
                    &["reason"],
                )
                .unwrap(),
            ),
            completed: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("fal_queue_completed_total", "Completed queue requests"),
                    &["outcome"],
                )
                .unwrap(),
            ),
            app_retries: reg(
                &r,
                IntCounter::new(
                    "fal_app_retries_total",
                    "Retries of app calls (503/504/429/connection errors)",
                )
                .unwrap(),
            ),
            app_restarts: reg(
                &r,
                IntCounter::new(
                    "fal_app_restarts_total",
                    "Restarts of the app process after it exited (run mode)",
                )
                .unwrap(),
            ),
            app_up: reg(
                &r,
                IntGauge::new(
                    "fal_app_up",
                    "1 while the app process listens, 0 while it is down or restarting (run mode; 0 in serve mode)",
                )
                .unwrap(),
            ),
            webhooks: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("fal_webhook_attempts_total", "Webhook delivery attempts"),
                    &["result"],
                )
                .unwrap(),
            ),
            inference_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "fal_inference_seconds",
                        "Time the app took per queued request",
                    )
                    .buckets(vec![
                        0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                    ]),
                )
                .unwrap(),
            ),
            queued: reg(
                &r,
                IntGauge::new("fal_queue_depth", "Requests waiting in the queue").unwrap(),
            ),
            in_flight: reg(
                &r,
                IntGauge::new("fal_queue_in_flight", "Requests the app is running").unwrap(),
            ),
            oldest_wait_seconds: reg(
                &r,
                IntGauge::new(
                    "fal_queue_oldest_wait_seconds",
                    "Age of the oldest queued request",
                )
                .unwrap(),
            ),
            websockets_open: reg(
                &r,
                IntGauge::new("fal_websockets_open", "WebSockets spliced to the app now").unwrap(),
            ),
            websocket_upgrades: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "fal_websocket_upgrades_total",
                        "WebSocket handshakes by outcome (upgraded, refused by the app, unavailable, failed)",
                    ),
                    &["outcome"],
                )
                .unwrap(),
            ),
            registry: r,
        }
    }

    /// Prometheus text format, with the load gauges refreshed first.
    pub fn render(&self, load: Option<Load>, now_ms: u64) -> Vec<u8> {
        if let Some(l) = load {
            self.queued.set(l.queued as i64);
            self.in_flight.set(l.in_flight as i64);
            self.oldest_wait_seconds.set(
                l.oldest_queued_ms
                    .map_or(0, |t| (now_ms.saturating_sub(t) / 1000) as i64),
            );
        }
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encode metrics");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
