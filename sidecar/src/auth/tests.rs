//! The decision table of [`Authorizer::check`]: every credential form against every
//! auth mode.

use super::keys::{secret_sha256_hex, KeySpec, RateLimitSpec};
use super::ratelimit::MemoryLimiter;
use super::*;

fn key(ns: &str, name: &str, id: &str, secret: &str) -> KeySpec {
    let _ = (ns, name);
    KeySpec {
        key_id: id.into(),
        secret_sha256: secret_sha256_hex(secret),
        ..KeySpec::default()
    }
}

fn authorizer() -> Authorizer {
    let ring = Arc::new(KeyRing::new());
    ring.upsert(KeyRecord::from_spec("team-a", "ci", &key("team-a", "ci", "ka", "sa")).unwrap());
    ring.upsert(KeyRecord::from_spec("team-b", "ci", &key("team-b", "ci", "kb", "sb")).unwrap());
    let mut only = key("team-a", "only", "ko", "so");
    only.functions = Some(vec!["sdxl".into()]);
    ring.upsert(KeyRecord::from_spec("team-a", "only", &only).unwrap());
    let mut off = key("team-a", "off", "kd", "sd");
    off.disabled = true;
    ring.upsert(KeyRecord::from_spec("team-a", "off", &off).unwrap());
    let mut old = key("team-a", "old", "kx", "sx");
    old.expires_at = Some("2020-01-01T00:00:00Z".into());
    ring.upsert(KeyRecord::from_spec("team-a", "old", &old).unwrap());
    let mut slow = key("team-a", "slow", "kr", "sr");
    slow.rate_limit = Some(RateLimitSpec {
        requests_per_second: 1.0,
        burst: Some(2),
    });
    ring.upsert(KeyRecord::from_spec("team-a", "slow", &slow).unwrap());
    Authorizer::new(
        ring,
        Arc::new(Signer::from_seed([3; 32])),
        Arc::new(MemoryLimiter::default()),
        true,
    )
}

fn req(auth: Option<&str>, uri: &str) -> Request<()> {
    let mut b = Request::builder().uri(uri);
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    b.body(()).unwrap()
}

const SDXL_PRIVATE: Target = Target {
    namespace: "team-a",
    name: "sdxl",
    mode: AuthMode::Private,
};

async fn status(a: &Authorizer, t: Target<'_>, auth: Option<&str>) -> u16 {
    let mut r = req(auth, "/x");
    match a.check(t, &mut r).await {
        Ok(()) => 200,
        Err(d) => d.status().as_u16(),
    }
}

#[tokio::test]
async fn keys_against_a_private_function() {
    let a = authorizer();
    for (auth, want) in [
        (Some("Key ka:sa"), 200),
        (Some("key  ka:sa"), 200),
        (Some("Key ko:so"), 200),
        (None, 401),
        (Some("Basic a2E6c2E="), 401),
        (Some("Key ka"), 401),
        (Some("Key ka:wrong"), 401),
        (Some("Key nobody:sa"), 401),
        (Some("Key kd:sd"), 401),
        (Some("Key kx:sx"), 401),
        (Some("Key kb:sb"), 403),
    ] {
        assert_eq!(status(&a, SDXL_PRIVATE, auth).await, want, "{auth:?}");
    }
    let llm = Target {
        name: "llm",
        ..SDXL_PRIVATE
    };
    assert_eq!(
        status(&a, llm, Some("Key ko:so")).await,
        403,
        "outside functions"
    );
}

#[tokio::test]
async fn shared_and_public_functions() {
    let a = authorizer();
    let shared = Target {
        namespace: "team-b",
        name: "f",
        mode: AuthMode::Shared,
    };
    assert_eq!(status(&a, shared, Some("Key ka:sa")).await, 200);
    assert_eq!(status(&a, shared, None).await, 401);
    assert_eq!(status(&a, shared, Some("Key ko:so")).await, 403);
    let public = Target {
        mode: AuthMode::Public,
        ..shared
    };
    for auth in [
        None,
        Some("Key ka:sa"),
        Some("Key ka:wrong"),
        Some("Basic x"),
        Some("Bearer app-own"),
    ] {
        assert_eq!(status(&a, public, auth).await, 200, "{auth:?}");
    }
}

#[tokio::test]
async fn principal_and_credentials_after_admission() {
    let a = authorizer();
    let mut r = req(Some("Key ka:sa"), "/p?x=1");
    a.check(SDXL_PRIVATE, &mut r).await.unwrap();
    assert_eq!(
        r.extensions().get::<Principal>().unwrap().tenant(),
        "team-a"
    );
    assert!(
        r.headers().get("authorization").is_none(),
        "the key never reaches the app"
    );

    // Public: an invalid key is dropped and the call is anonymous; another scheme stays.
    let public = Target {
        mode: AuthMode::Public,
        ..SDXL_PRIVATE
    };
    let mut r = req(Some("Key ka:nope"), "/p");
    a.check(public, &mut r).await.unwrap();
    assert!(r.extensions().get::<Principal>().is_none());
    assert!(r.headers().get("authorization").is_none());
    let mut r = req(Some("Basic abc"), "/p");
    a.check(public, &mut r).await.unwrap();
    assert_eq!(r.headers()["authorization"], "Basic abc");

    // Two Authorization headers: refused on a private function.
    let mut r = req(Some("Key ka:sa"), "/p");
    r.headers_mut()
        .append("authorization", "Key kb:sb".parse().unwrap());
    assert_eq!(
        a.check(SDXL_PRIVATE, &mut r).await.unwrap_err().status(),
        401
    );
}

#[tokio::test]
async fn auth_off_passes_everyone_and_still_keeps_keys_from_the_app() {
    let a = authorizer();
    a.set_required(false);
    let mut r = req(Some("Key anything"), "/p?fal_jwt_token=t&y=2");
    a.check(SDXL_PRIVATE, &mut r).await.unwrap();
    assert!(r.extensions().get::<Principal>().is_none());
    assert!(r.headers().get("authorization").is_none());
    assert_eq!(r.uri().to_string(), "/p?y=2");
    let mut r = req(Some("Bearer app-token"), "/p");
    a.check(SDXL_PRIVATE, &mut r).await.unwrap();
    assert!(r.headers().get("authorization").is_some());
}

#[tokio::test]
async fn tokens_open_only_their_apps() {
    let a = authorizer();
    let auth = HeaderValue::from_static("Key ka:sa");
    let t = a
        .mint(
            Some(&auth),
            br#"{"allowed_apps": ["sdxl"], "token_expiration": 60}"#,
        )
        .await
        .unwrap();
    let bearer = format!("Bearer {t}");
    assert_eq!(status(&a, SDXL_PRIVATE, Some(&bearer)).await, 200);
    let llm = Target {
        name: "llm",
        ..SDXL_PRIVATE
    };
    assert_eq!(status(&a, llm, Some(&bearer)).await, 403);

    let mut r = req(
        None,
        &format!("/realtime?fal_jwt_token={t}&max_buffering=5"),
    );
    a.check(SDXL_PRIVATE, &mut r).await.unwrap();
    assert_eq!(r.extensions().get::<Principal>().unwrap().key.key_id, "ka");
    assert_eq!(r.uri().to_string(), "/realtime?max_buffering=5");

    // A token of a key that is then revoked stops working.
    a.ring().remove("team-a", "ci");
    assert_eq!(status(&a, SDXL_PRIVATE, Some(&bearer)).await, 401);

    // Minting needs a good key and a good body.
    let bad = HeaderValue::from_static("Key ka:wrong");
    assert!(matches!(
        a.mint(Some(&bad), br#"{"allowed_apps": ["sdxl"]}"#).await,
        Err(MintError::Denied(Denial::Unauthenticated(_)))
    ));
    let ok = HeaderValue::from_static("Key kb:sb");
    for body in [
        &b"{}"[..],
        b"[]",
        br#"{"allowed_apps": ["Bad Name"]}"#,
        br#"{"allowed_apps": ["a"], "token_expiration": 0}"#,
    ] {
        assert!(
            matches!(a.mint(Some(&ok), body).await, Err(MintError::BadRequest(_))),
            "{body:?}"
        );
    }
}

#[tokio::test]
async fn rate_limits_refuse_with_a_wait() {
    let a = authorizer();
    assert_eq!(status(&a, SDXL_PRIVATE, Some("Key kr:sr")).await, 200);
    assert_eq!(status(&a, SDXL_PRIVATE, Some("Key kr:sr")).await, 200);
    let mut r = req(Some("Key kr:sr"), "/x");
    match a.check(SDXL_PRIVATE, &mut r).await {
        Err(Denial::RateLimited { retry_after, .. }) => {
            assert!(retry_after <= Duration::from_secs(1))
        }
        other => panic!("{other:?}"),
    }
    // Another key has its own budget.
    assert_eq!(status(&a, SDXL_PRIVATE, Some("Key ka:sa")).await, 200);
}

#[test]
fn token_requests() {
    assert_eq!(
        TokenRequest::parse(br#"{"allowed_apps": ["echo", "ns/app"], "token_expiration": 120}"#)
            .unwrap(),
        TokenRequest {
            apps: vec!["echo".into(), "ns/app".into()],
            lifetime_secs: 120
        }
    );
    assert_eq!(
        TokenRequest::parse(br#"{"allowed_apps": ["echo"]}"#)
            .unwrap()
            .lifetime_secs,
        token::DEFAULT_LIFETIME_SECS
    );
    assert!(TokenRequest::parse(br#"{"allowed_apps": ["e"], "token_expiration": 1e9}"#).is_err());
    assert!(TokenRequest::parse(b"not json")
        .unwrap_err()
        .contains("allowed_apps"));
}
