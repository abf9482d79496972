//! What the gateway, the autoscaler and `local` need to know of a FalFunction: its
//! address and its scaling bounds (the rest of the spec is the Deployment's business).

use std::time::Duration;

use fal_sidecar::auth::AuthMode;

use crate::autoscale::decide::Bounds;
use crate::crd::{FalFunction, FalFunctionSpec};
use crate::{Error, Result};

/// One function as the data path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionInfo {
    pub namespace: String,
    pub name: String,
    pub bounds: Bounds,
    /// How long a new replica may take to become ready (`startupTimeout`).
    pub startup_timeout: Duration,
    /// Who may call it (`spec.auth`).
    pub auth: AuthMode,
}

impl FunctionInfo {
    /// From a namespace, a name and a spec (defaults already applied).
    pub fn from_spec(namespace: &str, name: &str, spec: &FalFunctionSpec) -> Result<Self> {
        for (what, v) in [("metadata.namespace", namespace), ("metadata.name", name)] {
            if !is_dns_label(v) {
                return Err(Error::InvalidSpec {
                    field: what.to_string(),
                    message: format!("{v:?} is not a DNS label (lowercase letters, digits, '-')"),
                });
            }
        }
        let non_neg = |v: i32| u32::try_from(v).unwrap_or(0);
        Ok(FunctionInfo {
            namespace: namespace.to_string(),
            name: name.to_string(),
            bounds: Bounds {
                min_replicas: non_neg(spec.min_replicas),
                max_replicas: non_neg(spec.max_replicas).max(non_neg(spec.min_replicas)),
                max_concurrency: non_neg(spec.max_concurrency).max(1),
                keep_alive: Duration::from_secs(non_neg(spec.keep_alive).into()),
            },
            startup_timeout: Duration::from_secs(non_neg(spec.startup_timeout_seconds()).into()),
            auth: spec.auth.into(),
        })
    }

    /// From a FalFunction object (namespace `default` when it has none).
    pub fn from_object(ff: &FalFunction) -> Result<Self> {
        let ns = ff.metadata.namespace.as_deref().unwrap_or("default");
        let name = ff.metadata.name.as_deref().unwrap_or_default();
        Self::from_spec(ns, name, &ff.spec)
    }

    /// `NAMESPACE/NAME`: the function's key in the store and in every map.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Something that follows the set of functions (the gateway, the autoscaler).
pub trait FunctionSink: Send + Sync + 'static {
    fn upsert(&self, info: FunctionInfo);
    fn remove(&self, key: &str);
    /// Every function that existed at (re)start has been seen.
    fn synced(&self) {}
}

/// RFC 1123 label: what namespaces and FalFunction names are. Anything else in a
/// request path is refused before it can name a store key. (The key ring checks
/// `functions` entries of FalKeys with the same rule.)
pub use fal_sidecar::auth::keys::is_label as is_dns_label;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["a", "default", "seed-app", "a1", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a/b",
            "..",
            "a_b",
            "{x}",
            &"x".repeat(64),
        ] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn info_from_spec() {
        let mut spec = FalFunctionSpec::with_image("x");
        spec.min_replicas = 1;
        spec.max_replicas = 3;
        spec.max_concurrency = 2;
        spec.keep_alive = 30;
        let f = FunctionInfo::from_spec("ns", "fn", &spec).unwrap();
        assert_eq!(f.key(), "ns/fn");
        assert_eq!(f.bounds.min_replicas, 1);
        assert_eq!(f.bounds.max_replicas, 3);
        assert_eq!(f.bounds.max_concurrency, 2);
        assert_eq!(f.bounds.keep_alive, Duration::from_secs(30));
        assert!(FunctionInfo::from_spec("ns", "Bad_Name", &spec).is_err());
    }
}
