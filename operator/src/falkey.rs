//! The `FalKey` custom resource (`fal.serverless.dev/v1alpha1`): one API key.
//!
//! A client sends `Authorization: Key <keyId>:<secret>`; the gateway looks the key id up
//! among the FalKeys it watches and compares the SHA-256 of the secret with
//! `secretSha256`. Only that hash is stored, so neither the gateway nor anyone who can
//! read FalKeys learns a secret, and the gateway needs no access to Secrets.
//! `fal-operator key create` makes a key and prints the secret once.
//!
//! Doc comments on the spec fields are what `kubectl explain falkey.spec` prints. The
//! CEL rules mirror the checks of [`fal_sidecar::auth::keys::KeyRecord::from_spec`], so
//! the apiserver refuses what the gateway would ignore.

use fal_sidecar::auth::keys::{KeyRecord, KeySpec};
use kube::{CustomResource, KubeSchema, ResourceExt};
use serde::{Deserialize, Serialize};

/// Name of the CRD object (`<plural>.<group>`).
pub const CRD_NAME: &str = "falkeys.fal.serverless.dev";

/// RE2 pattern of `keyId` (used by the CEL rule): printable ASCII except `:`
/// (`!`..`9` and `;`..`~`), at least one character; the length bound is the schema's.
pub const KEY_ID_PATTERN: &str = "^[!-9;-~]+$";
/// RE2 pattern of `secretSha256`.
pub const SECRET_SHA256_PATTERN: &str = "^[0-9a-f]{64}$";
/// RE2 pattern of a `functions` entry: `name` or `namespace/name`, each an RFC 1123 label.
pub const FUNCTION_REF_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$";

/// An API key: who may call which functions, how often, and until when.
// Each `printcolumn(…)` repeats `type_ = "string"`; clippy reads them as one list.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fal.serverless.dev",
    version = "v1alpha1",
    kind = "FalKey",
    plural = "falkeys",
    namespaced,
    shortname = "fk",
    category = "fal",
    derive = "PartialEq",
    doc = "An API key of fal-serverless: clients send `Authorization: Key <keyId>:<secret>` (the FAL_KEY of the fal clients). Only the SHA-256 of the secret is stored here. Requests made with the key belong to the FalKey's namespace. Create one with `fal-operator key create`.",
    printcolumn(name = "KeyId", type_ = "string", json_path = ".spec.keyId"),
    printcolumn(name = "Functions", type_ = "string", json_path = ".spec.functions"),
    printcolumn(
        name = "RPS",
        type_ = "number",
        json_path = ".spec.rateLimit.requestsPerSecond"
    ),
    printcolumn(name = "Expires", type_ = "string", json_path = ".spec.expiresAt"),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct FalKeySpec {
    /// The public half of the key: the part of FAL_KEY before the `:`. Must be unique in
    /// the cluster (two FalKeys with the same keyId are both refused). 1 to 128
    /// printable characters without `:` or spaces; `fal-operator key create` uses a
    /// UUID. Cannot be changed: create a new key instead.
    #[schemars(length(max = 128))]
    #[x_kube(
        validation = Rule::new("self.matches('^[!-9;-~]+$')").message("keyId must be 1 to 128 printable ASCII characters without ':' or spaces (fal-operator key create uses a UUID)"),
        validation = Rule::new("self == oldSelf").message("keyId is immutable: create a new FalKey (fal-operator key create) and delete this one")
    )]
    pub key_id: String,

    /// SHA-256 of the secret half of the key (the part of FAL_KEY after the `:`), as 64
    /// lowercase hex characters. The secret itself is never stored in the cluster.
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("secretSha256 must be 64 lowercase hex characters: the SHA-256 of the key's secret (fal-operator key create makes one)"))]
    pub secret_sha256: String,

    /// Only these functions may be called with the key (at most 256). An entry `name`
    /// is a function of the key's own namespace; `namespace/name` is a function of
    /// another namespace, whose `spec.auth` must be `shared` (a private function admits
    /// keys of its own namespace only). Unset: every function the functions' auth modes
    /// allow (private ones of this namespace, shared ones everywhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(max = 127)))]
    #[x_kube(validation = Rule::new("self.all(f, f.matches('^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(/[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$'))").message("functions entries must be NAME (a function of the key's namespace) or NAMESPACE/NAME, each part a DNS label: lowercase letters, digits and '-', at most 63"))]
    pub functions: Option<Vec<String>>,

    /// Requests per second allowed with this key, counted across every gateway replica
    /// (a request over the limit gets 429 with Retry-After). Unset: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<FalKeyRateLimit>,

    /// When the key stops working (RFC 3339, for example 2027-06-01T00:00:00Z). Unset:
    /// never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub expires_at: Option<String>,

    /// A disabled key is refused (401) but kept, so it can be enabled again.
    /// `fal-operator key revoke --disable` sets it.
    #[serde(default)]
    pub disabled: bool,
}

/// `spec.rateLimit` of a FalKey.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FalKeyRateLimit {
    /// Steady rate: requests per second (fractions allowed: 0.5 is one every two
    /// seconds). Above 0, at most 1000000.
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1000000.0").message("rateLimit.requestsPerSecond must be above 0 and at most 1000000"))]
    pub requests_per_second: f64,

    /// Requests allowed at once above the steady rate, at least 1. Default: the rate
    /// rounded up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1").message("rateLimit.burst must be at least 1"))]
    pub burst: Option<i32>,
}

impl FalKey {
    /// The checked key the gateway keeps: the same checks as a key read from a file.
    /// A FalKey without a namespace counts as one of `default`. The error names the
    /// field at fault and never holds a secret (a FalKey has none).
    pub fn record(&self) -> Result<KeyRecord, String> {
        let namespace = self.namespace().unwrap_or_else(|| "default".to_string());
        let spec = self.key_spec()?;
        KeyRecord::from_spec(&namespace, &self.name_any(), &spec)
    }

    /// The spec as the sidecar library reads it (the same camelCase fields).
    pub fn key_spec(&self) -> Result<KeySpec, String> {
        if let Some(burst) = self.spec.rate_limit.and_then(|r| r.burst) {
            if burst < 1 {
                return Err("spec.rateLimit: burst must be at least 1".to_string());
            }
        }
        serde_json::to_value(&self.spec)
            .and_then(serde_json::from_value)
            .map_err(|e| format!("spec: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fal_sidecar::auth::keys::{is_function_ref, is_key_id, secret_sha256_hex, RateLimitSpec};
    use fal_sidecar::auth::AuthMode;
    use kube::CustomResourceExt;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn full() -> FalKey {
        let mut k = FalKey::new(
            "ci",
            FalKeySpec {
                key_id: "6f1c2d9e-0b7a-4d3e-9a51-1f2e3d4c5b6a".into(),
                secret_sha256: secret_sha256_hex("s3cret"),
                functions: Some(vec!["echo".into(), "ml/sdxl".into()]),
                rate_limit: Some(FalKeyRateLimit {
                    requests_per_second: 2.5,
                    burst: Some(10),
                }),
                expires_at: Some("2030-01-01T00:00:00Z".into()),
                disabled: false,
            },
        );
        k.metadata.namespace = Some("team-a".into());
        k
    }

    fn schema() -> Value {
        let crd = serde_json::to_value(FalKey::crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    fn rules(v: &Value) -> Vec<(String, String)> {
        v["x-kubernetes-validations"]
            .as_array()
            .unwrap_or_else(|| panic!("no x-kubernetes-validations in {v}"))
            .iter()
            .map(|r| {
                (
                    r["rule"].as_str().unwrap().to_string(),
                    r["message"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn record_agrees_with_the_sidecar_for_a_full_example() {
        let k = full();
        let spec = KeySpec {
            key_id: k.spec.key_id.clone(),
            secret_sha256: k.spec.secret_sha256.clone(),
            functions: Some(vec!["echo".into(), "ml/sdxl".into()]),
            rate_limit: Some(RateLimitSpec {
                requests_per_second: 2.5,
                burst: Some(10),
            }),
            expires_at: Some("2030-01-01T00:00:00Z".into()),
            disabled: false,
        };
        let want = KeyRecord::from_spec("team-a", "ci", &spec).unwrap();
        let got = k.record().unwrap();
        assert_eq!(got, want);
        assert_eq!(k.key_spec().unwrap(), spec);
        assert!(got.secret_matches("s3cret") && !got.secret_matches("s3cret "));
        assert_eq!(got.rate.unwrap().burst(), 10);
        assert_eq!(got.expires_at_ms, Some(1_893_456_000_000));
        assert_eq!(got.refuses("team-a", "echo", AuthMode::Private), None);
        assert!(got.refuses("team-a", "other", AuthMode::Private).is_some());
        assert_eq!(got.refuses("ml", "sdxl", AuthMode::Shared), None);
    }

    #[test]
    fn record_defaults_and_errors() {
        let mut k = full();
        k.metadata.namespace = None;
        k.spec.functions = None;
        k.spec.rate_limit = None;
        k.spec.expires_at = None;
        k.spec.disabled = true;
        let r = k.record().unwrap();
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("default", "ci"));
        assert!(r.unusable(0).unwrap().contains("disabled"));

        let bad = |f: fn(&mut FalKeySpec)| {
            let mut k = full();
            f(&mut k.spec);
            k.record().unwrap_err()
        };
        assert!(bad(|s| s.secret_sha256 = "ABC".into()).starts_with("spec.secretSha256"));
        assert!(bad(|s| s.key_id = "a:b".into()).starts_with("spec.keyId"));
        assert!(bad(|s| s.functions = Some(vec!["A".into()])).starts_with("spec.functions"));
        assert!(bad(|s| s.expires_at = Some("soon".into())).starts_with("spec.expiresAt"));
        let e = bad(|s| s.rate_limit.as_mut().unwrap().requests_per_second = 0.0);
        assert!(e.starts_with("spec.rateLimit"), "{e}");
        let e = bad(|s| s.rate_limit.as_mut().unwrap().burst = Some(-1));
        assert!(e.contains("burst must be at least 1"), "{e}");
        let e = bad(|s| s.rate_limit.as_mut().unwrap().burst = Some(0));
        assert!(e.contains("burst must be at least 1"), "{e}");
    }

    #[test]
    fn yaml_uses_the_crd_field_names() {
        let text = serde_yaml::to_string(&full()).unwrap();
        for field in [
            "apiVersion: fal.serverless.dev/v1alpha1",
            "kind: FalKey",
            "keyId:",
            "secretSha256:",
            "requestsPerSecond: 2.5",
            "burst: 10",
            "expiresAt:",
            "disabled: false",
        ] {
            assert!(text.contains(field), "{field} missing in\n{text}");
        }
        let spec: FalKeySpec =
            serde_yaml::from_str("keyId: k\nsecretSha256: x\nrateLimit: {requestsPerSecond: 1}")
                .unwrap();
        assert!(!spec.disabled && spec.functions.is_none());
        assert_eq!(spec.rate_limit.unwrap().burst, None);
    }

    #[test]
    fn crd_names_columns_and_scope() {
        let crd = FalKey::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some(CRD_NAME));
        assert_eq!(crd.spec.group, crate::crd::GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["fk".to_string()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["fal".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, crate::crd::VERSION);
        assert!(version.subresources.is_none(), "a FalKey has no status");
        let cols: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| (c.name.as_str(), c.type_.as_str()))
            .collect();
        assert_eq!(
            cols,
            [
                ("KeyId", "string"),
                ("Functions", "string"),
                ("RPS", "number"),
                ("Expires", "string"),
                ("Disabled", "boolean"),
                ("Age", "date")
            ]
        );
    }

    #[test]
    fn schema_carries_the_validation_rules() {
        let schema = schema();
        let spec = &schema["properties"]["spec"];
        assert_eq!(spec["required"], json!(["keyId", "secretSha256"]));
        let p = &spec["properties"];

        let key_id = rules(&p["keyId"]);
        assert_eq!(key_id[0].0, format!("self.matches('{KEY_ID_PATTERN}')"));
        assert_eq!(key_id[1].0, "self == oldSelf");
        assert!(key_id[1].1.contains("immutable"));
        assert_eq!(p["keyId"]["maxLength"], 128);

        let sha = rules(&p["secretSha256"]);
        assert_eq!(sha[0].0, format!("self.matches('{SECRET_SHA256_PATTERN}')"));
        assert_eq!(
            sha[0].1,
            "secretSha256 must be 64 lowercase hex characters: the SHA-256 of the key's secret (fal-operator key create makes one)"
        );
        // maxLength bounds the CEL cost estimate; no schema pattern, so a bad value
        // gets one message (the rule's), not two.
        assert_eq!(p["secretSha256"]["maxLength"], 64);
        assert!(p["secretSha256"].get("pattern").is_none());

        let functions = &p["functions"];
        assert_eq!(functions["maxItems"], 256);
        assert_eq!(functions["items"]["maxLength"], 127);
        assert_eq!(
            rules(functions)[0].0,
            format!("self.all(f, f.matches('{FUNCTION_REF_PATTERN}'))")
        );

        let rate = &p["rateLimit"]["properties"];
        assert_eq!(
            rules(&rate["requestsPerSecond"])[0].0,
            "self > 0.0 && self <= 1000000.0"
        );
        assert_eq!(rules(&rate["burst"])[0].0, "self >= 1");
        assert_eq!(p["rateLimit"]["required"], json!(["requestsPerSecond"]));
        assert_eq!(p["expiresAt"]["format"], "date-time");
        assert_eq!(p["disabled"]["default"], false);
        assert!(
            p["secretSha256"]["description"]
                .as_str()
                .unwrap()
                .contains("never stored"),
            "doc comments become kubectl explain text"
        );
    }

    fn re(pattern: &str) -> regex::Regex {
        regex::Regex::new(pattern).unwrap()
    }

    #[test]
    fn cel_patterns_match_the_sidecar_checks_on_examples() {
        let key_id = re(KEY_ID_PATTERN);
        for ok in ["a", "6f1c2d9e-0b7a-4d3e", "key_1.2~!", &"x".repeat(128)] {
            assert!(key_id.is_match(ok) && is_key_id(ok), "{ok}");
        }
        for bad in ["", "a:b", "a b", "tab\t", "é"] {
            assert!(!key_id.is_match(bad) && !is_key_id(bad), "{bad:?}");
        }
        let sha = re(SECRET_SHA256_PATTERN);
        assert!(sha.is_match(&secret_sha256_hex("x")));
        assert!(!sha.is_match(&secret_sha256_hex("x").to_uppercase()));
        assert!(!sha.is_match(&"a".repeat(63)));
        let f = re(FUNCTION_REF_PATTERN);
        for ok in [
            "echo",
            "ml/sdxl",
            "0app",
            &"a".repeat(63),
            &format!("{0}/{0}", "b".repeat(63)),
        ] {
            assert!(f.is_match(ok) && is_function_ref(ok), "{ok}");
        }
        for bad in [
            "",
            "Echo",
            "-a",
            "a-",
            "a/b/c",
            "/a",
            "a/",
            &"a".repeat(64),
            "a.b",
        ] {
            assert!(!f.is_match(bad) && !is_function_ref(bad), "{bad:?}");
        }
    }

    proptest! {
        /// The apiserver (CEL, with the schema's length bound) and the gateway agree on
        /// every key id and function entry: nothing admitted is then ignored.
        #[test]
        fn cel_patterns_agree_with_the_sidecar(s in "[ -~\\t]{0,130}", g in "[a-z0-9/-]{0,70}") {
            prop_assert_eq!(re(KEY_ID_PATTERN).is_match(&s) && s.len() <= 128, is_key_id(&s));
            prop_assert_eq!(re(FUNCTION_REF_PATTERN).is_match(&g), is_function_ref(&g));
            prop_assert_eq!(re(FUNCTION_REF_PATTERN).is_match(&s), is_function_ref(&s));
        }
    }
}
