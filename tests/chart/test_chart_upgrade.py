"""Secrets the chart generates survive `helm upgrade`: the templates `lookup` the Secret
already in the cluster and keep its data. `lookup` needs an API server, so helm
renders with --dry-run=server against a minimal fake one (discovery plus GET of the
Secrets it is given), the way an upgrade sees the cluster."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from conftest import CHART, K8S_VERSION, NAMESPACE, RELEASE, run_helm


class FakeApiServer:
    def __init__(self):
        self.secrets = {}
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                outer.requests.append(path)
                if path == "/version":
                    return self.reply(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"})
                if path == "/api":
                    return self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                            "serverAddressByClientCIDRs": []})
                if path == "/apis":
                    return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1",
                                            "groups": []})
                if path == "/api/v1":
                    return self.reply(200, {"kind": "APIResourceList", "groupVersion": "v1",
                                            "resources": [{"name": "secrets", "singularName": "secret",
                                                           "namespaced": True, "kind": "Secret",
                                                           "verbs": ["get", "list"]}]})
                parts = path.strip("/").split("/")
                if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
                    secret = outer.secrets.get((parts[3], parts[5]))
                    if secret:
                        return self.reply(200, secret)
                return self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_secret(self, obj):
        self.secrets[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cluster(tmp_path):
    api = FakeApiServer()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    yield api, kubeconfig
    api.close()


def render_against(helm, tmp_path, kubeconfig, values=None):
    proc = run_helm(helm, "template", RELEASE, CHART, "-n", NAMESPACE, "--dry-run=server",
                    "--kube-version", K8S_VERSION, "--kubeconfig", kubeconfig, values=values or {}, tmp_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def secrets(objs, name):
    return {s["metadata"]["namespace"]: s for s in objs
            if s["kind"] == "Secret" and s["metadata"]["name"] == name}


def test_first_install_generates_and_upgrade_keeps_the_signing_key(helm, tmp_path, cluster):
    api, kubeconfig = cluster
    install = secrets(render_against(helm, tmp_path, kubeconfig), "fal-serverless-signing-key")
    # The templates looked the Secret up (and found nothing: a first install).
    assert f"/api/v1/namespaces/{NAMESPACE}/secrets/fal-serverless-signing-key" in api.requests
    key = install[NAMESPACE]["data"]["signing-key"]
    api.add_secret(install[NAMESPACE])  # what the install left in the cluster
    for _ in range(2):
        upgrade = secrets(render_against(helm, tmp_path, kubeconfig, {"functionNamespaces": ["default", "ml"]}),
                          "fal-serverless-signing-key")
        assert set(upgrade) == {NAMESPACE, "default", "ml"}
        assert {s["data"]["signing-key"] for s in upgrade.values()} == {key}, \
            "an upgrade must keep the signing key (webhook receivers cache the JWKS)"


def test_upgrade_keeps_the_redis_password(helm, tmp_path, cluster):
    api, kubeconfig = cluster
    install = secrets(render_against(helm, tmp_path, kubeconfig), "fal-serverless-store")
    password = base64.b64decode(install[NAMESPACE]["data"]["password"]).decode()
    api.add_secret(install[NAMESPACE])
    upgrade = secrets(render_against(helm, tmp_path, kubeconfig), "fal-serverless-store")
    for s in upgrade.values():
        assert base64.b64decode(s["data"]["password"]).decode() == password
        assert f"redis://:{password}@" in base64.b64decode(s["data"]["url"]).decode()


def test_without_the_secret_a_new_key_is_generated(helm, tmp_path, cluster):
    _, kubeconfig = cluster
    first = secrets(render_against(helm, tmp_path, kubeconfig), "fal-serverless-signing-key")
    second = secrets(render_against(helm, tmp_path, kubeconfig), "fal-serverless-signing-key")
    assert first[NAMESPACE]["data"]["signing-key"] != second[NAMESPACE]["data"]["signing-key"]
