#!/usr/bin/env python3
"""The soak (issue 17): `fal-operator local` on a 3-master Redis Cluster (one replica
each), three functions scaling 0↔N, mixed traffic from both official clients, and a
fault schedule running underneath. Everything is a real process on loopback.

Traffic (threads, plus one node process), for the whole run:
  py-queue   fal_client SyncClient.submit (half with a webhook, an Idempotency-Key each,
             retried with the same key until acknowledged); a third read back over the
             status SSE stream (iter_events)
  idem       raw HTTP submits with an Idempotency-Key and a webhook; after the answer the
             same key again must name the same request
  sync       fal_client SyncClient.run: direct calls through the gateway
  cancel     a /slow submit cancelled after 0–0.5 s
  js         npm @fal-ai/client: fal.subscribe and fal.queue.submit with a webhook
Functions `alpha` always has traffic, `beta` every other 20 s, `gamma` 15 s in 45:
with keepAlive 2 s the last two go to zero and come back over and over.

Faults, every CYCLE seconds (offsets in FAULTS): a replica `kill -9`; the app of a
replica killed (`kill -9`); a Redis master killed, its replica promoted, the old master
restarted as a replica; the link to another master cut for 5 s (a blackholing proxy the
master announces to clients, so the cluster bus stays up and nothing fails over); the
webhook receiver down for 30 s.

Verdict (`Report.problems()` lists what fails it):
  - lost: an acknowledged submit that never completed (cancelled ones excepted)
  - duplicated: a request the app ran more than once; allowed only when its first run
    was during a replica kill, an app crash, a failover or a link cut (a lease expired
    or a result was not yet stored), and counted
  - every webhook-carrying request that completed was delivered at least once, with a
    valid signature
  - RSS of `fal-operator local` flat: the last quarter's peak within 10 % + 4 MiB of the
    second quarter's peak (after warm-up)
  - no process left behind after `fal-operator local` stops

Usage: python tests/soak/soak.py --seconds 600 --out /tmp/soak [--png rss.png]
(scripts/soak.sh MINUTES runs it with the release binaries); tests/soak/test_soak.py
runs a short version in the test command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "tests" / "local"))

from fault_proxy import FaultProxy  # noqa: E402
from helpers import alive as pid_alive, descendants, wait_until  # noqa: E402
from redis_ha_fixture import RedisCluster  # noqa: E402
from local_proc import Local  # noqa: E402
from webhook_receiver import WebhookReceiver  # noqa: E402

NS = "default"
FUNCTIONS = ("alpha", "beta", "gamma")
LEASE = 5.0  # FAL_SIDECAR_LEASE of the replicas: how long a killed worker's request waits
# (offset in the cycle, fault name). The cycle is stretched to fit the run.
FAULTS = (
    (0.10, "replica-kill"),
    (0.22, "app-crash"),
    (0.34, "master-failover"),
    (0.55, "link-cut"),
    (0.65, "receiver-down"),
)
CYCLE = 150.0  # seconds of one fault cycle in long runs
RECEIVER_DOWN = 30.0
LINK_CUT = 5.0


def active(fn: str, t: float) -> bool:
    """Whether `fn` gets traffic at `t` seconds into the run."""
    if fn == "beta":
        return int(t // 20) % 2 == 0
    if fn == "gamma":
        return t % 45 < 15
    return True


@dataclass
class Call:
    t: float  # start, seconds into the run
    ms: float
    kind: str
    ok: bool
    detail: str = ""


@dataclass
class Accepted:
    rid: str
    fn: str
    webhook: bool
    via: str
    cancelled: bool = False


@dataclass
class Report:
    seconds: float
    accepted: int = 0
    completed: int = 0
    cancelled: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)
    duplicated_unexplained: list[str] = field(default_factory=list)
    webhooks_expected: int = 0
    webhooks_missing: list[str] = field(default_factory=list)
    webhooks_unverified: list[str] = field(default_factory=list)
    idem_mismatch: int = 0
    calls: dict = field(default_factory=dict)
    faults: list[dict] = field(default_factory=list)
    scale_events: dict = field(default_factory=dict)
    rss: dict = field(default_factory=dict)
    rss_growth: dict = field(default_factory=dict)
    left_behind: list[int] = field(default_factory=list)
    js_errors: int = 0
    last_webhook_at: float | None = None  # seconds into the run of the last delivery

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{len(self.lost)} acknowledged requests never completed: {self.lost[:10]}")
        if self.duplicated_unexplained:
            out.append(f"{len(self.duplicated_unexplained)} requests ran twice outside any fault window: "
                       f"{self.duplicated_unexplained[:10]}")
        if self.webhooks_missing:
            out.append(f"{len(self.webhooks_missing)} completed requests never got their webhook: "
                       f"{self.webhooks_missing[:10]}")
        if self.webhooks_unverified:
            out.append(f"{len(self.webhooks_unverified)} webhooks failed signature verification")
        if self.idem_mismatch:
            out.append(f"{self.idem_mismatch} Idempotency-Key retries named another request")
        for name, g in self.rss_growth.items():
            if not g["flat"]:
                out.append(f"RSS of {name} grew: {g}")
        if self.left_behind:
            out.append(f"processes left behind: {self.left_behind}")
        if self.accepted == 0:
            out.append("no request was accepted at all")
        return out


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


class Soak:
    def __init__(self, workdir: Path, seconds: float, operator_bin: Path, sidecar_bin: Path,
                 python: str = sys.executable, log=None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seconds = seconds
        self.operator_bin = operator_bin
        self.sidecar_bin = sidecar_bin
        self.python = python
        self.log = log or (lambda line: print(line, flush=True))
        self.cycle = min(CYCLE, seconds)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.accepted: dict[str, Accepted] = {}
        self.idem_mismatch = 0
        self.fault_log: list[dict] = []
        self.rss_samples: list[tuple[float, dict[str, int]]] = []
        self.replica_pids: set[int] = set()
        self.zero_events: Counter = Counter()
        self.js_errors = 0
        self.t0 = 0.0
        self.seen_logs = {fn: self.dir / f"seen-{fn}.log" for fn in FUNCTIONS}
        self.cluster: RedisCluster | None = None
        self.proxy: FaultProxy | None = None
        self.proc: subprocess.Popen | None = None
        self.local: Local | None = None
        self.receiver: WebhookReceiver | None = None
        self.http = httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0))

    # -- set-up ----------------------------------------------------------------
    def start(self) -> "Soak":
        self.cluster = RedisCluster(self.dir / "redis", masters=3, replicas=1, node_timeout_ms=1000)
        node0 = self.cluster.nodes[0]
        # node0 announces a proxy's port to clients and to its replica: cutting the proxy
        # cuts every client link to it while the cluster bus (its own port) stays up.
        self.proxy = FaultProxy(node0.port).start()
        node0.extra += ["--cluster-announce-port", str(self.proxy.port),
                        "--cluster-announce-bus-port", str(node0.bus_port)]
        self.cluster.start()
        masters = self.cluster.masters()
        assert node0 in masters, f"node0 is not a master: {self.cluster.describe()}"
        self.cut_master = node0
        # The master killed for a failover holds a function's queue (its keys share a
        # hash tag: one slot per function), and is not the one whose links are cut.
        owners = [self.cluster.master_for_key(f"fal:{{{NS}/{fn}}}:ready") for fn in FUNCTIONS]
        self.fail_master = next((m for m in owners if m is not node0),
                                next(m for m in masters if m is not node0))

        # The receiver's keys come from the gateway, which is not up yet: fetched on demand.
        self.receiver = WebhookReceiver(lambda: f"{self.local.run_url}/.well-known/jwks.json")
        self.receiver.start(fetch_keys=False)
        key_id, secret = str(uuid.uuid4()), os.urandom(32).hex()
        self.fal_key = f"{key_id}:{secret}"
        docs = [{
            "apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalKey",
            "metadata": {"name": "soak", "namespace": NS},
            "spec": {"keyId": key_id, "secretSha256": hashlib.sha256(secret.encode()).hexdigest()},
        }]
        for fn in FUNCTIONS:
            docs.append({
                "apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalFunction",
                "metadata": {"name": fn, "namespace": NS},
                "spec": {"image": "example/app:1",
                         "command": [self.python, "-u", str(HERE / "soak_app.py"), str(self.seen_logs[fn])],
                         "keepAlive": 2, "minReplicas": 0, "maxReplicas": 2, "maxConcurrency": 4},
            })
        # Webhook retries that outlast the receiver's 30 s outage; leases of LEASE s.
        self.local = Local(self.dir / "local", self.cluster, docs, env={"FAL_SIDECAR_LEASE": str(int(LEASE))},
                           operator_bin=self.operator_bin, sidecar_bin=self.sidecar_bin,
                           webhook_retry_delays="1,2,4,8,15,30,30")
        self.local.start()
        self.proc = self.local.proc
        self.run_url, self.queue_url, self.admin_url = self.local.run_url, self.local.queue_url, self.local.admin_url
        return self

    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, kind: str, t: float, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.calls.append(Call(t, (self.now() - t) * 1000, kind, ok, detail[:200]))

    def accept(self, a: Accepted) -> None:
        with self.lock:
            self.accepted.setdefault(a.rid, a)

    def pick(self, rng: random.Random) -> str:
        fns = [f for f in FUNCTIONS if active(f, self.now())]
        return rng.choice(fns)

    def headers(self) -> dict:
        return {"Authorization": f"Key {self.fal_key}"}

    # -- traffic ---------------------------------------------------------------
    def client(self):
        import fal_client
        import fal_client.client as mod
        mod.QUEUE_URL_FORMAT = f"{self.queue_url}/"
        mod.RUN_URL_FORMAT = f"{self.run_url}/"
        mod.REST_URL = self.run_url
        return fal_client.SyncClient(key=self.fal_key, default_timeout=60)

    def poster(self, url: str, body: dict, idempotency_key: str, params: dict | None = None):
        """A raw submit with an Idempotency-Key: returns the request id, raises unless 200."""
        hdrs = {**self.headers(), "Idempotency-Key": idempotency_key}

        def post() -> str:
            r = self.http.post(url, json=body, params=params, headers=hdrs)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:120]}")
            return r.json()["request_id"]
        return post

    def submit_retrying(self, submit, kind: str, deadline_s: float = 60.0):
        """Call `submit()` until it is acknowledged (same Idempotency-Key every time):
        returns its result, or None when it never was within the deadline."""
        t = self.now()
        last = ""
        while self.now() - t < deadline_s:
            try:
                out = submit()
                self.record(kind, t, True)
                return out
            except Exception as exc:  # noqa: BLE001 - a refusal: retried, counted below
                last = repr(exc)
                time.sleep(0.5)
        self.record(kind, t, False, last)
        return None

    def py_queue(self, seed: int) -> None:
        import fal_client
        rng = random.Random(seed)
        client = self.client()
        n = 0
        while not self.stop.is_set():
            n += 1
            fn = self.pick(rng)
            hooked = n % 2 == 0
            idem = {"Idempotency-Key": str(uuid.uuid4())}
            handle = self.submit_retrying(
                lambda: client.submit(f"{NS}/{fn}", {"py": n}, path="test", headers=idem,
                                      webhook_url=self.receiver.url("/hook") if hooked else None),
                "submit")
            if handle is None:
                continue
            self.accept(Accepted(handle.request_id, fn, hooked, "py"))
            if n % 3 == 0:
                t = self.now()
                try:
                    for ev in handle.iter_events(with_logs=False, interval=0.1):
                        if isinstance(ev, fal_client.Completed):
                            break
                    self.record("stream", t, True)
                except Exception as exc:  # noqa: BLE001 - the stream broke: counted
                    self.record("stream", t, False, repr(exc))
            time.sleep(0.1)

    def idem(self, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while not self.stop.is_set():
            n += 1
            fn = self.pick(rng)
            key = str(uuid.uuid4())
            url = f"{self.queue_url}/{NS}/{fn}/test"
            params = {"fal_webhook": self.receiver.url("/hook")}
            post = self.poster(url, {"idem": n}, key, params)
            rid = self.submit_retrying(post, "submit")
            if rid is None:
                continue
            self.accept(Accepted(rid, fn, True, "idem"))
            again = self.submit_retrying(post, "submit")
            if again is not None and again != rid:
                with self.lock:
                    self.idem_mismatch += 1
            time.sleep(0.1)

    def sync(self, seed: int) -> None:
        rng = random.Random(seed)
        client = self.client()
        while not self.stop.is_set():
            fn = self.pick(rng)
            t = self.now()
            try:
                out = client.run(f"{NS}/{fn}", {"sync": 1}, path="test", timeout=60)
                self.record("sync", t, out.get("input") == {"sync": 1}, "" if out.get("input") else repr(out))
            except Exception as exc:  # noqa: BLE001 - counted
                self.record("sync", t, False, repr(exc))
            time.sleep(0.05)

    def cancel(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            fn = self.pick(rng)
            url = f"{self.queue_url}/{NS}/{fn}/slow"
            rid = self.submit_retrying(self.poster(url, {"seconds": 1.5}, str(uuid.uuid4())), "submit")
            if rid is None:
                continue
            self.accept(Accepted(rid, fn, False, "cancel", cancelled=True))
            time.sleep(rng.uniform(0, 0.5))
            t = self.now()
            try:
                r = self.http.put(f"{self.queue_url}/{NS}/{fn}/requests/{rid}/cancel", headers=self.headers())
                self.record("cancel", t, r.status_code in (202, 400), f"{r.status_code} {r.text[:100]}")
            except httpx.HTTPError as exc:
                self.record("cancel", t, False, repr(exc))
            time.sleep(0.3)

    def js(self) -> None:
        node_dir = REPO / "tests" / "js"
        cmd = ["node", str(HERE / "js_soak.mjs"), self.queue_url, self.run_url, str(self.seconds),
               self.receiver.url("/hook"), *[f"{NS}/{fn}" for fn in FUNCTIONS]]
        env = {**os.environ, "FAL_KEY": self.fal_key, "NODE_PATH": str(node_dir / "node_modules")}
        proc = subprocess.Popen(cmd, cwd=str(node_dir), stdout=subprocess.PIPE, stderr=open(self.dir / "js.log", "ab"),
                                env=env, text=True)
        for line in proc.stdout:
            try:
                o = json.loads(line)
            except ValueError:
                continue
            if "accepted" in o:
                fn = o["app"].split("/", 1)[1]
                self.accept(Accepted(o["accepted"], fn, bool(o["webhook"]), "js"))
            elif "error" in o:
                with self.lock:
                    self.js_errors += 1
        proc.wait()

    # -- faults ----------------------------------------------------------------
    def fault(self, name: str, fn) -> None:
        start = self.now()
        detail = ""
        try:
            detail = fn() or ""
        except Exception as exc:  # noqa: BLE001 - a fault that could not be injected is reported
            detail = f"not injected: {exc!r}"
        self.fault_log.append({"fault": name, "start": round(start, 2), "end": round(self.now(), 2),
                               "detail": detail})
        self.log(f"[soak {self.now():7.1f}s] {name}: {detail}")

    def replicas(self, fn: str) -> list[dict]:
        r = self.http.get(f"{self.admin_url}/functions", timeout=5)
        for f in r.json():
            if f["function"] == f"{NS}/{fn}":
                return [p for p in f["local"]["replicas"] if p.get("phase") == "ready"]
        return []

    def replica_kill(self) -> str:
        reps = self.replicas("alpha")
        if not reps:
            return "no ready replica of alpha"
        os.kill(reps[0]["pid"], signal.SIGKILL)
        return f"kill -9 fal-sidecar pid {reps[0]['pid']}"

    def app_crash(self) -> str:
        reps = self.replicas("alpha")
        for rep in reps:
            apps = [p for p in descendants(rep["pid"]) if pid_alive(p)]
            if apps:
                os.kill(apps[0], signal.SIGKILL)
                return f"kill -9 app pid {apps[0]} of replica {rep['pid']}"
        return "no app process of alpha found"

    def master_failover(self) -> str:
        old = self.fail_master
        self.cluster.kill9(old)
        new = self.cluster.wait_failover(old, replicas_attached=False)
        old.start()
        old.wait_up()
        # Every node agrees again (gossip included), 3 masters with a replica each: the
        # next cycle's failover has a replica to promote.
        self.cluster.wait_healthy(timeout=60)
        self.cluster._snapshot()
        self.fail_master = new
        return f"kill -9 {old.name}; {new.name} promoted; {old.name} back as its replica"

    def link_cut(self) -> str:
        self.proxy.cut("blackhole")
        time.sleep(LINK_CUT)
        self.proxy.restore()
        return f"clients' links to {self.cut_master.name} blackholed for {LINK_CUT:g} s"

    def receiver_down(self) -> str:
        self.receiver.stop()
        time.sleep(min(RECEIVER_DOWN, max(1.0, self.seconds - self.now())))
        self.receiver.start(fetch_keys=False)
        return f"webhook receiver down for {RECEIVER_DOWN:g} s"

    def faults(self) -> None:
        actions = {"replica-kill": self.replica_kill, "app-crash": self.app_crash,
                   "master-failover": self.master_failover, "link-cut": self.link_cut,
                   "receiver-down": self.receiver_down}
        cycle_start = 0.0
        while not self.stop.is_set():
            for offset, name in FAULTS:
                at = cycle_start + offset * self.cycle
                if at > self.seconds - 5:
                    return
                while self.now() < at:
                    if self.stop.wait(min(0.2, at - self.now())):
                        return
                self.fault(name, actions[name])
            cycle_start += self.cycle

    # -- observation -----------------------------------------------------------
    def sampler(self) -> None:
        was_zero: dict[str, bool] = {}
        while not self.stop.wait(1.0):
            sample: dict[str, int] = {}
            kib = rss_kib(self.proc.pid)
            if kib:
                sample["fal-operator local"] = kib
            try:
                fns = self.http.get(f"{self.admin_url}/functions", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                fns = []
            side = 0
            for f in fns:
                reps = f["local"]["replicas"]
                name = f["function"].split("/", 1)[1]
                zero = not reps
                if was_zero.get(name) is not None and zero != was_zero[name]:
                    self.zero_events[f"{name} {'→0' if zero else '0→'}"] += 1
                was_zero[name] = zero
                for r in reps:
                    self.replica_pids.add(r["pid"])
                    side += rss_kib(r["pid"]) or 0
            sample["fal-sidecar replicas (sum)"] = side
            for n in self.cluster.nodes:
                if n.alive:
                    sample[f"redis {n.name}"] = rss_kib(n.proc.pid) or 0
            self.rss_samples.append((self.now(), sample))

    # -- the run ---------------------------------------------------------------
    def run(self) -> Report:
        self.t0 = time.monotonic()  # counted from readiness: no warm-up
        self.t0_wall = time.time()
        threads = [threading.Thread(target=self.py_queue, args=(1,)),
                   threading.Thread(target=self.py_queue, args=(2,)),
                   threading.Thread(target=self.idem, args=(3,)),
                   threading.Thread(target=self.sync, args=(4,)),
                   threading.Thread(target=self.cancel, args=(5,)),
                   threading.Thread(target=self.js),
                   threading.Thread(target=self.faults),
                   threading.Thread(target=self.sampler)]
        for th in threads:
            th.daemon = True
            th.start()
        while self.now() < self.seconds:
            time.sleep(0.5)
        self.stop.set()
        for th in threads:
            th.join(timeout=120)
        self.log(f"[soak {self.now():7.1f}s] traffic stopped; {len(self.accepted)} acknowledged; checking")
        return self.verdict()

    def status(self, a: Accepted) -> str | None:
        try:
            r = self.http.get(f"{self.queue_url}/{NS}/{a.fn}/requests/{a.rid}/status", headers=self.headers(),
                              timeout=10)
        except httpx.HTTPError:
            return None
        if r.status_code not in (200, 202):
            return f"HTTP {r.status_code}"
        return r.json().get("status")

    def verdict(self) -> Report:
        rep = Report(seconds=self.seconds)
        accepted = list(self.accepted.values())
        rep.accepted = len(accepted)
        pending = {a.rid: a for a in accepted}
        deadline = time.monotonic() + max(120.0, LEASE * 6)
        while pending and time.monotonic() < deadline:
            for rid, a in list(pending.items()):
                if self.status(a) == "COMPLETED":
                    del pending[rid]
            if pending:
                time.sleep(1.0)
        rep.lost = sorted(r for r, a in pending.items() if not a.cancelled)
        self.log(f"[soak {self.now():7.1f}s] {rep.accepted - len(pending)} of {rep.accepted} completed")
        rep.cancelled = sum(1 for a in accepted if a.cancelled)
        rep.completed = rep.accepted - len(pending)

        # Runs per request, from every app's own log (one line per answer it gave).
        seen, first_run = self.runs()
        windows = [(f["start"] - LEASE, f["end"] + LEASE * 2) for f in self.fault_log
                   if f["fault"] in ("replica-kill", "app-crash", "master-failover", "link-cut")]
        for a in accepted:
            n = seen.get(a.rid, 0)
            if n > 1:
                rep.duplicated[a.rid] = n
                t = first_run.get(a.rid)
                if t is None or not any(lo <= t <= hi for lo, hi in windows):
                    rep.duplicated_unexplained.append(a.rid)

        # Webhooks: the receiver keeps up to the outbox's last retry.
        hooked = [a for a in accepted if a.webhook and a.rid not in pending]
        rep.webhooks_expected = len(hooked)
        deadline = time.monotonic() + 150
        missing = hooked
        while time.monotonic() < deadline:
            delivered = self.delivered()
            missing = [a for a in missing if a.rid not in delivered]
            if not missing:
                break
            time.sleep(1.0)
        rep.webhooks_missing = [a.rid for a in missing]
        ok = [d.received_at for d in self.receiver.deliveries if 200 <= d.answered < 300]
        rep.last_webhook_at = round(max(ok) - self.t0_wall, 1) if ok else None
        self.log(f"[soak {self.now():7.1f}s] webhooks checked")
        rep.webhooks_unverified = [d.headers.get("x-fal-webhook-request-id", "?") for d in self.receiver.deliveries
                                   if 200 <= d.answered < 300 and not d.verified]
        rep.idem_mismatch = self.idem_mismatch
        rep.js_errors = self.js_errors

        by_kind: dict[str, list[Call]] = defaultdict(list)
        for c in self.calls:
            by_kind[c.kind].append(c)
        fault_spans = [(f["start"], f["end"] + 2) for f in self.fault_log]
        for kind, cs in sorted(by_kind.items()):
            during = [c.ms for c in cs if any(lo <= c.t <= hi for lo, hi in fault_spans)]
            errs = Counter(c.detail[:100] for c in cs if not c.ok)
            rep.calls[kind] = {"n": len(cs), "failed": sum(not c.ok for c in cs),
                               "p50_ms": round(percentile([c.ms for c in cs], 50), 1),
                               "p99_ms": round(percentile([c.ms for c in cs], 99), 1),
                               "p99_during_faults_ms": round(percentile(during, 99), 1),
                               "errors": dict(errs.most_common(5))}
        rep.faults = self.fault_log
        rep.scale_events = dict(self.zero_events)
        rep.rss = self.rss_summary()
        rep.rss_growth = self.rss_flatness()
        rep.left_behind = self.shutdown()
        self.log(f"[soak {self.now():7.1f}s] fal-operator local stopped")
        return rep

    def delivered(self) -> set[str]:
        """Request ids with a delivery the receiver answered 2xx (one pass over them)."""
        with self.receiver._lock:
            deliveries = list(self.receiver.deliveries)
        out = set()
        for d in deliveries:
            if 200 <= d.answered < 300:
                rid = d.headers.get("x-fal-webhook-request-id")
                if rid is None and isinstance(d.json, dict):
                    rid = d.json.get("request_id")
                if rid:
                    out.add(rid)
        return out

    def runs(self) -> tuple[Counter, dict[str, float]]:
        """How many times the apps answered each request, and when first (seconds into
        the run), from the apps' own logs."""
        count: Counter = Counter()
        first: dict[str, float] = {}
        for log in self.seen_logs.values():
            try:
                text = log.read_text()
            except FileNotFoundError:
                continue
            for line in text.splitlines():
                parts = line.split()
                # A cancel notice (`POST …/cancel` to the app) is not a run.
                if len(parts) != 4 or parts[1].endswith("/cancel"):
                    continue
                count[parts[0]] += 1
                t = float(parts[3]) - self.t0_wall
                first[parts[0]] = min(first.get(parts[0], t), t)
        return count, first

    def rss_summary(self) -> dict:
        out: dict[str, dict] = {}
        names = {k for _, s in self.rss_samples for k in s}
        for name in sorted(names):
            vals = [s[name] for _, s in self.rss_samples if name in s]
            if vals:
                out[name] = {"first_mib": round(vals[0] / 1024, 1), "max_mib": round(max(vals) / 1024, 1),
                             "last_mib": round(vals[-1] / 1024, 1)}
        return out

    def rss_flatness(self) -> dict:
        """For `fal-operator local`: the peak of the last quarter against the peak of the
        second quarter (the first quarter is warm-up)."""
        vals = [(t, s["fal-operator local"]) for t, s in self.rss_samples if "fal-operator local" in s]
        if len(vals) < 8:
            return {}
        q = len(vals) // 4
        second = max(v for _, v in vals[q:2 * q])
        last = max(v for _, v in vals[3 * q:])
        flat = last <= second * 1.10 + 4096
        return {"fal-operator local": {"second_quarter_peak_mib": round(second / 1024, 1),
                                       "last_quarter_peak_mib": round(last / 1024, 1), "flat": flat}}

    def shutdown(self) -> list[int]:
        """Stop `fal-operator local` (SIGTERM) and return the processes it left behind."""
        pids = set(descendants(self.proc.pid)) | self.replica_pids
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
        wait_deadline = time.monotonic() + 10
        while time.monotonic() < wait_deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.2)
        return sorted(p for p in pids if pid_alive(p))

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        if self.receiver is not None:
            self.receiver.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.cluster is not None:
            self.cluster.close()
        self.http.close()

    # -- output ----------------------------------------------------------------
    def markdown(self, rep: Report) -> str:
        lines = [f"soak: {rep.seconds:g} s of traffic, {rep.accepted} acknowledged submits "
                 f"({rep.cancelled} cancelled), {rep.completed} completed, lost {len(rep.lost)}, "
                 f"ran twice {len(rep.duplicated)} (outside fault windows: {len(rep.duplicated_unexplained)}), "
                 f"webhooks {rep.webhooks_expected - len(rep.webhooks_missing)}/{rep.webhooks_expected} delivered, "
                 f"(the last at {rep.last_webhook_at} s), npm client errors {rep.js_errors}",
                 "", "| calls | n | failed | p50 ms | p99 ms | p99 during faults ms |", "|---|---|---|---|---|---|"]
        for kind, c in rep.calls.items():
            lines.append(f"| {kind} | {c['n']} | {c['failed']} | {c['p50_ms']} | {c['p99_ms']} | "
                         f"{c['p99_during_faults_ms']} |")
        for kind, c in rep.calls.items():
            if c["errors"]:
                lines.append(f"{kind} failures: {c['errors']}")
        lines += ["", "faults: " + "; ".join(f"{f['start']:.0f}s {f['fault']}" for f in rep.faults),
                  "scale: " + ", ".join(f"{k} ×{v}" for k, v in sorted(rep.scale_events.items())),
                  "RSS: " + "; ".join(f"{k} {v['first_mib']}→{v['last_mib']} MiB (max {v['max_mib']})"
                                      for k, v in rep.rss.items() if not k.startswith("redis")),
                  f"left behind: {rep.left_behind or 'none'}"]
        return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--operator", type=Path, default=Path(os.environ.get("FAL_OPERATOR_BIN", REPO / "target/release/fal-operator")))
    ap.add_argument("--sidecar", type=Path, default=Path(os.environ.get("FAL_SIDECAR_BIN", REPO / "target/release/fal-sidecar")))
    ap.add_argument("--png", type=Path, help="RSS over time as a PNG")
    args = ap.parse_args()
    soak = Soak(args.out, args.seconds, args.operator, args.sidecar)
    try:
        soak.start()
        rep = soak.run()
    finally:
        soak.close()
    (args.out / "report.json").write_text(json.dumps(rep.__dict__, indent=1, default=str))
    (args.out / "rss.json").write_text(json.dumps(soak.rss_samples))
    print(soak.markdown(rep))
    if args.png:
        sys.path.insert(0, str(HERE))
        from plot import rss_png
        legend = rss_png(soak.rss_samples, args.png, faults=rep.faults)
        print(f"RSS plot: {args.png} (x: seconds, y: MiB from 0, grey: fault starts); colours: "
              + ", ".join(f"{name} rgb{c}" for name, c in legend))
    problems = rep.problems()
    for p in problems:
        print(f"FAIL: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
