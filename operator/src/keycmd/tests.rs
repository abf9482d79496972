//! `fal-operator key`: the object built from the flags (pure), `--expires`, the table,
//! and the API calls against a scripted apiserver ([`crate::mock_api`]).

use super::*;
use crate::mock_api::{finished, mock_client, not_found, status, Call};
use http::StatusCode;
use serde_json::Value;

/// 2026-01-01T00:00:00Z.
const NOW_SECS: u64 = 1_767_225_600;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW_SECS)
}

/// A random source counting up from 1, so ids and secrets are predictable.
fn counting() -> impl FnMut(&mut [u8]) -> Result<()> {
    let mut n = 0u8;
    move |buf: &mut [u8]| {
        for b in buf {
            n = n.wrapping_add(1);
            *b = n;
        }
        Ok(())
    }
}

fn opts(name: &str) -> CreateOptions {
    CreateOptions {
        name: name.into(),
        namespace: Some("team-a".into()),
        ..CreateOptions::default()
    }
}

fn make(o: &CreateOptions) -> Result<NewKey> {
    new_key(o, now(), &mut counting())
}

#[test]
fn create_builds_a_falkey_holding_only_the_hash() {
    let o = CreateOptions {
        functions: vec!["echo".into(), "ml/sdxl".into()],
        requests_per_second: Some(2.5),
        burst: Some(10),
        expires: Some("30d".into()),
        ..opts("ci")
    };
    let key = make(&o).unwrap();
    let spec = &key.object.spec;
    // 16 bytes 1..=16 with the version and variant bits of a v4 UUID.
    assert_eq!(spec.key_id, "01020304-0506-4708-890a-0b0c0d0e0f10");
    let secret: String = (17u8..=48).map(|b| format!("{b:02x}")).collect();
    assert_eq!(secret.len(), 64, "256 bits");
    assert_eq!(key.fal_key(), format!("{}:{secret}", spec.key_id));
    assert_eq!(spec.secret_sha256, secret_sha256_hex(&secret));
    assert_eq!(
        spec.functions,
        Some(vec!["echo".to_string(), "ml/sdxl".to_string()])
    );
    assert_eq!(
        spec.rate_limit,
        Some(FalKeyRateLimit {
            requests_per_second: 2.5,
            burst: Some(10)
        })
    );
    assert_eq!(spec.expires_at.as_deref(), Some("2026-01-31T00:00:00Z"));
    assert!(!spec.disabled);
    assert_eq!(key.object.namespace().as_deref(), Some("team-a"));

    // The gateway accepts it and the secret from FAL_KEY matches.
    let record = key.object.record().unwrap();
    assert!(record.secret_matches(&secret));
    assert_eq!(record.namespace, "team-a");

    // The secret is in no printed object and no debug output.
    let yaml = to_yaml(&key.object).unwrap();
    assert!(!yaml.contains(&secret), "{yaml}");
    assert!(yaml.starts_with("apiVersion: fal.serverless.dev/v1alpha1\nkind: FalKey\n"));
    assert!(yaml.contains("secretSha256: "));
    assert!(!format!("{key:?}").contains(&secret));
}

#[test]
fn create_without_options_is_an_unlimited_key_for_every_function() {
    let mut o = opts("plain");
    o.namespace = None;
    let key = make(&o).unwrap();
    let s = &key.object.spec;
    assert_eq!(
        (&s.functions, &s.rate_limit, &s.expires_at),
        (&None, &None, &None)
    );
    let yaml = to_yaml(&key.object).unwrap();
    assert!(
        !yaml.contains("namespace:"),
        "kubectl apply picks it: {yaml}"
    );
}

#[test]
fn os_random_keys_differ() {
    let o = opts("a");
    let a = new_key(&o, now(), &mut os_random).unwrap();
    let b = new_key(&o, now(), &mut os_random).unwrap();
    assert_ne!(a.object.spec.key_id, b.object.spec.key_id);
    assert_ne!(a.fal_key(), b.fal_key());
    let id = uuid::Uuid::parse_str(&a.object.spec.key_id).unwrap();
    assert_eq!(id.get_version_num(), 4);
    let secret = a.fal_key().split_once(':').unwrap().1.to_string();
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn random_source_failure_is_reported() {
    let err = new_key(&opts("a"), now(), &mut |_: &mut [u8]| {
        Err(Error::Key("no entropy".into()))
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "no entropy");
}

#[test]
fn bad_flags_name_the_flag() {
    let cases: Vec<(CreateOptions, &str)> = vec![
        (
            opts("Bad_Name"),
            "NAME: \"Bad_Name\" is not a Kubernetes object name",
        ),
        (
            CreateOptions {
                namespace: Some("Team".into()),
                ..opts("a")
            },
            "--namespace",
        ),
        (
            CreateOptions {
                functions: vec!["a/b/c".into()],
                ..opts("a")
            },
            "--function: \"a/b/c\" is not NAME",
        ),
        (
            CreateOptions {
                functions: vec!["f".into(); MAX_FUNCTIONS + 1],
                ..opts("a")
            },
            "--function: at most 256",
        ),
        (
            CreateOptions {
                burst: Some(3),
                ..opts("a")
            },
            "--burst: needs --rps",
        ),
        (
            CreateOptions {
                requests_per_second: Some(0.0),
                ..opts("a")
            },
            "--rps/--burst: requestsPerSecond must be above 0",
        ),
        (
            CreateOptions {
                requests_per_second: Some(2e6),
                ..opts("a")
            },
            "--rps/--burst",
        ),
        (
            CreateOptions {
                requests_per_second: Some(1.0),
                burst: Some(0),
                ..opts("a")
            },
            "--rps/--burst: burst must be at least 1",
        ),
        (
            CreateOptions {
                requests_per_second: Some(1.0),
                burst: Some(-4),
                ..opts("a")
            },
            "--rps/--burst: burst must be at least 1",
        ),
        (
            CreateOptions {
                expires: Some("soon".into()),
                ..opts("a")
            },
            "--expires: \"soon\" is neither a duration",
        ),
    ];
    for (o, want) in cases {
        let err = make(&o).unwrap_err().to_string();
        assert!(err.starts_with(want), "{err:?} should start with {want:?}");
    }
}

#[test]
fn expires_takes_durations_and_rfc3339() {
    assert_eq!(parse_expires("30d", now()).unwrap(), "2026-01-31T00:00:00Z");
    assert_eq!(
        parse_expires(" 12h ", now()).unwrap(),
        "2026-01-01T12:00:00Z"
    );
    assert_eq!(
        parse_expires("1h 30m", now()).unwrap(),
        "2026-01-01T01:30:00Z"
    );
    assert_eq!(
        parse_expires("2027-06-01T00:00:00Z", now()).unwrap(),
        "2027-06-01T00:00:00Z"
    );
    // Normalized to what the CRD's date-time format and the gateway both read.
    assert_eq!(
        parse_expires("2027-06-01 08:30:00", now()).unwrap(),
        "2027-06-01T08:30:00Z"
    );
    for (bad, why) in [
        ("2025-06-01T00:00:00Z", "in the past"),
        ("0s", "zero duration"),
        ("next week", "neither a duration"),
        ("100000y", "after the year 9999"),
        ("", "neither a duration"),
    ] {
        let err = parse_expires(bad, now()).unwrap_err().to_string();
        assert!(
            err.starts_with("--expires: ") && err.contains(why),
            "{bad}: {err}"
        );
    }
}

fn listed(ns: &str, name: &str, spec: FalKeySpec) -> FalKey {
    let mut k = FalKey::new(name, spec);
    k.metadata.namespace = Some(ns.into());
    k
}

fn spec(id: &str) -> FalKeySpec {
    FalKeySpec {
        key_id: id.into(),
        secret_sha256: secret_sha256_hex("s"),
        functions: None,
        rate_limit: None,
        expires_at: None,
        disabled: false,
    }
}

#[test]
fn table_lists_keys_sorted_with_readable_columns() {
    let keys = vec![
        listed(
            "team-b",
            "ci",
            FalKeySpec {
                functions: Some(vec!["echo".into(), "ml/sdxl".into()]),
                rate_limit: Some(FalKeyRateLimit {
                    requests_per_second: 2.5,
                    burst: Some(10),
                }),
                expires_at: Some("2025-01-01T00:00:00Z".into()),
                disabled: true,
                ..spec("id-2")
            },
        ),
        listed(
            "team-a",
            "web",
            FalKeySpec {
                rate_limit: Some(FalKeyRateLimit {
                    requests_per_second: 5.0,
                    burst: None,
                }),
                expires_at: Some("2027-01-01T00:00:00Z".into()),
                ..spec("id-1")
            },
        ),
        listed("team-a", "admin", spec("id-0")),
    ];
    let out = table(&keys, now());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "NAMESPACE   NAME    KEY ID   FUNCTIONS      RATE             EXPIRES                          DISABLED",
            "team-a      admin   id-0     (all)          unlimited        never                            false",
            "team-a      web     id-1     (all)          5/s              2027-01-01T00:00:00Z             false",
            "team-b      ci      id-2     echo,ml/sdxl   2.5/s burst 10   2025-01-01T00:00:00Z (expired)   true",
        ]
    );
}

const KEYS: &str = "/apis/fal.serverless.dev/v1alpha1/namespaces/team-a/falkeys";

fn created(mut body: Value) -> (StatusCode, Value) {
    body["metadata"]["uid"] = json!("key-uid");
    body["metadata"]["resourceVersion"] = json!("1");
    (StatusCode::CREATED, body)
}

#[tokio::test]
async fn apply_creates_the_falkey_without_the_secret() {
    let mut o = opts("ci");
    o.namespace = None;
    o.functions = vec!["echo".into()];
    let key = make(&o).unwrap();
    let secret = key.fal_key().split_once(':').unwrap().1.to_string();
    let want_spec = serde_json::to_value(&key.object.spec).unwrap();
    let calls = vec![Call::new(
        http::Method::POST,
        format!("{KEYS}?&fieldManager=fal-operator-key"),
        move |body| {
            assert!(!body.to_string().contains(&secret), "secret sent: {body}");
            assert_eq!(body["apiVersion"], "fal.serverless.dev/v1alpha1");
            assert_eq!(body["kind"], "FalKey");
            assert_eq!(body["metadata"]["name"], "ci");
            assert_eq!(body["metadata"]["namespace"], "team-a");
            assert_eq!(body["spec"], want_spec);
            created(body)
        },
    )];
    let (client, server) = mock_client(calls);
    let stored = create(&client, "team-a", &key.object).await.unwrap();
    assert_eq!(stored.spec, key.object.spec);
    assert_eq!(stored.metadata.uid.as_deref(), Some("key-uid"));
    drop(client);
    assert_eq!(finished(server).await.len(), 1);
}

#[tokio::test]
async fn apply_errors_say_what_to_do() {
    let key = make(&opts("ci")).unwrap();
    let post = format!("{KEYS}?&fieldManager=fal-operator-key");
    let cases: Vec<((StatusCode, Value), &str)> = vec![
        (
            status(StatusCode::CONFLICT, "AlreadyExists", "falkeys \"ci\" already exists"),
            "FalKey team-a/ci already exists: pick another name, or revoke that key first \
             (fal-operator key revoke ci -n team-a)",
        ),
        (
            // A bare unknown API path: the CRD is missing.
            status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource"),
            "the FalKey CRD (falkeys.fal.serverless.dev) is not installed in this cluster: \
             kubectl apply -f crds/falkeys.yaml",
        ),
        (
            status(StatusCode::FORBIDDEN, "Forbidden", "user \"dev\" cannot create resource"),
            "creating FalKey team-a/ci is not allowed for your kubeconfig's user",
        ),
        (
            status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "FalKey.fal.serverless.dev \"ci\" is invalid: spec.keyId: Invalid value",
            ),
            "creating FalKey team-a/ci: the apiserver said: FalKey.fal.serverless.dev \"ci\" is invalid",
        ),
    ];
    for (reply, want) in cases {
        let (client, server) = mock_client(vec![Call::new(
            http::Method::POST,
            post.clone(),
            move |_| reply,
        )]);
        let err = create(&client, "team-a", &key.object)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        assert!(!err.contains(key.fal_key().split_once(':').unwrap().1));
        drop(client);
        finished(server).await;
    }
}

fn key_list(items: Vec<FalKey>, cont: Option<&str>) -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalKeyList",
               "metadata": {"resourceVersion": "9", "continue": cont},
               "items": items}),
    )
}

#[tokio::test]
async fn list_reads_every_page_of_one_namespace_or_all() {
    let calls = vec![
        Call::new(http::Method::GET, format!("{KEYS}?&limit=500"), |_| {
            key_list(vec![listed("team-a", "a", spec("id-a"))], Some("page2"))
        }),
        Call::new(
            http::Method::GET,
            format!("{KEYS}?&limit=500&continue=page2"),
            |_| key_list(vec![listed("team-a", "b", spec("id-b"))], None),
        ),
        Call::new(
            http::Method::GET,
            "/apis/fal.serverless.dev/v1alpha1/falkeys?&limit=500",
            |_| key_list(vec![listed("team-z", "z", spec("id-z"))], Some("")),
        ),
        Call::new(http::Method::GET, format!("{KEYS}?&limit=500"), |_| {
            status(StatusCode::NOT_FOUND, "NotFound", "404 page not found")
        }),
        Call::new(
            http::Method::GET,
            "/apis/fal.serverless.dev/v1alpha1/falkeys?&limit=500",
            |_| status(StatusCode::FORBIDDEN, "Forbidden", "cannot list resource"),
        ),
    ];
    let (client, server) = mock_client(calls);
    let names: Vec<_> = list(&client, Some("team-a"))
        .await
        .unwrap()
        .iter()
        .map(|k| k.spec.key_id.clone())
        .collect();
    assert_eq!(names, ["id-a", "id-b"]);
    let all = list(&client, None).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].namespace().as_deref(), Some("team-z"));
    let err = list(&client, Some("team-a")).await.unwrap_err().to_string();
    assert!(err.contains("kubectl apply -f crds/falkeys.yaml"), "{err}");
    let err = list(&client, None).await.unwrap_err().to_string();
    assert!(
        err.starts_with("listing FalKeys of every namespace is not allowed"),
        "{err}"
    );
    drop(client);
    assert_eq!(finished(server).await.len(), 5);
}

#[tokio::test]
async fn revoke_deletes_or_disables() {
    let calls = vec![
        Call::new(http::Method::DELETE, format!("{KEYS}/ci?"), |body| {
            assert!(
                body.is_null() || body.get("dryRun").is_none(),
                "a plain delete: {body}"
            );
            (
                StatusCode::OK,
                serde_json::to_value(listed("team-a", "ci", spec("id"))).unwrap(),
            )
        }),
        Call::new(http::Method::DELETE, format!("{KEYS}/gone?"), |_| {
            not_found()
        }),
        Call::new(
            http::Method::PATCH,
            format!("{KEYS}/ci?&fieldManager=fal-operator-key"),
            |body| {
                assert_eq!(body, json!({"spec": {"disabled": true}}));
                let mut k = listed("team-a", "ci", spec("id"));
                k.spec.disabled = true;
                (StatusCode::OK, serde_json::to_value(k).unwrap())
            },
        ),
    ];
    let (client, server) = mock_client(calls);
    delete(&client, "team-a", "ci").await.unwrap();
    let err = delete(&client, "team-a", "gone")
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "FalKey team-a/gone not found (fal-operator key list -n team-a shows the keys there)"
    );
    assert!(
        disable(&client, "team-a", "ci")
            .await
            .unwrap()
            .spec
            .disabled
    );
    drop(client);
    assert_eq!(
        finished(server).await,
        [
            format!("DELETE {KEYS}/ci?"),
            format!("DELETE {KEYS}/gone?"),
            format!("PATCH {KEYS}/ci?&fieldManager=fal-operator-key"),
        ]
    );
}
