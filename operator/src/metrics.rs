//! Controller metrics and the small HTTP server for `/metrics` and `/healthz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::Error;

/// Reconcile counters and timings.
#[derive(Clone)]
pub struct Metrics {
    /// Reconciles started.
    pub reconciliations: IntCounterVec,
    /// Reconciles that failed, by error kind.
    pub failures: IntCounterVec,
    /// Writes to the API, by kind of write.
    pub writes: IntCounterVec,
    /// Reconcile duration.
    pub duration: HistogramVec,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "fal_operator_reconciliations_total",
                "FalFunction reconciles started",
            ),
            &[],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "fal_operator_reconcile_failures_total",
                "FalFunction reconciles that failed",
            ),
            &["error"],
        )?;
        let writes = IntCounterVec::new(
            Opts::new(
                "fal_operator_writes_total",
                "Writes to the Kubernetes API by the reconciler",
            ),
            &["write"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "fal_operator_reconcile_duration_seconds",
                "Time spent in one FalFunction reconcile",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            &[],
        )?;
        registry.register(Box::new(reconciliations.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(writes.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Metrics {
            reconciliations,
            failures,
            writes,
            duration,
        })
    }

    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.reconciliations.with_label_values::<&str>(&[]).inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.clone(),
        }
    }

    /// Counts a failed reconcile.
    pub fn failed(&self, err: &Error) {
        self.failures.with_label_values(&[err.metric_label()]).inc();
    }

    /// Counts one write (`apply_deployment`, `status`, `event`, …).
    pub fn wrote(&self, write: &str) {
        self.writes.with_label_values(&[write]).inc();
    }
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer {
    start: Instant,
    histogram: HistogramVec,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram
            .with_label_values::<&str>(&[])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Answers one admin request.
pub fn handle(path: &str, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => {
            let mut buf = Vec::new();
            match TextEncoder::new().encode(&registry.gather(), &mut buf) {
                Ok(()) => (
                    StatusCode::OK,
                    TextEncoder::new().format_type().to_string(),
                    buf,
                ),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain".to_string(),
                    e.to_string().into_bytes(),
                ),
            }
        }
        "/healthz" => (StatusCode::OK, "text/plain".to_string(), b"ok\n".to_vec()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain".to_string(),
            b"not found\n".to_vec(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, registry: Registry) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "admin server accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = handle(req.uri().path(), &registry);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

/// Binds `addr` for [`serve`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn body(r: Response<Full<Bytes>>) -> String {
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn metrics_and_health_answer() {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        drop(metrics.reconcile_started());
        metrics.failed(&Error::invalid("spec.x", "y"));
        metrics.wrote("status");
        let r = handle("/metrics", &registry);
        assert_eq!(r.status(), StatusCode::OK);
        let text = body(r).await;
        assert!(
            text.contains("fal_operator_reconciliations_total 1"),
            "{text}"
        );
        assert!(
            text.contains("fal_operator_reconcile_failures_total{error=\"invalid_spec\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fal_operator_writes_total{write=\"status\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("fal_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert_eq!(handle("/healthz", &registry).status(), StatusCode::OK);
        assert_eq!(handle("/nope", &registry).status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn server_serves_over_tcp() {
        let registry = Registry::new();
        Metrics::new(&registry).unwrap();
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, registry));
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.ends_with("ok\n"), "{out}");
        server.abort();
    }
}
