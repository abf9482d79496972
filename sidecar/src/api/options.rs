//! The `X-Fal-*` request options a client sets at submit (PROTOCOL.md, "Request
//! headers"), parsed from the headers alone so the parsing can be tested and fuzzed
//! without a server: `X-Fal-Queue-Priority`, `X-Fal-Request-Timeout`, `X-Fal-No-Retry`.
//! The gateway reads `X-Fal-Request-Timeout` of sync calls with the same parser.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::job::Priority;

/// The longest start deadline honoured: a longer `X-Fal-Request-Timeout` counts as this
/// (a deadline must stay a sane unix-ms number: it goes through Lua doubles in the
/// Redis store, and `now + timeout` must not overflow).
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// What the `X-Fal-*` headers of a submit ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubmitOptions {
    pub priority: Priority,
    /// Start deadline, relative to the submit (`X-Fal-Request-Timeout`).
    pub request_timeout: Option<Duration>,
    pub no_retry: bool,
}

impl SubmitOptions {
    /// Parses the options, or says (as the 400's `detail`) which header is wrong.
    pub fn from_headers(headers: &HeaderMap) -> Result<SubmitOptions, String> {
        let priority = match headers.get("x-fal-queue-priority").map(HeaderValue::to_str) {
            None => Some(Priority::Normal),
            Some(Ok(v)) => Priority::parse(v),
            // Bytes outside visible ASCII are no priority name either.
            Some(Err(_)) => None,
        }
        .ok_or_else(|| "X-Fal-Queue-Priority must be \"normal\" or \"low\"".to_string())?;
        let request_timeout = match headers.get("x-fal-request-timeout") {
            None => None,
            Some(v) => parse_request_timeout(v.as_bytes())?,
        };
        let no_retry = headers
            .get("x-fal-no-retry")
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_no_retry);
        Ok(SubmitOptions {
            priority,
            request_timeout,
            no_retry,
        })
    }

    /// The start deadline in unix ms for a request submitted at `now_ms`.
    pub fn start_deadline_ms(&self, now_ms: u64) -> Option<u64> {
        self.request_timeout
            .map(|t| now_ms.saturating_add(t.as_millis().min(u64::MAX as u128) as u64))
    }
}

/// `X-Fal-Request-Timeout`: seconds as a decimal number (`30`, `30.0`, `2.5`, `1e3`).
/// Empty means none; anything else must be positive and finite. The result is at least
/// 1 ms (deadlines are whole ms: a positive timeout never means "already expired") and
/// at most [`MAX_REQUEST_TIMEOUT`].
pub fn parse_request_timeout(raw: &[u8]) -> Result<Option<Duration>, String> {
    let bad = || {
        format!(
            "X-Fal-Request-Timeout must be a positive number of seconds, got {:?}",
            String::from_utf8_lossy(raw)
        )
    };
    // ASCII only (what `HeaderValue::to_str` accepts): `str::trim` would also strip
    // Unicode spaces such as U+00A0.
    let v = std::str::from_utf8(raw)
        .ok()
        .filter(|v| v.is_ascii())
        .ok_or_else(bad)?
        .trim();
    if v.is_empty() {
        return Ok(None);
    }
    let secs = v.parse::<f64>().map_err(|_| bad())?;
    if !(secs.is_finite() && secs > 0.0) {
        return Err(bad());
    }
    let max = MAX_REQUEST_TIMEOUT.as_secs_f64();
    // Whole milliseconds, rounded up: 0.0001 s is 1 ms, not 0.
    let ms = (secs.min(max) * 1000.0).ceil().max(1.0);
    Ok(Some(Duration::from_millis(ms as u64)))
}

/// `X-Fal-No-Retry`: `1`, `true` or `yes` (any case) set it; anything else does not.
pub fn is_no_retry(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn defaults_and_documented_values() {
        let o = SubmitOptions::from_headers(&HeaderMap::new()).unwrap();
        assert_eq!(o.priority, Priority::Normal);
        assert_eq!(o.request_timeout, None);
        assert!(!o.no_retry);
        let o = SubmitOptions::from_headers(&headers(&[
            ("x-fal-queue-priority", b"LOW"),
            ("x-fal-request-timeout", b" 30.0 "),
            ("x-fal-no-retry", b"Yes"),
        ]))
        .unwrap();
        assert_eq!(o.priority, Priority::Low);
        assert_eq!(o.request_timeout, Some(Duration::from_secs(30)));
        assert!(o.no_retry);
        assert_eq!(o.start_deadline_ms(1_000), Some(31_000));
        for v in ["0", "-1", "nan", "inf", "soon", "0x10", "1,5"] {
            assert!(parse_request_timeout(v.as_bytes()).is_err(), "{v}");
        }
        assert_eq!(parse_request_timeout(b"").unwrap(), None);
        assert_eq!(
            parse_request_timeout(b"2.5").unwrap(),
            Some(Duration::from_millis(2500))
        );
    }

    // Regression: a huge timeout overflowed
    // `now_ms() + (s * 1000.0) as u64` (a panic in debug builds; in release the
    // deadline wrapped into the past and the request expired at once).
    #[test]
    fn huge_timeout_is_capped_not_overflowed() {
        let t = parse_request_timeout(b"1e300").unwrap().unwrap();
        assert_eq!(t, MAX_REQUEST_TIMEOUT);
        let o = SubmitOptions {
            priority: Priority::Normal,
            request_timeout: Some(t),
            no_retry: false,
        };
        let now = 1_700_000_000_000;
        assert!(o.start_deadline_ms(now).unwrap() > now);
        assert_eq!(o.start_deadline_ms(u64::MAX), Some(u64::MAX));
    }

    // Regression: a tiny positive timeout became a
    // deadline of `now`, already expired; and non-ASCII values were silently ignored
    // (treated as "no timeout" / "normal") while other bad values got a 400.
    #[test]
    fn tiny_timeouts_and_non_ascii_values() {
        assert_eq!(
            parse_request_timeout(b"1e-9").unwrap(),
            Some(Duration::from_millis(1))
        );
        assert!(parse_request_timeout("3\u{a0}".as_bytes()).is_err());
        assert!(SubmitOptions::from_headers(&headers(&[(
            "x-fal-request-timeout",
            "5\u{e9}".as_bytes()
        )]))
        .is_err());
        assert!(SubmitOptions::from_headers(&headers(&[(
            "x-fal-queue-priority",
            "l\u{f6}w".as_bytes()
        )]))
        .is_err());
    }
}
