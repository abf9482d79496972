//! The fal-sidecar container injected into every FalFunction pod.
//!
//! It runs as a native sidecar (an init container with `restartPolicy: Always`): it is
//! up before the app starts, and it keeps running until the app container has exited.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, Probe,
    ResourceRequirements, SeccompProfile, SecretKeySelector, SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::config::OperatorConfig;
use crate::crd::FalFunctionSpec;

/// Container name of the sidecar.
pub const SIDECAR_CONTAINER: &str = "fal-sidecar";
/// Run API and direct calls (`FAL_SIDECAR_LISTEN`). Not 8080: that is fal's default app port.
pub const SIDECAR_HTTP_PORT: i32 = 9080;
/// Queue-host API (`FAL_SIDECAR_QUEUE_LISTEN`).
pub const SIDECAR_QUEUE_PORT: i32 = 9081;
/// `/metrics`, `/healthz`, `/readyz` (`FAL_SIDECAR_ADMIN_LISTEN`).
pub const SIDECAR_ADMIN_PORT: i32 = 9090;
/// Named container ports, referenced by the Service.
pub const HTTP_PORT_NAME: &str = "http";
/// Named queue port.
pub const QUEUE_PORT_NAME: &str = "queue";
/// Named admin/metrics port.
pub const METRICS_PORT_NAME: &str = "metrics";
/// Writable data directory (the root filesystem is read-only).
pub const DATA_DIR: &str = "/var/lib/fal-sidecar";
/// emptyDir volume mounted at [`DATA_DIR`].
pub const DATA_VOLUME: &str = "fal-sidecar-data";
/// Secret volume with the webhook signing key.
pub const SIGNING_KEY_VOLUME: &str = "fal-signing-key";
/// Where the signing key Secret is mounted.
pub const SIGNING_KEY_DIR: &str = "/etc/fal-sidecar/signing";
/// Key of the signing key inside its Secret (and file name under [`SIGNING_KEY_DIR`]).
pub const SIGNING_KEY_ITEM: &str = "signing-key";
/// Seconds a stopping sidecar drains in-flight requests when `requestTimeout` is unset.
pub const DEFAULT_DRAIN_SECONDS: i32 = 120;
/// UID/GID the sidecar runs as (distroless `nonroot`).
pub const SIDECAR_UID: i64 = 65532;

/// Drain deadline: a request may run `requestTimeout`, so a stopping replica waits
/// that long for requests in flight.
pub fn drain_seconds(spec: &FalFunctionSpec) -> i32 {
    spec.request_timeout.unwrap_or(DEFAULT_DRAIN_SECONDS)
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(METRICS_PORT_NAME.to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: number,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }
}

/// The "restricted" Pod Security Standard for a container: non-root, no privilege
/// escalation, no capabilities, the runtime's seccomp profile (the sidecar and the
/// Python runner's containers).
pub fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

/// The sidecar container for the function `namespace/name`.
pub fn sidecar_container(
    namespace: &str,
    name: &str,
    spec: &FalFunctionSpec,
    cfg: &OperatorConfig,
) -> Container {
    let mut env = vec![
        env("FAL_SIDECAR_LISTEN", format!("0.0.0.0:{SIDECAR_HTTP_PORT}")),
        env(
            "FAL_SIDECAR_QUEUE_LISTEN",
            format!("0.0.0.0:{SIDECAR_QUEUE_PORT}"),
        ),
        env(
            "FAL_SIDECAR_ADMIN_LISTEN",
            format!("0.0.0.0:{SIDECAR_ADMIN_PORT}"),
        ),
        env(
            "FAL_SIDECAR_UPSTREAM",
            format!("http://127.0.0.1:{}", spec.exposed_port),
        ),
        match &cfg.store_secret {
            Some((name, key)) => EnvVar {
                name: "FAL_SIDECAR_STORE".to_string(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: name.clone(),
                        key: key.clone(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
            },
            None => env("FAL_SIDECAR_STORE", cfg.store_url.clone()),
        },
        env("FAL_SIDECAR_DATA_DIR", DATA_DIR),
        env("FAL_SIDECAR_FUNCTION", format!("{namespace}/{name}")),
        env(
            "FAL_SIDECAR_MAX_CONCURRENCY",
            spec.max_concurrency.to_string(),
        ),
        env("FAL_SIDECAR_DRAIN_TIMEOUT", drain_seconds(spec).to_string()),
    ];
    if cfg.store_replicas > 0 {
        env.push(self::env(
            "FAL_SIDECAR_STORE_REPLICAS",
            cfg.store_replicas.to_string(),
        ));
    }
    if !cfg.webhook_allow.is_empty() {
        env.push(self::env(
            "FAL_SIDECAR_WEBHOOK_ALLOW",
            cfg.webhook_allow.join(","),
        ));
    }
    if let Some(timeout) = spec.request_timeout {
        env.push(self::env(
            "FAL_SIDECAR_REQUEST_TIMEOUT",
            timeout.to_string(),
        ));
    }
    let mut mounts = vec![VolumeMount {
        name: DATA_VOLUME.to_string(),
        mount_path: DATA_DIR.to_string(),
        ..VolumeMount::default()
    }];
    if cfg.signing_key_secret.is_some() {
        env.push(self::env(
            "FAL_SIDECAR_SIGNING_KEY",
            format!("{SIGNING_KEY_DIR}/{SIGNING_KEY_ITEM}"),
        ));
        mounts.push(VolumeMount {
            name: SIGNING_KEY_VOLUME.to_string(),
            mount_path: SIGNING_KEY_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    Container {
        name: SIDECAR_CONTAINER.to_string(),
        image: Some(cfg.sidecar_image.clone()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        command: Some(vec!["fal-sidecar".to_string()]),
        args: Some(vec!["serve".to_string()]),
        // Native sidecar: starts before the app, stops after it.
        restart_policy: Some("Always".to_string()),
        env: Some(env),
        ports: Some(vec![
            port(HTTP_PORT_NAME, SIDECAR_HTTP_PORT),
            port(QUEUE_PORT_NAME, SIDECAR_QUEUE_PORT),
            port(METRICS_PORT_NAME, SIDECAR_ADMIN_PORT),
        ]),
        // Every second: a new replica joins its Service (and the gateway's replicas)
        // within a second of being able to take a submit; its /readyz shares one store
        // probe per 200 ms between callers.
        readiness_probe: Some(http_probe("/readyz", 1, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        resources: Some(ResourceRequirements {
            requests: Some(
                [
                    ("cpu".to_string(), Quantity("50m".to_string())),
                    ("memory".to_string(), Quantity("64Mi".to_string())),
                ]
                .into(),
            ),
            limits: Some([("memory".to_string(), Quantity("256Mi".to_string()))].into()),
            claims: None,
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            ..restricted_security_context()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}
