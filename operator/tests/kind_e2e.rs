//! End-to-end against a real cluster (kind): the controller runs in this process
//! against the current kubeconfig context; run by `scripts/kind-e2e.sh`, which creates
//! the cluster, installs the CRD and loads the images.
//!
//! Environment:
//! - `FAL_E2E_APP_IMAGE`: app image loaded into the cluster (default: the seed image).
//! - `FAL_E2E_SIDECAR_IMAGE`: sidecar image loaded into the cluster.
//! - `FAL_E2E_EXPECT_READY=1`: also wait for pods to become Ready (needs both images).

use std::sync::Arc;
use std::time::Duration;

use fal_operator::catalog::MachineCatalog;
use fal_operator::conditions::{find, ConditionType};
use fal_operator::config::OperatorConfig;
use fal_operator::controller::{self, Context};
use fal_operator::crd::{FalFunction, FalFunctionSpec};
use fal_operator::metrics::Metrics;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn condition(ff: &FalFunction, t: ConditionType) -> Option<(String, String)> {
    let status = ff.status.as_ref()?;
    find(&status.conditions, t).map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
#[ignore = "needs a kind cluster"]
async fn falfunction_becomes_a_running_function() {
    let client = Client::try_default()
        .await
        .expect("kubeconfig for the kind cluster");
    controller::check_crd_installed(&client)
        .await
        .expect("CRD installed by scripts/kind-e2e.sh");

    let ns = format!("fal-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();

    let mut config = OperatorConfig::default();
    if let Ok(image) = std::env::var("FAL_E2E_SIDECAR_IMAGE") {
        config.sidecar_image = image;
    }
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let ctx = Arc::new(Context::new(
        client.clone(),
        MachineCatalog::builtin(),
        config,
        metrics,
        Some("kind-e2e".into()),
    ));
    let controller = tokio::spawn(controller::run(ctx, 8));

    // Day one: apply a FalFunction (XS so it fits a kind node).
    let image = std::env::var("FAL_E2E_APP_IMAGE")
        .unwrap_or_else(|_| "ghcr.io/fal-serverless-k8s/seed-app:0.1.0".into());
    let mut spec = FalFunctionSpec::with_image(image);
    spec.readiness_path = Some("/health".into());
    spec.startup_timeout = Some(120);
    let mut ff = FalFunction::new("e2e-app", spec);
    ff.metadata.namespace = Some(ns.clone());
    let functions: Api<FalFunction> = Api::namespaced(client.clone(), &ns);
    functions.create(&PostParams::default(), &ff).await.unwrap();

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment = wait_for("the Deployment", Duration::from_secs(60), || async {
        deployments.get_opt("e2e-app").await.unwrap()
    })
    .await;
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let sidecar = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(sidecar.name, "fal-sidecar");
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(1));
    let owner = &deployment.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("FalFunction", "e2e-app")
    );

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service = wait_for("the Service", Duration::from_secs(30), || async {
        services.get_opt("e2e-app").await.unwrap()
    })
    .await;
    assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 80);

    let resolved = wait_for("status", Duration::from_secs(30), || async {
        let ff = functions.get("e2e-app").await.unwrap();
        (condition(&ff, ConditionType::MachineTypeResolved).is_some()).then_some(ff)
    })
    .await;
    let status = resolved.status.as_ref().unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        status.url.as_deref(),
        Some(format!("http://e2e-app.{ns}.svc.cluster.local").as_str())
    );

    if std::env::var("FAL_E2E_EXPECT_READY").as_deref() == Ok("1") {
        wait_for("Ready=True", Duration::from_secs(240), || async {
            let ff = functions.get("e2e-app").await.unwrap();
            (condition(&ff, ConditionType::Ready).map(|c| c.0).as_deref() == Some("True"))
                .then_some(())
        })
        .await;
    }

    // An unknown machine type: not Ready, with a condition and a Warning event saying so.
    functions
        .patch(
            "e2e-app",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"machineType": "GPU-B200"}})),
        )
        .await
        .unwrap();
    wait_for(
        "MachineTypeResolved=False",
        Duration::from_secs(30),
        || async {
            let ff = functions.get("e2e-app").await.unwrap();
            (condition(&ff, ConditionType::MachineTypeResolved)
                == Some(("False".into(), "UnknownMachineType".into())))
            .then_some(())
        },
    )
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    wait_for("a Warning event", Duration::from_secs(30), || async {
        let list = events.list(&ListParams::default()).await.unwrap();
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("UnknownMachineType"))
            .then_some(())
    })
    .await;

    controller.abort();
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
}
