//! The gateway's admin listener: `/metrics`, `/healthz`, `/readyz` (ready once the
//! cluster's functions and keys are known and the store would take a submit), `/functions`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fal_sidecar::api::proxy::ConnState;
use fal_sidecar::api::{error, json};
use fal_sidecar::upstream::Body;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus::Registry;

use super::Gateway;

/// Extra per-function detail for `/functions` (local mode: its replica processes).
pub type Describe = Box<dyn Fn(&str) -> serde_json::Value + Send + Sync>;

/// The state of the admin listener.
pub struct Admin {
    pub gw: Arc<Gateway>,
    /// The process's own metrics (gateway, autoscaler).
    pub registry: Registry,
    /// `local` and the controller add the autoscaler's view to `/functions`.
    pub autoscaler: Option<Arc<crate::autoscale::Autoscaler>>,
    /// `local` adds its replicas (starting, ready, draining) to `/functions`.
    pub describe: Option<Describe>,
    /// `local`: `POST /functions` registers a decorated Python file (`function serve`).
    pub deployer: Option<Arc<crate::deploy::local::LocalDeployer>>,
}

/// `/functions`: each function's bounds, replicas and load as this process sees them.
pub fn functions_json(admin: &Admin) -> serde_json::Value {
    let list: Vec<serde_json::Value> = admin
        .gw
        .entries()
        .iter()
        .map(|e| {
            let info = e.info();
            let mut v = serde_json::json!({
                "function": e.key,
                "minReplicas": info.bounds.min_replicas,
                "maxReplicas": info.bounds.max_replicas,
                "maxConcurrency": info.bounds.max_concurrency,
                "auth": info.auth.as_str(),
                "keepAlive": info.bounds.keep_alive.as_secs(),
                "readyReplicas": e.replicas().len(),
                "syncCalls": e.sync_calls(),
                "heldCalls": e.held_calls(),
            });
            if let Some(snap) = admin.autoscaler.as_ref().and_then(|a| a.snapshot(&e.key)) {
                v["replicas"] = snap.replicas.into();
                v["desiredReplicas"] = snap.desired.into();
                v["load"] = serde_json::json!({
                    "queued": snap.queued, "running": snap.running, "sync": snap.sync,
                    "lastActivityMs": snap.last_activity_ms,
                });
            }
            if let Some(describe) = &admin.describe {
                v["local"] = describe(&e.key);
            }
            v
        })
        .collect();
    serde_json::Value::Array(list)
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz` (the store would take a
/// submit), `/functions`.
pub async fn handle_admin(
    admin: Arc<Admin>,
    _conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/readyz" if admin.gw.terminating.load(Ordering::Relaxed) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down: this gateway still serves while the Service's endpoints drop it",
            None,
        ),
        "/readyz" if !admin.gw.functions_synced.load(Ordering::Relaxed) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first list of FalFunctions has not been read from the API server yet",
            None,
        ),
        "/readyz" if !admin.gw.keys_synced.load(Ordering::Relaxed) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first list of FalKeys has not been read from the API server yet",
            None,
        ),
        // Not a PING: every primary takes a probe write, confirmed by --store-replicas
        // replicas (RedisHub::ready), so "ready" means a submit would be stored now.
        "/readyz" => match admin.gw.hub.ready().await {
            Ok(()) => json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: the queue store cannot take a submit now ({e})"),
                Some("store_unavailable"),
            ),
        },
        "/functions" if req.method() == http::Method::POST => match &admin.deployer {
            Some(d) => register(d.clone(), req).await,
            None => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "this gateway serves the cluster's FalFunctions (kubectl apply); `fal-operator function serve --local` registers with `fal-operator local` only",
                None,
            ),
        },
        "/functions" => json(StatusCode::OK, &functions_json(&admin)),
        "/metrics" => {
            use prometheus::Encoder;
            let mut buf = Vec::new();
            let enc = prometheus::TextEncoder::new();
            let _ = enc.encode(&admin.registry.gather(), &mut buf);
            let _ = enc.encode(&admin.gw.sidecar_metrics.registry.gather(), &mut buf);
            let mut r = Response::new(Body::full(buf));
            r.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "admin paths are /metrics, /healthz, /readyz and /functions",
            None,
        ),
    }
}

/// `POST /functions` (local): a [`crate::deploy::Deployment`] as JSON in; NDJSON out —
/// `{"log": …}` lines while the environment builds, then `{"revision", "new", "url"}`
/// or `{"error"}`.
async fn register(
    deployer: Arc<crate::deploy::local::LocalDeployer>,
    req: Request<Incoming>,
) -> Response<Body> {
    use http_body_util::{BodyExt, Limited, StreamBody};
    let max = crate::deploy::MAX_SOURCE_BYTES * 2 + 64 * 1024;
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("a registration is at most {max} bytes"),
                None,
            )
        }
    };
    let d: crate::deploy::Deployment = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("not a function registration: {e}"),
                None,
            )
        }
    };
    let (log_tx, mut log_rx) = tokio::sync::mpsc::channel::<String>(256);
    let (line_tx, line_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(256);
    tokio::spawn(async move {
        let deploy = deployer.deploy(d, log_tx);
        tokio::pin!(deploy);
        let line = |v: serde_json::Value| bytes::Bytes::from(format!("{v}\n"));
        let outcome = loop {
            tokio::select! {
                r = &mut deploy => break r,
                Some(l) = log_rx.recv() => {
                    let _ = line_tx.send(line(serde_json::json!({"log": l}))).await;
                }
            }
        };
        while let Ok(l) = log_rx.try_recv() {
            let _ = line_tx.send(line(serde_json::json!({"log": l}))).await;
        }
        let last = match outcome {
            Ok(d) => serde_json::to_value(d).unwrap_or_default(),
            Err(e) => serde_json::json!({"error": e}),
        };
        let _ = line_tx.send(line(last)).await;
    });
    let frames = futures_util::stream::unfold(line_rx, |mut rx| async move {
        rx.recv().await.map(|b| {
            (
                Ok::<_, fal_sidecar::upstream::BoxError>(hyper::body::Frame::data(b)),
                rx,
            )
        })
    });
    let mut r = Response::new(Body::Boxed(StreamBody::new(frames).boxed_unsync()));
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-ndjson"),
    );
    r
}
