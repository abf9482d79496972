//! Property tests (bounded fuzzing) of the `X-Fal-*` submit options
//! (`api::options`): no panic on any header bytes, timeouts positive, finite and
//! bounded or an error, deadlines that never overflow. Cases per property:
//! 1024, or `PROPTEST_CASES`.

use std::time::Duration;

use fal_sidecar::api::options::{
    is_no_retry, parse_request_timeout, SubmitOptions, MAX_REQUEST_TIMEOUT,
};
use fal_sidecar::job::Priority;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::Config;

/// 1024 cases per property (well under a second), or `PROPTEST_CASES` (scripts/fuzz.sh
/// runs many more); failures are turned into fixed-input tests by hand, so none are
/// persisted.
fn config() -> Config {
    let mut c = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 1024;
    }
    c
}

/// Bytes a header value may carry (hyper refuses CR, LF and NUL; obs-text passes).
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(
            // Control bytes mapped into the printable range (a filter would abort long runs).
            any::<u8>().prop_map(|b| if b == b'\t' || (b >= 0x20 && b != 0x7f) {
                b
            } else {
                b ^ 0x40
            }),
            0..24
        ),
        // Number-like text: the interesting part of the input space.
        "[ +-]?[0-9]{0,6}(\\.[0-9]{0,4})?([eE][+-]?[0-9]{1,3})? ?".prop_map(String::into_bytes),
        prop_oneof![
            Just("inf"),
            Just("-inf"),
            Just("NaN"),
            Just("infinity"),
            Just("1e309"),
            Just("-0"),
            Just("0.0"),
            Just("+0"),
            Just("1e-400"),
            Just("5e-324"),
        ]
        .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

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

/// A case variant of `word`, padded with spaces.
fn spelled(word: &'static str) -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(any::<bool>(), word.len()),
        " {0,2}",
        " {0,2}",
    )
        .prop_map(move |(upper, l, r)| {
            let w: String = word
                .chars()
                .zip(upper)
                .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                .collect();
            format!("{l}{w}{r}")
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn timeout_is_positive_bounded_or_an_error(raw in header_bytes()) {
        match parse_request_timeout(&raw) {
            Ok(Some(d)) => {
                prop_assert!(d >= Duration::from_millis(1) && d <= MAX_REQUEST_TIMEOUT, "{d:?}");
            }
            Ok(None) => prop_assert!(raw.iter().all(|b| *b == b' ' || *b == b'\t')),
            Err(detail) => prop_assert!(detail.contains("X-Fal-Request-Timeout")),
        }
    }

    /// Every positive finite number of seconds, however formatted, is accepted and read
    /// as itself (rounded up to whole ms, capped).
    #[test]
    fn timeout_round_trip(
        secs in prop_oneof![
            0.000_001f64..1e9,
            any::<f64>().prop_filter_map("positive, finite", |x| (x.is_finite() && x != 0.0).then(|| x.abs())),
        ],
        style in 0..3u8,
    ) {
        let text = match style {
            0 => format!("{secs}"),
            1 => format!("{secs:e}"),
            _ => format!("{secs:.3}"),
        };
        let parsed: f64 = text.parse().unwrap();
        let got = parse_request_timeout(text.as_bytes());
        if parsed <= 0.0 {
            prop_assert!(got.is_err());
            return Ok(());
        }
        let d = got.unwrap().unwrap();
        let want = (parsed.min(MAX_REQUEST_TIMEOUT.as_secs_f64()) * 1000.0).ceil().max(1.0);
        prop_assert_eq!(d.as_millis() as f64, want);
    }

    #[test]
    fn deadline_never_overflows_nor_precedes_the_submit(raw in header_bytes(), now in any::<u64>()) {
        let h = headers(&[("x-fal-request-timeout", &raw)]);
        if let Ok(o) = SubmitOptions::from_headers(&h) {
            match o.start_deadline_ms(now) {
                Some(d) => prop_assert!(d > now || now == u64::MAX),
                None => prop_assert!(o.request_timeout.is_none()),
            }
        }
    }

    /// Any bytes in any of the three headers: a parse or a 400 detail, never a panic.
    #[test]
    fn submit_options_never_panic(p in header_bytes(), t in header_bytes(), r in header_bytes()) {
        let h = headers(&[
            ("x-fal-queue-priority", &p),
            ("x-fal-request-timeout", &t),
            ("x-fal-no-retry", &r),
        ]);
        match SubmitOptions::from_headers(&h) {
            Ok(o) => {
                prop_assert_eq!(o.no_retry, std::str::from_utf8(&r).is_ok_and(|v| v.is_ascii() && is_no_retry(v)));
                let name = std::str::from_utf8(&p).unwrap_or("").trim().to_ascii_lowercase();
                prop_assert_eq!(o.priority == Priority::Low, name == "low");
            }
            Err(detail) => prop_assert!(detail.starts_with("X-Fal-")),
        }
    }

    #[test]
    fn priority_names_in_any_case(low in spelled("low"), normal in spelled("normal")) {
        let o = SubmitOptions::from_headers(&headers(&[("x-fal-queue-priority", low.as_bytes())])).unwrap();
        prop_assert_eq!(o.priority, Priority::Low);
        let o = SubmitOptions::from_headers(&headers(&[("x-fal-queue-priority", normal.as_bytes())])).unwrap();
        prop_assert_eq!(o.priority, Priority::Normal);
    }

    #[test]
    fn no_retry_values(v in prop_oneof![spelled("1"), spelled("true"), spelled("yes")]) {
        let o = SubmitOptions::from_headers(&headers(&[("x-fal-no-retry", v.as_bytes())])).unwrap();
        prop_assert!(o.no_retry);
    }

    /// `Idempotency-Key`: never a panic; an accepted key is 1..=255 printable ASCII
    /// characters without quotes or backslashes, and quoting it changes nothing.
    #[test]
    fn idempotency_key_accepts_only_printable_bounded_keys(raw in header_bytes()) {
        if let Ok(k) = fal_sidecar::api::queue::idempotency_key(&raw) {
            prop_assert!(!k.is_empty() && k.len() <= 255, "{k:?}");
            prop_assert!(k.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'));
            let quoted = format!("\"{k}\"");
            prop_assert_eq!(fal_sidecar::api::queue::idempotency_key(quoted.as_bytes()), Ok(k));
        }
    }
}
