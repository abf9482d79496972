//! Operator configuration shared by `controller` and `render`. A plain struct so tests
//! fill it directly; `main.rs` builds it from flags and their environment variables.

use std::collections::BTreeMap;

/// Image of the injected sidecar when `--sidecar-image` is not given.
pub const DEFAULT_SIDECAR_IMAGE: &str = "ghcr.io/fal-serverless-k8s/fal-sidecar:0.1.0";
/// Store the sidecars use when `--store-url` is not given: the embedded file store in
/// each pod's data volume (standalone; the Helm chart points this at its Redis).
pub const DEFAULT_STORE_URL: &str = "file:/var/lib/fal-sidecar";
/// Image of the Python runner (served files and their environment builds) when
/// `--runner-image` is not given.
pub const DEFAULT_RUNNER_IMAGE: &str = "ghcr.io/fal-serverless-k8s/fal-runner:0.1.0";
/// The PersistentVolumeClaim (per function namespace) holding built environments.
pub const DEFAULT_ENVIRONMENTS_CLAIM: &str = "fal-environments";
/// Size of that claim when the operator creates it.
pub const DEFAULT_ENVIRONMENTS_SIZE: &str = "20Gi";
/// Its access mode: every node's pods mount it (read-only), the build Jobs write it.
pub const DEFAULT_ENVIRONMENTS_ACCESS_MODE: &str = "ReadWriteMany";
/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "fal-operator";

/// Environment variable equivalent of `--sidecar-image`.
pub const ENV_SIDECAR_IMAGE: &str = "FAL_SIDECAR_IMAGE";
/// Environment variable equivalent of `--store-url`.
pub const ENV_STORE_URL: &str = "FAL_STORE_URL";
/// Environment variable equivalent of `--store-secret`.
pub const ENV_STORE_SECRET: &str = "FAL_STORE_SECRET";
/// Environment variable equivalent of `--store-replicas`.
pub const ENV_STORE_REPLICAS: &str = "FAL_STORE_REPLICAS";
/// Environment variable equivalent of `--catalog`.
pub const ENV_CATALOG: &str = "FAL_CATALOG";
/// Environment variable equivalent of `--gateway-domain`.
pub const ENV_GATEWAY_DOMAIN: &str = "FAL_GATEWAY_DOMAIN";
/// Environment variable equivalent of `--signing-key-secret`.
pub const ENV_SIGNING_KEY_SECRET: &str = "FAL_SIGNING_KEY_SECRET";
/// Environment variable equivalent of `--metrics-addr`.
pub const ENV_METRICS_ADDR: &str = "FAL_OPERATOR_METRICS_ADDR";
/// Environment variable equivalent of `--network-policy`.
pub const ENV_NETWORK_POLICY: &str = "FAL_NETWORK_POLICY";
/// Environment variable equivalent of `--gateway-namespace`.
pub const ENV_GATEWAY_NAMESPACE: &str = "FAL_GATEWAY_NAMESPACE";
/// Environment variable equivalent of `--gateway-pod-labels`.
pub const ENV_GATEWAY_POD_LABELS: &str = "FAL_GATEWAY_POD_LABELS";
/// Environment variable equivalent of `--gateway-url`.
pub const ENV_GATEWAY_URL: &str = "FAL_GATEWAY_URL";
/// Environment variable equivalent of `--gateway-queue-url`.
pub const ENV_GATEWAY_QUEUE_URL: &str = "FAL_GATEWAY_QUEUE_URL";
/// Environment variable equivalent of the controller's `--webhook-allow` (the same
/// variable the gateway reads: one allow-list for every webhook sender).
pub const ENV_WEBHOOK_ALLOW: &str = "FAL_WEBHOOK_ALLOW";
/// Environment variable equivalent of `--runner-image`.
pub const ENV_RUNNER_IMAGE: &str = "FAL_RUNNER_IMAGE";
/// Environment variable equivalent of `--environments-claim`.
pub const ENV_ENVIRONMENTS_CLAIM: &str = "FAL_ENVIRONMENTS_CLAIM";
/// Environment variable equivalent of `--environments-size`.
pub const ENV_ENVIRONMENTS_SIZE: &str = "FAL_ENVIRONMENTS_SIZE";
/// Environment variable equivalent of `--environments-storage-class`.
pub const ENV_ENVIRONMENTS_STORAGE_CLASS: &str = "FAL_ENVIRONMENTS_STORAGE_CLASS";
/// Environment variable equivalent of `--environments-access-mode`.
pub const ENV_ENVIRONMENTS_ACCESS_MODE: &str = "FAL_ENVIRONMENTS_ACCESS_MODE";
/// Environment variable equivalent of `--build-env`.
pub const ENV_BUILD_ENV: &str = "FAL_BUILD_ENV";
/// Environment variable equivalent of `--metrics-namespace`.
pub const ENV_METRICS_NAMESPACE: &str = "FAL_METRICS_NAMESPACE";

/// Namespace of the gateway when neither `--gateway-namespace` nor `POD_NAMESPACE`
/// says (the chart's documented release namespace).
pub const DEFAULT_GATEWAY_NAMESPACE: &str = "fal-system";
/// Labels of the gateway pods the Helm chart runs (its selector without the release
/// name, which the chart passes itself).
pub const DEFAULT_GATEWAY_POD_LABELS: &str =
    "app.kubernetes.io/name=fal-serverless,app.kubernetes.io/component=gateway";

/// What the desired objects depend on besides the FalFunction and the catalog.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorConfig {
    /// Image of the injected fal-sidecar.
    pub sidecar_image: String,
    /// `FAL_SIDECAR_STORE` of every sidecar (`redis://…` or `file:…`).
    pub store_url: String,
    /// `(Secret name, key)` holding the store URL (with its password) in each
    /// function's namespace: the sidecars read it through `secretKeyRef` instead of
    /// a plaintext value in the pod spec.
    pub store_secret: Option<(String, String)>,
    /// Public domain of the gateway (`fal.example.com`, optionally with an `http://` or
    /// `https://` prefix). Status URLs point there; without it they point at the
    /// function's in-cluster Service.
    pub gateway_domain: Option<String>,
    /// In-cluster base URLs of the gateway's run host and queue host (its Service):
    /// status URLs point there when there is no public domain. Function pods admit only
    /// the gateway, so the function's own Service is no address for other clients.
    pub gateway_urls: Option<(String, String)>,
    /// Name of a Secret (in the function's namespace) holding the webhook signing key
    /// under the key `signing-key`; mounted into the sidecar when set.
    pub signing_key_secret: Option<String>,
    /// `FAL_SIDECAR_STORE_REPLICAS` of every sidecar: Redis replicas that must confirm a
    /// write before it is acknowledged (0: not set).
    pub store_replicas: u32,
    /// Webhook targets allowed despite the SSRF guard (CIDRs, IPs, host names), given to
    /// every sidecar as the gateway has them: sidecars and the gateway deliver from one
    /// outbox, so a sidecar with a narrower list would burn attempts the gateway allows.
    pub webhook_allow: Vec<String>,
    /// Who may reach a function's pods (see [`crate::networkpolicy`]). `None`: no
    /// NetworkPolicy is rendered, and the controller removes the ones it made.
    pub network_policy: Option<NetworkPolicyConfig>,
    /// Served Python files: the runner image and where environments are built.
    pub environments: EnvironmentsConfig,
}

/// Where the environments of served Python files (`function serve`) are built and kept.
#[derive(Clone, Debug, PartialEq)]
pub struct EnvironmentsConfig {
    /// Image of the Python runner: runs the build Jobs and the served files.
    pub runner_image: String,
    /// PersistentVolumeClaim of each function namespace holding the environments (one
    /// directory per hash); created by the operator when missing.
    pub claim: String,
    /// Requested size of a claim the operator creates.
    pub size: String,
    /// StorageClass of a claim the operator creates (`None`: the cluster default).
    pub storage_class: Option<String>,
    /// Access mode of a claim the operator creates: `ReadWriteMany` lets pods on every
    /// node mount it; `ReadWriteOnce` suits a single node.
    pub access_mode: String,
    /// Extra environment of the build Jobs (`PIP_INDEX_URL`, `PIP_TRUSTED_HOST`, …).
    pub build_env: Vec<(String, String)>,
}

impl Default for EnvironmentsConfig {
    fn default() -> Self {
        EnvironmentsConfig {
            runner_image: DEFAULT_RUNNER_IMAGE.to_string(),
            claim: DEFAULT_ENVIRONMENTS_CLAIM.to_string(),
            size: DEFAULT_ENVIRONMENTS_SIZE.to_string(),
            storage_class: None,
            access_mode: DEFAULT_ENVIRONMENTS_ACCESS_MODE.to_string(),
            build_env: Vec::new(),
        }
    }
}

/// Where the traffic a function's pods admit comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkPolicyConfig {
    /// Namespace of the gateway pods.
    pub gateway_namespace: String,
    /// Labels every gateway pod carries.
    pub gateway_pod_labels: BTreeMap<String, String>,
    /// Namespace allowed to scrape the sidecars' metrics port (Prometheus), if any.
    pub metrics_namespace: Option<String>,
}

impl Default for NetworkPolicyConfig {
    fn default() -> Self {
        NetworkPolicyConfig {
            gateway_namespace: DEFAULT_GATEWAY_NAMESPACE.to_string(),
            gateway_pod_labels: parse_labels(DEFAULT_GATEWAY_POD_LABELS)
                .expect("the default gateway labels parse"),
            metrics_namespace: None,
        }
    }
}

/// `KEY=VALUE[,KEY=VALUE…]`, as `--gateway-pod-labels` takes it. Keys and values follow
/// the Kubernetes label syntax closely enough to catch typos (`=` missing, spaces).
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            format!(
                "{pair:?} is not KEY=VALUE (write labels like app.kubernetes.io/component=gateway)"
            )
        })?;
        let key_ok = !k.is_empty()
            && k.len() <= 316
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        let value_ok = v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !key_ok || !value_ok {
            return Err(format!(
                "{pair:?} is not a Kubernetes label (KEY=VALUE of letters, digits, '-', '_', '.', and '/' in the key)"
            ));
        }
        out.insert(k.to_string(), v.to_string());
    }
    if out.is_empty() {
        return Err(
            "no labels given: the gateway pods must be selected by at least one label".into(),
        );
    }
    Ok(out)
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            sidecar_image: DEFAULT_SIDECAR_IMAGE.to_string(),
            store_url: DEFAULT_STORE_URL.to_string(),
            store_secret: None,
            gateway_domain: None,
            gateway_urls: None,
            signing_key_secret: None,
            store_replicas: 0,
            webhook_allow: Vec::new(),
            network_policy: Some(NetworkPolicyConfig::default()),
            environments: EnvironmentsConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_errors_say_what_to_write() {
        let l = parse_labels(DEFAULT_GATEWAY_POD_LABELS).unwrap();
        assert_eq!(l["app.kubernetes.io/component"], "gateway");
        assert_eq!(l.len(), 2);
        assert_eq!(parse_labels(" a=b , c=, ").unwrap().len(), 2);
        assert!(parse_labels("a").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_labels("a=b c")
            .unwrap_err()
            .contains("not a Kubernetes label"));
        assert!(parse_labels("").unwrap_err().contains("no labels"));
    }
}
