"""Replicated Redis topologies for the high-availability end-to-end tests, on loopback:

* `RedisCluster`: N masters (R replicas each) with `--cluster-enabled yes`, created with
  `redis-cli --cluster create`; `kill9()` a node, `wait_failover()` until a replica took
  over, `master_for_key()`, `keys_per_node()`.
* `RedisSentinelSet`: 1 master + R replicas (`--replicaof`) watched by S sentinels
  (`redis-server --sentinel`); `kill9_master()`, `wait_new_master()`.

Every node is a real `redis-server` with AOF on (appendfsync everysec) in its own
directory under `workdir`, bound to 127.0.0.1, logging to `<dir>/redis.log`; replicas
sync at once (`sync_delay=5` gives Redis' default `repl-diskless-sync-delay`); errors
name the log to read. Standard library only: a small RESP client (`resp()`) talks to
the nodes. Timeouts are generous on purpose (the tests run on a loaded 2-core box).

Run the app wrapper as `python redis_ha_fixture.py app SEEN_LOG`: examples/app.py whose
responses carry `x-app-port` (as redis_fixture.py's wrapper) and which appends one line
`<x-fal-request-id> <path> <port>` to SEEN_LOG for every request it answers, so a test
can count how often each request ran over all replicas (the app's own /seen keeps 100).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from helpers import APP, free_port, wait_until

REDIS_SERVER = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = os.environ.get("REDIS_CLI") or shutil.which("redis-cli") or "/usr/bin/redis-cli"

# How long to wait for a topology to form / heal. Generous: 9 redis-servers plus
# sidecars and apps share two cores.
SETUP_TIMEOUT = float(os.environ.get("REDIS_HA_SETUP_TIMEOUT", "60"))
FAILOVER_TIMEOUT = float(os.environ.get("REDIS_HA_FAILOVER_TIMEOUT", "40"))


class RedisError(Exception):
    """An error reply (`-ERR ...`) from a node."""


# -- a minimal RESP2 client ---------------------------------------------------

def _read_reply(f) -> Any:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"connection closed mid-reply ({line!r})")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RedisError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        if len(data) != n + 2:
            raise ConnectionError("connection closed mid-bulk")
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [_read_reply(f) for _ in range(n)]
    raise ConnectionError(f"unexpected RESP reply {line!r}")


def resp(port: int, *args: str, timeout: float = 3.0, password: str | None = None) -> Any:
    """One command on a fresh connection; returns the decoded reply (str, int, list,
    None) and raises RedisError for an error reply, OSError when unreachable."""
    cmds = ([("AUTH", password)] if password else []) + [args]
    payload = b""
    for cmd in cmds:
        payload += f"*{len(cmd)}\r\n".encode()
        for a in cmd:
            b = str(a).encode()
            payload += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        with s.makefile("rb") as f:
            replies = [_read_reply(f) for _ in cmds]
    for r in replies:
        if isinstance(r, RedisError):
            raise r
    return replies[-1]


def info(port: int, section: str, password: str | None = None) -> dict[str, str]:
    text = resp(port, "INFO", section, password=password)
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v
    return out


# -- one node ---------------------------------------------------------------

class RedisNode:
    """One `redis-server` (or sentinel) process in its own directory."""

    def __init__(self, workdir: Path, name: str, args: list[str], port: int | None = None,
                 password: str | None = None):
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = port or free_port()
        self.extra = list(args)
        self.password = password
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.node_id: str | None = None  # cluster nodes only

    def __repr__(self) -> str:
        return f"<{self.name} :{self.port}{'' if self.alive else ' dead'}>"

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [REDIS_SERVER, *self.extra]

    def start(self) -> "RedisNode":
        assert not self.alive, f"{self.name} already running"
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=str(self.dir),
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "stdout.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cmd(self, *args: str, timeout: float = 3.0) -> Any:
        return resp(self.port, *args, timeout=timeout, password=self.password)

    def info(self, section: str) -> dict[str, str]:
        return info(self.port, section, password=self.password)

    def ping(self) -> bool:
        if not self.alive:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}\n{self.log_tail()}")
        try:
            return self.cmd("PING") == "PONG"
        except (OSError, RedisError):
            return False

    def wait_up(self, timeout: float = SETUP_TIMEOUT) -> None:
        try:
            wait_until(self.ping, timeout=timeout, interval=0.05, what=f"{self.name} on {self.port} to answer PING")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log_tail()}") from None

    def kill9(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        """SIGSTOP: the node stops answering (and replicating) but keeps its sockets."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = ["(no log yet)"]
        return f"--- {self.name} log ({self.log_path}), last {n} lines ---\n" + "\n".join(lines[-n:])


def _data_node_args(node_dir: Path, port: int, password: str | None, sync_delay: int = 0) -> list[str]:
    args = [
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(node_dir),
        "--logfile", str(node_dir / "redis.log"),
        "--save", "",
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        # 0: a (re)attaching replica syncs at once instead of after Redis' default 5 s
        "--repl-diskless-sync-delay", str(sync_delay),
        "--daemonize", "no",
    ]
    if password:
        args += ["--requirepass", password, "--masterauth", password]
    return args


def _other_free_port(*taken: int) -> int:
    while True:
        p = free_port()
        if p not in taken:
            return p


# -- cluster ------------------------------------------------------------------

class ClusterNode(RedisNode):
    bus_port: int = 0
    master_id: str | None = None  # whom it replicated at the last snapshot (None: a master)
    slots: list = []  # the slot ranges it served at the last snapshot (masters)


class RedisCluster:
    """`masters` masters with `replicas` replicas each, every slot covered.

    Nodes use an explicit `cluster-port` (bus port) so no port+10000 arithmetic is
    needed. The cluster keeps `cluster-require-full-coverage yes` (the default): while
    a master is down and not yet replaced, the whole cluster refuses commands."""

    def __init__(self, workdir: Path, masters: int = 3, replicas: int = 0,
                 node_timeout_ms: int = 1000, password: str | None = None, sync_delay: int = 0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.n_masters = masters
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.nodes: list[ClusterNode] = []
        self.create_log = self.workdir / "cluster-create.log"
        used: list[int] = []
        for i in range(masters * (1 + replicas)):
            port = _other_free_port(*used)
            used.append(port)
            bus = _other_free_port(*used)
            used.append(bus)
            name = f"node{i}"
            node_dir = self.workdir / name
            args = _data_node_args(node_dir, port, password, sync_delay) + [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-port", str(bus),
                # a replica may take over however long it was cut off
                "--cluster-replica-validity-factor", "0",
            ]
            node = ClusterNode(self.workdir, name, args, port=port, password=password)
            node.bus_port = bus
            self.nodes.append(node)

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = SETUP_TIMEOUT, settle: bool = True) -> "RedisCluster":
        """Start the nodes and create the cluster. With `settle` (the default), wait
        until it is healthy everywhere (every replica's link up); without, return as
        soon as `redis-cli --cluster create` is done, while replicas still sync: what a
        process started together with the cluster meets."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_up(timeout=max(1.0, deadline - time.monotonic()))
            cmd = [REDIS_CLI]
            if self.password:
                cmd += ["--no-auth-warning", "-a", self.password]
            cmd += ["--cluster", "create", *[n.addr for n in self.nodes],
                    "--cluster-replicas", str(self.n_replicas), "--cluster-yes"]
            with open(self.create_log, "wb") as log:
                rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=max(5.0, deadline - time.monotonic())).returncode
            out = self.create_log.read_text(errors="replace")
            if rc != 0 or "[OK] All 16384 slots covered" not in out:
                raise AssertionError(f"redis-cli --cluster create failed (exit {rc}); {self.create_log}:\n{out[-3000:]}")
            for node in self.nodes:
                node.node_id = node.cmd("CLUSTER", "MYID")
            if settle:
                self.wait_healthy(timeout=max(5.0, deadline - time.monotonic()))
                self._snapshot()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.kill9()  # SIGKILL works on a SIGSTOPped node too

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- addresses ---------------------------------------------------------
    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.addr for n in self.nodes)

    def url_with_password(self) -> str:
        return "redis+cluster://" + ",".join(f":{self.password}@{n.addr}" if i == 0 else n.addr
                                             for i, n in enumerate(self.nodes))

    def alive(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.alive]

    def by_id(self, node_id: str) -> ClusterNode:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    # -- topology ----------------------------------------------------------
    def topology(self, via: ClusterNode | None = None) -> list[dict]:
        """CLUSTER NODES as seen by `via` (default: the first live node):
        [{id, port, flags:set, master (id or None), slots:[(lo, hi)], node}]."""
        via = via or self.alive()[0]
        rows = []
        for line in via.cmd("CLUSTER", "NODES").splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            addr = parts[1].split("@")[0].split(",")[0]
            slots = []
            for s in parts[8:]:
                if s.startswith("["):
                    continue  # a slot being migrated
                lo, _, hi = s.partition("-")
                slots.append((int(lo), int(hi or lo)))
            rows.append({
                "id": parts[0],
                "port": int(addr.rsplit(":", 1)[1]),
                "flags": set(parts[2].split(",")),
                "master": None if parts[3] == "-" else parts[3],
                "slots": slots,
                "link": parts[7],
                "node": self.by_id(parts[0]),
            })
        return rows

    def masters(self, via: ClusterNode | None = None) -> list[ClusterNode]:
        return [r["node"] for r in self.topology(via)
                if "master" in r["flags"] and "fail" not in r["flags"] and r["slots"]]

    def replicas_of(self, master: ClusterNode, via: ClusterNode | None = None) -> list[ClusterNode]:
        return [r["node"] for r in self.topology(via)
                if r["master"] == master.node_id and "slave" in r["flags"]]

    def keyslot(self, key: str) -> int:
        return int(self.alive()[0].cmd("CLUSTER", "KEYSLOT", key))

    def master_for_key(self, key: str) -> ClusterNode:
        slot = self.keyslot(key)
        for r in self.topology():
            if "master" in r["flags"] and "fail" not in r["flags"]:
                if any(lo <= slot <= hi for lo, hi in r["slots"]):
                    return r["node"]
        raise AssertionError(f"no live master serves slot {slot} of {key!r}: {self.describe()}")

    def kill9(self, node: ClusterNode) -> None:
        node.kill9()

    def _state_ok(self, node: ClusterNode) -> bool:
        return node.info("cluster").get("cluster_enabled") == "1" and \
            "cluster_state:ok" in node.cmd("CLUSTER", "INFO")

    def _healthy(self) -> bool:
        live = self.alive()
        for node in live:
            if not self._state_ok(node):
                return False
        # Every live node agrees on who the masters are and that no live node is
        # flagged failing; every live replica has its replication link up.
        expected_masters = None
        for node in live:
            topo = self.topology(node)
            for r in topo:
                if r["node"].alive and ({"fail", "fail?"} & r["flags"]):
                    return False
            masters = sorted(r["id"] for r in topo
                             if "master" in r["flags"] and r["slots"] and "fail" not in r["flags"])
            if expected_masters is None:
                expected_masters = masters
            elif masters != expected_masters:
                return False
            role = node.info("replication")
            if role.get("role") == "slave" and role.get("master_link_status") != "up":
                return False
        return True

    def wait_healthy(self, timeout: float = SETUP_TIMEOUT) -> None:
        """cluster_state:ok on every live node, the same masters everywhere, and (at
        start) every replica attached to its master."""
        def check():
            if not self._healthy():
                return False
            if all(n.alive for n in self.nodes):
                ms = self.masters()
                if len(ms) != self.n_masters:
                    return False
                for m in ms:
                    if len(self.replicas_of(m)) != self.n_replicas:
                        return False
                    if int(m.info("replication").get("connected_slaves", "0")) != self.n_replicas:
                        return False
            return True

        try:
            wait_until(check, timeout=timeout, interval=0.2, what="the redis cluster to be healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}\nnode logs: "
                                 + ", ".join(str(n.log_path) for n in self.nodes)) from None

    def _snapshot(self) -> None:
        """Remember who replicates whom and which slots each master serves (read after
        the cluster is healthy), so wait_failover() knows what to expect."""
        for r in self.topology():
            r["node"].master_id = r["master"]
            r["node"].slots = r["slots"] if "master" in r["flags"] else []

    def wait_failover(self, old_master: ClusterNode, timeout: float = FAILOVER_TIMEOUT,
                      replicas_attached: bool = True) -> ClusterNode:
        """Wait until one of `old_master`'s replicas serves its slots and the cluster is
        ok again on every live node (with `replicas_attached`, the old master's other
        live replicas replicate from the new one, link up); return the new master."""
        assert old_master.node_id and old_master.slots, f"{old_master.name} was not a master"
        candidates = {n.node_id for n in self.nodes if n.alive and n.master_id == old_master.node_id}
        assert candidates, f"{old_master.name} had no live replica to fail over to"

        def check():
            if not self._healthy():
                return None
            for r in self.topology():
                if r["id"] in candidates and "master" in r["flags"] and r["slots"] == old_master.slots:
                    new = r["node"]
                    break
            else:
                return None
            if replicas_attached:
                for node in self.nodes:
                    if node.alive and node.node_id in candidates and node is not new:
                        ri = node.info("replication")
                        if ri.get("master_port") != str(new.port) or ri.get("master_link_status") != "up":
                            return None
                if len(self.replicas_of(new)) != len(candidates) - 1:
                    return None
            return new

        try:
            new = wait_until(check, timeout=timeout, interval=0.1,
                             what=f"a replica of {old_master.name} to take over slots {old_master.slots}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}\nnode logs: "
                                 + ", ".join(str(n.log_path) for n in self.nodes)) from None
        self._snapshot()
        return new

    def wait_flagged_fail(self, node: ClusterNode, timeout: float = FAILOVER_TIMEOUT) -> None:
        """Wait until every other live node flags `node` as failed (`fail`)."""
        def check():
            for other in self.alive():
                if other is node:
                    continue
                if not any(r["id"] == node.node_id and "fail" in r["flags"] for r in self.topology(other)):
                    return False
            return True

        wait_until(check, timeout=timeout, interval=0.1, what=f"the cluster to flag {node.name} as failed")

    def keys_per_node(self, pattern: str = "fal:*") -> dict[ClusterNode, list[str]]:
        """The keys matching `pattern` on each live master (masters without any omitted)."""
        out = {}
        for m in self.masters():
            keys = m.cmd("KEYS", pattern)
            if keys:
                out[m] = sorted(keys)
        return out

    def describe(self) -> str:
        lines = []
        for n in self.nodes:
            if not n.alive:
                lines.append(f"{n.name} :{n.port} DEAD")
                continue
            try:
                lines.append(f"{n.name} :{n.port} " + n.cmd("CLUSTER", "INFO").splitlines()[0]
                             + " role=" + n.info("replication").get("role", "?"))
            except Exception as exc:  # noqa: BLE001 - diagnostics
                lines.append(f"{n.name} :{n.port} unreachable: {exc!r}")
        try:
            lines.append(self.alive()[0].cmd("CLUSTER", "NODES"))
        except Exception:  # noqa: BLE001
            pass
        return "\n".join(lines)


# -- sentinel ---------------------------------------------------------------

class SentinelNode(RedisNode):
    def __init__(self, workdir: Path, name: str, monitor_port: int, master_name: str,
                 quorum: int, down_after_ms: int, failover_timeout_ms: int,
                 password: str | None = None):
        super().__init__(workdir, name, [])
        self.conf_path = self.dir / "sentinel.conf"
        conf = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "daemonize no",
            f"dir {self.dir}",
            f"logfile {self.log_path}",
            f"sentinel monitor {master_name} 127.0.0.1 {monitor_port} {quorum}",
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
            f"sentinel parallel-syncs {master_name} 2",
        ]
        if password:
            conf.append(f"sentinel auth-pass {master_name} {password}")
        self.conf_path.write_text("\n".join(conf) + "\n")  # sentinel rewrites it: keep it ours

    def argv(self) -> list[str]:
        return [REDIS_SERVER, str(self.conf_path), "--sentinel"]


class RedisSentinelSet:
    """One master, `replicas` replicas (`--replicaof`), `sentinels` sentinels with
    quorum 2 and a short down-after, so a kill -9 of the master fails over in seconds."""

    def __init__(self, workdir: Path, replicas: int = 2, sentinels: int = 3, master_name: str = "fal",
                 down_after_ms: int = 1000, failover_timeout_ms: int = 5000, db: int = 0,
                 password: str | None = None, sync_delay: int = 0):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.master_name = master_name
        self.db = db
        self.password = password
        self.n_replicas = replicas
        port = free_port()
        self.data_nodes: list[RedisNode] = [
            RedisNode(self.workdir, "redis0", _data_node_args(self.workdir / "redis0", port, password, sync_delay),
                      port=port, password=password)
        ]
        for i in range(replicas):
            p = _other_free_port(*(n.port for n in self.data_nodes))
            args = _data_node_args(self.workdir / f"redis{i + 1}", p, password, sync_delay) + \
                ["--replicaof", "127.0.0.1", str(port)]
            self.data_nodes.append(RedisNode(self.workdir, f"redis{i + 1}", args, port=p, password=password))
        self.sentinels: list[SentinelNode] = [
            SentinelNode(self.workdir, f"sentinel{i}", port, master_name, quorum=2,
                         down_after_ms=down_after_ms, failover_timeout_ms=failover_timeout_ms,
                         password=password)
            for i in range(sentinels)
        ]

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = SETUP_TIMEOUT, settle: bool = True) -> "RedisSentinelSet":
        """Start every node. With `settle` (the default), wait until the replicas are
        attached and every sentinel sees the master, its replicas and the other
        sentinels; without, return once every process answers PING, while replicas
        still sync and sentinels still discover each other: what a process started
        together with them meets."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.data_nodes:
                node.start()
            if not settle:
                for s in self.sentinels:
                    s.start()
                for node in [*self.data_nodes, *self.sentinels]:
                    node.wait_up(timeout=max(1.0, deadline - time.monotonic()))
                return self
            for node in self.data_nodes:
                node.wait_up(timeout=max(1.0, deadline - time.monotonic()))
            master = self.data_nodes[0]
            try:
                wait_until(lambda: int(master.info("replication").get("connected_slaves", "0")) == self.n_replicas
                           and all(r.info("replication").get("master_link_status") == "up"
                                   for r in self.data_nodes[1:]),
                           timeout=max(1.0, deadline - time.monotonic()), interval=0.1,
                           what=f"{self.n_replicas} replicas to attach to the master")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n" + "\n".join(n.log_tail(15) for n in self.data_nodes)) from None
            for s in self.sentinels:
                s.start()
            for s in self.sentinels:
                s.wait_up(timeout=max(1.0, deadline - time.monotonic()))
            self.wait_sentinels_see(master, timeout=max(5.0, deadline - time.monotonic()))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for n in [*self.sentinels, *self.data_nodes]:
            n.kill9()

    def __enter__(self) -> "RedisSentinelSet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- addresses ---------------------------------------------------------
    @property
    def url(self) -> str:
        return ("redis+sentinel://" + ",".join(s.addr for s in self.sentinels)
                + f"/{self.master_name}/{self.db}")

    def node_at(self, port: int) -> RedisNode:
        for n in self.data_nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    def master(self, via: SentinelNode | None = None) -> RedisNode:
        """The master a (live) sentinel names now."""
        via = via or next(s for s in self.sentinels if s.alive)
        host, port = via.cmd("SENTINEL", "get-master-addr-by-name", self.master_name)
        return self.node_at(int(port))

    def wait_sentinels_see(self, master: RedisNode, timeout: float = SETUP_TIMEOUT) -> None:
        """Every live sentinel names `master`, sees its live replicas (not down) and
        the other live sentinels, and has a quorum for a failover."""
        live_replicas = {n.port for n in self.data_nodes if n.alive and n is not master}
        live_sentinels = [s for s in self.sentinels if s.alive]

        def check():
            for s in live_sentinels:
                if self.master(s) is not master:
                    return False
                reps = s.cmd("SENTINEL", "replicas", self.master_name)
                seen = set()
                for r in reps:
                    d = dict(zip(r[::2], r[1::2]))
                    flags = set(d.get("flags", "").split(","))
                    if "slave" in flags and not ({"s_down", "o_down", "disconnected"} & flags) \
                            and d.get("master-link-status") == "ok":
                        seen.add(int(d["port"]))
                if not live_replicas <= seen:
                    return False
                others = s.cmd("SENTINEL", "sentinels", self.master_name)
                if len(others) < len(live_sentinels) - 1:
                    return False
                if not str(s.cmd("SENTINEL", "ckquorum", self.master_name)).startswith("OK"):
                    return False
            return True

        try:
            wait_until(check, timeout=timeout, interval=0.2,
                       what=f"every sentinel to see master :{master.port} and replicas {sorted(live_replicas)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}\nlogs: "
                                 + ", ".join(str(n.log_path) for n in [*self.data_nodes, *self.sentinels])) from None

    def kill9_master(self) -> RedisNode:
        m = self.master()
        m.kill9()
        return m

    def wait_new_master(self, old: RedisNode, timeout: float = FAILOVER_TIMEOUT,
                        replicas_attached: bool = True) -> RedisNode:
        """Wait until every live sentinel names a new master that says role:master (and,
        with `replicas_attached`, the surviving replicas replicate from it); return it."""
        def check():
            names = {self.master(s).port for s in self.sentinels if s.alive}
            if len(names) != 1:
                return None
            new = self.node_at(names.pop())
            if new is old or not new.alive or new.info("replication").get("role") != "master":
                return None
            if replicas_attached:
                for r in self.data_nodes:
                    if r.alive and r is not new:
                        ri = r.info("replication")
                        if ri.get("role") != "slave" or ri.get("master_port") != str(new.port) \
                                or ri.get("master_link_status") != "up":
                            return None
            return new

        try:
            return wait_until(check, timeout=timeout, interval=0.1,
                              what=f"the sentinels to promote a replica of :{old.port}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}\nlogs: "
                                 + ", ".join(str(n.log_path) for n in [*self.data_nodes, *self.sentinels])) from None

    def describe(self) -> str:
        lines = []
        for n in self.data_nodes:
            if not n.alive:
                lines.append(f"{n.name} :{n.port} DEAD")
                continue
            try:
                ri = n.info("replication")
                lines.append(f"{n.name} :{n.port} role={ri.get('role')} master_port={ri.get('master_port', '-')} "
                             f"link={ri.get('master_link_status', '-')} slaves={ri.get('connected_slaves', '-')}")
            except Exception as exc:  # noqa: BLE001 - diagnostics
                lines.append(f"{n.name} :{n.port} unreachable: {exc!r}")
        for s in self.sentinels:
            try:
                lines.append(f"{s.name} :{s.port} says master "
                             + ":".join(s.cmd("SENTINEL", "get-master-addr-by-name", self.master_name)))
            except Exception as exc:  # noqa: BLE001
                lines.append(f"{s.name} :{s.port} unreachable: {exc!r}")
        return "\n".join(lines)


# -- the app wrapper that records every request it answers ---------------------

def app_cmd(seen_log: Path) -> list[str]:
    """examples/app.py with `x-app-port` on every response, appending
    `<x-fal-request-id> <path> <port>` to `seen_log` for each request it answers."""
    return [sys.executable, "-u", str(Path(__file__).resolve()), "app", str(seen_log)]


def seen_counts(*logs: Path, path: str | None = None) -> Counter:
    """How many times each request id was answered by the apps writing `logs`."""
    c: Counter = Counter()
    for log in logs:
        try:
            text = Path(log).read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] != "-" and (path is None or parts[1] == path):
                c[parts[0]] += 1
    return c


def _run_app(seen_log: str) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fal_example_app", APP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    port = os.environ.get("PORT", "8000")
    original = mod.Handler._send
    fd = os.open(seen_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _send(self, status, body, content_type="application/json", headers=None):
        headers = dict(headers or {})
        headers["x-app-port"] = port
        rid = self.headers.get("x-fal-request-id")
        if rid:
            path = self.path.split("?", 1)[0]
            os.write(fd, f"{rid} {path} {port}\n".encode())  # one O_APPEND write: whole lines
        return original(self, status, body, content_type, headers)

    mod.Handler._send = _send
    mod.main()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "app":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        _run_app(sys.argv[2])
    else:
        sys.exit("usage: redis_ha_fixture.py app SEEN_LOG")
