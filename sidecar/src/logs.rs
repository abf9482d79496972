//! The app's stdout/stderr: echoed to the sidecar's own output and attributed as `logs`
//! to the request running at that moment (when exactly one runs in this process).

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::job::LogLine;
use crate::store::Store;

/// Requests this process's workers are running right now.
#[derive(Default, Clone)]
pub struct Running(Arc<Mutex<Vec<String>>>);

impl Running {
    pub fn start(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.to_string());
    }
    pub fn finish(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|x| x != id);
    }
    pub fn count(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
    /// The one running request, if exactly one runs.
    pub fn only(&self) -> Option<String> {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (v.len() == 1).then(|| v[0].clone())
    }
}

/// Copies lines from `reader` to our stdout (`STDOUT`) or stderr (`STDERR`) and to the
/// running request's logs.
pub async fn pump<R: AsyncRead + Unpin>(
    reader: R,
    level: &'static str,
    running: Running,
    store: Arc<dyn Store>,
) {
    let mut lines = BufReader::new(reader).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "reading the app's output failed");
                return;
            }
        };
        if level == "STDERR" {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
        if let Some(id) = running.only() {
            if let Err(e) = store
                .append_logs(&id, vec![LogLine::new(line, level)])
                .await
            {
                tracing::debug!(error = %e, "attaching a log line failed");
            }
        }
    }
}
