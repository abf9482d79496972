//! Property tests (bounded fuzzing) of request routing: the per-app queue API
//! (generations A and B), the queue host (generation C, fal's namespace-prefix rule),
//! request ids, the run host's app prefix and `strip_segments`. Cases per property:
//! 1024, or `PROPTEST_CASES`; `scripts/fuzz.sh` runs many more.

use fal_sidecar::api::queue::{
    parse_request_id, route_per_app, route_queue_host, AppIdRule, HostRoute, Route,
};
use fal_sidecar::api::{run_host_app_segments, strip_segments};
use http::{Method, Request};
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

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::PATCH),
        Just(Method::HEAD),
    ]
}

/// A UUID and one of its spellings (the canonical one most of the time).
fn spelled_id() -> impl Strategy<Value = (String, String)> {
    (any::<u128>(), 0..6u8).prop_map(|(n, how)| {
        let u = uuid::Uuid::from_u128(n);
        let canonical = u.hyphenated().to_string();
        let spelled = match how {
            0 | 1 => canonical.clone(),
            2 => canonical.to_ascii_uppercase(),
            3 => u.simple().to_string(),
            4 => u.braced().to_string(),
            _ => u.urn().to_string(),
        };
        (canonical, spelled)
    })
}

/// A path segment a client could send (never empty).
fn segment() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._~%:@!$&'()*+,;=-]{1,12}"
}

/// A label as owners, aliases, namespaces and names are spelled (sometimes one of fal's
/// namespace prefixes).
fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?",
        1 => Just("workflows".to_string()),
        1 => Just("comfy".to_string()),
    ]
}

fn mount() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        (label(), label()).prop_map(|(a, b)| format!("/{a}/{b}"))
    ]
}

/// Anything a request target's path could be (hyper hands over any visible ASCII).
fn any_path() -> impl Strategy<Value = String> {
    prop_oneof![
        "/[ -~]{0,60}",
        proptest::collection::vec(
            prop_oneof![
                segment(),
                Just(String::new()),
                Just("fal".into()),
                Just("queue".into()),
                Just("requests".into()),
                Just("status".into()),
                Just("stream".into()),
                Just("submit".into()),
                Just("get".into()),
                Just("cancel".into()),
                Just("response".into()),
                Just("workflows".into()),
                Just("comfy".into()),
                spelled_id().prop_map(|(_, s)| s),
            ],
            0..8
        )
        .prop_map(|segs| format!("/{}", segs.join("/"))),
    ]
}

fn route_id(r: &Route) -> Option<&str> {
    match r {
        Route::Get { id }
        | Route::Status { id, .. }
        | Route::Result { id }
        | Route::Cancel { id } => Some(id),
        _ => None,
    }
}

fn is_canonical(id: &str) -> bool {
    parse_request_id(id).as_deref() == Some(id)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn request_ids_are_canonical_in_any_spelling((canonical, spelled) in spelled_id()) {
        prop_assert_eq!(parse_request_id(&spelled), Some(canonical));
    }

    #[test]
    fn request_id_parser_never_panics(s in "[ -~]{0,50}") {
        if let Some(id) = parse_request_id(&s) {
            prop_assert!(is_canonical(&id));
        }
    }

    #[test]
    fn per_app_routing_never_panics_and_hands_out_canonical_ids(
        m in method(), path in any_path(), mount in mount(),
    ) {
        let full = format!("{mount}{path}");
        let r = route_per_app(&m, &full, &mount);
        if let Some(id) = route_id(&r) {
            prop_assert!(is_canonical(id), "{r:?}");
        }
        if let Route::Submit { endpoint } = &r {
            prop_assert!(endpoint.starts_with('/'));
            prop_assert_eq!(&m, &Method::POST);
        }
    }

    /// Generation A and B: a generated request path routes to the expected endpoint.
    #[test]
    fn per_app_round_trip(
        mount in mount(),
        (canonical, spelled) in spelled_id(),
        op in 0..9u8,
        tail in proptest::collection::vec(segment(), 0..4),
        slash in any::<bool>(),
    ) {
        let (m, rest, want) = match op {
            0 => (Method::POST, format!("submit/{}", tail.join("/")),
                  Route::Submit { endpoint: format!("/{}", tail.join("/")) }),
            1 => (Method::GET, format!("{spelled}/get"), Route::Get { id: canonical.clone() }),
            2 => (Method::POST, format!("{spelled}/get"), Route::Get { id: canonical.clone() }),
            3 => (Method::POST, format!("{spelled}/cancel"), Route::Cancel { id: canonical.clone() }),
            4 => (Method::GET, format!("requests/{spelled}/status"),
                  Route::Status { id: canonical.clone(), stream: false }),
            5 => (Method::GET, format!("requests/{spelled}/status/stream"),
                  Route::Status { id: canonical.clone(), stream: true }),
            6 => (Method::GET, format!("requests/{spelled}"), Route::Result { id: canonical.clone() }),
            7 => (Method::GET, format!("requests/{spelled}/response"), Route::Result { id: canonical.clone() }),
            _ => (Method::PUT, format!("requests/{spelled}/cancel"), Route::Cancel { id: canonical.clone() }),
        };
        let path = format!("{mount}/fal/queue/{rest}{}", if slash { "/" } else { "" });
        prop_assert_eq!(route_per_app(&m, &path, &mount), want);
        // Not under the mount, or not whole segments: no queue endpoint.
        if !mount.is_empty() {
            let beside = format!("{mount}x/fal/queue/{rest}");
            prop_assert_eq!(route_per_app(&m, &beside, &mount), Route::NotFound);
        }
        let glued = format!("{mount}/fal/queuex/{rest}");
        prop_assert_eq!(route_per_app(&m, &glued, &mount), Route::NotFound);
    }

    /// A segment that is not a UUID where an id belongs is a 400, never a route.
    #[test]
    fn per_app_bad_ids(bad in segment().prop_filter("not a uuid", |s| parse_request_id(s).is_none())) {
        let r = route_per_app(&Method::GET, &format!("/fal/queue/requests/{bad}/status"), "");
        prop_assert_eq!(r, Route::BadId(bad.clone()));
        let r = route_queue_host(&Method::GET, &format!("/o/a/requests/{bad}"), AppIdRule::Fal);
        prop_assert_eq!(r.map(|h| h.route), Some(Route::BadId(bad)));
    }

    #[test]
    fn queue_host_routing_never_panics(m in method(), path in any_path(), fal in any::<bool>()) {
        let rule = if fal { AppIdRule::Fal } else { AppIdRule::NamespaceName };
        if let Some(HostRoute { app_id, owner, route }) = route_queue_host(&m, &path, rule) {
            prop_assert!(!app_id.is_empty() && !app_id.starts_with('/') && !app_id.ends_with('/'));
            prop_assert!(!app_id.contains("//"));
            prop_assert!(app_id.split('/').any(|s| s == owner));
            if let Some(id) = route_id(&route) {
                prop_assert!(is_canonical(id));
            }
            prop_assert!(!matches!(route, Route::Get { .. }), "generation C has no /get");
        }
    }

    /// Generation C with fal's namespace-prefix rule: `[workflows|comfy/]owner/alias`.
    #[test]
    fn queue_host_round_trip(
        ns in proptest::option::of(prop_oneof![Just("workflows"), Just("comfy")]),
        owner in label().prop_filter("not a prefix", |o| o != "workflows" && o != "comfy"),
        alias in label(),
        (canonical, spelled) in spelled_id(),
        op in 0..5u8,
        tail in proptest::collection::vec(segment(), 0..4),
        slash in any::<bool>(),
    ) {
        let app_id = match ns {
            Some(ns) => format!("{ns}/{owner}/{alias}"),
            None => format!("{owner}/{alias}"),
        };
        let (m, rest, want) = match op {
            0 => (Method::POST, tail.join("/"), Route::Submit { endpoint: format!("/{}", tail.join("/")) }),
            1 => (Method::GET, format!("requests/{spelled}"), Route::Result { id: canonical.clone() }),
            2 => (Method::GET, format!("requests/{spelled}/status"), Route::Status { id: canonical.clone(), stream: false }),
            3 => (Method::GET, format!("requests/{spelled}/status/stream"), Route::Status { id: canonical.clone(), stream: true }),
            _ => (Method::PUT, format!("requests/{spelled}/cancel"), Route::Cancel { id: canonical.clone() }),
        };
        let path = format!("/{app_id}/{rest}{}", if slash { "/" } else { "" });
        let got = route_queue_host(&m, &path, AppIdRule::Fal);
        prop_assert_eq!(got, Some(HostRoute { app_id, owner: owner.clone(), route: want }));
    }

    /// The run host strips exactly the app id (`[ns/]owner/alias`) and keeps the rest and
    /// the query.
    #[test]
    fn run_host_strips_the_app_id(
        ns in proptest::option::of(prop_oneof![Just("workflows"), Just("comfy")]),
        owner in label().prop_filter("not a prefix", |o| o != "workflows" && o != "comfy"),
        alias in label(),
        rest in proptest::collection::vec(prop_oneof![segment(), Just(String::new())], 0..5),
        query in proptest::option::of("[a-zA-Z0-9=&%._~-]{0,20}"),
    ) {
        let app_id = match ns {
            Some(ns) => format!("{ns}/{owner}/{alias}"),
            None => format!("{owner}/{alias}"),
        };
        let rest = rest.join("/");
        let path = if rest.is_empty() { format!("/{app_id}") } else { format!("/{app_id}/{rest}") };
        let n = run_host_app_segments(&path);
        prop_assert_eq!(n, Some(if ns.is_some() { 3 } else { 2 }));
        let target = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let mut req = Request::builder().uri(target.as_str()).body(()).unwrap();
        prop_assert!(strip_segments(&mut req, n.unwrap()).is_ok());
        prop_assert_eq!(req.uri().path(), format!("/{rest}"));
        prop_assert_eq!(req.uri().query(), query.as_deref());
    }

    /// `strip_segments` never fails on a target hyper accepted, and never panics.
    #[test]
    fn strip_segments_any_target(path in any_path(), n in 0..5usize, q in proptest::option::of("[ -~&&[^#]]{0,20}")) {
        let target = match &q {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let Ok(uri) = target.parse::<http::Uri>() else { return Ok(()) };
        let mut req = Request::builder().uri(uri).body(()).unwrap();
        let before = req.uri().clone();
        prop_assert!(strip_segments(&mut req, n).is_ok(), "{before}");
        prop_assert!(req.uri().path().starts_with('/'));
        prop_assert_eq!(req.uri().query(), before.query());
        if let Some(k) = run_host_app_segments(before.path()) {
            let segs: Vec<&str> = before.path().trim_start_matches('/').split('/').collect();
            prop_assert!(segs[..k].iter().all(|s| !s.is_empty()));
        }
    }
}

/// Regression: `{id}` in another spelling of the same UUID (upper case, braced,
/// `urn:uuid:`, no hyphens) passed the id check but was looked up verbatim, so a
/// request that exists answered 404 and the URLs handed out carried the odd spelling.
#[test]
fn other_spellings_of_an_id_address_the_same_request() {
    let id = "0190d1a2-7c3b-7def-8abc-0123456789ab";
    for spelled in [
        "0190D1A2-7C3B-7DEF-8ABC-0123456789AB",
        "0190d1a27c3b7def8abc0123456789ab",
        "{0190d1a2-7c3b-7def-8abc-0123456789ab}",
        "urn:uuid:0190d1a2-7c3b-7def-8abc-0123456789ab",
    ] {
        let r = route_per_app(
            &Method::GET,
            &format!("/fal/queue/requests/{spelled}/status"),
            "",
        );
        assert_eq!(
            r,
            Route::Status {
                id: id.into(),
                stream: false
            }
        );
    }
}

/// Regression: under a mount, `/fal/queue` was matched as a string prefix, so
/// `/fal/queuesubmit` was the submit endpoint and a path outside the mount was routed
/// as if it were inside.
#[test]
fn queue_prefixes_are_whole_segments() {
    assert_eq!(
        route_per_app(&Method::POST, "/fal/queuesubmit", ""),
        Route::NotFound
    );
    assert_eq!(
        route_per_app(&Method::POST, "/other/fal/queue/submit", "/ns/fn"),
        Route::NotFound
    );
    assert_eq!(
        route_per_app(&Method::POST, "/ns/fn/fal/queue/submit/x", "/ns/fn"),
        Route::Submit {
            endpoint: "/x".into()
        }
    );
}

/// The gateway's rule: a namespace called `workflows` is a namespace, not fal's prefix.
#[test]
fn namespace_named_like_a_prefix() {
    let r = route_queue_host(
        &Method::POST,
        "/workflows/fn/predict",
        AppIdRule::NamespaceName,
    )
    .unwrap();
    assert_eq!(r.app_id, "workflows/fn");
    assert_eq!(r.owner, "workflows");
    assert_eq!(
        r.route,
        Route::Submit {
            endpoint: "/predict".into()
        }
    );
    // fal's own rule reads the same path as app `workflows/fn/predict`.
    let r = route_queue_host(&Method::POST, "/workflows/fn/predict", AppIdRule::Fal).unwrap();
    assert_eq!(r.app_id, "workflows/fn/predict");
    assert!(route_queue_host(&Method::POST, "/workflows/fn", AppIdRule::Fal).is_none());
}
