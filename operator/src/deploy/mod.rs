//! The seed's deploy flow: `fal-operator function serve FILE FUNCTION --alias NAME`. A
//! decorated Python file becomes a function — no Dockerfile, no YAML.
//!
//! - [`inspect`]: the `@isolated(...)` arguments, read from the file's syntax tree by
//!   the local python3 (nothing in the file runs);
//! - [`Deployment`]: what a serve asks for (source, arguments, alias), its revision
//!   identity and its environment's identity (built once per hash);
//! - [`local`]: registering with a running `fal-operator local`;
//! - [`cluster`]: registering in the cluster of the current kubeconfig (a source
//!   ConfigMap per revision, the FalFunction's `spec.source`, the controller's build
//!   Job);
//! - [`runner`]: the Python runner carried in the binary.

pub mod cluster;
pub mod local;
pub mod runner;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::MachineCatalog;
use crate::crd::{FalFunctionSpec, FunctionAuth};
use crate::{Error, Result};

/// Largest source file served this way (a ConfigMap holds at most 1 MiB; code that big
/// belongs in an image).
pub const MAX_SOURCE_BYTES: usize = 512 * 1024;
/// Image of the runner (the cluster's; local mode runs the runner from its state dir).
pub const RUNNER_IMAGE: &str = crate::config::DEFAULT_RUNNER_IMAGE;

/// What a serve registered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Deployed {
    pub revision: String,
    /// False when the same file was served again (the revision it already had).
    pub new: bool,
    pub url: String,
}

/// `@isolated(...)` as the file says it (see `runner/fal_runner/inspect_source.py`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Isolated {
    pub function: String,
    pub line: u32,
    #[serde(default)]
    pub ignored: Vec<String>,
    #[serde(default)]
    pub requirements: Vec<String>,
    pub machine_type: Option<String>,
    pub keep_alive: Option<i64>,
    pub exposed_port: Option<i64>,
    pub min_concurrency: Option<i64>,
    pub max_concurrency: Option<i64>,
    pub python_version: Option<String>,
}

pub use crate::environment::IndexSettings;

/// One `function serve`: everything that decides a revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub namespace: String,
    pub alias: String,
    /// The file's name (kept for tracebacks) and its text.
    pub filename: String,
    pub source: String,
    pub isolated: Isolated,
    #[serde(default)]
    pub auth: FunctionAuth,
    #[serde(default)]
    pub index: IndexSettings,
}

impl Deployment {
    /// Checks what can be checked before anything is registered: names, size, types,
    /// the machine type (named, with the catalog's list, when unknown).
    pub fn validate(&self, catalog: &MachineCatalog) -> Result<()> {
        if !crate::labels::is_dns1035(&self.alias) {
            return Err(Error::invalid(
                "--alias",
                format!(
                    "{:?} is not a valid function name: at most 63 lowercase letters, digits or '-', starting with a letter",
                    self.alias
                ),
            ));
        }
        if !crate::function::is_dns_label(&self.namespace) {
            return Err(Error::invalid(
                "--namespace",
                format!("{:?} is not a namespace name", self.namespace),
            ));
        }
        if self.source.len() > MAX_SOURCE_BYTES {
            return Err(Error::invalid(
                &self.filename,
                format!(
                    "is {} bytes; a served file is at most {MAX_SOURCE_BYTES} bytes (larger code belongs in an image: apply a FalFunction with spec.image)",
                    self.source.len()
                ),
            ));
        }
        if let Some(mt) = &self.isolated.machine_type {
            if catalog.get(mt).is_none() {
                return Err(Error::invalid(
                    "machine_type",
                    format!(
                        "{mt:?} is not in the machine catalog; known: {}",
                        catalog.names().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        self.spec("unused").map(|_| ())
    }

    /// `namespace/alias`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.alias)
    }

    /// Identifies a revision: the same file, function, arguments, auth and index serve
    /// the same revision again.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("serialize a deployment");
        hex(&Sha256::digest(canonical))
    }

    /// Identifies an environment: python version, requirements and index settings.
    pub fn environment(&self) -> String {
        crate::environment::environment_hash(
            self.isolated.python_version.as_deref(),
            &self.isolated.requirements,
            &self.index,
        )
    }

    /// The FalFunction spec the arguments make (image and command are the caller's).
    pub fn spec(&self, image: &str) -> Result<FalFunctionSpec> {
        let a = &self.isolated;
        let int = |name: &str, v: Option<i64>, min: i64, max: i64| -> Result<Option<i32>> {
            match v {
                None => Ok(None),
                Some(n) if (min..=max).contains(&n) => Ok(Some(n as i32)),
                Some(n) => Err(Error::invalid(
                    name,
                    format!("{n} is out of range ({min}..={max})"),
                )),
            }
        };
        let mut spec = FalFunctionSpec::with_image(image);
        if let Some(mt) = &a.machine_type {
            spec.machine_type = mt.clone();
        }
        if let Some(k) = int("keep_alive", a.keep_alive, 0, 86_400 * 30)? {
            spec.keep_alive = k;
        }
        if let Some(p) = int("exposed_port", a.exposed_port, 1, 65_535)? {
            if [9080, 9081, 9090].contains(&p) {
                return Err(Error::invalid(
                    "exposed_port",
                    format!("{p} is taken by the fal-sidecar (9080, 9081, 9090); pick another"),
                ));
            }
            spec.exposed_port = p;
        }
        if let Some(n) = int("min_concurrency", a.min_concurrency, 0, 1000)? {
            spec.min_replicas = n;
        }
        if let Some(n) = int("max_concurrency", a.max_concurrency, 1, 1000)? {
            spec.max_replicas = n;
        }
        spec.max_replicas = spec.max_replicas.max(spec.min_replicas);
        spec.auth = self.auth;
        Ok(spec)
    }
}

fn hex(b: &[u8]) -> String {
    ::hex::encode(b)
}

/// Reads `function`'s `@isolated` arguments from `file` with `python` (the runner's
/// inspect script; the file is parsed, not run). The error is the script's: the reason
/// and the line.
pub fn inspect(python: &str, file: &std::path::Path, function: &str) -> Result<Isolated> {
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(runner::INSPECT)
        .arg(file)
        .arg(function)
        .output()
        .map_err(|e| {
            Error::invalid(
                "python",
                format!("cannot run {python} to read the file ({e}); install Python 3 or set FAL_PYTHON"),
            )
        })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(Error::invalid("source", why));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::invalid("source", format!("the inspect script answered oddly: {e}")))
}

/// The two lines the seed prints.
pub fn announce(alias: &str, revision: &str, url: &str) -> String {
    format!(
        "Registered a new revision for function '{alias}' (revision='{revision}').\nURL: {url}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Deployment {
        Deployment {
            namespace: "default".into(),
            alias: "app".into(),
            filename: "app.py".into(),
            source: "x = 1\n".into(),
            isolated: Isolated {
                function: "app".into(),
                line: 3,
                requirements: vec!["flask".into()],
                machine_type: Some("GPU-T4".into()),
                keep_alive: Some(300),
                exposed_port: Some(8080),
                ..Isolated::default()
            },
            auth: FunctionAuth::Private,
            index: IndexSettings::default(),
        }
    }

    #[test]
    fn the_arguments_make_the_spec() {
        let d = deployment();
        let s = d.spec("img").unwrap();
        assert_eq!(
            (s.machine_type.as_str(), s.keep_alive, s.exposed_port),
            ("GPU-T4", 300, 8080)
        );
        let mut d2 = deployment();
        d2.isolated.min_concurrency = Some(2);
        d2.isolated.max_concurrency = Some(1);
        let s = d2.spec("img").unwrap();
        assert_eq!((s.min_replicas, s.max_replicas), (2, 2));
        d2.isolated.exposed_port = Some(9080);
        assert!(d2
            .spec("img")
            .unwrap_err()
            .to_string()
            .contains("fal-sidecar"));
    }

    #[test]
    fn revisions_and_environments_are_content_hashes() {
        let a = deployment();
        let mut b = deployment();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.environment(), b.environment());
        b.source.push_str("y = 2\n");
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(
            a.environment(),
            b.environment(),
            "same requirements, same environment"
        );
        b.isolated.requirements.push("numpy".into());
        assert_ne!(a.environment(), b.environment());
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let catalog = MachineCatalog::builtin();
        assert!(deployment().validate(&catalog).is_ok());
        let mut d = deployment();
        d.alias = "Bad_Alias".into();
        assert!(d
            .validate(&catalog)
            .unwrap_err()
            .to_string()
            .contains("--alias"));
        let mut d = deployment();
        d.isolated.machine_type = Some("GPU-X9".into());
        let e = d.validate(&catalog).unwrap_err().to_string();
        assert!(e.contains("GPU-X9") && e.contains("GPU-T4"), "{e}");
        let mut d = deployment();
        d.source = "x".repeat(MAX_SOURCE_BYTES + 1);
        assert!(d
            .validate(&catalog)
            .unwrap_err()
            .to_string()
            .contains("image"));
    }
}
