//! The autoscaler's hands in a cluster: the Deployment's `scale` subresource, patched
//! under its own field manager, and `controller.kubernetes.io/pod-deletion-cost` on
//! the function's pods before a scale-down, so the ReplicaSet removes idle pods
//! first. A busy pod that is removed anyway drains in its preStop hook (finishes or
//! gives back its claimed requests): nothing is lost either way.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::Scaler;
use crate::crd::{GROUP, VERSION};
use crate::function::FunctionInfo;
use crate::labels::FUNCTION_LABEL;

/// Field manager of every replica count the autoscaler sets.
pub const AUTOSCALER_FIELD_MANAGER: &str = "fal-autoscaler";
/// The annotation the ReplicaSet controller orders pod deletions by (lowest first).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Requests running per replica (pod name), from the store.
#[async_trait]
pub trait BusyReplicas: Send + Sync + 'static {
    async fn running(&self, f: &FunctionInfo) -> Result<HashMap<String, u64>, String>;
}

/// The store's view: the replica that claimed each running request.
pub struct StoreBusy(pub Arc<fal_sidecar::store::redis::RedisHub>);

#[async_trait]
impl BusyReplicas for StoreBusy {
    async fn running(&self, f: &FunctionInfo) -> Result<HashMap<String, u64>, String> {
        self.0
            .store(&f.key(), 1)
            .running_by_replica()
            .await
            .map_err(|e| e.to_string())
    }
}

/// See the module docs.
pub struct KubeScaler {
    client: Client,
    deployments: Store<Deployment>,
    busy: Arc<dyn BusyReplicas>,
    recorder: Recorder,
}

impl KubeScaler {
    /// `deployments`: a reflector store of the operator's Deployments.
    pub fn new(
        client: Client,
        deployments: Store<Deployment>,
        busy: Arc<dyn BusyReplicas>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: AUTOSCALER_FIELD_MANAGER.to_string(),
            instance,
        };
        KubeScaler {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            deployments,
            busy,
        }
    }

    /// Sets each pod's deletion cost to the requests it runs (idle pods: 0), where it
    /// differs. Best effort: a failure only loses the preference, not requests.
    async fn mark_busy_pods(&self, f: &FunctionInfo) {
        let running = match self.busy.running(f).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(function = %f.key(), error = %e, "cannot read which replicas are busy");
                return;
            }
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &f.namespace);
        let lp = ListParams::default().labels(&format!("{FUNCTION_LABEL}={}", f.name));
        let list = match pods.list(&lp).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(function = %f.key(), error = %e, "cannot list the function's pods");
                return;
            }
        };
        for pod in list.items {
            let name = pod.name_any();
            let cost = running.get(&name).copied().unwrap_or(0).to_string();
            if pod.annotations().get(DELETION_COST) == Some(&cost) {
                continue;
            }
            let patch = json!({"metadata": {"annotations": {DELETION_COST: cost}}});
            let pp = PatchParams {
                field_manager: Some(AUTOSCALER_FIELD_MANAGER.to_string()),
                ..PatchParams::default()
            };
            if let Err(e) = pods.patch(&name, &pp, &Patch::Merge(&patch)).await {
                tracing::warn!(pod = %name, error = %e, "cannot set the pod deletion cost");
            }
        }
    }
}

fn function_ref(f: &FunctionInfo) -> ObjectReference {
    ObjectReference {
        api_version: Some(format!("{GROUP}/{VERSION}")),
        kind: Some("FalFunction".into()),
        name: Some(f.name.clone()),
        namespace: Some(f.namespace.clone()),
        ..ObjectReference::default()
    }
}

#[async_trait]
impl Scaler for KubeScaler {
    async fn replicas(&self, f: &FunctionInfo) -> Result<Option<u32>, String> {
        let key = ObjectRef::new(&f.name).within(&f.namespace);
        Ok(self.deployments.get(&key).map(|d| {
            let n = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            u32::try_from(n).unwrap_or(0)
        }))
    }

    async fn scale(&self, f: &FunctionInfo, from: u32, to: u32) -> Result<(), String> {
        if to < from {
            self.mark_busy_pods(f).await;
        }
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &f.namespace);
        // A server-side apply of the scale, forced: the apiserver then records
        // `fal-autoscaler` as the owner of `spec.replicas` (subresource `scale`). A merge
        // patch of the scale is recorded only when some manager already owns the field,
        // and none does (the operator's apply leaves replicas out on purpose).
        let pp = PatchParams::apply(AUTOSCALER_FIELD_MANAGER).force();
        let patch = json!({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": f.name, "namespace": f.namespace},
            "spec": {"replicas": to},
        });
        api.patch_scale(&f.name, &pp, &Patch::Apply(&patch))
            .await
            .map_err(|e| format!("patching {}/{} scale: {e}", f.namespace, f.name))?;
        let (reason, note) = if to > from {
            (
                "ScaledUp",
                format!("scaled from {from} to {to} replicas (load)"),
            )
        } else if to == 0 {
            (
                "ScaledDown",
                format!(
                    "scaled from {from} to 0 replicas after {} s idle (keepAlive)",
                    f.bounds.keep_alive.as_secs()
                ),
            )
        } else {
            ("ScaledDown", format!("scaled from {from} to {to} replicas"))
        };
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "Scale".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &function_ref(f)).await {
            tracing::warn!(error = %e, reason, "could not publish the scale event");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::FalFunctionSpec;
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use kube::runtime::reflector;
    use kube::runtime::watcher;
    use serde_json::Value;
    use tower_test::mock;

    struct FixedBusy(HashMap<String, u64>);

    #[async_trait]
    impl BusyReplicas for FixedBusy {
        async fn running(&self, _: &FunctionInfo) -> Result<HashMap<String, u64>, String> {
            Ok(self.0.clone())
        }
    }

    fn info() -> FunctionInfo {
        let mut spec = FalFunctionSpec::with_image("x");
        spec.max_replicas = 3;
        spec.keep_alive = 30;
        FunctionInfo::from_spec("team-a", "app", &spec).unwrap()
    }

    fn deployment(replicas: Option<i32>) -> Deployment {
        serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "app", "namespace": "team-a"},
            "spec": {"replicas": replicas, "selector": {}, "template": {}}
        }))
        .unwrap()
    }

    /// (method, uri, body) of each request; answers each with `reply(uri)`.
    async fn serve(
        mut handle: mock::Handle<Request<Body>, Response<Body>>,
        n: usize,
        reply: impl Fn(&str) -> Value,
    ) -> Vec<(String, String, Value)> {
        let mut seen = Vec::new();
        for _ in 0..n {
            let (req, send) = handle.next_request().await.expect("a request");
            let (method, uri) = (req.method().to_string(), req.uri().to_string());
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let answer = reply(&uri);
            send.send_response(
                Response::builder()
                    .status(StatusCode::OK)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
            seen.push((method, uri, body));
        }
        seen
    }

    /// The scale the autoscaler applies (server-side, so it owns `spec.replicas`).
    fn applied_scale(replicas: i32) -> Value {
        json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
               "metadata": {"name": "app", "namespace": "team-a"},
               "spec": {"replicas": replicas}})
    }

    fn scale_reply(uri: &str) -> Value {
        if uri.contains("/scale") {
            json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                   "metadata": {"name": "app", "namespace": "team-a"}, "spec": {"replicas": 1}})
        } else if uri.contains("/events") {
            json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"},
                   "eventTime": "2026-01-01T00:00:00.000000Z"})
        } else if uri.contains("/pods?") {
            json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                {"metadata": {"name": "app-busy", "namespace": "team-a"}},
                {"metadata": {"name": "app-idle", "namespace": "team-a",
                              "annotations": {DELETION_COST: "0"}}},
                {"metadata": {"name": "app-was-busy", "namespace": "team-a",
                              "annotations": {DELETION_COST: "3"}}}
            ]})
        } else {
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
        }
    }

    fn scaler(client: Client, replicas: Option<i32>, busy: &[(&str, u64)]) -> KubeScaler {
        let (reader, mut writer) = reflector::store::<Deployment>();
        writer.apply_watcher_event(&watcher::Event::Apply(deployment(replicas)));
        let busy = FixedBusy(busy.iter().map(|(k, v)| (k.to_string(), *v)).collect());
        KubeScaler::new(client, reader, Arc::new(busy), Some("test".into()))
    }

    #[tokio::test]
    async fn replicas_come_from_the_deployment_cache() {
        let (service, _handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let s = scaler(client.clone(), Some(2), &[]);
        assert_eq!(s.replicas(&info()).await, Ok(Some(2)));
        let s = scaler(client.clone(), None, &[]);
        assert_eq!(s.replicas(&info()).await, Ok(Some(1)), "the API default");
        let mut other = info();
        other.name = "missing".into();
        assert_eq!(s.replicas(&other).await, Ok(None));
    }

    #[tokio::test]
    async fn scale_up_patches_the_scale_subresource_under_its_own_manager() {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let server = tokio::spawn(serve(handle, 2, scale_reply));
        let s = scaler(client, Some(0), &[]);
        s.scale(&info(), 0, 2).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen[0].0, "PATCH");
        assert_eq!(
            seen[0].1,
            "/apis/apps/v1/namespaces/team-a/deployments/app/scale?&force=true&fieldManager=fal-autoscaler"
        );
        assert_eq!(seen[0].2, applied_scale(2));
        assert_eq!(seen[1].0, "POST");
        assert_eq!(
            seen[1].1,
            "/apis/events.k8s.io/v1/namespaces/team-a/events?"
        );
        assert_eq!(seen[1].2["reason"], "ScaledUp");
        assert_eq!(seen[1].2["regarding"]["kind"], "FalFunction");
        assert_eq!(seen[1].2["regarding"]["name"], "app");
    }

    #[tokio::test]
    async fn scale_down_marks_busy_pods_costly_first() {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        // list pods, patch app-busy (→2), patch app-was-busy (→0), patch scale, event.
        let server = tokio::spawn(serve(handle, 5, scale_reply));
        let s = scaler(client, Some(3), &[("app-busy", 2)]);
        s.scale(&info(), 3, 0).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen[0].0, "GET");
        assert_eq!(
            seen[0].1,
            "/api/v1/namespaces/team-a/pods?&labelSelector=fal.serverless.dev%2Ffunction%3Dapp"
        );
        let patches: Vec<_> = seen[1..3]
            .iter()
            .map(|(m, u, b)| {
                (
                    m.as_str(),
                    u.as_str(),
                    b["metadata"]["annotations"][DELETION_COST].clone(),
                )
            })
            .collect();
        assert_eq!(
            patches,
            vec![
                (
                    "PATCH",
                    "/api/v1/namespaces/team-a/pods/app-busy?&fieldManager=fal-autoscaler",
                    json!("2")
                ),
                (
                    "PATCH",
                    "/api/v1/namespaces/team-a/pods/app-was-busy?&fieldManager=fal-autoscaler",
                    json!("0")
                ),
            ],
            "the idle pod that already says 0 is left alone"
        );
        assert!(seen[3]
            .1
            .ends_with("/deployments/app/scale?&force=true&fieldManager=fal-autoscaler"));
        assert_eq!(seen[3].2, applied_scale(0));
        assert_eq!(seen[4].2["reason"], "ScaledDown");
        assert!(seen[4].2["note"].as_str().unwrap().contains("30 s idle"));
    }
}
