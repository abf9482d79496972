//! `function serve --local ADMIN_URL`: a running `fal-operator local` takes the file
//! (`POST /functions` on its admin listener), builds the environment once per hash
//! under its state dir (the build log streams back to the CLI), stores the revision's
//! source, and serves the alias from it — replacing the replicas of an older revision
//! without losing a queued request (see `LocalScaler::upsert_function`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

pub use super::Deployed;
use super::{runner, Deployment, RUNNER_IMAGE};
use crate::autoscale::Autoscaler;
use crate::catalog::MachineCatalog;
use crate::function::FunctionInfo;
use crate::gateway::Gateway;
use crate::local::{LocalFunction, LocalScaler};

/// The revisions a `local` serves, by `namespace/alias`.
#[derive(Default)]
struct Served {
    fingerprint: String,
    revision: String,
    /// Newest last: `(revision, unix ms)`.
    history: Vec<(String, u64)>,
}

/// Revisions kept per alias (older sources are deleted).
const HISTORY: usize = 10;

/// See the module docs.
pub struct LocalDeployer {
    state_dir: PathBuf,
    runner_dir: PathBuf,
    python: String,
    run_url: String,
    catalog: MachineCatalog,
    gw: Arc<Gateway>,
    scaler: Arc<LocalScaler>,
    autoscaler: Arc<Autoscaler>,
    served: Mutex<HashMap<String, Served>>,
}

impl LocalDeployer {
    /// `run_listen`: the gateway's run listener (the URL printed); `python`: the python3
    /// that builds environments (their interpreter).
    pub fn new(
        state_dir: &Path,
        python: String,
        run_listen: &str,
        gw: Arc<Gateway>,
        scaler: Arc<LocalScaler>,
        autoscaler: Arc<Autoscaler>,
    ) -> crate::Result<LocalDeployer> {
        let runner_dir = state_dir.join("runner");
        runner::materialize(&runner_dir).map_err(|source| crate::Error::Io {
            path: runner_dir.display().to_string(),
            source,
        })?;
        let host = match run_listen.rsplit_once(':') {
            Some(("0.0.0.0", port)) | Some(("[::]", port)) => format!("127.0.0.1:{port}"),
            _ => run_listen.to_string(),
        };
        Ok(LocalDeployer {
            state_dir: state_dir.to_path_buf(),
            runner_dir,
            python,
            run_url: format!("http://{host}"),
            catalog: MachineCatalog::builtin(),
            gw,
            scaler,
            autoscaler,
            served: Mutex::new(HashMap::new()),
        })
    }

    fn served(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `d` (see the module docs); progress lines go to `log`. Nothing is
    /// registered unless everything before it succeeded: a failed build leaves the
    /// alias serving its previous revision.
    pub async fn deploy(
        &self,
        d: Deployment,
        log: mpsc::Sender<String>,
    ) -> Result<Deployed, String> {
        d.validate(&self.catalog).map_err(|e| e.to_string())?;
        let key = d.key();
        let url = format!("{}/{}/{}", self.run_url, d.namespace, d.alias);
        let fingerprint = d.fingerprint();
        if let Some(s) = self
            .served()
            .get(&key)
            .filter(|s| s.fingerprint == fingerprint)
        {
            return Ok(Deployed {
                revision: s.revision.clone(),
                new: false,
                url,
            });
        }
        let env = self.environment(&d, &log).await?;
        let revision = uuid::Uuid::new_v4().to_string();
        let name = Path::new(&d.filename)
            .file_name()
            .map_or_else(|| "app.py".into(), |n| n.to_string_lossy().into_owned());
        let src_dir = self
            .state_dir
            .join("sources")
            .join(&d.namespace)
            .join(&d.alias)
            .join(&revision);
        let src = src_dir.join(&name);
        std::fs::create_dir_all(&src_dir)
            .and_then(|_| std::fs::write(&src, &d.source))
            .map_err(|e| format!("storing the source under {}: {e}", src_dir.display()))?;
        let spec = d.spec(RUNNER_IMAGE).map_err(|e| e.to_string())?;
        let info =
            FunctionInfo::from_spec(&d.namespace, &d.alias, &spec).map_err(|e| e.to_string())?;
        let lf = LocalFunction {
            info: info.clone(),
            command: vec![
                env.join("bin").join("python").display().to_string(),
                "-m".into(),
                "fal_runner".into(),
                "serve".into(),
                src.display().to_string(),
                d.isolated.function.clone(),
            ],
            env: vec![
                ("PYTHONPATH".into(), self.runner_dir.display().to_string()),
                ("FAL_EXPOSED_PORT".into(), spec.exposed_port.to_string()),
                ("PYTHONUNBUFFERED".into(), "1".into()),
            ],
            request_timeout: None,
        };
        self.scaler.upsert_function(lf);
        self.gw.upsert_function(info.clone());
        self.autoscaler.track(info);
        let dropped = {
            let mut served = self.served();
            let s = served.entry(key.clone()).or_default();
            s.fingerprint = fingerprint;
            s.revision = revision.clone();
            s.history
                .push((revision.clone(), fal_sidecar::job::now_ms()));
            let excess = s.history.len().saturating_sub(HISTORY);
            s.history
                .drain(..excess)
                .map(|(r, _)| r)
                .collect::<Vec<_>>()
        };
        for old in dropped {
            let dir = self
                .state_dir
                .join("sources")
                .join(&d.namespace)
                .join(&d.alias)
                .join(old);
            let _ = std::fs::remove_dir_all(dir);
        }
        tracing::info!(function = %key, %revision, "served a new revision");
        Ok(Deployed {
            revision,
            new: true,
            url,
        })
    }

    /// Revisions of `key` (newest last) for `/functions`.
    pub fn revisions(&self, key: &str) -> Option<serde_json::Value> {
        self.served().get(key).map(|s| {
            serde_json::json!({
                "revision": s.revision,
                "history": s.history.iter().map(|(r, t)| serde_json::json!({"revision": r, "servedUnixMs": t})).collect::<Vec<_>>(),
            })
        })
    }

    /// The environment of `d`, built now if this machine has none for its hash yet.
    async fn environment(
        &self,
        d: &Deployment,
        log: &mpsc::Sender<String>,
    ) -> Result<PathBuf, String> {
        let dir = self.state_dir.join("envs").join(d.environment());
        if dir.join("bin").join("python").exists() {
            let _ = log
                .send(format!("environment {} is built already", d.environment()))
                .await;
            return Ok(dir);
        }
        if let Some(want) = &d.isolated.python_version {
            let have = python_version(&self.python).await?;
            if !(have == *want || have.starts_with(&format!("{want}."))) {
                return Err(format!(
                    "python_version={want:?}, but {} is Python {have}: set FAL_PYTHON (for `fal-operator local`) to a python{want}",
                    self.python
                ));
            }
        }
        let mut cmd = tokio::process::Command::new(&self.python);
        cmd.args(["-m", "fal_runner", "build", "--dest"])
            .arg(&dir)
            .env("PYTHONPATH", &self.runner_dir)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for r in &d.isolated.requirements {
            cmd.arg("--requirement").arg(r);
        }
        if let Some(u) = &d.index.index_url {
            cmd.arg("--index-url").arg(u);
        }
        for f in &d.index.find_links {
            cmd.arg("--find-links").arg(f);
        }
        if d.index.no_index {
            cmd.arg("--no-index");
        }
        let _ = log
            .send(format!(
                "building environment {} ({})",
                d.environment(),
                if d.isolated.requirements.is_empty() {
                    "no requirements".to_string()
                } else {
                    d.isolated.requirements.join(" ")
                }
            ))
            .await;
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {} to build the environment: {e}", self.python))?;
        let tail = Arc::new(Mutex::new(std::collections::VecDeque::<String>::new()));
        // Both pipes, line by line, to the log (and the last lines for the error).
        fn pump<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
            r: Option<R>,
            log: mpsc::Sender<String>,
            tail: Arc<Mutex<std::collections::VecDeque<String>>>,
        ) -> tokio::task::JoinHandle<()> {
            tokio::spawn(async move {
                let Some(r) = r else { return };
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    {
                        let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                        t.push_back(line.clone());
                        if t.len() > 20 {
                            t.pop_front();
                        }
                    }
                    let _ = log.send(line).await;
                }
            })
        }
        let a = pump(child.stdout.take(), log.clone(), tail.clone());
        let b = pump(child.stderr.take(), log.clone(), tail.clone());
        let _ = tokio::join!(a, b);
        let status = child
            .wait()
            .await
            .map_err(|e| format!("waiting for the environment build: {e}"))?;
        if !status.success() {
            let tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            return Err(format!(
                "the environment build failed ({status}); nothing was registered and the previous revision (if any) keeps serving. Last lines:\n{}",
                tail.iter().cloned().collect::<Vec<_>>().join("\n")
            ));
        }
        Ok(dir)
    }
}

async fn python_version(python: &str) -> Result<String, String> {
    let out = tokio::process::Command::new(python)
        .args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
        .output()
        .await
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The CLI side: sends `d` to a `fal-operator local` admin listener, prints the build
/// log to stderr as it comes, and returns what was registered.
pub async fn register(admin_url: &str, d: &Deployment) -> Result<Deployed, String> {
    let url = format!("{}/functions", admin_url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .build()
        .map_err(|e| format!("an HTTP client: {e}"))?;
    let mut resp = client
        .post(&url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(d).map_err(|e| e.to_string())?)
        .send()
        .await
        .map_err(|e| {
            format!(
                "cannot reach fal-operator local at {admin_url} ({e}): start it (`fal-operator local`), or pass its --admin-listen address with --local"
            )
        })?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_string))
            .unwrap_or(body);
        return Err(format!("{url} answered {status}: {detail}"));
    }
    let mut pending = Vec::new();
    let mut last: Option<serde_json::Value> = None;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("reading {url}: {e}"))?
    {
        pending.extend_from_slice(&chunk);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            match v["log"].as_str() {
                Some(l) => eprintln!("{l}"),
                None => last = Some(v),
            }
        }
    }
    let v = last.ok_or_else(|| format!("{url} ended without an answer"))?;
    if let Some(e) = v["error"].as_str() {
        return Err(e.to_string());
    }
    Ok(Deployed {
        revision: v["revision"].as_str().unwrap_or_default().to_string(),
        new: v["new"].as_bool().unwrap_or(true),
        url: v["url"].as_str().unwrap_or_default().to_string(),
    })
}
