//! Property tests (bounded fuzzing) of credentials (issue 15): the `Authorization`
//! parser, the `fal_jwt_token` query split and token verification never panic on any
//! bytes; a parsed key is exactly what was sent; a message never holds the secret; a
//! token verifies only as issued. Cases per property: 1024, or `PROPTEST_CASES`.

use fal_sidecar::auth::header::{parse_authorization, take_query_token, Credential, Parsed};
use fal_sidecar::auth::token::{self, Claims};
use fal_sidecar::webhook::signing::Signer;
use proptest::prelude::*;
use proptest::test_runner::Config;

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

/// Header-like bytes: schemes and separators are the interesting part.
fn authorization() -> impl Strategy<Value = Vec<u8>> {
    let scheme = prop_oneof![
        Just("Key"),
        Just("key"),
        Just("KEY"),
        Just("Bearer"),
        Just("bearer"),
        Just("Basic"),
        Just("Keys"),
        Just(""),
        Just("Key:"),
    ];
    let sep = prop_oneof![Just(" "), Just("  "), Just("\t"), Just(""), Just(" \t ")];
    prop_oneof![
        (
            scheme,
            sep,
            "[ -~]{0,40}",
            proptest::collection::vec(any::<u8>(), 0..8)
        )
            .prop_map(|(s, p, rest, tail)| {
                let mut v = format!("{s}{p}{rest}").into_bytes();
                v.extend(tail);
                v
            }),
        proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn authorization_never_panics_and_keys_are_exact(raw in authorization()) {
        match parse_authorization(&raw) {
            Parsed::Ours(Credential::Key { id, secret }) => {
                prop_assert!(!id.is_empty() && !secret.is_empty());
                prop_assert!(!id.contains(':'));
                prop_assert!(id.bytes().chain(secret.bytes()).all(|b| b.is_ascii_graphic()));
                // What was parsed is what was sent, after the scheme and its spaces.
                let text = std::str::from_utf8(&raw).unwrap();
                let sent = format!("{id}:{secret}");
                prop_assert!(text.trim_end_matches([' ', '\t']).ends_with(&sent));
            }
            Parsed::Ours(Credential::Bearer(t)) => {
                prop_assert!(!t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()));
            }
            Parsed::Malformed(why) => {
                // A fixed message: it cannot carry any part of the input.
                prop_assert!(!why.is_empty());
            }
            Parsed::Foreign => {}
        }
    }

    #[test]
    fn a_key_round_trips(id in "[!-9;-~]{1,40}", secret in "[!-~]{1,80}", sep in "[ \t]{1,3}") {
        let raw = format!("Key{sep}{id}:{secret}");
        prop_assert_eq!(
            parse_authorization(raw.as_bytes()),
            Parsed::Ours(Credential::Key { id: &id, secret: &secret })
        );
    }

    #[test]
    fn query_tokens_never_reach_the_rest(q in "[a-z_=&%0-9.]{0,60}") {
        let (_, rest) = take_query_token(&q);
        if let Some(rest) = rest {
            prop_assert!(rest.split('&').all(|p| p.split('=').next() != Some("fal_jwt_token")));
        }
    }

    #[test]
    fn tokens_verify_only_as_issued(
        apps in proptest::collection::vec("[a-z][a-z0-9-]{0,10}", 1..4),
        flip in any::<usize>(),
        garbage in "[A-Za-z0-9._-]{0,120}",
    ) {
        let signer = Signer::from_seed([9; 32]);
        let claims = Claims {
            iss: token::ISSUER.into(),
            sub: "k".into(),
            ns: "ns".into(),
            apps,
            iat: 1,
            exp: 1_000,
        };
        let t = token::issue(&signer, &claims);
        prop_assert_eq!(token::verify(&signer, &t, 500).unwrap(), claims);
        // Any one character changed: refused (the signature covers header and claims,
        // verification is strict, and the decoder refuses non-canonical base64).
        let mut bytes = t.clone().into_bytes();
        let i = flip % bytes.len();
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let changed = String::from_utf8(bytes).unwrap();
        if changed != t {
            prop_assert!(token::verify(&signer, &changed, 500).is_err(), "{}", i);
        }
        prop_assert!(token::verify(&signer, &garbage, 500).is_err());
    }
}
