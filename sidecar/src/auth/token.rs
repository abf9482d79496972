//! Tokens of `POST /tokens/`, as fal's clients fetch them for realtime: a JWT (RFC 7519)
//! signed EdDSA (RFC 8037) with the webhook signing key, `kid` as in the JWKS, so
//! every gateway replica (one key, mounted from one Secret) accepts every other's.
//! Compact serialization is three base64url parts; written here rather than with a JWT
//! crate because one algorithm and four claims do not need one (and the signing key
//! is already ed25519-dalek's).

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::webhook::signing::Signer;

/// `iss` of every token.
pub const ISSUER: &str = "fal-serverless";
/// Longest token accepted.
pub const MAX_TOKEN: usize = 8 * 1024;
/// Longest lifetime a token may ask for (`token_expiration`).
pub const MAX_LIFETIME_SECS: u64 = 24 * 3600;
/// fal's clients ask for 120 s; used when a request names none.
pub const DEFAULT_LIFETIME_SECS: u64 = 120;
/// Most apps one token may name.
pub const MAX_APPS: usize = 64;

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The key id that asked for the token.
    pub sub: String,
    /// The key's namespace (the tenant).
    pub ns: String,
    /// Functions the token opens: `name` or `namespace/name`.
    pub apps: Vec<String>,
    pub iat: u64,
    pub exp: u64,
}

impl Claims {
    /// Whether the token names `namespace/name` (a bare name matches in any namespace
    /// the key may call).
    pub fn allows(&self, namespace: &str, name: &str) -> bool {
        self.apps.iter().any(|a| match a.split_once('/') {
            Some((ns, n)) => ns == namespace && n == name,
            None => a == name,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: Option<String>,
    kid: Option<String>,
}

/// Signs `claims` into a compact JWT.
pub fn issue(signer: &Signer, claims: &Claims) -> String {
    let header = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": signer.kid()});
    let mut t = B64.encode(header.to_string());
    t.push('.');
    t.push_str(&B64.encode(serde_json::to_vec(claims).expect("serialize claims")));
    let sig = signer.sign_bytes(t.as_bytes());
    t.push('.');
    t.push_str(&B64.encode(sig));
    t
}

/// Checks a token's form, algorithm, key, signature, issuer and expiry at `now_s`.
/// The error says which (never the token itself).
pub fn verify(signer: &Signer, token: &str, now_s: u64) -> Result<Claims, &'static str> {
    if token.len() > MAX_TOKEN {
        return Err("the token is too long");
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the token is not a JWT (three dot-separated parts)");
    };
    let header: Header = B64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("the token's header is not valid")?;
    if header.alg != "EdDSA" {
        return Err("the token is not signed with EdDSA");
    }
    if header.kid.as_deref().is_some_and(|k| k != signer.kid()) {
        return Err("the token was signed by another key (kid); fetch a new one from /tokens/");
    }
    let sig = B64
        .decode(s)
        .map_err(|_| "the token's signature is not base64url")?;
    let signed = &token[..h.len() + 1 + c.len()];
    if !signer.verify_bytes(signed.as_bytes(), &sig) {
        return Err("the token's signature does not verify");
    }
    let claims: Claims = B64
        .decode(c)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("the token's claims are not valid")?;
    if claims.iss != ISSUER {
        return Err("the token was not issued by this gateway");
    }
    if claims.exp <= now_s {
        return Err("the token has expired; fetch a new one from /tokens/");
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "k1".into(),
            ns: "team-a".into(),
            apps: vec!["echo".into(), "team-b/llm".into()],
            iat: 100,
            exp,
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let signer = Signer::from_seed([7; 32]);
        let t = issue(&signer, &claims(200));
        let c = verify(&signer, &t, 150).unwrap();
        assert!(c.allows("team-a", "echo") && c.allows("team-x", "echo"));
        assert!(c.allows("team-b", "llm") && !c.allows("team-a", "llm"));
        assert_eq!(
            verify(&signer, &t, 200).unwrap_err(),
            "the token has expired; fetch a new one from /tokens/"
        );

        let other = Signer::from_seed([8; 32]);
        assert!(verify(&other, &t, 150).unwrap_err().contains("another key"));

        // Claims changed after signing (a longer expiry): the signature no longer holds.
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(serde_json::to_vec(&claims(9_999)).unwrap()),
            parts[2]
        );
        assert!(verify(&signer, &forged, 150)
            .unwrap_err()
            .contains("does not verify"));

        // alg=none and garbage.
        let none = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), parts[1]);
        assert!(verify(&signer, &none, 150).unwrap_err().contains("EdDSA"));
        assert!(verify(&signer, "a.b", 150).is_err());
        assert!(verify(&signer, "a.b.c.d", 150).is_err());
        assert!(verify(&signer, &"x".repeat(MAX_TOKEN + 1), 150).is_err());
    }
}
