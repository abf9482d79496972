"""One concurrency truth (issue 20): a replica's --max-concurrency slots are shared by its
queue workers, direct calls and WebSockets. A direct call past the limit is answered at
once with 503, `Retry-After` and `X-Fal-Replica: full` — it never reaches the app and is
never queued inside the pod. The app records its own overlap (tests/e2e/overlap_app.py)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
OVERLAP_APP = [sys.executable, "-u", str(HERE / "overlap_app.py")]


def overlap(sc) -> dict:
    return httpx.get(f"http://127.0.0.1:{sc.app_port}/overlap", timeout=5).json()


def test_direct_calls_and_queue_share_one_slot(make_sidecar):
    """12 direct calls while 12 queued requests wait, --max-concurrency 1: the app never
    sees two at once; refused direct calls say why and, retried after Retry-After, all
    complete; every queued request completes."""
    sc = make_sidecar("--max-concurrency", "1", app_cmd=OVERLAP_APP)
    rids = [sc.submit_ok("slow", {"seconds": 0.05})["request_id"] for _ in range(12)]
    refused: list[httpx.Response] = []
    done: list[int] = []
    lock = threading.Lock()

    def direct(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            while True:
                r = c.post(f"{sc.run_url}/slow", json={"seconds": 0.05, "i": i})
                if r.status_code == 503 and r.headers.get("x-fal-replica") == "full":
                    with lock:
                        refused.append(r)
                    time.sleep(0.02)  # a gateway waits ~20 ms; Retry-After says 1 s
                    continue
                assert r.status_code == 200, r.text
                with lock:
                    done.append(i)
                return

    threads = [threading.Thread(target=direct, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for rid in rids:
        sc.wait_completed(rid, timeout=60)
    assert sorted(done) == list(range(12))
    seen = overlap(sc)
    assert seen["max"] == 1, f"the app ran {seen['max']} calls at once: {seen}"
    assert seen["posts"] >= 24, seen
    assert refused, "12 direct calls beside a busy worker: some found the slot taken"
    r = refused[0]
    assert r.headers["retry-after"] == "1"
    assert r.json()["error_type"] == "runner_scheduling_failure"
    assert "maxConcurrency" in r.json()["detail"]


def test_slots_free_again_and_api_only_is_uncounted(make_sidecar):
    """After the calls end the slot is free at once (a plain call passes); with
    --max-concurrency 0 (API only) direct calls are not counted here."""
    sc = make_sidecar("--max-concurrency", "2", app_cmd=OVERLAP_APP)
    for _ in range(3):
        assert sc.http.post(f"{sc.run_url}/test", json={}).status_code == 200
    api_only = make_sidecar("--max-concurrency", "0", app_cmd=OVERLAP_APP)
    out: list[int] = []

    def call() -> None:
        out.append(httpx.post(f"{api_only.run_url}/slow", json={"seconds": 0.3}, timeout=30).status_code)
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert out == [200] * 4
    assert overlap(api_only)["max"] >= 2
