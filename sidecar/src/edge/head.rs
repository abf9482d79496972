//! A request head, checked whole: where it ends (CRLF line ends only), then the request
//! line and field lines through httparse, then the framing and routing rules httparse
//! leaves to its caller.

use std::mem::MaybeUninit;

use super::{Limits, Refusal};

/// How the body of an accepted request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

/// An accepted request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head, the empty line included.
    pub len: usize,
    pub body: Body,
    /// An HTTP/1.1 request with `Upgrade`: if the app switches protocols, what follows is
    /// no longer HTTP (the service closes the connection when it does not switch).
    pub upgrade: bool,
    /// HTTP/1.1 (not 1.0).
    pub http11: bool,
    /// The head has a hop-by-hop field (`Connection`, `Keep-Alive`, `Upgrade`, … — see
    /// [`crate::upstream::HOP_BY_HOP`]) or `Expect`: it cannot go to the app byte for byte.
    pub hop: bool,
}

/// Where the search for the end of a head (or a trailer section) stands, so that one
/// arriving in pieces is searched once, not once per piece.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeadScan {
    /// Bytes from the start known to hold no CR or LF past `line`.
    scanned: usize,
    /// Where the current line starts.
    line: usize,
}

/// The length of the head at the start of `buf` (through its first empty line), `None`
/// when `buf` ends inside it. Every line must end in CRLF: a bare CR or LF is refused.
pub fn find_head_end(buf: &[u8], at: &mut HeadScan) -> Result<Option<usize>, Refusal> {
    let mut i = at.scanned;
    while let Some(k) = memchr::memchr2(b'\r', b'\n', &buf[i..]) {
        let p = i + k;
        if buf[p] == b'\n' {
            return Err(Refusal::bad("a bare LF ends a line; lines end in CRLF"));
        }
        match buf.get(p + 1) {
            None => {
                at.scanned = p;
                return Ok(None);
            }
            Some(b'\n') => {}
            Some(_) => return Err(Refusal::bad("a bare CR in a line; lines end in CRLF")),
        }
        if p == at.line {
            return Ok(Some(p + 2));
        }
        at.line = p + 2;
        i = p + 2;
    }
    at.scanned = buf.len();
    Ok(None)
}

/// Checks a whole head (as found by [`find_head_end`]).
pub fn check_head(buf: &[u8], limits: &Limits) -> Result<Head, Refusal> {
    const STACK: usize = 100;
    let mut on_stack: [MaybeUninit<httparse::Header<'_>>; STACK] =
        [const { MaybeUninit::uninit() }; STACK];
    let mut on_heap: Vec<MaybeUninit<httparse::Header<'_>>>;
    let headers: &mut [MaybeUninit<httparse::Header<'_>>] = if limits.max_headers <= STACK {
        &mut on_stack[..limits.max_headers]
    } else {
        on_heap = (0..limits.max_headers)
            .map(|_| MaybeUninit::uninit())
            .collect();
        &mut on_heap
    };
    if buf.starts_with(b"\r\n") {
        // RFC 9112 2.2 lets a server skip it; Go's net/http refuses it, and so do we.
        return Err(Refusal::bad("an empty line before the request line"));
    }
    let mut req = httparse::Request::new(&mut []);
    match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, headers)
    {
        Ok(httparse::Status::Complete(n)) if n == buf.len() => {}
        Ok(_) => return Err(Refusal::bad("the request head is not complete")),
        Err(e) => return Err(parse_error(e, buf, limits)),
    }
    let method = req.method.unwrap_or_default().as_bytes();
    let target = req.path.unwrap_or_default().as_bytes();
    let http11 = req.version == Some(1);

    if !method
        .iter()
        .all(|b| b.is_ascii_uppercase() || *b == b'-' || *b == b'_')
    {
        return Err(Refusal::bad("the method is not an upper-case token"));
    }
    if method == b"TRACE" || method == b"CONNECT" {
        return Err(Refusal::new(
            405,
            format!(
                "{} is not served here",
                String::from_utf8_lossy(method).into_owned()
            ),
        ));
    }

    let (mut host, mut hosts) = (None, 0);
    let (mut length, mut lengths) = (None, 0);
    let mut codings = 0;
    let mut upgrade = false;
    let mut hop = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        hop = hop || crate::upstream::is_hop_by_hop(h.name);
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            host = Some(value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            length = Some(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings += 1;
            // Exactly `chunked`: a list, a parameter or another coding is a coding we do
            // not speak. Spaces around it are fine, a tab is not (nginx reads it as part
            // of the coding; httparse trims it).
            if !value.eq_ignore_ascii_case(b"chunked") || !spaces_around(buf, h.name, value) {
                return Err(Refusal::new(
                    501,
                    format!(
                        "Transfer-Encoding {:?} is not implemented: only \"chunked\" is",
                        String::from_utf8_lossy(value)
                    ),
                ));
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            hop = true;
            if !value.eq_ignore_ascii_case(b"100-continue") {
                return Err(Refusal::new(
                    417,
                    "the only expectation met here is Expect: 100-continue",
                ));
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = http11;
        }
    }

    if hosts > 1 {
        return Err(Refusal::bad("more than one Host header field"));
    }
    if http11 && hosts == 0 {
        return Err(Refusal::bad(
            "an HTTP/1.1 request needs a Host header field",
        ));
    }
    if let Some(h) = host {
        if !valid_authority(h) {
            return Err(Refusal::bad(
                "the Host header field is not a valid host[:port]",
            ));
        }
    }
    check_target(method, target, host)?;

    let body = match (codings, lengths) {
        (0, 0) => Body::None,
        (0, 1) => Body::Length(parse_length(length.unwrap_or_default())?),
        (0, _) => return Err(Refusal::bad("more than one Content-Length header field")),
        (_, n) if n > 0 => {
            return Err(Refusal::bad(
                "both Transfer-Encoding and Content-Length: the body's length is ambiguous",
            ))
        }
        _ if !http11 => {
            return Err(Refusal::bad(
                "Transfer-Encoding in an HTTP/1.0 request (HTTP/1.0 has no chunked bodies)",
            ))
        }
        (1, _) => Body::Chunked,
        _ => return Err(Refusal::bad("more than one Transfer-Encoding header field")),
    };
    Ok(Head {
        len: buf.len(),
        body,
        upgrade,
        http11,
        hop,
    })
}

/// Whether only spaces stand between a field's colon and its value, and after the value
/// on its line (`value` and `name` are slices of `buf`, as httparse gives them).
fn spaces_around(buf: &[u8], name: &str, value: &[u8]) -> bool {
    let at = |p: *const u8| p as usize - buf.as_ptr() as usize;
    let colon = at(name.as_ptr()) + name.len();
    let (start, end) = (at(value.as_ptr()), at(value.as_ptr()) + value.len());
    let line_end = memchr::memchr(b'\r', &buf[end..]).map_or(buf.len(), |n| end + n);
    buf[colon + 1..start]
        .iter()
        .chain(&buf[end..line_end])
        .all(|b| *b == b' ')
}

fn parse_error(e: httparse::Error, buf: &[u8], limits: &Limits) -> Refusal {
    match e {
        httparse::Error::TooManyHeaders => Refusal::new(
            431,
            format!(
                "the request head has more than {} header fields",
                limits.max_headers
            ),
        ),
        httparse::Error::Version if names_other_version(buf) => {
            Refusal::new(505, "only HTTP/1.1 and HTTP/1.0 are spoken here")
        }
        httparse::Error::Version | httparse::Error::Token | httparse::Error::Status => {
            Refusal::bad("the request line is not METHOD SP target SP HTTP/1.x")
        }
        httparse::Error::HeaderName => Refusal::bad(
            "a header field line is not valid (a name is a token followed at once by ':'; no obs-fold)",
        ),
        httparse::Error::HeaderValue => {
            Refusal::bad("a header field value holds a control character")
        }
        httparse::Error::NewLine => Refusal::bad("lines of the request head end in CRLF"),
    }
}

/// Whether the request line ends in `HTTP/d.d` other than 1.0 and 1.1 (a version we do
/// not speak: 505, not 400).
fn names_other_version(buf: &[u8]) -> bool {
    let start = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(0);
    let line = &buf[start..];
    let line = &line[..memchr::memchr(b'\r', line).unwrap_or(line.len())];
    matches!(line.rsplit(|b| *b == b' ').next(),
        Some([b'H', b'T', b'T', b'P', b'/', a, b'.', b])
            if a.is_ascii_digit() && b.is_ascii_digit() && !(*a == b'1' && matches!(b, b'0' | b'1')))
}

/// `Content-Length`: 1 to 19 digits, nothing else (no sign, no list, no spaces inside).
fn parse_length(v: &[u8]) -> Result<u64, Refusal> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(Refusal::bad(
            "Content-Length is not a number of bytes (digits only)",
        ));
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The request target: origin-form, absolute-form naming the Host, or `*` for OPTIONS.
fn check_target(method: &[u8], target: &[u8], host: Option<&[u8]>) -> Result<(), Refusal> {
    const MAX_TARGET: usize = u16::MAX as usize - 1; // what hyper accepts
    if target.len() > MAX_TARGET {
        return Err(Refusal::new(414, "the request target is too long"));
    }
    if target == b"*" {
        return if method == b"OPTIONS" {
            Ok(())
        } else {
            Err(Refusal::bad("the target * is for OPTIONS only"))
        };
    }
    if target.first() == Some(&b'/') {
        return if valid_path_and_query(target) {
            Ok(())
        } else {
            Err(Refusal::bad(
                "the request target holds bytes a URI cannot (or a fragment)",
            ))
        };
    }
    let rest = strip_prefix_ignore_case(target, b"http://")
        .or_else(|| strip_prefix_ignore_case(target, b"https://"))
        .ok_or_else(|| {
            Refusal::bad("the request target is neither a path (/…) nor an http(s) URL")
        })?;
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if !valid_authority(authority) {
        return Err(Refusal::bad(
            "the request target's authority is not a valid host[:port]",
        ));
    }
    if let Some(h) = host {
        if !h.eq_ignore_ascii_case(authority) {
            return Err(Refusal::bad(
                "the request target names another host than the Host header field",
            ));
        }
    }
    let ok = match path.first() {
        None => true,
        Some(b'/') => valid_path_and_query(path),
        Some(b'?') => valid_path_and_query(&[b"/", path].concat()),
        Some(_) => false,
    };
    if !ok {
        return Err(Refusal::bad(
            "the request target holds bytes a URI cannot (or a fragment)",
        ));
    }
    Ok(())
}

fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    (s.len() >= prefix.len() && s[..prefix.len()].eq_ignore_ascii_case(prefix))
        .then(|| &s[prefix.len()..])
}

/// A path and query as hyper's URI parser takes them (the `http` crate's tables), except
/// that a fragment is refused (it never belongs in a request); high bytes must be UTF-8.
fn valid_path_and_query(t: &[u8]) -> bool {
    let mut query = false;
    let mut high = false;
    for &b in t {
        let ok = match b {
            b'?' if !query => {
                query = true;
                true
            }
            0x80..=0xFF => {
                high = true;
                true
            }
            _ if query => matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E),
            _ => {
                matches!(b, 0x21 | 0x22 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7B | 0x7C | 0x7D | 0x7E)
            }
        };
        if !ok {
            return false;
        }
    }
    !high || std::str::from_utf8(t).is_ok()
}

/// `host [":" port]` (RFC 3986): a reg-name, an IPv4 address or a bracketed IPv6
/// address, and 1 to 5 port digits.
pub fn valid_authority(a: &[u8]) -> bool {
    let (host, port) = if a.first() == Some(&b'[') {
        let Some(close) = a.iter().position(|b| *b == b']') else {
            return false;
        };
        let inner = &a[1..close];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
        {
            return false;
        }
        (&a[..=close], &a[close + 1..])
    } else {
        let end = a.iter().position(|b| *b == b':').unwrap_or(a.len());
        (&a[..end], &a[end..])
    };
    if host.is_empty() {
        return false;
    }
    if host[0] != b'[' && !reg_name(host) {
        return false;
    }
    match port {
        [] => true,
        [b':', digits @ ..] => {
            !digits.is_empty() && digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit)
        }
        _ => false,
    }
}

/// unreserved / pct-encoded / sub-delims.
fn reg_name(h: &[u8]) -> bool {
    let mut i = 0;
    while i < h.len() {
        let b = h[i];
        if b == b'%' {
            if !(h.len() > i + 2 && h[i + 1].is_ascii_hexdigit() && h[i + 2].is_ascii_hexdigit()) {
                return false;
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            ))
        {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head_bytes: 64 * 1024,
        max_headers: 100,
    };

    fn head(raw: &str) -> Result<Head, Refusal> {
        let raw = raw.as_bytes();
        let mut at = HeadScan::default();
        let n = find_head_end(raw, &mut at)?.expect("a whole head");
        assert_eq!(n, raw.len(), "the test head has bytes after its end");
        check_head(raw, &LIMITS)
    }

    fn status(raw: &str) -> u16 {
        match head(raw) {
            Ok(_) => 200,
            Err(r) => r.status,
        }
    }

    #[test]
    fn plain_requests_pass_with_their_framing() {
        let h = head("GET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!((h.body, h.upgrade), (Body::None, false));
        let h =
            head("POST /x?y=1 HTTP/1.1\r\nHost: a:8080\r\nContent-Length: 012\r\n\r\n").unwrap();
        assert_eq!(h.body, Body::Length(12));
        let h = head("POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(h.body, Body::Chunked);
        let h =
            head("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
                .unwrap();
        assert!(h.upgrade);
        assert!(
            !head("GET / HTTP/1.0\r\nUpgrade: websocket\r\n\r\n")
                .unwrap()
                .upgrade
        );
        assert_eq!(status("\r\n"), 400, "an empty line before the request line");
        assert_eq!(status("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"), 200);
        assert_eq!(
            status("GET http://a:1/p HTTP/1.1\r\nHost: A:1\r\n\r\n"),
            200
        );
        assert_eq!(
            status("GET /%C3%A9/\u{e9}?q={\"a\"} HTTP/1.1\r\nHost: a\r\n\r\n"),
            400,
            "'\"' is not allowed in a query"
        );
        assert_eq!(
            status("GET /\u{e9}/{\"a\"}?q=[1] HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            200
        );
        assert_eq!(
            status(
                "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n"
            ),
            200
        );
    }

    #[test]
    fn transfer_encoding_is_exactly_chunked() {
        for te in [
            "gzip, chunked",
            "chunked, chunked",
            "x-chunked",
            "identity",
            "\"chunked\"",
            ",chunked",
            "chunked;q=1",
            "\u{a0}chunked",
            "chunked\t",
            "\tchunked",
            " \tchunked ",
            "chunked \t",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert_eq!(status(&raw), 501, "{te:?}");
        }
        for te in ["chunked", " Chunked  ", "   chunked"] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:{te}\r\n\r\n");
            assert_eq!(head(&raw).map(|h| h.body), Ok(Body::Chunked), "{te:?}");
        }
        assert_eq!(status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
        assert_eq!(status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"), 400);
        assert_eq!(status("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n"),
            400
        );
    }

    #[test]
    fn content_length_is_one_number() {
        for cl in [
            "+5",
            "-1",
            "0x5",
            "5, 5",
            "5,5",
            "1 0",
            "",
            "1_0",
            "99999999999999999999",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {cl}\r\n\r\n");
            assert_eq!(status(&raw), 400, "{cl:?}");
        }
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            400
        );
    }

    #[test]
    fn line_ends_whitespace_and_control_bytes() {
        for raw in [
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\rX: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /\r\n\r\n",
            "get / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(
                match find_head_end(raw.as_bytes(), &mut HeadScan::default()) {
                    Err(r) => r.status,
                    Ok(Some(_)) => status(raw),
                    Ok(None) => 0,
                },
                400,
                "{raw:?}"
            );
        }
    }

    #[test]
    fn host_and_target() {
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.0\r\n\r\n"), 200);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"), 400);
        for h in [
            "a/b", "a b", "u@a", "a:", "a:x", "a:123456", "", "[zz]", "[::1",
        ] {
            let raw = format!("GET / HTTP/1.1\r\nHost: {h}\r\n\r\n");
            assert_eq!(status(&raw), 400, "{h:?}");
        }
        assert_eq!(status("GET http://b/ HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET http://u@a/ HTTP/1.1\r\nHost: u@a\r\n\r\n"), 400);
        assert_eq!(status("GET ! HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET * HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("TRACE / HTTP/1.1\r\nHost: a\r\n\r\n"), 405);
        assert_eq!(status("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"), 405);
    }

    #[test]
    fn versions_and_expectations() {
        assert_eq!(status("GET / HTTP/1.2\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(status("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 505);
        assert_eq!(status("GET / HTTP/1.10\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET / http/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET / x HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n"),
            417
        );
    }

    #[test]
    fn too_many_fields_is_431() {
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..100 {
            raw += &format!("X-{i}: v\r\n");
        }
        raw += "\r\n";
        assert_eq!(status(&raw), 431);
    }

    #[test]
    fn the_end_is_found_across_pieces() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT";
        for cut in 0..raw.len() {
            let mut at = HeadScan::default();
            let first = find_head_end(&raw[..cut], &mut at).unwrap();
            let end = first.or_else(|| find_head_end(raw, &mut at).unwrap());
            assert_eq!(end, Some(raw.len() - 4), "cut at {cut}");
        }
    }
}
