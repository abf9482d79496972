//! The guard as an I/O object: hyper reads the connection through it, and gets only the
//! bytes the [`Scanner`] has framed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::scanner::{Refused, Scanner};
use super::{Limits, Shared};

/// What hyper reads in place of a refused request; the service answers it with the
/// refusal [`Shared`] holds for its index.
const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nhost: refused.invalid\r\n\r\n";
/// Reads into the guard's own buffer (only while a head or a line is split across
/// reads; otherwise bytes go straight into hyper's buffer).
const HELD_READ: usize = 8 * 1024;
/// After a refusal, what the client still sends is read and dropped for this long, or up
/// to this much, before the socket closes: closing with unread bytes would reset the
/// connection and could destroy the answer in flight (nginx's lingering close).
const LINGER: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
enum End {
    /// Reading and framing.
    Open,
    /// Refused: this much of [`STAND_IN`] went to hyper already.
    StandIn(usize),
    /// Refused inside a body hyper is reading: its next read fails.
    Fail,
    /// Nothing more is read.
    Stopped,
}

enum Linger {
    No,
    Due,
    Draining {
        until: Pin<Box<tokio::time::Sleep>>,
        left: usize,
    },
    Done,
}

/// A connection as hyper should see it: only framed bytes in, everything out.
pub struct Guarded<T> {
    io: T,
    scanner: Scanner,
    shared: Arc<Shared>,
    /// Bytes read but not given to hyper: `held[given..framed]` are framed, the rest is
    /// an element (a head, a chunk line) still incomplete.
    held: Vec<u8>,
    given: usize,
    framed: usize,
    end: End,
    linger: Linger,
    /// `held` holds bytes read before the guard took the connection, not yet scanned.
    unscanned: bool,
}

impl<T> Guarded<T> {
    pub fn new(io: T, limits: Limits, shared: Arc<Shared>) -> Guarded<T> {
        Guarded::with_prefix(io, Vec::new(), limits, shared)
    }

    /// A guard over a connection of which `read` was already read (by the fast lane,
    /// `crate::api::fast`, handing the connection over): those bytes come first.
    pub fn with_prefix(io: T, read: Vec<u8>, limits: Limits, shared: Arc<Shared>) -> Guarded<T> {
        Guarded {
            io,
            scanner: Scanner::new(limits),
            shared,
            unscanned: !read.is_empty(),
            held: read,
            given: 0,
            framed: 0,
            end: End::Open,
            linger: Linger::No,
        }
    }

    /// The connection and the bytes read from it but not yet given to hyper: after a
    /// protocol switch the splice takes the socket itself (no guard, no hyper layers).
    pub fn into_inner(mut self) -> (T, Vec<u8>) {
        let rest = self.held.split_off(self.given);
        (self.io, rest)
    }

    fn refuse(&mut self, r: Refused) {
        tracing::debug!(status = r.refusal.status, detail = %r.refusal.detail, "request refused by the edge policy");
        self.shared.refuse(r.request, r.refusal);
        self.end = if r.whole { End::StandIn(0) } else { End::Fail };
        self.linger = Linger::Due;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.unscanned {
                this.unscanned = false;
                let scan = this.scanner.scan(&this.held);
                this.framed = scan.accepted;
                if let Some(r) = scan.refused {
                    this.held.truncate(scan.accepted);
                    this.refuse(r);
                }
                continue;
            }
            if this.given < this.framed {
                let n = (this.framed - this.given).min(out.remaining());
                out.put_slice(&this.held[this.given..this.given + n]);
                this.given += n;
                if this.given == this.framed {
                    // Keep only the incomplete rest, at the front.
                    this.held.drain(..this.given);
                    (this.given, this.framed) = (0, 0);
                }
                return Poll::Ready(Ok(()));
            }
            match this.end {
                End::Open => {}
                End::StandIn(at) => {
                    let n = (STAND_IN.len() - at).min(out.remaining());
                    out.put_slice(&STAND_IN[at..at + n]);
                    this.end = if at + n == STAND_IN.len() {
                        End::Stopped
                    } else {
                        End::StandIn(at + n)
                    };
                    return Poll::Ready(Ok(()));
                }
                End::Fail => {
                    this.end = End::Stopped;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the request body breaks the HTTP/1.1 framing rules of this server",
                    )));
                }
                // Never woken: hyper answers what it has and closes.
                End::Stopped => return Poll::Pending,
            }
            if out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let refused = if this.held.is_empty() {
                // The common case: read straight into hyper's buffer and frame in place;
                // only an incomplete head or line at the end moves to `held`.
                let before = out.filled().len();
                ready!(Pin::new(&mut this.io).poll_read(cx, out))?;
                let new = &out.filled()[before..];
                if new.is_empty() || this.scanner.passthrough() {
                    return Poll::Ready(Ok(())); // EOF, or no longer HTTP
                }
                let scan = this.scanner.scan(new);
                if scan.refused.is_none() {
                    this.held.extend_from_slice(&new[scan.accepted..]);
                }
                out.set_filled(before + scan.accepted);
                if scan.accepted > 0 {
                    if let Some(r) = scan.refused {
                        this.refuse(r);
                    }
                    return Poll::Ready(Ok(()));
                }
                scan.refused
            } else {
                let len = this.held.len();
                this.held.resize(len + HELD_READ, 0);
                let mut buf = ReadBuf::new(&mut this.held[len..]);
                let r = Pin::new(&mut this.io).poll_read(cx, &mut buf);
                let n = buf.filled().len();
                this.held.truncate(len + n);
                ready!(r)?;
                if n == 0 {
                    return Poll::Ready(Ok(())); // EOF inside an incomplete head or line
                }
                let scan = this.scanner.scan(&this.held);
                this.framed = scan.accepted;
                if scan.refused.is_some() {
                    this.held.truncate(scan.accepted);
                }
                scan.refused
            };
            if let Some(r) = refused {
                this.refuse(r);
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.linger {
                Linger::No | Linger::Done => return Pin::new(&mut this.io).poll_shutdown(cx),
                Linger::Due => {
                    // The answer is out: FIN, then drain.
                    if let Err(e) = ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
                        this.linger = Linger::Done;
                        return Poll::Ready(Err(e));
                    }
                    this.linger = Linger::Draining {
                        until: Box::pin(tokio::time::sleep(LINGER)),
                        left: LINGER_BYTES,
                    };
                }
                Linger::Draining { until, left } => {
                    let mut scratch = [0u8; 2048];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                            *left = left.saturating_sub(buf.filled().len());
                            if *left > 0 {
                                continue;
                            }
                        }
                        Poll::Pending if until.as_mut().poll(cx).is_pending() => {
                            return Poll::Pending
                        }
                        _ => {} // EOF, an error, the deadline or enough bytes
                    }
                    this.linger = Linger::Done;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        max_head_bytes: 1024,
        max_headers: 100,
    };

    /// Everything hyper would read from a guard over `pieces` (each one socket read).
    async fn read_all(pieces: &[&[u8]]) -> (Vec<u8>, io::Result<()>, Arc<Shared>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let shared = Arc::new(Shared::default());
        let mut guard = Guarded::new(server, LIMITS, shared.clone());
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            let mut client = client;
            for p in pieces {
                client.write_all(&p).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
            client
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 7]; // small reads: hyper's buffer may be small too
        let result = loop {
            let read = tokio::time::timeout(Duration::from_secs(1), guard.read(&mut buf)).await;
            match read {
                Ok(Ok(0)) => break Ok(()),
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => break Err(e),
                Err(_) => break Ok(()), // stopped: nothing more is read
            }
        };
        drop(writer.await.unwrap());
        (out, result, shared)
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n";

    #[tokio::test(start_paused = true)]
    async fn framed_bytes_pass_whatever_the_reads() {
        let post = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let all = [GET, &post[..], GET].concat();
        for cut in 0..all.len() {
            let (out, r, _) = read_all(&[&all[..cut], &all[cut..]]).await;
            assert!(r.is_ok(), "cut at {cut}");
            assert_eq!(out, all, "cut at {cut}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_read_before_the_guard_come_first_framed_as_any() {
        // What the fast lane read: a whole request, then half of the next head.
        let (client, server) = tokio::io::duplex(64 * 1024);
        let shared = Arc::new(Shared::default());
        let post = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab";
        let prefix = [&post[..], &GET[..10]].concat();
        let mut guard = Guarded::with_prefix(server, prefix, LIMITS, shared.clone());
        let mut client = client;
        client.write_all(&GET[10..]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = guard.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, [&post[..], GET].concat());
        // A refusal among them is the stand-in, as when read by the guard itself.
        let (_client, server) = tokio::io::duplex(1024);
        let bad = b"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n";
        let shared = Arc::new(Shared::default());
        let mut guard =
            Guarded::with_prefix(server, [GET, &bad[..]].concat(), LIMITS, shared.clone());
        let mut out = vec![0u8; 1024];
        let n = guard.read(&mut out).await.unwrap();
        let m = guard.read(&mut out[n..]).await.unwrap();
        assert_eq!(&out[..n + m], [GET, STAND_IN].concat());
        assert_eq!(shared.refusal(1).map(|r| r.status), Some(400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_head_becomes_the_stand_in() {
        let bad = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy";
        let (out, r, shared) = read_all(&[GET, bad, GET]).await;
        assert!(r.is_ok());
        assert_eq!(out, [GET, STAND_IN].concat());
        assert_eq!(shared.refusal(0), None);
        assert_eq!(shared.refusal(1).map(|r| r.status), Some(400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_going_wrong_after_its_head_fails() {
        let head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n";
        let (out, r, shared) = read_all(&[head, b"zz\r\nab\r\n0\r\n\r\n"]).await;
        assert_eq!(out, head);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::InvalidData);
        assert_eq!(shared.refusal(0).map(|r| r.status), Some(400));
    }
}
