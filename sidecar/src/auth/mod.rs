//! Who may call: API keys (`FalKey`), fal's function auth modes (private, shared,
//! public), the tenant a request belongs to, per-key rate limits, and the tokens of
//! `/tokens/`. Shared by the gateway (keys from the cluster or `fal-operator local`'s
//! files) and `fal-sidecar run --keys`; it knows no Kubernetes.
//!
//! - [`header`]: parsing `Authorization` and `fal_jwt_token` (pure);
//! - [`keys`]: FalKey specs, checked records, the key ring;
//! - [`token`]: the JWTs of `/tokens/`;
//! - [`ratelimit`]: GCRA, in memory or in the shared store;
//! - here: [`Authorizer::check`], which turns a request and the function it addresses
//!   into a [`Principal`] (a request extension) or a [`Denial`].

pub mod header;
pub mod keys;
pub mod ratelimit;
pub mod token;

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, StatusCode};
use serde::{Deserialize, Serialize};

use crate::webhook::signing::Signer;
use header::{Credential, Parsed};
use keys::{KeyRecord, KeyRing, Lookup};
use ratelimit::RateLimiter;

/// fal's function auth modes (`FalFunction.spec.auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Keys of the function's namespace.
    #[default]
    Private,
    /// Any valid key.
    Shared,
    /// No key needed.
    Public,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Private => "private",
            AuthMode::Shared => "shared",
            AuthMode::Public => "public",
        }
    }
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "private" => Ok(AuthMode::Private),
            "shared" => Ok(AuthMode::Shared),
            "public" => Ok(AuthMode::Public),
            _ => Err(format!("{s:?}: expected private, shared or public")),
        }
    }
}

/// The function a request addresses.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub mode: AuthMode,
}

/// Who sent a request, once its key (or a token of it) was checked. Set as a request
/// extension; the queue API gives the request to this tenant.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: Arc<KeyRecord>,
}

impl Principal {
    /// The tenant: the key's namespace.
    pub fn tenant(&self) -> &str {
        &self.key.namespace
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// 401: no, malformed, unknown, wrong, expired or disabled credentials.
    Unauthenticated(Cow<'static, str>),
    /// 403: a valid key that may not call this function.
    Forbidden(String),
    /// 429: the key is over its rate; retry after this long.
    RateLimited {
        key_id: String,
        retry_after: Duration,
    },
}

impl Denial {
    pub fn status(&self) -> StatusCode {
        match self {
            Denial::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Denial::Forbidden(_) => StatusCode::FORBIDDEN,
            Denial::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The `detail` of the JSON answer (never a secret).
    pub fn detail(&self) -> String {
        match self {
            Denial::Unauthenticated(d) => d.to_string(),
            Denial::Forbidden(d) => d.clone(),
            Denial::RateLimited {
                key_id,
                retry_after,
            } => format!(
                "key {key_id} is over its rate limit (FalKey spec.rateLimit); retry in {:.1} s",
                retry_after.as_secs_f64()
            ),
        }
    }

    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::Unauthenticated(_) => "unauthenticated",
            Denial::Forbidden(_) => "forbidden",
            Denial::RateLimited { .. } => "rate_limited",
        }
    }
}

const NEED_KEY: &str =
    "this function needs an API key: send Authorization: Key <key_id>:<key_secret> \
     (the fal clients read it from FAL_KEY); create one with `fal-operator key create`";

/// What a request presented.
enum Presented<'a> {
    Nothing,
    Header(Parsed<'a>),
    QueryToken(String),
    Conflict,
}

/// Checks requests against the key ring (see the module docs).
pub struct Authorizer {
    ring: Arc<KeyRing>,
    signer: Arc<Signer>,
    limiter: Arc<dyn RateLimiter>,
    /// Off: every request passes as anonymous (`local` with no FalKey, `run` without
    /// `--keys`); credentials are still kept away from the app.
    required: AtomicBool,
    refused: prometheus::IntCounterVec,
}

impl Authorizer {
    pub fn new(
        ring: Arc<KeyRing>,
        signer: Arc<Signer>,
        limiter: Arc<dyn RateLimiter>,
        required: bool,
    ) -> Authorizer {
        let refused = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "fal_auth_refused_total",
                "Requests refused by the key check, by reason (unauthenticated, forbidden, rate_limited)",
            ),
            &["reason"],
        )
        .expect("metric");
        Authorizer {
            ring,
            signer,
            limiter,
            required: AtomicBool::new(required),
            refused,
        }
    }

    /// Registers `fal_auth_refused_total`.
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.refused.clone()))
    }

    pub fn ring(&self) -> &Arc<KeyRing> {
        &self.ring
    }

    pub fn signer(&self) -> &Arc<Signer> {
        &self.signer
    }

    pub fn required(&self) -> bool {
        self.required.load(Ordering::Relaxed)
    }

    pub fn set_required(&self, on: bool) {
        self.required.store(on, Ordering::Relaxed);
    }

    /// Admits `req` to `target` or refuses it. Admitted: a checked key becomes the
    /// request's [`Principal`] extension, and the credential (`Authorization: Key`, a
    /// token of ours, `fal_jwt_token`) is removed so it never reaches the app or the
    /// store. Another scheme (`Basic …`) is left for the app on public functions.
    pub async fn check<B>(&self, target: Target<'_>, req: &mut Request<B>) -> Result<(), Denial> {
        let now = crate::job::now_ms();
        let decided = {
            let presented = presented(req);
            self.decide(target, &presented, now)
        };
        match decided {
            Ok((principal, strip)) => {
                if strip {
                    req.headers_mut().remove(http::header::AUTHORIZATION);
                }
                strip_query_token(req);
                if let Some(p) = principal {
                    if let Some(rate) = p.key.rate {
                        if let Err(wait) = self.limiter.acquire(&p.key.key_id, rate).await {
                            let d = Denial::RateLimited {
                                key_id: p.key.key_id.clone(),
                                retry_after: wait,
                            };
                            self.refused.with_label_values(&[d.reason()]).inc();
                            return Err(d);
                        }
                    }
                    req.extensions_mut().insert(p);
                }
                Ok(())
            }
            Err(d) => {
                self.refused.with_label_values(&[d.reason()]).inc();
                Err(d)
            }
        }
    }

    /// The decision without the rate limit: `(principal, strip the Authorization
    /// header)`.
    fn decide(
        &self,
        target: Target<'_>,
        presented: &Presented<'_>,
        now_ms: u64,
    ) -> Result<(Option<Principal>, bool), Denial> {
        let ours = matches!(
            presented,
            Presented::Header(Parsed::Ours(Credential::Key { .. }) | Parsed::Malformed(_))
        );
        if !self.required() {
            return Ok((None, ours));
        }
        let public = target.mode == AuthMode::Public;
        let checked = match presented {
            Presented::Nothing | Presented::Header(Parsed::Foreign) => {
                Err(Denial::Unauthenticated(NEED_KEY.into()))
            }
            Presented::Conflict => Err(Denial::Unauthenticated(
                "more than one Authorization header; send exactly one".into(),
            )),
            Presented::Header(Parsed::Malformed(why)) => {
                Err(Denial::Unauthenticated(Cow::Borrowed(*why)))
            }
            Presented::Header(Parsed::Ours(Credential::Key { id, secret })) => {
                self.key(id, secret, now_ms)
            }
            Presented::Header(Parsed::Ours(Credential::Bearer(t))) => self.token(t, target, now_ms),
            Presented::QueryToken(t) => self.token(t, target, now_ms),
        };
        match checked {
            Ok(key) => {
                if let Some(why) = key.refuses(target.namespace, target.name, target.mode) {
                    return Err(Denial::Forbidden(why));
                }
                let bearer = matches!(
                    presented,
                    Presented::Header(Parsed::Ours(Credential::Bearer(_)))
                );
                Ok((Some(Principal { key }), ours || bearer))
            }
            // Public: no key needed, so a bad one (or another scheme, or a Bearer token
            // of the app's own) makes the call anonymous instead of refusing it.
            Err(_) if public => Ok((None, ours)),
            Err(d) => Err(d),
        }
    }

    /// A key by id and secret, usable now.
    pub fn key(&self, id: &str, secret: &str, now_ms: u64) -> Result<Arc<KeyRecord>, Denial> {
        let rec = match self.ring.lookup(id) {
            Lookup::Found(r) => r,
            Lookup::Unknown => {
                return Err(Denial::Unauthenticated(
                    format!("unknown key id {id:?}: check FAL_KEY (kubectl get falkeys -A shows the key ids)").into(),
                ))
            }
            Lookup::Ambiguous => {
                return Err(Denial::Unauthenticated(
                    format!("key id {id:?} is declared by more than one FalKey, so none of them is trusted; delete the duplicate").into(),
                ))
            }
        };
        if !rec.secret_matches(secret) {
            return Err(Denial::Unauthenticated(
                format!("wrong secret for key {id:?}: check the part of FAL_KEY after ':'").into(),
            ));
        }
        if let Some(why) = rec.unusable(now_ms) {
            return Err(Denial::Unauthenticated(why.into()));
        }
        Ok(rec)
    }

    /// The key behind a token of ours, usable now, when the token opens `target`.
    fn token(&self, t: &str, target: Target<'_>, now_ms: u64) -> Result<Arc<KeyRecord>, Denial> {
        let claims = token::verify(&self.signer, t, now_ms / 1000)
            .map_err(|why| Denial::Unauthenticated(Cow::Borrowed(why)))?;
        let rec = match self.ring.lookup(&claims.sub) {
            Lookup::Found(r) if r.namespace == claims.ns => r,
            _ => {
                return Err(Denial::Unauthenticated(
                    format!(
                        "the key {:?} this token was issued for no longer exists",
                        claims.sub
                    )
                    .into(),
                ))
            }
        };
        if let Some(why) = rec.unusable(now_ms) {
            return Err(Denial::Unauthenticated(why.into()));
        }
        if !claims.allows(target.namespace, target.name) {
            return Err(Denial::Forbidden(format!(
                "this token opens only {}; not {}/{} (ask /tokens/ for one with allowed_apps naming it)",
                claims.apps.join(", "),
                target.namespace,
                target.name
            )));
        }
        Ok(rec)
    }

    /// `POST /tokens/`: a token for `body` (`{"allowed_apps": [...], "token_expiration":
    /// seconds}`), asked for with a key (`Authorization: Key …`). With auth off, the
    /// token is issued to anyone (clients fetch one before every realtime connection)
    /// and checked by no one.
    pub async fn mint(
        &self,
        authorization: Option<&HeaderValue>,
        body: &[u8],
    ) -> Result<String, MintError> {
        let now = crate::job::now_ms();
        let key = if self.required() {
            let key = match authorization.map(|v| header::parse_authorization(v.as_bytes())) {
                Some(Parsed::Ours(Credential::Key { id, secret })) => self.key(id, secret, now),
                Some(Parsed::Malformed(why)) => Err(Denial::Unauthenticated(Cow::Borrowed(why))),
                Some(Parsed::Ours(Credential::Bearer(_))) => Err(Denial::Unauthenticated(
                    "tokens are issued for a key, not for another token: send Authorization: Key <key_id>:<key_secret>".into(),
                )),
                _ => Err(Denial::Unauthenticated(NEED_KEY.into())),
            };
            let key = key.inspect_err(|d| self.refused.with_label_values(&[d.reason()]).inc())?;
            if let Some(rate) = key.rate {
                if let Err(wait) = self.limiter.acquire(&key.key_id, rate).await {
                    let d = Denial::RateLimited {
                        key_id: key.key_id.clone(),
                        retry_after: wait,
                    };
                    self.refused.with_label_values(&[d.reason()]).inc();
                    return Err(d.into());
                }
            }
            Some(key)
        } else {
            None
        };
        let ask = TokenRequest::parse(body).map_err(MintError::BadRequest)?;
        let now_s = now / 1000;
        let mut exp = now_s + ask.lifetime_secs;
        if let Some(t) = key.as_ref().and_then(|k| k.expires_at_ms) {
            exp = exp.min(t / 1000);
        }
        let claims = token::Claims {
            iss: token::ISSUER.into(),
            sub: key
                .as_ref()
                .map_or_else(|| "anonymous".into(), |k| k.key_id.clone()),
            ns: key
                .as_ref()
                .map_or_else(String::new, |k| k.namespace.clone()),
            apps: ask.apps,
            iat: now_s,
            exp,
        };
        Ok(token::issue(&self.signer, &claims))
    }
}

/// Why `/tokens/` did not issue a token.
#[derive(Debug)]
pub enum MintError {
    Denied(Denial),
    /// 400 with this detail.
    BadRequest(String),
}

impl From<Denial> for MintError {
    fn from(d: Denial) -> Self {
        MintError::Denied(d)
    }
}

/// The body of `POST /tokens/`.
#[derive(Debug, PartialEq)]
pub struct TokenRequest {
    pub apps: Vec<String>,
    pub lifetime_secs: u64,
}

impl TokenRequest {
    pub fn parse(body: &[u8]) -> Result<TokenRequest, String> {
        #[derive(Deserialize)]
        struct Raw {
            allowed_apps: Option<Vec<String>>,
            token_expiration: Option<serde_json::Value>,
        }
        const SHAPE: &str =
            r#"send {"allowed_apps": ["<function name>"], "token_expiration": <seconds>}"#;
        let raw: Raw = serde_json::from_slice(body)
            .map_err(|e| format!("the body is not a token request ({e}); {SHAPE}"))?;
        let apps = raw.allowed_apps.unwrap_or_default();
        if apps.is_empty() || apps.len() > token::MAX_APPS {
            return Err(format!(
                "allowed_apps must name 1 to {} functions; {SHAPE}",
                token::MAX_APPS
            ));
        }
        // Clients may send an app id (`owner/alias[/path]` is cut to the alias by fal's
        // own clients; accept `namespace/name` here).
        if let Some(bad) = apps.iter().find(|a| !keys::is_function_ref(a)) {
            return Err(format!(
                "allowed_apps: {bad:?} is not a function name (NAME or NAMESPACE/NAME)"
            ));
        }
        let lifetime_secs = match raw.token_expiration {
            None | Some(serde_json::Value::Null) => token::DEFAULT_LIFETIME_SECS,
            Some(v) => v
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 1.0 && *s <= token::MAX_LIFETIME_SECS as f64)
                .map(|s| s as u64)
                .ok_or_else(|| {
                    format!(
                        "token_expiration must be a number of seconds from 1 to {}",
                        token::MAX_LIFETIME_SECS
                    )
                })?,
        };
        Ok(TokenRequest {
            apps,
            lifetime_secs,
        })
    }
}

/// The credential of a request: one `Authorization` header, else a `fal_jwt_token`.
fn presented<B>(req: &Request<B>) -> Presented<'_> {
    let mut all = req.headers().get_all(http::header::AUTHORIZATION).iter();
    match (all.next(), all.next()) {
        (Some(_), Some(_)) => return Presented::Conflict,
        (Some(v), None) => return Presented::Header(header::parse_authorization(v.as_bytes())),
        _ => {}
    }
    match req.uri().query() {
        Some(q) if q.contains("fal_jwt_token") => match header::take_query_token(q).0 {
            Some(t) => Presented::QueryToken(t),
            None => Presented::Nothing,
        },
        _ => Presented::Nothing,
    }
}

/// Removes `fal_jwt_token` from the request's query (it must not reach the app).
fn strip_query_token<B>(req: &mut Request<B>) {
    let Some(q) = req.uri().query().filter(|q| q.contains("fal_jwt_token")) else {
        return;
    };
    let rest = header::take_query_token(q).1;
    let pq = match rest {
        Some(r) => format!("{}?{r}", req.uri().path()),
        None => req.uri().path().to_string(),
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

#[cfg(test)]
mod tests;
