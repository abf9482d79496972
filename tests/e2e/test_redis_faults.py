"""Redis link faults: two `fal-sidecar run` replicas share one real redis-server, each
through its own fault proxy (fault_proxy.py), so the link of one replica or of both can
be slowed down, reset or blackholed while requests run.

The app is fault_app.py: the example app whose /slow journals every run (start, end,
outcome) and stops early on a cancel or when the sidecar hangs up, so the tests can
tell how often, where and when each request really ran.

Assertions are on outcomes (status codes, results, runs per request); durations are
printed (run with -s to see them) and only bounded generously.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fault_proxy import FaultProxy
from helpers import HTTP_TIMEOUT, wait_until
from redis_fixture import FUNCTION, REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(
    not os.path.exists(REDIS_SERVER), reason=f"redis-server not found ({REDIS_SERVER})"
)

FAULT_APP = [sys.executable, "-u", str(Path(__file__).resolve().parent / "fault_app.py")]
# A generous ceiling for one HTTP call to a replica whose Redis link is slow or cut
# (store calls give up after 5 s).
SLOW_HTTP = httpx.Timeout(30.0, connect=5.0)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    yield server
    server.close()


@pytest.fixture
def pair(make_sidecar, redis_server):
    """Factory: replicas A and B on one Redis, each through its own FaultProxy."""
    proxies: list[FaultProxy] = []

    def factory(lease: float, concurrency: int, *extra: str):
        out = []
        for name in ("A", "B"):
            proxy = FaultProxy(redis_server.port).start()
            proxies.append(proxy)
            sc = make_sidecar(
                "--store", proxy.url, "--function", FUNCTION,
                "--lease", str(lease), "--max-concurrency", str(concurrency),
                "--max-attempts", "5", *extra,
                name=f"replica{name}", app_cmd=FAULT_APP,
            )
            sc.http = httpx.Client(timeout=SLOW_HTTP)
            out.append((sc, proxy))
        (a, pa), (b, pb) = out
        return a, b, pa, pb

    yield factory
    for p in proxies:
        p.stop()


def app_runs(*scs) -> list[dict]:
    """Every /slow run the replicas' apps journaled (straight from the apps)."""
    runs = []
    for sc in scs:
        r = httpx.get(f"http://127.0.0.1:{sc.app_port}/runs", timeout=5)
        assert r.status_code == 200, r.text
        runs.extend(r.json())
    return runs


def runs_of(runs: list[dict], rid: str) -> list[dict]:
    return sorted((r for r in runs if r["id"] == rid), key=lambda r: r["start"])


def overlap(runs: list[dict]) -> float:
    """Longest time two runs of one request were both going (<= 0: never at once)."""
    worst = float("-inf")
    now = time.time()
    for i, x in enumerate(runs):
        for y in runs[i + 1:]:
            worst = max(worst, min(x["end"] or now, y["end"] or now) - max(x["start"], y["start"]))
    return worst


def submit_many(items: list[tuple[object, dict]]) -> list[str]:
    """Submit (sidecar, /slow input) pairs concurrently (a slow link makes each take seconds)."""
    def one(item):
        sc, body = item
        with httpx.Client(timeout=SLOW_HTTP) as c:
            r = c.post(f"{sc.queue_url}/test/app/slow", json=body)
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(one, items))


def wait_result(sc, rid: str, timeout: float) -> httpx.Response:
    """The result once COMPLETED; 503 (store unreachable for a moment, e.g. the first call
    on a connection that died in a partition) counts as "not yet"."""
    def done():
        r = sc.status(rid)
        if r.status_code == 503:
            return None
        assert r.status_code in (200, 202), f"status {rid} -> {r.status_code} {r.text}"
        return r.json()["status"] == "COMPLETED"

    wait_until(done, timeout=timeout, interval=0.1, what=f"{rid} to complete on {sc.name}")
    return wait_until(lambda: (lambda r: r if r.status_code != 503 else None)(sc.result(rid)),
                      timeout=timeout, what=f"the result of {rid} on {sc.name}")


def wait_all_results(scs, rids: list[str], timeout: float) -> dict[str, httpx.Response]:
    def one(i_rid):
        i, rid = i_rid
        sc = scs[i % len(scs)]
        return rid, wait_result(sc, rid, timeout=timeout)

    with ThreadPoolExecutor(len(rids)) as pool:
        return dict(pool.map(one, enumerate(rids)))


def lease_trouble(sc) -> dict[str, int]:
    text = sc.log_text()
    return {
        k: text.count(k)
        for k in ("renewing the lease failed", "lease lost", "gave this run up", "result dropped",
                  "storing the result failed")
    }


def test_latency_leases_are_renewed_in_time(pair):
    """+1 s each way (+2 s per round trip) on both links, lease 6 s (renewed every 2 s,
    so every renew takes as long as the pause between renews): requests of 1.5 leases
    each run exactly once and complete."""
    lease, seconds = 6.0, 9.0
    a, b, pa, pb = pair(lease, 2)
    # Load the Lua scripts first: the first call of a script costs three round trips
    # (EVALSHA -> NOSCRIPT, SCRIPT LOAD, EVALSHA), 6 s here, more than a store call may take.
    warm = a.submit_ok("slow", {"seconds": lease / 3 + 0.5})["request_id"]
    assert wait_result(b, warm, timeout=20).status_code == 200
    for p in (pa, pb):
        p.set_latency(up=1.0, down=1.0)
    t = time.monotonic()
    assert a.status(str(uuid.uuid4())).status_code == 404  # one store round trip
    rtt = time.monotonic() - t

    rids = submit_many([(sc, {"seconds": seconds}) for sc in (a, b, a, b)])
    results = wait_all_results([a, b], rids, timeout=90)
    took = time.monotonic() - t
    for rid, r in results.items():
        assert r.status_code == 200, r.text
        assert r.json() == {"slept": seconds}
    runs = app_runs(a, b)
    for rid in rids:
        mine = runs_of(runs, rid)
        assert [x["outcome"] for x in mine] == ["done"], (rid, mine)
    for sc in (a, b):
        trouble = lease_trouble(sc)
        for k in ("lease lost", "gave this run up", "result dropped"):
            assert trouble[k] == 0, (sc.name, trouble, sc.log_tail(60))
    print(
        f"\n[latency] status round trip through the slow link {rtt:.2f} s; 4 x {seconds:g} s requests, "
        f"lease {lease:g} s: all done once in {took:.1f} s; per replica: "
        f"A {lease_trouble(a)}, B {lease_trouble(b)}"
    )


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_cut_links_503_then_every_acknowledged_request_completes_once(pair, mode):
    """Both links cut (for 3 leases) while four long requests run: submits get 503 +
    Retry-After + a JSON detail; every worker gives its request up once its lease may
    have expired; after the links come back each acknowledged request completes once
    (one run that finished; the given-up runs never overlap a later run)."""
    lease, seconds = 2.0, 8.0
    a, b, pa, pb = pair(lease, 3)
    rids = submit_many([(sc, {"seconds": seconds}) for sc in (a, b, a, b)])
    # ... and two quick ones that wait behind nothing: they just have to complete.
    quick = [a.submit_ok("test", {"q": 1})["request_id"], b.submit_ok("test", {"q": 2})["request_id"]]
    wait_until(lambda: {r["id"] for r in app_runs(a, b)} >= set(rids), timeout=20,
               what="the apps to run the four requests")

    t_cut = time.time()
    for p in (pa, pb):
        p.cut(mode)

    def refused(sc):
        with httpx.Client(timeout=SLOW_HTTP) as c:
            return c.post(f"{sc.queue_url}/test/app/test", json={"during": "cut"})

    with ThreadPoolExecutor(2) as pool:
        during = list(pool.map(refused, (a, b)))
    for r in during:
        assert r.status_code == 503, r.text
        assert r.headers.get("retry-after"), r.headers
        body = r.json()
        assert isinstance(body.get("detail"), str) and body["detail"], body
    # Every run the apps started before the cut is given up (cancelled or hung up on)
    # while the links are still down.
    wait_until(lambda: all(r["end"] for r in app_runs(a, b)), timeout=3 * lease + 15,
               what="the replicas to give up the runs they cannot renew")
    given_up = max(r["end"] for r in app_runs(a, b)) - t_cut
    time.sleep(max(0.0, t_cut + 3 * lease - time.time()))
    for p in (pa, pb):
        p.restore()
    t_restore = time.time()

    results = wait_all_results([b, a], rids, timeout=60)
    for rid, r in results.items():
        assert r.status_code == 200, r.text
        assert r.json() == {"slept": seconds}
        assert wait_result(a, rid, 10).json() == wait_result(b, rid, 10).json() == {"slept": seconds}
    for i, rid in enumerate(quick):
        r = wait_result((a, b)[i], rid, timeout=30)
        assert r.status_code == 200 and r.json()["input"] == {"q": i + 1}, r.text
    runs = app_runs(a, b)
    worst = float("-inf")
    for rid in rids:
        mine = runs_of(runs, rid)
        outcomes = [x["outcome"] for x in mine]
        assert outcomes.count("done") == 1, (rid, mine)
        assert outcomes[-1] == "done", (rid, mine)
        assert all(o in ("cancelled", "disconnected") for o in outcomes[:-1]), (rid, mine)
        worst = max(worst, overlap(mine))
    assert worst <= lease, f"two runs of one request overlapped for {worst:.2f} s (lease {lease:g} s)"
    print(
        f"\n[cut both, {mode}] lease {lease:g} s: the last run was given up {given_up:.2f} s after the cut; "
        f"links restored after {t_restore - t_cut:.1f} s; runs per request "
        f"{[len(runs_of(runs, rid)) for rid in rids]}; worst overlap of two runs {worst:.2f} s"
    )


@pytest.mark.parametrize("mode", ["blackhole", "reset"])
def test_duplicate_window_when_one_replica_is_cut_off(pair, mode):
    """Only the link of the replica running a request is cut: the other replica takes the
    request over once the lease expired in Redis; the cut-off replica must have stopped
    its run by then. Measures how long both ran (the duplicate window)."""
    lease, seconds = 2.0, 8.0
    a, b, pa, pb = pair(lease, 1)
    proxy = {a.name: pa, b.name: pb}
    rid = a.submit_ok("slow", {"seconds": seconds})["request_id"]
    first = wait_until(lambda: runs_of(app_runs(a, b), rid), timeout=20, what="a replica to run it")[0]
    runner, other = (a, b) if first["port"] == a.app_port else (b, a)
    time.sleep(0.5)  # a renew or two went through
    t_cut = time.time()
    proxy[runner.name].cut(mode)
    try:
        r = wait_result(other, rid, timeout=40)
        assert r.status_code == 200, r.text
        assert r.json() == {"slept": seconds}
        assert r.headers.get("x-app-port") == str(other.app_port), "completed by the replica still connected"
        wait_until(lambda: runs_of(app_runs(runner), rid)[0]["end"], timeout=30,
                   what="the cut-off replica to stop its run")
    finally:
        proxy[runner.name].restore()
    mine = runs_of(app_runs(a, b), rid)
    old = [x for x in mine if x["port"] == runner.app_port]
    new = [x for x in mine if x["port"] == other.app_port]
    assert len(old) == 1 and len(new) == 1, mine
    window = old[0]["end"] - new[0]["start"]
    print(
        f"\n[cut {runner.name} only, {mode}] lease {lease:g} s: {runner.name} stopped its run "
        f"{old[0]['end'] - t_cut:.2f} s after the cut ({old[0]['outcome']}); {other.name} started it "
        f"{new[0]['start'] - t_cut:.2f} s after the cut; both ran for {max(window, 0):.2f} s "
        f"(end of the old run - start of the new one = {window:+.2f} s)"
    )
    assert window <= lease, f"both replicas ran the request for {window:.2f} s (lease {lease:g} s)"
    assert old[0]["outcome"] in ("cancelled", "disconnected"), old
    assert new[0]["outcome"] == "done", new
    # The cut-off replica works again once its link is back.
    wait_until(lambda: runner.status(rid).status_code == 200, timeout=20, what=f"{runner.name} to reach Redis")
    rid2 = runner.submit_ok("test", {"after": True})["request_id"]
    assert wait_result(other, rid2, timeout=30).json()["input"] == {"after": True}


def test_a_silently_dead_connection_is_replaced(make_sidecar, redis_server):
    """A blackhole that heals for new connections only (the old ones stay silent, as when
    the peer vanished without a RST): the replica must get off its dead connection and
    accept submits again."""
    proxy = FaultProxy(redis_server.port).start()
    try:
        sc = make_sidecar("--store", proxy.url, "--function", FUNCTION, "--max-concurrency", "1",
                          name="replica", app_cmd=FAULT_APP)
        sc.http = httpx.Client(timeout=SLOW_HTTP)
        assert sc.submit("test", {"before": True}).status_code == 200
        proxy.cut("blackhole")
        assert sc.submit("test", {"during": True}).status_code == 503  # a store call timed out
        proxy.restore(reset_blackholed=False)
        t = time.monotonic()
        rid = wait_until(lambda: (lambda r: r.json()["request_id"] if r.status_code == 200 else None)(
            sc.submit("test", {"after": True})), timeout=20, interval=0.5, what="a submit to be accepted again")
        print(f"\n[silent dead connection] submits accepted again {time.monotonic() - t:.1f} s after the heal")
        assert wait_result(sc, rid, timeout=20).json()["input"] == {"after": True}
    finally:
        proxy.stop()
