//! What the store benchmarks (`store_bench`, `wait_bound`) share.

use fal_sidecar::job::{new_id, now_ms, JobSpec, Priority};

/// A submit as the fal clients send one: `POST /` with a JSON body, no webhook.
pub fn spec() -> JobSpec {
    JobSpec {
        id: new_id(),
        owner: "bench".into(),
        endpoint: "/".into(),
        query: None,
        method: "POST".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        priority: Priority::Normal,
        start_deadline_ms: None,
        webhook_url: None,
        no_retry: false,
        submitted_at_ms: now_ms(),
        idempotency: None,
        tenant: None,
    }
}
