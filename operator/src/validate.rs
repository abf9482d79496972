//! Client-side checks mirroring the CRD schema, so `render` and the controller report a
//! bad value with its field even where the apiserver did not check (an older CRD, or
//! no cluster at all).

use crate::crd::FalFunctionSpec;
use crate::sidecar::{SIDECAR_ADMIN_PORT, SIDECAR_HTTP_PORT, SIDECAR_QUEUE_PORT};
use crate::{Error, Result};

fn range(field: &str, value: i32, min: i32, max: i32) -> Result<()> {
    if value < min || value > max {
        return Err(Error::invalid(
            format!("spec.{field}"),
            format!("{value} is out of range {min}..={max}"),
        ));
    }
    Ok(())
}

/// Checks a spec the way the CRD schema and its CEL rules do.
pub fn validate_spec(spec: &FalFunctionSpec) -> Result<()> {
    match (&spec.source, spec.image.is_empty()) {
        (None, true) => {
            return Err(Error::invalid(
                "spec.image",
                "must not be empty (or serve a Python file: spec.source)",
            ))
        }
        (Some(_), false) => {
            return Err(Error::invalid(
                "spec.source",
                "set either image or source, not both",
            ))
        }
        (None, false) if spec.image.trim().is_empty() => {
            return Err(Error::invalid("spec.image", "must not be empty"))
        }
        (Some(src), true) => {
            for (field, v) in [
                ("revision", &src.revision),
                ("configMap", &src.config_map),
                ("file", &src.file),
                ("function", &src.function),
            ] {
                if v.trim().is_empty() {
                    return Err(Error::invalid(
                        format!("spec.source.{field}"),
                        "must not be empty",
                    ));
                }
            }
            if spec.command.is_some() || spec.args.is_some() {
                return Err(Error::invalid(
                    "spec.command",
                    "a served file runs the runner (python -m fal_runner serve): command and args belong to image functions",
                ));
            }
        }
        (None, false) => {}
    }
    range("exposedPort", spec.exposed_port, 1, 65535)?;
    if [SIDECAR_HTTP_PORT, SIDECAR_QUEUE_PORT, SIDECAR_ADMIN_PORT].contains(&spec.exposed_port) {
        return Err(Error::invalid(
            "spec.exposedPort",
            format!(
                "{} is taken by the fal-sidecar (9080, 9081 and 9090 are reserved)",
                spec.exposed_port
            ),
        ));
    }
    if spec.machine_type.is_empty() || spec.machine_type.len() > 63 {
        return Err(Error::invalid(
            "spec.machineType",
            "must be 1 to 63 characters",
        ));
    }
    range("keepAlive", spec.keep_alive, 0, i32::MAX)?;
    range("minReplicas", spec.min_replicas, 0, i32::MAX)?;
    range("maxReplicas", spec.max_replicas, 1, i32::MAX)?;
    if spec.min_replicas > spec.max_replicas {
        return Err(Error::invalid(
            "spec.minReplicas",
            format!(
                "minReplicas ({}) must be less than or equal to maxReplicas ({})",
                spec.min_replicas, spec.max_replicas
            ),
        ));
    }
    range("maxConcurrency", spec.max_concurrency, 1, 1024)?;
    if let Some(n) = spec.num_gpus {
        range("numGpus", n, 1, 16)?;
    }
    if let Some(t) = spec.request_timeout {
        range("requestTimeout", t, 1, 86400)?;
    }
    if let Some(t) = spec.startup_timeout {
        range("startupTimeout", t, 1, 7200)?;
    }
    if let Some(path) = &spec.readiness_path {
        if !path.starts_with('/') {
            return Err(Error::invalid(
                "spec.readinessPath",
                format!("{path:?} must start with '/'"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(edit: impl FnOnce(&mut FalFunctionSpec)) -> String {
        let mut spec = FalFunctionSpec::with_image("a:1");
        edit(&mut spec);
        validate_spec(&spec)
            .map(|_| "ok".to_string())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(check(|_| {}), "ok");
    }

    #[test]
    fn each_bad_value_names_its_field() {
        type Edit = Box<dyn FnOnce(&mut FalFunctionSpec)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("spec.image:", Box::new(|s| s.image = " ".into())),
            ("spec.image:", Box::new(|s| s.image = String::new())),
            (
                "spec.source:",
                Box::new(|s| s.source = Some(crate::crd::FunctionSource::default())),
            ),
            (
                "spec.source.revision:",
                Box::new(|s| {
                    s.image = String::new();
                    s.source = Some(crate::crd::FunctionSource::default());
                }),
            ),
            ("spec.exposedPort:", Box::new(|s| s.exposed_port = 0)),
            ("spec.exposedPort:", Box::new(|s| s.exposed_port = 65536)),
            ("spec.exposedPort:", Box::new(|s| s.exposed_port = 9090)),
            (
                "spec.machineType:",
                Box::new(|s| s.machine_type = String::new()),
            ),
            ("spec.keepAlive:", Box::new(|s| s.keep_alive = -1)),
            ("spec.minReplicas:", Box::new(|s| s.min_replicas = -1)),
            ("spec.maxReplicas:", Box::new(|s| s.max_replicas = 0)),
            (
                "spec.minReplicas:",
                Box::new(|s| {
                    s.min_replicas = 3;
                    s.max_replicas = 2;
                }),
            ),
            ("spec.maxConcurrency:", Box::new(|s| s.max_concurrency = 0)),
            ("spec.numGpus:", Box::new(|s| s.num_gpus = Some(0))),
            (
                "spec.requestTimeout:",
                Box::new(|s| s.request_timeout = Some(0)),
            ),
            (
                "spec.startupTimeout:",
                Box::new(|s| s.startup_timeout = Some(-5)),
            ),
            (
                "spec.readinessPath:",
                Box::new(|s| s.readiness_path = Some("health".into())),
            ),
        ];
        for (field, edit) in cases {
            let msg = check(edit);
            assert!(msg.starts_with(field), "expected {field}, got {msg}");
        }
    }

    #[test]
    fn boundary_values_are_accepted() {
        assert_eq!(check(|s| s.exposed_port = 1), "ok");
        assert_eq!(check(|s| s.exposed_port = 65535), "ok");
        assert_eq!(
            check(|s| {
                s.min_replicas = 2;
                s.max_replicas = 2;
            }),
            "ok"
        );
        assert_eq!(check(|s| s.keep_alive = 0), "ok");
    }
}
