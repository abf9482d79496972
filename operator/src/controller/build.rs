//! The reconcile of a served file's environment (`spec.source`): find or start the
//! newest revision's build Job, read how it ended, and after a rollout delete the
//! sources and build Jobs of revisions no longer kept. A thin shell: the objects come
//! from [`crate::environment`], the status from [`crate::status`].

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::events::EventType;
use kube::Api;

use super::{controlled_by, Context};
use crate::conditions::{find, ConditionType, Reason};
use crate::crd::{FalFunction, FunctionSource};
use crate::environment::{
    build_job_name, build_state, environments_claim, failure_log, BuildState, BUILD_COMPONENT,
    REVISION_LABEL, SOURCE_COMPONENT,
};
use crate::labels::FUNCTION_LABEL;
use crate::status::{BuildPhase, SourceProgress};
use crate::{Error, Result};

/// An event to publish once the status is written: (type, reason, note).
pub(super) type Note = (EventType, &'static str, String);

/// Where the environment of `src` (the function's newest revision) stands, and the
/// events that says. Starts its build Job when there is none; never rebuilds what the
/// serving revision already runs on.
pub(super) async fn progress(
    ctx: &Context,
    ff: &FalFunction,
    namespace: &str,
    name: &str,
    src: &FunctionSource,
) -> Result<(SourceProgress, Vec<Note>)> {
    let previous = ff.status.clone().unwrap_or_default();
    let mut p = SourceProgress {
        revision: src.revision.clone(),
        environment: src.environment(),
        requirements: src.requirements_text(),
        build: BuildPhase::Built,
        served_now: false,
    };
    let serving_env = previous.revisions.last().map(|r| r.environment.as_str());
    if previous.revision.as_deref() == Some(src.revision.as_str())
        || serving_env == Some(p.environment.as_str())
    {
        return Ok((p, Vec::new()));
    }
    let job_name = build_job_name(name, &src.revision);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let mut notes = Vec::new();
    let was = find(&previous.conditions, ConditionType::EnvironmentReady);
    let was_reason = |r: Reason| was.is_some_and(|c| c.reason == r.as_str());
    p.build = match jobs.get_opt(&job_name).await? {
        None => {
            // Pods would wait forever for a missing source: say so instead.
            let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
            if maps.get_opt(&src.config_map).await?.is_none() {
                return Err(Error::invalid(
                    "spec.source.configMap",
                    format!(
                        "ConfigMap {} (the source of revision {}) does not exist in namespace {namespace}: serve the file again with `fal-operator function serve`",
                        src.config_map, src.revision
                    ),
                ));
            }
            ensure_claim(ctx, namespace).await?;
            let job = ff.build_job(&ctx.config)?;
            match jobs.create(&PostParams::default(), &job).await {
                Ok(_) => ctx.metrics.wrote("create_build_job"),
                // Another reconcile made it a moment ago.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            notes.push((
                EventType::Normal,
                "BuildStarted",
                format!(
                    "building environment {} ({}) for revision {}: job {job_name}",
                    p.environment, p.requirements, src.revision
                ),
            ));
            BuildPhase::Building { job: job_name }
        }
        Some(job) => match build_state(&job) {
            BuildState::Running => BuildPhase::Building { job: job_name },
            BuildState::Succeeded => {
                if was_reason(Reason::Building) {
                    notes.push((
                        EventType::Normal,
                        "BuildSucceeded",
                        format!(
                            "environment {} built for revision {} (job {job_name})",
                            p.environment, src.revision
                        ),
                    ));
                }
                BuildPhase::Built
            }
            BuildState::Failed(why) => {
                let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
                let selector = format!("batch.kubernetes.io/job-name={job_name}");
                let listed = pods.list(&ListParams::default().labels(&selector)).await?;
                let message = failure_log(&listed.items).unwrap_or(why);
                let reported = was_reason(Reason::EnvironmentFailed)
                    && was.is_some_and(|c| c.message.contains(&src.revision));
                if !reported {
                    notes.push((
                        EventType::Warning,
                        "BuildFailed",
                        format!(
                            "the environment build of revision {} failed (job {job_name}):\n{message}",
                            src.revision
                        ),
                    ));
                }
                BuildPhase::Failed {
                    job: job_name,
                    message,
                }
            }
        },
    };
    Ok((p, notes))
}

/// Creates the namespace's environments claim unless it exists (an existing one, the
/// operator's or an administrator's, is left as it is).
async fn ensure_claim(ctx: &Context, namespace: &str) -> Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let cfg = &ctx.config.environments;
    if claims.get_opt(&cfg.claim).await?.is_some() {
        return Ok(());
    }
    match claims
        .create(&PostParams::default(), &environments_claim(namespace, cfg))
        .await
    {
        Ok(_) => ctx.metrics.wrote("create_environments_claim"),
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Deletes the source ConfigMaps and build Jobs of `name`'s revisions other than
/// `kept` (the ones it controls). Returns how many objects went.
pub(super) async fn collect_garbage(
    ctx: &Context,
    ff: &FalFunction,
    namespace: &str,
    name: &str,
    kept: &[&str],
) -> Result<usize> {
    let stale = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        let revision = meta.labels.as_ref().and_then(|l| l.get(REVISION_LABEL));
        controlled_by(meta, ff) && revision.is_some_and(|r| !kept.contains(&r.as_str()))
    };
    let selector = |component: &str| {
        format!("{FUNCTION_LABEL}={name},app.kubernetes.io/component={component}")
    };
    let mut deleted = 0;
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let listed = maps
        .list_metadata(&ListParams::default().labels(&selector(SOURCE_COMPONENT)))
        .await?;
    for m in listed.items.iter().filter(|m| stale(&m.metadata)) {
        let n = m.metadata.name.clone().unwrap_or_default();
        deleted += delete(&maps, &n, &DeleteParams::default()).await?;
    }
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let listed = jobs
        .list_metadata(&ListParams::default().labels(&selector(BUILD_COMPONENT)))
        .await?;
    for j in listed.items.iter().filter(|j| stale(&j.metadata)) {
        let n = j.metadata.name.clone().unwrap_or_default();
        // Background: the Job's pod goes with it.
        deleted += delete(&jobs, &n, &DeleteParams::background()).await?;
    }
    if deleted > 0 {
        ctx.metrics.wrote("delete_old_revisions");
    }
    Ok(deleted)
}

async fn delete<K>(api: &Api<K>, name: &str, dp: &DeleteParams) -> Result<usize>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, dp).await {
        Ok(_) => Ok(1),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(0),
        Err(e) => Err(e.into()),
    }
}
