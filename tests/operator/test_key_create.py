"""`fal-operator key create` without a cluster: the FalKey it prints is valid against
the FalKey CRD's schema, and the secret appears once, only in the FAL_KEY line on
stderr (so `> key.yaml` keeps it out of the file)."""

import hashlib
import re
import uuid

import jsonschema
import pytest
import yaml

from test_render_validate import crd_schema

FAL_KEY_LINE = re.compile(r"^FAL_KEY=([0-9a-f-]{36}):([0-9a-f]{64})$")


class KubectlLoader(yaml.SafeLoader):
    """YAML as kubectl reads it: an unquoted 2027-01-01T00:00:00Z stays a string
    (YAML 1.2 has no timestamp type; PyYAML's 1.1 resolver would make a datetime)."""


KubectlLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def create(run_operator, *args):
    proc = run_operator("key", "create", *args)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_key_create_prints_a_valid_falkey_and_the_secret_once(run_operator, falkey_crd):
    proc = create(run_operator, "ci", "-n", "team-a", "--function", "echo",
                  "--function", "ml/sdxl", "--rps", "2.5", "--burst", "10", "--expires", "30d")
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    match = FAL_KEY_LINE.match(lines[0])
    assert match, lines[0]
    key_id, secret = match.groups()
    assert uuid.UUID(key_id).version == 4

    (doc,) = [d for d in yaml.load_all(proc.stdout, Loader=KubectlLoader) if d is not None]
    jsonschema.validate(doc, crd_schema(falkey_crd), cls=jsonschema.Draft4Validator)
    assert doc["kind"] == "FalKey"
    assert doc["metadata"] == {"name": "ci", "namespace": "team-a"}
    spec = doc["spec"]
    assert spec["keyId"] == key_id
    assert spec["secretSha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert spec["functions"] == ["echo", "ml/sdxl"]
    assert spec["rateLimit"] == {"requestsPerSecond": 2.5, "burst": 10}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", spec["expiresAt"])
    assert spec["disabled"] is False
    assert secret not in proc.stdout


def test_every_key_is_new(run_operator):
    seen = set()
    for _ in range(3):
        line = create(run_operator, "k").stderr.strip()
        key_id, secret = FAL_KEY_LINE.match(line).groups()
        seen.add(key_id)
        seen.add(secret)
    assert len(seen) == 6


@pytest.mark.parametrize("args,flag", [
    (["Bad_Name"], "NAME"),
    (["k", "--function", "a/b/c"], "--function"),
    (["k", "--rps", "0"], "--rps"),
    (["k", "--rps", "1", "--burst", "0"], "--burst"),
    (["k", "--expires", "2001-01-01T00:00:00Z"], "--expires"),
    (["k", "--expires", "someday"], "--expires"),
    (["k", "--burst", "3"], "--rps"),
])
def test_bad_flags_are_refused_without_a_key(run_operator, args, flag):
    proc = run_operator("key", "create", *args)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "FAL_KEY" not in proc.stderr, "no key is handed out when nothing is created"
    assert flag in proc.stderr, proc.stderr
