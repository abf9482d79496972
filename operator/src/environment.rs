//! Served Python files (`spec.source`): where their environments come from. Pure.
//!
//! An environment is a virtualenv built once per hash of (python version,
//! requirements, index settings) — the same hash `fal-operator local` uses — by a build
//! Job running the runner image's `python3 -m fal_runner build`, into a directory of
//! the namespace's environments claim. The build writes into a temporary directory and
//! renames it into place only when pip succeeded, so a half-built environment is never
//! seen and two builds of one hash cannot both win. Pods mount the claim read-only and
//! run `/fal/envs/HASH/bin/python -m fal_runner serve`: never pip at cold start.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::Volume;
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EnvVar, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, PodTemplateSpec,
    ResourceRequirements, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{EnvironmentsConfig, OperatorConfig};
use crate::crd::{FalFunction, FunctionSource};
use crate::labels::{identity, labels};
use crate::sidecar::restricted_security_context;
use crate::{Error, Result};

/// Where pods mount the environments claim (read-only; build Jobs read-write).
pub const ENVIRONMENTS_DIR: &str = "/fal/envs";
/// Where pods mount the revision's source ConfigMap.
pub const SOURCE_DIR: &str = "/fal/source";
/// Volume of the environments claim.
pub const ENVIRONMENTS_VOLUME: &str = "fal-environments";
/// Volume of the source ConfigMap.
pub const SOURCE_VOLUME: &str = "fal-source";
/// Container name of a build Job.
pub const BUILD_CONTAINER: &str = "build";
/// Label of a revision's objects (its ConfigMap, its build Job and pods).
pub const REVISION_LABEL: &str = "fal.serverless.dev/revision";
/// Label of a build Job's pods (the function's name). Not the function label: the
/// function's Service must not select a build pod.
pub const BUILD_LABEL: &str = "fal.serverless.dev/build";
/// `app.kubernetes.io/component` of a revision's source ConfigMap.
pub const SOURCE_COMPONENT: &str = "source";
/// `app.kubernetes.io/component` of a build Job.
pub const BUILD_COMPONENT: &str = "build";
/// UID and GID the runner image runs as (and the claim's files belong to).
pub const RUNNER_UID: i64 = 65532;
/// Longest a build may run before its Job fails.
pub const BUILD_DEADLINE_SECONDS: i64 = 1800;
/// Lines of a failed build's log kept in the status condition.
pub const FAILURE_LINES: usize = 20;

/// Package index settings of an environment build (air-gapped clusters).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_url: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub find_links: Vec<String>,
    #[serde(default)]
    pub no_index: bool,
}

/// The hash naming an environment: python version, requirements and index settings
/// (the same in a cluster and under `fal-operator local`'s state dir).
pub fn environment_hash(
    python_version: Option<&str>,
    requirements: &[String],
    index: &IndexSettings,
) -> String {
    let v = serde_json::json!({
        "python": python_version,
        "requirements": requirements,
        "index": index,
    });
    hex::encode(Sha256::digest(v.to_string()))[..24].to_string()
}

impl FunctionSource {
    /// The index settings of the build.
    pub fn index(&self) -> IndexSettings {
        IndexSettings {
            index_url: self.index_url.clone(),
            find_links: self.find_links.clone(),
            no_index: self.no_index,
        }
    }

    /// The environment's hash (see [`environment_hash`]).
    pub fn environment(&self) -> String {
        environment_hash(
            self.python_version.as_deref(),
            &self.requirements,
            &self.index(),
        )
    }

    /// `requirements` for people: `flask numpy`, or `no requirements`.
    pub fn requirements_text(&self) -> String {
        if self.requirements.is_empty() {
            "no requirements".to_string()
        } else {
            self.requirements.join(" ")
        }
    }
}

/// Name of the build Job of `function`'s `revision`: at most 63 characters (its pods
/// carry it in a label), unique per function and revision.
pub fn build_job_name(function: &str, revision: &str) -> String {
    let tag = hex::encode(Sha256::digest(format!("{function}/{revision}")))[..10].to_string();
    let prefix: String = function
        .chars()
        .take(63 - "-build-".len() - tag.len())
        .collect();
    format!("{}-build-{tag}", prefix.trim_end_matches('-'))
}

/// Labels of an object belonging to one revision of `function`.
pub fn revision_labels(
    function: &str,
    revision: &str,
    component: &str,
) -> BTreeMap<String, String> {
    let mut l = labels(function);
    l.insert(
        "app.kubernetes.io/component".to_string(),
        component.to_string(),
    );
    l.insert(REVISION_LABEL.to_string(), revision.to_string());
    l
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// The environments claim of a namespace, mounted (read-only unless `writable`).
pub fn environments_volume(cfg: &EnvironmentsConfig, writable: bool) -> (Volume, VolumeMount) {
    (
        Volume {
            name: ENVIRONMENTS_VOLUME.to_string(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: cfg.claim.clone(),
                read_only: Some(!writable),
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: ENVIRONMENTS_VOLUME.to_string(),
            mount_path: ENVIRONMENTS_DIR.to_string(),
            read_only: Some(!writable),
            ..VolumeMount::default()
        },
    )
}

/// The revision's source ConfigMap, mounted read-only.
pub fn source_volume(src: &FunctionSource) -> (Volume, VolumeMount) {
    (
        Volume {
            name: SOURCE_VOLUME.to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: src.config_map.clone(),
                optional: Some(false),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: SOURCE_VOLUME.to_string(),
            mount_path: SOURCE_DIR.to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    )
}

/// What the app container of a served file runs: the environment's python, the
/// runner, the file and the function.
pub fn serve_command(src: &FunctionSource) -> Vec<String> {
    vec![
        format!("{ENVIRONMENTS_DIR}/{}/bin/python", src.environment()),
        "-m".to_string(),
        "fal_runner".to_string(),
        "serve".to_string(),
        format!("{SOURCE_DIR}/{}", src.file),
        src.function.clone(),
    ]
}

/// The build command of `src`'s environment.
pub fn build_command(src: &FunctionSource) -> Vec<String> {
    let mut cmd: Vec<String> = ["python3", "-m", "fal_runner", "build", "--dest"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    cmd.push(format!("{ENVIRONMENTS_DIR}/{}", src.environment()));
    if let Some(v) = &src.python_version {
        cmd.extend(["--python-version".to_string(), v.clone()]);
    }
    for r in &src.requirements {
        cmd.extend(["--requirement".to_string(), r.clone()]);
    }
    if let Some(u) = &src.index_url {
        cmd.extend(["--index-url".to_string(), u.clone()]);
    }
    for f in &src.find_links {
        cmd.extend(["--find-links".to_string(), f.clone()]);
    }
    if src.no_index {
        cmd.push("--no-index".to_string());
    }
    cmd
}

fn source_of(ff: &FalFunction) -> Result<&FunctionSource> {
    ff.spec
        .source
        .as_ref()
        .ok_or_else(|| Error::invalid("spec.source", "the function serves an image, not a file"))
}

impl FalFunction {
    /// The Job building the environment of `spec.source` (owned by the function, so it
    /// goes with it; the controller deletes those of revisions it no longer keeps).
    pub fn build_job(&self, cfg: &OperatorConfig) -> Result<Job> {
        let (namespace, name) = identity(self)?;
        let src = source_of(self)?;
        let envs = &cfg.environments;
        let (volume, mount) = environments_volume(envs, true);
        let mut env_vars = vec![env("PYTHONUNBUFFERED", "1")];
        env_vars.extend(envs.build_env.iter().map(|(k, v)| env(k, v.clone())));
        let mut pod_labels = BTreeMap::from([
            (BUILD_LABEL.to_string(), name.clone()),
            (REVISION_LABEL.to_string(), src.revision.clone()),
            (
                "app.kubernetes.io/component".to_string(),
                BUILD_COMPONENT.to_string(),
            ),
        ]);
        pod_labels.insert(
            "app.kubernetes.io/part-of".to_string(),
            "fal-serverless".to_string(),
        );
        let container = Container {
            name: BUILD_CONTAINER.to_string(),
            image: Some(envs.runner_image.clone()),
            image_pull_policy: Some("IfNotPresent".to_string()),
            command: Some(build_command(src)),
            env: Some(env_vars),
            volume_mounts: Some(vec![mount]),
            // pip's error reaches the Job's pod status, and from there the function's
            // EnvironmentReady condition.
            termination_message_policy: Some("FallbackToLogsOnError".to_string()),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity("250m".to_string())),
                    ("memory".to_string(), Quantity("512Mi".to_string())),
                ])),
                ..ResourceRequirements::default()
            }),
            security_context: Some(restricted_security_context()),
            ..Container::default()
        };
        Ok(Job {
            metadata: ObjectMeta {
                name: Some(build_job_name(&name, &src.revision)),
                namespace: Some(namespace),
                labels: Some(revision_labels(&name, &src.revision, BUILD_COMPONENT)),
                owner_references: crate::labels::owned_meta(self)?.owner_references,
                ..ObjectMeta::default()
            },
            spec: Some(JobSpec {
                // pip failing once fails the same way again: the condition says why.
                backoff_limit: Some(0),
                active_deadline_seconds: Some(BUILD_DEADLINE_SECONDS),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        restart_policy: Some("Never".to_string()),
                        containers: vec![container],
                        volumes: Some(vec![volume]),
                        automount_service_account_token: Some(false),
                        enable_service_links: Some(false),
                        // The claim's files belong to the runner's group, whoever made
                        // the volume.
                        security_context: Some(PodSecurityContext {
                            run_as_user: Some(RUNNER_UID),
                            run_as_group: Some(RUNNER_UID),
                            fs_group: Some(RUNNER_UID),
                            ..PodSecurityContext::default()
                        }),
                        ..PodSpec::default()
                    }),
                },
                ..JobSpec::default()
            }),
            status: None,
        })
    }
}

/// The environments claim of `namespace`, as the operator creates it when missing
/// (never owned by one function: every served file of the namespace shares it, and the
/// operator leaves an existing claim alone).
pub fn environments_claim(namespace: &str, cfg: &EnvironmentsConfig) -> PersistentVolumeClaim {
    let mut l = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), cfg.claim.clone()),
        (
            "app.kubernetes.io/component".to_string(),
            "environments".to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            "fal-serverless".to_string(),
        ),
    ]);
    l.insert(
        "app.kubernetes.io/managed-by".to_string(),
        crate::labels::MANAGED_BY.to_string(),
    );
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(cfg.claim.clone()),
            namespace: Some(namespace.to_string()),
            labels: Some(l),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![cfg.access_mode.clone()]),
            storage_class_name: cfg.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(cfg.size.clone()),
                )])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    }
}

/// Where a build Job stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildState {
    /// Pending or running.
    Running,
    /// The environment is in place.
    Succeeded,
    /// The Job failed; the Job's own reason (the pip error is in its pod).
    Failed(String),
}

/// The state of a build Job from its status conditions.
pub fn build_state(job: &Job) -> BuildState {
    let status = job.status.clone().unwrap_or_default();
    let cond = |t: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t && c.status == "True")
            .cloned()
    };
    if cond("Complete").is_some() || status.succeeded.unwrap_or(0) > 0 {
        return BuildState::Succeeded;
    }
    if let Some(c) = cond("Failed") {
        let why = [c.reason, c.message]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": ");
        return BuildState::Failed(if why.is_empty() {
            "the build Job failed".to_string()
        } else {
            why
        });
    }
    BuildState::Running
}

/// The end of a failed build's log, from its pod's termination message
/// (`FallbackToLogsOnError`: the last lines the build printed), at most
/// [`FAILURE_LINES`] lines.
pub fn failure_log(pods: &[Pod]) -> Option<String> {
    pods.iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .filter(|c| c.name == BUILD_CONTAINER)
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .find(|m| !m.trim().is_empty())
        .map(|m| {
            let lines: Vec<&str> = m.trim_end().lines().collect();
            lines[lines.len().saturating_sub(FAILURE_LINES)..].join("\n")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::FalFunctionSpec;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
    };

    pub(crate) fn source() -> FunctionSource {
        FunctionSource {
            revision: "39c4e168-414f-49f1-8160-f9f7a958e8cb".into(),
            config_map: "app-39c4e168-414f-49f1-8160-f9f7a958e8cb".into(),
            file: "app.py".into(),
            function: "app".into(),
            requirements: vec!["flask".into()],
            ..FunctionSource::default()
        }
    }

    fn function(src: FunctionSource) -> FalFunction {
        let mut ff = FalFunction::new("app", FalFunctionSpec::with_source(src));
        ff.metadata.namespace = Some("team-a".into());
        ff.metadata.uid = Some("uid-1".into());
        ff
    }

    #[test]
    fn the_hash_is_the_one_local_mode_uses() {
        // Pinned: a changed hash would rebuild every environment of every cluster.
        let idx = IndexSettings::default();
        assert_eq!(source().environment(), "d9e46f5a2489f711fa738ea5");
        assert_eq!(
            environment_hash(None, &["flask".into()], &idx),
            environment_hash(None, &["flask".into()], &IndexSettings::default())
        );
        assert_eq!(
            source().environment(),
            environment_hash(None, &["flask".into()], &idx)
        );
        let mut s = source();
        s.no_index = true;
        assert_ne!(
            s.environment(),
            source().environment(),
            "index settings count"
        );
        let mut s = source();
        s.python_version = Some("3.11".into());
        assert_ne!(s.environment(), source().environment());
        let mut s = source();
        s.revision = "other".into();
        s.file = "other.py".into();
        assert_eq!(
            s.environment(),
            source().environment(),
            "code is not the environment"
        );
        assert_eq!(source().environment().len(), 24);
    }

    #[test]
    fn job_names_fit_a_label_and_differ_per_revision() {
        let long = "a".repeat(63);
        let n = build_job_name(&long, "r1");
        assert!(n.len() <= 63 && crate::labels::is_dns1035(&n), "{n}");
        assert_ne!(build_job_name("app", "r1"), build_job_name("app", "r2"));
        assert_ne!(build_job_name("app", "r1"), build_job_name("app2", "r1"));
        assert!(build_job_name("app", "r1").starts_with("app-build-"));
    }

    #[test]
    fn the_build_job_writes_the_claim_and_is_no_function_pod() {
        let mut src = source();
        src.find_links = vec!["/wheels".into()];
        src.no_index = true;
        src.python_version = Some("3.11".into());
        let mut cfg = OperatorConfig::default();
        cfg.environments.build_env = vec![("PIP_TRUSTED_HOST".into(), "mirror".into())];
        let job = function(src.clone()).build_job(&cfg).unwrap();
        assert_eq!(
            job.metadata.name.as_deref(),
            Some(build_job_name("app", &src.revision).as_str())
        );
        assert_eq!(
            job.metadata.owner_references.as_ref().unwrap()[0].uid,
            "uid-1"
        );
        let labels = job.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[REVISION_LABEL], src.revision);
        assert_eq!(
            labels["app.kubernetes.io/managed-by"], "fal-operator",
            "watched by the controller"
        );
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        let tmpl = &spec.template;
        let pod_labels = tmpl.metadata.as_ref().unwrap().labels.as_ref().unwrap();
        assert!(
            !pod_labels.contains_key(crate::labels::FUNCTION_LABEL),
            "the function's Service must not select the build pod"
        );
        let pod = tmpl.spec.as_ref().unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            pod.security_context.as_ref().unwrap().fs_group,
            Some(RUNNER_UID)
        );
        let c = &pod.containers[0];
        assert_eq!(
            c.image.as_deref(),
            Some(crate::config::DEFAULT_RUNNER_IMAGE)
        );
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let cmd = c.command.clone().unwrap();
        assert_eq!(
            cmd,
            [
                "python3",
                "-m",
                "fal_runner",
                "build",
                "--dest",
                &format!("/fal/envs/{}", src.environment()),
                "--python-version",
                "3.11",
                "--requirement",
                "flask",
                "--find-links",
                "/wheels",
                "--no-index",
            ]
        );
        let m = &c.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            (ENVIRONMENTS_DIR, Some(false))
        );
        let v = &pod.volumes.as_ref().unwrap()[0];
        assert_eq!(
            v.persistent_volume_claim.as_ref().unwrap().claim_name,
            "fal-environments"
        );
        let env: Vec<_> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert!(env.contains(&"PIP_TRUSTED_HOST"), "{env:?}");
        assert!(function(source()).build_job(&cfg).is_ok());
        let image_fn = FalFunction::new("x", FalFunctionSpec::with_image("a:1"));
        let mut image_fn = image_fn;
        image_fn.metadata.namespace = Some("n".into());
        assert!(image_fn.build_job(&cfg).is_err());
    }

    #[test]
    fn the_claim_follows_the_config() {
        let mut cfg = EnvironmentsConfig::default();
        let pvc = environments_claim("team-a", &cfg);
        let spec = pvc.spec.as_ref().unwrap();
        assert_eq!(
            spec.access_modes.as_deref(),
            Some(&["ReadWriteMany".to_string()][..])
        );
        assert_eq!(spec.storage_class_name, None, "the cluster default");
        cfg.storage_class = Some("nfs".into());
        cfg.access_mode = "ReadWriteOnce".into();
        let spec = environments_claim("team-a", &cfg).spec.unwrap();
        assert_eq!(spec.storage_class_name.as_deref(), Some("nfs"));
        assert_eq!(spec.access_modes.unwrap(), ["ReadWriteOnce"]);
    }

    fn job_with(cond: Option<(&str, &str)>) -> Job {
        Job {
            status: Some(JobStatus {
                conditions: cond.map(|(t, m)| {
                    vec![JobCondition {
                        type_: t.into(),
                        status: "True".into(),
                        reason: Some("BackoffLimitExceeded".into()).filter(|_| t == "Failed"),
                        message: Some(m.into()),
                        ..JobCondition::default()
                    }]
                }),
                ..JobStatus::default()
            }),
            ..Job::default()
        }
    }

    #[test]
    fn build_states() {
        assert_eq!(build_state(&job_with(None)), BuildState::Running);
        assert_eq!(
            build_state(&job_with(Some(("Complete", "")))),
            BuildState::Succeeded
        );
        assert_eq!(
            build_state(&job_with(Some((
                "Failed",
                "Job has reached the specified backoff limit"
            )))),
            BuildState::Failed(
                "BackoffLimitExceeded: Job has reached the specified backoff limit".into()
            )
        );
    }

    #[test]
    fn the_failure_log_is_the_end_of_the_build_output() {
        let log = (1..=30)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let pod = Pod {
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: BUILD_CONTAINER.into(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 1,
                            message: Some(format!("{log}\n")),
                            ..ContainerStateTerminated::default()
                        }),
                        ..ContainerState::default()
                    }),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        let tail = failure_log(&[Pod::default(), pod]).unwrap();
        assert!(
            tail.starts_with("line 11\n") && tail.ends_with("line 30"),
            "{tail}"
        );
        assert_eq!(failure_log(&[Pod::default()]), None);
    }
}
