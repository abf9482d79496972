//! `fal-operator key create|list|revoke`: API keys as FalKey objects.
//!
//! `create` draws a key id (a UUID v4) and a 256-bit secret from the operating
//! system, and builds a FalKey holding only the secret's SHA-256. The secret leaves
//! this process once, in the `FAL_KEY=id:secret` line the command prints on stderr; it
//! is in no object, log or error. The pure parts (the object from the flags, `--expires`)
//! are plain functions; the API calls are thin wrappers whose errors say what to do.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fal_sidecar::auth::keys::{is_function_ref, is_label, secret_sha256_hex, MAX_FUNCTIONS};
use fal_sidecar::auth::ratelimit::Rate;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::falkey::{FalKey, FalKeyRateLimit, FalKeySpec, CRD_NAME};
use crate::{error_chain, Error, Result};

/// Field manager of the writes `fal-operator key` makes.
pub const FIELD_MANAGER: &str = "fal-operator-key";
/// Bytes of randomness in a secret (256 bits, 64 hex characters).
pub const SECRET_BYTES: usize = 32;
/// Latest `expiresAt` RFC 3339 can spell (9999-12-31T23:59:59Z).
const MAX_EXPIRY_SECS: u64 = 253_402_300_799;

/// The flags of `key create`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreateOptions {
    /// Name of the FalKey object.
    pub name: String,
    /// Its namespace (the tenant of the key's requests). `None`: the one `kubectl
    /// apply` or the kubeconfig context picks.
    pub namespace: Option<String>,
    /// `--function`: `name` or `namespace/name` (empty: every function allowed).
    pub functions: Vec<String>,
    /// `--rps`.
    pub requests_per_second: Option<f64>,
    /// `--burst`.
    pub burst: Option<i32>,
    /// `--expires`: a duration from now (`30d`, `12h`) or an RFC 3339 time.
    pub expires: Option<String>,
}

/// A key just made: the FalKey to store, and the secret to hand out once.
pub struct NewKey {
    /// The FalKey (no secret in it, only its SHA-256).
    pub object: FalKey,
    secret: String,
}

impl NewKey {
    /// `keyId:secret`, the `FAL_KEY` of the fal clients. Print it once; never log it.
    pub fn fal_key(&self) -> String {
        format!("{}:{}", self.object.spec.key_id, self.secret)
    }
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("object", &self.object)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Fills a buffer from the operating system's random source.
pub fn os_random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf)
        .map_err(|e| Error::Key(format!("the operating system's random source failed: {e}")))
}

/// Whether `s` can name a Kubernetes object (an RFC 1123 subdomain).
fn is_object_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_label)
}

/// `--expires` as the RFC 3339 instant `expiresAt` holds: a duration counts from
/// `now` (`30d`, `12h`, `1y 6M`), anything else must be an RFC 3339 time. The instant
/// must be in the future.
pub fn parse_expires(s: &str, now: SystemTime) -> Result<String> {
    let s = s.trim();
    let at = match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => {
            return Err(Error::invalid(
                "--expires",
                "a zero duration expires at once; give a duration like 30d or an RFC 3339 time",
            ))
        }
        Ok(d) => now.checked_add(d),
        Err(_) => Some(humantime::parse_rfc3339_weak(s).map_err(|_| {
            Error::invalid(
                "--expires",
                format!(
                    "{s:?} is neither a duration (30d, 12h, 90m) nor an RFC 3339 time \
                     (2027-06-01T00:00:00Z)"
                ),
            )
        })?),
    };
    let at = at
        .filter(|t| {
            t.duration_since(UNIX_EPOCH)
                .is_ok_and(|d| d.as_secs() <= MAX_EXPIRY_SECS)
        })
        .ok_or_else(|| Error::invalid("--expires", format!("{s:?} is after the year 9999")))?;
    if at <= now {
        return Err(Error::invalid(
            "--expires",
            format!("{s:?} is in the past; a key must expire in the future"),
        ));
    }
    Ok(humantime::format_rfc3339_seconds(at).to_string())
}

/// Builds a new key from the flags. `fill` is the random source ([`os_random`]; tests
/// pass a fixed one). Every check the gateway makes on a FalKey is made here first.
pub fn new_key(
    opts: &CreateOptions,
    now: SystemTime,
    fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
) -> Result<NewKey> {
    if !is_object_name(&opts.name) {
        return Err(Error::invalid(
            "NAME",
            format!(
                "{:?} is not a Kubernetes object name (lowercase letters, digits, '-' and '.', \
                 at most 253)",
                opts.name
            ),
        ));
    }
    if let Some(ns) = opts.namespace.as_deref().filter(|ns| !is_label(ns)) {
        return Err(Error::invalid(
            "--namespace",
            format!("{ns:?} is not a namespace name (lowercase letters, digits and '-')"),
        ));
    }
    if opts.functions.len() > MAX_FUNCTIONS {
        return Err(Error::invalid(
            "--function",
            format!("at most {MAX_FUNCTIONS} functions per key"),
        ));
    }
    if let Some(bad) = opts.functions.iter().find(|f| !is_function_ref(f)) {
        return Err(Error::invalid(
            "--function",
            format!("{bad:?} is not NAME (a function of the key's namespace) or NAMESPACE/NAME"),
        ));
    }
    let rate_limit = match (opts.requests_per_second, opts.burst) {
        (None, None) => None,
        (None, Some(_)) => return Err(Error::invalid("--burst", "needs --rps")),
        (Some(rps), burst) => {
            let burst_u32 = burst
                .map(|b| u32::try_from(b).map_err(|_| "burst must be at least 1".to_string()))
                .transpose();
            burst_u32
                .and_then(|b| Rate::new(rps, b))
                .map_err(|e| Error::invalid("--rps/--burst", e))?;
            Some(FalKeyRateLimit {
                requests_per_second: rps,
                burst,
            })
        }
    };
    let expires_at = match &opts.expires {
        Some(s) => Some(parse_expires(s, now)?),
        None => None,
    };

    let mut id = [0u8; 16];
    fill(&mut id)?;
    let key_id = uuid::Builder::from_random_bytes(id)
        .into_uuid()
        .hyphenated()
        .to_string();
    let mut raw = [0u8; SECRET_BYTES];
    fill(&mut raw)?;
    let secret = hex::encode(raw);

    let mut object = FalKey::new(
        &opts.name,
        FalKeySpec {
            key_id,
            secret_sha256: secret_sha256_hex(&secret),
            functions: (!opts.functions.is_empty()).then(|| opts.functions.clone()),
            rate_limit,
            expires_at,
            disabled: false,
        },
    );
    object.metadata.namespace = opts.namespace.clone();
    // The gateway's own check, so nothing is created that it would ignore.
    object.record().map_err(|e| {
        Error::Key(format!(
            "the new key does not pass the gateway's checks: {e}"
        ))
    })?;
    Ok(NewKey { object, secret })
}

/// The FalKey as YAML for `kubectl apply -f` (holds no secret).
pub fn to_yaml(key: &FalKey) -> Result<String> {
    serde_yaml::to_string(key).map_err(|source| Error::Yaml {
        context: "serializing the FalKey".into(),
        source,
    })
}

/// The rows of `key list`: namespace, name, key id, functions, rate, expires, disabled.
pub fn table(keys: &[FalKey], now: SystemTime) -> String {
    let mut rows = vec![[
        "NAMESPACE",
        "NAME",
        "KEY ID",
        "FUNCTIONS",
        "RATE",
        "EXPIRES",
        "DISABLED",
    ]
    .map(String::from)];
    let mut sorted: Vec<&FalKey> = keys.iter().collect();
    sorted.sort_by_key(|k| (k.namespace(), k.name_any()));
    for k in sorted {
        let s = &k.spec;
        let rate = match s.rate_limit {
            None => "unlimited".to_string(),
            Some(r) => match r.burst {
                Some(b) => format!("{}/s burst {b}", r.requests_per_second),
                None => format!("{}/s", r.requests_per_second),
            },
        };
        let expires = match &s.expires_at {
            None => "never".to_string(),
            Some(t) => match fal_sidecar::auth::keys::parse_rfc3339_ms(t) {
                Ok(ms) if UNIX_EPOCH + Duration::from_millis(ms) <= now => format!("{t} (expired)"),
                _ => t.clone(),
            },
        };
        rows.push([
            k.namespace().unwrap_or_default(),
            k.name_any(),
            s.key_id.clone(),
            s.functions
                .as_ref()
                .map_or_else(|| "(all)".to_string(), |f| f.join(",")),
            rate,
            expires,
            s.disabled.to_string(),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// What went wrong with an API call, and what to do about it. `namespace` is `*` for
/// a list of every namespace.
fn api_error(err: kube::Error, what: &str, namespace: &str, name: &str) -> Error {
    let subject = match (what, namespace) {
        ("listing", "*") => "FalKeys of every namespace".to_string(),
        ("listing", ns) => format!("FalKeys in namespace {ns}"),
        (_, ns) => format!("FalKey {ns}/{name}"),
    };
    let kube::Error::Api(status) = &err else {
        return Error::Key(format!("{what} {subject}: {}", error_chain(&err)));
    };
    let message = match status.code {
        404 if what == "listing" || what == "creating" => format!(
            "the FalKey CRD ({CRD_NAME}) is not installed in this cluster: \
             kubectl apply -f crds/falkeys.yaml (or fal-operator crd | kubectl apply -f -)"
        ),
        404 => format!(
            "FalKey {namespace}/{name} not found (fal-operator key list -n {namespace} shows \
             the keys there)"
        ),
        409 if what == "creating" => format!(
            "FalKey {namespace}/{name} already exists: pick another name, or revoke that key \
             first (fal-operator key revoke {name} -n {namespace})"
        ),
        403 => format!(
            "{what} {subject} is not allowed for your kubeconfig's user (it needs that verb \
             on falkeys.fal.serverless.dev): {}",
            status.message
        ),
        _ => format!("{what} {subject}: the apiserver said: {}", status.message),
    };
    Error::Key(message)
}

/// Creates the FalKey in `namespace`.
pub async fn create(client: &Client, namespace: &str, key: &FalKey) -> Result<FalKey> {
    let api: Api<FalKey> = Api::namespaced(client.clone(), namespace);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PostParams::default()
    };
    let mut key = key.clone();
    key.metadata.namespace = Some(namespace.to_string());
    api.create(&params, &key)
        .await
        .map_err(|e| api_error(e, "creating", namespace, &key.name_any()))
}

/// Every FalKey of `namespace` (`None`: of every namespace), page by page.
pub async fn list(client: &Client, namespace: Option<&str>) -> Result<Vec<FalKey>> {
    let api: Api<FalKey> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut params = ListParams::default().limit(500);
    let mut out = Vec::new();
    loop {
        let page = api
            .list(&params)
            .await
            .map_err(|e| api_error(e, "listing", namespace.unwrap_or("*"), ""))?;
        out.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

/// Deletes the FalKey: the gateway refuses its key as soon as it sees the deletion.
pub async fn delete(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let api: Api<FalKey> = Api::namespaced(client.clone(), namespace);
    api.delete(name, &DeleteParams::default())
        .await
        .map(|_| ())
        .map_err(|e| api_error(e, "deleting", namespace, name))
}

/// Sets `spec.disabled: true`: the key is refused but kept (undo with
/// `kubectl patch falkey NAME --type merge -p '{"spec":{"disabled":false}}'`).
pub async fn disable(client: &Client, namespace: &str, name: &str) -> Result<FalKey> {
    let api: Api<FalKey> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    let patch = Patch::Merge(json!({"spec": {"disabled": true}}));
    api.patch(name, &params, &patch)
        .await
        .map_err(|e| api_error(e, "disabling", namespace, name))
}

#[cfg(test)]
mod tests;
