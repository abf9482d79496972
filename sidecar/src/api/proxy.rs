//! Direct calls: proxied verbatim to the app, bodies streamed both ways.

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::{error, App};
use crate::upstream::{error_chain, is_length_limit, strip_hop_by_hop, Body};

pub async fn forward(app: &App, req: Request<Incoming>) -> Response<Body> {
    app.metrics.direct_requests.inc();
    let max = app.cfg.max_body_bytes;
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return too_large(max);
    }
    let (mut parts, body) = req.into_parts();
    let uri = match app.upstream.uri(parts.uri.path_and_query().map_or("/", |pq| pq.as_str())) {
        Ok(u) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the request target is not valid: {e}"), None),
    };
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    let req = Request::from_parts(parts, Limited::new(body, max).boxed_unsync());
    match app.upstream.client.request(req).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
        }
        Err(e) => {
            if is_length_limit(&e) {
                return too_large(max);
            }
            app.metrics.direct_errors.inc();
            let detail = format!(
                "the app at {} did not answer: {}. Check that it is running and listening on that port.",
                app.upstream.authority(),
                error_chain(&e)
            );
            let mut r = error(StatusCode::BAD_GATEWAY, &detail, Some("runner_disconnected"));
            r.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
            r
        }
    }
}

fn too_large(max: usize) -> Response<Body> {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body is larger than the limit of {max} bytes (--max-body-bytes)"),
        None,
    )
}
