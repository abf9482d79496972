//! Operator configuration shared by `controller` and `render`. A plain struct so tests
//! fill it directly; `main.rs` builds it from flags and their environment variables.

/// Image of the injected sidecar when `--sidecar-image` is not given.
pub const DEFAULT_SIDECAR_IMAGE: &str = "ghcr.io/fal-serverless-k8s/fal-sidecar:0.1.0";
/// Store the sidecars use when `--store-url` is not given: the embedded file store in
/// each pod's data volume (standalone; the Helm chart points this at its Redis).
pub const DEFAULT_STORE_URL: &str = "file:/var/lib/fal-sidecar";
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
    /// Name of a Secret (in the function's namespace) holding the webhook signing key
    /// under the key `signing-key`; mounted into the sidecar when set.
    pub signing_key_secret: Option<String>,
    /// `FAL_SIDECAR_STORE_REPLICAS` of every sidecar: Redis replicas that must confirm a
    /// write before it is acknowledged (0: not set).
    pub store_replicas: u32,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            sidecar_image: DEFAULT_SIDECAR_IMAGE.to_string(),
            store_url: DEFAULT_STORE_URL.to_string(),
            store_secret: None,
            gateway_domain: None,
            signing_key_secret: None,
            store_replicas: 0,
        }
    }
}
