//! The job model and its state machine, shared by every store backend.
//!
//! `IN_QUEUE → IN_PROGRESS → COMPLETED{ok | app error | cancelled | start timeout | lost}`.
//! Everything here is pure: values in, values out. The stores persist what these
//! functions decide.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch (the clock every record uses).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Queue priority: `normal` runs before `low`, then FIFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Normal = 0,
    Low = 1,
}

impl Priority {
    /// Parses the `X-Fal-Queue-Priority` header value.
    pub fn parse(value: &str) -> Option<Priority> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// What a client asked for at submit time; everything the worker needs to call the app.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: String,
    /// Owner of the endpoint (the webhook `X-Fal-Webhook-User-Id`).
    pub owner: String,
    /// Path on the app, starting with `/` (the fal "endpoint").
    pub endpoint: String,
    /// Query string forwarded to the app (without `fal_webhook`), without the `?`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    pub method: String,
    /// Client headers forwarded to the app (hop-by-hop removed).
    pub headers: Vec<(String, String)>,
    pub priority: Priority,
    /// Start deadline (unix ms) from `X-Fal-Request-Timeout`; covers queue wait only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub no_retry: bool,
    pub submitted_at_ms: u64,
    /// The client's `Idempotency-Key`, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
    /// The namespace of the API key that submitted the request: only keys of that
    /// namespace see its status and result or cancel it. `None`: submitted without a
    /// key (a public function, or auth off), readable by its id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl JobSpec {
    /// Whether a caller of `tenant` (`None`: no key) may see this request.
    pub fn visible_to(&self, tenant: Option<&str>) -> bool {
        self.tenant.as_deref().is_none_or(|t| tenant == Some(t))
    }
}

/// An `Idempotency-Key` as the store keeps it: one key per function and owner maps to
/// one request for as long as that request is retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    /// SHA-256 (hex) of the owner and the client's key: bounded length, any bytes safe.
    pub key: String,
    /// SHA-256 (hex) of what makes two submits "the same request": the endpoint path,
    /// the query string and the body.
    pub fingerprint: String,
}

impl Idempotency {
    pub fn new(owner: &str, key: &str, endpoint: &str, query: &str, body: &[u8]) -> Idempotency {
        use sha2::{Digest, Sha256};
        let k = Sha256::new()
            .chain_update(owner.as_bytes())
            .chain_update([0u8])
            .chain_update(key.as_bytes())
            .finalize();
        // Length-prefixed parts: no two different requests hash the same input.
        let mut f = Sha256::new();
        for part in [endpoint.as_bytes(), query.as_bytes(), body] {
            f.update((part.len() as u64).to_be_bytes());
            f.update(part);
        }
        Idempotency {
            key: hex::encode(k),
            fingerprint: hex::encode(f.finalize()),
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Queued,
    Running,
    Completed,
}

impl Phase {
    pub fn wire(self) -> &'static str {
        match self {
            Phase::Queued => "IN_QUEUE",
            Phase::Running => "IN_PROGRESS",
            Phase::Completed => "COMPLETED",
        }
    }
}

/// One log line attributed to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub message: String,
    pub level: String,
    pub source: String,
    pub timestamp: String,
}

impl LogLine {
    pub fn new(message: impl Into<String>, level: &str) -> LogLine {
        LogLine {
            message: message.into(),
            level: level.to_string(),
            source: "USER".to_string(),
            timestamp: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        }
    }
}

/// How a job ended (the parts of COMPLETED that the status endpoint shows).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub completed_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_time: Option<f64>,
}

/// The app's response as it will be replayed to the client (or one the sidecar made).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl StoredResult {
    pub fn json(status: u16, value: &serde_json::Value, extra: &[(&str, &str)]) -> StoredResult {
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        for (k, v) in extra {
            headers.push((k.to_string(), v.to_string()));
        }
        StoredResult {
            status,
            headers,
            body: Bytes::from(value.to_string()),
        }
    }
    pub fn content_type(&self) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_str())
    }
}

/// The full record of one job as the stores keep it (the request body and the result
/// body are kept apart, as bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub spec: JobSpec,
    pub seq: u64,
    pub phase: Phase,
    /// Number of times a worker has claimed this job.
    pub attempts: u32,
    /// Fencing token of the current claim (0 = never claimed).
    #[serde(default)]
    pub token: u64,
    #[serde(default)]
    pub lease_until_ms: u64,
    #[serde(default)]
    pub started_at_ms: u64,
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<Completion>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogLine>,
}

/// Why the sidecar itself completed a job (as opposed to the app answering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEnd {
    /// Cancelled while still queued.
    Cancelled,
    /// `X-Fal-Request-Timeout` passed before processing started.
    StartTimeout,
    /// Workers kept dying while holding it: attempts exhausted.
    Lost,
}

/// Completion and result for a job the sidecar ended itself.
pub fn system_end(kind: SystemEnd, now_ms: u64, attempts: u32) -> (Completion, StoredResult) {
    let (status, detail, error_type, extra): (u16, String, &str, &[(&str, &str)]) = match kind {
        SystemEnd::Cancelled => (
            499,
            "Request was cancelled before it started.".into(),
            "request_cancelled",
            &[],
        ),
        SystemEnd::StartTimeout => (
            504,
            "Request timed out before processing started (X-Fal-Request-Timeout).".into(),
            "request_timeout",
            &[
                ("x-fal-request-timeout-type", "user"),
                ("x-fal-error-type", "request_timeout"),
            ],
        ),
        SystemEnd::Lost => (
            503,
            format!("The runner processing this request was lost {attempts} times; giving up."),
            "runner_disconnected",
            &[("x-fal-error-type", "runner_disconnected")],
        ),
    };
    let body = serde_json::json!({"detail": detail, "error_type": error_type});
    (
        Completion {
            completed_at_ms: now_ms,
            error: Some(detail),
            error_type: Some(error_type.to_string()),
            inference_time: None,
        },
        StoredResult::json(status, &body, extra),
    )
}

/// Completion for an app response (any status): non-2xx is an error as fal reports it.
pub fn app_end(status: u16, now_ms: u64, inference_time: f64) -> Completion {
    let (error, error_type) = if (200..300).contains(&status) {
        (None, None)
    } else if status == 499 {
        (
            Some("Request was cancelled.".to_string()),
            Some("request_cancelled".to_string()),
        )
    } else {
        (
            Some(format!("Invalid status code: {status}")),
            Some("app_error".to_string()),
        )
    };
    Completion {
        completed_at_ms: now_ms,
        error,
        error_type,
        inference_time: Some(inference_time),
    }
}

/// What a claim should do with a job whose attempts so far are `attempts`.
pub fn claim_decision(
    attempts: u32,
    max_attempts: u32,
    start_deadline_ms: Option<u64>,
    now_ms: u64,
) -> ClaimDecision {
    if start_deadline_ms.is_some_and(|d| now_ms >= d) {
        ClaimDecision::End(SystemEnd::StartTimeout)
    } else if attempts >= max_attempts {
        ClaimDecision::End(SystemEnd::Lost)
    } else {
        ClaimDecision::Run
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimDecision {
    Run,
    End(SystemEnd),
}

/// Milliseconds encoded in a UUID v7 request id (to tell "expired" from "never existed").
pub fn id_timestamp_ms(id: &str) -> Option<u64> {
    let uuid = uuid::Uuid::parse_str(id).ok()?;
    let (secs, nanos) = uuid.get_timestamp()?.to_unix();
    Some(secs * 1000 + u64::from(nanos) / 1_000_000)
}

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_parses_header_values() {
        assert_eq!(Priority::parse("normal"), Some(Priority::Normal));
        assert_eq!(Priority::parse(" LOW "), Some(Priority::Low));
        assert_eq!(Priority::parse(""), Some(Priority::Normal));
        assert_eq!(Priority::parse("urgent"), None);
        assert!(Priority::Normal < Priority::Low);
    }

    #[test]
    fn claim_decision_order() {
        assert_eq!(claim_decision(0, 3, None, 10), ClaimDecision::Run);
        assert_eq!(
            claim_decision(3, 3, None, 10),
            ClaimDecision::End(SystemEnd::Lost)
        );
        assert_eq!(
            claim_decision(0, 3, Some(10), 10),
            ClaimDecision::End(SystemEnd::StartTimeout)
        );
        assert_eq!(claim_decision(0, 3, Some(11), 10), ClaimDecision::Run);
    }

    #[test]
    fn system_end_results() {
        let (c, r) = system_end(SystemEnd::StartTimeout, 5, 0);
        assert_eq!(r.status, 504);
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| k == "x-fal-request-timeout-type" && v == "user"));
        assert_eq!(c.error_type.as_deref(), Some("request_timeout"));
        let (_, r) = system_end(SystemEnd::Cancelled, 5, 0);
        assert_eq!(r.status, 499);
        let (c, r) = system_end(SystemEnd::Lost, 5, 3);
        assert_eq!(r.status, 503);
        assert!(c.error.unwrap().contains('3'));
    }

    #[test]
    fn app_end_marks_errors() {
        assert_eq!(app_end(200, 1, 0.5).error, None);
        assert_eq!(
            app_end(422, 1, 0.5).error.as_deref(),
            Some("Invalid status code: 422")
        );
        assert_eq!(
            app_end(499, 1, 0.5).error_type.as_deref(),
            Some("request_cancelled")
        );
    }

    #[test]
    fn ids_carry_their_time() {
        let id = new_id();
        let t = id_timestamp_ms(&id).unwrap();
        assert!(t.abs_diff(now_ms()) < 60_000);
        assert_eq!(id_timestamp_ms("not-a-uuid"), None);
        assert_eq!(
            id_timestamp_ms("6f1c1b5e-1a7b-4c57-9f3e-6c1f2a3b4c5d"),
            None
        ); // v4
    }
}
