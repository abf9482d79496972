//! Reconcile scenarios against a scripted apiserver ([`crate::mock_api`]): each
//! scenario lists every API call it expects (method, path and query, body) and answers
//! it like the apiserver would. A request beyond the script, or a missing one, fails.

use super::*;
use crate::conditions::ConditionType;
use crate::config::NetworkPolicyConfig;
use crate::crd::FalFunctionSpec;
use crate::mock_api::{finished, mock_client, not_found, Call};
use http::{Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::DeploymentStatus;
use kube::client::Body;
use prometheus::Registry;
use serde_json::Value;
use tower_test::mock;

const NOW: i64 = 1_700_000_000;
const EARLIER: i64 = 1_600_000_000;

fn fixed_now() -> Timestamp {
    Timestamp::from_second(NOW).unwrap()
}

fn time(secs: i64) -> Time {
    Time(Timestamp::from_second(secs).unwrap())
}

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/team-a/deployments/app";
const SERVICE: &str = "/api/v1/namespaces/team-a/services/app";
const POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/app";
const STATUS: &str = "/apis/fal.serverless.dev/v1alpha1/namespaces/team-a/falfunctions/app/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team-a/events";
const APPLY: &str = "?&force=true&fieldManager=fal-operator";

struct Harness {
    ctx: Arc<Context>,
    server: tokio::task::JoinHandle<Vec<String>>,
}

/// Starts a mock apiserver that plays `calls` in order.
fn harness(catalog: MachineCatalog, calls: Vec<Call>) -> Harness {
    harness_with(catalog, OperatorConfig::default(), calls)
}

fn harness_with(catalog: MachineCatalog, config: OperatorConfig, calls: Vec<Call>) -> Harness {
    let (client, server) = mock_client(calls);
    let metrics = Metrics::new(&Registry::new()).unwrap();
    let ctx = Arc::new(Context::with_clock(
        client,
        catalog,
        config,
        metrics,
        Some("test".into()),
        fixed_now,
    ));
    Harness { ctx, server }
}

impl Harness {
    /// Runs one reconcile, then checks that the scripted calls were all made.
    async fn reconcile(self, ff: FalFunction) -> (Result<Action>, Vec<String>, Metrics) {
        let result = reconcile(Arc::new(ff), self.ctx.clone()).await;
        let metrics = self.ctx.metrics.clone();
        // Drop every client clone so the mock apiserver sees the end of the script.
        drop(self.ctx);
        let seen = finished(self.server).await;
        (result, seen, metrics)
    }
}

fn function(spec: FalFunctionSpec) -> FalFunction {
    let mut ff = FalFunction::new("app", spec);
    ff.metadata.namespace = Some("team-a".into());
    ff.metadata.uid = Some("3f1c-uid".into());
    ff.metadata.generation = Some(1);
    ff.metadata.resource_version = Some("100".into());
    ff
}

fn desired_deployment(ff: &FalFunction) -> Deployment {
    ff.deployment(&MachineCatalog::builtin(), &OperatorConfig::default())
        .unwrap()
}

/// What the apiserver stores for an applied Deployment: defaults added, replicas set.
fn live_deployment(ff: &FalFunction, replicas: i32, ready: i32) -> Value {
    let mut d = desired_deployment(ff);
    d.metadata.uid = Some("dep-uid".into());
    d.metadata.resource_version = Some("7".into());
    let spec = d.spec.as_mut().unwrap();
    spec.replicas = Some(replicas);
    let pod = spec.template.spec.as_mut().unwrap();
    pod.restart_policy = Some("Always".into());
    pod.dns_policy = Some("ClusterFirst".into());
    pod.containers[0].image_pull_policy = Some("IfNotPresent".into());
    pod.containers[0].termination_message_path = Some("/dev/termination-log".into());
    d.status = Some(DeploymentStatus {
        replicas: Some(replicas),
        ready_replicas: Some(ready),
        observed_generation: Some(1),
        ..DeploymentStatus::default()
    });
    serde_json::to_value(d).unwrap()
}

fn live_service(ff: &FalFunction) -> Value {
    let mut v = serde_json::to_value(ff.service().unwrap()).unwrap();
    v["spec"]["clusterIP"] = json!("10.96.0.15");
    v["spec"]["sessionAffinity"] = json!("None");
    v["metadata"]["uid"] = json!("svc-uid");
    v
}

fn desired_policy(ff: &FalFunction) -> Value {
    let np = ff.network_policy(&NetworkPolicyConfig::default()).unwrap();
    serde_json::to_value(np).unwrap()
}

/// What the apiserver stores for an applied NetworkPolicy.
fn live_policy(ff: &FalFunction) -> Value {
    let mut v = desired_policy(ff);
    v["metadata"]["uid"] = json!("np-uid");
    v["metadata"]["resourceVersion"] = json!("8");
    v["metadata"]["generation"] = json!(1);
    v
}

/// The policy is there as built: one read.
fn policy_unchanged(ff: &FalFunction) -> Call {
    let live = live_policy(ff);
    Call::new(http::Method::GET, POLICY, move |_| (StatusCode::OK, live))
}

/// No policy yet: a read, then exactly the built one applied.
fn policy_created(ff: &FalFunction) -> [Call; 2] {
    let want = desired_policy(ff);
    [
        Call::new(http::Method::GET, POLICY, |_| not_found()),
        Call::new(
            http::Method::PATCH,
            format!("{POLICY}{APPLY}"),
            move |body| {
                assert_eq!(body, want, "applies exactly the built NetworkPolicy");
                assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "3f1c-uid");
                echo_with(|b| b["metadata"]["uid"] = json!("np-uid"))(body)
            },
        ),
    ]
}

/// The apiserver answers an apply with the applied object plus server-set fields.
fn echo_with(
    extra: impl FnOnce(&mut Value) + Send + 'static,
) -> impl FnOnce(Value) -> (StatusCode, Value) + Send {
    move |mut body| {
        extra(&mut body);
        (StatusCode::OK, body)
    }
}

fn status_of(body: &Value) -> FalFunctionStatus {
    assert_eq!(body["apiVersion"], "fal.serverless.dev/v1alpha1");
    assert_eq!(body["kind"], "FalFunction");
    serde_json::from_value(body["status"].clone()).unwrap()
}

fn condition(status: &FalFunctionStatus, t: ConditionType) -> (String, String, String) {
    let c = find(&status.conditions, t).unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

/// The apiserver answers a status apply with the whole object.
fn status_reply(mut body: Value) -> (StatusCode, Value) {
    body["metadata"] = json!({"name": "app", "namespace": "team-a", "uid": "3f1c-uid"});
    body["spec"] = json!({"image": "reg/app:1"});
    (StatusCode::OK, body)
}

fn event_reply(body: Value) -> (StatusCode, Value) {
    (StatusCode::CREATED, body)
}

#[tokio::test]
async fn create_path_applies_objects_then_status_then_event() {
    let ff = function(FalFunctionSpec::with_image("reg/app:1"));
    let want_deployment = serde_json::to_value(desired_deployment(&ff)).unwrap();
    let want_service = serde_json::to_value(ff.service().unwrap()).unwrap();
    let [get_policy, apply_policy] = policy_created(&ff);
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, |_| not_found()),
        Call::new(
            http::Method::PATCH,
            format!("{DEPLOYMENT}{APPLY}"),
            move |body| {
                assert_eq!(
                    body, want_deployment,
                    "applies exactly the built Deployment"
                );
                assert!(
                    body["spec"].get("replicas").is_none(),
                    "never applies replicas"
                );
                assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "3f1c-uid");
                echo_with(|b| {
                    b["spec"]["replicas"] = json!(1); // apiserver default
                    b["status"] = json!({"replicas": 0});
                })(body)
            },
        ),
        Call::new(http::Method::GET, SERVICE, |_| not_found()),
        Call::new(
            http::Method::PATCH,
            format!("{SERVICE}{APPLY}"),
            move |body| {
                assert_eq!(body, want_service);
                echo_with(|b| b["spec"]["clusterIP"] = json!("10.96.0.15"))(body)
            },
        ),
        get_policy,
        apply_policy,
        Call::new(http::Method::PATCH, format!("{STATUS}{APPLY}"), |body| {
            let status = status_of(&body);
            assert_eq!(status.observed_generation, Some(1));
            assert_eq!((status.replicas, status.ready_replicas), (0, 0));
            assert_eq!(status.machine_type.as_deref(), Some("XS"));
            assert_eq!(
                status.url.as_deref(),
                Some("http://app.team-a.svc.cluster.local")
            );
            assert_eq!(
                status.queue_url.as_deref(),
                Some("http://app.team-a.svc.cluster.local:8081")
            );
            let (s, reason, msg) = condition(&status, ConditionType::Ready);
            assert_eq!((s.as_str(), reason.as_str()), ("False", "Starting"));
            assert_eq!(msg, "waiting for a replica to become ready (0/1)");
            let (s, reason, _) = condition(&status, ConditionType::MachineTypeResolved);
            assert_eq!((s.as_str(), reason.as_str()), ("True", "Resolved"));
            for c in &status.conditions {
                assert_eq!(c.last_transition_time, time(NOW));
                assert_eq!(c.observed_generation, Some(1));
            }
            status_reply(body)
        }),
        Call::new(http::Method::POST, format!("{EVENTS}?"), |body| {
            assert_eq!(body["type"], "Normal");
            assert_eq!(body["reason"], "Created");
            assert_eq!(
                body["note"],
                "created Deployment, Service and NetworkPolicy app"
            );
            assert_eq!(body["regarding"]["kind"], "FalFunction");
            assert_eq!(body["regarding"]["name"], "app");
            assert_eq!(body["reportingController"], "fal-operator");
            event_reply(body)
        }),
    ];
    let (result, seen, metrics) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    assert_eq!(result.unwrap(), Action::requeue(RESYNC));
    assert_eq!(seen.len(), 8);
    let writes = |w: &str| metrics.writes.with_label_values(&[w]).get();
    assert_eq!(writes("apply_deployment"), 1);
    assert_eq!(writes("apply_service"), 1);
    assert_eq!(writes("apply_network_policy"), 1);
    assert_eq!(writes("status"), 1);
    assert_eq!(writes("scale"), 0, "the default of 1 is already right");
}

#[tokio::test]
async fn create_with_min_replicas_sets_start_replicas_through_scale_once() {
    let mut spec = FalFunctionSpec::with_image("reg/app:1");
    spec.min_replicas = 2;
    spec.max_replicas = 4;
    let ff = function(spec);
    let [get_policy, apply_policy] = policy_created(&ff);
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, |_| not_found()),
        Call::new(
            http::Method::PATCH,
            format!("{DEPLOYMENT}{APPLY}"),
            |body| {
                assert!(body["spec"].get("replicas").is_none());
                echo_with(|b| b["spec"]["replicas"] = json!(1))(body)
            },
        ),
        Call::new(
            http::Method::PATCH,
            format!("{DEPLOYMENT}/scale?&fieldManager=fal-operator-bootstrap"),
            |body| {
                assert_eq!(body, json!({"spec": {"replicas": 2}}));
                (
                    StatusCode::OK,
                    json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                           "metadata": {"name": "app", "namespace": "team-a"},
                           "spec": {"replicas": 2}, "status": {"replicas": 1}}),
                )
            },
        ),
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
            let (_, _, msg) = condition(&status, ConditionType::Ready);
            assert_eq!(msg, "waiting for a replica to become ready (0/2)");
            status_reply(body)
        }),
        Call::new(http::Method::POST, format!("{EVENTS}?"), |body| {
            assert_eq!(body["reason"], "Created");
            event_reply(body)
        }),
    ];
    let (result, _, _) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    result.unwrap();
}

/// A FalFunction whose status already says what `live_deployment(…, 1, 1)` implies.
fn steady_function() -> FalFunction {
    let mut ff = function(FalFunctionSpec::with_image("reg/app:1"));
    let live: Deployment = serde_json::from_value(live_deployment(&ff, 1, 1)).unwrap();
    let mut status = next_status(
        &ff,
        Ok("XS"),
        Ok(Some(&live)),
        None,
        &OperatorConfig::default(),
        &time(EARLIER),
    );
    status.observed_generation = Some(1);
    ff.status = Some(status);
    ff
}

#[tokio::test]
async fn unchanged_path_only_reads() {
    let ff = steady_function();
    let (deployment, service) = (live_deployment(&ff, 1, 1), live_service(&ff));
    let policy = policy_unchanged(&ff);
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, move |_| {
            (StatusCode::OK, deployment)
        }),
        Call::new(http::Method::GET, SERVICE, move |_| {
            (StatusCode::OK, service)
        }),
        policy,
    ];
    let (result, seen, metrics) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    assert_eq!(result.unwrap(), Action::requeue(RESYNC));
    assert_eq!(
        seen,
        [
            format!("GET {DEPLOYMENT}"),
            format!("GET {SERVICE}"),
            format!("GET {POLICY}")
        ]
    );
    assert_eq!(metrics.writes.with_label_values(&["status"]).get(), 0);
}

#[tokio::test]
async fn unchanged_objects_with_new_readiness_write_only_status_and_ready_event() {
    let mut ff = steady_function();
    // The function was Starting (0 ready) since EARLIER; now a replica is ready.
    let live_starting: Deployment = serde_json::from_value(live_deployment(&ff, 1, 0)).unwrap();
    ff.status = Some(next_status(
        &ff,
        Ok("XS"),
        Ok(Some(&live_starting)),
        None,
        &OperatorConfig::default(),
        &time(EARLIER),
    ));
    let (deployment, service) = (live_deployment(&ff, 1, 1), live_service(&ff));
    let policy = policy_unchanged(&ff);
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, move |_| {
            (StatusCode::OK, deployment)
        }),
        Call::new(http::Method::GET, SERVICE, move |_| {
            (StatusCode::OK, service)
        }),
        policy,
        Call::new(http::Method::PATCH, format!("{STATUS}{APPLY}"), |body| {
            let status = status_of(&body);
            assert_eq!((status.replicas, status.ready_replicas), (1, 1));
            let ready = find(&status.conditions, ConditionType::Ready).unwrap();
            assert_eq!(
                (ready.status.as_str(), ready.reason.as_str()),
                ("True", "Available")
            );
            assert_eq!(ready.last_transition_time, time(NOW), "flipped now");
            let machine = find(&status.conditions, ConditionType::MachineTypeResolved).unwrap();
            assert_eq!(machine.last_transition_time, time(EARLIER), "did not flip");
            status_reply(body)
        }),
        Call::new(http::Method::POST, format!("{EVENTS}?"), |body| {
            assert_eq!(body["type"], "Normal");
            assert_eq!(body["reason"], "Ready");
            assert_eq!(body["note"], "1/1 replicas ready");
            event_reply(body)
        }),
    ];
    let (result, seen, _) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    result.unwrap();
    assert!(
        !seen.iter().any(|s| s.contains("/deployments/app?")),
        "no apply: {seen:?}"
    );
}

#[tokio::test]
async fn update_path_reapplies_only_what_changed() {
    let mut ff = steady_function();
    // Live objects match image 1; the user moved to image 2 (generation 2).
    let (deployment, service) = (live_deployment(&ff, 3, 3), live_service(&ff));
    let policy = policy_unchanged(&ff);
    ff.spec.image = "reg/app:2".into();
    ff.metadata.generation = Some(2);
    let want = serde_json::to_value(desired_deployment(&ff)).unwrap();
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, move |_| {
            (StatusCode::OK, deployment)
        }),
        Call::new(
            http::Method::PATCH,
            format!("{DEPLOYMENT}{APPLY}"),
            move |body| {
                assert_eq!(body, want);
                assert_eq!(
                    body["spec"]["template"]["spec"]["containers"][0]["image"],
                    "reg/app:2"
                );
                assert!(
                    body["spec"].get("replicas").is_none(),
                    "autoscaler's 3 replicas kept"
                );
                echo_with(|b| {
                    b["spec"]["replicas"] = json!(3);
                    b["status"] = json!({"replicas": 3, "readyReplicas": 3});
                })(body)
            },
        ),
        Call::new(http::Method::GET, SERVICE, move |_| {
            (StatusCode::OK, service)
        }),
        policy,
        Call::new(http::Method::PATCH, format!("{STATUS}{APPLY}"), |body| {
            let status = status_of(&body);
            assert_eq!(status.observed_generation, Some(2));
            assert_eq!((status.replicas, status.ready_replicas), (3, 3));
            let ready = find(&status.conditions, ConditionType::Ready).unwrap();
            assert_eq!(
                ready.last_transition_time,
                time(EARLIER),
                "still ready: no flip"
            );
            assert_eq!(ready.observed_generation, Some(2));
            status_reply(body)
        }),
        Call::new(http::Method::POST, format!("{EVENTS}?"), |body| {
            assert_eq!(body["reason"], "Updated");
            assert_eq!(body["note"], "applied changes to Deployment app");
            event_reply(body)
        }),
    ];
    let (result, _, metrics) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    result.unwrap();
    assert_eq!(
        metrics.writes.with_label_values(&["apply_service"]).get(),
        0
    );
}

#[tokio::test]
async fn drifted_service_is_repaired() {
    let ff = steady_function();
    let deployment = live_deployment(&ff, 1, 1);
    let mut service = live_service(&ff);
    service["spec"]["ports"][0]["port"] = json!(8000); // someone edited it
    let policy = policy_unchanged(&ff);
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, move |_| {
            (StatusCode::OK, deployment)
        }),
        Call::new(http::Method::GET, SERVICE, move |_| {
            (StatusCode::OK, service)
        }),
        Call::new(http::Method::PATCH, format!("{SERVICE}{APPLY}"), |body| {
            assert_eq!(body["spec"]["ports"][0]["port"], 80);
            (StatusCode::OK, body)
        }),
        policy,
        Call::new(http::Method::POST, format!("{EVENTS}?"), |body| {
            assert_eq!(body["note"], "applied changes to Service app");
            event_reply(body)
        }),
    ];
    let (result, _, _) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    result.unwrap();
}

#[tokio::test]
async fn unknown_machine_type_sets_conditions_and_warns_without_touching_objects() {
    let mut ff = steady_function();
    ff.spec.machine_type = "GPU-B200".into();
    ff.metadata.generation = Some(2);
    let calls = vec![
        Call::new(http::Method::PATCH, format!("{STATUS}{APPLY}"), |body| {
            let status = status_of(&body);
            assert_eq!(status.observed_generation, Some(2));
            assert_eq!(
                (status.replicas, status.ready_replicas),
                (1, 1),
                "old pods still run"
            );
            for t in [ConditionType::Ready, ConditionType::MachineTypeResolved] {
                let c = find(&status.conditions, t).unwrap();
                assert_eq!(
                    (c.status.as_str(), c.reason.as_str()),
                    ("False", "UnknownMachineType")
                );
                assert!(c.message.contains("\"GPU-B200\""), "{}", c.message);
                assert_eq!(c.last_transition_time, time(NOW));
            }
            status_reply(body)
        }),
        Call::new(http::Method::POST, format!("{EVENTS}?"), |body| {
            assert_eq!(body["type"], "Warning");
            assert_eq!(body["reason"], "UnknownMachineType");
            let note = body["note"].as_str().unwrap();
            assert!(
                note.starts_with("spec.machineType: unknown machine type \"GPU-B200\""),
                "{note}"
            );
            event_reply(body)
        }),
    ];
    let h = harness(MachineCatalog::builtin(), calls);
    let ctx = h.ctx.clone();
    let ff = Arc::new(ff);
    let result = reconcile(ff.clone(), ctx.clone()).await;
    let err = result.unwrap_err();
    assert!(matches!(err, Error::UnknownMachineType { .. }), "{err}");
    // Backoff grows per object and resets on success.
    assert_eq!(
        error_policy(ff.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(ff.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    assert_eq!(
        ctx.metrics
            .failures
            .with_label_values(&["unknown_machine_type"])
            .get(),
        2
    );
    ctx.clear_failures(&object_key(&ff));
    assert_eq!(
        error_policy(ff, &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    drop(ctx);
    let Harness { ctx, server } = h;
    drop(ctx);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn api_failure_becomes_a_warning_event_with_the_error_chain() {
    let ff = steady_function();
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, |_| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500}),
            )
        }),
        Call::new(http::Method::POST, format!("{EVENTS}?"), |body| {
            assert_eq!(body["type"], "Warning");
            assert_eq!(body["reason"], "ReconcileFailed");
            let note = body["note"].as_str().unwrap();
            assert!(note.contains("Kubernetes API request failed"), "{note}");
            assert!(note.contains("etcdserver: request timed out"), "{note}");
            event_reply(body)
        }),
    ];
    let (result, _, _) = harness(MachineCatalog::builtin(), calls)
        .reconcile(ff)
        .await;
    let err = result.unwrap_err();
    assert!(matches!(err, Error::Kube(_)));
    assert!(!err.is_spec_error());
}

#[tokio::test]
async fn catalog_override_reaches_the_applied_deployment() {
    let catalog =
        MachineCatalog::from_yaml("machineTypes: {XS: {cpu: 100m, memory: 128Mi}}", "test")
            .unwrap();
    let ff = function(FalFunctionSpec::with_image("reg/app:1"));
    let [get_policy, apply_policy] = policy_created(&ff);
    let calls = vec![
        Call::new(http::Method::GET, DEPLOYMENT, |_| not_found()),
        Call::new(
            http::Method::PATCH,
            format!("{DEPLOYMENT}{APPLY}"),
            |body| {
                let resources = &body["spec"]["template"]["spec"]["containers"][0]["resources"];
                assert_eq!(resources["requests"]["cpu"], "100m");
                assert_eq!(resources["limits"]["memory"], "128Mi");
                echo_with(|b| b["spec"]["replicas"] = json!(1))(body)
            },
        ),
        Call::new(http::Method::GET, SERVICE, |_| not_found()),
        Call::new(
            http::Method::PATCH,
            format!("{SERVICE}{APPLY}"),
            echo_with(|_| {}),
        ),
        get_policy,
        apply_policy,
        Call::new(
            http::Method::PATCH,
            format!("{STATUS}{APPLY}"),
            status_reply,
        ),
        Call::new(http::Method::POST, format!("{EVENTS}?"), event_reply),
    ];
    let (result, _, _) = harness(catalog, calls).reconcile(ff).await;
    result.unwrap();
}

#[test]
fn backoff_doubles_and_caps() {
    let secs: Vec<u64> = (1..=9).map(|n| backoff_delay(n).as_secs()).collect();
    assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
}

#[tokio::test]
async fn missing_crd_gives_an_install_hint() {
    let list = "/apis/fal.serverless.dev/v1alpha1/falfunctions?&limit=1";
    for reply in [
        // A bare unknown API path answers plain text, not a Status.
        (StatusCode::NOT_FOUND, None),
        (StatusCode::NOT_FOUND, Some(not_found().1)),
    ] {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.unwrap();
            assert_eq!(request.uri().to_string(), list);
            let body = match reply.1 {
                Some(json) => Body::from(serde_json::to_vec(&json).unwrap()),
                None => Body::from(b"404 page not found".to_vec()),
            };
            send.send_response(Response::builder().status(reply.0).body(body).unwrap());
        });
        let hint = check_crd_installed(&client).await.unwrap_err();
        assert!(
            hint.contains("kubectl apply -f crds/falfunctions.yaml"),
            "{hint}"
        );
        assert!(hint.contains(CRD_NAME), "{hint}");
        server.await.unwrap();
    }
}

#[tokio::test]
async fn installed_crd_passes_the_check() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        let (_, send) = handle.next_request().await.unwrap();
        let list = json!({"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalFunctionList",
                          "metadata": {"resourceVersion": "1"}, "items": []});
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&list).unwrap()))
                .unwrap(),
        );
    });
    check_crd_installed(&client).await.unwrap();
    server.await.unwrap();
}

mod network_policy;
mod source;

#[test]
fn the_cache_keeps_functions_without_the_api_servers_bookkeeping() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    let mut ff = steady_function();
    ff.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
        manager: Some("kubectl".into()),
        ..Default::default()
    }]);
    ff.metadata.annotations = Some(
        [
            (
                "kubectl.kubernetes.io/last-applied-configuration",
                "{\"spec\":{}}",
            ),
            ("team", "a"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    let spec = ff.spec.clone();
    slim_for_cache(&mut ff);
    assert_eq!(ff.metadata.managed_fields, None);
    let annotations = ff.metadata.annotations.unwrap();
    assert_eq!(annotations.len(), 1, "{annotations:?}");
    assert_eq!(annotations["team"], "a");
    assert_eq!(ff.spec, spec);
}
