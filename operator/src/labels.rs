//! Names and labels of the objects a FalFunction owns.

use std::collections::BTreeMap;

use kube::{Resource, ResourceExt};

use crate::crd::FalFunction;
use crate::{Error, Result};

/// Label holding the function name; the (immutable) pod selector uses only this.
pub const FUNCTION_LABEL: &str = "fal.serverless.dev/function";
/// `app.kubernetes.io/managed-by` value; the controller watches owned objects by it.
pub const MANAGED_BY: &str = "fal-operator";
/// Label selector matching every object the operator manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=fal-operator";

/// Namespace and name of a FalFunction, checked: its name becomes a Service name, so it
/// must be a DNS-1035 label (the CRD enforces the same at apply time).
pub fn identity(ff: &FalFunction) -> Result<(String, String)> {
    let name = ff.name_any();
    if !is_dns1035_label(&name) {
        return Err(Error::invalid(
            "metadata.name",
            format!(
                "{name:?} must be at most 63 lowercase letters, digits or '-', start with a letter and end with a letter or digit"
            ),
        ));
    }
    let namespace = ff
        .meta()
        .namespace
        .clone()
        .ok_or_else(|| Error::invalid("metadata.namespace", "a FalFunction is namespaced"))?;
    Ok((namespace, name))
}

pub fn is_dns1035(s: &str) -> bool {
    is_dns1035_label(s)
}

fn is_dns1035_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Standard labels of every owned object and pod.
/// Metadata of an object the function owns: its name, namespace, standard labels and
/// the controller owner reference (so deleting the FalFunction deletes it).
pub fn owned_meta(
    ff: &FalFunction,
) -> Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta> {
    let (namespace, name) = identity(ff)?;
    Ok(k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        labels: Some(labels(&name)),
        name: Some(name),
        namespace: Some(namespace),
        owner_references: ff.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    })
}

pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), name.to_string()),
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            "function".to_string(),
        ),
        (
            "app.kubernetes.io/part-of".to_string(),
            "fal-serverless".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
        (FUNCTION_LABEL.to_string(), name.to_string()),
    ])
}

/// Pod selector of the Deployment and Service.
pub fn selector(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(FUNCTION_LABEL.to_string(), name.to_string())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::FalFunctionSpec;

    #[test]
    fn names_must_be_dns1035_labels() {
        for ok in ["a", "app", "my-app-2", &"a".repeat(63)] {
            assert!(is_dns1035_label(ok), "{ok}");
        }
        for bad in ["", "1app", "App", "app-", "a.b", &"a".repeat(64)] {
            assert!(!is_dns1035_label(bad), "{bad}");
        }
        let mut ff = FalFunction::new("Bad", FalFunctionSpec::with_image("x"));
        ff.metadata.namespace = Some("ns".into());
        let err = identity(&ff).unwrap_err().to_string();
        assert!(err.starts_with("metadata.name:"), "{err}");
        let ff = FalFunction::new("good", FalFunctionSpec::with_image("x"));
        let err = identity(&ff).unwrap_err().to_string();
        assert!(err.starts_with("metadata.namespace:"), "{err}");
    }

    #[test]
    fn selector_is_a_subset_of_labels() {
        let labels = labels("app");
        for (k, v) in selector("app") {
            assert_eq!(labels.get(&k), Some(&v));
        }
        assert_eq!(labels["app.kubernetes.io/managed-by"], MANAGED_BY);
        assert_eq!(
            MANAGED_SELECTOR,
            format!("app.kubernetes.io/managed-by={MANAGED_BY}")
        );
    }
}
