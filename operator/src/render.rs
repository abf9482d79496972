//! `fal-operator render` and `fal-operator crd`: the controller's objects and the CRD
//! as YAML, without a cluster (review, GitOps, offline tests).

use kube::CustomResourceExt;
use serde::Deserialize;
use serde_yaml::Value;

use crate::catalog::MachineCatalog;
use crate::config::OperatorConfig;
use crate::crd::{FalFunction, GROUP, VERSION};
use crate::falkey::FalKey;
use crate::validate::validate_spec;
use crate::{Error, Result};
use fal_sidecar::auth::keys::KeyRecord;

/// Namespace given to manifests that name none (as `kubectl apply` would with the
/// default context).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Every CRD with the file under `crds/` holding it (the same files are in the chart).
pub fn crd_files() -> Result<Vec<(&'static str, String)>> {
    let yaml = |crd, what: &str| {
        serde_yaml::to_string(&crd).map_err(|source| Error::Yaml {
            context: format!("serializing the {what} CRD"),
            source,
        })
    };
    Ok(vec![
        (
            "falfunctions.yaml",
            yaml(FalFunction::crd(), "FalFunction")?,
        ),
        ("falkeys.yaml", yaml(FalKey::crd(), "FalKey")?),
    ])
}

/// Every CRD as multi-document YAML: what `fal-operator crd` prints, the files of
/// `crds/` one after the other.
pub fn crd_yaml() -> Result<String> {
    Ok(crd_files()?
        .into_iter()
        .map(|(_, yaml)| yaml)
        .collect::<Vec<_>>()
        .join("---\n"))
}

/// Field names of `spec`, from the CRD schema (generated once: it is the slow part).
fn spec_fields() -> &'static [String] {
    static FIELDS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FIELDS.get_or_init(|| {
        let crd = serde_json::to_value(FalFunction::crd()).unwrap_or_default();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    })
}

/// Parses every FalFunction in a (multi-document) manifest and checks it like the
/// apiserver would: kind, unknown spec fields, types, ranges. Errors name the document
/// and the field.
pub fn parse_manifests(text: &str, origin: &str) -> Result<Vec<FalFunction>> {
    let out = parse_documents(text, origin, None)?;
    if out.is_empty() {
        return Err(Error::invalid(
            origin.to_string(),
            "no FalFunction in the manifest",
        ));
    }
    Ok(out)
}

/// The FalFunctions and FalKeys of a manifest (`fal-operator local -f`: keys may sit
/// beside the functions). Either list may be empty.
pub fn parse_functions_and_keys(
    text: &str,
    origin: &str,
) -> Result<(Vec<FalFunction>, Vec<KeyRecord>)> {
    let mut keys = Vec::new();
    let functions = parse_documents(text, origin, Some(&mut keys))?;
    Ok((functions, keys))
}

/// Every FalFunction of `text`; FalKeys go to `keys` when it is given (else they are
/// an error like any other kind).
fn parse_documents(
    text: &str,
    origin: &str,
    mut keys: Option<&mut Vec<KeyRecord>>,
) -> Result<Vec<FalFunction>> {
    let known = spec_fields();
    let mut out = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = index + 1;
        let context = format!("{origin} (document {doc})");
        let value = Value::deserialize(document).map_err(|source| Error::Yaml {
            context: context.clone(),
            source,
        })?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        if let Some(keys) = keys
            .as_mut()
            .filter(|_| fal_sidecar::auth::keys::is_key_document(&value))
        {
            let rec = fal_sidecar::auth::keys::record_from_document(value, &context)
                .map_err(|e| Error::invalid(context.clone(), e))?;
            keys.push(rec);
            continue;
        }
        let api_version = value.get("apiVersion").and_then(Value::as_str);
        let kind = value.get("kind").and_then(Value::as_str);
        let expected = format!("{GROUP}/{VERSION}");
        if api_version != Some(expected.as_str()) || kind != Some("FalFunction") {
            return Err(Error::invalid(
                format!("{context}: apiVersion/kind"),
                format!(
                    "expected {expected} FalFunction, found {} {}",
                    api_version.unwrap_or("<none>"),
                    kind.unwrap_or("<none>")
                ),
            ));
        }
        if let Some(spec) = value.get("spec").and_then(Value::as_mapping) {
            for key in spec.keys() {
                let key = key.as_str().unwrap_or("<non-string key>");
                if !known.iter().any(|k| k == key) {
                    return Err(Error::invalid(
                        format!("{context}: spec.{key}"),
                        "unknown field",
                    ));
                }
            }
        }
        // Parse from text again (not from `value`) so serde_yaml reports the field path.
        let text = serde_yaml::to_string(&value).map_err(|source| Error::Yaml {
            context: context.clone(),
            source,
        })?;
        let mut ff: FalFunction = serde_yaml::from_str(&text).map_err(|source| Error::Yaml {
            context: context.clone(),
            source,
        })?;
        if ff.metadata.name.as_deref().unwrap_or("").is_empty() {
            return Err(Error::invalid(
                format!("{context}: metadata.name"),
                "required",
            ));
        }
        if ff.metadata.namespace.is_none() {
            ff.metadata.namespace = Some(DEFAULT_NAMESPACE.to_string());
        }
        validate_spec(&ff.spec).map_err(|e| match e {
            Error::InvalidSpec { field, message } => {
                Error::invalid(format!("{context}: {field}"), message)
            }
            other => other,
        })?;
        crate::labels::identity(&ff).map_err(|e| match e {
            Error::InvalidSpec { field, message } => {
                Error::invalid(format!("{context}: {field}"), message)
            }
            other => other,
        })?;
        out.push(ff);
    }
    Ok(out)
}

fn to_yaml<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_yaml::to_string(value).map_err(|source| Error::Yaml {
        context: "serializing a rendered object".into(),
        source,
    })
}

/// The objects the controller would apply for every FalFunction in `text`, as
/// multi-document YAML (Deployment, Service, then NetworkPolicy unless they are off, per
/// function; a served file's environments claim and build Job first). Owner references
/// are absent: they need the uid the apiserver assigns.
pub fn render(
    text: &str,
    origin: &str,
    catalog: &MachineCatalog,
    cfg: &OperatorConfig,
) -> Result<String> {
    let mut docs = Vec::new();
    for ff in parse_manifests(text, origin)? {
        if ff.spec.source.is_some() {
            // A served file: the environments claim (made when missing) and the build
            // Job its Deployment waits for.
            let ns = ff
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(DEFAULT_NAMESPACE);
            docs.push(to_yaml(&crate::environment::environments_claim(
                ns,
                &cfg.environments,
            ))?);
            docs.push(to_yaml(&ff.build_job(cfg)?)?);
        }
        docs.push(to_yaml(&ff.deployment(catalog, cfg)?)?);
        docs.push(to_yaml(&ff.service()?)?);
        if let Some(np) = &cfg.network_policy {
            docs.push(to_yaml(&ff.network_policy(np)?)?);
        }
    }
    Ok(docs
        .into_iter()
        .map(|d| format!("---\n{d}"))
        .collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;

    const SEED: &str = include_str!("../../examples/seed-app.yaml");
    const CPU: &str = include_str!("../../examples/cpu-app.yaml");
    const BAD: &str = include_str!("../../examples/bad-app.yaml");

    fn render_default(text: &str) -> Result<String> {
        render(
            text,
            "test.yaml",
            &MachineCatalog::builtin(),
            &OperatorConfig::default(),
        )
    }

    fn docs(out: &str) -> Vec<serde_yaml::Value> {
        serde_yaml::Deserializer::from_str(out)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect()
    }

    #[test]
    fn committed_crds_are_up_to_date() {
        let committed = [
            (
                "falfunctions.yaml",
                include_str!("../../crds/falfunctions.yaml"),
            ),
            ("falkeys.yaml", include_str!("../../crds/falkeys.yaml")),
        ];
        let generated = crd_files().unwrap();
        assert_eq!(
            generated.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
            committed.iter().map(|(f, _)| *f).collect::<Vec<_>>()
        );
        for ((file, text), (_, want)) in committed.iter().zip(&generated) {
            assert!(
                text == want,
                "crds/{file} is stale: run `cargo run -p fal-operator -- crd --dir crds` \
                 and copy crds/*.yaml to charts/fal-serverless/crds/"
            );
        }
        let all = crd_yaml().unwrap();
        let docs = docs(&all);
        let kinds: Vec<_> = docs
            .iter()
            .map(|d| d["spec"]["names"]["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["FalFunction", "FalKey"]);
    }

    #[test]
    fn seed_example_renders_a_gpu_deployment_service_and_network_policy() {
        let out = render_default(SEED).unwrap();
        let docs = docs(&out);
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[2]["kind"], "NetworkPolicy");
        assert_eq!(docs[2]["apiVersion"], "networking.k8s.io/v1");
        let d: Deployment = serde_yaml::from_value(docs[0].clone()).unwrap();
        let s: Service = serde_yaml::from_value(docs[1].clone()).unwrap();
        let pod = d.spec.unwrap().template.spec.unwrap();
        let limits = pod.containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "1");
        assert_eq!(
            pod.containers[0].ports.clone().unwrap()[0].container_port,
            8080
        );
        assert!(pod.affinity.is_some());
        assert_eq!(s.metadata.name, d.metadata.name);
        assert!(
            out.starts_with("---\napiVersion: apps/v1\nkind: Deployment\n"),
            "{out}"
        );
    }

    #[test]
    fn cpu_example_renders_without_gpu() {
        let out = render_default(CPU).unwrap();
        assert!(!out.contains("nvidia.com/gpu"), "{out}");
        assert_eq!(docs(&out).len(), 3);
    }

    #[test]
    fn network_policies_off_render_none() {
        let cfg = OperatorConfig {
            network_policy: None,
            ..OperatorConfig::default()
        };
        let out = render(CPU, "cpu.yaml", &MachineCatalog::builtin(), &cfg).unwrap();
        let kinds: Vec<_> = docs(&out)
            .iter()
            .map(|d| d["kind"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(kinds, ["Deployment", "Service"]);
    }

    #[test]
    fn bad_example_fails_naming_the_field() {
        let err = render_default(BAD).unwrap_err().to_string();
        assert!(err.contains("spec."), "{err}");
    }

    #[test]
    fn multiple_documents_render_in_order() {
        let two = format!("{SEED}\n---\n{CPU}\n---\n");
        let out = render_default(&two).unwrap();
        let kinds: Vec<_> = docs(&out)
            .iter()
            .map(|d| d["kind"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "Deployment",
                "Service",
                "NetworkPolicy",
                "Deployment",
                "Service",
                "NetworkPolicy"
            ]
        );
    }

    fn err(text: &str) -> String {
        render_default(text).unwrap_err().to_string()
    }

    const HEAD: &str =
        "apiVersion: fal.serverless.dev/v1alpha1\nkind: FalFunction\nmetadata: {name: app}\n";

    #[test]
    fn invalid_manifests_name_the_field() {
        let e = err(&format!("{HEAD}spec: {{exposedPort: 80}}"));
        assert!(e.contains("spec") && e.contains("image"), "{e}");
        let e = err(&format!("{HEAD}spec: {{image: a, exposedPort: nope}}"));
        assert!(e.contains("spec.exposedPort"), "{e}");
        let e = err(&format!("{HEAD}spec: {{image: a, exposedPort: 70000}}"));
        assert!(e.contains("spec.exposedPort: 70000 is out of range"), "{e}");
        let e = err(&format!(
            "{HEAD}spec: {{image: a, minReplicas: 2, maxReplicas: 1}}"
        ));
        assert!(e.contains("spec.minReplicas"), "{e}");
        let e = err(&format!("{HEAD}spec: {{image: a, gpus: 2}}"));
        assert!(e.contains("spec.gpus: unknown field"), "{e}");
        let e = err(&format!("{HEAD}spec: {{image: a, machineType: GPU-B200}}"));
        assert!(
            e.starts_with("spec.machineType: unknown machine type"),
            "{e}"
        );
        let e = err("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n");
        assert!(e.contains("apiVersion/kind"), "{e}");
        let e = err("apiVersion: fal.serverless.dev/v1alpha1\nkind: FalFunction\nmetadata: {}\nspec: {image: a}\n");
        assert!(e.contains("metadata.name"), "{e}");
        let e = err("apiVersion: fal.serverless.dev/v1alpha1\nkind: FalFunction\nmetadata: {name: My_App}\nspec: {image: a}\n");
        assert!(e.contains("metadata.name"), "{e}");
        let e = err("");
        assert!(e.contains("no FalFunction"), "{e}");
        let e = err("a: [");
        assert!(e.contains("test.yaml (document 1)"), "{e}");
    }

    #[test]
    fn missing_namespace_defaults() {
        let out = render_default(&format!("{HEAD}spec: {{image: a}}")).unwrap();
        assert!(out.contains("namespace: default"), "{out}");
    }

    #[test]
    fn catalog_override_changes_the_render() {
        let catalog =
            MachineCatalog::from_yaml("machineTypes: {XS: {cpu: 100m, memory: 128Mi}}", "c")
                .unwrap();
        let out = render(
            &format!("{HEAD}spec: {{image: a}}"),
            "t",
            &catalog,
            &OperatorConfig::default(),
        )
        .unwrap();
        assert!(out.contains("cpu: 100m"), "{out}");
    }
}
