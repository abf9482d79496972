//! A scripted apiserver for tests (the `tower_test::mock::pair` pattern of kube-rs
//! controller-rs): a real `kube::Client` over a mock service; a scenario lists every
//! API call it expects (method, path and query, body) and answers it like the
//! apiserver would. A request beyond the script, or a missing one, fails the test.

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock;

type Responder = Box<dyn FnOnce(Value) -> (StatusCode, Value) + Send>;

/// One expected API call.
pub(crate) struct Call {
    method: http::Method,
    uri: String,
    respond: Responder,
}

impl Call {
    pub(crate) fn new(
        method: http::Method,
        uri: impl Into<String>,
        respond: impl FnOnce(Value) -> (StatusCode, Value) + Send + 'static,
    ) -> Self {
        Call {
            method,
            uri: uri.into(),
            respond: Box::new(respond),
        }
    }
}

/// A `Status` answer, as the apiserver sends for errors.
pub(crate) fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// 404 NotFound.
pub(crate) fn not_found() -> (StatusCode, Value) {
    status(StatusCode::NOT_FOUND, "NotFound", "not found")
}

/// A client whose apiserver plays `calls` in order. The task ends once every clone of
/// the client is dropped and yields the `METHOD URI` lines it saw.
pub(crate) fn mock_client(calls: Vec<Call>) -> (Client, tokio::task::JoinHandle<Vec<String>>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        for call in calls {
            let (request, send) = handle.next_request().await.unwrap_or_else(|| {
                panic!("expected {} {} but no request came", call.method, call.uri)
            });
            let line = format!("{} {}", request.method(), request.uri());
            assert_eq!(
                (request.method(), request.uri().to_string()),
                (&call.method, call.uri.clone()),
                "unexpected request (seen so far: {seen:?})"
            );
            seen.push(line);
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let (status, reply) = (call.respond)(body);
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
        // Nothing more may arrive: the mock ends when every client clone is dropped.
        if let Some((request, _)) = handle.next_request().await {
            panic!(
                "unexpected extra request {} {} (seen: {seen:?})",
                request.method(),
                request.uri()
            );
        }
        seen
    });
    (client, server)
}

/// Waits for the scripted apiserver to finish (every client clone must be dropped).
pub(crate) async fn finished(server: tokio::task::JoinHandle<Vec<String>>) -> Vec<String> {
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("mock apiserver did not finish: a client clone is still alive")
        .expect("mock apiserver assertion failed")
}
