"""The decorated files the `function serve` tests serve (tests/local through `fal-operator
local`, tests/cluster through a real control plane): the seed's own file with a version
to tell revisions apart, and the seed's two output lines."""

import re

SEED = '''from fal_serverless import isolated


@isolated(requirements=["flask"], machine_type="GPU-T4", keep_alive={keep_alive}, exposed_port=8080)
def app():
    import time
    from flask import Flask, request
    app = Flask("test")

    @app.route("/test", methods=["POST"])
    def remove():
        return {{"version": {version}, "input": request.get_json(silent=True)}}

    @app.route("/slow", methods=["POST"])
    def slow():
        time.sleep(float(request.get_json()["seconds"]))
        return {{"version": {version}, "slept": True}}

    app.run(host="0.0.0.0", port=8080)
'''

# Registered a new revision for function 'ALIAS' (revision='UUID').\nURL: …
LINES = re.compile(r"Registered a new revision for function '([a-z0-9-]+)' \(revision='([0-9a-f-]{36})'\)\.\nURL: (\S+)\n$")
