//! The edge policy: one strict reading of HTTP/1.1 framing on every listener (the
//! sidecar's run, queue, run-host and admin listeners, the gateway's), applied to the raw
//! bytes of a connection before hyper parses them.
//!
//! Why here and not in hyper's service: hyper normalises what matters before a service
//! sees it (a second `Content-Length` line is dropped, `Content-Length` next to
//! `Transfer-Encoding` is removed, `gzip, chunked` counts as chunked, a bare LF ends a
//! line, chunk extensions are skipped unread), and it cannot be configured to refuse
//! those. So [`Guarded`] sits between the socket and hyper: every request head is checked
//! whole ([`head`]: httparse, the parser hyper uses, plus the rules below), every body is
//! framed by the guard itself ([`scanner`]: `Content-Length` counted, chunk-size lines and
//! trailers checked by [`chunked`]), and hyper only gets bytes the guard has framed. Body
//! bytes are never copied: they are read straight into hyper's buffer and only counted.
//!
//! On the first violation nothing more of the connection is read. If hyper has not seen
//! the refused request's head, it gets a stand-in request in its place; the service
//! answers it with the refusal (`{"detail": …}`, `Connection: close`) after any earlier
//! pipelined requests ([`Shared`] tells it which request was refused), and the connection
//! closes. If hyper already has the head (a chunked body going wrong later), the body
//! ends with an error and the service answers with the refusal. After an HTTP/1.1 request
//! with `Upgrade` the guard passes bytes through untouched: they are a WebSocket's after a
//! 101, and the service closes the connection after any other answer to such a request.
//!
//! The rules (RFC 9112, and never laxer than nginx or Go's net/http):
//! - `Transfer-Encoding` exactly `chunked` (one field line, no other coding), else 501;
//!   with `Content-Length`, or in HTTP/1.0, 400;
//! - `Content-Length`: one field line of digits, else 400;
//! - line ends are CRLF: a bare CR or LF anywhere in a head, a chunk line or a trailer is
//!   400; obs-fold, whitespace before a colon, control bytes in a value are 400;
//! - exactly one valid `Host` in HTTP/1.1 (at most one in 1.0); an absolute-form target
//!   must name that host; other target forms than origin, absolute (and `*` for OPTIONS)
//!   are 400; methods are upper-case tokens, TRACE and CONNECT are 405;
//! - chunk sizes are 1 to 16 hex digits; a chunk line's extensions stay under
//!   [`MAX_CHUNK_EXT`] bytes; a trailer section under [`MAX_TRAILER_BYTES`];
//! - `Expect` other than `100-continue` is 417 (hyper answers `100-continue` itself);
//! - a head larger than the listener's limit is 431.

mod chunked;
mod head;
mod io;
mod scanner;

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

pub use chunked::{chunk_line, trailer};
pub use head::{check_head, find_head_end, Body, Head, HeadScan};
pub use io::Guarded;
pub use scanner::{Refused, Scan, Scanner};

/// Longest chunk extension text on one chunk-size line (after the digits).
pub const MAX_CHUNK_EXT: usize = 256;
/// Most hex digits in a chunk size (leading zeros count: 16 digits hold any u64).
pub const MAX_CHUNK_SIZE_DIGITS: usize = 16;
/// Largest trailer section (hyper's own bound is 16 KiB).
pub const MAX_TRAILER_BYTES: usize = 8192;

/// What the guard needs to know about a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request head (request line, field lines, empty line); larger is 431.
    pub max_head_bytes: usize,
    /// Most field lines in a head (and in a trailer section).
    pub max_headers: usize,
}

/// Why a request was refused: the status and the `detail` of the JSON answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub detail: Cow<'static, str>,
}

impl Refusal {
    pub fn bad(detail: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal::new(400, detail)
    }

    pub fn new(status: u16, detail: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal {
            status,
            detail: detail.into(),
        }
    }
}

/// What the guard of one connection tells its service: which request (counted from 0 in
/// the order hyper hands them over) was refused, and why.
#[derive(Debug, Default)]
pub struct Shared {
    requests: AtomicU32,
    refused: AtomicBool,
    refusal: Mutex<Option<(u32, Refusal)>>,
}

impl Shared {
    /// The index of the request the service is about to handle (call once per request).
    pub fn next_request(&self) -> u32 {
        self.requests.fetch_add(1, Ordering::Relaxed)
    }

    /// The refusal of request `index`, if the guard refused it.
    pub fn refusal(&self, index: u32) -> Option<Refusal> {
        if !self.refused.load(Ordering::Acquire) {
            return None;
        }
        let r = self.refusal.lock().unwrap_or_else(|e| e.into_inner());
        r.as_ref()
            .filter(|(i, _)| *i == index)
            .map(|(_, r)| r.clone())
    }

    fn refuse(&self, index: u32, refusal: Refusal) {
        let mut r = self.refusal.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some((index, refusal));
        }
        self.refused.store(true, Ordering::Release);
    }
}

/// Whether a byte may appear in a field value or a chunk extension (HTAB, SP, VCHAR,
/// obs-text).
pub(crate) fn is_field_vchar(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}
