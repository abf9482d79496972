"""Sending the corpus and judging what came back.

A *verdict* is what one server did with one case: the status of each response on the
connection (1xx interim responses left out; 0 for an HTTP/0.9 answer without a status
line), whether the server closed the connection, and the requests that reached its
backend whole (method, path, body), attributed to the case by the path's first segment.

Each response is classed A (let through) or R (refused). For a reference, A is its
backend's answer or anything below 400. For our listeners the question is what the edge
let through, so R is only a refusal (4xx/5xx) that ends the connection: a 404 from the
routes of a queue or admin listener, or from the gateway for a request whose Host names
no function, means the request passed the edge.

`no_laxer(ours, ref)` is the pass rule: a refusal where the reference refused, a
connection closed at least where the reference closed, and no backend request the
reference's backend did not get.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

# How long a connection must stay quiet, once every request that reached the backend has
# been answered, before it counts as left open (the server waits for more or keeps it
# alive). A deadline, not a measurement: a slow server only makes the run longer.
IDLE = 1.0
# Longest one case may take at all (a server that neither answers nor closes).
CASE_DEADLINE = 30.0


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    # One of our listeners (see the module's doc).
    ours: bool = False

    @property
    def from_backend(self) -> bool:
        return self.body.startswith(b"ok /")

    @property
    def klass(self) -> str:
        """A: let through; R: refused (see the module's doc)."""
        if self.from_backend or self.status < 400:
            return "A"
        if self.ours and (self.header("connection") or "").lower() != "close":
            return "A"
        return "R"

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    @property
    def json_detail(self) -> bool:
        try:
            return isinstance(json.loads(self.body).get("detail"), str)
        except (ValueError, AttributeError):
            return False


@dataclass
class Verdict:
    responses: list[Response]
    closed: bool
    records: list[tuple[str, str, str]] = field(default_factory=list)
    raw: bytes = b""
    # How many backend records of the case existed before this exchange.
    seen: int = 0

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    @property
    def classes(self) -> str:
        return "".join(r.klass for r in self.responses)

    def cell(self) -> str:
        s = ",".join(str(x) for x in self.statuses) or "-"
        return f"{s} {'close' if self.closed else 'open'} b={len(self.records)}"


# -- responses ------------------------------------------------------------------------------

def parse_responses(buf: bytes, closed: bool, ours: bool = False) -> list[Response]:
    """The complete final responses in `buf` (a trailing partial one is left out unless
    the connection closed, where a body without a length ends)."""
    out: list[Response] = []
    pos = 0
    while pos < len(buf):
        if not buf.startswith(b"HTTP/", pos):
            if closed:
                out.append(Response(0, [], buf[pos:], ours))  # HTTP/0.9: the body alone
            return out
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return out
        lines = buf[pos:end].decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ")[1])
        except (IndexError, ValueError):
            return out
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k.strip().lower(), v.strip()))
        hmap = {k: v for k, v in headers}
        body_start = end + 4
        if 100 <= status < 200 or status in (204, 304):
            body, pos = b"", body_start
        elif "content-length" in hmap:
            n = int(hmap["content-length"])
            if len(buf) - body_start < n:
                return out
            body, pos = buf[body_start:body_start + n], body_start + n
        elif "chunked" in hmap.get("transfer-encoding", "").lower():
            parsed = _dechunk(buf, body_start)
            if parsed is None:
                return out
            body, pos = parsed
        else:
            if not closed:
                return out
            body, pos = buf[body_start:], len(buf)
        if not 100 <= status < 200:
            out.append(Response(status, headers, body, ours))
    return out


def _dechunk(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    body = b""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(buf[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)
            return (body, end + 4) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos:pos + size]
        pos += size + 2


# -- the backend's records -------------------------------------------------------------------

def case_of(target: str) -> str:
    """The case a backend request belongs to: the first segment of its path."""
    if "://" in target:
        target = urlsplit(target).path
    return target.lstrip("/").split("/", 1)[0].split("?", 1)[0]


def path_of(target: str) -> str:
    return urlsplit(target).path if "://" in target else target


class Records:
    """The JSON lines a backend appends to `path`, read as they come, by case."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.touch()
        self._offset = 0
        self._by_case: dict[str, list[tuple[str, str, str]]] = {}
        self.malformed: list[dict] = []
        self._lock = threading.Lock()

    def refresh(self) -> None:
        with self._lock:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            cut = data.rfind(b"\n") + 1
            self._offset += cut
            for line in data[:cut].splitlines():
                rec = json.loads(line)
                if "malformed" in rec:
                    self.malformed.append(rec)
                    continue
                if "incomplete" in rec:
                    continue
                key = (rec["method"], path_of(rec["target"]), rec["body"])
                self._by_case.setdefault(case_of(rec["target"]), []).append(key)

    def of(self, case: str) -> list[tuple[str, str, str]]:
        self.refresh()
        with self._lock:
            return list(self._by_case.get(case, []))


# -- sending -------------------------------------------------------------------------------

def exchange(addr: tuple[str, int], raw: bytes, records: Records | None, case: str,
             idle: float = IDLE, deadline: float = CASE_DEADLINE, ours: bool = False) -> Verdict:
    """Sends `raw` on a fresh connection and reads until the server closes, or until the
    connection has been quiet for `idle` with every backend request answered. Only the
    backend requests of this exchange count (a case sent again is judged afresh)."""
    start = time.monotonic()
    seen = len(records.of(case)) if records else 0
    sock = socket.create_connection(addr, timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    closed = False
    try:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed early; what it answered is still readable
        sock.settimeout(0.05)
        last = time.monotonic()
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                data = None
            except ConnectionResetError:
                closed = True
                break
            now = time.monotonic()
            if data == b"":
                closed = True
                break
            if data:
                buf += data
                last = now
                continue
            if now - start > deadline:
                break
            if now - last >= idle:
                answered = len(parse_responses(buf, False))
                reached = len(records.of(case)) - seen if records else 0
                if answered >= reached:
                    break
    finally:
        sock.close()
    v = Verdict(parse_responses(buf, closed, ours), closed, raw=buf)
    v.seen = seen
    if records is not None:
        v.records = sorted(records.of(case)[seen:])
    return v


def run_corpus(addr: tuple[str, int], cases, records: Records | None, parallel: int = 16,
               idle: float = IDLE, ours: bool = False) -> dict[str, Verdict]:
    """Every case against one server, `parallel` connections at a time."""
    out: dict[str, Verdict] = {}
    errors: list[BaseException] = []
    todo = list(cases)
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not todo or errors:
                    return
                case = todo.pop(0)
            try:
                v = exchange(addr, case.raw(), records, case.name, idle=idle, ours=ours)
            except BaseException as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(e)
                return
            with lock:
                out[case.name] = v

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    if records is not None:
        # A late forward shows up here rather than being lost: read the records once more.
        for name, v in out.items():
            v.records = sorted(records.of(name)[v.seen:])
    return out


# -- judging ---------------------------------------------------------------------------------

def no_laxer(ours: Verdict, ref: Verdict) -> list[str]:
    """Why `ours` is laxer than `ref` (empty: equal or stricter)."""
    problems = []
    extra = Counter(ours.records) - Counter(ref.records)
    if extra:
        problems.append(f"the backend got {sorted(extra)} which the reference's did not")
    o, r = ours.classes, ref.classes
    for i in range(max(len(o), len(r)) + 1):
        if i == len(o):
            # Ours said all it will say: it must have closed, or be waiting where the
            # reference is waiting too (having said no more than it).
            if not ours.closed and (ref.closed or i < len(r)):
                problems.append(
                    f"after {i} response(s) ours keeps the connection open; the reference "
                    f"{'answered ' + r[i] if i < len(r) else 'closed it'}")
            break
        if i == len(r):
            # The reference stopped answering (waiting or closed); ours may only refuse.
            if o[i] != "R":
                problems.append(f"response {i + 1}: ours answered ({ours.statuses[i]}) where the reference did not")
            elif i + 1 < len(o) or not ours.closed:
                problems.append(f"response {i + 1}: ours refused but kept the connection going")
            break
        if o[i] == "A" and r[i] == "R":
            problems.append(f"response {i + 1}: ours accepted ({ours.statuses[i]}) what the reference "
                            f"refused ({ref.statuses[i]})")
            break
        if o[i] == "R" and r[i] == "A":
            if i + 1 < len(o) or not ours.closed:
                problems.append(f"response {i + 1}: ours refused but kept the connection going")
            break
    return problems


def render(table: dict[str, dict[str, Verdict]], order: list[str], cases, header: str) -> str:
    """The verdict table as Markdown: one row per case, one column per server."""
    lines = [header, "", "| case | source | " + " | ".join(order) + " |",
             "|---|---|" + "---|" * len(order)]
    for c in cases:
        cells = [table[t][c.name].cell() if c.name in table[t] else "?" for t in order]
        lines.append(f"| `{c.name}` | {c.source} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
