//! API keys as the data path knows them: a `FalKey`'s spec (the same fields as the
//! CRD, read from the cluster, a `fal-operator local -f` file or `fal-sidecar run
//! --keys`), checked into a [`KeyRecord`], and the [`KeyRing`] every request looks up.
//!
//! Only the secret's SHA-256 is ever held; comparing it is constant-time.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ratelimit::Rate;
use super::AuthMode;

/// API group and version of FalKey documents.
pub const API_VERSION: &str = "fal.serverless.dev/v1alpha1";
/// Kind of FalKey documents.
pub const KIND: &str = "FalKey";
/// Longest key id accepted (fal's are UUIDs: 36).
pub const MAX_KEY_ID: usize = 128;
/// Longest `functions` list.
pub const MAX_FUNCTIONS: usize = 256;

/// `spec` of a FalKey (camelCase, as in the CRD).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeySpec {
    /// The part of `FAL_KEY` before `:`.
    pub key_id: String,
    /// 64 lowercase hex: SHA-256 of the part after `:`.
    pub secret_sha256: String,
    /// Only these functions: `name` (of the key's namespace) or `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// RFC 3339 instant after which the key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub disabled: bool,
}

/// `spec.rateLimit` of a FalKey.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    pub requests_per_second: f64,
    /// Requests allowed at once above the steady rate [default: ceil(requestsPerSecond)].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// One checked key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub key_id: String,
    /// The FalKey's namespace: the tenant its requests belong to.
    pub namespace: String,
    /// The FalKey object's name.
    pub name: String,
    secret_sha256: [u8; 32],
    /// `None`: every function the auth modes allow.
    pub functions: Option<Vec<String>>,
    pub rate: Option<Rate>,
    pub expires_at_ms: Option<u64>,
    pub disabled: bool,
}

/// Whether `s` is an RFC 1123 label (a namespace or function name).
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is `name` or `namespace/name`.
pub fn is_function_ref(s: &str) -> bool {
    match s.split_once('/') {
        Some((ns, name)) => is_label(ns) && is_label(name),
        None => is_label(s),
    }
}

/// Whether a key id is well formed: printable ASCII without `:` or spaces.
pub fn is_key_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_KEY_ID && s.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// SHA-256 of a secret, as `secretSha256` spells it.
pub fn secret_sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// An RFC 3339 instant in unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Result<u64, String> {
    let t = humantime::parse_rfc3339_weak(s.trim()).map_err(|e| {
        format!("{s:?} is not an RFC 3339 time ({e}); write it like 2027-06-01T00:00:00Z")
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0))
}

impl KeyRecord {
    /// Checks a spec; the error names the field at fault.
    pub fn from_spec(namespace: &str, name: &str, spec: &KeySpec) -> Result<KeyRecord, String> {
        if !is_key_id(&spec.key_id) {
            return Err(format!(
                "spec.keyId must be 1 to {MAX_KEY_ID} printable characters without ':' or spaces"
            ));
        }
        let hash = spec.secret_sha256.as_bytes();
        let secret_sha256: [u8; 32] = (hash.len() == 64
            && hash.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)))
        .then(|| hex::decode(hash).ok()?.try_into().ok())
        .flatten()
        .ok_or_else(|| {
            "spec.secretSha256 must be 64 lowercase hex characters: the SHA-256 of the key's secret \
             (`fal-operator key create` makes one)"
                .to_string()
        })?;
        if let Some(fs) = &spec.functions {
            if fs.len() > MAX_FUNCTIONS {
                return Err(format!(
                    "spec.functions lists {} functions; at most {MAX_FUNCTIONS}",
                    fs.len()
                ));
            }
            if let Some(bad) = fs.iter().find(|f| !is_function_ref(f)) {
                return Err(format!(
                    "spec.functions: {bad:?} is not a function name (NAME or NAMESPACE/NAME)"
                ));
            }
        }
        let rate = match spec.rate_limit {
            None => None,
            Some(r) => Some(
                Rate::new(r.requests_per_second, r.burst)
                    .map_err(|e| format!("spec.rateLimit: {e}"))?,
            ),
        };
        let expires_at_ms = match &spec.expires_at {
            None => None,
            Some(t) => Some(parse_rfc3339_ms(t).map_err(|e| format!("spec.expiresAt: {e}"))?),
        };
        Ok(KeyRecord {
            key_id: spec.key_id.clone(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            secret_sha256,
            functions: spec.functions.clone(),
            rate,
            expires_at_ms,
            disabled: spec.disabled,
        })
    }

    /// `namespace/name` of the FalKey.
    pub fn object(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `secret` hashes to this key's `secretSha256` (constant time).
    pub fn secret_matches(&self, secret: &str) -> bool {
        let h = Sha256::digest(secret.as_bytes());
        bool::from(h.as_slice().ct_eq(&self.secret_sha256))
    }

    /// Why the key is not usable at `now_ms` (disabled, expired), if it is not.
    pub fn unusable(&self, now_ms: u64) -> Option<String> {
        if self.disabled {
            return Some(format!(
                "key {} is disabled (FalKey {} has spec.disabled: true)",
                self.key_id,
                self.object()
            ));
        }
        match self.expires_at_ms {
            Some(t) if t <= now_ms => Some(format!(
                "key {} expired at {} (FalKey {} spec.expiresAt); create a new key",
                self.key_id,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + std::time::Duration::from_millis(t)
                ),
                self.object()
            )),
            _ => None,
        }
    }

    /// Why this key may not call `namespace/name` under `mode`, if it may not.
    pub fn refuses(&self, namespace: &str, name: &str, mode: AuthMode) -> Option<String> {
        if mode == AuthMode::Public {
            return None;
        }
        if mode == AuthMode::Private && self.namespace != namespace {
            return Some(format!(
                "key {} belongs to namespace {:?}; the function {namespace}/{name} is private to \
                 namespace {namespace:?} (use a key of that namespace, or set the function's \
                 spec.auth to shared)",
                self.key_id, self.namespace
            ));
        }
        match &self.functions {
            Some(list) if !list.iter().any(|f| self.names(f, namespace, name)) => Some(format!(
                "key {} may call only {} (FalKey {} spec.functions); not {namespace}/{name}",
                self.key_id,
                list.join(", "),
                self.object()
            )),
            _ => None,
        }
    }

    /// Whether an entry of `functions` names `namespace/name`: `name` means the key's own
    /// namespace.
    fn names(&self, entry: &str, namespace: &str, name: &str) -> bool {
        match entry.split_once('/') {
            Some((ns, n)) => ns == namespace && n == name,
            None => self.namespace == namespace && entry == name,
        }
    }
}

/// Every known key by id. Lookups take a read lock; the watch (or a file load) writes.
#[derive(Default)]
pub struct KeyRing {
    inner: RwLock<Ring>,
}

#[derive(Default)]
struct Ring {
    /// FalKey `namespace/name` → its record.
    by_object: HashMap<String, Arc<KeyRecord>>,
    /// Key id → the records claiming it (more than one: ambiguous, refused).
    by_id: HashMap<String, Vec<Arc<KeyRecord>>>,
}

/// What a key id looks up to.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Arc<KeyRecord>),
    Unknown,
    /// More than one FalKey declares this id: none of them is trusted.
    Ambiguous,
}

impl Ring {
    fn unlink(&mut self, object: &str) {
        if let Some(old) = self.by_object.remove(object) {
            if let Some(v) = self.by_id.get_mut(&old.key_id) {
                v.retain(|r| r.object() != object);
                if v.is_empty() {
                    self.by_id.remove(&old.key_id);
                }
            }
        }
    }
}

impl KeyRing {
    pub fn new() -> KeyRing {
        KeyRing::default()
    }

    /// Adds a key or replaces the one of the same FalKey object.
    pub fn upsert(&self, rec: KeyRecord) {
        let object = rec.object();
        let rec = Arc::new(rec);
        let mut ring = self.inner.write().unwrap_or_else(|e| e.into_inner());
        ring.unlink(&object);
        let dupes = ring.by_id.entry(rec.key_id.clone()).or_default();
        dupes.push(rec.clone());
        if dupes.len() > 1 {
            tracing::warn!(key_id = %rec.key_id, "more than one FalKey declares this keyId; it is refused until only one does");
        }
        ring.by_object.insert(object, rec);
    }

    /// Forgets the key of a FalKey object (deleted).
    pub fn remove(&self, namespace: &str, name: &str) {
        let object = format!("{namespace}/{name}");
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .unlink(&object);
    }

    /// Replaces every key (a relist, or a file load).
    pub fn replace_all(&self, recs: impl IntoIterator<Item = KeyRecord>) {
        let mut ring = Ring::default();
        for rec in recs {
            let rec = Arc::new(rec);
            ring.by_id
                .entry(rec.key_id.clone())
                .or_default()
                .push(rec.clone());
            ring.by_object.insert(rec.object(), rec);
        }
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = ring;
    }

    pub fn lookup(&self, key_id: &str) -> Lookup {
        let ring = self.inner.read().unwrap_or_else(|e| e.into_inner());
        match ring.by_id.get(key_id).map(Vec::as_slice) {
            None | Some([]) => Lookup::Unknown,
            Some([one]) => Lookup::Found(one.clone()),
            Some(_) => Lookup::Ambiguous,
        }
    }

    /// Number of FalKeys held.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_object
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One FalKey document.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    metadata: Metadata,
    spec: Option<KeySpec>,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
}

/// Whether a YAML document (already parsed) is a FalKey.
pub fn is_key_document(value: &serde_yaml::Value) -> bool {
    value.get("kind").and_then(serde_yaml::Value::as_str) == Some(KIND)
}

/// A FalKey document (namespace `default` when it names none) as a checked record.
pub fn record_from_document(value: serde_yaml::Value, origin: &str) -> Result<KeyRecord, String> {
    let doc: Document =
        serde_yaml::from_value(value).map_err(|e| format!("{origin}: not a FalKey: {e}"))?;
    if doc.api_version.as_deref() != Some(API_VERSION) || doc.kind.as_deref() != Some(KIND) {
        return Err(format!(
            "{origin}: expected apiVersion {API_VERSION} kind {KIND}"
        ));
    }
    let name = doc
        .metadata
        .name
        .ok_or_else(|| format!("{origin}: metadata.name is missing"))?;
    let namespace = doc.metadata.namespace.unwrap_or_else(|| "default".into());
    if !is_label(&namespace) {
        return Err(format!(
            "{origin}: metadata.namespace {namespace:?} is not a namespace name"
        ));
    }
    let spec = doc
        .spec
        .ok_or_else(|| format!("{origin}: spec is missing"))?;
    KeyRecord::from_spec(&namespace, &name, &spec).map_err(|e| format!("{origin}: {e}"))
}

/// Every FalKey of a multi-document YAML file (other kinds are an error: this is a
/// keys file).
pub fn parse_key_file(text: &str, origin: &str) -> Result<Vec<KeyRecord>, String> {
    let mut out = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let context = format!("{origin} (document {})", i + 1);
        let value =
            serde_yaml::Value::deserialize(document).map_err(|e| format!("{context}: {e}"))?;
        if value.is_null() {
            continue;
        }
        out.push(record_from_document(value, &context)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, secret: &str) -> KeySpec {
        KeySpec {
            key_id: id.into(),
            secret_sha256: secret_sha256_hex(secret),
            ..KeySpec::default()
        }
    }

    #[test]
    fn a_record_checks_its_spec() {
        let r = KeyRecord::from_spec("team-a", "ci", &spec("k1", "s3cret")).unwrap();
        assert!(r.secret_matches("s3cret"));
        assert!(!r.secret_matches("s3cret "));
        assert!(!r.secret_matches(""));
        let mut bad = spec("k1", "x");
        bad.secret_sha256 = bad.secret_sha256.to_uppercase();
        assert!(KeyRecord::from_spec("a", "b", &bad)
            .unwrap_err()
            .contains("lowercase hex"));
        bad.secret_sha256 = "ab".into();
        assert!(KeyRecord::from_spec("a", "b", &bad).is_err());
        for id in ["", "a:b", "a b", &"k".repeat(129)] {
            assert!(
                KeyRecord::from_spec("a", "b", &spec(id, "x")).is_err(),
                "{id}"
            );
        }
        let mut f = spec("k", "x");
        f.functions = Some(vec!["ok".into(), "Bad".into()]);
        assert!(KeyRecord::from_spec("a", "b", &f)
            .unwrap_err()
            .contains("\"Bad\""));
        f.expires_at = Some("tomorrow".into());
        f.functions = None;
        assert!(KeyRecord::from_spec("a", "b", &f)
            .unwrap_err()
            .contains("spec.expiresAt"));
    }

    #[test]
    fn modes_namespaces_and_function_lists() {
        let mut s = spec("k", "x");
        let any = KeyRecord::from_spec("team-a", "ci", &s).unwrap();
        assert!(any.refuses("team-a", "f", AuthMode::Private).is_none());
        assert!(any.refuses("team-b", "f", AuthMode::Private).is_some());
        assert!(any.refuses("team-b", "f", AuthMode::Shared).is_none());
        assert!(any.refuses("team-b", "f", AuthMode::Public).is_none());
        s.functions = Some(vec!["sdxl".into(), "team-b/llm".into()]);
        let some = KeyRecord::from_spec("team-a", "ci", &s).unwrap();
        assert!(some.refuses("team-a", "sdxl", AuthMode::Private).is_none());
        assert!(some.refuses("team-a", "llm", AuthMode::Private).is_some());
        assert!(some.refuses("team-b", "llm", AuthMode::Shared).is_none());
        // A private function of another namespace stays closed whatever the list says.
        assert!(some.refuses("team-b", "llm", AuthMode::Private).is_some());
        assert!(some.refuses("team-b", "sdxl", AuthMode::Shared).is_some());
        assert!(some.refuses("team-c", "x", AuthMode::Public).is_none());
    }

    #[test]
    fn disabled_and_expired_keys() {
        let mut s = spec("k", "x");
        s.expires_at = Some("2027-06-01T00:00:00Z".into());
        let r = KeyRecord::from_spec("a", "b", &s).unwrap();
        let t = parse_rfc3339_ms("2027-06-01T00:00:00Z").unwrap();
        assert!(r.unusable(t - 1).is_none());
        assert!(r
            .unusable(t)
            .unwrap()
            .contains("expired at 2027-06-01T00:00:00Z"));
        s.disabled = true;
        let r = KeyRecord::from_spec("a", "b", &s).unwrap();
        assert!(r.unusable(0).unwrap().contains("disabled"));
    }

    #[test]
    fn the_ring_refuses_duplicate_ids_and_follows_changes() {
        let ring = KeyRing::new();
        ring.upsert(KeyRecord::from_spec("a", "one", &spec("k1", "x")).unwrap());
        assert!(matches!(ring.lookup("k1"), Lookup::Found(_)));
        ring.upsert(KeyRecord::from_spec("b", "two", &spec("k1", "y")).unwrap());
        assert!(matches!(ring.lookup("k1"), Lookup::Ambiguous));
        ring.remove("b", "two");
        assert!(matches!(ring.lookup("k1"), Lookup::Found(_)));
        // The same object with a new key id: the old id is gone.
        ring.upsert(KeyRecord::from_spec("a", "one", &spec("k2", "x")).unwrap());
        assert!(matches!(ring.lookup("k1"), Lookup::Unknown));
        assert!(matches!(ring.lookup("k2"), Lookup::Found(_)));
        assert_eq!(ring.len(), 1);
        ring.replace_all(Vec::new());
        assert!(ring.is_empty());
    }

    #[test]
    fn key_files() {
        let text = format!(
            "apiVersion: fal.serverless.dev/v1alpha1\nkind: FalKey\nmetadata: {{name: ci, namespace: team-a}}\n\
             spec:\n  keyId: k1\n  secretSha256: {}\n  rateLimit: {{requestsPerSecond: 2.5}}\n---\n",
            secret_sha256_hex("s")
        );
        let keys = parse_key_file(&text, "keys.yaml").unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].object(), "team-a/ci");
        assert_eq!(keys[0].rate.unwrap().burst(), 3);
        let e = parse_key_file("kind: FalFunction\napiVersion: x\n", "f").unwrap_err();
        assert!(e.contains("expected apiVersion"), "{e}");
    }
}
