//! The edge guard as a client meets it: raw bytes in, the answers hyper and the service
//! write out, through [`serve`].

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::*;

#[derive(Default)]
struct TestApp {
    calls: AtomicUsize,
    first_frame: Notify,
}

/// `/echo` answers the body; `/frames` tells the test when the first body frame arrived;
/// `/ws` switches to an echo of raw bytes; anything else is 200.
async fn handle(
    app: Arc<TestApp>,
    _: Arc<ConnState>,
    mut req: Request<Incoming>,
) -> Response<Body> {
    app.calls.fetch_add(1, Ordering::SeqCst);
    let answer = |status: StatusCode, body: Bytes| {
        let mut r = Response::new(Body::full(body));
        *r.status_mut() = status;
        r
    };
    match req.uri().path() {
        "/echo" | "/frames" => {
            let mut body = Vec::new();
            let mut first = req.uri().path() == "/frames";
            while let Some(frame) = req.body_mut().frame().await {
                match frame {
                    Ok(f) => body.extend_from_slice(f.data_ref().map_or(&[][..], |d| d)),
                    Err(_) => {
                        return answer(StatusCode::INTERNAL_SERVER_ERROR, "body error".into())
                    }
                }
                if std::mem::take(&mut first) {
                    app.first_frame.notify_one();
                }
            }
            answer(StatusCode::OK, body.into())
        }
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.expect("upgraded"));
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = io.read(&mut buf).await {
                    io.write_all(&buf[..n]).await.expect("echo");
                }
            });
            let mut r = answer(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
            r.headers_mut().insert(
                http::header::UPGRADE,
                http::HeaderValue::from_static("echo"),
            );
            r.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("upgrade"),
            );
            r
        }
        _ => answer(StatusCode::OK, "ok".into()),
    }
}

async fn start() -> (std::net::SocketAddr, Arc<TestApp>, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Arc::new(TestApp::default());
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(serve(
        listener,
        app.clone(),
        handle,
        ConnLimits::default(),
        None,
        stop,
        Duration::from_secs(1),
    ));
    (addr, app, stop_tx)
}

/// Reads until `needle` has arrived (or the server closed).
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) {
    let mut chunk = [0u8; 4096];
    while !buf.windows(needle.len()).any(|w| w == needle) {
        match s.read(&mut chunk).await.unwrap() {
            0 => return,
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn to_end(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn statuses(raw: &str) -> Vec<&str> {
    raw.match_indices("HTTP/1.1 ")
        .map(|(i, _)| &raw[i + 9..i + 12])
        .collect()
}

#[tokio::test]
async fn a_refused_request_is_answered_after_the_good_ones_and_closes() {
    let (addr, app, _stop) = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n\
          GET /b HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .unwrap();
    let out = to_end(&mut s).await;
    assert_eq!(statuses(&out), ["200", "501"], "{out}");
    assert!(out.contains("connection: close"), "{out}");
    assert!(
        out.contains(r#"{"detail":"Transfer-Encoding \"gzip, chunked\""#),
        "{out}"
    );
    assert_eq!(app.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_body_that_breaks_the_rules_after_its_head_is_refused() {
    let (addr, app, _stop) = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /frames HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    )
    .await
    .unwrap();
    app.first_frame.notified().await;
    s.write_all(b"zz\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let out = to_end(&mut s).await;
    assert_eq!(statuses(&out), ["400"], "{out}");
    assert!(out.contains("connection: close"), "{out}");
    assert!(out.contains("chunk size"), "{out}");
}

#[tokio::test]
async fn expect_100_continue_still_works() {
    let (addr, _app, _stop) = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"\r\n\r\n").await;
    assert!(buf.starts_with(b"HTTP/1.1 100 Continue\r\n"), "{buf:?}");
    s.write_all(b"hello").await.unwrap();
    read_until(&mut s, &mut buf, b"hello").await;
    let out = String::from_utf8_lossy(&buf);
    assert_eq!(statuses(&out), ["100", "200"], "{out}");
    assert!(out.ends_with("\r\n\r\nhello"), "{out}");
}

#[tokio::test]
async fn after_a_switch_bytes_pass_untouched() {
    let (addr, _app, _stop) = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Not HTTP, sent with the handshake: the guard must not frame it.
    let raw = b"\r\n\nGET  x\r\n\x00\x81\xff";
    s.write_all(
        &[
            &b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n"[..],
            raw,
        ]
        .concat(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"\x81\xff").await;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(buf.starts_with(b"HTTP/1.1 101 "), "{buf:?}");
    assert_eq!(&buf[head_end..], raw);
    s.write_all(b"Transfer-Encoding: x\r\n").await.unwrap();
    buf.clear();
    read_until(&mut s, &mut buf, b"x\r\n").await;
    assert_eq!(buf, b"Transfer-Encoding: x\r\n");
}

#[tokio::test]
async fn an_upgrade_request_answered_without_a_switch_ends_the_connection() {
    let (addr, app, _stop) = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /a HTTP/1.1\r\nHost: a\r\nUpgrade: other\r\nConnection: upgrade\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .unwrap();
    let out = to_end(&mut s).await;
    assert_eq!(statuses(&out), ["200"], "{out}");
    assert!(out.contains("connection: close"), "{out}");
    assert_eq!(app.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_head_past_the_limit_is_431() {
    let (addr, app, _stop) = start().await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "a".repeat(ConnLimits::default().max_header_bytes)
    );
    s.write_all(big.as_bytes()).await.unwrap();
    let out = to_end(&mut s).await;
    assert_eq!(statuses(&out), ["431"], "{out}");
    assert_eq!(app.calls.load(Ordering::SeqCst), 0);
}
