"""The Redis store past one server (issue 11), end to end on loopback:

* `--store redis+cluster://H:P,...`: a function's keys share the hash tag `{NS/NAME}`, so
  several functions spread over the shards while each lives on one;
* a cluster master killed with -9 mid-load: submits get 503 + Retry-After (JSON detail)
  while no node serves the slot, are acknowledged again after the failover, and with
  `--store-replicas 1` no acknowledged request is lost;
* `--store redis+sentinel://S1,S2,S3/fal/0`: the sidecar follows the master the
  sentinels promote;
* a *replica* node killed under two sidecars: every request runs exactly once;
* the store password from `FAL_STORE_PASSWORD` or from the URL.

Topologies come from redis_ha_fixture.py (real redis-server processes, AOF on). Times are
printed (`HA-MEASURE ...`, run with -s to see them), never asserted. The sidecar side
needs the issue-11 interface (`--store-replicas` in `run --help`); without it the tests
skip with that reason.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from helpers import HTTP_TIMEOUT, wait_until
from redis_fixture import signing_key
from redis_ha_fixture import (
    REDIS_CLI,
    REDIS_SERVER,
    RedisCluster,
    RedisSentinelSet,
    app_cmd,
    seen_counts,
)

pytestmark = pytest.mark.skipif(
    not (os.path.exists(REDIS_SERVER) and os.path.exists(REDIS_CLI)),
    reason=f"redis-server ({REDIS_SERVER}) and redis-cli ({REDIS_CLI}) are needed for the HA tests",
)

FUNCTION = "default/app"
QUEUE_KEY = "fal:{%s}:queue"


@pytest.fixture(autouse=True)
def _needs_ha_store(sidecar_help):
    if "--store-replicas" not in sidecar_help:
        pytest.skip("this fal-sidecar has no HA store support (no --store-replicas in `run --help`; "
                    "issue 11: redis+cluster:// and redis+sentinel:// stores)")


# -- topologies ---------------------------------------------------------------

@pytest.fixture
def cluster3(tmp_path):
    c = RedisCluster(tmp_path / "cluster", masters=3, replicas=0).start()
    yield c
    c.close()


@pytest.fixture
def cluster3x2(tmp_path):
    c = RedisCluster(tmp_path / "cluster", masters=3, replicas=2, node_timeout_ms=1000).start()
    yield c
    c.close()


@pytest.fixture
def sentinels(tmp_path):
    s = RedisSentinelSet(tmp_path / "sentinel", replicas=2, sentinels=3, master_name="fal",
                         down_after_ms=1000, failover_timeout_ms=5000).start()
    yield s
    s.close()


@pytest.fixture
def on_store(make_sidecar, tmp_path):
    """Factory: a sidecar of `function` on the store `url`, its app logging every request
    it answers to <tmp>/seen-<name>.log (see redis_ha_fixture.app_cmd)."""
    key = signing_key(tmp_path / "webhook.key")
    logs = []

    def factory(url: str, *extra: str, function: str = FUNCTION, name: str = "sidecar", **kw):
        log = tmp_path / f"seen-{name}.log"
        logs.append(log)
        sc = make_sidecar("--store", url, "--function", function, "--signing-key", str(key), *extra,
                          name=name, app_cmd=app_cmd(log), **kw)
        sc.seen_log = log
        return sc

    factory.logs = logs
    return factory


# -- a submit loop that classifies every answer -----------------------------------

@dataclass
class Rec:
    n: int
    t0: float
    t1: float
    kind: str  # ok | unavailable | bad | error
    status: int | None = None
    rid: str | None = None
    detail: str = ""
    sidecar: int = 0


@dataclass
class SubmitLoop:
    """`threads` clients submitting POST /test {"i": n} round-robin to `sidecars` until
    stopped. A 503 must carry Retry-After and a JSON `detail` ("unavailable"); a client
    then waits 0.1 s (shorter than Retry-After, to see the recovery promptly). Anything
    else than 200 + request_id or such a 503 is "bad"; a transport error or a request
    that outlives the client timeout is "error"."""

    sidecars: list
    threads: int = 2
    records: list = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._workers: list[threading.Thread] = []

    def _take(self) -> int:
        with self._lock:
            n = self._next
            self._next += 1
            return n

    def _run(self) -> None:
        client = httpx.Client(timeout=HTTP_TIMEOUT)
        try:
            while not self._stop.is_set():
                n = self._take()
                idx = n % len(self.sidecars)
                sc = self.sidecars[idx]
                t0 = time.monotonic()
                try:
                    r = client.post(f"{sc.queue_url}/test/app/test", json={"i": n})
                except httpx.HTTPError as exc:
                    rec = Rec(n, t0, time.monotonic(), "error", detail=repr(exc), sidecar=idx)
                else:
                    rec = classify(n, t0, r, idx)
                with self._lock:
                    self.records.append(rec)
                if rec.kind != "ok":
                    time.sleep(0.1)
        finally:
            client.close()

    def start(self) -> "SubmitLoop":
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(HTTP_TIMEOUT.read + 5)

    def snapshot(self) -> list[Rec]:
        with self._lock:
            return list(self.records)

    def acked(self, after: float = 0.0) -> list[Rec]:
        return [r for r in self.snapshot() if r.kind == "ok" and r.t0 > after]


def classify(n: int, t0: float, r: httpx.Response, idx: int = 0) -> Rec:
    t1 = time.monotonic()
    if r.status_code == 200:
        try:
            rid = r.json().get("request_id")
        except ValueError:
            rid = None
        if isinstance(rid, str) and rid:
            return Rec(n, t0, t1, "ok", 200, rid, sidecar=idx)
        return Rec(n, t0, t1, "bad", 200, detail=f"200 without a request_id: {r.text[:200]}", sidecar=idx)
    if r.status_code == 503:
        problems = []
        ra = r.headers.get("retry-after")
        if not (ra and ra.strip().isdigit()):
            problems.append(f"Retry-After {ra!r}")
        try:
            body = r.json()
        except ValueError:
            body = None
        if not (isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"]):
            problems.append(f"body {r.text[:200]!r}")
        if not problems:
            return Rec(n, t0, t1, "unavailable", 503, detail=body["detail"], sidecar=idx)
        return Rec(n, t0, t1, "bad", 503, detail="503 without " + ", ".join(problems), sidecar=idx)
    return Rec(n, t0, t1, "bad", r.status_code, detail=r.text[:300], sidecar=idx)


def summarize(records: list[Rec]) -> dict:
    out: dict = {}
    for r in records:
        out[r.kind] = out.get(r.kind, 0) + 1
    return out


def settle(sidecars: list, acked: dict[str, object], timeout: float = 30.0) -> tuple[dict, dict]:
    """Poll every acknowledged id until COMPLETED (or 404: unknown to the store, or the
    deadline); return ({rid: result body} of the completed, {rid: last answer} of the
    others)."""
    pending = dict.fromkeys(acked, "never answered")
    done: dict[str, object] = {}
    unknown: dict[str, object] = {}
    client = httpx.Client(timeout=HTTP_TIMEOUT)
    deadline = time.monotonic() + timeout
    turn = 0
    try:
        while pending and time.monotonic() < deadline:
            for rid in list(pending):
                sc = sidecars[turn % len(sidecars)]
                turn += 1
                try:
                    r = client.get(sc.req_url(rid) + "/status")
                except httpx.HTTPError as exc:
                    pending[rid] = repr(exc)
                    continue
                if r.status_code == 404:  # the store does not know it (any more): final
                    unknown[rid] = f"404 {r.text[:200]}"
                    del pending[rid]
                    continue
                if r.status_code in (200, 202) and r.json().get("status") == "COMPLETED":
                    res = client.get(sc.req_url(rid))
                    if res.status_code == 200:
                        done[rid] = res.json()
                        del pending[rid]
                        continue
                    pending[rid] = f"result {res.status_code} {res.text[:200]}"
                    continue
                pending[rid] = f"status {r.status_code} {r.text[:200]}"
            if pending:
                time.sleep(0.2)
    finally:
        client.close()
    return done, {**unknown, **pending}


def measure(msg: str) -> None:
    print(f"HA-MEASURE {msg}", flush=True)


# -- 1. functions spread over the shards ---------------------------------------------

def test_cluster_functions_spread_over_shards(cluster3, on_store):
    functions = [f"default/f{i}" for i in range(6)]
    scs = [on_store(cluster3.url, "--max-concurrency", "4", function=f, name=f"f{i}")
           for i, f in enumerate(functions)]
    per = 40
    local = threading.local()

    def submit(job: tuple[int, int]) -> tuple[int, int, str]:
        f, i = job
        if not hasattr(local, "c"):
            local.c = httpx.Client(timeout=HTTP_TIMEOUT)
        r = local.c.post(f"{scs[f].queue_url}/test/app/test", json={"f": f, "i": i})
        assert r.status_code == 200, f"submit to f{f} -> {r.status_code} {r.text}"
        return f, i, r.json()["request_id"]

    with ThreadPoolExecutor(8) as pool:
        submitted = list(pool.map(submit, [(f, i) for i in range(per) for f in range(len(functions))]))
    assert len({rid for _, _, rid in submitted}) == len(submitted), "request ids are unique"

    for f, sc in enumerate(scs):
        mine = {rid: i for g, i, rid in submitted if g == f}
        done, missing = settle([sc], mine, timeout=40)
        assert not missing, f"f{f}: {len(missing)} requests did not complete: {list(missing.items())[:5]}"
        assert {rid: body["input"] for rid, body in done.items()} == \
            {rid: {"f": f, "i": i} for rid, i in mine.items()}, f"f{f}: wrong results"
        # each ran on its own function's app
        seen = seen_counts(sc.seen_log, path="/test")
        assert set(mine) <= set(seen), f"f{f}: the app did not see {set(mine) - set(seen)}"

    # Where the keys live: each function on exactly one shard (the one owning its hash
    # tag's slot), the functions on more than one shard.
    where: dict[str, set] = {}
    untagged = []
    for node, keys in cluster3.keys_per_node("fal:*").items():
        for k in keys:
            if "{" in k and "}" in k:
                where.setdefault(k[k.index("{") + 1:k.index("}")], set()).add(node)
            else:
                untagged.append((node.name, k))
    measure("cluster key placement: " + ", ".join(
        f"{fn}->{'/'.join(sorted(n.name for n in nodes))}" for fn, nodes in sorted(where.items()))
        + (f"; keys without a hash tag: {untagged[:10]}" if untagged else ""))
    assert set(functions) <= set(where), f"no keys found for {set(functions) - set(where)}"
    for fn in functions:
        assert len(where[fn]) == 1, f"{fn}'s keys are spread over {where[fn]} (expected one shard)"
        (node,) = where[fn]
        assert node is cluster3.master_for_key(QUEUE_KEY % fn)
    shards = {next(iter(where[fn])) for fn in functions}
    assert len(shards) > 1, f"every function landed on one shard: {shards}"


# -- 2. a master killed mid-load ----------------------------------------------------------

def assert_every_ack_ran(sc, acked, missing) -> None:
    """With --store-replicas: every acknowledged request completed and the app saw it."""
    assert not missing, f"{len(missing)} acknowledged requests never completed: {list(missing.items())[:10]}"
    seen = seen_counts(sc.seen_log)
    unseen = [rid for rid in acked if not seen[rid]]
    assert not unseen, f"the app never saw {len(unseen)} acknowledged requests: {unseen[:10]}"


def _failover_run(sidecars, kill, wait_failover, *, store_replicas: int, label: str, slow: int = 2):
    """Submit in a loop, kill -9 the master (`kill()` returns it), wait for the failover
    (`wait_failover(old)` returns the new master), keep submitting until 20 submits sent
    after the kill were acknowledged; then check every answer and settle every
    acknowledged id. Returns (loop, acked ids -> expected input, done, missing)."""
    sc = sidecars[0]
    loop = SubmitLoop(sidecars, threads=2).start()
    try:
        wait_until(lambda: len(loop.acked()) >= 30, timeout=30, interval=0.05, what="30 submits acknowledged")
        # requests in flight through the failover: their completion is written after it
        slow_ids = [sc.submit_ok("slow", {"seconds": 1.5})["request_id"] for _ in range(slow)]
        t_kill = time.monotonic()
        old = kill()
        new = wait_failover(old)
        t_failover = time.monotonic()
        try:
            wait_until(lambda: len(loop.acked(after=t_kill)) >= 20, timeout=45, interval=0.05,
                       what="submits to be acknowledged again after the failover")
        finally:
            loop.stop()
    finally:
        loop.stop()

    records = loop.snapshot()
    kinds = summarize(records)
    after = sorted(loop.acked(after=t_kill), key=lambda r: r.t1)
    bad = [r for r in records if r.kind in ("bad", "error")]
    unavailable = [r for r in records if r.kind == "unavailable"]
    first_ack = after[0].t1 - t_kill if after else None
    slowest = max((r.t1 - r.t0 for r in records), default=0.0)
    measure(f"{label}: store-replicas={store_replicas} kill {old.name}:{old.port} -> "
            f"redis failover done after {t_failover - t_kill:.2f}s (new master {new.name}:{new.port}); "
            f"first acknowledged submit sent after the kill: +{first_ack:.2f}s; answers {kinds}; "
            f"slowest submit {slowest:.2f}s")
    assert not bad, f"{len(bad)} submits got neither 200 nor a proper 503: {bad[:5]}"
    assert after, "no submit was acknowledged after the failover"
    for r in unavailable:
        assert "unavailable" in r.detail.lower() or "redis" in r.detail.lower(), r
    for s in sidecars:
        assert s.running, f"{s.name} exited during the failover"

    acked = {r.rid: {"i": r.n} for r in records if r.kind == "ok"}
    acked.update(dict.fromkeys(slow_ids, None))
    done, missing = settle(sidecars, acked, timeout=30)
    for rid, body in done.items():
        want = acked[rid]
        if want is None:
            assert body == {"slept": 1.5}, (rid, body)
        else:
            assert body.get("input") == want, (rid, body, want)
    return acked, done, missing


@pytest.mark.parametrize("store_replicas", [1, 0], ids=["store-replicas-1", "no-store-replicas"])
def test_cluster_master_kill9_failover(cluster3x2, on_store, store_replicas):
    extra = ["--store-replicas", str(store_replicas)] if store_replicas else []
    sc = on_store(cluster3x2.url, "--max-concurrency", "4", *extra)
    master = cluster3x2.master_for_key(QUEUE_KEY % FUNCTION)
    assert len(cluster3x2.replicas_of(master)) == 2

    def kill():
        cluster3x2.kill9(master)
        return master

    acked, done, missing = _failover_run([sc], kill, cluster3x2.wait_failover,
                                         store_replicas=store_replicas, label="cluster")
    measure(f"cluster: store-replicas={store_replicas}: {len(acked)} acknowledged, {len(done)} completed, "
            f"{len(missing)} lost: {list(missing.items())[:5]}")
    if store_replicas:
        assert_every_ack_ran(sc, acked, missing)
    # either way the service is back: a fresh request runs end to end
    rid = sc.submit_ok("test", {"after": True})["request_id"]
    assert sc.wait_result(rid, timeout=20).json()["input"] == {"after": True}


def _lagging_run(sc, master, reps, kill, wait_failover, *, store_replicas: int, label: str):
    """The case --store-replicas exists for: the master's replicas stall (SIGSTOP, their
    links dropped) for a second, the master then dies (-9) and a replica that missed that
    second takes over. With --store-replicas 1 nothing acknowledged may be lost (the
    stalled second can only get 503s); without, what was acknowledged meanwhile may be
    lost: counted and printed."""
    loop = SubmitLoop([sc], threads=2).start()
    try:
        wait_until(lambda: len(loop.acked()) >= 20, timeout=30, interval=0.05, what="20 submits acknowledged")
        t_pause = time.monotonic()
        for r in reps:
            r.pause()
        try:
            # The master drops its replica links: what it writes from now on reaches no
            # replica (SIGSTOP alone is not enough: the kernel keeps receiving for them).
            master.cmd("CLIENT", "KILL", "TYPE", "replica")
            time.sleep(1.0)
            t_kill = time.monotonic()
            kill()
        finally:
            for r in reps:
                r.resume()
        new = wait_failover(master)
        t_failover = time.monotonic()
        wait_until(lambda: len(loop.acked(after=t_kill)) >= 10, timeout=45, interval=0.05,
                   what="submits to be acknowledged again after the failover")
    finally:
        loop.stop()
    records = loop.snapshot()
    bad = [r for r in records if r.kind in ("bad", "error")]
    assert not bad, f"{len(bad)} submits got neither 200 nor a proper 503: {bad[:5]}"
    during = [r for r in records if r.kind == "ok" and t_pause <= r.t1 <= t_kill]
    acked = {r.rid: {"i": r.n} for r in records if r.kind == "ok"}
    done, missing = settle([sc], acked, timeout=30)
    for rid, body in done.items():
        assert body.get("input") == acked[rid], (rid, body)
    first = min((r.t1 for r in loop.acked(after=t_kill)), default=t_kill) - t_kill
    measure(f"{label} lagging replicas: store-replicas={store_replicas}: {len(during)} acknowledged while the "
            f"replicas were stopped; failover +{t_failover - t_kill:.2f}s after the kill, first new ack "
            f"+{first:.2f}s; {len(acked)} acknowledged in all, {len(missing)} lost; answers {summarize(records)}")
    if missing:
        by_rid = {r.rid: r for r in records if r.kind == "ok"}
        measure(f"{label} lagging replicas: lost requests (sent, acknowledged) at s relative to the stall "
                f"(the kill at +{t_kill - t_pause:.3f}): "
                + ", ".join(f"({by_rid[rid].t0 - t_pause:+.3f}, {by_rid[rid].t1 - t_pause:+.3f})"
                            for rid in list(missing)[:20] if rid in by_rid)
                + (" ..." if len(missing) > 20 else "")
                + f"; new master {new.name}; e.g. {next(iter(missing.items()))}")
    if store_replicas:
        assert not missing, (f"{len(missing)} requests acknowledged under --store-replicas 1 were lost "
                             f"(answered 200 although no replica had them): {list(missing.items())[:5]}")
    assert sc.running


@pytest.mark.parametrize("store_replicas", [1, 0], ids=["store-replicas-1", "no-store-replicas"])
def test_cluster_lagging_replicas_then_master_kill9(cluster3x2, on_store, store_replicas):
    extra = ["--store-replicas", str(store_replicas)] if store_replicas else []
    sc = on_store(cluster3x2.url, "--max-concurrency", "2", *extra)
    master = cluster3x2.master_for_key(QUEUE_KEY % FUNCTION)
    _lagging_run(sc, master, cluster3x2.replicas_of(master), lambda: cluster3x2.kill9(master),
                 cluster3x2.wait_failover, store_replicas=store_replicas, label="cluster")


# -- 3. sentinel ---------------------------------------------------------------------

@pytest.mark.parametrize("store_replicas", [1, 0], ids=["store-replicas-1", "no-store-replicas"])
def test_sentinel_master_kill9_followed(sentinels, on_store, store_replicas):
    extra = ["--store-replicas", str(store_replicas)] if store_replicas else []
    sc = on_store(sentinels.url, "--max-concurrency", "4", *extra)
    first = sentinels.master()

    acked, done, missing = _failover_run([sc], sentinels.kill9_master, sentinels.wait_new_master,
                                         store_replicas=store_replicas, label="sentinel")
    new = sentinels.master()
    assert new is not first
    measure(f"sentinel: store-replicas={store_replicas}: {len(acked)} acknowledged, {len(done)} completed, "
            f"{len(missing)} lost: {list(missing.items())[:5]}")
    if store_replicas:
        assert_every_ack_ran(sc, acked, missing)
    # the sidecar writes to the new master now
    rid = sc.submit_ok("test", {"after": True})["request_id"]
    assert sc.wait_result(rid, timeout=20).json()["input"] == {"after": True}
    assert int(new.cmd("DBSIZE")) > 0, "the new master holds no keys"


@pytest.mark.parametrize("store_replicas", [1, 0], ids=["store-replicas-1", "no-store-replicas"])
def test_sentinel_lagging_replicas_then_master_kill9(sentinels, on_store, store_replicas):
    extra = ["--store-replicas", str(store_replicas)] if store_replicas else []
    sc = on_store(sentinels.url, "--max-concurrency", "2", *extra)
    master = sentinels.master()
    reps = [n for n in sentinels.data_nodes if n is not master]
    _lagging_run(sc, master, reps, master.kill9, sentinels.wait_new_master,
                 store_replicas=store_replicas, label="sentinel")


# -- 4. a replica node killed under two sidecars --------------------------------------------

def test_cluster_replica_kill9_exactly_once(cluster3x2, on_store):
    a = on_store(cluster3x2.url, "--max-concurrency", "3", "--store-replicas", "1", name="a")
    b = on_store(cluster3x2.url, "--max-concurrency", "3", "--store-replicas", "1", name="b")
    scs = [a, b]
    master = cluster3x2.master_for_key(QUEUE_KEY % FUNCTION)
    victim = cluster3x2.replicas_of(master)[0]
    answers: dict[int, list[int]] = {}
    ids: dict[int, str] = {}
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    stop = threading.Event()

    def submit(client: httpx.Client, n: int) -> None:
        """One logical submit; 503s are retried with the same Idempotency-Key."""
        headers = {"Idempotency-Key": f"ha-{n}"}
        path, body = ("slow", {"seconds": 0.05, "n": n}) if n % 4 == 0 else ("test", {"n": n})
        deadline = time.monotonic() + 30
        while True:
            sc = scs[n % 2]
            r = client.post(f"{sc.queue_url}/test/app/{path}", json=body, headers=headers)
            with lock:
                answers.setdefault(r.status_code, []).append(n)
            if r.status_code == 200:
                with lock:
                    ids[n] = r.json()["request_id"]
                return
            rec = classify(n, 0.0, r)
            if rec.kind != "unavailable":
                raise AssertionError(f"submit {n} -> {r.status_code} {r.text[:300]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"submit {n} still unavailable after 30 s: {rec.detail}")
            time.sleep(0.1)

    def worker() -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT) as client:
            while not stop.is_set():
                with lock:
                    n = next(counter)
                try:
                    submit(client, n)
                except Exception as exc:  # noqa: BLE001 - reported below
                    with lock:
                        errors.append(f"{n}: {exc!r}")
                    return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(5)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(ids) >= 80 or errors, timeout=40, interval=0.02, what="80 submits")
        t_kill = time.monotonic()
        n_before = len(ids)
        cluster3x2.kill9(victim)
        # keep going until the others flag it failed (the cluster's view changes
        # under the sidecars) and 80 more submits went through
        cluster3x2.wait_flagged_fail(victim)
        t_flagged = time.monotonic()
        n_flagged = len(ids)
        wait_until(lambda: len(ids) >= n_flagged + 80 or errors, timeout=40, interval=0.02,
                   what="80 submits after the replica was flagged failed")
    finally:
        stop.set()
        for t in threads:
            t.join(HTTP_TIMEOUT.read + 5)
    assert not errors, errors[:5]
    assert len(set(ids.values())) == len(ids), "one request id per logical submit"
    measure(f"replica kill: killed {victim.name}:{victim.port} (replica of {master.name}) "
            f"{t_kill - t0:.2f}s into the run after {n_before} submits; flagged failed "
            f"+{t_flagged - t_kill:.2f}s later; {len(ids)} submits in all; answers by status: "
            f"{ {k: len(v) for k, v in answers.items()} }")

    done, missing = settle(scs, {rid: n for n, rid in ids.items()}, timeout=40)
    assert not missing, f"{len(missing)} requests never completed: {list(missing.items())[:10]}"
    for n, rid in ids.items():
        body = done[rid]
        if n % 4 == 0:
            assert body == {"slept": 0.05}, (n, body)
        else:
            assert body["input"] == {"n": n}, (n, body)

    # Exactly once: over both apps, each request id was answered once.
    want = set(ids.values())

    def counts():
        return seen_counts(a.seen_log, b.seen_log)

    wait_until(lambda: want <= set(counts()), timeout=10, what="the apps' logs")
    seen = counts()
    twice = {rid: c for rid, c in seen.items() if c != 1 and rid in want}
    assert not twice, f"{len(twice)} requests ran more than once: {list(twice.items())[:10]}"
    per_app = {sc.name: len(seen_counts(sc.seen_log)) for sc in scs}
    measure(f"replica kill: runs per sidecar {per_app}")
    assert all(per_app.values()), f"one sidecar ran nothing: {per_app}"
    assert a.running and b.running


# -- 4b. the --store-replicas bound ------------------------------------------------------

def test_store_replicas_bound_when_replicas_stall(cluster3x2, on_store):
    """Both replicas of the function's master stopped (SIGSTOP): with --store-replicas 1
    a submit is not acknowledged but answered 503 + Retry-After once the bound passes (no
    hang); without the flag the same store acknowledges at once. Resumed: acknowledged."""
    waiting = on_store(cluster3x2.url, "--store-replicas", "1", "--store-replicas-timeout", "500",
                       "--max-concurrency", "0", name="waits")
    plain = on_store(cluster3x2.url, "--max-concurrency", "2", name="plain")
    master = cluster3x2.master_for_key(QUEUE_KEY % FUNCTION)
    reps = cluster3x2.replicas_of(master)
    assert len(reps) == 2
    rid = waiting.submit_ok("test", {"before": True})["request_id"]
    for r in reps:
        r.pause()
    try:
        t0 = time.monotonic()
        r = waiting.submit("test", {"during": "stall"}, headers={"Idempotency-Key": "stall-1"})
        took = time.monotonic() - t0
        rec = classify(0, t0, r)
        measure(f"store-replicas bound: submit with both replicas stopped -> {r.status_code} after {took:.2f}s "
                f"(--store-replicas-timeout 500 ms); detail {rec.detail!r}")
        assert rec.kind == "unavailable", f"{r.status_code} {r.text[:300]}"
        ok = plain.submit_ok("test", {"plain": True})["request_id"]
    finally:
        for r in reps:
            r.resume()
    cluster3x2.wait_healthy()
    # the same logical submit, retried, is acknowledged now
    again = wait_until(lambda: (lambda x: x if x.status_code == 200 else None)(
        waiting.submit("test", {"during": "stall"}, headers={"Idempotency-Key": "stall-1"})),
        timeout=20, what="the retried submit to be acknowledged")
    for x in (rid, ok, again.json()["request_id"]):
        assert plain.wait_result(x, timeout=20).status_code == 200


# -- 5. the store password ----------------------------------------------------------------

def test_cluster_password_from_env_and_url(tmp_path, on_store):
    with RedisCluster(tmp_path / "pw-cluster", masters=3, replicas=0, password="s3cret-pw") as c:
        by_env = on_store(c.url, name="env", env={"FAL_STORE_PASSWORD": "s3cret-pw"})
        by_url = on_store(c.url_with_password(), name="url", function="default/other")
        for sc in (by_env, by_url):
            rid = sc.submit_ok("test", {"who": sc.name})["request_id"]
            assert sc.wait_result(rid, timeout=20).json()["input"] == {"who": sc.name}
        assert c.keys_per_node("fal:{default/app}:*"), "nothing written under default/app"
        assert c.keys_per_node("fal:{default/other}:*"), "nothing written under default/other"
        for sc in (by_env, by_url):
            sc.close()
