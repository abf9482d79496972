//! The HTTP API: the run listener (direct calls + `/fal/queue/*`, generations A and B),
//! the queue-host listener (generation C), and the admin listener.

pub mod fast;
pub mod options;
pub mod proxy;
pub mod queue;
pub mod tokens;
pub mod websocket;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::auth::{AuthMode, Authorizer, Denial, Target};
use crate::job::now_ms;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::upstream::{Body, Upstream};
use crate::webhook::signing::Signer;
use crate::webhook::ssrf::Policy;

/// Limits and settings of the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    pub max_queue: usize,
    pub retention: Duration,
    /// Webhook user id for generations A and B (generation C uses the path's owner).
    pub owner: String,
    /// Longest a direct call waits for the app's response head.
    pub request_timeout: Option<Duration>,
    /// A WebSocket with no byte either way for this long is closed.
    pub socket_idle_timeout: Option<Duration>,
}

/// Everything a request handler needs.
pub struct App {
    pub store: Arc<dyn Store>,
    /// The app (`None` in a gateway: it picks a replica per call).
    pub upstream: Option<Upstream>,
    pub signer: Arc<Signer>,
    pub policy: Arc<Policy>,
    pub cfg: ApiConfig,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    /// Set by the runtime: what `/drain` uses to stop claiming and wait.
    pub drain: std::sync::OnceLock<DrainHandle>,
    /// Set in `run` mode: the state of the supervised app process (down while it
    /// restarts).
    pub app_health: std::sync::OnceLock<crate::supervisor::AppHealth>,
    /// Set with `fal-sidecar run --keys`: the key check in front of this function.
    pub gate: std::sync::OnceLock<Gate>,
    /// Open WebSockets (a gateway gives each function its own).
    pub sockets: Arc<websocket::Sockets>,
    /// Set by a sidecar with `--max-concurrency` > 0: the call slots its workers, direct
    /// calls and WebSockets share (a gateway counts replica slots itself).
    pub slots: std::sync::OnceLock<Arc<crate::slots::Slots>>,
    open_tokens: std::sync::OnceLock<Authorizer>,
    jwks: Bytes,
}

/// The key check of a sidecar that serves one function by itself (`run --keys`); a
/// gateway checks keys before its handlers instead.
pub struct Gate {
    pub authorizer: Arc<Authorizer>,
    pub namespace: String,
    pub name: String,
    pub mode: AuthMode,
}

impl Gate {
    #[allow(clippy::result_large_err)] // the error is the response itself
    pub async fn check<B>(&self, req: &mut Request<B>) -> Result<(), Response<Body>> {
        let target = Target {
            namespace: &self.namespace,
            name: &self.name,
            mode: self.mode,
        };
        self.authorizer
            .check(target, req)
            .await
            .map_err(|d| refused(&d))
    }
}

/// The answer to a refused credential: 401 with `WWW-Authenticate: Key`, 403, or 429
/// with `Retry-After`; `{"detail": …}` says what is wrong. The connection closes: the
/// request body was not read.
pub fn refused(d: &Denial) -> Response<Body> {
    let mut r = closing(error(d.status(), &d.detail(), None));
    match d {
        Denial::Unauthenticated(_) => {
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Key"));
        }
        Denial::RateLimited { retry_after, .. } => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
        }
        Denial::Forbidden(_) => {}
    }
    r
}

/// Lets the admin `/drain` endpoint (a pod's preStop hook) stop this replica from
/// claiming and wait for its running requests, before Kubernetes stops the app.
pub struct DrainHandle {
    pub stop_claiming: tokio::sync::watch::Sender<bool>,
    pub running: crate::logs::Running,
    pub timeout: Duration,
}

impl App {
    pub fn new(
        store: Arc<dyn Store>,
        upstream: Option<Upstream>,
        signer: Arc<Signer>,
        policy: Arc<Policy>,
        cfg: ApiConfig,
        metrics: Arc<Metrics>,
    ) -> App {
        let jwks = Bytes::from(signer.jwks().to_string());
        let sockets = Arc::new(websocket::Sockets::new(
            metrics.websockets_open.clone(),
            metrics.websocket_upgrades.clone(),
        ));
        App {
            sockets,
            store,
            upstream,
            signer,
            policy,
            cfg,
            metrics,
            draining: AtomicBool::new(false),
            drain: std::sync::OnceLock::new(),
            app_health: std::sync::OnceLock::new(),
            gate: std::sync::OnceLock::new(),
            slots: std::sync::OnceLock::new(),
            open_tokens: std::sync::OnceLock::new(),
            jwks,
        }
    }

    /// Issues tokens to anyone (keys off): what `/tokens/` answers without `--keys`.
    fn open_tokens(&self) -> &Authorizer {
        self.open_tokens.get_or_init(|| {
            Authorizer::new(
                Arc::new(crate::auth::keys::KeyRing::new()),
                self.signer.clone(),
                Arc::new(crate::auth::ratelimit::MemoryLimiter::default()),
                false,
            )
        })
    }

    /// `/.well-known/jwks.json`: the public half of the webhook signing key.
    pub fn jwks(&self) -> Response<Body> {
        let mut r = Response::new(full(self.jwks.clone()));
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        r.headers_mut().insert(
            "cache-control",
            HeaderValue::from_static("public, max-age=300"),
        );
        r
    }
}

/// The run listener: `/.well-known/jwks.json`, `/fal/queue/*`, everything else to the app.
pub async fn handle_run(
    app: Arc<App>,
    conn: Arc<proxy::ConnState>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path();
    if path == "/.well-known/jwks.json" {
        return app.jwks();
    }
    if let Some(gate) = app.gate.get() {
        if tokens::is_tokens_path(path) {
            return Box::pin(tokens::handle(&gate.authorizer, req)).await;
        }
        if let Err(r) = gate.check(&mut req).await {
            return r;
        }
    }
    let path = req.uri().path();
    // The queue API's futures are boxed: a direct call's stays small (see `forward_to_app`).
    if path == "/fal/queue" || path.starts_with("/fal/queue/") {
        return Box::pin(queue::handle_per_app(&app, req, "")).await;
    }
    forward_to_app(&app, &conn, req).await
}

async fn forward_to_app(
    app: &App,
    conn: &proxy::ConnState,
    req: Request<Incoming>,
) -> Response<Body> {
    match &app.upstream {
        Some(up) if websocket::is_upgrade(req.headers()) => {
            // Boxed: a direct call's future, moved on every request, stays small.
            Box::pin(websocket::forward(app, up, req, None)).await
        }
        // A body over the limit is refused as such, whether or not a slot is free.
        Some(_)
            if proxy::declared_length(req.headers())
                .is_some_and(|n| n > app.cfg.max_body_bytes as u64) =>
        {
            closing(proxy::too_large(app.cfg.max_body_bytes))
        }
        Some(up) => match app.slots.get() {
            // A slot for the call until its response body is done, or 503 at once.
            Some(slots) => match slots.try_take() {
                Some(slot) => {
                    crate::slots::Holding::wrap_slot(proxy::forward(app, conn, up, req).await, slot)
                }
                None => {
                    app.metrics.direct_requests.inc();
                    closing(slots.full("call"))
                }
            },
            None => proxy::forward(app, conn, up, req).await,
        },
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this listener has no app to call",
            None,
        ),
    }
}

/// Drops the first `segments` path segments (the `{owner}/{alias}` of the run host):
/// `/{owner}/{alias}/x?q` becomes `/x?q`.
#[allow(clippy::result_large_err)] // the error is the response itself
pub fn strip_segments<B>(req: &mut Request<B>, segments: usize) -> Result<(), Response<Body>> {
    let path = req.uri().path();
    let rest: String = path
        .trim_start_matches('/')
        .splitn(segments + 1, '/')
        .nth(segments)
        .unwrap_or("")
        .to_string();
    let pq = match req.uri().query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    match pq.parse() {
        Ok(uri) => {
            *req.uri_mut() = uri;
            Ok(())
        }
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("the request target is not valid: {e}"),
            None,
        )),
    }
}

/// The queue-host listener (generation C).
pub async fn handle_queue_host(
    app: Arc<App>,
    _conn: Arc<proxy::ConnState>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if req.uri().path() == "/.well-known/jwks.json" {
        return app.jwks();
    }
    if let Some(gate) = app.gate.get() {
        if let Err(r) = gate.check(&mut req).await {
            return r;
        }
    }
    queue::handle_queue_host(&app, req, queue::AppIdRule::Fal).await
}

/// The run host (`fal.run` style, optional listener): `POST /{owner}/{alias}[/{path}]`
/// is proxied to the app's `/{path}` and answered synchronously, as `fal_client.run`
/// expects.
pub async fn handle_run_host(
    app: Arc<App>,
    conn: Arc<proxy::ConnState>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path();
    if path == "/.well-known/jwks.json" {
        return app.jwks();
    }
    // fal's clients fetch a token before every realtime connection: the run host (where
    // no app path can be `/tokens/`) answers it with keys off too (an unchecked token).
    if tokens::is_tokens_path(path) {
        return match app.gate.get() {
            Some(gate) => tokens::handle(&gate.authorizer, req).await,
            None => tokens::handle(app.open_tokens(), req).await,
        };
    }
    if let Some(gate) = app.gate.get() {
        if let Err(r) = gate.check(&mut req).await {
            return r;
        }
    }
    let path = req.uri().path();
    let Some(ns_len) = run_host_app_segments(path) else {
        let detail =
            format!("no endpoint at {path}; the run host serves /{{owner}}/{{alias}}[/{{path}}]");
        return error(StatusCode::NOT_FOUND, &detail, None);
    };
    if let Err(r) = strip_segments(&mut req, ns_len) {
        return r;
    }
    forward_to_app(&app, &conn, req).await
}

/// How many leading segments of a run-host path are the app id (`{owner}/{alias}`, or
/// `{ns}/{owner}/{alias}` after fal's namespace prefix `workflows` or `comfy`), or `None`
/// when the path names no app.
pub fn run_host_app_segments(path: &str) -> Option<usize> {
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(4, '/').collect();
    let ns_len = if matches!(segs.first(), Some(&"workflows") | Some(&"comfy")) {
        3
    } else {
        2
    };
    (segs.len() >= ns_len && segs[..ns_len].iter().all(|s| !s.is_empty())).then_some(ns_len)
}

/// The admin listener: metrics and probes.
pub async fn handle_admin(
    app: Arc<App>,
    _conn: Arc<proxy::ConnState>,
    req: Request<Incoming>,
) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => {
            let load = app.store.load().await.ok();
            let mut r = Response::new(full(app.metrics.render(load, now_ms())));
            r.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/drain" => drain(&app).await,
        // What this replica runs right now: a scaler removes the idlest replica first.
        // Open WebSockets count as running: a socket is a call in progress.
        "/load" => {
            let running = app.drain.get().map_or(0, |d| d.running.count()) + app.sockets.open();
            json(
                StatusCode::OK,
                &serde_json::json!({"running": running, "draining": app.draining.load(Ordering::Relaxed)}),
            )
        }
        "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/readyz" => ready(&app).await,
        _ => error(
            StatusCode::NOT_FOUND,
            "admin paths are /metrics, /healthz, /readyz, /load and /drain",
            None,
        ),
    }
}

/// Ready: not draining, the app accepts connections (when there is one), and the store
/// would take a submit now ([`crate::store::Store::ready`]: a probe write the way a submit
/// goes, confirmed by `--store-replicas` replicas), so a replica is routed traffic only
/// once it can store it, and stops being routed while it cannot.
async fn ready(app: &App) -> Response<Body> {
    if app.draining.load(Ordering::Relaxed) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining: this sidecar is shutting down",
            None,
        );
    }
    if let Some(state) = app.app_health.get().map(|h| h.state()) {
        if let Some(reason) = state.down_reason() {
            return app_down(
                &state,
                reason,
                StatusCode::SERVICE_UNAVAILABLE,
                "app_restarting",
            );
        }
    }
    if let Some(up) = &app.upstream {
        if !up.reachable().await {
            let detail = format!("the app is not accepting connections on {}", up.authority());
            return error(StatusCode::SERVICE_UNAVAILABLE, &detail, None);
        }
    }
    match app.store.ready().await {
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("not ready: the queue store cannot take a submit now ({e})"),
            Some("store_unavailable"),
        ),
        Ok(()) => json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
    }
}

/// The app process is down or restarting (`run` mode): `{"detail", "error_type",
/// "app": {state, restarts, last_exit, port}}` with `Retry-After`. `error_type` is
/// `app_restarting`, or `runner_disconnected` when the app died during the call.
pub fn app_down(
    state: &crate::supervisor::AppState,
    detail: String,
    status: StatusCode,
    error_type: &'static str,
) -> Response<Body> {
    let v = serde_json::json!({
        "detail": detail,
        "error_type": error_type,
        "app": state.json(),
    });
    let mut r = json(status, &v);
    r.headers_mut()
        .insert("x-fal-error-type", HeaderValue::from_static(error_type));
    r.headers_mut()
        .insert("retry-after", HeaderValue::from(state.retry_after_secs()));
    r
}

/// Stops claiming, fails readiness, and waits (up to the drain timeout) until this
/// process runs no request. Idempotent; SIGTERM afterwards finishes the shutdown.
async fn drain(app: &App) -> Response<Body> {
    let Some(d) = app.drain.get() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready to drain yet",
            None,
        );
    };
    app.draining.store(true, Ordering::Relaxed);
    let _ = d.stop_claiming.send(true);
    let deadline = tokio::time::Instant::now() + d.timeout;
    let busy = || d.running.count() + app.sockets.open();
    while busy() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Open WebSockets run until the deadline; then they are cut.
    if app.sockets.open() > 0 {
        app.sockets.cut_all();
    }
    let left = d.running.count();
    json(
        StatusCode::OK,
        &serde_json::json!({"drained": left == 0, "in_flight": left}),
    )
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Body::full(b)
}

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

/// A gateway-made error: `{"detail", "error_type"?}` plus `X-Fal-Error-Type`.
pub fn error(status: StatusCode, detail: &str, error_type: Option<&str>) -> Response<Body> {
    let mut v = serde_json::json!({"detail": detail});
    if let Some(t) = error_type {
        v["error_type"] = t.into();
    }
    let mut r = json(status, &v);
    if let Some(t) = error_type.and_then(|t| HeaderValue::from_str(t).ok()) {
        r.headers_mut().insert("x-fal-error-type", t);
    }
    r
}

/// Marks a response as the last on its connection (used when the request body was left
/// unread, so the client does not reuse a connection the server is about to close).
pub fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}
