"""One concurrency truth through gateways (issue 20): two gateways (two `fal-operator
local` on one Redis, one replica each, maxConcurrency 1) take 20 concurrent sync calls
while 20 queued requests wait. Each gateway routes sync calls to its own replica, and
both replicas' workers take requests from the one queue: a replica's slot is shared by
its worker and the gateway's calls, and a call it refuses (`X-Fal-Replica: full`) is
sent again by the gateway, never returned. Every call answers 200, every queued request
completes, and no app ever sees two calls at once (it records its own overlap). (In a
cluster, gateway replicas share replica pods: the sidecar's refusal is what keeps their
sum under the limit; tests/cluster/test_gateway.py has the same check there.)"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import httpx
from helpers import REPO
from local_proc import function

OVERLAP_APP = [sys.executable, "-u", str(REPO / "tests" / "e2e" / "overlap_app.py")]


def test_sync_and_queue_share_the_slot_across_two_gateways(make_local, tmp_path):
    marks = tmp_path / "overlap"
    marks.mkdir()
    fn = function("one", command=[*OVERLAP_APP, str(marks)], minReplicas=1, maxReplicas=1,
                  maxConcurrency=1, keepAlive=60)
    gateways = [make_local([fn]), make_local([fn])]
    for g in gateways:
        g.wait_ready("default/one", 1)
    key = "default/one"
    rids = [(g, g.submit_ok(key, "slow", {"seconds": 0.05})) for g in gateways for _ in range(10)]
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()

    def call(g, i: int) -> None:
        r = httpx.post(f"{g.run_url}/{key}/slow", json={"seconds": 0.05, "i": i}, timeout=120)
        with lock:
            answers.append((r.status_code, r.headers.get("x-fal-replica", "")))

    threads = [threading.Thread(target=call, args=(gateways[i % 2], i)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for g, rid in rids:
        g.wait_completed(key, rid, timeout=120)
    assert answers == [(200, "")] * 20, answers
    seen = [json.loads(p.read_text()) for p in marks.glob("*.json")]
    assert len(seen) == 2, seen  # both replicas ran calls
    assert all(s["max"] == 1 for s in seen), f"an app ran calls at once: {seen}"
    # The refusals happened and were sent again (the gateways' own count).
    refused = sum(
        float(line.split()[-1])
        for g in gateways
        for line in g.http.get(f"{g.admin_url}/metrics").text.splitlines()
        if line.startswith("fal_gateway_replica_refusals_total")
    )
    assert refused > 0, "40 calls on two one-slot replicas: some found the slot taken"
