//! The crate's one error type. `anyhow` stays in `main.rs`.

use std::fmt::Write as _;

/// Everything that can go wrong in the operator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),

    /// `spec.machineType` names no entry of the machine catalog.
    #[error("spec.machineType: unknown machine type {name:?} (known: {known})")]
    UnknownMachineType { name: String, known: String },

    /// A FalFunction field holds a value the operator cannot use.
    #[error("{field}: {message}")]
    InvalidSpec { field: String, message: String },

    /// A manifest or catalog file could not be parsed.
    #[error("{context}: {source}")]
    Yaml {
        context: String,
        #[source]
        source: serde_yaml::Error,
    },

    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// The autoscaler, the gateway or a local replica could not do its job.
    #[error("{0}")]
    Scale(String),

    /// The shared store refused or failed a call.
    #[error("store: {0}")]
    Store(#[from] fal_sidecar::store::StoreError),

    /// A `fal-operator key` command could not do its job (the message says what to do).
    #[error("{0}")]
    Key(String),

    /// An object could not be converted to or from JSON.
    #[error("JSON conversion failed: {0}")]
    Json(#[from] serde_json::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::UnknownMachineType { .. } => "unknown_machine_type",
            Error::InvalidSpec { .. } => "invalid_spec",
            Error::Yaml { .. } => "yaml",
            Error::Io { .. } => "io",
            Error::Json(_) => "json",
            Error::Scale(_) => "scale",
            Error::Store(_) => "store",
            Error::Key(_) => "key",
        }
    }

    /// True when the error comes from the FalFunction itself: retrying will not help
    /// until the user edits the spec, and the status must say what is wrong.
    pub fn is_spec_error(&self) -> bool {
        matches!(
            self,
            Error::UnknownMachineType { .. } | Error::InvalidSpec { .. }
        )
    }

    /// Shorthand for [`Error::InvalidSpec`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidSpec {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Renders an error with its whole `source()` chain: `outer: cause: root cause`.
/// Warning events carry this so `kubectl describe` shows the root cause.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // thiserror's `{0}` formats often already include the cause; skip repeats.
        if !out.contains(&text) {
            let _ = write!(out, ": {text}");
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_includes_root_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = Error::Io {
            path: "/x".into(),
            source: io,
        };
        assert_eq!(error_chain(&err), "reading /x: no such file");

        let yaml = serde_yaml::from_str::<u32>("nope").unwrap_err();
        let err = Error::Yaml {
            context: "catalog.yaml".into(),
            source: yaml,
        };
        let chain = error_chain(&err);
        assert!(chain.starts_with("catalog.yaml: invalid type"), "{chain}");
    }

    #[test]
    fn spec_errors_are_classified() {
        assert!(Error::invalid("spec.image", "empty").is_spec_error());
        assert!(Error::UnknownMachineType {
            name: "X".into(),
            known: "XS".into()
        }
        .is_spec_error());
        let json = serde_json::from_str::<u32>("x").unwrap_err();
        assert!(!Error::Json(json).is_spec_error());
    }
}
