//! Accept loops: HTTP/1.1 with header size and read-time limits, graceful drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::proxy::ConnState;
use crate::api::App;
use crate::upstream::Body;

#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Max size of the request head (request line + headers); larger → 431.
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Time a client gets to send a request head (slowloris guard).
    pub header_read_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

pub async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for {what}: {e} (pick another address with the flag)"
        )
    })
}

/// Serves `listener` until `stop` turns true, then lets open connections finish their
/// current request (closing idle ones) for up to `drain`.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    app: Arc<App>,
    handler: F,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) where
    F: Fn(Arc<App>, Arc<ConnState>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    loop {
        let (stream, _peer): (_, SocketAddr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = wait_true(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let handler = handler.clone();
        let state = Arc::new(ConnState::default());
        let svc = service_fn(move |req| {
            let fut = handler(app.clone(), state.clone(), req);
            async move { Ok::<_, std::convert::Infallible>(fut.await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain deadline; closing them");
    }
}

/// Resolves once the flag is true (and never holds a borrow across an await).
pub async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await.map(|_| ());
}
