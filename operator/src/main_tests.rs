//! Flag parsing of `fal-operator` (the binary's CLI).

use super::*;
use clap::CommandFactory;

#[test]
fn cli_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn gateway_and_local_flags() {
    let cli = Cli::try_parse_from([
        "fal-operator",
        "gateway",
        "--store",
        "redis://r:6379/0",
        "--domain",
        "fal.test",
        "--cold-start-timeout",
        "2.5",
    ])
    .unwrap();
    let Command::Gateway(a) = cli.command else {
        panic!("gateway expected")
    };
    let cfg = a.flags.config();
    assert_eq!(cfg.domain.as_deref(), Some("fal.test"));
    assert_eq!(cfg.cold_start_timeout, Some(Duration::from_millis(2500)));
    assert_eq!(a.listen, "0.0.0.0:8080");
    // local may start with no -f (functions come from `function serve --local`).
    let cli = Cli::try_parse_from(["fal-operator", "local"]).unwrap();
    let Command::Local(l) = cli.command else {
        panic!("local expected")
    };
    assert!(l.files.is_empty());
    let cli = Cli::try_parse_from([
        "fal-operator",
        "function",
        "serve",
        "app.py",
        "app",
        "--alias",
        "seed",
        "--local",
        "http://127.0.0.1:9090",
        "--find-links",
        "wheels",
        "--no-index",
    ])
    .unwrap();
    assert!(matches!(
        cli.command,
        Command::Function(FunctionCommand::Serve { no_index: true, .. })
    ));
    let cli = Cli::try_parse_from([
        "fal-operator",
        "controller",
        "--leader-elect",
        "--store-secret",
        "s:url",
    ])
    .unwrap();
    let Command::Controller {
        leader_elect,
        objects,
        ..
    } = cli.command
    else {
        panic!()
    };
    assert!(leader_elect);
    assert_eq!(objects.store_secret, Some(("s".into(), "url".into())));
    assert!(
        Cli::try_parse_from(["fal-operator", "controller", "--store-secret", "nokey"]).is_err()
    );
    assert!(
        Cli::try_parse_from(["fal-operator", "controller", "--reconcile-concurrency", "0"])
            .is_err(),
        "0 would mean unbounded to kube-rs"
    );
}

#[test]
fn flags_fill_the_config() {
    let cli = Cli::try_parse_from([
        "fal-operator",
        "controller",
        "--sidecar-image",
        "reg/sidecar:1",
        "--store-url",
        "redis://redis:6379",
        "--gateway-domain",
        "fal.example.com",
        "--metrics-addr",
        "127.0.0.1:9000",
    ])
    .unwrap();
    let Command::Controller {
        objects,
        metrics_addr,
        leader_elect,
        reconcile_concurrency,
        ..
    } = cli.command
    else {
        panic!("parsed the wrong subcommand");
    };
    assert_eq!(metrics_addr, "127.0.0.1:9000".parse().unwrap());
    assert!(!leader_elect);
    assert_eq!(reconcile_concurrency, 8, "bounded by default");
    let (catalog, config) = objects.load(Some("fal-ns".into())).unwrap();
    assert!(catalog.get("GPU-T4").is_some());
    assert_eq!(config.sidecar_image, "reg/sidecar:1");
    assert_eq!(config.store_url, "redis://redis:6379");
    assert_eq!(config.gateway_domain.as_deref(), Some("fal.example.com"));
    assert_eq!(config.signing_key_secret, None);
    let np = config.network_policy.unwrap();
    assert_eq!(np.gateway_namespace, "fal-ns", "POD_NAMESPACE by default");
    assert_eq!(
        np.gateway_pod_labels,
        config::parse_labels(config::DEFAULT_GATEWAY_POD_LABELS).unwrap()
    );
    assert_eq!(np.metrics_namespace, None);
}

fn objects(args: &[&str]) -> anyhow::Result<OperatorConfig> {
    let cli = Cli::try_parse_from([&["fal-operator", "render", "-f", "x.yaml"], args].concat())?;
    let Command::Render { objects, .. } = cli.command else {
        panic!("parsed the wrong subcommand");
    };
    Ok(objects.load(None)?.1)
}

#[test]
fn network_policy_flags() {
    let np = objects(&[]).unwrap().network_policy.unwrap();
    assert_eq!(np.gateway_namespace, "fal-system");
    let np = objects(&[
        "--gateway-namespace",
        "gw",
        "--gateway-pod-labels",
        "app=gw,tier=edge",
        "--metrics-namespace",
        "monitoring",
    ])
    .unwrap()
    .network_policy
    .unwrap();
    assert_eq!(np.gateway_namespace, "gw");
    assert_eq!(np.gateway_pod_labels.len(), 2);
    assert_eq!(np.metrics_namespace.as_deref(), Some("monitoring"));
    // The chart passes an empty value when no metrics namespace is set.
    let np = objects(&["--metrics-namespace", ""])
        .unwrap()
        .network_policy;
    assert_eq!(np.unwrap().metrics_namespace, None);
    for off in [
        &["--network-policy=false"][..],
        &["--network-policy", "false"],
    ] {
        assert_eq!(objects(off).unwrap().network_policy, None);
    }
    assert!(objects(&["--network-policy"])
        .unwrap()
        .network_policy
        .is_some());
    let err = objects(&["--gateway-pod-labels", "nolabel"]).unwrap_err();
    assert!(err.to_string().contains("KEY=VALUE"), "{err}");
    let err = objects(&["--metrics-namespace", "Mon"]).unwrap_err();
    assert!(err.to_string().contains("--metrics-namespace"), "{err}");
}

#[test]
fn key_flags() {
    let cli = Cli::try_parse_from([
        "fal-operator",
        "key",
        "create",
        "ci",
        "-n",
        "team-a",
        "--function",
        "echo",
        "--function",
        "ml/sdxl",
        "--rps",
        "2.5",
        "--burst",
        "5",
        "--expires",
        "30d",
        "--apply",
    ])
    .unwrap();
    let Command::Key(KeyCommand::Create {
        name,
        namespace,
        functions,
        rps,
        burst,
        expires,
        apply,
    }) = cli.command
    else {
        panic!("parsed the wrong subcommand");
    };
    assert_eq!(
        (name.as_str(), namespace.as_deref()),
        ("ci", Some("team-a"))
    );
    assert_eq!(functions, ["echo", "ml/sdxl"]);
    assert_eq!(
        (rps, burst, expires.as_deref(), apply),
        (Some(2.5), Some(5), Some("30d"), true)
    );
    assert!(
        Cli::try_parse_from(["fal-operator", "key", "create", "ci", "--burst", "5"]).is_err(),
        "--burst needs --rps"
    );
    assert!(Cli::try_parse_from(["fal-operator", "key", "list", "-A", "-n", "x"]).is_err());
    let cli = Cli::try_parse_from(["fal-operator", "key", "revoke", "ci", "--disable"]).unwrap();
    assert!(matches!(
        cli.command,
        Command::Key(KeyCommand::Revoke {
            disable: true,
            namespace: None,
            ..
        })
    ));
}
