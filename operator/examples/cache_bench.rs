//! Numbers for BENCHMARKS-operator.md:
//! 1. resident memory of the controller's caches with N FalFunctions (and, separately,
//!    their N owned Deployments and Services), filled through real reflector store
//!    writers with objects shaped like what the apiserver sends;
//! 2. time to render one FalFunction (builders only, and manifest → YAML).
//!
//!   cargo run --release -p fal-operator --example cache_bench [-- N]
//!
//! Linux only (reads VmRSS from /proc/self/status).

use std::time::Instant;

use fal_operator::catalog::MachineCatalog;
use fal_operator::config::OperatorConfig;
use fal_operator::crd::FalFunction;
use fal_operator::render::{parse_manifests, render};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::store;
use kube::runtime::watcher;
use serde_json::json;

const SEED: &str = include_str!("../../examples/seed-app.yaml");

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A FalFunction as a watch event delivers it: uid, resourceVersion, the
/// `kubectl apply` annotation, managedFields of kubectl and the operator, a status
/// with both conditions.
fn function_json(i: usize) -> String {
    let name = format!("fn-{i:04}");
    let spec = json!({"image": format!("registry.example.com/team/app-{i}:1.0.{i}"),
        "exposedPort": 8080, "machineType": "GPU-T4", "keepAlive": 300, "minReplicas": 0,
        "maxReplicas": 4, "maxConcurrency": 1, "readinessPath": "/health"});
    let last_applied = json!({"apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalFunction",
        "metadata": {"name": name, "namespace": "team-a"}, "spec": spec})
    .to_string();
    let condition = |t: &str, reason: &str, msg: &str| {
        json!({"type": t, "status": "True",
        "reason": reason, "message": msg, "observedGeneration": 1,
        "lastTransitionTime": "2026-11-26T23:00:00Z"})
    };
    json!({
        "apiVersion": "fal.serverless.dev/v1alpha1",
        "kind": "FalFunction",
        "metadata": {
            "name": name, "namespace": "team-a",
            "uid": format!("6f1c2a4e-0000-4000-8000-{i:012}"),
            "resourceVersion": format!("{}", 100_000 + i), "generation": 1,
            "creationTimestamp": "2026-11-26T23:00:00Z",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": last_applied},
            "managedFields": [
                {"manager": "kubectl-client-side-apply", "operation": "Update",
                 "apiVersion": "fal.serverless.dev/v1alpha1", "time": "2026-11-26T23:00:00Z",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:annotations": {".": {},
                    "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
                    "f:spec": {".": {}, "f:exposedPort": {}, "f:image": {}, "f:keepAlive": {},
                    "f:machineType": {}, "f:maxConcurrency": {}, "f:maxReplicas": {},
                    "f:minReplicas": {}, "f:readinessPath": {}}}},
                {"manager": "fal-operator", "operation": "Apply",
                 "apiVersion": "fal.serverless.dev/v1alpha1", "time": "2026-11-26T23:00:05Z",
                 "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:machineType": {},
                    "f:observedGeneration": {}, "f:queueUrl": {}, "f:readyReplicas": {},
                    "f:replicas": {}, "f:url": {}}}}
            ]
        },
        "spec": spec,
        "status": {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1,
            "machineType": "GPU-T4",
            "url": format!("https://fal.example.com/team-a/{name}"),
            "queueUrl": format!("https://queue.fal.example.com/team-a/{name}"),
            "conditions": [condition("MachineTypeResolved", "Resolved", "machine type GPU-T4 found in the catalog"),
                           condition("Ready", "Available", "1/1 replicas ready")]}
    })
    .to_string()
}

fn fill<K>(texts: Vec<String>) -> (store::Store<K>, store::Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned,
{
    let (reader, mut writer) = store::<K>();
    for text in texts {
        let obj: K = serde_json::from_str(&text).expect("valid object");
        writer.apply_watcher_event(&watcher::Event::Apply(obj));
    }
    (reader, writer)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let catalog = MachineCatalog::builtin();
    let cfg = OperatorConfig::default();

    // --- FalFunction cache ---
    let texts: Vec<String> = (0..n).map(function_json).collect();
    let bytes: usize = texts.iter().map(String::len).sum();
    let before = rss_kib();
    let (functions, _w1) = fill::<FalFunction>(texts);
    let after_functions = rss_kib();
    assert_eq!(functions.len(), n);
    println!(
        "FalFunction cache: {n} objects ({} KiB of JSON on the wire): RSS +{} KiB ({:.1} KiB/object)",
        bytes / 1024,
        after_functions - before,
        (after_functions - before) as f64 / n as f64
    );

    // --- owned Deployments and Services (the controller caches those too) ---
    let mut deployments = Vec::with_capacity(n);
    let mut services = Vec::with_capacity(n);
    for ff in functions.state() {
        let mut ff = (*ff).clone();
        ff.status = None;
        let mut d = serde_json::to_value(ff.deployment(&catalog, &cfg).unwrap()).unwrap();
        d["metadata"]["uid"] = json!("0b7e0000-0000-4000-8000-000000000000");
        d["metadata"]["resourceVersion"] = json!("123456");
        d["spec"]["replicas"] = json!(1);
        d["status"] = json!({"replicas": 1, "readyReplicas": 1, "availableReplicas": 1,
            "updatedReplicas": 1, "observedGeneration": 1});
        deployments.push(d.to_string());
        let mut s = serde_json::to_value(ff.service().unwrap()).unwrap();
        s["spec"]["clusterIP"] = json!("10.96.12.34");
        services.push(s.to_string());
    }
    let before = rss_kib();
    let (dstore, _w2) = fill::<Deployment>(deployments);
    let (sstore, _w3) = fill::<Service>(services);
    let after_owned = rss_kib();
    assert_eq!((dstore.len(), sstore.len()), (n, n));
    println!(
        "Owned Deployment+Service caches: {} objects: RSS +{} KiB ({:.1} KiB/function)",
        2 * n,
        after_owned - before,
        (after_owned - before) as f64 / n as f64
    );
    println!("Total RSS now: {} KiB", rss_kib());

    // --- render time ---
    let ff = parse_manifests(SEED, "seed").unwrap().remove(0);
    let iterations = 2000;
    let start = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box((
            ff.deployment(&catalog, &cfg).unwrap(),
            ff.service().unwrap(),
        ));
    }
    let builders = start.elapsed() / iterations;
    let start = Instant::now();
    for _ in 0..iterations {
        std::hint::black_box(render(SEED, "seed", &catalog, &cfg).unwrap());
    }
    let full = start.elapsed() / iterations;
    println!(
        "Render per FalFunction: builders {builders:?}; manifest YAML -> objects YAML {full:?}"
    );
}
