//! The framing of one connection, as a state machine over its bytes: where each request
//! head ends, how many body bytes follow, where chunk lines and trailers are. It only
//! looks at heads and lines; body bytes are counted, never read.

use super::chunked::{chunk_line, trailer};
use super::head::{check_head, find_head_end, Body, HeadScan};
use super::{Limits, Refusal};

#[derive(Debug)]
enum State {
    /// A request head is next.
    Head(HeadScan),
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    /// A chunk-size line is next.
    ChunkLine,
    /// Bytes left of a chunk's data.
    Data(u64),
    /// The CRLF after a chunk's data is next.
    DataEnd,
    Trailer(HeadScan),
    /// After an upgrade request: what follows is a WebSocket's (after a 101) or never
    /// read (the service closes the connection after any other answer).
    Passthrough,
    /// After a refusal: nothing more is framed.
    Refused,
}

/// What one [`Scanner::scan`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan {
    /// How many of the bytes are framed and may go to hyper. The rest (an incomplete head
    /// or line, or everything from a refusal on) must not.
    pub accepted: usize,
    pub refused: Option<Refused>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    /// The index of the refused request on its connection (counted from 0).
    pub request: u32,
    /// Whether none of the refused request reached `accepted` (hyper gets a stand-in in
    /// its place); otherwise its head went to hyper before and its body fails.
    pub whole: bool,
}

#[derive(Debug)]
pub struct Scanner {
    state: State,
    limits: Limits,
    /// Request heads accepted so far.
    requests: u32,
    /// Whether the current request asked for an upgrade.
    upgrade: bool,
}

impl Scanner {
    pub fn new(limits: Limits) -> Scanner {
        Scanner {
            state: State::Head(HeadScan::default()),
            limits,
            requests: 0,
            upgrade: false,
        }
    }

    /// Whether every byte from here on passes untouched.
    pub fn passthrough(&self) -> bool {
        matches!(self.state, State::Passthrough)
    }

    /// Frames `bytes`: the connection's bytes right after those accepted so far (the
    /// unaccepted rest of the previous call, then what arrived since).
    pub fn scan(&mut self, bytes: &[u8]) -> Scan {
        let mut pos = 0;
        // Where the current request starts, if its head is among these bytes (hyper has
        // not seen it yet).
        let mut head_at = None;
        loop {
            let before = self.requests;
            match self.step(&bytes[pos..]) {
                Ok(Some(n)) => {
                    if self.requests != before {
                        head_at = Some(pos);
                    }
                    pos += n;
                }
                Ok(None) => {
                    return Scan {
                        accepted: pos,
                        refused: None,
                    }
                }
                Err(refusal) => {
                    let in_head = matches!(self.state, State::Head(_));
                    self.state = State::Refused;
                    let (accepted, request, whole) = match head_at {
                        _ if in_head => (pos, self.requests, true),
                        Some(at) => (at, self.requests - 1, true),
                        None => (pos, self.requests - 1, false),
                    };
                    return Scan {
                        accepted,
                        refused: Some(Refused {
                            refusal,
                            request,
                            whole,
                        }),
                    };
                }
            }
        }
    }

    /// One element (a head, body bytes, a chunk line, a trailer section) at the start
    /// of `rest`: its length, or `None` when more bytes are needed.
    fn step(&mut self, rest: &[u8]) -> Result<Option<usize>, Refusal> {
        let max_head = self.limits.max_head_bytes;
        let too_large = || {
            Refusal::new(
                431,
                format!("the request head is larger than {max_head} bytes (--max-header-bytes)"),
            )
        };
        let after_body = |upgrade: bool| {
            if upgrade {
                State::Passthrough
            } else {
                State::Head(HeadScan::default())
            }
        };
        match self.state {
            State::Head(ref mut at) => {
                let Some(n) = find_head_end(rest, at)? else {
                    return if rest.len() > max_head {
                        Err(too_large())
                    } else {
                        Ok(None)
                    };
                };
                if n > max_head {
                    return Err(too_large());
                }
                let head = check_head(&rest[..n], &self.limits)?;
                self.requests += 1;
                self.upgrade = head.upgrade;
                self.state = match head.body {
                    Body::None | Body::Length(0) => after_body(head.upgrade),
                    Body::Length(len) => State::Length(len),
                    Body::Chunked => State::ChunkLine,
                };
                Ok(Some(n))
            }
            State::Length(left) | State::Data(left) => {
                if rest.is_empty() {
                    return Ok(None);
                }
                let take = left.min(rest.len() as u64);
                let left = left - take;
                self.state = match self.state {
                    State::Length(_) if left == 0 => after_body(self.upgrade),
                    State::Length(_) => State::Length(left),
                    _ if left == 0 => State::DataEnd,
                    _ => State::Data(left),
                };
                Ok(Some(take as usize))
            }
            State::DataEnd => match rest {
                [] | [b'\r'] => Ok(None),
                [b'\r', b'\n', ..] => {
                    self.state = State::ChunkLine;
                    Ok(Some(2))
                }
                _ => Err(Refusal::bad(
                    "a chunk's data is longer than its size (no CRLF after it)",
                )),
            },
            State::ChunkLine => {
                let Some((n, size)) = chunk_line(rest)? else {
                    return Ok(None);
                };
                self.state = if size == 0 {
                    State::Trailer(HeadScan::default())
                } else {
                    State::Data(size)
                };
                Ok(Some(n))
            }
            State::Trailer(ref mut at) => {
                let Some(n) = trailer(rest, at, &self.limits)? else {
                    return Ok(None);
                };
                self.state = after_body(self.upgrade);
                Ok(Some(n))
            }
            State::Passthrough => Ok((!rest.is_empty()).then_some(rest.len())),
            State::Refused => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head_bytes: 1024,
        max_headers: 100,
    };

    /// Feeds `input` cut at `cuts` as the guard does (the unaccepted rest of one scan is
    /// scanned again with the next piece): what would reach hyper, and the refusal.
    fn feed(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<Refused>) {
        let mut scanner = Scanner::new(LIMITS);
        let (mut out, mut pending) = (Vec::new(), Vec::new());
        let mut from = 0;
        for &to in cuts.iter().chain([&input.len()]) {
            pending.extend_from_slice(&input[from..to]);
            from = to;
            let scan = scanner.scan(&pending);
            out.extend_from_slice(&pending[..scan.accepted]);
            pending.drain(..scan.accepted);
            if scan.refused.is_some() {
                return (out, scan.refused);
            }
        }
        (out, None)
    }

    /// Every way of cutting `input` in two and in three gives the same result.
    fn framed(input: &str) -> (String, Option<(u16, u32, bool)>) {
        let input = input.as_bytes();
        let whole = feed(input, &[]);
        let as_tuple = |(o, r): (Vec<u8>, Option<Refused>)| {
            (
                String::from_utf8(o).unwrap(),
                r.map(|r| (r.refusal.status, r.request, r.whole)),
            )
        };
        let expect = as_tuple(whole);
        for a in 0..=input.len() {
            let got = as_tuple(feed(input, &[a]));
            // Cut inside a body, a refusal found later fails the body instead: hyper had
            // the head already. Only the status and the request must agree then.
            match (&expect.1, &got.1) {
                (Some((s, i, true)), Some((s2, i2, false))) => {
                    assert_eq!((s, i), (s2, i2), "cut at {a}");
                    assert!(got.0.len() > expect.0.len(), "cut at {a}");
                }
                _ => assert_eq!(got, expect, "cut at {a}"),
            }
            for b in a..=input.len().min(a + 8) {
                let got = as_tuple(feed(input, &[a, b]));
                assert_eq!(
                    got.1.map(|r| r.0),
                    expect.1.map(|r| r.0),
                    "cuts at {a}, {b}"
                );
            }
        }
        expect
    }

    const GET: &str = "GET /a HTTP/1.1\r\nHost: h\r\n\r\n";

    #[test]
    fn pipelines_of_valid_requests_pass_whole() {
        for input in [
            format!("{GET}{GET}"),
            format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello{GET}"),
            format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n000\r\n\r\n{GET}"),
            format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-T: 1\r\nY: 2\r\n\r\n{GET}"),
        ] {
            assert_eq!(framed(&input), (input.clone(), None), "{input:?}");
        }
    }

    #[test]
    fn a_bad_request_is_stood_in_for_after_the_good_ones() {
        let bad = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(
            framed(&format!("{GET}{bad}0\r\n\r\n{GET}")),
            (GET.to_string(), Some((501, 1, true)))
        );
        // The chunked body goes wrong: the whole request is refused when its head is
        // still held; with hyper holding the head, its body fails (see `framed`).
        let bad = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nhello\r\n0\r\n\r\n";
        assert_eq!(
            framed(&format!("{GET}{bad}{GET}")),
            (GET.to_string(), Some((400, 1, true)))
        );
    }

    #[test]
    fn chunk_lines_and_trailers() {
        let head = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
        for body in [
            "0x5\r\nhello\r\n0\r\n\r\n",
            "-1\r\n",
            " 5\r\nhello\r\n0\r\n\r\n",
            "5 \r\nhello\r\n0\r\n\r\n",
            "00000000000000005\r\nhello\r\n0\r\n\r\n",
            "\r\n\r\n",
            "5\nhello\r\n0\r\n\r\n",
            "5\r\nhello\n0\r\n\r\n",
            "5\r\nhelloXX0\r\n\r\n",
            "5\r\r;a\r\nhello\r\n0\r\n\r\n",
            "5;a\nb\r\nhello\r\n0\r\n\r\n",
            "5;a=\x01\r\nhello\r\n0\r\n\r\n",
            "0\r\nGET / HTTP/1.1\r\n\r\n",
            "0\r\nX: a\nY: b\r\n\r\n",
            "0\r\nX : a\r\n\r\n",
        ] {
            let (out, refused) = framed(&format!("{GET}{head}{body}{GET}"));
            assert_eq!(
                (out.as_str(), refused),
                (GET, Some((400, 1, true))),
                "{body:?}"
            );
        }
        let long = format!(
            "5;{}\r\nhello\r\n0\r\n\r\n",
            "a".repeat(super::super::MAX_CHUNK_EXT + 1)
        );
        assert_eq!(framed(&format!("{head}{long}")).1, Some((400, 0, true)));
        let ok = format!(
            "5;{}\r\nhello\r\n0\r\n\r\n",
            "a".repeat(super::super::MAX_CHUNK_EXT - 1)
        );
        assert_eq!(framed(&format!("{head}{ok}")).1, None);
        // 16 digits are fine, whatever their value: the data is counted, not held.
        let mut scanner = Scanner::new(LIMITS);
        let scan = scanner.scan(format!("{head}ffffffffffffffff\r\nabc").as_bytes());
        assert_eq!((scan.accepted, scan.refused), (head.len() + 21, None));
    }

    #[test]
    fn oversized_heads_are_431_even_before_they_end() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n",
            "a".repeat(1024)
        );
        assert_eq!(framed(&big).1, Some((431, 0, true)));
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(1100));
        assert_eq!(framed(&endless).1, Some((431, 0, true)));
        assert_eq!(framed(&format!("\r\n{GET}")).1, Some((400, 0, true)));
    }

    #[test]
    fn after_an_upgrade_request_bytes_pass_untouched() {
        let up = "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let input = format!("{up}\x01\x05garbage\r\n\nGET  bad\r\n\r\n");
        assert_eq!(framed(&input), (input.clone(), None));
        let mut scanner = Scanner::new(LIMITS);
        scanner.scan(up.as_bytes());
        assert!(scanner.passthrough());
        // An HTTP/1.0 Upgrade is no upgrade: the next head is checked.
        let up10 = "GET /ws HTTP/1.0\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(
            framed(&format!("{up10}GET  x\r\n\r\n")).1,
            Some((400, 1, true))
        );
    }
}
