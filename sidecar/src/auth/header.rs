//! Credentials as clients send them (pure parsing, no lookups):
//! `Authorization: Key <key_id>:<key_secret>` (both official fal clients),
//! `Authorization: Bearer <token>`, and the `fal_jwt_token` query parameter (realtime
//! URLs). Error messages never repeat the secret.

/// Longest `Authorization` value read (a JWT with a long app list fits easily).
pub const MAX_AUTHORIZATION: usize = 8 * 1024;
/// Longest key secret.
pub const MAX_SECRET: usize = 512;

/// A credential, borrowed from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    Key { id: &'a str, secret: &'a str },
    Bearer(&'a str),
}

/// What an `Authorization` value holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    Ours(Credential<'a>),
    /// Another scheme (Basic, Digest, …): the app's business on a public function.
    Foreign,
    /// `Key`/`Bearer` that is not well formed: the reason, safe to show.
    Malformed(&'static str),
}

fn is_token68(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// Parses one `Authorization` header value. Schemes are case-insensitive (RFC 9110
/// §11.1); one or more spaces separate the scheme from its parameter.
pub fn parse_authorization(raw: &[u8]) -> Parsed<'_> {
    if raw.len() > MAX_AUTHORIZATION {
        return Parsed::Malformed("the Authorization header is too long");
    }
    let Ok(v) = std::str::from_utf8(raw) else {
        return Parsed::Malformed("the Authorization header is not ASCII text");
    };
    let v = v.trim_matches(|c| c == ' ' || c == '\t');
    let (scheme, param) = match v.find([' ', '\t']) {
        Some(i) => (&v[..i], v[i..].trim_start_matches([' ', '\t'])),
        None => (v, ""),
    };
    if scheme.eq_ignore_ascii_case("key") {
        if param.is_empty() {
            return Parsed::Malformed(
                "the Authorization header says Key but carries no key: send Key <key_id>:<key_secret>",
            );
        }
        let Some((id, secret)) = param.split_once(':') else {
            return Parsed::Malformed(
                "the key is not of the form <key_id>:<key_secret> (FAL_KEY, or FAL_KEY_ID and FAL_KEY_SECRET)",
            );
        };
        if id.is_empty() || secret.is_empty() {
            return Parsed::Malformed(
                "the key id or the key secret is empty: send Key <key_id>:<key_secret>",
            );
        }
        if id.len() > super::keys::MAX_KEY_ID || secret.len() > MAX_SECRET {
            return Parsed::Malformed("the key id or the key secret is too long");
        }
        if !(id.bytes().chain(secret.bytes())).all(|b| b.is_ascii_graphic()) {
            return Parsed::Malformed(
                "the key holds spaces or control characters: send Key <key_id>:<key_secret> exactly",
            );
        }
        return Parsed::Ours(Credential::Key { id, secret });
    }
    if scheme.eq_ignore_ascii_case("bearer") {
        if !is_token68(param) {
            return Parsed::Malformed("the Bearer token is empty or not a token");
        }
        return Parsed::Ours(Credential::Bearer(param));
    }
    Parsed::Foreign
}

/// Splits `fal_jwt_token` out of a query string: `(token, the query without it)`.
/// Only the first occurrence counts; every occurrence is removed (none reaches the app).
pub fn take_query_token(query: &str) -> (Option<String>, Option<String>) {
    let mut token = None;
    let mut rest: Vec<&str> = Vec::new();
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let name = piece.split('=').next().unwrap_or("");
        if name == "fal_jwt_token" {
            if token.is_none() {
                token = url::form_urlencoded::parse(piece.as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned());
            }
        } else {
            rest.push(piece);
        }
    }
    (token, (!rest.is_empty()).then(|| rest.join("&")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_forms() {
        assert_eq!(
            parse_authorization(b"Key abc:def"),
            Parsed::Ours(Credential::Key {
                id: "abc",
                secret: "def"
            })
        );
        assert_eq!(
            parse_authorization(b"  key \t abc:d:ef "),
            Parsed::Ours(Credential::Key {
                id: "abc",
                secret: "d:ef"
            })
        );
        for (raw, why) in [
            (&b"Key"[..], "carries no key"),
            (b"Key abc", "<key_id>:<key_secret>"),
            (b"Key :x", "empty"),
            (b"Key x:", "empty"),
            (b"Key a:b c", "spaces"),
            (b"Key \xff:x", "ASCII"),
        ] {
            match parse_authorization(raw) {
                Parsed::Malformed(m) => assert!(m.contains(why), "{raw:?}: {m}"),
                other => panic!("{raw:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn bearer_and_other_schemes() {
        assert_eq!(
            parse_authorization(b"Bearer a.b-c_d"),
            Parsed::Ours(Credential::Bearer("a.b-c_d"))
        );
        assert!(matches!(
            parse_authorization(b"Bearer "),
            Parsed::Malformed(_)
        ));
        assert!(matches!(
            parse_authorization(b"Bearer a b"),
            Parsed::Malformed(_)
        ));
        assert_eq!(parse_authorization(b"Basic dXNlcjpwdw=="), Parsed::Foreign);
        assert_eq!(parse_authorization(b"Keys a:b"), Parsed::Foreign);
        assert!(matches!(
            parse_authorization(&vec![b'a'; MAX_AUTHORIZATION + 1]),
            Parsed::Malformed(_)
        ));
    }

    #[test]
    fn query_tokens_are_taken_out() {
        assert_eq!(
            take_query_token("a=1&fal_jwt_token=t%2Bx&b=2&fal_jwt_token=other"),
            (Some("t+x".into()), Some("a=1&b=2".into()))
        );
        assert_eq!(
            take_query_token("fal_jwt_token=t"),
            (Some("t".into()), None)
        );
        assert_eq!(take_query_token("a=1"), (None, Some("a=1".into())));
        assert_eq!(take_query_token(""), (None, None));
    }
}
