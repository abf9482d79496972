//! The queue API of all three protocol generations (see PROTOCOL.md):
//! - A: `/fal/queue/submit/{path}`, `/fal/queue/{id}/get`, `/fal/queue/{id}/cancel`
//! - B: `/fal/queue/submit[/{path}]`, `/fal/queue/requests/{id}/status|response|cancel`
//! - C: the queue host, `/{owner}/{alias}[/{path}]` and `/…/requests/{id}[/status[/stream]|/cancel]`

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};

use super::options::SubmitOptions;
use super::{error, json, App};
use crate::auth::Principal;
use crate::job::{id_timestamp_ms, new_id, now_ms, Idempotency, JobSpec, Phase, StoredResult};
use crate::store::{CancelOutcome, JobStatus, StoreError, Submitted};
use crate::upstream::{is_hop_by_hop, is_length_limit, Body, BoxError};

/// Headers the sidecar consumes at submit (not forwarded to the app).
const CONSUMED: &[&str] = &[
    "host",
    "content-length",
    "x-fal-queue-priority",
    "x-fal-request-timeout",
    "x-fal-no-retry",
    "idempotency-key",
];

/// Longest Idempotency-Key accepted (Stripe's limit).
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The `Idempotency-Key` header (IETF httpapi draft: a structured-field string, so
/// `"abc"`; the bare `abc` that Stripe-style clients send is accepted too).
pub fn idempotency_key(raw: &[u8]) -> Result<&str, String> {
    let v = std::str::from_utf8(raw)
        .map_err(|_| "Idempotency-Key must be ASCII text".to_string())?
        .trim();
    let v = match v.strip_prefix('"') {
        Some(rest) => rest
            .strip_suffix('"')
            .ok_or_else(|| "Idempotency-Key opens a quote it does not close".to_string())?,
        None => v,
    };
    if v.is_empty() {
        return Err(
            "Idempotency-Key is empty; send a unique value per logical request, e.g. a UUID".into(),
        );
    }
    if v.len() > MAX_IDEMPOTENCY_KEY {
        return Err(format!(
            "Idempotency-Key is {} characters long; the limit is {MAX_IDEMPOTENCY_KEY}",
            v.len()
        ));
    }
    if !v
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        return Err(
            "Idempotency-Key may hold printable ASCII only (no quotes or backslashes)".into(),
        );
    }
    Ok(v)
}

/// Absolute URLs of one request, as clients follow them verbatim.
struct Urls {
    response: String,
}

impl Urls {
    fn status(&self) -> String {
        format!("{}/status", self.response)
    }
    fn cancel(&self) -> String {
        format!("{}/cancel", self.response)
    }
}

/// `scheme://host` as the client sees us (honours `X-Forwarded-Proto/Host`).
fn base_url(headers: &HeaderMap) -> String {
    let first = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let proto = first("x-forwarded-proto")
        .filter(|p| p == "http" || p == "https")
        .unwrap_or_else(|| "http".into());
    // A host that could smuggle a path or query into the URLs clients follow is ignored.
    let sane = |h: &String| {
        h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c))
    };
    let host = first("x-forwarded-host")
        .filter(sane)
        .or_else(|| first("host").filter(sane))
        .unwrap_or_else(|| "localhost".into());
    format!("{proto}://{host}")
}

fn trimmed(path: &str) -> &str {
    let t = path.trim_end_matches('/');
    if t.is_empty() {
        "/"
    } else {
        t
    }
}

fn query_flag(query: Option<&str>, name: &str) -> bool {
    url::form_urlencoded::parse(query.unwrap_or("").as_bytes()).any(|(k, v)| {
        k == name && matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
    })
}

/// The request id in a path, in the one spelling the store knows (the lowercase
/// hyphenated UUID that submit hands out), or `None` if it is not a UUID at all. Other
/// spellings of the same UUID (upper case, braced, `urn:uuid:`, no hyphens) address the
/// same request.
pub fn parse_request_id(id: &str) -> Option<String> {
    uuid::Uuid::parse_str(id)
        .ok()
        .map(|u| u.hyphenated().to_string())
}

fn bad_id(id: &str) -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        &format!("{id:?} is not a request id; use the request_id returned by submit"),
        None,
    )
}

/// What a queue API request asks for, read from its method and path alone (the pure
/// part of [`handle_per_app`] and [`handle_queue_host`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Enqueue a call of the app's `endpoint` (a path starting with `/`).
    Submit {
        endpoint: String,
    },
    /// Generation A's `…/{id}/get`: 202 while pending, then the app's response.
    Get {
        id: String,
    },
    Status {
        id: String,
        stream: bool,
    },
    Result {
        id: String,
    },
    Cancel {
        id: String,
    },
    /// Something that is not a request id stands where one must (400).
    BadId(String),
    /// A known endpoint with the wrong method (405).
    MethodNotAllowed,
    /// Generation C: `…/requests/…` that matches no request endpoint (404).
    NoRequestEndpoint,
    /// No endpoint at this path (404).
    NotFound,
}

impl Route {
    fn with_id(id: &str, f: impl FnOnce(String) -> Route) -> Route {
        match parse_request_id(id) {
            Some(id) => f(id),
            None => Route::BadId(id.to_string()),
        }
    }
}

/// Routes `/fal/queue/*` (generations A and B) under `mount` (`""`, or the gateway's
/// `/{namespace}/{name}`). A trailing slash is ignored.
pub fn route_per_app(m: &Method, path: &str, mount: &str) -> Route {
    let path = trimmed(path);
    // Whole segments only: `/ns/namex` is not under `/ns/name`, nor `/fal/queuex`
    // under `/fal/queue`.
    fn under<'p>(p: &'p str, prefix: &str) -> Option<&'p str> {
        let rest = p.strip_prefix(prefix)?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }
    let Some(rest) = under(path, mount).and_then(|p| under(p, "/fal/queue")) else {
        return Route::NotFound;
    };
    let rest = rest.trim_start_matches('/');
    let segs: Vec<&str> = if rest.is_empty() {
        vec![]
    } else {
        rest.split('/').collect()
    };
    let (get, post, put) = (m == Method::GET, m == Method::POST, m == Method::PUT);
    match segs.as_slice() {
        ["submit", tail @ ..] if post => Route::Submit {
            endpoint: format!("/{}", tail.join("/")),
        },
        [id, "get"] if get || post => Route::with_id(id, |id| Route::Get { id }),
        [id, "cancel"] if post || put => Route::with_id(id, |id| Route::Cancel { id }),
        ["requests", id, "status"] if get => {
            Route::with_id(id, |id| Route::Status { id, stream: false })
        }
        ["requests", id, "status", "stream"] if get => {
            Route::with_id(id, |id| Route::Status { id, stream: true })
        }
        ["requests", id] | ["requests", id, "response"] if get => {
            Route::with_id(id, |id| Route::Result { id })
        }
        ["requests", id, "cancel"] if put || post => Route::with_id(id, |id| Route::Cancel { id }),
        ["submit", ..] | [_, "get"] | [_, "cancel"] | ["requests", ..] => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// How the queue host finds the app id at the start of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppIdRule {
    /// fal's: `{owner}/{alias}`, or `{ns}/{owner}/{alias}` when the first segment is the
    /// namespace prefix `workflows` or `comfy` (a sidecar's own queue host).
    Fal,
    /// Exactly `{namespace}/{name}`, whatever the namespace is called (the gateway: a
    /// FalFunction's address; a Kubernetes namespace may well be named `workflows`).
    NamespaceName,
}

/// A generation C request: the app it addresses and what it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    /// `[ns/]owner/alias`: the prefix of the URLs handed out.
    pub app_id: String,
    /// The webhook user id.
    pub owner: String,
    pub route: Route,
}

/// Routes a queue-host path (generation C); `None` when it names no app. Empty
/// segments and a trailing slash are ignored.
pub fn route_queue_host(m: &Method, path: &str, rule: AppIdRule) -> Option<HostRoute> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let ns_len = match (rule, segs.first()) {
        (AppIdRule::Fal, Some(&"workflows") | Some(&"comfy")) => 3,
        _ => 2,
    };
    if segs.len() < ns_len {
        return None;
    }
    let app_id = segs[..ns_len].join("/");
    let owner = segs[ns_len - 2].to_string();
    let rest = &segs[ns_len..];
    let get = m == Method::GET;
    let route = if m == Method::POST {
        Route::Submit {
            endpoint: format!("/{}", rest.join("/")),
        }
    } else {
        match rest {
            ["requests", id] if get => Route::with_id(id, |id| Route::Result { id }),
            ["requests", id, "status"] if get => {
                Route::with_id(id, |id| Route::Status { id, stream: false })
            }
            ["requests", id, "status", "stream"] if get => {
                Route::with_id(id, |id| Route::Status { id, stream: true })
            }
            ["requests", id, "cancel"] if m == Method::PUT => {
                Route::with_id(id, |id| Route::Cancel { id })
            }
            ["requests", ..] => Route::NoRequestEndpoint,
            [] if !get => Route::MethodNotAllowed,
            _ => Route::NotFound,
        }
    };
    Some(HostRoute {
        app_id,
        owner,
        route,
    })
}

/// The tenant of the key that sent `req` (`None`: no key).
fn caller<B>(req: &Request<B>) -> Option<String> {
    req.extensions()
        .get::<Principal>()
        .map(|p| p.tenant().to_string())
}

/// 404 for a request another tenant submitted: the same answer as for an unknown id,
/// so ids of other tenants cannot even be confirmed.
fn hidden(app: &App, id: &str) -> Response<Body> {
    json(StatusCode::NOT_FOUND, &not_found(app, id))
}

fn not_found(app: &App, id: &str) -> Value {
    let retention = app.cfg.retention.as_secs();
    let expired =
        id_timestamp_ms(id).is_some_and(|t| t + app.cfg.retention.as_millis() as u64 <= now_ms());
    let detail = if expired {
        format!("request {id} is older than the retention period ({retention} s); its result was deleted")
    } else {
        format!("request {id} not found; check the id (results are kept for {retention} s)")
    };
    json!({"status": "NOT_FOUND", "detail": detail})
}

/// `/fal/queue/*` on the run listener (generations A and B). `mount` is the path the
/// per-app API sits under (`""` on a sidecar, `/{namespace}/{name}` on the gateway's
/// run listener): it is stripped from the path and kept in the URLs handed out.
pub async fn handle_per_app(app: &App, req: Request<Incoming>, mount: &str) -> Response<Body> {
    let m = req.method().clone();
    let path = trimmed(req.uri().path()).to_string();
    let route = route_per_app(&m, &path, mount);
    let base = format!("{}{mount}/fal/queue/requests", base_url(req.headers()));
    let urls = |id: &str| Urls {
        response: format!("{base}/{id}"),
    };
    let logs = query_flag(req.uri().query(), "logs");
    let who = caller(&req);
    let who = who.as_deref();
    match route {
        Route::Submit { endpoint } => {
            let owner = app.cfg.owner.clone();
            submit(app, req, endpoint, owner, base).await
        }
        Route::Get { id } => gen_a_get(app, &id, who).await,
        Route::Cancel { id } => cancel(app, &id, who).await,
        Route::Status { id, stream: false } => status(app, &id, logs, urls(&id), who).await,
        Route::Status { id, stream: true } => self::stream(app, &id, logs, urls(&id), who).await,
        Route::Result { id } => result(app, &id, who).await,
        Route::BadId(id) => bad_id(&id),
        Route::MethodNotAllowed => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{m} is not allowed on {path}; see the fal queue API (submit is POST, status GET, cancel PUT)"),
            None,
        ),
        Route::NoRequestEndpoint | Route::NotFound => error(
            StatusCode::NOT_FOUND,
            &format!(
                "no queue endpoint at {path}; use POST /fal/queue/submit/{{path}}, GET /fal/queue/requests/{{id}}/status, \
                 GET /fal/queue/requests/{{id}}, PUT /fal/queue/requests/{{id}}/cancel or GET /fal/queue/{{id}}/get"
            ),
            None,
        ),
    }
}

/// The queue host (generation C); `rule` says where the app id ends.
pub async fn handle_queue_host(
    app: &App,
    req: Request<Incoming>,
    rule: AppIdRule,
) -> Response<Body> {
    let m = req.method().clone();
    let path = trimmed(req.uri().path()).to_string();
    let Some(HostRoute {
        app_id,
        owner,
        route,
    }) = route_queue_host(&m, &path, rule)
    else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no endpoint at {path}; the queue host serves /{{owner}}/{{alias}}[/{{path}}] and /{{owner}}/{{alias}}/requests/{{id}}"),
            None,
        );
    };
    let base = format!("{}/{app_id}/requests", base_url(req.headers()));
    let urls = |id: &str| Urls {
        response: format!("{base}/{id}"),
    };
    let logs = query_flag(req.uri().query(), "logs");
    let who = caller(&req);
    let who = who.as_deref();
    match route {
        Route::Submit { endpoint } => submit(app, req, endpoint, owner, base).await,
        Route::Result { id } => result(app, &id, who).await,
        Route::Status { id, stream: false } => status(app, &id, logs, urls(&id), who).await,
        Route::Status { id, stream: true } => self::stream(app, &id, logs, urls(&id), who).await,
        Route::Cancel { id } => cancel(app, &id, who).await,
        Route::BadId(id) => bad_id(&id),
        Route::NoRequestEndpoint | Route::Get { .. } => error(
            StatusCode::NOT_FOUND,
            &format!("no endpoint at {path}: use GET …/requests/{{id}}, GET …/requests/{{id}}/status[/stream] or PUT …/requests/{{id}}/cancel"),
            None,
        ),
        Route::MethodNotAllowed => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{m} {path}: submit a request with POST /{app_id}[/{{path}}]"),
            None,
        ),
        Route::NotFound => error(
            StatusCode::NOT_FOUND,
            &format!("no endpoint at {m} {path}: submit with POST /{app_id}[/{{path}}], read with GET /{app_id}/requests/{{id}}[/status]"),
            None,
        ),
    }
}

fn store_error(e: StoreError) -> Response<Body> {
    match e {
        StoreError::IdempotencyMismatch(first) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "this Idempotency-Key was already used for a different request ({first}: another endpoint, query or body); \
                 use a new key for a new request"
            ),
            Some("idempotency_key_reused"),
        ),
        StoreError::IdempotencyPending => {
            let mut r = error(
                StatusCode::CONFLICT,
                "a submit with this Idempotency-Key is still being stored; retry shortly to get its request id",
                Some("idempotency_key_in_use"),
            );
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            r
        }
        StoreError::QueueFull(n) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("the queue is full ({n} requests waiting); retry later"),
                Some("queue_full"),
            );
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("5"));
            r
        }
        StoreError::Unavailable(why) => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the queue store is unavailable ({why}); nothing was lost, retry shortly"),
                Some("store_unavailable"),
            );
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            r
        }
        other => error(StatusCode::INTERNAL_SERVER_ERROR, &other.to_string(), None),
    }
}

async fn submit(
    app: &App,
    req: Request<Incoming>,
    endpoint: String,
    owner: String,
    base: String,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    // A request sent with a key belongs to the key's namespace: its webhook names that
    // tenant, its Idempotency-Keys are the tenant's own, and only the tenant reads it.
    let tenant = parts
        .extensions
        .get::<Principal>()
        .map(|p| p.tenant().to_string());
    let owner = tenant.clone().unwrap_or(owner);
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    // Read the body before anything can be refused: an unread body would force the
    // connection closed under a client that means to reuse it.
    let max = app.cfg.max_body_bytes;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is larger than the limit of {max} bytes (--max-body-bytes)"),
            None,
        )
    };
    let declared = header("content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        app.metrics.rejected.with_label_values(&["too_large"]).inc();
        return super::closing(too_large());
    }
    let body = match Limited::new(body, max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if is_length_limit(e.as_ref()) => {
            app.metrics.rejected.with_label_values(&["too_large"]).inc();
            return super::closing(too_large());
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body failed: {e}"),
                None,
            )
        }
    };

    let (priority, start_deadline_ms, no_retry) = match SubmitOptions::from_headers(&parts.headers)
    {
        Ok(o) => (o.priority, o.start_deadline_ms(now_ms()), o.no_retry),
        Err(detail) => return error(StatusCode::BAD_REQUEST, &detail, None),
    };
    let idempotency = match parts.headers.get("idempotency-key") {
        None => None,
        Some(v) => match idempotency_key(v.as_bytes()) {
            Ok(key) => Some(Idempotency::new(
                &owner,
                key,
                &endpoint,
                parts.uri.query().unwrap_or(""),
                &body,
            )),
            Err(why) => return error(StatusCode::BAD_REQUEST, &why, None),
        },
    };

    // `fal_webhook` is ours; every other query parameter goes to the app untouched.
    let mut webhook = None;
    let mut forwarded = Vec::new();
    for piece in parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match url::form_urlencoded::parse(piece.as_bytes()).next() {
            Some((k, v)) if k == "fal_webhook" => webhook = Some(v.into_owned()),
            _ => forwarded.push(piece),
        }
    }
    let webhook_url = match webhook {
        Some(w) => match app.policy.check_url(&w).await {
            Ok(u) => Some(u.to_string()),
            Err(why) => {
                app.metrics.rejected.with_label_values(&["webhook"]).inc();
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("fal_webhook refused: {why}"),
                    None,
                );
            }
        },
        None => None,
    };

    let headers = parts
        .headers
        .iter()
        .filter(|(k, _)| !is_hop_by_hop(k.as_str()) && !CONSUMED.contains(&k.as_str()))
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_string(), v.to_string()))
        })
        .collect();
    let spec = JobSpec {
        id: new_id(),
        owner,
        endpoint,
        query: (!forwarded.is_empty()).then(|| forwarded.join("&")),
        method: "POST".into(),
        headers,
        priority,
        start_deadline_ms,
        webhook_url,
        no_retry,
        submitted_at_ms: now_ms(),
        idempotency,
        tenant,
    };
    match app.store.submit(spec, body, app.cfg.max_queue).await {
        Ok(Submitted {
            id,
            position,
            replayed,
        }) => {
            if !replayed {
                app.metrics
                    .submits
                    .with_label_values(&[priority.as_str()])
                    .inc();
            }
            let u = Urls {
                response: format!("{base}/{id}"),
            };
            let mut r = json(
                StatusCode::OK,
                &json!({
                    "status": "IN_QUEUE",
                    "request_id": id,
                    "response_url": u.response,
                    "status_url": u.status(),
                    "cancel_url": u.cancel(),
                    "queue_position": position,
                }),
            );
            if let Ok(v) = HeaderValue::from_str(&id) {
                r.headers_mut().insert("x-fal-request-id", v);
            }
            if replayed {
                // Stripe's name for it: the answer is the first submit's, nothing new ran.
                r.headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            r
        }
        Err(e) => {
            let reason = match e {
                StoreError::QueueFull(_) => "queue_full",
                StoreError::IdempotencyMismatch(_) | StoreError::IdempotencyPending => {
                    "idempotency"
                }
                _ => "store",
            };
            app.metrics.rejected.with_label_values(&[reason]).inc();
            store_error(e)
        }
    }
}

fn status_value(st: &JobStatus, logs: bool, urls: &Urls) -> Value {
    let rec = &st.record;
    let mut v = json!({
        "status": rec.phase.wire(),
        "request_id": rec.spec.id,
        "response_url": urls.response,
        "status_url": urls.status(),
        "cancel_url": urls.cancel(),
    });
    let logs_value = || if logs { json!(rec.logs) } else { Value::Null };
    match rec.phase {
        Phase::Queued => v["queue_position"] = json!(st.queue_position.unwrap_or(0)),
        Phase::Running => v["logs"] = logs_value(),
        Phase::Completed => {
            v["logs"] = logs_value();
            let c = rec.completion.clone().unwrap_or_default();
            v["metrics"] = json!({"inference_time": c.inference_time});
            if let Some(e) = c.error {
                v["error"] = e.into();
            }
            if let Some(t) = c.error_type {
                v["error_type"] = t.into();
            }
        }
    }
    v
}

fn with_request_id(mut r: Response<Body>, id: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert("x-fal-request-id", v);
    }
    r
}

async fn status(app: &App, id: &str, logs: bool, urls: Urls, who: Option<&str>) -> Response<Body> {
    match app.store.status(id).await {
        Ok(Some(st)) if !st.record.spec.visible_to(who) => hidden(app, id),
        Ok(Some(st)) => {
            let code = if st.record.phase == Phase::Completed {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            with_request_id(json(code, &status_value(&st, logs, &urls)), id)
        }
        Ok(None) => json(StatusCode::NOT_FOUND, &not_found(app, id)),
        Err(e) => store_error(e),
    }
}

fn replay(id: &str, r: StoredResult) -> Response<Body> {
    let mut resp = Response::new(super::full(r.body));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (k, v) in &r.headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            resp.headers_mut().append(k, v);
        }
    }
    with_request_id(resp, id)
}

async fn result(app: &App, id: &str, who: Option<&str>) -> Response<Body> {
    match app.store.status(id).await {
        Ok(Some(st)) if !st.record.spec.visible_to(who) => hidden(app, id),
        Ok(Some(st)) if st.record.phase == Phase::Completed => match app.store.result(id).await {
            Ok(Some(r)) => replay(id, r),
            Ok(None) => json(StatusCode::NOT_FOUND, &not_found(app, id)),
            Err(e) => store_error(e),
        },
        Ok(Some(st)) => {
            let detail = format!(
                "request {id} is not completed yet (status {}); poll its status_url, then fetch the result",
                st.record.phase.wire()
            );
            with_request_id(
                json(
                    StatusCode::BAD_REQUEST,
                    &json!({"detail": detail, "status": st.record.phase.wire()}),
                ),
                id,
            )
        }
        Ok(None) => json(StatusCode::NOT_FOUND, &not_found(app, id)),
        Err(e) => store_error(e),
    }
}

/// Generation A: 202 with the status while pending, the app's own response once done.
async fn gen_a_get(app: &App, id: &str, who: Option<&str>) -> Response<Body> {
    match app.store.status(id).await {
        Ok(Some(st)) if !st.record.spec.visible_to(who) => hidden(app, id),
        Ok(Some(st)) => match st.record.phase {
            Phase::Queued => with_request_id(
                json(
                    StatusCode::ACCEPTED,
                    &json!({"status": "IN_QUEUE", "queue_position": st.queue_position.unwrap_or(0)}),
                ),
                id,
            ),
            Phase::Running => with_request_id(
                json(StatusCode::ACCEPTED, &json!({"status": "IN_PROGRESS"})),
                id,
            ),
            Phase::Completed => result(app, id, who).await,
        },
        Ok(None) => json(StatusCode::NOT_FOUND, &not_found(app, id)),
        Err(e) => store_error(e),
    }
}

async fn cancel(app: &App, id: &str, who: Option<&str>) -> Response<Body> {
    // Another tenant's request is not found, whatever its state.
    match app.store.status(id).await {
        Ok(Some(st)) if !st.record.spec.visible_to(who) => return hidden(app, id),
        Err(e) => return store_error(e),
        _ => {}
    }
    let r = match app.store.cancel(id).await {
        Ok(CancelOutcome::Removed) | Ok(CancelOutcome::Running { .. }) => json(
            StatusCode::ACCEPTED,
            &json!({"status": "CANCELLATION_REQUESTED"}),
        ),
        Ok(CancelOutcome::AlreadyCompleted) => json(
            StatusCode::BAD_REQUEST,
            &json!({"status": "ALREADY_COMPLETED", "detail": format!("request {id} already completed; nothing to cancel")}),
        ),
        Ok(CancelOutcome::NotFound) => json(StatusCode::NOT_FOUND, &not_found(app, id)),
        Err(e) => return store_error(e),
    };
    with_request_id(r, id)
}

/// Server-sent events: one `data:` per status change, keep-alive comments, closed only
/// after COMPLETED was sent.
async fn stream(app: &App, id: &str, logs: bool, urls: Urls, who: Option<&str>) -> Response<Body> {
    match app.store.status(id).await {
        Ok(Some(st)) if !st.record.spec.visible_to(who) => return hidden(app, id),
        Ok(Some(_)) => {}
        Ok(None) => return json(StatusCode::NOT_FOUND, &not_found(app, id)),
        Err(e) => return store_error(e),
    }
    struct State {
        store: std::sync::Arc<dyn crate::store::Store>,
        changes: tokio::sync::watch::Receiver<u64>,
        id: String,
        logs: bool,
        urls: Urls,
        last: Option<String>,
        done: bool,
    }
    let state = State {
        store: app.store.clone(),
        changes: app.store.changes(),
        id: id.to_string(),
        logs,
        urls,
        last: None,
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            s.changes.borrow_and_update();
            let frame = match s.store.status(&s.id).await {
                Ok(Some(st)) => {
                    let text = status_value(&st, s.logs, &s.urls).to_string();
                    if s.last.as_deref() != Some(text.as_str()) {
                        s.done = st.record.phase == Phase::Completed;
                        let f = format!("data: {text}\n\n");
                        s.last = Some(text);
                        Some(f)
                    } else {
                        None
                    }
                }
                Ok(None) => {
                    s.done = true;
                    Some(format!(
                        "event: error\ndata: {}\n\n",
                        json!({"detail": "request not found"})
                    ))
                }
                Err(e) => Some(format!(": store error: {e}\n\n")),
            };
            if let Some(f) = frame {
                return Some((Ok::<_, BoxError>(Frame::data(Bytes::from(f))), s));
            }
            if tokio::time::timeout(Duration::from_secs(15), s.changes.changed())
                .await
                .is_err()
            {
                return Some((Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))), s));
            }
        }
    });
    let mut r = Response::new(Body::Boxed(StreamBody::new(events).boxed_unsync()));
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    with_request_id(r, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_honours_forwarding_headers() {
        let mut h = HeaderMap::new();
        h.insert("host", "127.0.0.1:8081".parse().unwrap());
        assert_eq!(base_url(&h), "http://127.0.0.1:8081");
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert(
            "x-forwarded-host",
            "queue.example.com, proxy".parse().unwrap(),
        );
        assert_eq!(base_url(&h), "https://queue.example.com");
        h.insert("x-forwarded-host", "evil.com/path?".parse().unwrap());
        assert_eq!(base_url(&h), "https://127.0.0.1:8081");
    }

    #[test]
    fn idempotency_key_forms() {
        assert_eq!(idempotency_key(b"abc-123").unwrap(), "abc-123");
        assert_eq!(idempotency_key(b" \"abc-123\" ").unwrap(), "abc-123");
        assert_eq!(idempotency_key(b"with space").unwrap(), "with space");
        for (raw, why) in [
            (&b""[..], "empty"),
            (b"\"\"", "empty"),
            (b"\"open", "quote"),
            (b"a\"b", "printable"),
            (b"tab\there", "printable"),
            (b"caf\xc3\xa9", "printable"),
            (b"\xff", "ASCII"),
        ] {
            let e = idempotency_key(raw).unwrap_err();
            assert!(e.contains(why), "{raw:?}: {e}");
        }
        assert!(idempotency_key(&[b'k'; 255]).is_ok());
        assert!(idempotency_key(&[b'k'; 256]).unwrap_err().contains("255"));
    }

    #[test]
    fn logs_flag_accepts_both_client_styles() {
        assert!(query_flag(Some("logs=1"), "logs"));
        assert!(query_flag(Some("a=b&logs=true"), "logs"));
        assert!(!query_flag(Some("logs=0"), "logs"));
        assert!(!query_flag(Some("logs=false"), "logs"));
        assert!(!query_flag(None, "logs"));
    }
}
