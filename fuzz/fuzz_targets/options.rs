//! `X-Fal-*` submit options on arbitrary header bytes: a parse or a 400, timeouts
//! within [1 ms, MAX_REQUEST_TIMEOUT], deadlines that never overflow.
#![no_main]

use std::time::Duration;

use fal_sidecar::api::options::{parse_request_timeout, SubmitOptions, MAX_REQUEST_TIMEOUT};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(d)) = parse_request_timeout(data) {
        assert!(d >= Duration::from_millis(1) && d <= MAX_REQUEST_TIMEOUT, "{d:?}");
    }
    let mut parts = data.splitn(3, |b| *b == b'\n');
    let mut h = HeaderMap::new();
    for name in ["x-fal-queue-priority", "x-fal-request-timeout", "x-fal-no-retry"] {
        if let Some(v) = parts.next().and_then(|v| HeaderValue::from_bytes(v).ok()) {
            h.insert(name, v);
        }
    }
    if let Ok(o) = SubmitOptions::from_headers(&h) {
        let now = u64::from_le_bytes(data.get(..8).and_then(|b| b.try_into().ok()).unwrap_or([7; 8]));
        if let Some(d) = o.start_deadline_ms(now) {
            assert!(d > now || now == u64::MAX);
        }
    }
});
