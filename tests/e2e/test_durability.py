"""Crash recovery (kill -9), graceful SIGTERM drain, result retention."""

from __future__ import annotations

import time

from helpers import wait_until


def test_kill9_then_restart_loses_nothing(make_sidecar, make_receiver):
    sc = make_sidecar("--max-concurrency", "1", "--lease", "1", name="crashy-sidecar")
    jwks_before = sc.http.get(sc.jwks_url).json()
    rcv = make_receiver(sc)

    running = sc.submit_ok("slow", {"seconds": 1.5})["request_id"]
    sc.wait_app_saw("/slow", running)
    queued = sc.submit_ok("echo", {"survives": True}, webhook=rcv.url("/after-crash"))["request_id"]
    gen_a = sc.http.post(f"{sc.run_url}/fal/queue/submit/test", json={"a": 1}).json()["request_id"]

    sc.kill9()
    assert not sc.running
    sc.start()

    # every accepted request is still known right after the restart
    for rid in (running, queued, gen_a):
        r = sc.status(rid)
        assert r.status_code in (200, 202), f"{rid} lost after kill -9: {r.status_code} {r.text}"

    r = sc.wait_result(running, timeout=20)
    assert r.status_code == 200, r.text
    assert r.json() == {"slept": 1.5}
    r = sc.wait_result(queued, timeout=20)
    assert r.status_code == 200, r.text
    assert r.json()["json"] == {"survives": True}
    r = sc.wait_result(gen_a, timeout=20)
    assert r.json() == {"message": "Hello from fal-serverless!", "input": {"a": 1}}

    # the signing key persisted, and the webhook of the queued job was delivered
    assert sc.http.get(sc.jwks_url).json() == jwks_before
    d = rcv.wait_for(queued, timeout=15)
    assert d.json["status"] == "OK"


def test_kill9_after_completion_keeps_results_and_outbox(make_sidecar, make_receiver):
    sc = make_sidecar(name="outbox-sidecar")
    rcv = make_receiver(sc, start=False)  # receiver down: the webhook stays in the outbox
    rid = sc.submit_ok("test", {"k": 9}, webhook=rcv.url("/outbox"))["request_id"]
    sc.wait_completed(rid)
    time.sleep(0.5)  # let at least the first delivery attempt fail
    sc.kill9()
    sc.start()
    r = sc.result(rid)
    assert r.status_code == 200
    assert r.json() == {"message": "Hello from fal-serverless!", "input": {"k": 9}}
    rcv.start()
    d = rcv.wait_for(rid, timeout=20)
    assert d.json["payload"] == r.json()


def test_sigterm_drains_running_job_and_exits_zero(make_sidecar):
    sc = make_sidecar("--drain-timeout", "20", name="draining-sidecar")
    rid = sc.submit_ok("slow", {"seconds": 1.5})["request_id"]
    sc.wait_app_saw("/slow", rid)
    code = sc.terminate(timeout=25)
    assert code == 0, f"exit code {code} after SIGTERM"

    # restart on the same data dir: the job was finished during the drain, not re-run
    sc.start()
    r = sc.status(rid)
    assert r.status_code == 200, f"job not completed by the drain: {r.status_code} {r.text}"
    assert r.json()["status"] == "COMPLETED"
    res = sc.result(rid)
    assert res.status_code == 200 and res.json() == {"slept": 1.5}
    slow_calls = [e for e in sc.app_seen() if e["path"] == "/slow" and e["x-fal-request-id"] == rid]
    assert slow_calls == [], "the drained job was run again after restart"


def test_retention_expires_results(make_sidecar):
    sc = make_sidecar("--retention", "1", name="short-retention")
    rid = sc.submit_ok("echo", {})["request_id"]
    assert sc.wait_result(rid).status_code == 200

    def gone():
        r = sc.result(rid)
        return r if r.status_code == 404 else None

    r = wait_until(gone, timeout=10, interval=0.2, what="result to expire after --retention 1")
    assert "retention" in r.json()["detail"].lower(), r.text
    assert sc.status(rid).status_code == 404
