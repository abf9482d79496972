//! Queue routing of all three generations, request ids, the run host's app prefix and
//! `strip_segments`, on arbitrary paths: no panic, ids handed out are canonical.
#![no_main]

use fal_sidecar::api::queue::{parse_request_id, route_per_app, route_queue_host, AppIdRule, Route};
use fal_sidecar::api::{run_host_app_segments, strip_segments};
use http::{Method, Request};
use libfuzzer_sys::fuzz_target;

const METHODS: [Method; 4] = [Method::GET, Method::POST, Method::PUT, Method::DELETE];

fn check_id(r: &Route) {
    if let Route::Get { id } | Route::Status { id, .. } | Route::Result { id } | Route::Cancel { id } = r {
        assert_eq!(parse_request_id(id).as_deref(), Some(id.as_str()), "{r:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let (path, mount) = text.split_once('\n').unwrap_or((text, ""));
    let m = &METHODS[(sel & 3) as usize];
    let _ = parse_request_id(path);
    check_id(&route_per_app(m, path, mount));
    for rule in [AppIdRule::Fal, AppIdRule::NamespaceName] {
        if let Some(h) = route_queue_host(m, path, rule) {
            assert!(!h.app_id.is_empty() && !h.app_id.contains("//"));
            check_id(&h.route);
        }
    }
    let _ = run_host_app_segments(path);
    if let Ok(uri) = path.parse::<http::Uri>() {
        let query = uri.query().map(str::to_string);
        let mut req = Request::builder().uri(uri).body(()).unwrap();
        if strip_segments(&mut req, (sel >> 2) as usize % 4).is_ok() {
            assert_eq!(req.uri().query(), query.as_deref());
        }
    }
});
