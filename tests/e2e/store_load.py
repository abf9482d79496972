"""A load that accounts for every answer and every run (issue 17: a healthy store never
refuses, counted from readiness).

`drive(base, n)` sends `n` submits one after another, then `n` more with `PARALLEL` in
flight, each `POST {base}/test {"i": k}` (a queue-host base: `{queue_url}/{owner}/{alias}`
of a sidecar, `{queue_url}/{ns}/{name}` of the gateway); every answer is kept with its
time since `t0` (readiness). Then:

* `assert_all_accepted`: every answer was 200 with a request id (no 503, no transport
  error), else the first refusals with their time since readiness and their detail;
* `assert_each_ran_once`: the apps' seen logs (redis_ha_fixture.app_cmd) come to hold
  every accepted id exactly once, and no other id (polled with a deadline);
* `assert_completed`: every request's status is COMPLETED, and a sample of results
  carries its input back.

`start_store(kind, dir)` makes the fresh topologies the tests run on. Numbers for the
record go through `measure()`.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

import pytest

from helpers import HTTP_TIMEOUT, wait_until
from redis_ha_fixture import REDIS_CLI, REDIS_SERVER, RedisCluster, RedisSentinelSet, seen_counts

PARALLEL = 32


@dataclass
class Answer:
    i: int
    t: float  # seconds since t0 (readiness) when sent
    status: int | None  # None: transport error
    rid: str | None
    detail: str


def _post(client: httpx.Client, base: str, i: int, t0: float) -> Answer:
    t = time.monotonic() - t0
    try:
        r = client.post(f"{base}/test", json={"i": i})
    except httpx.HTTPError as exc:
        return Answer(i, t, None, None, repr(exc))
    rid = None
    if r.status_code == 200:
        try:
            rid = r.json().get("request_id")
        except ValueError:
            pass
    return Answer(i, t, r.status_code, rid if isinstance(rid, str) and rid else None, r.text[:300])


def drive(base: str, n: int, t0: float) -> tuple[list[Answer], dict]:
    """`n` submits in sequence, then `n` with PARALLEL in flight. Returns the answers and
    the phase durations (seconds)."""
    answers: list[Answer] = []
    timing = {}
    with httpx.Client(timeout=HTTP_TIMEOUT) as client:
        start = time.monotonic()
        for i in range(n):
            answers.append(_post(client, base, i, t0))
        timing["sequential"] = time.monotonic() - start

    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def one(i: int) -> Answer:
        c = getattr(local, "client", None)
        if c is None:
            c = local.client = httpx.Client(timeout=HTTP_TIMEOUT)
            with lock:
                clients.append(c)
        return _post(c, base, i, t0)

    start = time.monotonic()
    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            answers.extend(pool.map(one, range(n, 2 * n)))
    finally:
        for c in clients:
            c.close()
    timing["parallel"] = time.monotonic() - start
    return answers, timing


def assert_all_accepted(answers: list[Answer]) -> dict[str, int]:
    """Every answer 200 with a request id; returns request id -> i."""
    bad = [a for a in answers if a.status != 200 or a.rid is None]
    if bad:
        first = "\n".join(f"  #{a.i} sent {a.t:.3f}s after ready: {a.status} {a.detail}" for a in bad[:8])
        raise AssertionError(f"{len(bad)} of {len(answers)} submits were not accepted after /readyz "
                             f"said ready (first at +{bad[0].t:.3f}s):\n{first}")
    ids = {a.rid: a.i for a in answers}
    assert len(ids) == len(answers), "two submits got the same request id"
    return ids


def assert_each_ran_once(seen_logs: list[Path], ids: dict[str, int], timeout: float) -> float:
    """Wait until the apps ran every id; each exactly once, nothing else. Returns the
    seconds it took."""
    start = time.monotonic()

    def all_ran():
        c = seen_counts(*seen_logs, path="/test")
        return c if all(rid in c for rid in ids) else None

    try:
        counts = wait_until(all_ran, timeout=timeout, interval=0.2, what=f"the app to run all {len(ids)} requests")
    except AssertionError:
        c = seen_counts(*seen_logs, path="/test")
        missing = [rid for rid in ids if rid not in c]
        raise AssertionError(f"{len(missing)} accepted requests never ran within {timeout:g}s, "
                             f"e.g. {missing[:3]}") from None
    took = time.monotonic() - start
    twice = {rid: n for rid, n in counts.items() if n != 1}
    assert not twice, f"{len(twice)} requests ran more than once: {list(twice.items())[:5]}"
    unknown = set(counts) - set(ids)
    assert not unknown, f"the app ran requests nobody submitted: {list(unknown)[:5]}"
    return took


def assert_completed(base: str, ids: dict[str, int], timeout: float = 60.0, sample_every: int = 50) -> None:
    """Every request COMPLETED (polled with a deadline); every `sample_every`-th result
    holds its input."""
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def client() -> httpx.Client:
        c = getattr(local, "client", None)
        if c is None:
            c = local.client = httpx.Client(timeout=HTTP_TIMEOUT)
            with lock:
                clients.append(c)
        return c

    def completed(rid: str) -> None:
        def check():
            r = client().get(f"{base}/requests/{rid}/status")
            assert r.status_code in (200, 202), f"status of {rid}: {r.status_code} {r.text[:300]}"
            return r.json().get("status") == "COMPLETED"

        wait_until(check, timeout=timeout, interval=0.2, what=f"{rid} to be COMPLETED")
        i = ids[rid]
        if i % sample_every == 0:
            r = client().get(f"{base}/requests/{rid}")
            assert r.status_code == 200, f"result of {rid}: {r.status_code} {r.text[:300]}"
            assert r.json().get("input") == {"i": i}, (rid, r.text[:300])

    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(completed, ids))
    finally:
        for c in clients:
            c.close()


# Redis' own default: a replica that asks for a full sync gets it 5 s later (the other
# HA tests set 0). A sidecar started with its Redis meets replicas attached but not yet
# synced: listed by the primary, confirming no write.
SYNC_DELAY = 5


def start_store(kind: str, workdir) -> tuple[str | None, object | None]:
    """A fresh topology of `kind` (`embedded`, `redis`: a primary and one replica,
    `cluster`: 3 primaries x 2 replicas, `sentinel`: 3 sentinels, a primary and 2
    replicas) with Redis' default sync delay, started without waiting for it to settle:
    (the --store URL or None for the embedded store, what to close)."""
    if kind == "embedded":
        return None, None
    if not (os.path.exists(REDIS_SERVER) and os.path.exists(REDIS_CLI)):
        pytest.skip(f"redis-server ({REDIS_SERVER}) and redis-cli ({REDIS_CLI}) are needed")
    if kind == "redis":
        t = RedisSentinelSet(workdir / "redis", replicas=1, sentinels=0,
                             sync_delay=SYNC_DELAY).start(settle=False)
        return f"redis://127.0.0.1:{t.data_nodes[0].port}/0", t
    if kind == "cluster":
        t = RedisCluster(workdir / "cluster", masters=3, replicas=2,
                         sync_delay=SYNC_DELAY).start(settle=False)
        return t.url, t
    if kind == "sentinel":
        t = RedisSentinelSet(workdir / "sentinel", replicas=2, sentinels=3,
                             sync_delay=SYNC_DELAY).start(settle=False)
        return t.url, t
    raise AssertionError(kind)


def measure(msg: str) -> None:
    print(f"STORE-READY-MEASURE {msg}", flush=True)
