#!/usr/bin/env python3
"""`function serve` numbers (issue 18), against `fal-operator local` (a fresh state dir):

1. first deploy of the seed's flask app: the serve (mostly the environment build) and
   then the first answer (a cold start at zero);
2. the baseline of a cold start: the runner starting the app in the built environment
   until its port accepts;
3. redeploys with the same requirements (code changed): no build, and the cold start of
   the new revision against the baseline (target ≤ app start + 1 s);
4. the environment cache over a sequence of serves (hits / serves).

Usage: scripts/bench_serve.py --operator target/release/fal-operator --sidecar target/release/fal-sidecar
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import REPO, Procs, accepts, free_port, start_redis, wait  # noqa: E402

SEED = '''from fal_serverless import isolated

@isolated(requirements={reqs!r}, keep_alive=1, exposed_port=8080)
def app():
    from flask import Flask
    app = Flask("bench")

    @app.route("/test", methods=["POST"])
    def test():
        return {{"version": {version}}}

    app.run(host="0.0.0.0", port=8080)
'''


def post(url: str, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=b"{}", method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--operator", required=True)
    ap.add_argument("--sidecar", required=True)
    ap.add_argument("--redeploys", type=int, default=5)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fal-bench-serve."))
    procs = Procs()
    try:
        redis_port = start_redis(procs, work)
        run_p, queue_p, admin_p = free_port(), free_port(), free_port()
        env = {**os.environ, "FAL_PYTHON": sys.executable, "RUST_LOG": "warn"}
        procs.spawn([a.operator, "local", "--store", f"redis://127.0.0.1:{redis_port}/0",
                     "--listen", f"127.0.0.1:{run_p}", "--queue-listen", f"127.0.0.1:{queue_p}",
                     "--admin-listen", f"127.0.0.1:{admin_p}", "--sidecar-bin", a.sidecar,
                     "--state-dir", str(work / "state")], env=env, cwd=str(REPO))
        wait(lambda: accepts(admin_p), what="fal-operator local")
        src = work / "app.py"
        serves = builds = 0

        def serve(version: int, reqs: list[str]) -> tuple[float, float]:
            nonlocal serves, builds
            src.write_text(SEED.format(version=version, reqs=reqs))
            t0 = time.monotonic()
            p = subprocess.run([a.operator, "function", "serve", str(src), "app", "--alias", "app", "--auth", "public",
                                "--local", f"http://127.0.0.1:{admin_p}"], capture_output=True, text=True, env=env,
                               timeout=900, check=True)
            t1 = time.monotonic()
            serves += 1
            builds += "pip install" in p.stderr or "building environment" in p.stderr
            while True:  # the new revision's first answer
                try:
                    if post(f"http://127.0.0.1:{run_p}/default/app/test")["version"] == version:
                        break
                except OSError:
                    pass
                time.sleep(0.01)
            return t1 - t0, time.monotonic() - t1

        first_serve, first_answer = serve(1, ["flask"])
        # Baseline: the runner starting the app in the built environment.
        envs = list((work / "state" / "envs").iterdir())
        starts = []
        for _ in range(5):
            port = free_port()
            t0 = time.monotonic()
            p = subprocess.Popen([str(envs[0] / "bin" / "python"), "-m", "fal_runner", "serve", str(src), "app"],
                                 env={**os.environ, "PORT": str(port), "FAL_EXPOSED_PORT": "8080",
                                      "PYTHONPATH": str(work / "state" / "runner")},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait(lambda: accepts(port), interval=0.002, what="the app")
            starts.append(time.monotonic() - t0)
            p.terminate()
            p.wait()
        redeploy = []
        for v in range(2, 2 + a.redeploys):
            time.sleep(2.5)  # keep_alive=1: at zero again, so each is a cold start
            redeploy.append(serve(v, ["flask"]))
        serve(100, ["flask", "itsdangerous"])  # another requirements list: one more build
        app_start = statistics.median(starts)
        cold = statistics.median(r[1] for r in redeploy)
        print(f"""
## function serve (fal-operator local, the seed's flask app; {os.cpu_count()} cores)

| step | seconds |
|---|---|
| first serve (environment build: venv + pip install flask) | {first_serve:.2f} |
| then the first answer (cold start of the new revision) | {first_answer:.2f} |
| baseline: the runner starting the app in the built environment → port accepts (median of 5) | {app_start:.2f} |
| redeploy with the same requirements: the serve (median of {a.redeploys}, no build) | {statistics.median(r[0] for r in redeploy):.2f} |
| redeploy: cold start to the new revision's first answer (median) | {cold:.2f} (target ≤ app start + 1 s = {app_start + 1:.2f}) |

environment cache: {serves - builds} hits of {serves} serves ({builds} builds: one per requirements list)
""")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
