//! A native WebSocket load generator and echo app for `scripts/bench_ws.py --native`:
//! with Python at both ends the client's own event loop bounds the messages per second
//! and its pace changes from run to run, so the proxies in between are not what is
//! measured. Neither end parses frames, and neither do the proxies: the echo app sends
//! back the bytes it gets after its 101, and the client sends one masked 64-byte text
//! frame per socket and waits for those bytes to return.
//!
//!   ws_load echo [PORT]                    an app ($PORT by default): 101 to an upgrade,
//!                                          200 to anything else
//!   ws_load load HOST:PORT PATH N SECONDS  N sockets echoing at once: messages/s
//!   ws_load rtt HOST:PORT PATH N           one socket, N round trips: p50 and p99 in ms
//!
//! Output is one JSON line.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One masked text frame of 64 bytes (a client's frames are masked; the mask is zero).
fn frame() -> Vec<u8> {
    let mut f = vec![0x81, 0x80 | 64, 0, 0, 0, 0];
    f.extend(std::iter::repeat_n(b'y', 64));
    f
}

async fn head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(1024);
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
    Ok(buf)
}

async fn echo(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (mut s, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let Ok(h) = head(&mut s).await else { return };
            if !String::from_utf8_lossy(&h)
                .to_ascii_lowercase()
                .contains("upgrade: websocket")
            {
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                    )
                    .await;
                return;
            }
            let switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
            if s.write_all(switch).await.is_err() {
                return;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

async fn open(addr: &str, path: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let h = head(&mut s).await?;
    if !h.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other(format!(
            "no switch: {}",
            String::from_utf8_lossy(&h)
        )));
    }
    Ok(s)
}

/// One round trip of `msg` on `s`.
async fn round_trip(s: &mut TcpStream, msg: &[u8], back: &mut [u8]) -> std::io::Result<()> {
    s.write_all(msg).await?;
    s.read_exact(back).await?;
    Ok(())
}

async fn load(addr: String, path: String, sockets: usize, seconds: f64) -> std::io::Result<()> {
    let mut conns = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        conns.push(open(&addr, &path).await?);
    }
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let (msg, mut back) = (frame(), vec![0u8; 70]);
                let mut n = 0u64;
                while Instant::now() < end {
                    round_trip(&mut s, &msg, &mut back).await?;
                    n += 1;
                }
                Ok::<u64, std::io::Error>(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(std::io::Error::other)??;
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    println!("{{\"messages_per_s\": {rate:.0}}}");
    Ok(())
}

async fn rtt(addr: String, path: String, n: usize) -> std::io::Result<()> {
    let mut s = open(&addr, &path).await?;
    let (msg, mut back) = (frame(), vec![0u8; 70]);
    for _ in 0..100 {
        round_trip(&mut s, &msg, &mut back).await?;
    }
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        round_trip(&mut s, &msg, &mut back).await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((p / 100.0) * (ms.len() - 1) as f64).round() as usize];
    println!(
        "{{\"p50_ms\": {:.4}, \"p99_ms\": {:.4}}}",
        at(50.0),
        at(99.0)
    );
    Ok(())
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match arg(0).as_str() {
        "echo" => {
            let port = args.get(1).cloned().or_else(|| std::env::var("PORT").ok());
            let port = port
                .unwrap_or_default()
                .parse()
                .map_err(std::io::Error::other)?;
            rt.block_on(echo(port))
        }
        "load" => rt.block_on(load(
            arg(1),
            arg(2),
            arg(3).parse().map_err(std::io::Error::other)?,
            arg(4).parse().map_err(std::io::Error::other)?,
        )),
        "rtt" => rt.block_on(rtt(
            arg(1),
            arg(2),
            arg(3).parse().map_err(std::io::Error::other)?,
        )),
        _ => Err(std::io::Error::other(
            "usage: ws_load echo [PORT] | load HOST:PORT PATH N SECONDS | rtt HOST:PORT PATH N",
        )),
    }
}
