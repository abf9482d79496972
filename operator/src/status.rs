//! The status a FalFunction should have, from what the reconcile observed. Pure.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::conditions::{set_condition, ConditionState, ConditionType, Reason};
use crate::config::OperatorConfig;
use crate::crd::{FalFunction, FalFunctionStatus};
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
/// returned it after apply, or the error that stopped the objects from being built.
/// On an error, replica counts are carried over from the previous status: the objects
/// were left as they were.
pub fn next_status(
    ff: &FalFunction,
    machine: Result<&str, &Error>,
    workload: Result<&Deployment, &Error>,
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
        conditions: previous.conditions.clone(),
    };
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
        Ok(deployment) => {
            let observed = deployment.status.clone().unwrap_or_default();
            status.replicas = observed.replicas.unwrap_or(0);
            status.ready_replicas = observed.ready_replicas.unwrap_or(0);
            ready_condition(deployment)
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
            Ok(&deployment(1, 1, 1)),
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
        let s = next_status(&ff(), Ok("XS"), Ok(&deployment(1, 1, 0)), &cfg, &t(10));
        let ready = find(&s.conditions, ConditionType::Ready).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "Starting")
        );

        let s = next_status(&ff(), Ok("XS"), Ok(&deployment(0, 0, 0)), &cfg, &t(10));
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
        let s = next_status(&ff(), Ok("XS"), Ok(&d), &OperatorConfig::default(), &t(10));
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
        let s = next_status(&f, Err(&err), Err(&err), &OperatorConfig::default(), &t(10));
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
        let first = next_status(&f, Ok("XS"), Ok(&deployment(1, 1, 1)), &cfg, &t(10));
        f.status = Some(first.clone());
        let second = next_status(&f, Ok("XS"), Ok(&deployment(1, 1, 1)), &cfg, &t(99));
        assert_eq!(first, second, "no status write when nothing changed");
    }
}
