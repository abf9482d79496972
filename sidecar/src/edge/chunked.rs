//! The two pieces of a chunked body that are lines, not counted bytes: the chunk-size
//! line and the trailer section. Pure functions over the bytes at the start of `buf`;
//! `Ok(None)` means the line is not complete yet.

use super::head::{find_head_end, HeadScan};
use super::{is_field_vchar, Limits, Refusal, MAX_CHUNK_EXT, MAX_CHUNK_SIZE_DIGITS};

/// Longest chunk-size line, CRLF included.
const MAX_LINE: usize = MAX_CHUNK_SIZE_DIGITS + MAX_CHUNK_EXT + 2;

/// A chunk-size line (`1*16HEXDIG [ext] CRLF`) at the start of `buf`: its length with the
/// CRLF, and the size.
pub fn chunk_line(buf: &[u8]) -> Result<Option<(usize, u64)>, Refusal> {
    let window = &buf[..buf.len().min(MAX_LINE)];
    let Some(end) = memchr::memchr2(b'\r', b'\n', window) else {
        return if buf.len() >= MAX_LINE {
            Err(Refusal::bad(format!(
                "a chunk-size line is longer than {MAX_LINE} bytes (chunk extensions are \
                 limited to {MAX_CHUNK_EXT})"
            )))
        } else {
            Ok(None)
        };
    };
    match (window[end], window.get(end + 1)) {
        (b'\n', _) => return Err(Refusal::bad("a bare LF ends a chunk-size line")),
        (_, None) if buf.len() >= MAX_LINE => {
            return Err(Refusal::bad(format!(
                "a chunk-size line is longer than {MAX_LINE} bytes"
            )))
        }
        (_, None) => return Ok(None),
        (_, Some(b'\n')) => {}
        (_, Some(_)) => return Err(Refusal::bad("a bare CR in a chunk-size line")),
    }
    let line = &window[..end];
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Refusal::bad("a chunk size is not a hexadecimal number"));
    }
    if digits > MAX_CHUNK_SIZE_DIGITS {
        return Err(Refusal::bad(format!(
            "a chunk size has more than {MAX_CHUNK_SIZE_DIGITS} hex digits"
        )));
    }
    // Extensions (RFC 9112 7.1.1): BWS, then `;` and the rest of the line, which hyper
    // skips unread; here it need only be printable.
    let ext = &line[digits..];
    if ext.len() > MAX_CHUNK_EXT {
        return Err(Refusal::bad(format!(
            "a chunk's extensions are longer than {MAX_CHUNK_EXT} bytes"
        )));
    }
    let after_ws = ext.iter().position(|b| *b != b' ' && *b != b'\t');
    match after_ws {
        None if ext.is_empty() => {}
        Some(i) if ext[i] == b';' && ext.iter().all(|b| is_field_vchar(*b)) => {}
        _ => {
            return Err(Refusal::bad(
                "a chunk size is followed by something else than `;` and an extension",
            ))
        }
    }
    let size = line[..digits].iter().fold(0u64, |n, d| {
        // Checked above: 16 hex digits always fit.
        (n << 4) | u64::from((*d as char).to_digit(16).unwrap_or(0))
    });
    Ok(Some((end + 2, size)))
}

/// The trailer section at the start of `buf` (field lines, then an empty line): its
/// length once complete. `at` keeps the search's progress between calls.
pub fn trailer(buf: &[u8], at: &mut HeadScan, limits: &Limits) -> Result<Option<usize>, Refusal> {
    let too_big = || {
        Refusal::bad(format!(
            "the trailer section is larger than {} bytes",
            super::MAX_TRAILER_BYTES
        ))
    };
    let Some(len) = find_head_end(buf, at)? else {
        return if buf.len() > super::MAX_TRAILER_BYTES {
            Err(too_big())
        } else {
            Ok(None)
        };
    };
    if len > super::MAX_TRAILER_BYTES {
        return Err(too_big());
    }
    if len > 2 {
        // Trailers are rare: the field array is allocated only for them.
        let mut fields = vec![httparse::EMPTY_HEADER; limits.max_headers];
        match httparse::parse_headers(&buf[..len], &mut fields) {
            Ok(httparse::Status::Complete((n, _))) if n == len => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal::bad(format!(
                    "the trailer section has more than {} fields",
                    limits.max_headers
                )))
            }
            _ => return Err(Refusal::bad("a trailer field line is not valid")),
        }
    }
    Ok(Some(len))
}
