//! WebSockets (and any HTTP/1.1 `Upgrade`) through the sidecar and the gateway: the
//! handshake is forwarded with its upgrade headers over a connection of its own; on the
//! app's 101 both sides are spliced and bytes flow until either side closes — frames,
//! close codes and extensions pass untouched (nothing here parses a frame). A refused
//! upgrade (the app's 4xx/5xx) reaches the client as the app sent it.
//!
//! Every open socket is tracked ([`Sockets`]): it counts for `/load` and the drain, a
//! socket takes one of the replica's call slots (`crate::slots`), an idle timeout closes quiet ones, and a drain
//! lets them run until its deadline, then cuts them.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{closing, error, App};
use crate::upstream::{error_chain, strip_hop_by_hop, Body, BoxError, Upstream};

/// Bytes buffered per direction of a splice: small, so an idle socket costs little.
const SPLICE_BUFFER: usize = 4096;
/// Longest wait for the app's answer to a handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The open sockets of one process (or of one function in a gateway).
pub struct Sockets {
    open: AtomicUsize,
    /// Turns true to close every open socket (the drain deadline).
    cut: watch::Sender<bool>,
    gauge: Gauge,
    upgrades: prometheus::IntCounterVec,
}

/// The open-sockets gauge: given, or one series of a labelled gauge made on first use
/// (a gateway knows many functions, most of which never see a socket).
enum Gauge {
    Given(prometheus::IntGauge),
    Labelled {
        vec: prometheus::IntGaugeVec,
        label: Box<str>,
        made: std::sync::OnceLock<prometheus::IntGauge>,
    },
}

impl Gauge {
    fn get(&self) -> &prometheus::IntGauge {
        match self {
            Gauge::Given(g) => g,
            Gauge::Labelled { vec, label, made } => {
                made.get_or_init(|| vec.with_label_values(&[&**label]))
            }
        }
    }
}

impl Sockets {
    pub fn new(gauge: prometheus::IntGauge, upgrades: prometheus::IntCounterVec) -> Sockets {
        Sockets::with_gauge(Gauge::Given(gauge), upgrades)
    }

    /// Counts open sockets in `vec`'s series for `label`, made when the first socket
    /// opens.
    pub fn labelled(
        vec: prometheus::IntGaugeVec,
        label: &str,
        upgrades: prometheus::IntCounterVec,
    ) -> Sockets {
        let made = std::sync::OnceLock::new();
        let label = label.into();
        Sockets::with_gauge(Gauge::Labelled { vec, label, made }, upgrades)
    }

    fn with_gauge(gauge: Gauge, upgrades: prometheus::IntCounterVec) -> Sockets {
        Sockets {
            open: AtomicUsize::new(0),
            cut: watch::channel(false).0,
            gauge,
            upgrades,
        }
    }

    /// Sockets open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Closes every open socket (and every one spliced after this).
    pub fn cut_all(&self) {
        let _ = self.cut.send(true);
    }

    fn outcome(&self, what: &str) {
        self.upgrades.with_label_values(&[what]).inc();
    }
}

/// Counts one open socket for as long as it lives.
struct Open<'a>(&'a Sockets);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.get().dec();
    }
}

/// Where a handshake goes: an app address and what to hold while a socket through it
/// lives (a gateway's replica slot). Asked again with a replica's refusal
/// (`X-Fal-Replica`, the call never reached the app) when the handshake can be sent
/// again; answering `Err` ends the call with that response.
pub type Route<'a> = Box<
    dyn FnMut(
            Option<Response<Body>>,
        ) -> Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<(Upstream, Option<Box<dyn Send + Sync>>), Response<Body>>,
                    > + Send
                    + 'a,
            >,
        > + Send
        + 'a,
>;

/// Forwards an upgrade handshake to `upstream` and splices on 101. `hold` lives as
/// long as the socket (the gateway's replica slot); in a sidecar the socket also holds
/// one of its call slots (503 `X-Fal-Replica: full` when none is free).
pub async fn forward(
    app: &App,
    upstream: &Upstream,
    req: Request<Incoming>,
    hold: Option<Box<dyn Send + Sync>>,
) -> Response<Body> {
    let upstream = upstream.clone();
    let mut once = Some(hold);
    let route: Route<'_> = Box::new(move |refused| {
        let next = match (refused, once.take()) {
            (None, Some(hold)) => Ok((upstream.clone(), hold)),
            (Some(r), _) => Err(r),
            (None, None) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "no route", None)),
        };
        Box::pin(std::future::ready(next))
    });
    forward_routed(app, req, None, route).await
}

/// [`forward`], with the app picked by `route` (again after a refusal that did not run
/// the handshake). `hold` lives as long as the socket.
pub async fn forward_routed(
    app: &App,
    mut req: Request<Incoming>,
    hold: Option<Box<dyn Send + Sync>>,
    mut route: Route<'_>,
) -> Response<Body> {
    let sockets = app.sockets.clone();
    if app.draining.load(Ordering::Relaxed) {
        sockets.outcome("unavailable");
        return busy(
            "this replica is draining and takes no new WebSocket; retry (another replica will take it)",
        );
    }
    // A socket takes one of the replica's call slots for its whole life.
    let slot = match app.slots.get() {
        Some(slots) => match slots.try_take() {
            Some(s) => Some(s),
            None => {
                sockets.outcome("unavailable");
                return closing(slots.full("WebSocket"));
            }
        },
        None => None,
    };
    let client_side = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    parts.headers = upgrade_headers(&parts.headers);
    parts.version = http::Version::HTTP_11;
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
    // A handshake without a body (all of them, in practice) can be sent again.
    let replayable = body.is_end_stream();
    let mut body = Some(body);
    let mut refused = None;
    let (upstream, route_hold, answer) = loop {
        let (upstream, route_hold) = match route(refused.take()).await {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let b = match body.take() {
            Some(b) if !replayable => Body::Incoming(b),
            _ => Body::full(bytes::Bytes::new()),
        };
        let mut upstream_req = Request::new(b);
        *upstream_req.method_mut() = parts.method.clone();
        *upstream_req.uri_mut() = parts.uri.clone();
        *upstream_req.version_mut() = parts.version;
        *upstream_req.headers_mut() = parts.headers.clone();
        let answer =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&upstream, upstream_req)).await;
        if let Ok(Ok(r)) = &answer {
            if replayable && crate::slots::not_run(r) {
                // Not run there: the route may pick another replica (or give it back).
                drop(route_hold);
                let (mut p, b) = answer.expect("checked").expect("checked").into_parts();
                strip_hop_by_hop(&mut p.headers);
                refused = Some(Response::from_parts(p, Body::Incoming(b)));
                continue;
            }
        }
        break (upstream, route_hold, answer);
    };
    let mut resp = match answer {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            sockets.outcome("failed");
            let mut r = error(
                StatusCode::BAD_GATEWAY,
                &format!(
                    "the app at {} did not answer the WebSocket handshake: {}",
                    upstream.authority(),
                    error_chain(e.as_ref())
                ),
                Some("runner_disconnected"),
            );
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            return closing(r);
        }
        Err(_) => {
            sockets.outcome("failed");
            return closing(error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "the app did not answer the WebSocket handshake within {} s",
                    HANDSHAKE_TIMEOUT.as_secs()
                ),
                Some("request_timeout"),
            ));
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused by the app: its answer, as is.
        sockets.outcome("refused");
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        return Response::from_parts(parts, Body::Incoming(body));
    }
    sockets.outcome("upgraded");
    let upstream_side = hyper::upgrade::on(&mut resp);
    let mut to_client = Response::new(Body::full(bytes::Bytes::new()));
    *to_client.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *to_client.headers_mut() = upgrade_headers(resp.headers());
    sockets.open.fetch_add(1, Ordering::AcqRel);
    sockets.gauge.get().inc();
    let idle = app.cfg.socket_idle_timeout;
    tokio::spawn(async move {
        let _open = Open(&sockets);
        let _hold = (hold, route_hold, slot);
        let (client, app_side) = match tokio::join!(client_side, upstream_side) {
            (Ok(c), Ok(a)) => (c, a),
            (c, a) => {
                tracing::debug!(client = ?c.err(), app = ?a.err(), "a WebSocket upgrade did not complete");
                return;
            }
        };
        // The sockets themselves when both sides are plain TCP (always, from our
        // listeners): no hyper or guard layer under every read and write.
        let (mut client, from_client) = Side::client(client);
        let (mut app_side, from_app) = Side::app(app_side);
        if let Err(e) = forward_early(&mut client, &mut app_side, from_client, from_app).await {
            tracing::debug!(error = %e, "a WebSocket ended before its first bytes passed");
            return;
        }
        splice(client, app_side, idle, sockets.cut.subscribe()).await;
    });
    to_client
}

/// One end of a splice: its TCP socket when the upgraded connection could be taken
/// apart (our listeners serve `TokioIo<edge::Guarded<TcpStream>>`, handshakes go out
/// over `TokioIo<TcpStream>`), else hyper's upgraded connection.
enum Side {
    Tcp(TcpStream),
    Upgraded(TokioIo<Upgraded>),
}

impl Side {
    /// The client's end, and the bytes read from it but not yet passed on.
    fn client(u: Upgraded) -> (Side, Bytes) {
        match u.downcast::<TokioIo<crate::edge::Guarded<TcpStream>>>() {
            Ok(parts) => {
                let (stream, held) = parts.io.into_inner().into_inner();
                let early = if held.is_empty() {
                    parts.read_buf
                } else {
                    [&parts.read_buf[..], &held[..]].concat().into()
                };
                (Side::Tcp(stream), early)
            }
            Err(u) => {
                tracing::debug!("a WebSocket's client side stays on hyper's upgraded connection");
                (Side::Upgraded(TokioIo::new(u)), Bytes::new())
            }
        }
    }

    /// The app's end, and the bytes read from it but not yet passed on.
    fn app(u: Upgraded) -> (Side, Bytes) {
        match u.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (Side::Tcp(parts.io.into_inner()), parts.read_buf),
            Err(u) => (Side::Upgraded(TokioIo::new(u)), Bytes::new()),
        }
    }
}

impl AsyncRead for Side {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Side::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Side::Upgraded(u) => Pin::new(u).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Side {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Side::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Side::Upgraded(u) => Pin::new(u).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Side::Tcp(s) => Pin::new(s).poll_flush(cx),
            Side::Upgraded(u) => Pin::new(u).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Side::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Side::Upgraded(u) => Pin::new(u).poll_shutdown(cx),
        }
    }
}

/// Bytes each side sent right behind its handshake and that were read before the
/// switch go to the other side first. Taken by value and dropped here: even empty, they
/// can share the allocation of hyper's read buffer, which would otherwise stay with
/// every open socket (~6 KiB each in the gateway).
async fn forward_early(
    client: &mut Side,
    app: &mut Side,
    from_client: Bytes,
    from_app: Bytes,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    if !from_client.is_empty() {
        app.write_all(&from_client).await?;
    }
    if !from_app.is_empty() {
        client.write_all(&from_app).await?;
    }
    Ok(())
}

/// The end-to-end headers plus the upgrade pair (`Connection: upgrade`, `Upgrade`),
/// which the hop-by-hop rule would drop.
fn upgrade_headers(h: &HeaderMap) -> HeaderMap {
    let mut out = h.clone();
    let upgrade = h.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut out);
    if let Some(u) = upgrade {
        out.insert(header::UPGRADE, u);
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    out
}

/// Sends a handshake over a connection of its own (an upgraded connection is not given
/// back to any pool).
async fn handshake(
    upstream: &Upstream,
    req: Request<Body>,
) -> Result<Response<Incoming>, BoxError> {
    let stream = tokio::net::TcpStream::connect(upstream.authority()).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "WebSocket upstream connection ended");
        }
    });
    Ok(sender.send_request(req).await?)
}

fn busy(detail: &str) -> Response<Body> {
    let mut r = closing(error(
        StatusCode::SERVICE_UNAVAILABLE,
        detail,
        Some("runner_scheduling_failure"),
    ));
    r.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    r
}

/// Bytes both ways until either side closes, the socket is idle for `idle`, or `cut`.
async fn splice<A, B>(mut a: A, mut b: B, idle: Option<Duration>, mut cut: watch::Receiver<bool>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Arc::new(AtomicU64::new(crate::job::now_ms()));
    let copy = async {
        if idle.is_none() {
            // Nothing to time: the bytes go straight through.
            return tokio::io::copy_bidirectional_with_sizes(
                &mut a,
                &mut b,
                SPLICE_BUFFER,
                SPLICE_BUFFER,
            )
            .await;
        }
        let mut a = Active {
            inner: &mut a,
            last: last.clone(),
        };
        let mut b = Active {
            inner: &mut b,
            last: last.clone(),
        };
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, SPLICE_BUFFER, SPLICE_BUFFER).await
    };
    let quiet = async {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        loop {
            let since = crate::job::now_ms().saturating_sub(last.load(Ordering::Relaxed));
            let left = idle.saturating_sub(Duration::from_millis(since));
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left).await;
        }
    };
    tokio::select! {
        r = copy => if let Err(e) = r {
            tracing::debug!(error = %e, "a WebSocket splice ended with an error");
        },
        _ = quiet => tracing::debug!("a WebSocket was closed after its idle timeout"),
        _ = crate::shutdown::wait_true(&mut cut) => tracing::debug!("a WebSocket was cut at the drain deadline"),
    }
}

/// Records the time of the last byte read (for the idle timeout).
struct Active<'a, T> {
    inner: &'a mut T,
    last: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.store(crate::job::now_ms(), Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_are_recognised() {
        let mut h = HeaderMap::new();
        assert!(!is_upgrade(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h), "Upgrade without Connection: upgrade");
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade(&h));
        let out = upgrade_headers(&{
            let mut h = h.clone();
            h.insert("sec-websocket-key", HeaderValue::from_static("x"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h
        });
        assert_eq!(out[header::UPGRADE], "websocket");
        assert_eq!(out[header::CONNECTION], "upgrade");
        assert_eq!(out["sec-websocket-key"], "x");
        assert!(out.get("keep-alive").is_none());
    }

    #[tokio::test]
    async fn a_splice_ends_when_cut_or_idle() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let (cut, rx) = watch::channel(false);
        let t = tokio::spawn(splice(a, b, None, rx));
        cut.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .unwrap()
            .unwrap();

        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let (_cut, rx) = watch::channel(false);
        let t = tokio::spawn(splice(a, b, Some(Duration::from_millis(50)), rx));
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn bytes_flow_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, mut b_peer) = tokio::io::duplex(64);
        let (_cut, rx) = watch::channel(false);
        tokio::spawn(splice(a, b, Some(Duration::from_secs(60)), rx));
        a_peer.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        b_peer.write_all(b"pong").await.unwrap();
        a_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
}
