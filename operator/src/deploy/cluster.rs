//! `function serve` into the cluster of the current kubeconfig: the revision's source
//! goes into an immutable ConfigMap owned by the FalFunction, the FalFunction gets the
//! revision in `spec.source` (server-side apply), and the controller builds the
//! environment (a Job) and rolls the pods once it is built. The CLI follows: it prints
//! the build's log as it runs and returns once the revision serves, or with pip's
//! error once the build failed (the previous revision keeps serving then).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use super::{Deployed, Deployment};
use crate::conditions::{find, ConditionType, Reason};
use crate::crd::{FalFunction, FalFunctionSpec, FunctionSource};
use crate::environment::{build_job_name, revision_labels, SOURCE_COMPONENT};
use crate::Result;

/// Field manager of the FalFunctions `function serve` applies.
pub const FIELD_MANAGER: &str = "fal-operator-function-serve";
/// Annotation of a served FalFunction: the fingerprint of what made its newest revision
/// (the same file, arguments and settings serve the same revision again).
pub const FINGERPRINT_ANNOTATION: &str = "fal.serverless.dev/fingerprint";
/// Key of a revision's metadata in its ConfigMap.
pub const METADATA_KEY: &str = "revision.json";

/// Key (and file name in the pod) of the source in the revision's ConfigMap: the
/// file's own name when a ConfigMap key can hold it.
pub fn file_key(filename: &str) -> String {
    let base = std::path::Path::new(filename)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ok = !base.is_empty()
        && base != METADATA_KEY
        && !base.starts_with('.')
        && base.len() <= 253
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        base
    } else {
        "app.py".to_string()
    }
}

/// Name of the ConfigMap holding `revision` of `alias`.
pub fn config_map_name(alias: &str, revision: &str) -> String {
    format!("{alias}-{revision}")
}

impl Deployment {
    /// `spec.source` of `revision`.
    pub fn source(&self, revision: &str) -> FunctionSource {
        FunctionSource {
            revision: revision.to_string(),
            config_map: config_map_name(&self.alias, revision),
            file: file_key(&self.filename),
            function: self.isolated.function.clone(),
            requirements: self.isolated.requirements.clone(),
            python_version: self.isolated.python_version.clone(),
            index_url: self.index.index_url.clone(),
            find_links: self.index.find_links.clone(),
            no_index: self.index.no_index,
        }
    }

    /// The FalFunction serving `revision` (what `function serve` applies).
    pub fn function_object(&self, revision: &str) -> Result<FalFunction> {
        let mut spec: FalFunctionSpec = self.spec("")?;
        spec.image = String::new();
        spec.source = Some(self.source(revision));
        let mut ff = FalFunction::new(&self.alias, spec);
        ff.metadata.namespace = Some(self.namespace.clone());
        ff.metadata.annotations = Some(BTreeMap::from([(
            FINGERPRINT_ANNOTATION.to_string(),
            self.fingerprint(),
        )]));
        Ok(ff)
    }

    /// The immutable ConfigMap of `revision`: the file and what made it.
    pub fn source_config_map(&self, revision: &str) -> ConfigMap {
        let src = self.source(revision);
        let metadata = json!({
            "revision": revision,
            "function": self.isolated.function,
            "filename": self.filename,
            "fingerprint": self.fingerprint(),
            "environment": src.environment(),
            "isolated": self.isolated,
            "index": self.index,
        });
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(src.config_map.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(revision_labels(&self.alias, revision, SOURCE_COMPONENT)),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([
                (src.file.clone(), self.source.clone()),
                (METADATA_KEY.to_string(), format!("{metadata:#}\n")),
            ])),
            immutable: Some(true),
            ..ConfigMap::default()
        }
    }
}

fn api_error(what: &str, e: kube::Error) -> String {
    match e {
        // Server-side apply creates: a 404 that names no object (a namespace) is the
        // API itself missing.
        kube::Error::Api(s) if s.code == 404 && what == "apply" && s.reason != "NotFound" => format!(
            "the FalFunction CRD ({}) is not installed in this cluster: helm install the chart, or `fal-operator crd | kubectl apply --server-side -f -`",
            crate::crd::CRD_NAME
        ),
        kube::Error::Api(s) if s.code == 403 => format!("{what}: not allowed: {}", s.message),
        e => format!("{what}: {}", crate::error_chain(&e)),
    }
}

/// How long `function serve` waits for the operator to see its FalFunction before it
/// asks whether one runs.
const NO_CONTROLLER_HINT: Duration = Duration::from_secs(30);

/// What `register` waits for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Longest wait for the build and the rollout.
    pub timeout: Duration,
}

/// Registers `d` in the cluster (see the module docs); the build log goes to stderr.
pub async fn register(client: Client, d: &Deployment, opts: &Options) -> Result<Deployed, String> {
    let functions: Api<FalFunction> = Api::namespaced(client.clone(), &d.namespace);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &d.namespace);
    let existing = functions
        .get_opt(&d.alias)
        .await
        .map_err(|e| api_error("reading the FalFunction", e))?;
    if let Some(ff) = existing.as_ref().filter(|ff| ff.spec.source.is_none()) {
        return Err(format!(
            "FalFunction {}/{} exists and runs the image {:?}: pick another --alias, or delete it first",
            d.namespace, d.alias, ff.spec.image
        ));
    }
    let fingerprint = d.fingerprint();
    let same = existing.as_ref().and_then(|ff| {
        let src = ff.spec.source.as_ref()?;
        let annotated = ff.annotations().get(FINGERPRINT_ANNOTATION)?;
        // A revision whose build failed is not served again: the serve is a retry.
        let failed = ff.status.as_ref().is_some_and(|s| {
            find(&s.conditions, ConditionType::EnvironmentReady).is_some_and(|c| {
                c.reason == Reason::EnvironmentFailed.as_str() && c.message.contains(&src.revision)
            })
        });
        (*annotated == fingerprint && !failed)
            .then(|| (src.revision.clone(), ff.metadata.generation))
    });
    let (revision, generation, new) = match same {
        Some((revision, generation)) => (revision, generation.unwrap_or(0), false),
        None => {
            let revision = uuid::Uuid::new_v4().to_string();
            let generation = apply(&functions, &maps, d, &revision).await?;
            (revision, generation, true)
        }
    };
    let ff = follow(&client, d, &revision, generation, opts).await?;
    let status = ff.status.unwrap_or_default();
    let url = status.app_url.or(status.url).unwrap_or_default();
    Ok(Deployed { revision, new, url })
}

/// Writes the revision's ConfigMap and applies the FalFunction; nothing is left behind
/// when the apply fails. Returns the FalFunction's generation.
///
/// The ConfigMap gets its owner only after the apply: the controller deletes the
/// sources its function controls beyond the history, and one created a moment before
/// the FalFunction names it must not look like an old revision's.
async fn apply(
    functions: &Api<FalFunction>,
    maps: &Api<ConfigMap>,
    d: &Deployment,
    revision: &str,
) -> Result<i64, String> {
    let ff = d.function_object(revision).map_err(|e| e.to_string())?;
    let cm = d.source_config_map(revision);
    let name = cm.metadata.name.clone().unwrap_or_default();
    maps.create(&PostParams::default(), &cm)
        .await
        .map_err(|e| api_error("storing the source in a ConfigMap", e))?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = match functions.patch(&d.alias, &params, &Patch::Apply(&ff)).await {
        Ok(applied) => applied,
        Err(e) => {
            let _ = maps.delete(&name, &DeleteParams::default()).await;
            return Err(api_error("apply", e));
        }
    };
    // Its controller owner: the controller deletes only the sources its function controls.
    let owner = applied.controller_owner_ref(&());
    let patch = json!({"metadata": {"ownerReferences": [owner]}});
    maps.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error("owning the source ConfigMap", e))?;
    Ok(applied.metadata.generation.unwrap_or(0))
}

/// Follows the FalFunction until `revision` serves (returned) or its build failed; the
/// build's log goes to stderr meanwhile.
async fn follow(
    client: &Client,
    d: &Deployment,
    revision: &str,
    generation: i64,
    opts: &Options,
) -> Result<FalFunction, String> {
    let functions: Api<FalFunction> = Api::namespaced(client.clone(), &d.namespace);
    let job = build_job_name(&d.alias, revision);
    let mut logs: Option<tokio::task::JoinHandle<()>> = None;
    let watch = async {
        let mut stream = watcher::watch_object(functions, &d.alias).boxed();
        // Nothing happens without a controller: say so once if it has not answered.
        let quiet = tokio::time::sleep(NO_CONTROLLER_HINT);
        tokio::pin!(quiet);
        let (mut seen, mut hinted) = (false, false);
        loop {
            let event = tokio::select! {
                event = stream.next() => match event {
                    Some(event) => event,
                    None => break,
                },
                () = &mut quiet, if !hinted => {
                    hinted = true;
                    if !seen {
                        eprintln!(
                            "waiting for the operator: FalFunction {}/{} generation {generation} not seen after {NO_CONTROLLER_HINT:?}; is `fal-operator controller` running?",
                            d.namespace, d.alias
                        );
                    }
                    continue;
                }
            };
            let ff = match event {
                Ok(Some(ff)) => ff,
                Ok(None) => {
                    return Err(format!(
                        "FalFunction {}/{} was deleted",
                        d.namespace, d.alias
                    ))
                }
                Err(e) => return Err(format!("watching the FalFunction: {e}")),
            };
            let status = ff.status.clone().unwrap_or_default();
            seen |= status.observed_generation.unwrap_or(0) >= generation;
            if status.revision.as_deref() == Some(revision) {
                return Ok(ff);
            }
            let current = |t: ConditionType| {
                find(&status.conditions, t)
                    .filter(|c| c.observed_generation.unwrap_or(0) >= generation)
                    .cloned()
            };
            if let Some(c) = current(ConditionType::EnvironmentReady) {
                if c.reason == Reason::Building.as_str() && logs.is_none() {
                    eprintln!("{}", c.message);
                    logs = Some(tokio::spawn(stream_build_log(
                        client.clone(),
                        d.namespace.clone(),
                        job.clone(),
                    )));
                }
                if c.reason == Reason::EnvironmentFailed.as_str() {
                    return Err(format!("the environment build failed: {}", c.message));
                }
            }
            if let Some(c) = current(ConditionType::Ready) {
                if [Reason::InvalidSpec, Reason::UnknownMachineType]
                    .iter()
                    .any(|r| c.reason == r.as_str())
                {
                    return Err(format!("the operator refused the function: {}", c.message));
                }
            }
        }
        Err("the watch of the FalFunction ended".to_string())
    };
    let outcome = match tokio::time::timeout(opts.timeout, watch).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "revision {revision} is not serving after {:?}: see `kubectl describe falfunction {} -n {}` and `kubectl logs job/{job} -n {}`",
            opts.timeout, d.alias, d.namespace, d.namespace
        )),
    };
    match logs {
        // The build is over by now: its last lines come before the result (a kubelet
        // ends a followed log when the container exits; one that does not gets 2 s).
        Some(mut task) => {
            let ended = tokio::time::timeout(Duration::from_secs(2), &mut task).await;
            if ended.is_err() {
                task.abort();
            }
        }
        None if outcome.is_ok() => {
            let env = d.environment();
            eprintln!("environment {env} is built already");
        }
        None => {}
    }
    outcome
}

/// Prints the log of the build Job's pod to stderr as it comes (once the pod runs).
async fn stream_build_log(client: Client, namespace: String, job: String) {
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let selector = format!("batch.kubernetes.io/job-name={job}");
    let started = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase != "Pending")
    };
    let pod = loop {
        match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(list) => {
                if let Some(p) = list.items.into_iter().find(started) {
                    break p;
                }
            }
            Err(e) => {
                eprintln!("(the build log is not readable here: {e}; `kubectl logs job/{job} -n {namespace}`)");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let params = LogParams {
        follow: true,
        ..LogParams::default()
    };
    let name = pod.name_any();
    match pods.log_stream(&name, &params).await {
        Ok(reader) => {
            let mut lines = reader.lines();
            while let Ok(Some(line)) = lines.try_next().await {
                eprintln!("{line}");
            }
        }
        Err(e) => eprintln!(
            "(the build log is not readable here: {e}; `kubectl logs job/{job} -n {namespace}`)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::{IndexSettings, Isolated};
    use crate::environment::REVISION_LABEL;

    fn deployment(filename: &str) -> Deployment {
        Deployment {
            namespace: "team-a".into(),
            alias: "app".into(),
            filename: filename.into(),
            source: "print('hi')\n".into(),
            isolated: Isolated {
                function: "serve_it".into(),
                line: 4,
                requirements: vec!["flask".into()],
                keep_alive: Some(300),
                ..Isolated::default()
            },
            auth: crate::crd::FunctionAuth::Public,
            index: IndexSettings {
                find_links: vec!["/wheels".into()],
                no_index: true,
                ..IndexSettings::default()
            },
        }
    }

    #[test]
    fn file_keys_are_the_file_name_when_a_key_can_hold_it() {
        assert_eq!(file_key("/home/me/src/app.py"), "app.py");
        assert_eq!(file_key("my_app-2.py"), "my_app-2.py");
        for odd in [
            "",
            "/",
            "weird name.py",
            ".hidden.py",
            "revision.json",
            "ünï.py",
        ] {
            assert_eq!(file_key(odd), "app.py", "{odd:?}");
        }
    }

    #[test]
    fn the_function_serves_the_revision_without_an_image() {
        let d = deployment("src/main.py");
        let ff = d.function_object("r1").unwrap();
        assert_eq!(ff.metadata.namespace.as_deref(), Some("team-a"));
        assert!(ff.spec.image.is_empty());
        let src = ff.spec.source.as_ref().unwrap();
        assert_eq!(
            (
                src.revision.as_str(),
                src.config_map.as_str(),
                src.file.as_str(),
                src.function.as_str()
            ),
            ("r1", "app-r1", "main.py", "serve_it")
        );
        assert_eq!(
            (src.find_links.clone(), src.no_index),
            (vec!["/wheels".to_string()], true)
        );
        assert_eq!(
            src.environment(),
            d.environment(),
            "the environment local mode builds"
        );
        assert_eq!(ff.spec.keep_alive, 300);
        assert_eq!(ff.spec.auth, crate::crd::FunctionAuth::Public);
        assert_eq!(
            ff.metadata.annotations.unwrap()[FINGERPRINT_ANNOTATION],
            d.fingerprint()
        );
        crate::validate::validate_spec(&ff.spec).unwrap();
    }

    #[test]
    fn the_source_config_map_is_immutable_and_says_what_made_it() {
        let d = deployment("src/main.py");
        let cm = d.source_config_map("r1");
        assert_eq!(cm.immutable, Some(true));
        assert_eq!(cm.metadata.name.as_deref(), Some("app-r1"));
        let labels = cm.metadata.labels.unwrap();
        assert_eq!(labels[REVISION_LABEL], "r1");
        assert_eq!(labels["app.kubernetes.io/component"], SOURCE_COMPONENT);
        let data = cm.data.unwrap();
        assert_eq!(data["main.py"], d.source);
        let meta: serde_json::Value = serde_json::from_str(&data[METADATA_KEY]).unwrap();
        assert_eq!(meta["fingerprint"], d.fingerprint());
        assert_eq!(meta["environment"], d.environment());
        assert_eq!(meta["filename"], "src/main.py");
    }
}
