//! From a request to a function: the run and queue listeners' handlers, the path and
//! `Host` forms that name a function, the key check, and the sync call forwarded to a
//! replica (sent again when the replica refuses it without running it).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use fal_sidecar::api::proxy::{self, ConnState};
use fal_sidecar::api::{self as api, error};
use fal_sidecar::auth::Target;
use fal_sidecar::job::now_ms;
use fal_sidecar::slots::Holding;
use fal_sidecar::upstream::Body;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Incoming};

use super::slots::{acquire, refused, ReplicaSlot, SlotGuard, Wait};
use super::{Entry, Gateway, Replica, REPLAY_BODY_BYTES};
use crate::function::is_dns_label;

/// Request kinds counted per function.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    Sync = 0,
    Queue = 1,
    PerApp = 2,
}

impl Kind {
    /// The `kind` label of `fal_gateway_requests_total`, by `Kind as usize`.
    pub(super) const LABELS: [&'static str; 3] = ["sync", "queue", "per_app"];
}

impl Gateway {
    /// While terminating (the shutdown delay), every answer closes its connection: a
    /// client's kept-alive connection goes to another gateway next time, while new
    /// connections that still arrive here are served.
    fn close_when_terminating(&self, mut resp: Response<Body>) -> Response<Body> {
        if self.terminating.load(Ordering::Relaxed)
            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
        {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    fn jwks(&self) -> Response<Body> {
        let mut r = Response::new(Body::full(self.signer.jwks().to_string()));
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        r
    }

    /// The function a `Host: {name}.{namespace}.{domain}` header names.
    fn host_function(&self, headers: &HeaderMap) -> Option<(String, String)> {
        let domain = self.cfg.domain.as_deref()?;
        function_from_host(domain, headers.get("host")?.to_str().ok()?)
    }

    /// The function's entry, or a 404 that closes the connection: the request body is
    /// left unread, and a client that reuses the connection must not race hyper closing
    /// it.
    #[allow(clippy::result_large_err)] // the error is the response itself
    fn lookup(&self, ns: &str, name: &str) -> Result<Arc<Entry>, Response<Body>> {
        self.find(ns, name).map_err(fal_sidecar::api::closing)
    }

    #[allow(clippy::result_large_err)] // the error is the response itself
    fn find(&self, ns: &str, name: &str) -> Result<Arc<Entry>, Response<Body>> {
        if !is_dns_label(ns) || !is_dns_label(name) {
            return Err(error(
                StatusCode::NOT_FOUND,
                &format!(
                    "{ns:?}/{name:?} is not a function address: use /{{namespace}}/{{name}}[/{{path}}] with the FalFunction's namespace and name"
                ),
                None,
            ));
        }
        self.entry(&format!("{ns}/{name}")).ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no function {ns}/{name}: apply a FalFunction named {name:?} in namespace {ns:?} (kubectl get falfunctions -n {ns})"
                ),
                None,
            )
        })
    }

    pub(super) fn count(&self, entry: &Entry, kind: Kind) {
        entry.counters[kind as usize]
            .get_or_init(|| {
                let kind = Kind::LABELS[kind as usize];
                self.metrics
                    .requests
                    .with_label_values(&[entry.key.as_str(), kind])
            })
            .inc();
        // Read first: no write to the shared line while it is already set.
        if !entry.active.load(Ordering::Relaxed) {
            entry.active.store(true, Ordering::Relaxed);
        }
    }

    /// The key check of a request to `entry` (see
    /// [`Authorizer::check`](fal_sidecar::auth::Authorizer::check)): refused with
    /// 401/403/429, or admitted with its principal set and its credential removed.
    #[allow(clippy::result_large_err)] // the error is the response itself
    async fn admit(
        &self,
        entry: &Entry,
        req: &mut Request<Incoming>,
    ) -> Result<(), Response<Body>> {
        let mode = entry.info.read().unwrap_or_else(|e| e.into_inner()).auth;
        let (namespace, name) = entry.key.split_once('/').unwrap_or((&entry.key, ""));
        let target = Target {
            namespace,
            name,
            mode,
        };
        self.auth
            .check(target, req)
            .await
            .map_err(|d| api::refused(&d))
    }
}

/// `(namespace, name)` of a `Host: {name}.{namespace}.{domain}[:port]` (the per-app
/// host). Host names are case-insensitive and may end in a dot (`….example.com.`), so
/// both are compared without case and trailing dots; the names come back lower case.
pub fn function_from_host(domain: &str, host: &str) -> Option<(String, String)> {
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_matches('.').to_ascii_lowercase();
    if domain.is_empty() {
        return None;
    }
    let sub = host.strip_suffix(&domain)?.strip_suffix('.')?;
    let (name, ns) = sub.split_once('.')?;
    Some((ns.to_string(), name.to_string()))
}

/// `/{namespace}/{name}` and the rest of a path.
pub fn split_function(path: &str) -> Option<(&str, &str, &str)> {
    let p = path.strip_prefix('/')?;
    let (ns, rest) = p.split_once('/').unwrap_or((p, ""));
    let (name, rest) = rest.split_once('/').map_or((rest, ""), |(n, r)| (n, r));
    if ns.is_empty() || name.is_empty() {
        return None;
    }
    Some((ns, name, rest))
}

/// Whether the rest of a path after `/{namespace}/{name}` is the per-app queue API.
pub fn is_queue_path(rest: &str) -> bool {
    rest == "fal/queue" || rest.starts_with("fal/queue/")
}

/// The run listener: sync calls (`fal.run` style) and the per-app queue API
/// (generations A and B) under `/{namespace}/{name}`, or on the function's own host.
pub async fn handle_run(
    gw: Arc<Gateway>,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Response<Body> {
    let resp = route_run(gw.clone(), conn, req).await;
    gw.close_when_terminating(resp)
}

async fn route_run(
    gw: Arc<Gateway>,
    conn: Arc<ConnState>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if req.uri().path() == "/.well-known/jwks.json" {
        return gw.jwks();
    }
    if let Some((ns, name)) = gw.host_function(req.headers()) {
        let entry = match gw.lookup(&ns, &name) {
            Ok(e) => e,
            Err(r) => return r,
        };
        if let Err(r) = gw.admit(&entry, &mut req).await {
            return r;
        }
        if is_queue_path(req.uri().path().trim_start_matches('/')) {
            gw.count(&entry, Kind::PerApp);
            return Box::pin(api::queue::handle_per_app(&entry.app, req, "")).await;
        }
        return sync_call(&gw, entry, &conn, req).await;
    }
    if api::tokens::is_tokens_path(req.uri().path()) {
        return Box::pin(api::tokens::handle(&gw.auth, req)).await;
    }
    let path = req.uri().path().to_string();
    let Some((ns, name, rest)) = split_function(&path) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no endpoint at {path}; call /{{namespace}}/{{name}}[/{{path}}] (sync) or /{{namespace}}/{{name}}/fal/queue/…"),
            None,
        );
    };
    let entry = match gw.lookup(ns, name) {
        Ok(e) => e,
        Err(r) => return r,
    };
    if let Err(r) = gw.admit(&entry, &mut req).await {
        return r;
    }
    if is_queue_path(rest) {
        gw.count(&entry, Kind::PerApp);
        let mount = format!("/{ns}/{name}");
        // Boxed: the queue API's futures are large, and a sync call's is moved on
        // every request (see `fal_sidecar::server::serve`).
        return Box::pin(api::queue::handle_per_app(&entry.app, req, &mount)).await;
    }
    if let Err(r) = api::strip_segments(&mut req, 2) {
        return r;
    }
    sync_call(&gw, entry, &conn, req).await
}

/// The queue listener (generation C, `queue.fal.run` style): owner = namespace,
/// alias = name.
pub async fn handle_queue(
    gw: Arc<Gateway>,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Response<Body> {
    let resp = route_queue(gw.clone(), conn, req).await;
    gw.close_when_terminating(resp)
}

async fn route_queue(
    gw: Arc<Gateway>,
    _conn: Arc<ConnState>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    if req.uri().path() == "/.well-known/jwks.json" {
        return gw.jwks();
    }
    let path = req.uri().path().to_string();
    let Some((ns, name, _)) = split_function(&path) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no endpoint at {path}; the queue host serves /{{namespace}}/{{name}}[/{{path}}] and /{{namespace}}/{{name}}/requests/{{id}}"),
            None,
        );
    };
    let entry = match gw.lookup(ns, name) {
        Ok(e) => e,
        Err(r) => return r,
    };
    if let Err(r) = gw.admit(&entry, &mut req).await {
        return r;
    }
    gw.count(&entry, Kind::Queue);
    if entry.replicas().is_empty() && req.method() == http::Method::POST {
        entry.mark_cold();
    }
    // The app id is the function's `{namespace}/{name}`, whatever the namespace is called.
    api::queue::handle_queue_host(&entry.app, req, api::queue::AppIdRule::NamespaceName).await
}

/// A sync call: a free replica slot now, or held until one frees up or starts; sent
/// again when the replica refuses it without running it (see the module docs).
async fn sync_call(
    gw: &Gateway,
    entry: Arc<Entry>,
    conn: &ConnState,
    req: Request<Incoming>,
) -> Response<Body> {
    gw.count(&entry, Kind::Sync);
    entry.last_sync_ms.store(now_ms(), Ordering::Relaxed);
    entry.sync.fetch_add(1, Ordering::AcqRel);
    let mut slot = SlotGuard {
        entry: entry.clone(),
        replica: None,
    };
    let wait = Wait::new(gw, &entry, req.headers());
    if api::websocket::is_upgrade(req.headers()) {
        // The socket counts as a sync call for the autoscaler (`slot`) and holds its
        // replica slot until it closes; a replica's refusal picks another.
        let last: Mutex<Option<Arc<Replica>>> = Mutex::new(None);
        let (entry_ref, wait_ref, last_ref) = (&entry, &wait, &last);
        let route: api::websocket::Route<'_> = Box::new(move |refusal| {
            let prev = last_ref.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let (Some(r), Some(prev)) = (&refusal, prev) {
                refused(gw, entry_ref, &prev, r);
            }
            Box::pin(async move {
                let replica = acquire(gw, entry_ref, wait_ref).await?;
                *last_ref.lock().unwrap_or_else(|e| e.into_inner()) = Some(replica.clone());
                let held = ReplicaSlot {
                    entry: entry_ref.clone(),
                    replica: replica.clone(),
                };
                Ok((
                    replica.upstream.clone(),
                    Some(Box::new(held) as Box<dyn Send + Sync>),
                ))
            })
        });
        // Boxed, as the queue API in `route_run`: a sync call's future stays small.
        return Box::pin(api::websocket::forward_routed(
            &entry.app,
            req,
            Some(Box::new(slot)),
            route,
        ))
        .await;
    }
    let (parts, body) = req.into_parts();
    let declared = proxy::declared_length(&parts.headers);
    let max = entry.app.cfg.max_body_bytes as u64;
    let small = declared.is_some_and(|n| n <= REPLAY_BODY_BYTES.min(max)) || body.is_end_stream();
    if !small {
        // Streamed through: a refusal of the replica reaches the client (with Retry-After).
        let replica = match acquire(gw, &entry, &wait).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        slot.replica = Some(replica.clone());
        let req = Request::from_parts(parts, body);
        let resp = proxy::forward(&entry.app, conn, &replica.upstream, req).await;
        return Holding::wrap(resp, slot);
    }
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return api::closing(error(
                StatusCode::BAD_REQUEST,
                &format!("the request body could not be read to its end: {e}"),
                None,
            ))
        }
    };
    loop {
        let replica = match acquire(gw, &entry, &wait).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        slot.replica = Some(replica.clone());
        let mut req = Request::new(Body::full(bytes.clone()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = parts.uri.clone();
        *req.version_mut() = parts.version;
        *req.headers_mut() = parts.headers.clone();
        let resp = proxy::send(&entry.app, conn, &replica.upstream, req).await;
        if !fal_sidecar::slots::not_run(&resp) {
            return Holding::wrap(resp, slot);
        }
        // Not run: the slot goes back, the replica gets a moment, the call goes again.
        slot.release();
        refused(gw, &entry, &replica, &resp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_paths() {
        assert_eq!(split_function("/ns/app"), Some(("ns", "app", "")));
        assert_eq!(split_function("/ns/app/"), Some(("ns", "app", "")));
        assert_eq!(
            split_function("/ns/app/fal/queue/submit/x"),
            Some(("ns", "app", "fal/queue/submit/x"))
        );
        assert_eq!(split_function("/ns"), None);
        assert_eq!(split_function("/"), None);
        assert_eq!(split_function("//app"), None);
        assert!(is_queue_path("fal/queue/submit"));
        assert!(is_queue_path("fal/queue"));
        assert!(!is_queue_path("fal/queueing"));
        assert!(!is_queue_path("predict"));
    }
}

/// The size of a sync call's future: hyper moves the handler's future into place on
/// every request, so what only rare paths await (holding for a slot, a WebSocket, the
/// queue API, connecting) is boxed rather than inlined. (`memmove` was 3 % of the
/// gateway's CPU, mostly these moves; the future was 4,400 bytes, now ~4,150.)
#[cfg(test)]
mod future_size {
    use super::*;

    fn size3<A, B, C, F: Fn(A, B, C) -> Fut, Fut>(_: &F) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn rare_paths_stay_out_of_a_sync_calls_future() {
        let acquire = size3(&acquire);
        assert!(
            acquire <= 256,
            "acquire's future is {acquire} bytes: box `hold`"
        );
        let run = size3(&handle_run);
        eprintln!("handle_run: {run} bytes, acquire: {acquire} bytes");
        assert!(
            run <= 4200,
            "the run listener's future is {run} bytes: box its rare paths"
        );
    }
}
