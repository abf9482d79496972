//! Where a FalFunction becomes a Deployment: the app container on its machine type,
//! plus the injected fal-sidecar. A served file's app container is the runner image
//! running the revision's source (a ConfigMap) from its environment (the namespace's
//! environments claim, read-only), see [`crate::environment`].
//!
//! `spec.replicas` is deliberately absent from the Deployment the operator applies.
//! The autoscaler owns replicas. If the operator's server-side apply listed
//! `replicas`, its field manager would own the field and every reconcile would reset
//! what the autoscaler chose; and once listed, dropping it later would make the
//! apiserver delete the field (resetting it to 1). So the applied object never carries
//! it: on creation the apiserver defaults it to 1 (the function starts warm), and when
//! `minReplicas` asks for more, the controller sets the start value once through the
//! `scale` subresource under a separate field manager ([`initial_replicas`]).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, KeyToPath, Lifecycle,
    LifecycleHandler, PodSpec, PodTemplateSpec, Probe, SecretVolumeSource, TCPSocketAction, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::catalog::{MachineCatalog, Placement};
use crate::config::OperatorConfig;
use crate::crd::FalFunction;
use crate::environment::{environments_volume, serve_command, source_volume, REVISION_LABEL};
use crate::labels::{identity, labels, selector};
use crate::sidecar::{
    drain_seconds, sidecar_container, DATA_VOLUME, SIGNING_KEY_ITEM, SIGNING_KEY_VOLUME,
};
use crate::Result;

/// Container name of the user's app.
pub const APP_CONTAINER: &str = "app";
/// Named container port of the app.
pub const APP_PORT_NAME: &str = "app";
/// Pod annotation naming the resolved machine type.
pub const MACHINE_TYPE_ANNOTATION: &str = "fal.serverless.dev/machine-type";
/// Seconds between startup probes; `startupTimeout` is divided by it. A new replica
/// turns ready at most this long after its app listens, and a cold start (a call held
/// at zero, a rollout) waits for that: a TCP connect a second is cheap, 10 s was most
/// of a cold start.
pub const STARTUP_PROBE_PERIOD: i32 = 1;
/// Extra seconds of grace past the drain deadline: SIGTERM reaches the sidecar only
/// after the app container has exited.
pub const TERMINATION_GRACE_MARGIN: i32 = 30;

/// Replicas a newly created Deployment starts with: warm (1) so the first call after
/// `kubectl apply` does not wait for a cold start, at least `minReplicas`, at most
/// `maxReplicas`. The autoscaler takes over from there.
pub fn initial_replicas(ff: &FalFunction) -> i32 {
    ff.spec.min_replicas.max(1).min(ff.spec.max_replicas)
}

fn app_probe(ff: &FalFunction) -> Probe {
    let port = IntOrString::Int(ff.spec.exposed_port);
    match &ff.spec.readiness_path {
        Some(path) => Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.clone()),
                port,
                ..HTTPGetAction::default()
            }),
            ..Probe::default()
        },
        None => Probe {
            tcp_socket: Some(TCPSocketAction { port, host: None }),
            ..Probe::default()
        },
    }
}

fn app_container(ff: &FalFunction, placement: &Placement, cfg: &OperatorConfig) -> Container {
    let spec = &ff.spec;
    let mut env = Vec::new();
    // The same contract as `fal-sidecar run`: the app learns its port from PORT.
    if !spec.env.iter().flatten().any(|e| e.name == "PORT") {
        env.push(EnvVar {
            name: "PORT".to_string(),
            value: Some(spec.exposed_port.to_string()),
            value_from: None,
        });
    }
    if spec.source.is_some() {
        // The runner moves a bind to the exposed port onto $PORT when they differ (in a
        // pod they are the same); the environment is read-only: no bytecode files.
        for (name, value) in [
            ("FAL_EXPOSED_PORT", spec.exposed_port.to_string()),
            ("PYTHONUNBUFFERED", "1".to_string()),
            ("PYTHONDONTWRITEBYTECODE", "1".to_string()),
        ] {
            if !spec.env.iter().flatten().any(|e| e.name == name) {
                env.push(EnvVar {
                    name: name.to_string(),
                    value: Some(value),
                    value_from: None,
                });
            }
        }
    }
    env.extend(spec.env.iter().flatten().cloned());

    // Every second, so a started replica takes calls within a second of its app
    // listening (a held call at zero waits for exactly that); 15 misses in a row (as
    // 3 × 5 s before) before a busy app counts as not ready.
    let readiness = Probe {
        period_seconds: Some(1),
        timeout_seconds: Some(5),
        failure_threshold: Some(15),
        ..app_probe(ff)
    };
    // A slow GPU model load must not be killed: the startup probe allows
    // `startupTimeout` seconds before the kubelet restarts the app. No liveness probe:
    // a single-threaded app busy with a long request cannot answer one, and the
    // sidecar's own health covers a wedged pod.
    let startup = Probe {
        period_seconds: Some(STARTUP_PROBE_PERIOD),
        timeout_seconds: Some(STARTUP_PROBE_PERIOD),
        failure_threshold: Some(
            (spec.startup_timeout_seconds() + STARTUP_PROBE_PERIOD - 1) / STARTUP_PROBE_PERIOD,
        ),
        ..app_probe(ff)
    };
    // A served file runs in the runner image, from its environment and its source.
    let (image, command, args, mounts, security) = match &spec.source {
        Some(src) => (
            cfg.environments.runner_image.clone(),
            Some(serve_command(src)),
            None,
            Some(vec![
                source_volume(src).1,
                environments_volume(&cfg.environments, false).1,
            ]),
            Some(crate::sidecar::restricted_security_context()),
        ),
        None => (
            spec.image.clone(),
            spec.command.clone(),
            spec.args.clone(),
            None,
            None,
        ),
    };
    Container {
        name: APP_CONTAINER.to_string(),
        image: Some(image),
        command,
        args,
        volume_mounts: mounts,
        security_context: security,
        env: Some(env),
        env_from: spec.env_from.clone().filter(|v| !v.is_empty()),
        ports: Some(vec![ContainerPort {
            name: Some(APP_PORT_NAME.to_string()),
            container_port: spec.exposed_port,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(readiness),
        startup_probe: Some(startup),
        resources: Some(placement.resources.clone()),
        // Kubernetes stops the app before its native sidecar. The hook asks the sidecar
        // to stop claiming and waits for running requests first, so none is cut off.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                http_get: Some(HTTPGetAction {
                    path: Some("/drain".to_string()),
                    port: IntOrString::Int(crate::sidecar::SIDECAR_ADMIN_PORT),
                    ..HTTPGetAction::default()
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        ..Container::default()
    }
}

fn volumes(ff: &FalFunction, cfg: &OperatorConfig) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: DATA_VOLUME.to_string(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    if let Some(src) = &ff.spec.source {
        volumes.push(source_volume(src).0);
        volumes.push(environments_volume(&cfg.environments, false).0);
    }
    if let Some(secret) = &cfg.signing_key_secret {
        volumes.push(Volume {
            name: SIGNING_KEY_VOLUME.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                items: Some(vec![KeyToPath {
                    key: SIGNING_KEY_ITEM.to_string(),
                    path: SIGNING_KEY_ITEM.to_string(),
                    mode: None,
                }]),
                default_mode: Some(0o440),
                // Webhooks are optional: pods start without the key, unsigned.
                optional: Some(true),
            }),
            ..Volume::default()
        });
    }
    volumes
}

impl FalFunction {
    /// Resolves the machine type and builds the Deployment (without `replicas`, see the
    /// module docs).
    pub fn deployment(&self, catalog: &MachineCatalog, cfg: &OperatorConfig) -> Result<Deployment> {
        let placement = catalog.placement(&self.spec)?;
        self.deployment_for(&placement, cfg)
    }

    /// The Deployment for an already resolved placement.
    pub fn deployment_for(
        &self,
        placement: &Placement,
        cfg: &OperatorConfig,
    ) -> Result<Deployment> {
        let (namespace, name) = identity(self)?;
        let spec = &self.spec;
        let mut pod_annotations = BTreeMap::from([
            (
                MACHINE_TYPE_ANNOTATION.to_string(),
                placement.machine_type.clone(),
            ),
            // `kubectl logs/exec` pick the app, not the sidecar.
            (
                "kubectl.kubernetes.io/default-container".to_string(),
                APP_CONTAINER.to_string(),
            ),
        ]);
        if let Some(src) = &spec.source {
            pod_annotations.insert(REVISION_LABEL.to_string(), src.revision.clone());
        }
        let pod = PodSpec {
            init_containers: Some(vec![sidecar_container(&namespace, &name, spec, cfg)]),
            containers: vec![app_container(self, placement, cfg)],
            volumes: Some(volumes(self, cfg)),
            node_selector: placement.node_selector.clone(),
            tolerations: placement.tolerations.clone(),
            affinity: placement.affinity.clone(),
            image_pull_secrets: spec.image_pull_secrets.clone().filter(|v| !v.is_empty()),
            service_account_name: spec.service_account_name.clone(),
            // Neither container needs the Kubernetes API unless the user picked an
            // account on purpose.
            automount_service_account_token: spec.service_account_name.is_none().then_some(false),
            // Hundreds of Services in a namespace would otherwise become env vars.
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(
                i64::from(drain_seconds(spec)) + i64::from(TERMINATION_GRACE_MARGIN),
            ),
            ..PodSpec::default()
        };
        Ok(Deployment {
            metadata: crate::labels::owned_meta(self)?,
            spec: Some(DeploymentSpec {
                // replicas: owned by the autoscaler, see the module docs.
                replicas: None,
                selector: LabelSelector {
                    match_labels: Some(selector(&name)),
                    match_expressions: None,
                },
                revision_history_limit: Some(3),
                // A rollout that is still loading a model is not stuck.
                progress_deadline_seconds: Some(spec.startup_timeout_seconds().max(480) + 120),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels(&name)),
                        annotations: Some(pod_annotations),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(pod),
                },
                ..DeploymentSpec::default()
            }),
            status: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::GPU_RESOURCE;
    use crate::crd::FalFunctionSpec;
    use crate::sidecar::*;
    use k8s_openapi::api::core::v1::{EnvFromSource, LocalObjectReference, SecretEnvSource};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn ff(spec: FalFunctionSpec) -> FalFunction {
        let mut ff = FalFunction::new("app", spec);
        ff.metadata.namespace = Some("team-a".into());
        ff
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    fn env_of(c: &Container) -> BTreeMap<String, String> {
        c.env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    fn build(spec: FalFunctionSpec) -> Deployment {
        ff(spec)
            .deployment(&MachineCatalog::builtin(), &OperatorConfig::default())
            .unwrap()
    }

    #[test]
    fn defaults_build_app_and_native_sidecar() {
        let d = build(FalFunctionSpec::with_image("reg/app:1"));
        assert_eq!(d.metadata.name.as_deref(), Some("app"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("team-a"));
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, None, "replicas belong to the autoscaler");
        assert_eq!(
            spec.selector.match_labels.as_ref().unwrap(),
            &BTreeMap::from([("fal.serverless.dev/function".to_string(), "app".to_string())])
        );
        let labels = d.metadata.labels.as_ref().unwrap();
        for key in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
            "app.kubernetes.io/part-of",
            "app.kubernetes.io/managed-by",
        ] {
            assert!(labels.contains_key(key), "{key}");
        }
        let pod = pod(&d);
        assert_eq!(pod.containers.len(), 1);
        let app = &pod.containers[0];
        assert_eq!(app.name, APP_CONTAINER);
        assert_eq!(app.image.as_deref(), Some("reg/app:1"));
        assert_eq!(app.ports.as_ref().unwrap()[0].container_port, 8080);
        assert_eq!(env_of(app)["PORT"], "8080");
        let pre_stop = app.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
        let hook = pre_stop.http_get.as_ref().unwrap();
        assert_eq!(
            hook.path.as_deref(),
            Some("/drain"),
            "the app waits for the sidecar to drain"
        );
        assert_eq!(
            hook.port,
            IntOrString::Int(crate::sidecar::SIDECAR_ADMIN_PORT)
        );
        let ready = app.readiness_probe.as_ref().unwrap();
        assert_eq!(
            ready.tcp_socket.as_ref().unwrap().port,
            IntOrString::Int(8080)
        );
        assert_eq!(
            ready.period_seconds,
            Some(1),
            "ready within a second of listening"
        );
        assert_eq!(ready.failure_threshold, Some(15));
        let startup = app.startup_probe.as_ref().unwrap();
        assert_eq!(startup.period_seconds, Some(1));
        assert_eq!(startup.failure_threshold, Some(600), "600 s default");
        assert!(app.liveness_probe.is_none());
        let res = app.resources.as_ref().unwrap();
        assert_eq!(
            res.requests.as_ref().unwrap()["cpu"],
            Quantity("500m".into())
        );

        let inits = pod.init_containers.as_ref().unwrap();
        assert_eq!(inits.len(), 1);
        let sc = &inits[0];
        assert_eq!(sc.name, SIDECAR_CONTAINER);
        assert_eq!(sc.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            sc.image.as_deref(),
            Some(crate::config::DEFAULT_SIDECAR_IMAGE)
        );
        assert_eq!(sc.args.as_deref(), Some(&["serve".to_string()][..]));
        let env = env_of(sc);
        assert_eq!(env["FAL_SIDECAR_UPSTREAM"], "http://127.0.0.1:8080");
        assert_eq!(env["FAL_SIDECAR_LISTEN"], "0.0.0.0:9080");
        assert_eq!(env["FAL_SIDECAR_QUEUE_LISTEN"], "0.0.0.0:9081");
        assert_eq!(env["FAL_SIDECAR_ADMIN_LISTEN"], "0.0.0.0:9090");
        assert_eq!(env["FAL_SIDECAR_STORE"], crate::config::DEFAULT_STORE_URL);
        assert_eq!(env["FAL_SIDECAR_DATA_DIR"], DATA_DIR);
        assert_eq!(env["FAL_SIDECAR_FUNCTION"], "team-a/app");
        assert_eq!(env["FAL_SIDECAR_MAX_CONCURRENCY"], "1");
        assert_eq!(env["FAL_SIDECAR_DRAIN_TIMEOUT"], "120");
        assert!(!env.contains_key("FAL_SIDECAR_SIGNING_KEY"));
        assert!(!env.contains_key("FAL_SIDECAR_REQUEST_TIMEOUT"));
        let readyz = sc
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(readyz.path.as_deref(), Some("/readyz"));
        assert_eq!(readyz.port, IntOrString::String("metrics".into()));
        let healthz = sc
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(healthz.path.as_deref(), Some("/healthz"));
        let sec = sc.security_context.as_ref().unwrap();
        assert_eq!(sec.run_as_non_root, Some(true));
        assert_eq!(sec.read_only_root_filesystem, Some(true));
        assert_eq!(sec.allow_privilege_escalation, Some(false));
        assert_eq!(
            sec.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(
            sec.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let mounts = sc.volume_mounts.as_ref().unwrap();
        assert_eq!(mounts[0].mount_path, DATA_DIR);
        let vols = pod.volumes.as_ref().unwrap();
        assert_eq!(vols.len(), 1);
        assert!(vols[0].empty_dir.is_some());

        assert_eq!(pod.termination_grace_period_seconds, Some(150));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.enable_service_links, Some(false));
        assert!(pod.affinity.is_none() && pod.tolerations.is_none());
        assert!(
            d.metadata.owner_references.is_none(),
            "no uid, no owner ref"
        );
    }

    #[test]
    fn every_machine_type_builds() {
        let catalog = MachineCatalog::builtin();
        for name in catalog.names() {
            let mut spec = FalFunctionSpec::with_image("a:1");
            spec.machine_type = name.to_string();
            let d = ff(spec)
                .deployment(&catalog, &OperatorConfig::default())
                .unwrap();
            let pod = pod(&d);
            let limits = pod.containers[0]
                .resources
                .as_ref()
                .unwrap()
                .limits
                .clone()
                .unwrap();
            let annotations = d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
            assert_eq!(
                annotations.annotations.as_ref().unwrap()[MACHINE_TYPE_ANNOTATION],
                name
            );
            if name.starts_with("GPU-") {
                assert_eq!(limits[GPU_RESOURCE], Quantity("1".into()), "{name}");
                assert!(
                    pod.affinity.is_some() && pod.tolerations.is_some(),
                    "{name}"
                );
            } else {
                assert!(!limits.contains_key(GPU_RESOURCE), "{name}");
                assert!(pod.affinity.is_none(), "{name}");
            }
        }
    }

    #[test]
    fn optional_fields_reach_the_pod() {
        let mut spec = FalFunctionSpec::with_image("a:1");
        spec.exposed_port = 5000;
        spec.command = Some(vec!["python".into()]);
        spec.args = Some(vec!["app.py".into()]);
        spec.env = Some(vec![EnvVar {
            name: "MODEL".into(),
            value: Some("sdxl".into()),
            value_from: None,
        }]);
        spec.env_from = Some(vec![EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: "hf-token".into(),
                optional: None,
            }),
            ..EnvFromSource::default()
        }]);
        spec.image_pull_secrets = Some(vec![LocalObjectReference {
            name: "regcred".into(),
        }]);
        spec.service_account_name = Some("runner".into());
        spec.readiness_path = Some("/health".into());
        spec.request_timeout = Some(900);
        spec.startup_timeout = Some(1805);
        spec.max_concurrency = 4;
        let d = build(spec);
        let pod = pod(&d);
        let app = &pod.containers[0];
        assert_eq!(app.command.as_deref(), Some(&["python".to_string()][..]));
        assert_eq!(app.args.as_deref(), Some(&["app.py".to_string()][..]));
        let env = env_of(app);
        assert_eq!(env["PORT"], "5000");
        assert_eq!(env["MODEL"], "sdxl");
        assert_eq!(app.env_from.as_ref().unwrap().len(), 1);
        let probe = app
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/health"));
        assert_eq!(probe.port, IntOrString::Int(5000));
        assert_eq!(
            app.startup_probe.as_ref().unwrap().failure_threshold,
            Some(1805),
            "never shorter than startupTimeout"
        );
        assert_eq!(pod.service_account_name.as_deref(), Some("runner"));
        assert_eq!(pod.automount_service_account_token, None);
        assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
        assert_eq!(pod.termination_grace_period_seconds, Some(930));
        assert_eq!(
            d.spec.as_ref().unwrap().progress_deadline_seconds,
            Some(1925)
        );
        let sc = &pod.init_containers.as_ref().unwrap()[0];
        let env = env_of(sc);
        assert_eq!(env["FAL_SIDECAR_UPSTREAM"], "http://127.0.0.1:5000");
        assert_eq!(env["FAL_SIDECAR_MAX_CONCURRENCY"], "4");
        assert_eq!(env["FAL_SIDECAR_DRAIN_TIMEOUT"], "900");
        assert_eq!(env["FAL_SIDECAR_REQUEST_TIMEOUT"], "900");
    }

    #[test]
    fn user_port_env_is_not_duplicated() {
        let mut spec = FalFunctionSpec::with_image("a:1");
        spec.env = Some(vec![EnvVar {
            name: "PORT".into(),
            value: Some("7000".into()),
            value_from: None,
        }]);
        let d = build(spec);
        let env = pod(&d).containers[0].env.clone().unwrap();
        assert_eq!(env.iter().filter(|e| e.name == "PORT").count(), 1);
        assert_eq!(env[0].value.as_deref(), Some("7000"));
    }

    #[test]
    fn store_replicas_reach_the_sidecar_only_when_set() {
        let names = |cfg: &OperatorConfig| {
            let d = ff(FalFunctionSpec::with_image("a:1"))
                .deployment(&MachineCatalog::builtin(), cfg)
                .unwrap();
            env_of(&pod(&d).init_containers.as_ref().unwrap()[0])
        };
        assert!(!names(&OperatorConfig::default()).contains_key("FAL_SIDECAR_STORE_REPLICAS"));
        let cfg = OperatorConfig {
            store_replicas: 1,
            ..OperatorConfig::default()
        };
        assert_eq!(names(&cfg)["FAL_SIDECAR_STORE_REPLICAS"], "1");
    }

    #[test]
    fn store_url_from_a_secret_is_never_plaintext() {
        let cfg = OperatorConfig {
            store_secret: Some(("fal-store".into(), "url".into())),
            ..OperatorConfig::default()
        };
        let d = ff(FalFunctionSpec::with_image("a:1"))
            .deployment(&MachineCatalog::builtin(), &cfg)
            .unwrap();
        let sc = &pod(&d).init_containers.as_ref().unwrap()[0];
        let var = sc
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "FAL_SIDECAR_STORE")
            .unwrap();
        assert_eq!(var.value, None);
        let r = var
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), ("fal-store", "url"));
    }

    #[test]
    fn config_reaches_the_sidecar() {
        let cfg = OperatorConfig {
            sidecar_image: "reg/sidecar:dev".into(),
            store_url: "redis://redis.fal-system:6379/0".into(),
            store_secret: None,
            gateway_domain: None,
            gateway_urls: None,
            signing_key_secret: Some("fal-webhook-key".into()),
            store_replicas: 0,
            webhook_allow: vec!["hooks.internal".into(), "10.0.0.0/8".into()],
            network_policy: None,
            environments: Default::default(),
        };
        let d = ff(FalFunctionSpec::with_image("a:1"))
            .deployment(&MachineCatalog::builtin(), &cfg)
            .unwrap();
        let pod = pod(&d);
        let sc = &pod.init_containers.as_ref().unwrap()[0];
        assert_eq!(sc.image.as_deref(), Some("reg/sidecar:dev"));
        let env = env_of(sc);
        assert_eq!(env["FAL_SIDECAR_STORE"], "redis://redis.fal-system:6379/0");
        // The gateway's webhook allow-list: both deliver from one outbox.
        assert_eq!(
            env["FAL_SIDECAR_WEBHOOK_ALLOW"],
            "hooks.internal,10.0.0.0/8"
        );
        assert_eq!(
            env["FAL_SIDECAR_SIGNING_KEY"],
            format!("{SIGNING_KEY_DIR}/{SIGNING_KEY_ITEM}")
        );
        let vol = &pod.volumes.as_ref().unwrap()[1];
        let secret = vol.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("fal-webhook-key"));
        assert_eq!(secret.optional, Some(true));
        assert!(sc
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.name == SIGNING_KEY_VOLUME && m.read_only == Some(true)));
    }

    #[test]
    fn owner_reference_points_at_the_function() {
        let mut f = ff(FalFunctionSpec::with_image("a:1"));
        f.metadata.uid = Some("uid-1".into());
        let d = f
            .deployment(&MachineCatalog::builtin(), &OperatorConfig::default())
            .unwrap();
        let owner = &d.metadata.owner_references.unwrap()[0];
        assert_eq!(owner.kind, "FalFunction");
        assert_eq!(owner.api_version, "fal.serverless.dev/v1alpha1");
        assert_eq!(owner.uid, "uid-1");
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn initial_replicas_is_warm_and_clamped() {
        let mut f = ff(FalFunctionSpec::with_image("a:1"));
        assert_eq!(initial_replicas(&f), 1);
        f.spec.min_replicas = 3;
        f.spec.max_replicas = 5;
        assert_eq!(initial_replicas(&f), 3);
        f.spec.min_replicas = 0;
        f.spec.max_replicas = 1;
        assert_eq!(initial_replicas(&f), 1);
    }

    #[test]
    fn invalid_input_is_reported_with_the_field() {
        let mut spec = FalFunctionSpec::with_image("a:1");
        spec.machine_type = "GPU-Z9".into();
        let err = ff(spec)
            .deployment(&MachineCatalog::builtin(), &OperatorConfig::default())
            .unwrap_err();
        assert!(err.to_string().starts_with("spec.machineType:"), "{err}");
    }

    #[test]
    fn a_served_file_runs_in_the_runner_image_from_its_environment() {
        use crate::crd::FunctionSource;
        let src = FunctionSource {
            revision: "r1".into(),
            config_map: "app-r1".into(),
            file: "main.py".into(),
            function: "serve_it".into(),
            requirements: vec!["flask".into()],
            ..FunctionSource::default()
        };
        let mut spec = FalFunctionSpec::with_source(src.clone());
        spec.exposed_port = 5000;
        let mut cfg = OperatorConfig::default();
        cfg.environments.runner_image = "reg/runner:dev".into();
        cfg.environments.claim = "envs".into();
        let d = ff(spec)
            .deployment(&MachineCatalog::builtin(), &cfg)
            .unwrap();
        let pod = pod(&d);
        let app = &pod.containers[0];
        assert_eq!(app.image.as_deref(), Some("reg/runner:dev"));
        let env = src.environment();
        assert_eq!(
            app.command.clone().unwrap(),
            [
                format!("/fal/envs/{env}/bin/python"),
                "-m".into(),
                "fal_runner".into(),
                "serve".into(),
                "/fal/source/main.py".into(),
                "serve_it".into()
            ]
        );
        let vars = env_of(app);
        assert_eq!(
            (vars["PORT"].as_str(), vars["FAL_EXPOSED_PORT"].as_str()),
            ("5000", "5000")
        );
        let mounts = app.volume_mounts.clone().unwrap();
        assert!(
            mounts.iter().all(|m| m.read_only == Some(true)),
            "{mounts:?}"
        );
        let vols = pod.volumes.clone().unwrap();
        let claim = vols
            .iter()
            .find_map(|v| v.persistent_volume_claim.clone())
            .unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("envs", Some(true))
        );
        let cm = vols.iter().find_map(|v| v.config_map.clone()).unwrap();
        assert_eq!(cm.name, "app-r1");
        let annotations = d
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .clone()
            .unwrap()
            .annotations
            .unwrap();
        assert_eq!(annotations["fal.serverless.dev/revision"], "r1");
        assert_eq!(
            pod.init_containers.as_ref().unwrap()[0].name,
            SIDECAR_CONTAINER
        );
        assert_eq!(
            app.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
    }
}
