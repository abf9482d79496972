"""Issue 21: the edge speaks strict HTTP/1.1. Every case of corpus.py is sent byte for
byte to nginx and Go's net/http (the references) and to each listener of the sidecar and
of the gateway; on every case ours must be no laxer than either reference (edge.py's
`no_laxer`: refused where it refused, closed where it closed, nothing more reaching the
backend), and the listener must still be alive afterwards.

The verdict table (VERDICTS.md next to this file) is written by a run with
FAL_EDGE_TABLE=tests/http-edge/VERDICTS.md.
"""

from __future__ import annotations

import os

import pytest

import servers
from corpus import CASES, by_name
from edge import exchange, no_laxer, render, run_corpus

# A case that looks laxer on the first pass is sent again, to ours and to the reference,
# with this much quiet before a connection counts as left open: a busy machine must not
# turn "slow" into "laxer".
CONFIRM_IDLE = 5.0

LISTENERS = [("sidecar", "run"), ("sidecar", "queue"), ("sidecar", "run-host"), ("sidecar", "admin"),
             ("gateway", "run"), ("gateway", "queue"), ("gateway", "admin")]


class Reference:
    def __init__(self, server):
        self.server = server
        self.verdicts = run_corpus(server.addr, CASES, server.records)

    def again(self, case):
        return exchange(self.server.addr, case.raw(), self.server.records, case.name, idle=CONFIRM_IDLE)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    refs: dict[str, Reference] = {}
    started = []
    if not servers.nginx_version():
        pytest.fail(f"nginx is not installed ({servers.NGINX}): scripts/test.sh installs it (apt-get install nginx)")
    try:
        nginx = servers.Nginx(tmp_path_factory.mktemp("edge-nginx"))
        started.append(nginx)
        refs["nginx"] = Reference(nginx)
        if servers.go_version():
            go = servers.GoServer(tmp_path_factory.mktemp("edge-go"))
            started.append(go)
            refs["go"] = Reference(go)
        else:
            print(f"NOTICE: no Go at {servers.GO}: the corpus runs against nginx only")
        yield refs
    finally:
        for s in started:
            s.close()


@pytest.fixture(scope="module")
def table(references):
    """The verdicts of every server, rendered at the end when FAL_EDGE_TABLE is set."""
    verdicts = {name: ref.verdicts for name, ref in references.items()}
    yield verdicts
    path = os.environ.get("FAL_EDGE_TABLE")
    if path:
        versions = f"{servers.nginx_version()}, {servers.go_version() or 'no Go'}"
        header = ("# The differential corpus: verdicts\n\nWritten by `tests/http-edge/test_corpus.py` "
                  f"with FAL_EDGE_TABLE set ({versions}). A cell: the statuses on the connection "
                  "(0: an HTTP/0.9 answer), whether the server closed it, how many requests reached "
                  "the backend (`b=`; of our listeners only the run listeners have it behind them). "
                  "Why each case is there: corpus.py.")
        order = [k for k in ["nginx", "go"] if k in verdicts] + [k for k in verdicts if k not in ("nginx", "go")]
        with open(path, "w") as f:
            f.write(render(verdicts, order, CASES, header))


def test_the_corpus_is_large_and_the_references_take_the_well_formed_cases(references):
    assert len(CASES) >= 60
    by_name()  # unique names
    for name, ref in references.items():
        for c in CASES:
            if c.name.startswith("ok-"):
                v = ref.verdicts[c.name]
                assert v.classes[:1] == "A", f"{name} refused the well-formed case {c.name}: {v.cell()}"


@pytest.mark.parametrize("server,listener", LISTENERS, ids=[f"{s}-{l}" for s, l in LISTENERS])
def test_never_laxer_than_the_references(request, references, table, server, listener):
    target = request.getfixturevalue(server)
    backend = listener == target.backend_listener
    records = target.records if backend else None
    addr = target.listeners[listener]
    ours = run_corpus(addr, CASES, records, ours=True)
    table[f"{server} {listener}"] = ours

    cases = by_name()
    problems = []
    for name in sorted(ours):
        for ref_name, ref in references.items():
            if not no_laxer(ours[name], ref.verdicts[name]):
                continue
            # Confirm with a long quiet period on both sides before calling it laxer.
            mine = exchange(addr, cases[name].raw(), records, name, idle=CONFIRM_IDLE, ours=True)
            theirs = ref.again(cases[name])
            why = no_laxer(mine, theirs)
            if why:
                problems.append(f"{name} vs {ref_name}: ours {mine.cell()}, {ref_name} {theirs.cell()}: "
                                f"{'; '.join(why)}\n    ours sent back {mine.raw[:600]!r}")
    assert target.alive(), f"{server} is down after the corpus:\n{target.log()}"
    assert not problems, (f"{len(problems)} case(s) where {server}'s {listener} listener is laxer than a "
                          "reference:\n" + "\n".join(problems))

