//! The status a FalFunction should have, from what the reconcile observed. Pure.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::conditions::{set_condition, ConditionState, ConditionType, Reason};
use crate::config::OperatorConfig;
use crate::crd::{FalFunction, FalFunctionStatus, ServedRevision};
use crate::service::SERVICE_QUEUE_PORT;
use crate::Error;

/// Direct-call URL and queue base URL of `namespace/name`.
///
/// Behind the gateway (`--gateway-domain fal.example.com`): `https://fal.example.com/ns/name`
/// and `https://queue.fal.example.com/ns/name`, the fal.run / queue.fal.run layout.
/// Without a domain: the gateway's in-cluster Service (`--gateway-url`,
/// `--gateway-queue-url`), else the function's own Service.
pub fn urls(namespace: &str, name: &str, cfg: &OperatorConfig) -> (String, String) {
    if let (None, Some((run, queue))) = (
        cfg.gateway_domain.as_deref().filter(|d| !d.is_empty()),
        &cfg.gateway_urls,
    ) {
        return (
            format!("{}/{namespace}/{name}", run.trim_end_matches('/')),
            format!("{}/{namespace}/{name}", queue.trim_end_matches('/')),
        );
    }
    match cfg.gateway_domain.as_deref().filter(|d| !d.is_empty()) {
        Some(domain) => {
            let (scheme, host) = match domain.split_once("://") {
                Some((scheme, host)) => (scheme, host.trim_end_matches('/')),
                None => ("https", domain.trim_end_matches('/')),
            };
            (
                format!("{scheme}://{host}/{namespace}/{name}"),
                format!("{scheme}://queue.{host}/{namespace}/{name}"),
            )
        }
        None => {
            let host = format!("{name}.{namespace}.svc.cluster.local");
            (
                format!("http://{host}"),
                format!("http://{host}:{SERVICE_QUEUE_PORT}"),
            )
        }
    }
}

/// The seed's per-app URL, `SCHEME://NAME.NAMESPACE.DOMAIN`, when the gateway has a
/// public domain (its `Host: {name}.{namespace}.{domain}` routing).
pub fn app_url(namespace: &str, name: &str, cfg: &OperatorConfig) -> Option<String> {
    let domain = cfg.gateway_domain.as_deref().filter(|d| !d.is_empty())?;
    let (scheme, host) = match domain.split_once("://") {
        Some((scheme, host)) => (scheme, host.trim_end_matches('/')),
        None => ("https", domain.trim_end_matches('/')),
    };
    Some(format!("{scheme}://{name}.{namespace}.{host}"))
}

/// Revisions kept in `status.revisions`; their sources and build Jobs are kept too.
pub const REVISION_HISTORY: usize = 10;

/// What the reconcile of a served file (`spec.source`) learned of its environment.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceProgress {
    /// `spec.source.revision`.
    pub revision: String,
    /// Hash of its environment.
    pub environment: String,
    /// `spec.source.requirements`, for people.
    pub requirements: String,
    /// Where its build stands.
    pub build: BuildPhase,
    /// The Deployment was rolled to `revision` in this reconcile.
    pub served_now: bool,
}

/// Where the build of the newest revision's environment stands.
#[derive(Clone, Debug, PartialEq)]
pub enum BuildPhase {
    /// Built (now or before: the environment of the serving revision).
    Built,
    /// The build Job runs.
    Building { job: String },
    /// The build Job failed: the end of its log.
    Failed { job: String, message: String },
}

impl SourceProgress {
    /// Whether the pods may roll to the newest revision.
    pub fn ready(&self) -> bool {
        self.build == BuildPhase::Built
    }

    fn serving(previous: &FalFunctionStatus) -> String {
        match &previous.revision {
            Some(r) => format!("revision {r} keeps serving"),
            None => "no earlier revision serves".to_string(),
        }
    }

    /// The EnvironmentReady condition.
    fn condition(&self, previous: &FalFunctionStatus) -> ConditionState {
        let (env, reqs, rev) = (&self.environment, &self.requirements, &self.revision);
        match &self.build {
            BuildPhase::Built => ConditionState::ok(
                ConditionType::EnvironmentReady,
                Reason::Built,
                format!("environment {env} ({reqs}) is built"),
            ),
            BuildPhase::Building { job } => ConditionState::failed(
                ConditionType::EnvironmentReady,
                Reason::Building,
                format!(
                    "building environment {env} ({reqs}) for revision {rev}: job {job}; {}",
                    Self::serving(previous)
                ),
            ),
            BuildPhase::Failed { job, message } => ConditionState::failed(
                ConditionType::EnvironmentReady,
                Reason::EnvironmentFailed,
                format!(
                    "the environment build of revision {rev} failed (job {job}; {reqs}); {}:\n{message}",
                    Self::serving(previous)
                ),
            ),
        }
    }
}

fn ready_condition(deployment: &Deployment) -> ConditionState {
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    let ready = status.ready_replicas.unwrap_or(0);
    let stuck = status.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    if let Some(stuck) = stuck {
        return ConditionState::failed(
            ConditionType::Ready,
            Reason::ProgressDeadlineExceeded,
            stuck
                .message
                .clone()
                .unwrap_or_else(|| "the Deployment rollout is stuck".to_string()),
        );
    }
    if wanted == 0 {
        ConditionState::ok(
            ConditionType::Ready,
            Reason::ScaledToZero,
            "scaled to zero; the next request wakes it",
        )
    } else if ready >= 1 {
        ConditionState::ok(
            ConditionType::Ready,
            Reason::Available,
            format!("{ready}/{wanted} replicas ready"),
        )
    } else {
        ConditionState::failed(
            ConditionType::Ready,
            Reason::Starting,
            format!("waiting for a replica to become ready (0/{wanted})"),
        )
    }
}

fn spec_error_reason(err: &Error) -> Reason {
    match err {
        Error::UnknownMachineType { .. } => Reason::UnknownMachineType,
        _ => Reason::InvalidSpec,
    }
}

/// The next status of `ff`.
///
/// `machine` is the machine type resolution; `workload` the Deployment as the apiserver
/// returned it after apply (none while a served file's first environment builds), or
/// the error that stopped the objects from being built. On an error, replica counts are
/// carried over from the previous status: the objects were left as they were. `source`:
/// a served file's build and rollout, for its revision, history and EnvironmentReady.
pub fn next_status(
    ff: &FalFunction,
    machine: Result<&str, &Error>,
    workload: Result<Option<&Deployment>, &Error>,
    source: Option<&SourceProgress>,
    cfg: &OperatorConfig,
    now: &Time,
) -> FalFunctionStatus {
    let previous = ff.status.clone().unwrap_or_default();
    let generation = ff.metadata.generation;
    let namespace = ff.namespace().unwrap_or_default();
    let (url, queue_url) = urls(&namespace, &ff.name_any(), cfg);
    let mut status = FalFunctionStatus {
        observed_generation: generation,
        replicas: previous.replicas,
        ready_replicas: previous.ready_replicas,
        desired_replicas: previous.desired_replicas,
        last_request_time: previous.last_request_time.clone(),
        machine_type: previous.machine_type.clone(),
        url: Some(url),
        queue_url: Some(queue_url),
        app_url: app_url(&namespace, &ff.name_any(), cfg),
        revision: previous.revision.clone(),
        revisions: previous.revisions.clone(),
        conditions: previous.conditions.clone(),
    };
    match (source, &ff.spec.source) {
        (Some(progress), _) => {
            if progress.served_now {
                if status.revisions.last().map(|r| &r.revision) != Some(&progress.revision) {
                    status.revisions.push(ServedRevision {
                        revision: progress.revision.clone(),
                        environment: progress.environment.clone(),
                        served_time: now.clone(),
                    });
                }
                let excess = status.revisions.len().saturating_sub(REVISION_HISTORY);
                status.revisions.drain(..excess);
                status.revision = Some(progress.revision.clone());
            }
            let env = progress.condition(&previous);
            set_condition(&mut status.conditions, env, generation, now);
        }
        // A served file whose build was not looked at (a spec error came first).
        (None, Some(_)) => {}
        (None, None) => {
            status.revision = None;
            status.revisions.clear();
            status
                .conditions
                .retain(|c| c.type_ != ConditionType::EnvironmentReady.as_str());
        }
    }
    let machine_condition = match machine {
        Ok(name) => {
            status.machine_type = Some(name.to_string());
            ConditionState::ok(
                ConditionType::MachineTypeResolved,
                Reason::Resolved,
                format!("machine type {name} found in the catalog"),
            )
        }
        Err(err) => ConditionState::failed(
            ConditionType::MachineTypeResolved,
            spec_error_reason(err),
            err.to_string(),
        ),
    };
    set_condition(&mut status.conditions, machine_condition, generation, now);
    let ready_condition = match workload {
        Ok(Some(deployment)) => {
            let observed = deployment.status.clone().unwrap_or_default();
            status.replicas = observed.replicas.unwrap_or(0);
            status.ready_replicas = observed.ready_replicas.unwrap_or(0);
            ready_condition(deployment)
        }
        // A served file's first revision: no pods until its environment is built.
        Ok(None) => {
            status.replicas = 0;
            status.ready_replicas = 0;
            match source.map(|p| (p, p.condition(&previous))) {
                Some((p, env)) if matches!(p.build, BuildPhase::Failed { .. }) => {
                    ConditionState::failed(
                        ConditionType::Ready,
                        Reason::EnvironmentFailed,
                        env.message,
                    )
                }
                Some((p, _)) => ConditionState::failed(
                    ConditionType::Ready,
                    Reason::Building,
                    format!(
                        "waiting for the environment build of revision {}",
                        p.revision
                    ),
                ),
                None => ConditionState::failed(
                    ConditionType::Ready,
                    Reason::Starting,
                    "the Deployment does not exist yet",
                ),
            }
        }
        Err(err) => ConditionState::failed(
            ConditionType::Ready,
            spec_error_reason(err),
            err.to_string(),
        ),
    };
    set_condition(&mut status.conditions, ready_condition, generation, now);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::{find, is_true};
    use crate::crd::FalFunctionSpec;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn ff() -> FalFunction {
        let mut ff = FalFunction::new("app", FalFunctionSpec::with_image("a:1"));
        ff.metadata.namespace = Some("ns".into());
        ff.metadata.generation = Some(3);
        ff
    }

    fn deployment(wanted: i32, replicas: i32, ready: i32) -> Deployment {
        Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(wanted),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                replicas: Some(replicas),
                ready_replicas: Some(ready),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        }
    }

    #[test]
    fn urls_follow_the_gateway_domain() {
        let mut cfg = OperatorConfig::default();
        assert_eq!(
            urls("ns", "app", &cfg),
            (
                "http://app.ns.svc.cluster.local".to_string(),
                "http://app.ns.svc.cluster.local:8081".to_string()
            )
        );
        cfg.gateway_urls = Some((
            "http://gw.fal-system.svc.cluster.local/".into(),
            "http://gw.fal-system.svc.cluster.local:8081".into(),
        ));
        assert_eq!(
            urls("ns", "app", &cfg),
            (
                "http://gw.fal-system.svc.cluster.local/ns/app".to_string(),
                "http://gw.fal-system.svc.cluster.local:8081/ns/app".to_string()
            )
        );
        cfg.gateway_domain = Some("fal.example.com".into());
        assert_eq!(
            urls("ns", "app", &cfg),
            (
                "https://fal.example.com/ns/app".to_string(),
                "https://queue.fal.example.com/ns/app".to_string()
            )
        );
        cfg.gateway_domain = Some("http://localtest.me:8080/".into());
        assert_eq!(urls("ns", "app", &cfg).0, "http://localtest.me:8080/ns/app");
    }

    #[test]
    fn ready_when_a_replica_is_ready() {
        let s = next_status(
            &ff(),
            Ok("XS"),
            Ok(Some(&deployment(1, 1, 1))),
            None,
            &OperatorConfig::default(),
            &t(10),
        );
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!((s.replicas, s.ready_replicas), (1, 1));
        assert_eq!(s.machine_type.as_deref(), Some("XS"));
        assert!(is_true(&s.conditions, ConditionType::Ready));
        assert!(is_true(&s.conditions, ConditionType::MachineTypeResolved));
        let ready = find(&s.conditions, ConditionType::Ready).unwrap();
        assert_eq!(ready.reason, "Available");
        assert_eq!(ready.message, "1/1 replicas ready");
        assert_eq!(ready.observed_generation, Some(3));
        assert_eq!(s.url.as_deref(), Some("http://app.ns.svc.cluster.local"));
    }

    #[test]
    fn not_ready_while_starting_and_ready_at_zero() {
        let cfg = OperatorConfig::default();
        let s = next_status(
            &ff(),
            Ok("XS"),
            Ok(Some(&deployment(1, 1, 0))),
            None,
            &cfg,
            &t(10),
        );
        let ready = find(&s.conditions, ConditionType::Ready).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Starting")
        );

        let s = next_status(
            &ff(),
            Ok("XS"),
            Ok(Some(&deployment(0, 0, 0))),
            None,
            &cfg,
            &t(10),
        );
        let ready = find(&s.conditions, ConditionType::Ready).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "ScaledToZero")
        );
    }

    #[test]
    fn stuck_rollout_is_not_ready() {
        let mut d = deployment(1, 1, 0);
        d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some("ReplicaSet \"app-1\" has timed out progressing.".into()),
            ..DeploymentCondition::default()
        }]);
        let s = next_status(
            &ff(),
            Ok("XS"),
            Ok(Some(&d)),
            None,
            &OperatorConfig::default(),
            &t(10),
        );
        let ready = find(&s.conditions, ConditionType::Ready).unwrap();
        assert_eq!(ready.reason, "ProgressDeadlineExceeded");
        assert!(ready.message.contains("timed out"));
    }

    #[test]
    fn unknown_machine_type_keeps_counts_and_says_why() {
        let mut f = ff();
        f.status = Some(FalFunctionStatus {
            replicas: 2,
            ready_replicas: 2,
            machine_type: Some("XS".into()),
            ..FalFunctionStatus::default()
        });
        let err = Error::UnknownMachineType {
            name: "GPU-Z".into(),
            known: "XS".into(),
        };
        let s = next_status(
            &f,
            Err(&err),
            Err(&err),
            None,
            &OperatorConfig::default(),
            &t(10),
        );
        assert_eq!((s.replicas, s.ready_replicas), (2, 2));
        assert_eq!(
            s.machine_type.as_deref(),
            Some("XS"),
            "still running the old type"
        );
        for type_ in [ConditionType::Ready, ConditionType::MachineTypeResolved] {
            let c = find(&s.conditions, type_).unwrap();
            assert_eq!(c.status, "False");
            assert_eq!(c.reason, "UnknownMachineType");
            assert!(c.message.contains("GPU-Z"), "{}", c.message);
        }
    }

    #[test]
    fn invalid_spec_with_resolved_machine() {
        let err = Error::invalid("metadata.name", "too long");
        let s = next_status(
            &ff(),
            Ok("GPU-T4"),
            Err(&err),
            None,
            &OperatorConfig::default(),
            &t(10),
        );
        assert!(is_true(&s.conditions, ConditionType::MachineTypeResolved));
        let ready = find(&s.conditions, ConditionType::Ready).unwrap();
        assert_eq!(ready.reason, "InvalidSpec");
        assert_eq!(ready.message, "metadata.name: too long");
    }

    #[test]
    fn unchanged_inputs_give_an_identical_status() {
        let cfg = OperatorConfig::default();
        let mut f = ff();
        let first = next_status(
            &f,
            Ok("XS"),
            Ok(Some(&deployment(1, 1, 1))),
            None,
            &cfg,
            &t(10),
        );
        f.status = Some(first.clone());
        let second = next_status(
            &f,
            Ok("XS"),
            Ok(Some(&deployment(1, 1, 1))),
            None,
            &cfg,
            &t(99),
        );
        assert_eq!(first, second, "no status write when nothing changed");
    }

    fn progress(revision: &str, build: BuildPhase, served_now: bool) -> SourceProgress {
        SourceProgress {
            revision: revision.into(),
            environment: "e1".into(),
            requirements: "flask".into(),
            build,
            served_now,
        }
    }

    #[test]
    fn a_served_file_builds_then_serves_and_keeps_a_short_history() {
        let cfg = OperatorConfig::default();
        let mut f = ff();
        // First revision, building: no Deployment yet.
        let building = BuildPhase::Building {
            job: "app-build-1".into(),
        };
        let s = next_status(
            &f,
            Ok("XS"),
            Ok(None),
            Some(&progress("r1", building, false)),
            &cfg,
            &t(10),
        );
        assert_eq!(s.revision, None);
        let env = find(&s.conditions, ConditionType::EnvironmentReady).unwrap();
        assert_eq!(
            (env.status.as_str(), env.reason.as_str()),
            ("False", "Building")
        );
        assert!(
            env.message.contains("job app-build-1") && env.message.contains("no earlier revision"),
            "{}",
            env.message
        );
        let ready = find(&s.conditions, ConditionType::Ready).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            (
                "Building",
                "waiting for the environment build of revision r1"
            )
        );
        f.status = Some(s);
        // Built and rolled.
        let s = next_status(
            &f,
            Ok("XS"),
            Ok(Some(&deployment(1, 1, 0))),
            Some(&progress("r1", BuildPhase::Built, true)),
            &cfg,
            &t(20),
        );
        assert_eq!(s.revision.as_deref(), Some("r1"));
        assert_eq!(s.revisions.len(), 1);
        assert_eq!(
            (
                s.revisions[0].environment.as_str(),
                &s.revisions[0].served_time
            ),
            ("e1", &t(20))
        );
        assert!(is_true(&s.conditions, ConditionType::EnvironmentReady));
        f.status = Some(s);
        // A failed build of r2: r1 keeps serving, the condition carries pip's words.
        let failed = BuildPhase::Failed {
            job: "app-build-2".into(),
            message: "ERROR: No matching distribution found for nope".into(),
        };
        let s = next_status(
            &f,
            Ok("XS"),
            Ok(Some(&deployment(1, 1, 1))),
            Some(&progress("r2", failed, false)),
            &cfg,
            &t(30),
        );
        assert_eq!(s.revision.as_deref(), Some("r1"));
        let env = find(&s.conditions, ConditionType::EnvironmentReady).unwrap();
        assert_eq!(env.reason, "EnvironmentFailed");
        assert!(
            env.message.contains("revision r2 failed")
                && env.message.contains("revision r1 keeps serving")
                && env.message.ends_with("found for nope"),
            "{}",
            env.message
        );
        assert!(
            is_true(&s.conditions, ConditionType::Ready),
            "the old revision serves"
        );
        // Eleven more revisions: ten kept, oldest first.
        for i in 2..=12 {
            f.status = Some(next_status(
                &f,
                Ok("XS"),
                Ok(Some(&deployment(1, 1, 1))),
                Some(&progress(&format!("r{i}"), BuildPhase::Built, true)),
                &cfg,
                &t(40 + i),
            ));
        }
        let s = f.status.clone().unwrap();
        assert_eq!(s.revisions.len(), REVISION_HISTORY);
        assert_eq!(
            (s.revisions[0].revision.as_str(), s.revision.as_deref()),
            ("r3", Some("r12"))
        );
        // The same revision reconciled again adds nothing.
        let again = next_status(
            &f,
            Ok("XS"),
            Ok(Some(&deployment(1, 1, 1))),
            Some(&progress("r12", BuildPhase::Built, true)),
            &cfg,
            &t(99),
        );
        assert_eq!(again.revisions, s.revisions);
        // Back to an image: no revision, no environment condition.
        let image = next_status(
            &f,
            Ok("XS"),
            Ok(Some(&deployment(1, 1, 1))),
            None,
            &cfg,
            &t(100),
        );
        assert!(image.revision.is_none() && image.revisions.is_empty());
        assert!(find(&image.conditions, ConditionType::EnvironmentReady).is_none());
    }

    #[test]
    fn a_failed_first_build_is_not_ready_with_the_reason() {
        let failed = BuildPhase::Failed {
            job: "j".into(),
            message: "pip said no".into(),
        };
        let s = next_status(
            &ff(),
            Ok("XS"),
            Ok(None),
            Some(&progress("r1", failed, false)),
            &OperatorConfig::default(),
            &t(1),
        );
        let ready = find(&s.conditions, ConditionType::Ready).unwrap();
        assert_eq!(ready.reason, "EnvironmentFailed");
        assert!(ready.message.ends_with("pip said no"), "{}", ready.message);
    }

    #[test]
    fn the_app_url_needs_a_domain() {
        let mut cfg = OperatorConfig::default();
        assert_eq!(app_url("ns", "app", &cfg), None);
        cfg.gateway_domain = Some("fal.example.com".into());
        assert_eq!(
            app_url("ns", "app", &cfg).as_deref(),
            Some("https://app.ns.fal.example.com")
        );
        cfg.gateway_domain = Some("http://localtest.me:8080/".into());
        assert_eq!(
            app_url("ns", "app", &cfg).as_deref(),
            Some("http://app.ns.localtest.me:8080")
        );
    }
}
