//! Direct calls: proxied verbatim to the app, bodies streamed both ways.
//!
//! Each client connection gets its own upstream connection, opened on first use and
//! reused for every request of that connection (HTTP/1.1 is sequential per
//! connection), so the hot path takes no shared pool lock.

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Limited;
use hyper::body::Incoming;

use super::{error, App};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// How long a failed call waits to learn whether the app has just exited.
pub const APP_EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

use crate::upstream::{error_chain, is_length_limit, strip_hop_by_hop, Body, BoxError, Upstream};

/// The upstream connection of one client connection (and where it goes: a gateway's
/// client connection may reach different replicas over time).
#[derive(Default)]
pub struct ConnState {
    sender: tokio::sync::Mutex<Option<(String, SendRequest<Body>)>>,
}

impl ConnState {
    async fn send(
        &self,
        upstream: &Upstream,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, BoxError> {
        let mut slot = self.sender.lock().await;
        for attempt in 0..2 {
            if slot
                .as_ref()
                .is_none_or(|(to, s)| s.is_closed() || to != upstream.authority())
            {
                // Boxed: the rare connect keeps every call's future small (see `serve`).
                let sender = Box::pin(connect(upstream)).await?;
                *slot = Some((upstream.authority().to_string(), sender));
            }
            let (_, sender) = slot.as_mut().expect("just connected");
            if sender.ready().await.is_err() {
                *slot = None;
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // The app closed an idle connection as we wrote: the request was not
                    // sent, so it is safe to send it again on a fresh connection.
                    Some(r) if attempt == 0 => {
                        req = r;
                        *slot = None;
                    }
                    _ => return Err(e.into_error().into()),
                },
            }
        }
        Err("the app keeps closing connections".into())
    }
}

/// The app could not be connected to: the request never reached it.
#[derive(Debug, thiserror::Error)]
#[error("connecting to the app failed: {0}")]
pub(super) struct ConnectError(pub(super) std::io::Error);

async fn connect(upstream: &Upstream) -> Result<SendRequest<Body>, BoxError> {
    let stream = tokio::net::TcpStream::connect(upstream.authority())
        .await
        .map_err(ConnectError)?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// Proxies `req` to `upstream` over the client connection's upstream connection.
pub async fn forward(
    app: &App,
    conn: &ConnState,
    upstream: &Upstream,
    req: Request<Incoming>,
) -> Response<Body> {
    app.metrics.direct_requests.inc();
    // `run` mode, the app is restarting: say so at once rather than hang or fail
    // obscurely (clients retry after `Retry-After`; the body is left unread).
    let health = app.app_health.get();
    if let Some(h) = health.filter(|h| !h.is_up()) {
        let state = h.state();
        if let Some(reason) = state.down_reason() {
            app.metrics.direct_errors.inc();
            return super::closing(restarting(super::app_down(
                &state,
                reason,
                StatusCode::SERVICE_UNAVAILABLE,
                "app_restarting",
            )));
        }
    }
    let max = app.cfg.max_body_bytes;
    let declared = declared_length(req.headers());
    if declared.is_some_and(|n| n > max as u64) {
        return super::closing(too_large(max));
    }
    let (parts, body) = req.into_parts();
    // A declared length is enforced by hyper (and was checked against the limit above);
    // only chunked uploads need counting.
    let body = if declared.is_some() {
        Body::Incoming(body)
    } else {
        Body::Limited(Limited::new(body, max))
    };
    send(app, conn, upstream, Request::from_parts(parts, body)).await
}

/// The request's `Content-Length`, if it has a valid one.
pub fn declared_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Sends `req` (a body the caller has framed or buffered) to `upstream` over the client
/// connection's upstream connection, and maps the failures to answers.
pub async fn send(
    app: &App,
    conn: &ConnState,
    upstream: &Upstream,
    req: Request<Body>,
) -> Response<Body> {
    let generation = app.app_health.get().map(|h| h.generation());
    let max = app.cfg.max_body_bytes;
    let (mut parts, body) = req.into_parts();
    // Origin-form on the wire; the client's own Host header goes through unchanged.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        match pq.parse() {
            Ok(u) => parts.uri = u,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("the request target is not valid: {e}"),
                    None,
                )
            }
        }
    }
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(http::header::HOST) {
        // An HTTP/1.0 client may send none; an HTTP/1.1 request must carry one.
        if let Ok(h) = HeaderValue::from_str(upstream.authority()) {
            parts.headers.insert(http::header::HOST, h);
        }
    }
    let req = Request::from_parts(parts, body);
    let sent = match app.cfg.request_timeout {
        None => conn.send(upstream, req).await,
        Some(limit) => match tokio::time::timeout(limit, conn.send(upstream, req)).await {
            Ok(r) => r,
            Err(_) => {
                let detail = format!(
                    "the app did not answer within the request timeout ({} s)",
                    limit.as_secs_f64()
                );
                // The abandoned upstream exchange dies with this client connection.
                return super::closing(error(
                    StatusCode::GATEWAY_TIMEOUT,
                    &detail,
                    Some("request_timeout"),
                ));
            }
        },
    };
    match sent {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::Incoming(body))
        }
        Err(e) => {
            if is_length_limit(e.as_ref()) {
                return super::closing(too_large(max));
            }
            Box::pin(failed(app, upstream, generation, e)).await
        }
    }
}

/// The answer to a call the app did not answer (`e`: why), `generation` being the app
/// process's when the call was sent (`run` mode): 503 `app_restarting` when it could not
/// be connected to because it is restarting, 502 `runner_disconnected` otherwise.
pub(super) async fn failed(
    app: &App,
    upstream: &Upstream,
    generation: Option<u64>,
    e: BoxError,
) -> Response<Body> {
    app.metrics.direct_errors.inc();
    if let (Some(h), Some(g)) = (app.app_health.get(), generation) {
        if let Some(exit) = h.exited_since(g, APP_EXIT_GRACE).await {
            let state = h.state();
            return if e.is::<ConnectError>() {
                let reason = state
                    .down_reason()
                    .unwrap_or_else(|| format!("the app is restarting (it exited: {exit})"));
                restarting(super::app_down(
                    &state,
                    reason,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "app_restarting",
                ))
            } else {
                let detail = format!(
                    "the app exited ({exit}) while handling this request; it is being restarted"
                );
                super::app_down(
                    &state,
                    detail,
                    StatusCode::BAD_GATEWAY,
                    "runner_disconnected",
                )
            };
        }
    }
    let detail = format!(
        "the app at {} did not answer: {}. Check that it is running and listening on that port.",
        upstream.authority(),
        error_chain(e.as_ref())
    );
    let mut r = error(
        StatusCode::BAD_GATEWAY,
        &detail,
        Some("runner_disconnected"),
    );
    r.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    r
}

/// Marks an answer that the app never saw (it could not be connected to): a gateway
/// sends the call to another replica (see `crate::slots`).
fn restarting(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut().insert(
        crate::slots::REPLICA_HEADER,
        HeaderValue::from_static("restarting"),
    );
    r
}

pub fn too_large(max: usize) -> Response<Body> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body is larger than the limit of {max} bytes (--max-body-bytes)"),
        None,
    )
}
