//! `POST /tokens/` on the run listener: fal's clients fetch a short-lived token here
//! before a realtime connection (`{REST_URL}/tokens/`), authenticated with their key.

use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::{closing, error, json, refused};
use crate::auth::{Authorizer, MintError};
use crate::upstream::Body;

/// Largest token request body.
const MAX_BODY: usize = 64 * 1024;

/// Whether a path is the tokens endpoint (`/tokens` or `/tokens/`).
pub fn is_tokens_path(path: &str) -> bool {
    path == "/tokens" || path == "/tokens/"
}

pub async fn handle(auth: &Authorizer, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"ask for a token with POST /tokens/ and {"allowed_apps": ["<function>"], "token_expiration": <seconds>}"#,
            None,
        );
        r.headers_mut()
            .insert("allow", HeaderValue::from_static("POST"));
        return closing(r);
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return closing(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("a token request is at most {MAX_BODY} bytes"),
                None,
            ))
        }
    };
    match auth
        .mint(parts.headers.get(http::header::AUTHORIZATION), &body)
        .await
    {
        // fal's clients take a JSON string (or {"token": …}).
        Ok(token) => json(StatusCode::OK, &serde_json::Value::String(token)),
        Err(MintError::Denied(d)) => refused(&d),
        Err(MintError::BadRequest(detail)) => error(StatusCode::BAD_REQUEST, &detail, None),
    }
}
