//! The `FalFunction` custom resource (`fal.serverless.dev/v1alpha1`).
//!
//! Doc comments on the spec fields are what `kubectl explain falfunction.spec` prints:
//! they are written for the person applying the manifest.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvFromSource, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// API group of the FalFunction CRD.
pub const GROUP: &str = "fal.serverless.dev";
/// Served and stored version.
pub const VERSION: &str = "v1alpha1";
/// Name of the CRD object (`<plural>.<group>`).
pub const CRD_NAME: &str = "falfunctions.fal.serverless.dev";

/// Default `exposedPort`, fal's default for `exposed_port`.
pub const DEFAULT_EXPOSED_PORT: i32 = 8080;
/// Default `machineType`.
pub const DEFAULT_MACHINE_TYPE: &str = "XS";
/// Default `keepAlive` in seconds (fal's default).
pub const DEFAULT_KEEP_ALIVE: i32 = 10;
/// Default `maxReplicas`.
pub const DEFAULT_MAX_REPLICAS: i32 = 1;
/// Default `maxConcurrency`.
pub const DEFAULT_MAX_CONCURRENCY: i32 = 1;
/// Default `startupTimeout` in seconds: large GPU models take minutes to load.
pub const DEFAULT_STARTUP_TIMEOUT: i32 = 600;

/// What to run (an HTTP app image, or a served Python file), on which machine type, and
/// how far to scale it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fal.serverless.dev",
    version = "v1alpha1",
    kind = "FalFunction",
    plural = "falfunctions",
    namespaced,
    shortname = "ff",
    category = "fal",
    status = "FalFunctionStatus",
    derive = "PartialEq",
    doc = "A fal-style serverless function: an HTTP app image (or a Python file served with `fal-operator function serve`) served through the fal queue and direct-call APIs, scheduled on a machine type, scaled to zero when idle.",
    printcolumn(name = "Machine", type_ = "string", json_path = ".spec.machineType"),
    printcolumn(name = "Revision", type_ = "string", json_path = ".status.revision"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas", priority = 1),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url"),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS-1035 label (at most 63 lowercase letters, digits or '-', starting with a letter): it names the function's Service")
)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must be less than or equal to maxReplicas").field_path(".minReplicas"))]
#[x_kube(validation = Rule::new("has(self.image) != has(self.source)").message("set exactly one of image (an app image) and source (a Python file served by `fal-operator function serve`)"))]
#[serde(rename_all = "camelCase")]
pub struct FalFunctionSpec {
    /// Container image of the app: an HTTP server listening on `exposedPort`
    /// (Flask, FastAPI, anything). Exactly one of `image` and `source` is set.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1))]
    pub image: String,

    /// A Python file decorated with fal_serverless's `@isolated`, run by the operator's
    /// runner image in an environment built once per requirements (what
    /// `fal-operator function serve` writes; exactly one of `image` and `source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<FunctionSource>,

    /// Port the app listens on inside the pod (fal `exposed_port`). The app also gets it
    /// in the `PORT` environment variable. Ports 9080, 9081 and 9090 are taken by the
    /// injected fal-sidecar. Default 8080.
    #[serde(default = "default_exposed_port")]
    #[schemars(range(min = 1, max = 65535))]
    #[x_kube(validation = Rule::new("self != 9080 && self != 9081 && self != 9090").message("exposedPort must not be 9080, 9081 or 9090: the fal-sidecar listens there"))]
    pub exposed_port: i32,

    /// Machine type from the operator's machine catalog (fal `machine_type`): decides CPU,
    /// memory, GPU count and which nodes the pods land on. Built in: XS, S, M, L, GPU-T4,
    /// GPU-A10G, GPU-L4, GPU-A100, GPU-A100-80G, GPU-H100. Default XS.
    #[serde(default = "default_machine_type")]
    #[schemars(length(min = 1, max = 63))]
    pub machine_type: String,

    /// Seconds a replica stays up with no request queued, running or arriving before the
    /// function scales down to `minReplicas` (fal `keep_alive`). Default 10.
    #[serde(default = "default_keep_alive")]
    #[schemars(range(min = 0))]
    pub keep_alive: i32,

    /// Replicas kept running even when idle. 0 lets the function scale to zero; the
    /// gateway wakes it on the next request. Default 0.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,

    /// Upper bound on replicas under load. Must be at least `minReplicas`. Default 1.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1))]
    pub max_replicas: i32,

    /// Requests one replica runs at once (fal multiplexing). The sidecar holds further
    /// requests in its queue; the autoscaler divides load by this. Default 1.
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_concurrency: i32,

    /// Overrides the image's ENTRYPOINT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,

    /// Overrides the image's CMD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,

    /// Environment variables for the app container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,

    /// ConfigMaps and Secrets whose keys become environment variables of the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_from: Option<Vec<EnvFromSource>>,

    /// Resource requests and limits of the app container, merged key by key over the
    /// machine type's (so setting only `limits.memory` keeps the catalog's CPU and GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// GPUs per replica (fal `num_gpus`), overriding the machine type's count. Only valid
    /// on GPU machine types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub num_gpus: Option<i32>,

    /// Node labels the pods must match, merged over the machine type's node selector
    /// (keys given here win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the pods. When set they replace the machine type's tolerations
    /// (for GPU types that is the `nvidia.com/gpu` toleration: keep it in your list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Scheduling affinity. A `nodeAffinity` here replaces the machine type's node
    /// affinity; pod affinity and anti-affinity are passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Secrets for pulling `image` from a private registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,

    /// Service account the pods run as. When unset, the pods get no API token at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,

    /// HTTP path answering 2xx when the app can take requests (for example `/health`).
    /// When unset, readiness is a TCP connect to `exposedPort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/"))]
    pub readiness_path: Option<String>,

    /// Seconds one request may run in the app before it is failed. Also how long a
    /// stopping replica waits for requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub request_timeout: Option<i32>,

    /// Seconds a new replica may take to become ready (image pull excluded) before it
    /// is restarted: cover your model load time. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 7200))]
    pub startup_timeout: Option<i32>,

    /// Who may call the function through the gateway (fal's auth modes): `private` (the
    /// default) admits API keys (FalKeys) of the function's namespace; `shared` admits
    /// any valid key of any namespace; `public` needs no key at all. A FalKey's
    /// `functions` list narrows what one key may call.
    #[serde(default)]
    pub auth: FunctionAuth,
}

/// `spec.source`: one revision of a served Python file and the environment it needs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FunctionSource {
    /// Revision id (a UUID): a new one for every changed file. The pods of a revision
    /// start only once its environment is built; until then the previous revision keeps
    /// serving.
    #[schemars(length(min = 1, max = 63))]
    pub revision: String,
    /// ConfigMap (in the function's namespace) holding the revision's file. Written once
    /// and never changed (`immutable: true`); old revisions' ConfigMaps are deleted
    /// beyond the history the status keeps.
    #[schemars(length(min = 1, max = 253))]
    pub config_map: String,
    /// Key of the file in the ConfigMap (also its file name in the pod).
    #[schemars(length(min = 1, max = 253))]
    pub file: String,
    /// The decorated function in the file.
    #[schemars(length(min = 1, max = 255))]
    pub function: String,
    /// The environment: pip requirement specifiers (`@isolated(requirements=…)`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requirements: Vec<String>,
    /// Python version the file asks for (`@isolated(python_version=…)`): the build
    /// fails unless the runner image's Python is that version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_version: Option<String>,
    /// pip `--index-url` (an air-gapped cluster's mirror).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_url: Option<String>,
    /// pip `--find-links` (wheelhouse URLs or paths the build pod can read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub find_links: Vec<String>,
    /// pip `--no-index`: only `findLinks`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_index: bool,
}

/// `spec.auth` of a FalFunction.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FunctionAuth {
    /// Keys of the function's namespace only.
    #[default]
    Private,
    /// Any valid key of any namespace.
    Shared,
    /// No key needed.
    Public,
}

impl From<FunctionAuth> for fal_sidecar::auth::AuthMode {
    fn from(a: FunctionAuth) -> Self {
        match a {
            FunctionAuth::Private => fal_sidecar::auth::AuthMode::Private,
            FunctionAuth::Shared => fal_sidecar::auth::AuthMode::Shared,
            FunctionAuth::Public => fal_sidecar::auth::AuthMode::Public,
        }
    }
}

fn default_exposed_port() -> i32 {
    DEFAULT_EXPOSED_PORT
}
fn default_machine_type() -> String {
    DEFAULT_MACHINE_TYPE.to_string()
}
fn default_keep_alive() -> i32 {
    DEFAULT_KEEP_ALIVE
}
fn default_max_replicas() -> i32 {
    DEFAULT_MAX_REPLICAS
}
fn default_max_concurrency() -> i32 {
    DEFAULT_MAX_CONCURRENCY
}

impl FalFunctionSpec {
    /// A spec with every default applied, as the apiserver would store it.
    pub fn with_image(image: impl Into<String>) -> Self {
        FalFunctionSpec {
            image: image.into(),
            source: None,
            exposed_port: DEFAULT_EXPOSED_PORT,
            machine_type: DEFAULT_MACHINE_TYPE.to_string(),
            keep_alive: DEFAULT_KEEP_ALIVE,
            min_replicas: 0,
            max_replicas: DEFAULT_MAX_REPLICAS,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            command: None,
            args: None,
            env: None,
            env_from: None,
            resources: None,
            num_gpus: None,
            node_selector: None,
            tolerations: None,
            affinity: None,
            image_pull_secrets: None,
            service_account_name: None,
            readiness_path: None,
            request_timeout: None,
            startup_timeout: None,
            auth: FunctionAuth::Private,
        }
    }

    /// A spec serving `source` with every default applied.
    pub fn with_source(source: FunctionSource) -> Self {
        FalFunctionSpec {
            source: Some(source),
            ..Self::with_image("")
        }
    }

    /// `startupTimeout` or its default.
    pub fn startup_timeout_seconds(&self) -> i32 {
        self.startup_timeout.unwrap_or(DEFAULT_STARTUP_TIMEOUT)
    }
}

/// Observed state, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FalFunctionStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas the Deployment currently has.
    #[serde(default)]
    pub replicas: i32,
    /// Replicas passing their readiness probes.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas the autoscaler wants for the current load (queued, running and held
    /// requests divided by `maxConcurrency`, within `minReplicas`..`maxReplicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Last time a request arrived, ran or completed: `keepAlive` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Machine type the pods run on, as resolved from the catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    /// URL for direct (synchronous) calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Base URL of the queue API (submit, status, result, cancel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_url: Option<String>,
    /// The function's own host on the gateway (`https://NAME.NAMESPACE.DOMAIN`, the
    /// seed's per-app URL) when the gateway has a public domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_url: Option<String>,
    /// Revision of `spec.source` the pods run (served Python files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The last revisions served, oldest first (at most 10): their sources are kept,
    /// older ones are deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<ServedRevision>,
    /// `Ready`, `MachineTypeResolved`, and for served files `EnvironmentReady`;
    /// `lastTransitionTime` changes only on a flip.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One revision that served, in `status.revisions`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServedRevision {
    /// The revision id (`spec.source.revision`).
    pub revision: String,
    /// Hash of its environment (python version, requirements, index settings).
    pub environment: String,
    /// When the operator rolled the pods to it.
    pub served_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn defaults_apply_when_fields_are_missing() {
        let spec: FalFunctionSpec = serde_yaml::from_str("image: app:1").unwrap();
        assert_eq!(spec, FalFunctionSpec::with_image("app:1"));
        assert_eq!(spec.startup_timeout_seconds(), DEFAULT_STARTUP_TIMEOUT);
    }

    #[test]
    fn a_source_spec_has_no_image_and_round_trips() {
        let spec = FalFunctionSpec::with_source(FunctionSource {
            revision: "39c4e168-414f-49f1-8160-f9f7a958e8cb".into(),
            config_map: "app-39c4e168".into(),
            file: "app.py".into(),
            function: "app".into(),
            requirements: vec!["flask".into()],
            ..FunctionSource::default()
        });
        let v = serde_json::to_value(&spec).unwrap();
        assert!(
            v.get("image").is_none(),
            "no image key to trip the CEL rule: {v}"
        );
        assert!(v["source"].get("noIndex").is_none() && v["source"].get("findLinks").is_none());
        let back: FalFunctionSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn crd_carries_names_subresource_and_validation() {
        let crd = FalFunction::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some(CRD_NAME));
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["ff".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            cols,
            ["Machine", "Revision", "Replicas", "Ready", "Desired", "URL", "Status", "Age"]
        );

        let schema = serde_json::to_value(&version.schema).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        assert!(spec.get("required").is_none(), "image or source: {spec}");
        assert!(
            spec["properties"]["image"].get("default").is_none(),
            "a defaulted image would always be present"
        );
        let rules = spec["x-kubernetes-validations"].to_string();
        assert!(
            rules.contains("self.minReplicas <= self.maxReplicas"),
            "{rules}"
        );
        assert!(
            rules.contains("has(self.image) != has(self.source)"),
            "{rules}"
        );
        let port = &spec["properties"]["exposedPort"];
        assert_eq!(port["minimum"].as_f64(), Some(1.0));
        assert_eq!(port["maximum"].as_f64(), Some(65535.0));
        assert_eq!(port["default"], 8080);
        assert_eq!(
            spec["properties"]["minReplicas"]["minimum"].as_f64(),
            Some(0.0)
        );
        let root_rules = schema["openAPIV3Schema"]["x-kubernetes-validations"].to_string();
        assert!(
            root_rules.contains("self.metadata.name.size() <= 63"),
            "{root_rules}"
        );
        assert_eq!(spec["properties"]["machineType"]["default"], "XS");
        assert!(
            spec["properties"]["image"]["description"]
                .as_str()
                .unwrap()
                .contains("Container image"),
            "doc comments become kubectl explain text"
        );
    }

    #[test]
    fn reserved_port_rule_matches_sidecar_ports() {
        use crate::sidecar::{SIDECAR_ADMIN_PORT, SIDECAR_HTTP_PORT, SIDECAR_QUEUE_PORT};
        let crd = serde_json::to_value(FalFunction::crd()).unwrap();
        let rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["exposedPort"]["x-kubernetes-validations"]
            .to_string();
        for port in [SIDECAR_HTTP_PORT, SIDECAR_QUEUE_PORT, SIDECAR_ADMIN_PORT] {
            assert!(rules.contains(&format!("self != {port}")), "{rules}");
        }
    }
}
