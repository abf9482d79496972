//! The reconcile loop: a thin shell around the pure builders.
//!
//! One reconcile: build the desired Deployment, Service and NetworkPolicy (pure), read
//! the live ones, server-side apply only what differs, then write the status if it
//! changed and emit events for what happened. A served file (`spec.source`) rolls its
//! Deployment only once its revision's environment is built ([`build`]). Spec errors (unknown machine type, bad
//! values) leave the running objects alone, set the conditions and raise a Warning
//! event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use crate::catalog::MachineCatalog;
use crate::conditions::{find, is_true, ConditionType};
use crate::config::{OperatorConfig, FIELD_MANAGER};
use crate::crd::{FalFunction, FalFunctionStatus, CRD_NAME};
use crate::deployment::initial_replicas;
use crate::diff::is_subset;
use crate::labels::{identity, MANAGED_SELECTOR};
use crate::metrics::Metrics;
use crate::status::{next_status, SourceProgress};
use crate::validate::validate_spec;
use crate::{error_chain, Error, Result};

/// Field manager of the one-time start replica count (see [`crate::deployment`]): a
/// separate manager, so the operator's main apply never owns `spec.replicas`.
pub const BOOTSTRAP_FIELD_MANAGER: &str = "fal-operator-bootstrap";
/// Re-check interval of a healthy function (owned objects trigger reconciles anyway).
pub const RESYNC: Duration = Duration::from_secs(300);
/// First retry delay after an error; doubles per consecutive failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Shared state of the reconciler.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Machine types.
    pub catalog: MachineCatalog,
    /// Sidecar image, store, gateway domain.
    pub config: OperatorConfig,
    /// Publishes events.
    pub recorder: Recorder,
    /// Reconcile metrics.
    pub metrics: Metrics,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The clock (fixed in tests).
    now: fn() -> Timestamp,
    /// The autoscaler, when it runs: its last decision goes into the status.
    pub autoscaler: std::sync::OnceLock<Arc<crate::autoscale::Autoscaler>>,
}

impl Context {
    /// A context publishing events as `fal-operator` (instance: this pod).
    pub fn new(
        client: Client,
        catalog: MachineCatalog,
        config: OperatorConfig,
        metrics: Metrics,
        instance: Option<String>,
    ) -> Self {
        Self::with_clock(client, catalog, config, metrics, instance, Timestamp::now)
    }

    /// Like [`Context::new`] with an explicit clock.
    pub fn with_clock(
        client: Client,
        catalog: MachineCatalog,
        config: OperatorConfig,
        metrics: Metrics,
        instance: Option<String>,
        now: fn() -> Timestamp,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            catalog,
            config,
            metrics,
            failures: Mutex::new(HashMap::new()),
            now,
            autoscaler: std::sync::OnceLock::new(),
        }
    }

    fn record_failure(&self, key: &str) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn clear_failures(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    async fn publish(&self, ff: &FalFunction, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        match self.recorder.publish(&event, &ff.object_ref(&())).await {
            Ok(()) => self.metrics.wrote("event"),
            // An event is a courtesy; failing to send one must not fail the reconcile.
            Err(e) => tracing::warn!(error = %e, reason, "could not publish event"),
        }
    }
}

/// Delay before retry number `attempt` (1-based): 5 s, 10 s, 20 s, … capped at 5 min.
pub fn backoff_delay(attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

fn object_key(ff: &FalFunction) -> String {
    format!("{}/{}", ff.namespace().unwrap_or_default(), ff.name_any())
}

/// Reconciles one FalFunction. Errors become a Warning event with the error chain.
pub async fn reconcile(ff: Arc<FalFunction>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    let key = object_key(&ff);
    match apply(&ff, &ctx).await {
        Ok(action) => {
            ctx.clear_failures(&key);
            Ok(action)
        }
        Err(err) => {
            let reason = match &err {
                Error::UnknownMachineType { .. } => "UnknownMachineType",
                Error::InvalidSpec { .. } => "InvalidSpec",
                _ => "ReconcileFailed",
            };
            ctx.publish(&ff, EventType::Warning, reason, error_chain(&err))
                .await;
            Err(err)
        }
    }
}

/// Per-object exponential backoff after a failed reconcile.
pub fn error_policy(ff: Arc<FalFunction>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(err);
    let attempt = ctx.record_failure(&object_key(&ff));
    let delay = backoff_delay(attempt);
    tracing::warn!(
        function = %object_key(&ff),
        error = %error_chain(err),
        attempt,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Applies `desired` unless `live` already holds all of it. Returns the object as it
/// is now and whether a write happened.
async fn apply_if_changed<K>(
    api: &Api<K>,
    name: &str,
    desired: &K,
    live: Option<K>,
) -> Result<(K, bool)>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    if let Some(live) = live {
        if is_subset(
            &serde_json::to_value(desired)?,
            &serde_json::to_value(&live)?,
        ) {
            return Ok((live, false));
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok((
        api.patch(name, &params, &Patch::Apply(desired)).await?,
        true,
    ))
}

/// Writes `status` unless the FalFunction already has it.
async fn write_status(ctx: &Context, ff: &FalFunction, status: FalFunctionStatus) -> Result<()> {
    if ff.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let (namespace, name) = (ff.namespace().unwrap_or_default(), ff.name_any());
    let api: Api<FalFunction> = Api::namespaced(ctx.client.clone(), &namespace);
    let body = json!({
        "apiVersion": FalFunction::api_version(&()),
        "kind": FalFunction::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&name, &params, &Patch::Apply(&body))
        .await?;
    ctx.metrics.wrote("status");
    Ok(())
}

async fn apply(ff: &FalFunction, ctx: &Context) -> Result<Action> {
    let now = Time((ctx.now)());
    let cfg = &ctx.config;
    let machine = match ctx.catalog.get(&ff.spec.machine_type) {
        Some(_) => Ok(ff.spec.machine_type.as_str()),
        None => Err(Error::UnknownMachineType {
            name: ff.spec.machine_type.clone(),
            known: ctx.catalog.names().collect::<Vec<_>>().join(", "),
        }),
    };
    let desired = identity(ff)
        .and_then(|_| validate_spec(&ff.spec))
        .and_then(|()| {
            let policy = match &cfg.network_policy {
                Some(np) => Some(ff.network_policy(np)?),
                None => None,
            };
            Ok((ff.deployment(&ctx.catalog, cfg)?, ff.service()?, policy))
        });
    let (desired_deployment, desired_service, desired_policy) = match desired {
        Ok(objects) => objects,
        Err(err) if err.is_spec_error() => {
            let status = next_status(ff, machine.as_deref(), Err(&err), None, cfg, &now);
            write_status(ctx, ff, status).await?;
            return Err(err);
        }
        Err(err) => return Err(err),
    };
    let (namespace, name) = identity(ff)?;

    // A served file: its environment decides whether the pods may roll to the newest
    // revision (until it is built, the running revision keeps serving).
    let mut notes = Vec::new();
    let mut progress = match &ff.spec.source {
        Some(src) => match build::progress(ctx, ff, &namespace, &name, src).await {
            Ok((p, n)) => {
                notes = n;
                Some(p)
            }
            Err(err) if err.is_spec_error() => {
                let status = next_status(ff, machine.as_deref(), Err(&err), None, cfg, &now);
                write_status(ctx, ff, status).await?;
                return Err(err);
            }
            Err(err) => return Err(err),
        },
        None => None,
    };
    let roll = progress.as_ref().is_none_or(SourceProgress::ready);

    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let live = deployments.get_opt(&name).await?;
    let created = roll && live.is_none();
    let (deployment, deployment_written) = if roll {
        let (mut deployment, written) =
            apply_if_changed(&deployments, &name, &desired_deployment, live).await?;
        if written {
            ctx.metrics.wrote("apply_deployment");
        }
        if created {
            let start = initial_replicas(ff);
            let current = deployment.spec.as_ref().and_then(|s| s.replicas);
            if current != Some(start) {
                let params = PatchParams {
                    field_manager: Some(BOOTSTRAP_FIELD_MANAGER.to_string()),
                    ..PatchParams::default()
                };
                let patch = Patch::Merge(json!({"spec": {"replicas": start}}));
                deployments.patch_scale(&name, &params, &patch).await?;
                ctx.metrics.wrote("scale");
                if let Some(spec) = deployment.spec.as_mut() {
                    spec.replicas = Some(start);
                }
            }
        }
        (Some(deployment), written)
    } else {
        (live, false)
    };
    if let (Some(p), true) = (progress.as_mut(), roll) {
        let serving = ff.status.as_ref().and_then(|s| s.revision.as_deref());
        p.served_now = serving != Some(p.revision.as_str());
    }

    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let live = services.get_opt(&name).await?;
    let (_, service_written) = apply_if_changed(&services, &name, &desired_service, live).await?;
    if service_written {
        ctx.metrics.wrote("apply_service");
    }

    let (policy_written, policy_removed) =
        network_policy(ctx, ff, &namespace, &name, desired_policy.as_ref()).await?;

    let was_ready = ff
        .status
        .as_ref()
        .is_some_and(|s| is_true(&s.conditions, ConditionType::Ready));
    let mut status = next_status(
        ff,
        machine.as_deref(),
        Ok(deployment.as_ref()),
        progress.as_ref(),
        cfg,
        &now,
    );
    if let Some(snap) = ctx
        .autoscaler
        .get()
        .and_then(|a| a.snapshot(&format!("{namespace}/{name}")))
    {
        status.desired_replicas = i32::try_from(snap.desired).ok();
        status.last_request_time = (snap.last_activity_ms > 0)
            .then(|| Timestamp::from_millisecond(snap.last_activity_ms as i64).ok())
            .flatten()
            .map(Time);
    }
    let ready = find(&status.conditions, ConditionType::Ready).cloned();
    // Revisions past the history lose their source and build Job once a newer one runs.
    let kept: Option<Vec<String>> = progress.as_ref().filter(|p| p.served_now).map(|p| {
        let mut kept: Vec<String> = status
            .revisions
            .iter()
            .map(|r| r.revision.clone())
            .collect();
        kept.push(p.revision.clone());
        kept
    });
    write_status(ctx, ff, status).await?;
    if let Some(kept) = kept {
        let kept: Vec<&str> = kept.iter().map(String::as_str).collect();
        build::collect_garbage(ctx, ff, &namespace, &name, &kept).await?;
    }
    for (type_, reason, note) in notes {
        ctx.publish(ff, type_, reason, note).await;
    }

    let written = [
        (deployment_written || created, "Deployment"),
        (service_written || created, "Service"),
        (
            policy_written || (created && desired_policy.is_some()),
            "NetworkPolicy",
        ),
    ];
    let kinds: Vec<&str> = written.iter().filter(|w| w.0).map(|w| w.1).collect();
    if created {
        let note = format!("created {} {name}", and_list(&kinds));
        ctx.publish(ff, EventType::Normal, "Created", note).await;
    } else if !kinds.is_empty() {
        let note = format!("applied changes to {} {name}", and_list(&kinds));
        ctx.publish(ff, EventType::Normal, "Updated", note).await;
    }
    if policy_removed {
        let note = format!(
            "deleted NetworkPolicy {name}: network policies are off (--network-policy=false)"
        );
        ctx.publish(ff, EventType::Normal, "Updated", note).await;
    }
    if let Some(ready) = ready {
        let now_ready = ready.status == "True";
        if now_ready && !was_ready {
            ctx.publish(ff, EventType::Normal, "Ready", ready.message)
                .await;
        } else if !now_ready && was_ready {
            ctx.publish(ff, EventType::Warning, "NotReady", ready.message)
                .await;
        }
    }
    Ok(Action::requeue(RESYNC))
}

/// Applies the function's NetworkPolicy if it differs; with policies off (`desired`
/// `None`) deletes the one the function controls. Returns (applied, deleted).
async fn network_policy(
    ctx: &Context,
    ff: &FalFunction,
    namespace: &str,
    name: &str,
    desired: Option<&NetworkPolicy>,
) -> Result<(bool, bool)> {
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let live = policies.get_opt(name).await?;
    if let Some(desired) = desired {
        let (_, written) = apply_if_changed(&policies, name, desired, live).await?;
        if written {
            ctx.metrics.wrote("apply_network_policy");
        }
        return Ok((written, false));
    }
    // Policies are off: remove the one this function got while they were on, or its
    // pods would stay closed to everything but the gateway. Anyone else's stays.
    if !live.is_some_and(|p| controlled_by(&p.metadata, ff)) {
        return Ok((false, false));
    }
    match policies.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.metrics.wrote("delete_network_policy");
    Ok((false, true))
}

/// Whether `meta` names `ff` as its controller (so the object is ours to delete).
fn controlled_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ff: &FalFunction,
) -> bool {
    let uid = ff.metadata.uid.as_deref();
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}

/// `A`, `A and B`, `A, B and C`.
fn and_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// Tells the user how to install the CRD when the API does not know FalFunctions.
pub async fn check_crd_installed(client: &Client) -> Result<(), String> {
    let api: Api<FalFunction> = Api::all(client.clone());
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        // A missing API path answers a plain-text 404, which kube turns into a Status
        // whose reason is not NotFound: check the code too.
        Err(kube::Error::Api(status)) if status.code == 404 || status.is_not_found() => Err(format!(
            "the FalFunction CRD ({CRD_NAME}) is not installed; install it with\n    kubectl apply -f crds/falfunctions.yaml\nor\n    fal-operator crd | kubectl apply -f -"
        )),
        Err(e) => Err(format!("cannot list FalFunctions: {}", error_chain(&e))),
    }
}

/// Objects per page of the controller's lists (the API's own default is all; kube-rs's
/// 500).
const LIST_PAGE_SIZE: u32 = 100;

/// A FalFunction as the controller's cache keeps it: without the fields only the API
/// server's bookkeeping reads.
fn slim_for_cache(ff: &mut FalFunction) {
    ff.metadata.managed_fields = None;
    if let Some(annotations) = ff.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Runs the controller until SIGTERM/SIGINT, reconciling at most `concurrency`
/// FalFunctions at a time (kube-rs's default is unbounded: every function at once
/// after a start or a relist).
pub async fn run(ctx: Arc<Context>, concurrency: u16) {
    let client = ctx.client.clone();
    let functions: Api<FalFunction> = Api::all(client.clone());
    // The cache holds every FalFunction for the controller's life: without the
    // bookkeeping no reconcile reads (managedFields, kubectl's last-applied copy of the
    // spec) each takes about a third of the memory. Lists come in pages of
    // LIST_PAGE_SIZE, so a start with thousands of functions never decodes 500 at once.
    let (reader, writer) = reflector::store();
    let cached = reflector(
        writer,
        watcher(
            functions,
            watcher::Config::default()
                .any_semantic()
                .page_size(LIST_PAGE_SIZE),
        )
        .modify(slim_for_cache),
    )
    .applied_objects();
    // Only our own Deployments, Services, build Jobs and NetworkPolicies are watched
    // (their metadata only: kube-rs's `owns`), not every one in the cluster.
    let owned = watcher::Config::default()
        .labels(MANAGED_SELECTOR)
        .page_size(LIST_PAGE_SIZE);
    let mut controller = Controller::for_stream(cached, reader)
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        // A served file's build Job: its end rolls the pods (or reports pip's error).
        .owns(Api::<Job>::all(client.clone()), owned.clone());
    if ctx.config.network_policy.is_some() {
        // An edited or deleted policy is put back at once, not at the next resync.
        controller = controller.owns(Api::<NetworkPolicy>::all(client), owned);
    }
    controller
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(function = %object, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile did not complete"),
            }
        })
        .await;
}

mod build;

#[cfg(test)]
mod tests;
