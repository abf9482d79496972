//! Accept loops: HTTP/1.1 with header size and read-time limits, graceful drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::proxy::ConnState;
use crate::edge;
use crate::shutdown::wait_true;
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

/// Serves `addr` from `threads` OS threads (handlers get `app`, the listener's state), each with its own single-threaded runtime
/// and its own `SO_REUSEPORT` listener (the kernel spreads connections): a connection,
/// its handler and its upstream connection then live on one thread, with no
/// cross-thread wake-ups on the hot path (the nginx worker model). Returns once every
/// thread is listening; the handles finish after `stop` and the drain.
#[allow(clippy::too_many_arguments)]
pub fn serve_per_thread<S, F, Fut>(
    addr: &str,
    what: &str,
    threads: usize,
    app: Arc<S>,
    handler: F,
    limits: ConnLimits,
    lane: Option<crate::api::fast::Lane>,
    stop: watch::Receiver<bool>,
    drain: Duration,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Arc<ConnState>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let sock_addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {what}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot listen on {addr} for {what}: no address"))?;
    let mut handles = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for n in 0..threads.max(1) {
        let (app, handler, stop, ready, lane) = (
            app.clone(),
            handler.clone(),
            stop.clone(),
            ready_tx.clone(),
            lane.clone(),
        );
        let handle = std::thread::Builder::new()
            .name(format!("fal-http-{n}"))
            .spawn(move || {
                set_thread_slot(NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match reuseport_listener(sock_addr) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready.send(Err(e.to_string()));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(()));
                    serve(listener, app, handler, limits, lane, stop, drain).await;
                });
            })?;
        handles.push(handle);
    }
    drop(ready_tx);
    for _ in 0..handles.len() {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!(
                "cannot listen on {addr} for {what}: {e} (pick another address with the flag)"
            ),
            Err(_) => anyhow::bail!("cannot listen on {addr} for {what}: a server thread died"),
        }
    }
    Ok(handles)
}

/// Slots of the threads [`serve_per_thread`] starts, numbered from 0 across every
/// listener of the process: a thread keeps its slot for its life.
static NEXT_SLOT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    static SLOT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The slot of the current thread when it is one of [`serve_per_thread`]'s: its
/// single-threaded runtime runs until the process ends, so a connection driven there
/// serves the handlers of that thread with no cross-thread wake-up (the Redis hub keeps
/// one per slot). `None` on every other thread.
pub fn thread_slot() -> Option<usize> {
    SLOT.with(|s| s.get())
}

/// Gives the current thread a slot (a server thread; in tests, one that stands for it).
pub(crate) fn set_thread_slot(slot: usize) {
    SLOT.with(|s| s.set(Some(slot)));
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

pub async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr} for {what}: {e} (pick another address with the flag)"
        )
    })
}

/// Serves `listener` until `stop` turns true, then lets open connections finish their
/// current request (closing idle ones) for up to `drain`. With `lane` (the run listener
/// of a sidecar), connections start in the fast lane of direct calls
/// ([`crate::api::fast`]), and hyper takes over any request the lane hands it.
pub async fn serve<S, F, Fut>(
    listener: TcpListener,
    app: Arc<S>,
    handler: F,
    limits: ConnLimits,
    lane: Option<crate::api::fast::Lane>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Arc<ConnState>, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    // Every connection task holds a clone of `live`; the drain waits until all are
    // dropped. (hyper-util's GracefulShutdown cannot watch a connection with upgrades.)
    let (live, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Room for a whole head the guard lets through, and then some.
        .max_buf_size(limits.max_header_bytes.max(8192) + 8192)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    let edge_limits = edge::Limits {
        max_head_bytes: limits.max_header_bytes,
        max_headers: limits.max_headers,
    };
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
        let (app, handler, builder, lane) =
            (app.clone(), handler.clone(), builder.clone(), lane.clone());
        let (live, mut stop) = (live.clone(), stop.clone());
        tokio::spawn(async move {
            let _live = live;
            let (stream, read) = match lane {
                Some(lane) => {
                    let timeout = limits.header_read_timeout;
                    match lane(stream, edge_limits, timeout, stop.clone()).await {
                        crate::api::fast::End::Closed => return,
                        crate::api::fast::End::HandOff(stream, read) => (stream, read),
                    }
                }
                None => (stream, Vec::new()),
            };
            let state = Arc::new(ConnState::default());
            // The edge guard frames every byte before hyper parses it (`edge`): what it
            // refuses reaches the service as a stand-in request, answered here.
            let shared = Arc::new(edge::Shared::default());
            let io = edge::Guarded::with_prefix(stream, read, edge_limits, shared.clone());
            let svc = service_fn(move |req: Request<Incoming>| {
                let index = shared.next_request();
                // After an upgrade request the guard no longer frames: unless the answer
                // switches protocols, the connection must end with it.
                let upgrade = req.version() == http::Version::HTTP_11
                    && req.headers().contains_key(http::header::UPGRADE);
                let fut = match shared.refusal(index) {
                    Some(r) => Err(r), // the stand-in for a refused request
                    None => Ok(handler(app.clone(), state.clone(), req)),
                };
                let shared = shared.clone();
                async move {
                    let response = match fut {
                        Ok(fut) => fut.await,
                        Err(r) => return Ok(refusal(r)),
                    };
                    Ok::<_, std::convert::Infallible>(match shared.refusal(index) {
                        // Its body broke the framing rules after the head went through.
                        Some(r) => refusal(r),
                        None if upgrade && response.status() != StatusCode::SWITCHING_PROTOCOLS => {
                            crate::api::closing(response)
                        }
                        None => response,
                    })
                }
            });
            // With upgrades: a WebSocket handshake hands the connection over to a splice
            // (`api::websocket`), which tracks and drains it from then on.
            let conn = builder
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            tokio::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = wait_true(&mut stop) => None,
            };
            // Draining: finish the request in flight, then close (idle ones at once).
            let r = match done {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(live);
    if tokio::time::timeout(drain, all_closed.recv())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain deadline; closing them");
    }
}

/// The answer to a request the edge guard refused.
fn refusal(r: edge::Refusal) -> Response<Body> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST);
    crate::api::closing(crate::api::error(status, &r.detail, None))
}

#[cfg(test)]
mod tests;
