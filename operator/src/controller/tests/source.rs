//! Served files (`spec.source`): the first revision starts its build Job (and the
//! namespace's environments claim) and creates no pods; a finished build rolls the
//! Deployment to the revision, records it and deletes what is past the history; a
//! failed build leaves the serving revision alone and says why once; a redeploy with
//! the same environment rolls at once, no build; a missing source is a spec error.

use super::*;
use crate::crd::FunctionSource;
use crate::environment::{build_job_name, BUILD_CONTAINER, REVISION_LABEL};
use crate::status::{BuildPhase, SourceProgress};

const JOBS: &str = "/apis/batch/v1/namespaces/team-a/jobs";
const MAPS: &str = "/api/v1/namespaces/team-a/configmaps";
const CLAIM: &str = "/api/v1/namespaces/team-a/persistentvolumeclaims/fal-environments";
const CLAIMS: &str = "/api/v1/namespaces/team-a/persistentvolumeclaims";

fn source(revision: &str, requirements: &[&str]) -> FunctionSource {
    FunctionSource {
        revision: revision.into(),
        config_map: format!("app-{revision}"),
        file: "app.py".into(),
        function: "app".into(),
        requirements: requirements.iter().map(|r| r.to_string()).collect(),
        ..FunctionSource::default()
    }
}

fn served(src: FunctionSource) -> FalFunction {
    function(FalFunctionSpec::with_source(src))
}

fn job_path(revision: &str) -> String {
    format!("{JOBS}/{}", build_job_name("app", revision))
}

/// A FalFunction whose status says `old` serves (rolled before, one replica ready).
fn serving(ff: &mut FalFunction, old: &FalFunction) {
    let live: Deployment = serde_json::from_value(live_deployment(old, 1, 1)).unwrap();
    let src = old.spec.source.as_ref().unwrap();
    let rolled = SourceProgress {
        revision: src.revision.clone(),
        environment: src.environment(),
        requirements: src.requirements_text(),
        build: BuildPhase::Built,
        served_now: true,
    };
    let cfg = OperatorConfig::default();
    let mut status = next_status(
        old,
        Ok("XS"),
        Ok(Some(&live)),
        Some(&rolled),
        &cfg,
        &time(EARLIER),
    );
    status.observed_generation = Some(1);
    ff.status = Some(status);
}

fn job_reply(ff: &FalFunction, condition: Option<&str>) -> Value {
    let mut job = serde_json::to_value(ff.build_job(&OperatorConfig::default()).unwrap()).unwrap();
    job["metadata"]["uid"] = json!("job-uid");
    if let Some(c) = condition {
        job["status"] = json!({"conditions": [{"type": c, "status": "True",
            "reason": if c == "Failed" { "BackoffLimitExceeded" } else { "Completed" },
            "message": "Job has reached the specified backoff limit"}]});
    }
    job
}

/// The metadata list of a function's sources or build Jobs at `path`: `(name, revision,
/// controlled by the function)`.
fn listed(path: String, items: Vec<(String, &'static str, bool)>) -> Call {
    let items: Vec<Value> = items
        .into_iter()
        .map(|(name, revision, ours)| {
            let uid = if ours { "3f1c-uid" } else { "someone-else" };
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                   "metadata": {"name": name, "namespace": "team-a",
                                "labels": {REVISION_LABEL: revision},
                                "ownerReferences": [{"apiVersion": "fal.serverless.dev/v1alpha1",
                                    "kind": "FalFunction", "name": "app", "uid": uid,
                                    "controller": true}]}})
        })
        .collect();
    let list = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                      "metadata": {"resourceVersion": "9"}, "items": items});
    Call::new(http::Method::GET, path, move |_| (StatusCode::OK, list))
}

fn deleted() -> (StatusCode, Value) {
    (
        StatusCode::OK,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
    )
}

/// An event of `type_` and `reason` whose note passes `check`.
fn event(type_: &'static str, reason: &'static str, check: fn(&str) -> bool) -> Call {
    Call::new(http::Method::POST, format!("{EVENTS}?"), move |body| {
        assert_eq!(
            (body["type"].as_str(), body["reason"].as_str()),
            (Some(type_), Some(reason)),
            "{body}"
        );
        assert!(check(body["note"].as_str().unwrap_or_default()), "{body}");
        event_reply(body)
    })
}

const SOURCE_SELECTOR: &str =
    "?&labelSelector=fal.serverless.dev%2Ffunction%3Dapp%2Capp.kubernetes.io%2Fcomponent%3Dsource";
const BUILD_SELECTOR: &str =
    "?&labelSelector=fal.serverless.dev%2Ffunction%3Dapp%2Capp.kubernetes.io%2Fcomponent%3Dbuild";

#[tokio::test]
async fn the_first_revision_starts_its_build_and_no_pods() {
    let ff = served(source("r1", &["flask"]));
    let want_job = serde_json::to_value(ff.build_job(&OperatorConfig::default()).unwrap()).unwrap();
    let [get_policy, apply_policy] = policy_created(&ff);
    let calls = vec![
        Call::new(http::Method::GET, job_path("r1"), |_| not_found()),
        Call::new(http::Method::GET, format!("{MAPS}/app-r1"), |_| {
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                                    "metadata": {"name": "app-r1", "namespace": "team-a"}}),
            )
        }),
        Call::new(http::Method::GET, CLAIM, |_| not_found()),
        Call::new(http::Method::POST, format!("{CLAIMS}?"), |body| {
            assert_eq!(body["spec"]["accessModes"], json!(["ReadWriteMany"]));
            assert_eq!(body["spec"]["resources"]["requests"]["storage"], "20Gi");
            assert!(
                body["metadata"].get("ownerReferences").is_none(),
                "shared by the namespace"
            );
            (StatusCode::CREATED, body)
        }),
        Call::new(http::Method::POST, format!("{JOBS}?"), move |body| {
            assert_eq!(body, want_job, "creates exactly the built Job");
            assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "3f1c-uid");
            (StatusCode::CREATED, body)
        }),
        // The Deployment is only read: no pods before the environment exists.
        Call::new(http::Method::GET, DEPLOYMENT, |_| not_found()),
        Call::new(http::Method::GET, SERVICE, |_| not_found()),
        Call::new(
            http::Method::PATCH,
            format!("{SERVICE}{APPLY}"),
            echo_with(|_| {}),
        ),
        get_policy,
        apply_policy,
        Call::new(http::Method::PATCH, format!("{STATUS}{APPLY}"), |body| {
            let status = status_of(&body);
            assert_eq!(status.revision, None);
            let (s, reason, msg) = condition(&status, ConditionType::EnvironmentReady);
            assert_eq!((s.as_str(), reason.as_str()), ("False", "Building"));
            assert!(
                msg.contains(&build_job_name("app", "r1")) && msg.contains("(flask)"),
                "{msg}"
            );
            let (s, reason, _) = condition(&status, ConditionType::Ready);
            assert_eq!((s.as_str(), reason.as_str()), ("False", "Building"));
            status_reply(body)
        }),
        event("Normal", "BuildStarted", |note| {
            note.contains("for revision r1")
        }),
        event("Normal", "Updated", |note| {
            note == "applied changes to Service and NetworkPolicy app"
        }),
    ];
    let (result, _, metrics) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    assert_eq!(result.unwrap(), Action::requeue(RESYNC));
    let writes = |w: &str| metrics.writes.with_label_values(&[w]).get();
    assert_eq!(
        (
            writes("create_build_job"),
            writes("create_environments_claim")
        ),
        (1, 1)
    );
    assert_eq!(writes("apply_deployment"), 0);
}

#[tokio::test]
async fn a_finished_build_rolls_the_pods_and_drops_what_is_past_the_history() {
    let mut ff = served(source("r1", &["flask"]));
    let building = SourceProgress {
        revision: "r1".into(),
        environment: ff.spec.source.as_ref().unwrap().environment(),
        requirements: "flask".into(),
        build: BuildPhase::Building {
            job: build_job_name("app", "r1"),
        },
        served_now: false,
    };
    let status = next_status(
        &ff,
        Ok("XS"),
        Ok(None),
        Some(&building),
        &OperatorConfig::default(),
        &time(EARLIER),
    );
    ff.status = Some(status);
    let job = job_reply(&ff, Some("Complete"));
    let want = serde_json::to_value(desired_deployment(&ff)).unwrap();
    let env = building.environment.clone();
    let service = live_service(&ff);
    let policy = policy_unchanged(&ff);
    let calls = vec![
        Call::new(http::Method::GET, job_path("r1"), move |_| {
            (StatusCode::OK, job)
        }),
        Call::new(http::Method::GET, DEPLOYMENT, |_| not_found()),
        Call::new(
            http::Method::PATCH,
            format!("{DEPLOYMENT}{APPLY}"),
            move |body| {
                assert_eq!(body, want);
                let pod = &body["spec"]["template"]["spec"];
                let app = &pod["containers"][0];
                assert_eq!(app["image"], crate::config::DEFAULT_RUNNER_IMAGE);
                assert_eq!(
                    app["command"],
                    json!([
                        format!("/fal/envs/{env}/bin/python"),
                        "-m",
                        "fal_runner",
                        "serve",
                        "/fal/source/app.py",
                        "app"
                    ])
                );
                let vols = pod["volumes"].as_array().unwrap();
                assert!(
                    vols.iter().any(|v| v["configMap"]["name"] == "app-r1"),
                    "{vols:?}"
                );
                assert!(
                    vols.iter().any(|v| v["persistentVolumeClaim"]["claimName"]
                        == "fal-environments"
                        && v["persistentVolumeClaim"]["readOnly"] == true),
                    "{vols:?}"
                );
                assert_eq!(
                    pod["initContainers"][0]["name"], "fal-sidecar",
                    "the sidecar as for any function"
                );
                echo_with(|b| {
                    b["spec"]["replicas"] = json!(1);
                    b["status"] = json!({"replicas": 1});
                })(body)
            },
        ),
        Call::new(http::Method::GET, SERVICE, move |_| {
            (StatusCode::OK, service)
        }),
        policy,
        Call::new(http::Method::PATCH, format!("{STATUS}{APPLY}"), |body| {
            let status = status_of(&body);
            assert_eq!(status.revision.as_deref(), Some("r1"));
            assert_eq!(status.revisions.len(), 1);
            assert_eq!(status.revisions[0].served_time, time(NOW));
            let (s, reason, _) = condition(&status, ConditionType::EnvironmentReady);
            assert_eq!((s.as_str(), reason.as_str()), ("True", "Built"));
            status_reply(body)
        }),
        // Garbage: r0's source (ours) goes; someone else's ConfigMap stays.
        listed(
            format!("{MAPS}{SOURCE_SELECTOR}"),
            vec![
                ("app-r0".into(), "r0", true),
                ("app-r1".into(), "r1", true),
                ("theirs".into(), "r0", false),
            ],
        ),
        Call::new(http::Method::DELETE, format!("{MAPS}/app-r0?"), |_| {
            deleted()
        }),
        listed(
            format!("{JOBS}{BUILD_SELECTOR}"),
            vec![
                ("old-build".into(), "r0", true),
                (build_job_name("app", "r1"), "r1", true),
            ],
        ),
        Call::new(http::Method::DELETE, format!("{JOBS}/old-build?"), |body| {
            assert_eq!(
                body["propagationPolicy"], "Background",
                "the Job's pod goes too"
            );
            deleted()
        }),
        event("Normal", "BuildSucceeded", |note| {
            note.contains("revision r1")
        }),
        event("Normal", "Created", |note| {
            note == "created Deployment, Service and NetworkPolicy app"
        }),
    ];
    let (result, _, metrics) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    result.unwrap();
    assert_eq!(
        metrics
            .writes
            .with_label_values(&["delete_old_revisions"])
            .get(),
        1
    );
}

/// r1 serves; r2 asks for a package pip cannot find.
fn failed_build() -> (FalFunction, Value, Value) {
    let old = served(source("r1", &["flask"]));
    let deployment = live_deployment(&old, 1, 1);
    let mut ff = served(source("r2", &["flask", "nope"]));
    ff.metadata.generation = Some(2);
    serving(&mut ff, &old);
    let job = job_reply(&ff, Some("Failed"));
    (ff, job, deployment)
}

fn failed_pod() -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [{
        "metadata": {"name": "app-build-x", "namespace": "team-a"},
        "status": {"phase": "Failed", "containerStatuses": [{
            "name": BUILD_CONTAINER, "ready": false, "restartCount": 0, "image": "runner", "imageID": "",
            "state": {"terminated": {"exitCode": 1,
                "message": "$ pip install flask nope\nERROR: No matching distribution found for nope\n"}}}]}}]})
}

#[tokio::test]
async fn a_failed_build_keeps_the_old_revision_and_says_why_once() {
    let (ff, job, deployment) = failed_build();
    // The failed Job and its pod's log are read; the Deployment is read, never applied:
    // the pods stay on r1.
    let reads = |ff: &FalFunction| {
        let (job, deployment, service) = (job.clone(), deployment.clone(), live_service(ff));
        let pods = format!(
            "/api/v1/namespaces/team-a/pods?&labelSelector=batch.kubernetes.io%2Fjob-name%3D{}",
            build_job_name("app", "r2")
        );
        vec![
            Call::new(http::Method::GET, job_path("r2"), move |_| {
                (StatusCode::OK, job)
            }),
            Call::new(http::Method::GET, pods, |_| (StatusCode::OK, failed_pod())),
            Call::new(http::Method::GET, DEPLOYMENT, move |_| {
                (StatusCode::OK, deployment)
            }),
            Call::new(http::Method::GET, SERVICE, move |_| {
                (StatusCode::OK, service)
            }),
            policy_unchanged(ff),
        ]
    };
    let written = Arc::new(Mutex::new(None));
    let keep = written.clone();
    let mut calls = reads(&ff);
    calls.push(Call::new(
        http::Method::PATCH,
        format!("{STATUS}{APPLY}"),
        move |body| {
            let status = status_of(&body);
            assert_eq!(status.revision.as_deref(), Some("r1"), "r1 keeps serving");
            let (s, reason, msg) = condition(&status, ConditionType::EnvironmentReady);
            assert_eq!(
                (s.as_str(), reason.as_str()),
                ("False", "EnvironmentFailed")
            );
            assert!(
                msg.contains("revision r2 failed")
                    && msg.contains("revision r1 keeps serving")
                    && msg.ends_with("No matching distribution found for nope"),
                "{msg}"
            );
            assert!(is_true(&status.conditions, ConditionType::Ready));
            *keep.lock().unwrap() = Some(status);
            status_reply(body)
        },
    ));
    calls.push(event("Warning", "BuildFailed", |note| {
        note.ends_with("found for nope")
    }));
    let (result, _, _) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff.clone())
        .await;
    result.unwrap();

    // The next reconcile finds the same failure: nothing written, no second event.
    let mut ff = ff;
    ff.status = written.lock().unwrap().take();
    let calls = reads(&ff);
    let (result, _, _) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    result.unwrap();
}

#[tokio::test]
async fn a_redeploy_with_the_same_environment_rolls_without_a_build() {
    let old = served(source("r1", &["flask"]));
    let deployment = live_deployment(&old, 1, 1);
    let mut ff = served(source("r2", &["flask"]));
    ff.metadata.generation = Some(2);
    serving(&mut ff, &old);
    let want = serde_json::to_value(desired_deployment(&ff)).unwrap();
    let service = live_service(&ff);
    let policy = policy_unchanged(&ff);
    let calls = vec![
        // No Job look-up: r1 runs on the same environment.
        Call::new(http::Method::GET, DEPLOYMENT, move |_| {
            (StatusCode::OK, deployment)
        }),
        Call::new(
            http::Method::PATCH,
            format!("{DEPLOYMENT}{APPLY}"),
            move |body| {
                assert_eq!(body, want);
                let annotations = &body["spec"]["template"]["metadata"]["annotations"];
                assert_eq!(
                    annotations[REVISION_LABEL], "r2",
                    "a new revision rolls the pods"
                );
                echo_with(|b| b["status"] = json!({"replicas": 1, "readyReplicas": 1}))(body)
            },
        ),
        Call::new(http::Method::GET, SERVICE, move |_| {
            (StatusCode::OK, service)
        }),
        policy,
        Call::new(http::Method::PATCH, format!("{STATUS}{APPLY}"), |body| {
            let status = status_of(&body);
            assert_eq!(status.revision.as_deref(), Some("r2"));
            let revs: Vec<_> = status
                .revisions
                .iter()
                .map(|r| r.revision.as_str())
                .collect();
            assert_eq!(revs, ["r1", "r2"]);
            status_reply(body)
        }),
        listed(
            format!("{MAPS}{SOURCE_SELECTOR}"),
            vec![("app-r1".into(), "r1", true), ("app-r2".into(), "r2", true)],
        ),
        listed(format!("{JOBS}{BUILD_SELECTOR}"), vec![]),
        event("Normal", "Updated", |note| {
            note == "applied changes to Deployment app"
        }),
    ];
    let (result, seen, _) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    result.unwrap();
    assert!(!seen.iter().any(|s| s.contains("/jobs/")), "{seen:?}");
}

#[tokio::test]
async fn a_missing_source_is_a_spec_error() {
    let ff = served(source("r1", &[]));
    let calls = vec![
        Call::new(http::Method::GET, job_path("r1"), |_| not_found()),
        Call::new(http::Method::GET, format!("{MAPS}/app-r1"), |_| not_found()),
        Call::new(http::Method::PATCH, format!("{STATUS}{APPLY}"), |body| {
            let status = status_of(&body);
            let (s, reason, msg) = condition(&status, ConditionType::Ready);
            assert_eq!((s.as_str(), reason.as_str()), ("False", "InvalidSpec"));
            assert!(
                msg.starts_with("spec.source.configMap: ConfigMap app-r1"),
                "{msg}"
            );
            status_reply(body)
        }),
        event("Warning", "InvalidSpec", |note| note.contains("app-r1")),
    ];
    let (result, _, _) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    assert!(result.unwrap_err().is_spec_error());
}
