"""The seed's Flask app, as a FalFunction image (see examples/Dockerfile).

fal-sidecar sits in front of it in the pod: direct calls and queued jobs reach
POST /test on $PORT (the FalFunction's exposedPort, 8080 by default).
"""

import os

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/health")
def health():
    # readinessPath in examples/*.yaml: ready once the app (and a model, if any) is loaded.
    return jsonify(ok=True)


@app.post("/test")
def test():
    payload = request.get_json(silent=True)
    greeting = os.environ.get("GREETING", "Hello from fal-serverless!")
    return jsonify(message=greeting, input=payload)


if __name__ == "__main__":
    # threaded: the sidecar limits concurrency to maxConcurrency; probes still answer
    # while a request runs.
    app.run(host="0.0.0.0", port=int(os.environ.get("PORT", "8080")), threaded=True)
