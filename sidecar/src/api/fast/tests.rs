use super::*;

const LIMITS: edge::Limits = edge::Limits {
    max_head_bytes: 1024,
    max_headers: 100,
};

#[test]
fn the_request_line_gives_method_and_target() {
    let head = b"POST /a/b?c=d HTTP/1.1\r\nHost: h\r\n\r\n";
    assert_eq!(request_line(head), (&b"POST"[..], &b"/a/b?c=d"[..]));
}

#[test]
fn hop_by_hop_fields_and_those_connection_lists_are_not_forwarded() {
    let head =
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\n\
x-secret: 1\r\nX-Kept: 2\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n\r\n";
    let mut listed = [(0, 0); MAX_CONNECTION_TOKENS];
    let (n, close, _) = connection_tokens(head, &mut listed).unwrap();
    assert_eq!((n, close), (2, false));
    let mut out = Vec::new();
    rebuild_head(head, (b"GET", b"/"), &listed[..n], &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "GET / HTTP/1.1\r\nHost: h\r\nX-Kept: 2\r\n\r\n"
    );
}

#[test]
fn a_shortened_target_is_a_path_still() {
    let head = b"POST /ns/fn/run?x=1 HTTP/1.1\r\nHost: h\r\n\r\n";
    for (rest, line) in [
        (&b"/run?x=1"[..], "POST /run?x=1 HTTP/1.1"),
        (b"?x=1", "POST /?x=1 HTTP/1.1"),
        (b"", "POST / HTTP/1.1"),
        (b"//x", "POST //x HTTP/1.1"),
    ] {
        let mut out = Vec::new();
        rebuild_head(head, (b"POST", rest), &[], &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{line}\r\nHost: h\r\n\r\n")
        );
    }
}

#[test]
fn connection_close_and_expect_are_seen_and_long_lists_go_to_hyper() {
    let mut listed = [(0, 0); MAX_CONNECTION_TOKENS];
    let close = b"GET / HTTP/1.1\r\nHost: h\r\nconnection: Close\r\n\r\n";
    assert_eq!(
        connection_tokens(close, &mut listed),
        Some((1, true, false))
    );
    let expect = b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n";
    assert_eq!(
        connection_tokens(expect, &mut listed),
        Some((0, false, true))
    );
    let many = b"GET / HTTP/1.1\r\nHost: h\r\nConnection: a,b,c,d,e,f,g,h,i\r\n\r\n";
    assert_eq!(connection_tokens(many, &mut listed), None);
}

fn answer(raw: &[u8], head_method: bool) -> Answer {
    parse_answer(raw, head_method).unwrap().unwrap()
}

#[test]
fn answers_are_framed_as_rfc_9112_says() {
    let a = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false);
    assert_eq!(
        (a.status, a.body, a.keep_alive, a.head_len),
        (200, AnswerBody::Length(5), true, 38)
    );
    let a = answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        false,
    );
    assert_eq!((a.body, a.keep_alive), (AnswerBody::Chunked, true));
    // Chunked wins over a Content-Length beside it; another last coding reads to the close.
    let a = answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        false,
    );
    assert_eq!(a.body, AnswerBody::Chunked);
    let a = answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
    assert_eq!((a.body, a.keep_alive), (AnswerBody::UntilClose, false));
    // HTTP/1.0: closes unless it says keep-alive; no length reads to the close.
    let a = answer(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
    assert_eq!((a.body, a.keep_alive), (AnswerBody::Length(1), false));
    let a = answer(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
        false,
    );
    assert!(a.keep_alive);
    let a = answer(b"HTTP/1.0 200 OK\r\n\r\n", false);
    assert_eq!(a.body, AnswerBody::UntilClose);
    let a = answer(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
        false,
    );
    assert!(!a.keep_alive);
    // No body: HEAD, 204, 304, interim answers.
    let a = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true);
    assert_eq!(a.body, AnswerBody::None);
    for status in [b"204", b"304", b"103"] {
        let raw = [
            &b"HTTP/1.1 "[..],
            status,
            b" X\r\nContent-Length: 9\r\n\r\n",
        ]
        .concat();
        assert_eq!(answer(&raw, false).body, AnswerBody::None);
    }
    assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Le", false)
        .unwrap()
        .is_none());
}

#[test]
fn broken_answers_are_errors() {
    for raw in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
    ] {
        assert!(
            parse_answer(raw, false).is_err(),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
    // Two equal lengths are one length.
    let a = answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
        false,
    );
    assert_eq!(a.body, AnswerBody::Length(2));
}

#[test]
fn the_clients_head_is_http11_without_hop_by_hop_fields() {
    let raw = b"HTTP/1.0 201 Created\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
Content-Type: text/plain\r\nDate: Fri, 04 Dec 2026 12:00:00 GMT\r\nContent-Length: 2\r\n\r\nok";
    let a = answer(raw, false);
    let mut out = Vec::new();
    a.write_head(raw, false, &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nDate: Fri, 04 Dec 2026 12:00:00 GMT\r\n\
Content-Length: 2\r\n\r\n"
    );
    // Re-chunked, and the client asked to close; an answer without a date gets one.
    let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n";
    let a = answer(raw, false);
    let mut out = Vec::new();
    a.write_head(raw, true, &mut out);
    let out = String::from_utf8(out).unwrap();
    let date = out
        .strip_prefix("HTTP/1.1 200 OK\r\ndate: ")
        .and_then(|rest| {
            rest.strip_suffix("\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        })
        .unwrap_or_else(|| panic!("{out}"));
    assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
}

/// Frames `body` fed in pieces of `step` bytes, as the lane does: what is forwarded, and
/// whether the end was found.
fn frame_in_pieces(body: &[u8], step: usize) -> (Vec<u8>, bool) {
    let mut chunks = Chunks::default();
    let (mut pending, mut out) = (Vec::new(), Vec::new());
    for piece in body.chunks(step) {
        pending.extend_from_slice(piece);
        let (n, done) = chunks.frame(&pending, &LIMITS).unwrap();
        out.extend_from_slice(&pending[..n]);
        pending.drain(..n);
        if done {
            return (out, true);
        }
    }
    (out, false)
}

#[test]
fn a_chunked_answer_is_copied_through_to_its_end_however_it_arrives() {
    let body = b"5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\nX-Trailer: 1\r\n\r\n";
    for step in 1..=body.len() {
        assert_eq!(
            frame_in_pieces(body, step),
            (body.to_vec(), true),
            "step {step}"
        );
    }
    // Bytes after the end are not part of it.
    let mut chunks = Chunks::default();
    assert_eq!(
        chunks.frame(b"0\r\n\r\nHTTP/1.1", &LIMITS).unwrap(),
        (5, true)
    );
    // A chunk longer than its size is an error.
    let mut chunks = Chunks::default();
    assert!(chunks.frame(b"1\r\nab\r\n", &LIMITS).is_err());
}

#[test]
fn hex_sizes() {
    for n in [0usize, 1, 15, 16, 255, 4096, 65535, 1 << 40] {
        let mut out = Vec::new();
        push_hex(&mut out, n);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{n:x}"));
    }
}

#[test]
fn a_plain_request_names_its_fields() {
    let head = b"GET /x HTTP/1.1\r\nHost: h:1\r\nauthorization: Key a:b\r\nX-Empty:\r\n\r\n";
    let plain = Plain {
        head,
        method: b"GET",
        target: b"/x",
        path: b"/x",
        length: 0,
    };
    assert_eq!(plain.field("host"), Some(&b"h:1"[..]));
    assert_eq!(plain.field("Authorization"), Some(&b"Key a:b"[..]));
    assert_eq!(plain.field("x-empty"), Some(&b""[..]));
    assert_eq!(plain.field("cookie"), None);
}

#[test]
fn an_answer_with_bare_lf_line_ends_reaches_the_client_with_crlf() {
    let raw = b"HTTP/1.1 200 OK\nX-A: 1\nConnection: keep-alive\nDate: x\nContent-Length: 2\n\nok";
    let a = answer(raw, false);
    assert_eq!((a.body, a.head_len), (AnswerBody::Length(2), raw.len() - 2));
    let mut out = Vec::new();
    a.write_head(raw, false, &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 200 OK\r\nX-A: 1\r\nDate: x\r\nContent-Length: 2\r\n\r\n"
    );
}
