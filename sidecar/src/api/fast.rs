//! The fast lane of direct calls: the run listener's connections start here (the
//! sidecar's, and the gateway's with its own [`Router`]), and a request this proxy needs
//! to understand no further than its framing goes to the app without hyper — the nginx
//! model. The head is checked by the edge policy's own
//! [`edge::check_head`] (the same rules as every other request) and forwarded byte for
//! byte, minus hop-by-hop fields; the body is counted through; the app's answer is parsed
//! once (httparse), its head rebuilt without hop-by-hop fields, and its body copied
//! through (a `Content-Length` body counted, a chunked one framed, one that ends with
//! the connection re-chunked). One task drives both sockets, and a connection's buffers
//! are reused by every request on it: no allocation, no channel, no timer per request.
//!
//! Everything else is handed over to hyper for the rest of the connection, with the
//! bytes already read ([`End::HandOff`]): a request the edge policy refuses (the guard
//! answers it), HTTP/1.0, an upgrade, a chunked or oversized upload, the
//! sidecar's own paths (`/fal/queue…`, `/.well-known/jwks.json`), a function behind
//! `--keys`, an app that is restarting, no free call slot (answered 503 there), and an
//! app that cannot be connected to (answered there). Those answers are the same
//! whichever way a request arrives.

use std::mem::MaybeUninit;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::proxy::{failed, ConnectError};
use super::App;
use crate::edge::{self, Body as Framing, HeadScan};
use crate::shutdown::wait_true;
use crate::slots::REPLICA_HEADER;
use crate::upstream::{is_hop_by_hop, Body, BoxError, Upstream};

/// How a connection's fast lane ends.
pub enum End {
    /// Done: closed by either side, drained, timed out, or broken mid-answer.
    Closed,
    /// hyper serves the connection from here on, starting with these bytes (read from it
    /// and not yet served).
    HandOff(TcpStream, Vec<u8>),
}

/// Bytes asked of the kernel per read (nginx's proxy buffers are 4–8 KiB too): a
/// connection keeps two such buffers, one per side.
const READ: usize = 8 * 1024;
/// The largest head of an answer from the app (hyper's client takes ~400 KiB; an app's
/// head is a few hundred bytes).
const MAX_ANSWER_HEAD: usize = 64 * 1024;
/// Most header fields of an answer from the app.
const MAX_ANSWER_FIELDS: usize = 100;
/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// Longest wait for more of a request body the answer came before (see `linger`).
const LINGER: Duration = Duration::from_secs(5);
/// Most names a `Connection` field may list in a request the lane takes.
const MAX_CONNECTION_TOKENS: usize = 8;

/// Where the lane sends plain requests: the sidecar's own app ([`Direct`]), or in the
/// gateway a replica of the function a path names.
pub trait Router: Send + Sync + 'static {
    type Call: Call;
    /// The call a plain request makes (a slot taken for it), or `None`: hyper takes the
    /// connection from this request on.
    fn route(&self, req: &Plain<'_>) -> Option<Self::Call>;
}

/// A plain request: an HTTP/1.1 head the edge policy accepted, no upgrade, a
/// `Content-Length` body or none, an origin-form target.
pub struct Plain<'a> {
    pub head: &'a [u8],
    pub method: &'a [u8],
    pub target: &'a [u8],
    /// The target's path (before any `?`).
    pub path: &'a [u8],
    pub length: u64,
}

impl<'a> Plain<'a> {
    /// The value of the first field line named `name` (any case).
    pub fn field(&self, name: &str) -> Option<&'a [u8]> {
        self.fields(name).next()
    }

    /// The values of every field line named `name` (any case).
    pub fn fields<'n>(&self, name: &'n str) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
        field_lines(self.head)
            .filter(move |(n, _, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, value, _)| value)
    }
}

/// One call the lane makes, held until its answer's body is done.
pub trait Call: Send + Sync {
    /// Whose limits, metrics and failure answers apply.
    fn app(&self) -> &App;
    fn upstream(&self) -> &Upstream;
    /// Bytes at the start of the target that the app does not get (the gateway's
    /// `/{namespace}/{name}`).
    fn strip(&self) -> usize {
        0
    }
    /// The request went out (once per call).
    fn sent(&self);
    /// A body up to this size is read whole before the call goes out, so that the
    /// request is still at hand should the app not run it ([`Call::not_run`]).
    fn replay_bytes(&self) -> u64 {
        0
    }
    /// The answer is the connection's last.
    fn last(&self) -> bool {
        false
    }
    /// The request's `Authorization` fields stay here: the router checked the key they
    /// carry, and a credential never reaches the app.
    fn drops_authorization(&self) -> bool {
        false
    }
    /// The app answered 503 with `X-Fal-Replica: {reason}`: it did not run the call.
    /// `true`: the call gives its slot back and hyper takes the request (the lane still
    /// holds all of it) to send it elsewhere; `false`: the answer goes to the client.
    fn not_run(&mut self, _reason: &str) -> bool {
        false
    }
}

/// The sidecar's router: its own app.
pub struct Direct(pub std::sync::Arc<App>);

/// A direct call, with its call slot.
pub struct DirectCall {
    app: std::sync::Arc<App>,
    _slot: Option<crate::slots::Slot>,
}

impl Router for Direct {
    type Call = DirectCall;

    fn route(&self, req: &Plain<'_>) -> Option<DirectCall> {
        let app = &self.0;
        let path = req.path;
        if app.upstream.is_none()
            || app.gate.get().is_some()
            || path == b"/.well-known/jwks.json"
            || path == b"/fal/queue"
            || path.starts_with(b"/fal/queue/")
            || app.app_health.get().is_some_and(|h| !h.is_up())
            || req.length > app.cfg.max_body_bytes as u64
        {
            return None;
        }
        let slot = match app.slots.get() {
            Some(slots) => Some(slots.try_take()?),
            None => None,
        };
        Some(DirectCall {
            app: app.clone(),
            _slot: slot,
        })
    }
}

impl Call for DirectCall {
    fn app(&self) -> &App {
        &self.app
    }

    fn upstream(&self) -> &Upstream {
        self.app
            .upstream
            .as_ref()
            .expect("routed only with an upstream")
    }

    fn sent(&self) {
        self.app.metrics.direct_requests.inc();
    }
}

/// A connection's way in: the lane over a router, as the accept loop runs it
/// (`crate::server::serve`): the stream, the edge limits, the header-read timeout, the
/// stop flag.
pub type Lane = std::sync::Arc<
    dyn Fn(
            TcpStream,
            edge::Limits,
            Duration,
            watch::Receiver<bool>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = End> + Send>>
        + Send
        + Sync,
>;

/// The lane over `router`.
pub fn lane<R: Router>(router: std::sync::Arc<R>) -> Lane {
    std::sync::Arc::new(move |client, limits, timeout, mut stop| {
        let router = router.clone();
        Box::pin(async move { serve(&*router, client, limits, timeout, &mut stop).await })
    })
}

/// Serves `client` until it closes, or hands it over to hyper.
pub async fn serve<R: Router>(
    router: &R,
    client: TcpStream,
    limits: edge::Limits,
    header_timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let mut lane = Conn {
        router,
        client,
        limits,
        buf: Vec::new(),
        app_conn: None,
        abuf: Vec::new(),
        out: Vec::new(),
    };
    let timer = tokio::time::sleep(header_timeout);
    tokio::pin!(timer);
    loop {
        if lane.buf.is_empty() && *stop.borrow() {
            return End::Closed;
        }
        timer.as_mut().reset(Instant::now() + header_timeout);
        let head_len = match lane.read_head(timer.as_mut(), stop).await {
            Ok(n) => n,
            Err(Stop::Closed) => return End::Closed,
            Err(Stop::HandOff) => return lane.hand_off(),
        };
        match lane.call(head_len, timer.as_mut(), stop).await {
            Next::KeepAlive => {}
            Next::Close => {
                let _ = lane.client.shutdown().await;
                return End::Closed;
            }
            Next::Broken => return End::Closed,
            Next::HandOff => return lane.hand_off(),
        }
    }
}

enum Stop {
    Closed,
    HandOff,
}

/// What follows a call.
enum Next {
    KeepAlive,
    /// The answer said `Connection: close`: close after it (FIN, not reset).
    Close,
    /// The connection is out of step (an answer cut short, a body left unread): drop it.
    Broken,
    /// Nothing of the request went anywhere: hyper takes it.
    HandOff,
}

/// One client connection in the lane.
struct Conn<'a, R> {
    router: &'a R,
    client: TcpStream,
    limits: edge::Limits,
    /// The client's bytes read and not yet forwarded (a head, body bytes, pipelined
    /// requests).
    buf: Vec<u8>,
    /// The connection to the app (and where it goes), kept between calls.
    app_conn: Option<(String, TcpStream)>,
    /// The app's bytes read and not yet forwarded.
    abuf: Vec<u8>,
    /// What is written next (a rebuilt head).
    out: Vec<u8>,
}

/// How the app's answer is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AnswerBody {
    None,
    Length(u64),
    Chunked,
    /// Until the app closes: re-chunked for the client.
    UntilClose,
}

impl<R: Router> Conn<'_, R> {
    /// hyper takes the connection, with the bytes read; they move with it for the
    /// connection's life (a WebSocket's), so only their own size.
    fn hand_off(self) -> End {
        let mut read = self.buf;
        read.shrink_to_fit();
        End::HandOff(self.client, read)
    }

    /// Reads until `buf` starts with a whole request head; its length.
    async fn read_head(
        &mut self,
        mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<usize, Stop> {
        let mut at = HeadScan::default();
        loop {
            match edge::find_head_end(&self.buf, &mut at) {
                // The guard refuses it, with the same answer as anywhere else.
                Err(_) => return Err(Stop::HandOff),
                Ok(Some(n)) => return Ok(n),
                Ok(None) if self.buf.len() > self.limits.max_head_bytes => {
                    return Err(Stop::HandOff)
                }
                Ok(None) => {}
            }
            self.buf.reserve(READ);
            let idle = self.buf.is_empty();
            tokio::select! {
                biased;
                r = self.client.read_buf(&mut self.buf) => match r {
                    Ok(0) if idle => return Err(Stop::Closed),
                    // The client gave up inside a head: hyper answers what it would.
                    Ok(0) => return Err(Stop::HandOff),
                    Ok(_) => {}
                    Err(_) => return Err(Stop::Closed),
                },
                // The slowloris guard (hyper's header-read timeout): close.
                _ = timer.as_mut() => return Err(Stop::Closed),
                _ = wait_true(stop), if idle => return Err(Stop::Closed),
            }
        }
    }

    /// Serves the request whose head is the first `head_len` bytes of `buf`.
    async fn call(
        &mut self,
        head_len: usize,
        mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
        stop: &watch::Receiver<bool>,
    ) -> Next {
        // Too large (the guard answers 431), or refused: hyper's path answers it.
        if head_len > self.limits.max_head_bytes {
            return Next::HandOff;
        }
        let Ok(head) = edge::check_head(&self.buf[..head_len], &self.limits) else {
            return Next::HandOff;
        };
        let length = match head.body {
            Framing::None => 0,
            Framing::Length(n) => n,
            Framing::Chunked => return Next::HandOff,
        };
        if !head.http11 || head.upgrade {
            return Next::HandOff;
        }
        let (method, target) = request_line(&self.buf[..head_len]);
        let path = target.split(|b| *b == b'?').next().unwrap_or_default();
        if path.first() != Some(&b'/') {
            return Next::HandOff;
        }
        // The request's hop-by-hop fields: dropped, and `Connection: close` kept in mind.
        let (mut close_after, mut expect) = (false, false);
        let mut listed = [(0usize, 0usize); MAX_CONNECTION_TOKENS];
        let mut n_listed = 0;
        if head.hop {
            match connection_tokens(&self.buf[..head_len], &mut listed) {
                Some((n, close, e)) => (n_listed, close_after, expect) = (n, close, e),
                None => return Next::HandOff, // a long `Connection` list
            }
        }
        let plain = Plain {
            head: &self.buf[..head_len],
            method,
            target,
            path,
            length,
        };
        let Some(mut call) = self.router.route(&plain) else {
            return Next::HandOff;
        };
        if call.drops_authorization() {
            let head = &self.buf[..head_len];
            for (name, _, _) in field_lines(head) {
                if name.eq_ignore_ascii_case(b"authorization") {
                    if n_listed == listed.len() {
                        return Next::HandOff;
                    }
                    let at = name.as_ptr() as usize - head.as_ptr() as usize;
                    listed[n_listed] = (at, at + name.len());
                    n_listed += 1;
                }
            }
        }
        let head_method = method == b"HEAD";
        // `Expect: 100-continue` (curl's, for a body over 1 MiB): the client may wait for
        // this before it sends the body, as hyper's server and nginx answer it. The field
        // goes on to the app, as on hyper's path; an interim answer of the app's is dropped.
        if expect
            && ((self.buf.len() - head_len) as u64) < length
            && self.client.write_all(CONTINUE).await.is_err()
        {
            return Next::Broken;
        }
        if length > 0 && length <= call.replay_bytes() {
            while ((self.buf.len() - head_len) as u64) < length {
                self.buf.reserve(READ);
                match self.client.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return Next::Broken,
                    Ok(_) => {}
                }
            }
        }
        let (method, target) = request_line(&self.buf[..head_len]);
        let app = call.app();
        let generation = app.app_health.get().map(|h| h.generation());

        // The head (and the body bytes read with it) to the app.
        let with_head = (self.buf.len() - head_len).min(length as usize);
        let strip = call.strip();
        let first: &[u8] = if head.hop || strip > 0 || n_listed > 0 {
            self.out.clear();
            let target = (method, &target[strip.min(target.len())..]);
            let listed = &listed[..n_listed];
            rebuild_head(&self.buf[..head_len], target, listed, &mut self.out);
            self.out
                .extend_from_slice(&self.buf[head_len..head_len + with_head]);
            &self.out
        } else {
            &self.buf[..head_len + with_head]
        };
        let upstream = call.upstream();
        let (to, mut conn) = match self.app_conn.take() {
            Some((to, c)) if to == upstream.authority() && open_and_quiet(&c) => (to, c),
            _ => match connect(upstream).await {
                Ok(c) => (upstream.authority().to_string(), c),
                Err(_) => return Next::HandOff,
            },
        };
        if conn.write_all(first).await.is_err() {
            // A kept connection the app closed as we wrote; a fresh one once.
            conn = match connect(upstream).await {
                Ok(c) => c,
                Err(_) => return Next::HandOff,
            };
            if conn.write_all(first).await.is_err() {
                return Next::HandOff;
            }
        }
        call.sent();
        // A request the lane holds whole stays in `buf` until its answer's head has come:
        // a replica that did not run it hands it to hyper, which sends it elsewhere.
        let sent = head_len + with_head;
        let whole = with_head as u64 == length;
        if !whole {
            consume(&mut self.buf, sent);
        }
        // The rest of the body, then the answer's head, within the request timeout (as
        // on hyper's path, where it bounds sending the request and its answer's head).
        let deadline = app.cfg.request_timeout;
        if let Some(limit) = deadline {
            timer.as_mut().reset(Instant::now() + limit);
        }
        self.abuf.clear();
        // Body bytes the app did not take: it answered first, or went away.
        let mut unsent = length - with_head as u64;
        if unsent > 0 {
            let upload = upload(
                &mut self.client,
                &mut self.buf,
                &conn,
                &mut self.abuf,
                head_method,
                &mut unsent,
            );
            let sent = tokio::select! {
                biased;
                sent = upload => sent.map_err(Some),
                _ = timer.as_mut(), if deadline.is_some() => Err(None),
            };
            match sent {
                Ok(()) | Err(Some(Upload::AppDone)) => {}
                Err(None) => return self.timed_out(deadline).await,
                Err(Some(Upload::Client)) => return Next::Broken,
            }
        }
        let answer: Result<Answer, BoxError> = loop {
            match parse_answer(&self.abuf, head_method) {
                Ok(Some(a)) if a.status >= 200 => break Ok(a),
                // An interim answer (100, 103): hyper's client drops them too.
                Ok(Some(a)) => {
                    consume(&mut self.abuf, a.head_len);
                    continue;
                }
                Ok(None) if self.abuf.len() <= MAX_ANSWER_HEAD => {}
                Ok(None) => break Err("the app's answer head is larger than 64 KiB".into()),
                Err(e) => break Err(e),
            }
            self.abuf.reserve(READ);
            let read = tokio::select! {
                biased;
                r = conn.read_buf(&mut self.abuf) => r,
                _ = timer.as_mut(), if deadline.is_some() => return self.timed_out(deadline).await,
                // The client went away: so does the call (the app sees its connection close).
                gone = client_gone(&self.client, &mut self.buf, self.limits.max_head_bytes) => {
                    if gone {
                        return Next::Broken;
                    }
                    continue;
                }
            };
            match read {
                Ok(0) => break Err("it closed the connection without an answer".into()),
                Ok(_) => {}
                Err(e) => break Err(Box::new(e)),
            }
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                let held = whole.then_some(sent);
                return self
                    .failed_call(&call, generation, e, &mut conn, held, unsent)
                    .await;
            }
        };

        if whole {
            if answer.status == 503 {
                let fields = field_lines(&self.abuf[..answer.head_len]);
                let reason = fields
                    .filter(|(name, _, _)| name.eq_ignore_ascii_case(REPLICA_HEADER.as_bytes()))
                    .find_map(|(_, value, _)| std::str::from_utf8(value).ok());
                if reason.is_some_and(|r| call.not_run(r)) {
                    // Not run: hyper sends it again (the app connection is dropped).
                    self.abuf.clear();
                    return Next::HandOff;
                }
            }
            consume(&mut self.buf, sent);
        }
        // The answer's head to the client, with what of its body came with it. Draining,
        // it is the connection's last (as hyper's graceful shutdown does).
        let close_after = close_after || unsent > 0 || *stop.borrow() || call.last();
        self.out.clear();
        answer.write_head(&self.abuf, close_after, &mut self.out);
        consume(&mut self.abuf, answer.head_len);
        let ok = self.copy_answer_body(&mut conn, answer.body).await;
        drop(call);
        match ok {
            // An early answer: the app connection is out of step (dropped), and the
            // client's connection closes once the rest of its body is read.
            Some(_) if unsent > 0 => self.linger(unsent).await,
            Some(reusable) => {
                if reusable && answer.keep_alive {
                    self.app_conn = Some((to, conn));
                }
                if close_after {
                    Next::Close
                } else {
                    Next::KeepAlive
                }
            }
            None => Next::Broken,
        }
    }

    /// Writes `out` (the answer's head) and the answer's body to the client: `Some(whether
    /// the app connection is fit for another call)`, `None` when either side broke.
    async fn copy_answer_body(&mut self, conn: &mut TcpStream, body: AnswerBody) -> Option<bool> {
        match body {
            AnswerBody::None => {
                self.client.write_all(&self.out).await.ok()?;
                Some(self.abuf.is_empty())
            }
            AnswerBody::Length(n) => {
                let now = (self.abuf.len() as u64).min(n) as usize;
                self.out.extend_from_slice(&self.abuf[..now]);
                self.client.write_all(&self.out).await.ok()?;
                let extra = self.abuf.len() > now;
                self.abuf.clear();
                let mut left = n - now as u64;
                while left > 0 {
                    self.abuf.reserve(READ);
                    if conn.read_buf(&mut self.abuf).await.ok()? == 0 {
                        return None;
                    }
                    let take = (self.abuf.len() as u64).min(left) as usize;
                    self.client.write_all(&self.abuf[..take]).await.ok()?;
                    left -= take as u64;
                    if self.abuf.len() > take {
                        self.abuf.clear();
                        return Some(false); // more than it said: not reused
                    }
                    self.abuf.clear();
                }
                Some(!extra)
            }
            AnswerBody::Chunked => {
                self.client.write_all(&self.out).await.ok()?;
                let mut chunks = Chunks::default();
                loop {
                    let (framed, done) = chunks.frame(&self.abuf, &self.limits).ok()?;
                    self.client.write_all(&self.abuf[..framed]).await.ok()?;
                    consume(&mut self.abuf, framed);
                    if done {
                        return Some(self.abuf.is_empty());
                    }
                    self.abuf.reserve(READ);
                    if conn.read_buf(&mut self.abuf).await.ok()? == 0 {
                        return None;
                    }
                }
            }
            AnswerBody::UntilClose => {
                self.client.write_all(&self.out).await.ok()?;
                loop {
                    if !self.abuf.is_empty() {
                        self.out.clear();
                        push_hex(&mut self.out, self.abuf.len());
                        self.out.extend_from_slice(b"\r\n");
                        self.out.extend_from_slice(&self.abuf);
                        self.out.extend_from_slice(b"\r\n");
                        self.client.write_all(&self.out).await.ok()?;
                        self.abuf.clear();
                    }
                    self.abuf.reserve(READ);
                    if conn.read_buf(&mut self.abuf).await.ok()? == 0 {
                        self.client.write_all(b"0\r\n\r\n").await.ok()?;
                        return Some(false);
                    }
                }
            }
        }
    }

    /// The app did not answer (it closed, broke the connection, or sent no HTTP): the
    /// same answer as on hyper's path. The request was read whole, so the client
    /// connection stays in step.
    async fn failed_call(
        &mut self,
        call: &R::Call,
        generation: Option<u64>,
        e: BoxError,
        conn: &mut TcpStream,
        held: Option<usize>,
        unsent: u64,
    ) -> Next {
        let _ = conn.shutdown().await;
        if let Some(n) = held {
            consume(&mut self.buf, n);
        }
        let mut r = Box::pin(failed(call.app(), call.upstream(), generation, e)).await;
        if unsent > 0 {
            r = super::closing(r);
        }
        let close = r.headers().contains_key(http::header::CONNECTION);
        match self.answer(r).await {
            Ok(()) if !close => Next::KeepAlive,
            Ok(()) if unsent > 0 => self.linger(unsent).await,
            _ => Next::Broken,
        }
    }

    /// After an answer sent before the whole request body came (`unsent` bytes of it
    /// still with the client): the answer said `Connection: close`, so the write side is
    /// shut (FIN) and what the client still sends of its body is read and dropped, up
    /// to those bytes or [`LINGER`] without any, before the socket closes. Closing with
    /// unread bytes would reset the connection, and a reset can destroy the answer
    /// before the client reads it (nginx's lingering close).
    async fn linger(&mut self, mut unsent: u64) -> Next {
        let _ = self.client.shutdown().await;
        let held = (self.buf.len() as u64).min(unsent);
        unsent -= held;
        self.buf.clear();
        while unsent > 0 {
            self.buf.reserve(READ);
            match tokio::time::timeout(LINGER, self.client.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    unsent = unsent.saturating_sub(n as u64);
                    self.buf.clear();
                }
                _ => break,
            }
        }
        Next::Broken
    }

    /// The request timeout passed: 504, and the connection closes (the abandoned call
    /// dies with the app connection, as on hyper's path).
    async fn timed_out(&mut self, limit: Option<Duration>) -> Next {
        let detail = format!(
            "the app did not answer within the request timeout ({} s)",
            limit.unwrap_or_default().as_secs_f64()
        );
        let r = super::error(
            StatusCode::GATEWAY_TIMEOUT,
            &detail,
            Some("request_timeout"),
        );
        let _ = self.answer(super::closing(r)).await;
        Next::Broken
    }

    /// Writes an answer made here (a buffered body) to the client.
    async fn answer(&mut self, r: Response<Body>) -> std::io::Result<()> {
        let (parts, body) = r.into_parts();
        let body = match body {
            Body::Full(b) => b.unwrap_or_default(),
            _ => Bytes::new(),
        };
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        self.out.extend_from_slice(parts.status.as_str().as_bytes());
        self.out.push(b' ');
        self.out
            .extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        self.out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            self.out.extend_from_slice(name.as_str().as_bytes());
            self.out.extend_from_slice(b": ");
            self.out.extend_from_slice(value.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        }
        self.out.extend_from_slice(b"content-length: ");
        self.out
            .extend_from_slice(body.len().to_string().as_bytes());
        self.out.extend_from_slice(b"\r\n\r\n");
        self.out.extend_from_slice(&body);
        self.client.write_all(&self.out).await
    }
}

/// Why copying a request body to the app stopped short.
enum Upload {
    /// The client went away mid-body.
    Client,
    /// The app answered in full before it took the whole body (a 413, a 401; its answer
    /// is in the answer buffer), or closed or broke the connection: what it said is
    /// read next.
    AppDone,
}

/// Copies the `left` bytes of a request body still to come from the client (those in
/// `buf` first) to the app, counting `left` down; what the client sent after them stays
/// in `buf`. The app's socket is watched all along, as hyper's client does: what it
/// sends meanwhile is kept in `answer` (up to [`MAX_ANSWER_HEAD`]), and the copy stops
/// once that is a whole answer or the app closed or refused a write. So an app that
/// answers early and closes is heard (not a 502 for the write it refused), and one that
/// answers early and stops reading does not leave the call waiting; an app that starts
/// answering while it still reads the body gets all of it.
async fn upload(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    app: &TcpStream,
    answer: &mut Vec<u8>,
    head_method: bool,
    left: &mut u64,
) -> Result<(), Upload> {
    while *left > 0 {
        let listen = answer.len() < MAX_ANSWER_HEAD;
        if buf.is_empty() {
            buf.reserve(READ);
            tokio::select! {
                biased;
                r = client.read_buf(buf) => match r {
                    Ok(0) | Err(_) => return Err(Upload::Client),
                    Ok(_) => {}
                },
                said = app_said(app, answer), if listen => if said.done(answer, head_method) {
                    return Err(Upload::AppDone);
                },
            }
            continue;
        }
        let take = (buf.len() as u64).min(*left) as usize;
        match app.try_write(&buf[..take]) {
            Ok(n) => {
                consume(buf, n);
                *left -= n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::select! {
                    biased;
                    w = app.writable() => if w.is_err() {
                        return Err(Upload::AppDone);
                    },
                    said = app_said(app, answer), if listen => if said.done(answer, head_method) {
                        return Err(Upload::AppDone);
                    },
                }
            }
            // Refused (reset, broken pipe): an answer sent before may be waiting.
            Err(_) => return Err(Upload::AppDone),
        }
    }
    Ok(())
}

/// What the app's socket had while a request body was being sent.
enum Said {
    /// Readiness with nothing behind it.
    Nothing,
    /// Bytes of an answer (added to the answer buffer).
    Bytes,
    /// It closed or broke the connection.
    Gone,
}

impl Said {
    /// Whether the body need not be sent further: the app is gone, or the answer buffer
    /// holds a whole final answer (or something that is not HTTP).
    fn done(&self, answer: &[u8], head_method: bool) -> bool {
        match self {
            Said::Nothing => false,
            Said::Gone => true,
            Said::Bytes => {
                let mut at = 0;
                loop {
                    match parse_answer(&answer[at..], head_method) {
                        Ok(Some(a)) if a.status < 200 => at += a.head_len,
                        Ok(Some(a)) => {
                            let body = answer.len() - at - a.head_len;
                            return match a.body {
                                AnswerBody::None => true,
                                AnswerBody::Length(n) => body as u64 >= n,
                                AnswerBody::Chunked | AnswerBody::UntilClose => false,
                            };
                        }
                        Ok(None) => return false,
                        Err(_) => return true,
                    }
                }
            }
        }
    }
}

/// Waits until the app's socket has something, and reads it into `answer`.
async fn app_said(app: &TcpStream, answer: &mut Vec<u8>) -> Said {
    if app.readable().await.is_err() {
        return Said::Gone;
    }
    answer.reserve(READ);
    match app.try_read_buf(answer) {
        Ok(0) => Said::Gone,
        Ok(_) => Said::Bytes,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Said::Nothing,
        Err(_) => Said::Gone,
    }
}

/// Connects to the app (what fails here fails before the request went anywhere).
async fn connect(upstream: &Upstream) -> Result<TcpStream, ConnectError> {
    let s = TcpStream::connect(upstream.authority())
        .await
        .map_err(ConnectError)?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Whether a kept connection to the app is still open with nothing unasked-for on it
/// (the app closes idle connections when it likes). No system call unless the socket
/// has signalled something since its last read.
fn open_and_quiet(c: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match c.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            matches!(c.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

/// Waits until the client's socket has something: `true` when the client closed (or
/// broke) it; bytes it sent meanwhile (its next request) are kept in `buf`, up to a
/// head's worth (after that this waits no more, and the call runs to its end).
async fn client_gone(client: &TcpStream, buf: &mut Vec<u8>, max: usize) -> bool {
    if buf.len() > max {
        std::future::pending::<()>().await;
    }
    loop {
        if client.readable().await.is_err() {
            return true;
        }
        buf.reserve(READ);
        match client.try_read_buf(buf) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return true,
        }
    }
}

/// A `date` field line of now. A proxy forwarding an answer without one adds it (RFC
/// 9110, 6.6.1), as hyper's server and nginx do; formatted once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, date)| {
        if *at != secs || date.is_empty() {
            *at = secs;
            *date = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

/// Drops the first `n` bytes of `buf`.
fn consume(buf: &mut Vec<u8>, n: usize) {
    if n >= buf.len() {
        buf.clear();
    } else {
        buf.drain(..n);
    }
}

/// The method and target of a head the edge policy accepted (`METHOD SP target SP
/// version`).
fn request_line(head: &[u8]) -> (&[u8], &[u8]) {
    let line = &head[..memchr::memchr(b'\r', head).unwrap_or(head.len())];
    let mut parts = line.splitn(3, |b| *b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    (method, target)
}

/// The field lines of a head: `(name, value, the line without its line end)`. A request
/// head's lines end in CRLF (the edge checked); an answer's may end in a bare LF.
fn field_lines(head: &[u8]) -> impl Iterator<Item = (&[u8], &[u8], &[u8])> {
    let start = memchr::memchr(b'\n', head).map_or(head.len(), |n| n + 1);
    let mut rest = &head[start..];
    std::iter::from_fn(move || {
        let nl = memchr::memchr(b'\n', rest)?;
        let line = &rest[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        rest = &rest[nl + 1..];
        if line.is_empty() {
            return None;
        }
        let colon = memchr::memchr(b':', line)?;
        Some((&line[..colon], line[colon + 1..].trim_ascii(), line))
    })
}

/// The names a request's `Connection` fields list, as ranges of `head` (into `out`), and
/// whether one is `close`, and whether the head has `Expect` (`100-continue`); `None`
/// for a head the lane does not take (more names than `out` holds).
fn connection_tokens(
    head: &[u8],
    out: &mut [(usize, usize); MAX_CONNECTION_TOKENS],
) -> Option<(usize, bool, bool)> {
    let (mut n, mut close, mut expect) = (0, false, false);
    for (name, value, _) in field_lines(head) {
        if name.eq_ignore_ascii_case(b"expect") {
            expect = true; // `100-continue`: the edge policy refuses any other
            continue;
        }
        if !name.eq_ignore_ascii_case(b"connection") {
            continue;
        }
        for token in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if token.is_empty() {
                continue;
            }
            close |= token.eq_ignore_ascii_case(b"close");
            if n == out.len() {
                return None;
            }
            let at = token.as_ptr() as usize - head.as_ptr() as usize;
            out[n] = (at, at + token.len());
            n += 1;
        }
    }
    Some((n, close, expect))
}

/// Writes the head the app gets into `out`: the request line with `target` (`(method,
/// target)`, the target maybe shortened), and the field lines of `head` without its
/// hop-by-hop ones and those `listed` (ranges of `head`).
fn rebuild_head(
    head: &[u8],
    (method, target): (&[u8], &[u8]),
    listed: &[(usize, usize)],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(method);
    out.push(b' ');
    if target.first() != Some(&b'/') {
        out.push(b'/'); // the path was all prefix: `/ns/name` or `/ns/name?q`
    }
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    copy_fields(head, listed, out);
    out.extend_from_slice(b"\r\n");
}

/// Copies the field lines of `head` into `out` (CRLF line ends), except hop-by-hop ones
/// and those `listed` by a `Connection` field (ranges of `head`).
fn copy_fields(head: &[u8], listed: &[(usize, usize)], out: &mut Vec<u8>) {
    for (name, _, line) in field_lines(head) {
        let named = listed
            .iter()
            .any(|&(a, b)| head[a..b].eq_ignore_ascii_case(name));
        let hop = std::str::from_utf8(name).is_ok_and(is_hop_by_hop);
        if !hop && !named {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// An answer's head, parsed.
struct Answer {
    head_len: usize,
    status: u16,
    body: AnswerBody,
    /// The app keeps the connection open after this answer.
    keep_alive: bool,
    /// It has a `Date` field.
    dated: bool,
}

/// Parses the answer head at the start of `buf`: `None` while incomplete.
fn parse_answer(buf: &[u8], head_method: bool) -> Result<Option<Answer>, BoxError> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_ANSWER_FIELDS];
    let mut r = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut r,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the app's answer is not HTTP/1.1: {e}").into()),
    };
    let status = r.code.unwrap_or_default();
    let http11 = r.version == Some(1);
    if status == 101 {
        return Err("the app switched protocols when no upgrade was asked for".into());
    }
    let (mut length, mut chunked, mut coded, mut close, mut keep) =
        (None, false, false, false, false);
    let mut dated = false;
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("date") {
            dated = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("the app's answer has an invalid Content-Length")?;
            if length.is_some_and(|l| l != v) {
                return Err("the app's answer has two different Content-Lengths".into());
            }
            length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            coded = true;
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                close |= t.eq_ignore_ascii_case(b"close");
                keep |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let body = if head_method || status < 200 || status == 204 || status == 304 {
        AnswerBody::None
    } else if coded {
        if chunked {
            AnswerBody::Chunked
        } else {
            AnswerBody::UntilClose
        }
    } else {
        match length {
            Some(n) => AnswerBody::Length(n),
            None => AnswerBody::UntilClose,
        }
    };
    let keep_alive = !close && (http11 || keep) && body != AnswerBody::UntilClose;
    Ok(Some(Answer {
        head_len,
        status,
        body,
        keep_alive,
        dated,
    }))
}

impl Answer {
    /// The head the client gets: HTTP/1.1, the app's status and fields minus hop-by-hop
    /// ones (and those its `Connection` lists), framing as this proxy sends the body.
    fn write_head(&self, buf: &[u8], close: bool, out: &mut Vec<u8>) {
        let head = &buf[..self.head_len];
        let line_end = memchr::memchr(b'\n', head).unwrap_or(0);
        let line_end = if line_end > 0 && head[line_end - 1] == b'\r' {
            line_end - 1
        } else {
            line_end
        };
        // `HTTP/1.x SP code SP reason`: the client speaks 1.1 whatever the app does.
        out.extend_from_slice(b"HTTP/1.1");
        out.extend_from_slice(&head[8.min(line_end)..line_end]);
        out.extend_from_slice(b"\r\n");
        let mut listed = [(0usize, 0usize); MAX_CONNECTION_TOKENS];
        let mut n = 0;
        for (name, value, _) in field_lines(head) {
            if name.eq_ignore_ascii_case(b"connection") {
                for t in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if !t.is_empty() && n < listed.len() {
                        let at = t.as_ptr() as usize - head.as_ptr() as usize;
                        listed[n] = (at, at + t.len());
                        n += 1;
                    }
                }
            }
        }
        copy_fields(head, &listed[..n], out);
        if !self.dated {
            push_date(out);
        }
        match self.body {
            AnswerBody::Chunked | AnswerBody::UntilClose => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n")
            }
            AnswerBody::None | AnswerBody::Length(_) => {}
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Where a chunked body being copied through stands.
#[derive(Debug, Default)]
enum Chunks {
    #[default]
    Line,
    Data(u64),
    DataEnd,
    Trailer(HeadScan),
}

impl Chunks {
    /// How many bytes at the start of `buf` are framed (may go to the client), and whether
    /// the body ends with them.
    fn frame(&mut self, buf: &[u8], limits: &edge::Limits) -> Result<(usize, bool), BoxError> {
        let mut pos = 0;
        loop {
            let rest = &buf[pos..];
            match self {
                Chunks::Line => match edge::chunk_line(rest).map_err(refused)? {
                    None => return Ok((pos, false)),
                    Some((n, 0)) => {
                        pos += n;
                        *self = Chunks::Trailer(HeadScan::default());
                    }
                    Some((n, size)) => {
                        pos += n;
                        *self = Chunks::Data(size);
                    }
                },
                Chunks::Data(left) => {
                    if rest.is_empty() {
                        return Ok((pos, false));
                    }
                    let take = (*left).min(rest.len() as u64);
                    pos += take as usize;
                    *left -= take;
                    if *left == 0 {
                        *self = Chunks::DataEnd;
                    }
                }
                Chunks::DataEnd => match rest {
                    [] | [b'\r'] => return Ok((pos, false)),
                    [b'\r', b'\n', ..] => {
                        pos += 2;
                        *self = Chunks::Line;
                    }
                    _ => return Err("a chunk of the app's answer is longer than its size".into()),
                },
                Chunks::Trailer(at) => match edge::trailer(rest, at, limits).map_err(refused)? {
                    None => return Ok((pos, false)),
                    Some(n) => return Ok((pos + n, true)),
                },
            }
        }
    }
}

fn refused(r: edge::Refusal) -> BoxError {
    format!("the app's chunked answer is not valid: {}", r.detail).into()
}

/// Appends `n` in lower-case hex.
fn push_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (i * 4)) & 0xf]);
    }
}

#[cfg(test)]
mod tests;
