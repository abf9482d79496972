//! One conformance suite for every `Store` backend. A backend's test module calls
//! `conformance_tests!(factory)` where `factory(dir)` opens a fresh, empty store whose
//! `max_attempts` is 3.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{CancelOutcome, Lease, Store, StoreError, Submitted};
use crate::job::{
    app_end, new_id, now_ms, Idempotency, JobSpec, LogLine, Phase, Priority, StoredResult,
};

pub fn spec(priority: Priority) -> JobSpec {
    JobSpec {
        id: new_id(),
        owner: "owner".into(),
        endpoint: "/test".into(),
        query: None,
        method: "POST".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        priority,
        start_deadline_ms: None,
        webhook_url: None,
        no_retry: false,
        submitted_at_ms: now_ms(),
        idempotency: None,
        tenant: None,
    }
}

fn ok_result(body: &str) -> StoredResult {
    StoredResult {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(body.to_string()),
    }
}

const LEASE: Duration = Duration::from_secs(30);

pub async fn positions_and_priority(s: Arc<dyn Store>) {
    let low = spec(Priority::Low);
    let a = spec(Priority::Normal);
    let b = spec(Priority::Normal);
    assert_eq!(
        s.submit(low.clone(), Bytes::new(), 100)
            .await
            .unwrap()
            .position,
        0
    );
    assert_eq!(
        s.submit(a.clone(), Bytes::from_static(b"{\"a\":1}"), 100)
            .await
            .unwrap()
            .position,
        0
    );
    assert_eq!(
        s.submit(b.clone(), Bytes::new(), 100)
            .await
            .unwrap()
            .position,
        1
    );
    let pos = |st: Option<super::JobStatus>| st.unwrap().queue_position;
    assert_eq!(pos(s.status(&a.id).await.unwrap()), Some(0));
    assert_eq!(pos(s.status(&b.id).await.unwrap()), Some(1));
    assert_eq!(pos(s.status(&low.id).await.unwrap()), Some(2));
    let load = s.load().await.unwrap();
    assert_eq!((load.queued, load.in_flight), (3, 0));
    assert!(load.oldest_queued_ms.is_some());

    let c = s.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(c.record.spec.id, a.id, "normal before low, then FIFO");
    assert_eq!(c.body.as_ref(), b"{\"a\":1}");
    assert_eq!(c.record.attempts, 1);
    assert_eq!(pos(s.status(&b.id).await.unwrap()), Some(0));
    assert_eq!(pos(s.status(&low.id).await.unwrap()), Some(1));
    let st = s.status(&a.id).await.unwrap().unwrap();
    assert_eq!((st.record.phase, st.queue_position), (Phase::Running, None));
    assert_eq!(s.load().await.unwrap().in_flight, 1);
    assert_eq!(
        s.claim("w", LEASE).await.unwrap().unwrap().record.spec.id,
        b.id
    );
    assert_eq!(
        s.claim("w", LEASE).await.unwrap().unwrap().record.spec.id,
        low.id
    );
    assert!(s.claim("w", LEASE).await.unwrap().is_none());
}

pub async fn complete_once_and_result(s: Arc<dyn Store>) {
    let j = spec(Priority::Normal);
    s.submit(j.clone(), Bytes::new(), 10).await.unwrap();
    assert!(
        s.result(&j.id).await.unwrap().is_none(),
        "no result before completion"
    );
    let c = s.claim("w", LEASE).await.unwrap().unwrap();
    s.append_logs(&j.id, vec![LogLine::new("hello", "STDOUT")])
        .await
        .unwrap();
    assert_eq!(
        s.status(&j.id).await.unwrap().unwrap().record.logs[0].message,
        "hello"
    );
    assert!(s
        .complete(
            &j.id,
            c.token,
            app_end(200, now_ms(), 0.25),
            ok_result("{\"x\":1}")
        )
        .await
        .unwrap());
    assert!(
        !s.complete(&j.id, c.token, app_end(500, now_ms(), 0.1), ok_result("{}"))
            .await
            .unwrap(),
        "a result is written once"
    );
    let st = s.status(&j.id).await.unwrap().unwrap();
    assert_eq!(st.record.phase, Phase::Completed);
    assert_eq!(
        st.record.completion.as_ref().unwrap().inference_time,
        Some(0.25)
    );
    assert_eq!(st.record.logs.len(), 1, "logs survive completion");
    assert_eq!(
        s.result(&j.id).await.unwrap().unwrap(),
        ok_result("{\"x\":1}")
    );
    assert_eq!(s.load().await.unwrap().in_flight, 0);
    assert!(s
        .status("00000000-0000-7000-8000-000000000000")
        .await
        .unwrap()
        .is_none());
}

pub async fn stale_token_rejected_and_attempts_exhausted(s: Arc<dyn Store>) {
    let j = spec(Priority::Normal);
    s.submit(j.clone(), Bytes::new(), 10).await.unwrap();
    let short = Duration::from_millis(50);
    let first = s.claim("w1", short).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let sweep = s.sweep(now_ms(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(sweep.leases_expired, 1);
    assert_eq!(
        s.status(&j.id).await.unwrap().unwrap().record.phase,
        Phase::Queued
    );
    let second = s.claim("w2", short).await.unwrap().unwrap();
    assert_eq!(second.record.attempts, 2);
    assert!(second.token > first.token, "fencing tokens grow");
    assert_eq!(
        s.renew(&j.id, first.token, short).await.unwrap(),
        Lease::Lost
    );
    assert!(!s
        .complete(
            &j.id,
            first.token,
            app_end(200, now_ms(), 0.1),
            ok_result("{}")
        )
        .await
        .unwrap());
    // Lose it twice more: the third claim was the last attempt.
    tokio::time::sleep(Duration::from_millis(120)).await;
    s.sweep(now_ms(), Duration::from_secs(3600)).await.unwrap();
    let third = s.claim("w3", short).await.unwrap().unwrap();
    assert_eq!(third.record.attempts, 3);
    tokio::time::sleep(Duration::from_millis(120)).await;
    s.sweep(now_ms(), Duration::from_secs(3600)).await.unwrap();
    assert!(
        s.claim("w4", short).await.unwrap().is_none(),
        "attempts exhausted: not handed out again"
    );
    let st = s.status(&j.id).await.unwrap().unwrap();
    assert_eq!(st.record.phase, Phase::Completed);
    assert_eq!(
        st.record.completion.unwrap().error_type.as_deref(),
        Some("runner_disconnected")
    );
    assert_eq!(s.result(&j.id).await.unwrap().unwrap().status, 503);
}

pub async fn cancel_everywhere(s: Arc<dyn Store>) {
    let mut cancels = s.cancellations();
    let queued = spec(Priority::Normal);
    let running = spec(Priority::Normal);
    s.submit(running.clone(), Bytes::new(), 10).await.unwrap();
    s.submit(queued.clone(), Bytes::new(), 10).await.unwrap();
    let c = s.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(c.record.spec.id, running.id);

    assert_eq!(s.cancel(&queued.id).await.unwrap(), CancelOutcome::Removed);
    let st = s.status(&queued.id).await.unwrap().unwrap();
    assert_eq!(st.record.phase, Phase::Completed);
    assert!(st.record.completion.unwrap().error.is_some());
    assert_eq!(s.result(&queued.id).await.unwrap().unwrap().status, 499);
    assert!(
        s.claim("w", LEASE).await.unwrap().is_none(),
        "a cancelled job is not handed out"
    );

    assert_eq!(
        s.cancel(&running.id).await.unwrap(),
        CancelOutcome::Running {
            endpoint: "/test".into()
        }
    );
    let id = tokio::time::timeout(Duration::from_secs(5), cancels.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(id, running.id);
    assert_eq!(
        s.renew(&running.id, c.token, LEASE).await.unwrap(),
        Lease::Held {
            cancel_requested: true
        }
    );
    assert!(s
        .complete(
            &running.id,
            c.token,
            app_end(499, now_ms(), 0.1),
            ok_result("{}")
        )
        .await
        .unwrap());
    assert_eq!(
        s.cancel(&running.id).await.unwrap(),
        CancelOutcome::AlreadyCompleted
    );
    assert_eq!(
        s.cancel("00000000-0000-7000-8000-000000000000")
            .await
            .unwrap(),
        CancelOutcome::NotFound
    );
}

pub async fn start_timeout(s: Arc<dyn Store>) {
    let mut j = spec(Priority::Normal);
    j.start_deadline_ms = Some(now_ms() + 30);
    let mut later = spec(Priority::Normal);
    later.start_deadline_ms = Some(now_ms() + 60_000);
    s.submit(j.clone(), Bytes::new(), 10).await.unwrap();
    s.submit(later.clone(), Bytes::new(), 10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let sweep = s.sweep(now_ms(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(sweep.start_timeouts, 1);
    let r = s.result(&j.id).await.unwrap().unwrap();
    assert_eq!(r.status, 504);
    assert!(r
        .headers
        .iter()
        .any(|(k, v)| k == "x-fal-request-timeout-type" && v == "user"));
    // A claim also refuses expired jobs, without a sweep.
    let mut k = spec(Priority::Normal);
    k.start_deadline_ms = Some(now_ms() + 20);
    s.submit(k.clone(), Bytes::new(), 10).await.unwrap();
    let c = s.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(
        c.record.spec.id, later.id,
        "the deadline stops counting once it runs"
    );
    tokio::time::sleep(Duration::from_millis(40)).await;
    assert!(s.claim("w", LEASE).await.unwrap().is_none());
    assert_eq!(s.result(&k.id).await.unwrap().unwrap().status, 504);
    assert_eq!(
        s.status(&later.id).await.unwrap().unwrap().record.phase,
        Phase::Running
    );
}

pub async fn queue_bound(s: Arc<dyn Store>) {
    s.submit(spec(Priority::Normal), Bytes::new(), 2)
        .await
        .unwrap();
    s.submit(spec(Priority::Low), Bytes::new(), 2)
        .await
        .unwrap();
    match s.submit(spec(Priority::Normal), Bytes::new(), 2).await {
        Err(StoreError::QueueFull(2)) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
    s.claim("w", LEASE).await.unwrap().unwrap();
    s.submit(spec(Priority::Normal), Bytes::new(), 2)
        .await
        .expect("room again once one runs");
}

pub async fn webhook_outbox(s: Arc<dyn Store>) {
    let mut j = spec(Priority::Normal);
    j.webhook_url = Some("http://127.0.0.1:9/hook".into());
    s.submit(j.clone(), Bytes::new(), 10).await.unwrap();
    assert!(
        s.due_deliveries(now_ms(), 10, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "nothing before the result"
    );
    let c = s.claim("w", LEASE).await.unwrap().unwrap();
    s.complete(&j.id, c.token, app_end(200, now_ms(), 0.1), ok_result("{}"))
        .await
        .unwrap();
    let due = s.due_deliveries(now_ms(), 10, LEASE).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (
            due[0].request_id.as_str(),
            due[0].owner.as_str(),
            due[0].attempts
        ),
        (j.id.as_str(), "owner", 0)
    );
    assert!(
        s.due_deliveries(now_ms(), 10, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "leased to one sender"
    );
    s.delivery_attempted(&j.id, 1, Some(now_ms()))
        .await
        .unwrap();
    let due = s.due_deliveries(now_ms() + 1, 10, LEASE).await.unwrap();
    assert_eq!(due[0].attempts, 1);
    s.delivery_attempted(&j.id, 2, None).await.unwrap();
    assert!(s
        .due_deliveries(now_ms() + 100_000, 10, LEASE)
        .await
        .unwrap()
        .is_empty());
    // Cancelled-while-queued jobs notify too.
    let mut k = spec(Priority::Normal);
    k.webhook_url = Some("http://127.0.0.1:9/hook".into());
    s.submit(k.clone(), Bytes::new(), 10).await.unwrap();
    s.cancel(&k.id).await.unwrap();
    assert_eq!(
        s.due_deliveries(now_ms(), 10, LEASE).await.unwrap().len(),
        1
    );
}

pub async fn release_keeps_place(s: Arc<dyn Store>) {
    let a = spec(Priority::Normal);
    let b = spec(Priority::Normal);
    s.submit(a.clone(), Bytes::new(), 10).await.unwrap();
    s.submit(b.clone(), Bytes::new(), 10).await.unwrap();
    let c = s.claim("w", LEASE).await.unwrap().unwrap();
    assert!(s.release(&a.id, c.token).await.unwrap());
    assert!(!s.release(&a.id, c.token).await.unwrap(), "released once");
    let st = s.status(&a.id).await.unwrap().unwrap();
    assert_eq!(
        (st.record.phase, st.queue_position, st.record.attempts),
        (Phase::Queued, Some(0), 0)
    );
    assert_eq!(
        s.claim("w", LEASE).await.unwrap().unwrap().record.spec.id,
        a.id
    );
}

/// `requeue` (the app died while running it): back in its place, the attempt counted,
/// so a job that keeps killing the app ends as lost after `max_attempts` claims.
pub async fn requeue_counts_the_attempt(s: Arc<dyn Store>) {
    let a = spec(Priority::Normal);
    let b = spec(Priority::Normal);
    s.submit(a.clone(), Bytes::new(), 10).await.unwrap();
    s.submit(b.clone(), Bytes::new(), 10).await.unwrap();
    let c = s.claim("w", LEASE).await.unwrap().unwrap();
    assert!(s.requeue(&a.id, c.token).await.unwrap());
    assert!(!s.requeue(&a.id, c.token).await.unwrap(), "requeued once");
    assert!(!s.release(&a.id, c.token).await.unwrap(), "stale token");
    let st = s.status(&a.id).await.unwrap().unwrap();
    assert_eq!(
        (st.record.phase, st.queue_position, st.record.attempts),
        (Phase::Queued, Some(0), 1)
    );
    // Claims until max_attempts (3 in these tests), each requeued as the app dies again.
    for attempt in 2..=3 {
        let c = s.claim("w", LEASE).await.unwrap().unwrap();
        assert_eq!(
            (c.record.spec.id.as_str(), c.record.attempts),
            (a.id.as_str(), attempt)
        );
        assert!(s.requeue(&a.id, c.token).await.unwrap());
    }
    // The next claim ends it as lost and hands out the other job.
    let next = s.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(next.record.spec.id, b.id);
    let st = s.status(&a.id).await.unwrap().unwrap();
    assert_eq!(st.record.phase, Phase::Completed);
    assert_eq!(
        st.record.completion.unwrap().error_type.as_deref(),
        Some("runner_disconnected")
    );
}

pub async fn retention_purges(s: Arc<dyn Store>) {
    let j = spec(Priority::Normal);
    s.submit(j.clone(), Bytes::new(), 10).await.unwrap();
    let c = s.claim("w", LEASE).await.unwrap().unwrap();
    s.complete(&j.id, c.token, app_end(200, now_ms(), 0.1), ok_result("{}"))
        .await
        .unwrap();
    let sweep = s.sweep(now_ms(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(sweep.purged, 0);
    let sweep = s
        .sweep(now_ms() + 10_000, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(sweep.purged, 1);
    assert!(s.status(&j.id).await.unwrap().is_none());
    assert!(s.result(&j.id).await.unwrap().is_none());
}

pub async fn changes_wake_waiters(s: Arc<dyn Store>) {
    let mut rx = s.changes();
    rx.borrow_and_update();
    let s2 = s.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        s2.submit(spec(Priority::Normal), Bytes::new(), 10)
            .await
            .unwrap();
    });
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("woken by a submit")
        .unwrap();
}

fn keyed(key: &str, body: &[u8]) -> JobSpec {
    let mut j = spec(Priority::Normal);
    j.idempotency = Some(Idempotency::new(&j.owner, key, &j.endpoint, "", body));
    j
}

pub async fn idempotency_keys(s: Arc<dyn Store>) {
    let body = Bytes::from_static(b"{\"x\":1}");
    let first = keyed("k1", &body);
    s.submit(spec(Priority::Normal), Bytes::new(), 10)
        .await
        .unwrap();
    let a = s.submit(first.clone(), body.clone(), 10).await.unwrap();
    assert_eq!(
        (a.id.as_str(), a.position, a.replayed),
        (first.id.as_str(), 1, false)
    );

    // The same request again (a new id, as every submit makes one): the first answer.
    let again = s
        .submit(keyed("k1", &body), body.clone(), 10)
        .await
        .unwrap();
    assert_eq!(
        again,
        Submitted {
            replayed: true,
            ..a.clone()
        }
    );
    // Even when the queue is full now: nothing new is stored.
    let full = s.submit(keyed("k1", &body), body.clone(), 2).await.unwrap();
    assert!(full.replayed);
    // The same key for another body, endpoint or owner's key space.
    match s.submit(keyed("k1", b"{\"x\":2}"), Bytes::new(), 10).await {
        Err(StoreError::IdempotencyMismatch(id)) => assert_eq!(id, first.id),
        other => panic!("expected IdempotencyMismatch, got {other:?}"),
    }
    let mut other_endpoint = keyed("k1", &body);
    other_endpoint.idempotency = Some(Idempotency::new("owner", "k1", "/other", "", &body));
    assert!(matches!(
        s.submit(other_endpoint, body.clone(), 10).await,
        Err(StoreError::IdempotencyMismatch(_))
    ));
    let mut other_owner = keyed("k1", &body);
    other_owner.idempotency = Some(Idempotency::new("someone", "k1", "/test", "", &body));
    assert!(
        !s.submit(other_owner, body.clone(), 10)
            .await
            .unwrap()
            .replayed
    );
    // Another key, or none: new requests.
    assert!(
        !s.submit(keyed("k2", &body), body.clone(), 10)
            .await
            .unwrap()
            .replayed
    );
    assert!(
        !s.submit(spec(Priority::Normal), body.clone(), 10)
            .await
            .unwrap()
            .replayed
    );
    let load = s.load().await.unwrap();
    assert_eq!(load.queued, 5, "replays stored nothing");

    // Completed: still replayed while the result is retained, forgotten with it.
    let mut claimed = Vec::new();
    while let Some(c) = s.claim("w", LEASE).await.unwrap() {
        claimed.push(c);
    }
    for c in claimed {
        let done = app_end(200, now_ms(), 0.1);
        assert!(s
            .complete(&c.record.spec.id, c.token, done, ok_result("{}"))
            .await
            .unwrap());
    }
    let later = s
        .submit(keyed("k1", &body), body.clone(), 10)
        .await
        .unwrap();
    assert_eq!(later.id, first.id);
    assert!(later.replayed);
    let swept = s
        .sweep(now_ms() + 10_000, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(swept.purged, 5);
    let fresh = keyed("k1", b"{\"x\":2}");
    let b = s.submit(fresh.clone(), Bytes::new(), 10).await.unwrap();
    assert_eq!(
        (b.id, b.replayed),
        (fresh.id, false),
        "a purged key is free again"
    );
}

pub async fn idempotency_concurrent(s: Arc<dyn Store>) {
    let body = Bytes::from_static(b"{}");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            let body = body.clone();
            tokio::spawn(async move { s.submit(keyed("same", &body), body, 100).await })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    let (mut fresh, mut pending) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(sub) => {
                fresh += usize::from(!sub.replayed);
                ids.insert(sub.id);
            }
            Err(StoreError::IdempotencyPending) => pending += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(fresh, 1, "exactly one submit stored a job");
    assert_eq!(
        ids.len(),
        1,
        "one request id for everyone ({pending} got 409)"
    );
    assert_eq!(s.load().await.unwrap().queued, 1);
}

/// A healthy store is ready, before and after it holds requests (the probe is run
/// again, not remembered, once its short reuse window passed).
pub async fn ready_when_healthy(s: Arc<dyn Store>) {
    s.ready().await.unwrap();
    s.submit(spec(Priority::Normal), Bytes::from_static(b"{}"), 10)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    s.ready().await.unwrap();
    assert_eq!(
        s.load().await.unwrap().queued,
        1,
        "a probe is not a request"
    );
}

/// The submitting tenant is kept with the request (status and claims read it back).
pub async fn tenant_is_kept(s: Arc<dyn Store>) {
    let mut j = spec(Priority::Normal);
    j.tenant = Some("team-a".into());
    let id = j.id.clone();
    s.submit(j, Bytes::new(), 10).await.unwrap();
    let anon = spec(Priority::Normal);
    let anon_id = anon.id.clone();
    s.submit(anon, Bytes::new(), 10).await.unwrap();
    let st = s.status(&id).await.unwrap().unwrap();
    assert_eq!(st.record.spec.tenant.as_deref(), Some("team-a"));
    assert!(st.record.spec.visible_to(Some("team-a")));
    assert!(!st.record.spec.visible_to(Some("team-b")));
    assert!(!st.record.spec.visible_to(None));
    let st = s.status(&anon_id).await.unwrap().unwrap();
    assert!(st.record.spec.tenant.is_none() && st.record.spec.visible_to(None));
    let c = s
        .claim("w", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.record.spec.tenant.as_deref(), Some("team-a"));
}

/// A queued request comes back whole (status, claim), whatever the store keeps of it
/// in memory while it waits; one that ends while queued keeps it too.
pub async fn queued_requests_are_whole(s: Arc<dyn Store>) {
    let mut j = spec(Priority::Normal);
    j.headers = vec![
        ("content-type".into(), "application/json".into()),
        ("user-agent".into(), "fal-client/0.5".into()),
        ("x-custom".into(), "ünïcode ok".into()),
    ];
    j.query = Some("a=1&b=2".into());
    j.webhook_url = Some("http://127.0.0.1:9/hook".into());
    j.tenant = Some("team-a".into());
    j.start_deadline_ms = Some(now_ms() + 3_600_000);
    let cancelled = {
        let mut c = j.clone();
        c.id = crate::job::new_id();
        c
    };
    s.submit(j.clone(), Bytes::from_static(b"{\"x\":1}"), 10)
        .await
        .unwrap();
    s.submit(cancelled.clone(), Bytes::from_static(b"{}"), 10)
        .await
        .unwrap();
    let st = s.status(&j.id).await.unwrap().unwrap();
    assert_eq!(st.queue_position, Some(0));
    assert_eq!(st.record.phase, Phase::Queued);
    assert_eq!(st.record.spec.headers, j.headers);
    assert_eq!(st.record.spec.query, j.query);
    assert_eq!(st.record.spec.webhook_url, j.webhook_url);
    assert_eq!(st.record.spec.start_deadline_ms, j.start_deadline_ms);
    assert_eq!(st.record.spec.submitted_at_ms, j.submitted_at_ms);
    assert_eq!(
        s.status(&cancelled.id)
            .await
            .unwrap()
            .unwrap()
            .queue_position,
        Some(1)
    );
    assert_eq!(
        s.load().await.unwrap().oldest_queued_ms,
        Some(j.submitted_at_ms)
    );
    assert_eq!(
        s.cancel(&cancelled.id).await.unwrap(),
        CancelOutcome::Removed
    );
    let st = s.status(&cancelled.id).await.unwrap().unwrap();
    assert_eq!(st.record.phase, Phase::Completed);
    assert_eq!(
        st.record.spec.headers, j.headers,
        "a cancelled record is whole"
    );
    assert_eq!(s.result(&cancelled.id).await.unwrap().unwrap().status, 499);
    let c = s.claim("w", LEASE).await.unwrap().unwrap();
    assert_eq!(c.record.spec.id, j.id);
    assert_eq!(c.record.spec.headers, j.headers);
    assert_eq!(c.record.spec.query, j.query);
    assert_eq!(c.record.spec.tenant, j.tenant);
    assert_eq!(c.body.as_ref(), b"{\"x\":1}");
    assert_eq!((c.record.attempts, c.record.phase), (1, Phase::Running));
    assert!(s.claim("w", LEASE).await.unwrap().is_none());
}

/// An Idempotency-Key goes with its request when retention purges it.
pub async fn retention_purges_keys(s: Arc<dyn Store>) {
    let j = keyed("purge-me", b"{}");
    s.submit(j.clone(), Bytes::from_static(b"{}"), 10)
        .await
        .unwrap();
    let c = s.claim("w", LEASE).await.unwrap().unwrap();
    s.complete(&j.id, c.token, app_end(200, now_ms(), 0.1), ok_result("{}"))
        .await
        .unwrap();
    let again = keyed("purge-me", b"{}");
    let r = s
        .submit(again.clone(), Bytes::from_static(b"{}"), 10)
        .await
        .unwrap();
    assert_eq!((r.id.as_str(), r.replayed), (j.id.as_str(), true));
    let sweep = s
        .sweep(now_ms() + 10_000, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(sweep.purged, 1);
    let r = s
        .submit(again.clone(), Bytes::from_static(b"{}"), 10)
        .await
        .unwrap();
    assert_eq!((r.id.as_str(), r.replayed), (again.id.as_str(), false));
}

/// A sweep says when the next one would find work (gateways sweep quiet functions only
/// then): a start deadline, a lease end, the end of retention, a webhook due.
pub async fn sweep_says_when_work_falls_due(s: Arc<dyn Store>) {
    // Clocks: Redis counts leases on its own clock; allow for that and slow machines.
    let near = |got: Option<u64>, want: u64, what: &str| {
        let got = got.unwrap_or_else(|| panic!("{what}: no next due time"));
        assert!(
            got.abs_diff(want) < 5_000,
            "{what}: next due {got}, expected about {want}"
        );
    };
    let hour = Duration::from_secs(3600);
    let sweep = s.sweep(now_ms(), hour).await.unwrap();
    assert_eq!(sweep.next_due_ms, None, "an empty store has nothing due");
    assert!(!sweep.changed());

    let mut j = spec(Priority::Normal);
    let deadline = now_ms() + 600_000;
    j.start_deadline_ms = Some(deadline);
    s.submit(j.clone(), Bytes::new(), 10).await.unwrap();
    let sweep = s.sweep(now_ms(), hour).await.unwrap();
    assert_eq!(sweep.next_due_ms, Some(deadline), "the start deadline");

    let lease = Duration::from_secs(120);
    let c = s.claim("w", lease).await.unwrap().unwrap();
    let sweep = s.sweep(now_ms(), hour).await.unwrap();
    near(sweep.next_due_ms, now_ms() + 120_000, "the lease end");

    s.complete(&j.id, c.token, app_end(200, now_ms(), 0.1), ok_result("{}"))
        .await
        .unwrap();
    let sweep = s.sweep(now_ms(), hour).await.unwrap();
    near(
        sweep.next_due_ms,
        now_ms() + 3_600_000,
        "the end of retention",
    );
    assert!(!sweep.changed());

    let mut hooked = spec(Priority::Normal);
    hooked.webhook_url = Some("http://hooks.example/h".into());
    s.submit(hooked.clone(), Bytes::new(), 10).await.unwrap();
    let c = s.claim("w", lease).await.unwrap().unwrap();
    s.complete(
        &hooked.id,
        c.token,
        app_end(200, now_ms(), 0.1),
        ok_result("{}"),
    )
    .await
    .unwrap();
    let sweep = s.sweep(now_ms(), hour).await.unwrap();
    let due = sweep.next_due_ms.expect("the webhook");
    assert!(due <= now_ms(), "the webhook is due now: {due}");
}

/// Generates one `#[tokio::test]` per conformance case for a backend.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@cases $factory;
            positions_and_priority, complete_once_and_result,
            stale_token_rejected_and_attempts_exhausted, cancel_everywhere, start_timeout,
            queue_bound, webhook_outbox, release_keeps_place, requeue_counts_the_attempt,
            retention_purges, changes_wake_waiters, idempotency_keys, idempotency_concurrent,
            tenant_is_kept, ready_when_healthy, queued_requests_are_whole,
            retention_purges_keys, sweep_says_when_work_falls_due);
    };
    (@cases $factory:expr; $($case:ident),*) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let dir = std::env::temp_dir().join(format!("fal-conf-{}", uuid::Uuid::new_v4()));
                    let store = ($factory)(dir.clone()).await;
                    $crate::store::conformance::$case(store).await;
                    let _ = std::fs::remove_dir_all(&dir);
                }
            )*
        }
    };
}
