//! Property tests (bounded fuzzing) of the gateway's routing: `/{namespace}/{name}`
//! path prefixes and `Host: {name}.{namespace}.{domain}`, and how they meet the
//! sidecar library's queue routing. Cases per property: 1024, or `PROPTEST_CASES`.

use fal_operator::function::is_dns_label;
use fal_operator::gateway::{function_from_host, is_queue_path, split_function};
use fal_sidecar::api::queue::{route_per_app, route_queue_host, AppIdRule, Route};
use fal_sidecar::api::strip_segments;
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

/// A DNS label, sometimes one of fal's namespace prefixes (valid Kubernetes names too).
fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?",
        1 => Just("workflows".to_string()),
        1 => Just("comfy".to_string()),
    ]
}

fn domain() -> impl Strategy<Value = String> {
    proptest::collection::vec(label(), 1..4).prop_map(|l| l.join("."))
}

fn segment() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._~%:@!$&'()*+,;=-]{1,12}"
}

fn mixed_case(s: &str, flips: &[bool]) -> String {
    s.chars()
        .zip(flips.iter().cycle())
        .map(|(c, up)| if *up { c.to_ascii_uppercase() } else { c })
        .collect()
}

proptest! {
    #![proptest_config(config())]

    /// `{name}.{namespace}.{domain}` in any case, with a trailing dot and a port, names
    /// that function.
    #[test]
    fn host_round_trip(
        name in label(), ns in label(), domain in domain(),
        flips in proptest::collection::vec(any::<bool>(), 1..16),
        dot in any::<bool>(), port in proptest::option::of(any::<u16>()),
        conf_flips in proptest::collection::vec(any::<bool>(), 1..16), conf_dot in any::<bool>(),
    ) {
        let mut host = mixed_case(&format!("{name}.{ns}.{domain}"), &flips);
        if dot {
            host.push('.');
        }
        if let Some(p) = port {
            host = format!("{host}:{p}");
        }
        let mut configured = mixed_case(&domain, &conf_flips);
        if conf_dot {
            configured.push('.');
        }
        prop_assert_eq!(function_from_host(&configured, &host), Some((ns.clone(), name.clone())));
        // The bare domain, or a host that only ends like it, names no function.
        prop_assert_eq!(function_from_host(&configured, &domain), None);
        prop_assert_eq!(function_from_host(&configured, &format!("{name}.{ns}.x{domain}")), None);
    }

    #[test]
    fn host_parser_never_panics(domain in "[ -~]{0,20}", host in "[ -~]{0,40}") {
        if let Some((ns, name)) = function_from_host(&domain, &host) {
            prop_assert!(!name.is_empty() && !name.contains('.'));
            let d = domain.trim_matches('.').to_ascii_lowercase();
            let whole = format!("{name}.{ns}.{d}");
            prop_assert!(host.to_ascii_lowercase().contains(&whole));
        }
    }

    /// The queue listener: the gateway's lookup (`split_function`) and the library's
    /// generation C routing agree on the function, whatever the namespace is called,
    /// and the app receives the rest of the path.
    #[test]
    fn queue_listener_round_trip(
        ns in label(), name in label(),
        rest in proptest::collection::vec(segment(), 0..4),
    ) {
        let rest = rest.join("/");
        let path = format!("/{ns}/{name}/{rest}");
        let (gns, gname, grest) = split_function(&path).unwrap();
        prop_assert_eq!((gns, gname, grest), (ns.as_str(), name.as_str(), rest.as_str()));
        prop_assert!(is_dns_label(gns) && is_dns_label(gname));
        let r = route_queue_host(&Method::POST, &path, AppIdRule::NamespaceName).unwrap();
        prop_assert_eq!(r.app_id, format!("{ns}/{name}"));
        prop_assert_eq!(r.owner, ns);
        prop_assert_eq!(r.route, Route::Submit { endpoint: format!("/{rest}") });
    }

    /// The run listener: queue paths go to the per-app API mounted at
    /// `/{namespace}/{name}`, everything else reaches the app without the prefix.
    #[test]
    fn run_listener_round_trip(
        ns in label(), name in label(),
        rest in proptest::collection::vec(segment(), 0..4),
        query in proptest::option::of("[a-zA-Z0-9=&%._~-]{0,20}"),
    ) {
        let rest = rest.join("/");
        let path = format!("/{ns}/{name}/{rest}");
        let (_, _, grest) = split_function(&path).unwrap();
        let mount = format!("/{ns}/{name}");
        if is_queue_path(grest) {
            prop_assert_ne!(route_per_app(&Method::POST, &path, &mount), Route::NotFound);
        } else {
            let target = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            let mut req = Request::builder().uri(target.as_str()).body(()).unwrap();
            prop_assert!(strip_segments(&mut req, 2).is_ok());
            prop_assert_eq!(req.uri().path(), format!("/{rest}"));
            prop_assert_eq!(req.uri().query(), query.as_deref());
        }
    }

    #[test]
    fn split_function_never_panics(path in "/?[ -~]{0,40}") {
        if let Some((ns, name, rest)) = split_function(&path) {
            prop_assert!(!ns.is_empty() && !name.is_empty());
            prop_assert!(!ns.contains('/') && !name.contains('/'));
            prop_assert!(path.ends_with(rest));
        }
    }
}

/// Regression: the per-app host was matched case-sensitively and without the trailing
/// dot of a fully qualified name, so `Fn.NS.Example.com` or `fn.ns.example.com.` fell
/// through to path routing and answered 404.
#[test]
fn host_names_are_case_insensitive() {
    let want = Some(("ns".to_string(), "fn".to_string()));
    assert_eq!(function_from_host("example.com", "Fn.NS.Example.COM"), want);
    assert_eq!(
        function_from_host("example.com", "fn.ns.example.com."),
        want
    );
    assert_eq!(
        function_from_host("Example.com.", "fn.ns.example.com.:8080"),
        want
    );
    assert_eq!(
        function_from_host("example.com", "fn.ns.xexample.com"),
        None
    );
    assert_eq!(function_from_host("", "fn.ns"), None);
}

/// Regression: a FalFunction in a namespace named `workflows` (or `comfy`) was routed
/// with fal's namespace-prefix rule on the gateway's queue listener: `POST
/// /workflows/fn` answered 404 and `POST /workflows/fn/predict` enqueued a call of `/`
/// instead of `/predict`.
#[test]
fn gateway_namespace_named_workflows() {
    for (path, endpoint) in [("/workflows/fn", "/"), ("/comfy/fn/predict", "/predict")] {
        let r = route_queue_host(&Method::POST, path, AppIdRule::NamespaceName).unwrap();
        assert_eq!(
            r.route,
            Route::Submit {
                endpoint: endpoint.into()
            }
        );
        let (ns, name, _) = split_function(path).unwrap();
        assert_eq!(r.app_id, format!("{ns}/{name}"));
    }
}
