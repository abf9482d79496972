"""The seed's deploy flow against `fal-operator local` (issue 18): `fal-operator function
serve app.py app --alias app --local ADMIN` with the seed's own file (flask from PyPI),
its two output lines, the seed's calls, scale to zero and back, a redeploy that rolls to
new code without losing queued requests, the same file again (same revision, no
rebuild), a function returning a WSGI app, a wheelhouse with no index, a failed build
that leaves the old revision serving, and every bad input refused with nothing
registered."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from local_proc import OPERATOR_BIN
from helpers import wait_until
from served_files import LINES, SEED

RETURNED = '''import fal_serverless


@fal_serverless.isolated(requirements=["flask"], keep_alive=30)
def made():
    from flask import Flask
    app = Flask("made")

    @app.route("/hello", methods=["GET", "POST"])
    def hello():
        return {"from": "a returned WSGI app"}

    return app
'''



def serve(loc, path, function="app", *extra, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(OPERATOR_BIN), "function", "serve", str(path), function, "--local", loc.admin_url, *extra],
        capture_output=True, text=True, timeout=600, env={"FAL_PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def announced(proc) -> tuple[str, str, str]:
    m = LINES.match(proc.stdout)
    assert m, f"not the seed's two lines: {proc.stdout!r}"
    return m.groups()


def seed(tmp_path, version: int, keep_alive: int = 2):
    p = tmp_path / "app.py"
    p.write_text(SEED.format(version=version, keep_alive=keep_alive))
    return p


def test_the_seed_file_end_to_end(make_local, tmp_path):
    loc = make_local([], env={"FAL_PYTHON": sys.executable})
    first = serve(loc, seed(tmp_path, 1), "app", "--alias", "app", "--auth", "public")
    alias, rev1, url = announced(first)
    assert (alias, url) == ("app", f"{loc.run_url}/default/app")
    assert "pip install flask" in first.stderr, "the build log reaches the CLI"
    # The seed's calls: direct, and its queue paths.
    r = loc.http.post(f"{url}/test", json={"x": 1}, timeout=120)
    assert r.status_code == 200 and r.json() == {"version": 1, "input": {"x": 1}}, r.text
    rid = loc.http.post(f"{url}/fal/queue/submit/test", json={"q": 1}).json()["request_id"]
    got = wait_until(lambda: (lambda r: r if r.status_code == 200 else None)(
        loc.http.get(f"{url}/fal/queue/{rid}/get")), 60, what="the seed's get")
    assert got.json() == {"version": 1, "input": {"q": 1}}
    # keep_alive=2: back to zero, and woken again.
    loc.wait_processes("default/app", 0, timeout=60)
    r = loc.http.post(f"{url}/test", json={"again": True}, timeout=120)
    assert r.json()["input"] == {"again": True}

    # The same file again: the same revision, nothing rebuilt.
    again = serve(loc, seed(tmp_path, 1), "app", "--alias", "app", "--auth", "public")
    assert announced(again)[1] == rev1
    assert "pip install" not in again.stderr

    # A changed file: a new revision; requests queued across the rollout all complete.
    slow = [loc.http.post(f"{url}/fal/queue/submit/slow", json={"seconds": 0.5}).json()["request_id"]
            for _ in range(4)]
    t0 = time.monotonic()
    second = serve(loc, seed(tmp_path, 2), "app", "--alias", "app", "--auth", "public")
    rev2 = announced(second)[1]
    assert rev2 != rev1 and "is built already" in second.stderr, second.stderr
    print(f"FUNCTION-SERVE-MEASURE redeploy with the same requirements: {time.monotonic() - t0:.2f} s")
    wait_until(lambda: loc.http.post(f"{url}/test", json={}).json().get("version") == 2, 120,
               what="the new revision answering")
    for rid in slow:
        done = wait_until(lambda: (lambda r: r if r.status_code == 200 else None)(
            loc.http.get(f"{url}/fal/queue/{rid}/get")), 120, what=f"{rid} across the rollout")
        assert done.json()["slept"] is True
    served = loc.fn("default/app")["local"]["served"]
    assert served["revision"] == rev2 and [h["revision"] for h in served["history"]] == [rev1, rev2]


def test_returned_app_wheelhouse_and_failed_build(make_local, tmp_path):
    loc = make_local([], env={"FAL_PYTHON": sys.executable})
    made = tmp_path / "made.py"
    made.write_text(RETURNED)
    # flask from a local wheelhouse, no index (an air-gapped cluster's way).
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), "flask"], check=True,
                   timeout=300)
    proc = serve(loc, made, "made", "--alias", "made", "--auth", "public",
                 "--find-links", str(wheels), "--no-index")
    _, rev, url = announced(proc)
    assert "--no-index" not in proc.stdout
    r = loc.http.get(f"{url}/hello", timeout=120)
    assert r.status_code == 200 and r.json() == {"from": "a returned WSGI app"}, r.text
    # A build that fails: exit ≠ 0 with pip's error, and the old revision keeps serving.
    broken = tmp_path / "broken.py"
    broken.write_text(RETURNED.replace('["flask"]', '["flask", "no-such-package-fal-test-xyz"]'))
    bad = serve(loc, broken, "made", "--alias", "made", "--auth", "public", "--find-links", str(wheels),
                "--no-index", check=False)
    assert bad.returncode != 0
    assert "environment build failed" in bad.stderr and "no-such-package-fal-test-xyz" in bad.stderr, bad.stderr
    assert loc.fn("default/made")["local"]["served"]["revision"] == rev
    assert loc.http.get(f"{url}/hello").status_code == 200


@pytest.mark.parametrize("source, function, extra, words", [
    ("SEED", "nope", [], ["no function 'nope'"]),
    ("def app(): pass\n", "app", [], ["not decorated"]),
    ("from fal_serverless import isolated\n@isolated(\ndef app(:\n", "app", [], ["does not parse", ":3"]),
    ("SEED_GPU_X", "app", [], ["GPU-X9", "known", "GPU-T4"]),
    ("SEED", "app", ["--alias", "Not_Valid"], ["--alias", "Not_Valid"]),
    ("from fal_serverless import isolated\nimport os\n@isolated(keep_alive=int(os.environ['K']))\ndef app(): pass\n",
     "app", [], ["keep_alive=", "literal"]),
])
def test_bad_input_is_refused_and_nothing_registered(make_local, tmp_path, source, function, extra, words):
    loc = make_local([], env={"FAL_PYTHON": sys.executable})
    text = {"SEED": SEED.format(version=1, keep_alive=2),
            "SEED_GPU_X": SEED.format(version=1, keep_alive=2).replace("GPU-T4", "GPU-X9")}.get(source, source)
    p = tmp_path / "app.py"
    p.write_text(text)
    proc = serve(loc, p, function, *extra, check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert loc.functions() == {}, "nothing half-registered"


def test_an_unreachable_local_is_a_clear_error(tmp_path):
    p = tmp_path / "app.py"
    p.write_text(SEED.format(version=1, keep_alive=2))
    proc = subprocess.run([str(OPERATOR_BIN), "function", "serve", str(p), "app", "--local", "http://127.0.0.1:9"],
                          capture_output=True, text=True, timeout=60, env={"FAL_PYTHON": sys.executable})
    assert proc.returncode != 0 and "cannot reach fal-operator local" in proc.stderr, proc.stderr
