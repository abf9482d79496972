"""The images scripts/images.sh builds (dist/images/*.tar, docker-archive): named as the
chart expects, non-root, no shell, only the binary and what it needs; each is unpacked
and its entrypoint run with --help from the image's own root filesystem (chroot). The
Python runner image (Debian's python3) builds an environment and imports the runner in
its own root filesystem, with the commands the operator gives its Jobs and pods."""

import json
import os
import pathlib
import shutil
import subprocess
import tarfile

import pytest
import yaml

from conftest import CHART, ROOT, binary, one

IMAGES_DIR = os.environ.get("FAL_IMAGES_DIR")
pytestmark = pytest.mark.skipif(
    not IMAGES_DIR, reason="FAL_IMAGES_DIR unset (scripts/test-chart.sh sets it after "
                           "scripts/images.sh; FAL_SKIP_IMAGES=1 skips the images)")

NAMES = ["fal-operator", "fal-sidecar"]
UID = 65532
SHELLS = {"sh", "bash", "dash", "ash", "busybox", "zsh"}
# Host tools by absolute path: the processes run with the image's environment only.
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"


def chroot_cmd(root, argv, user):
    if os.geteuid() == 0:
        return [CHROOT, f"--userspec={user}", str(root), *argv]
    # An unprivileged user namespace stands in for root to chroot.
    return [UNSHARE, "--user", "--map-root-user", CHROOT, str(root), *argv]


def chart_image(name):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    key = {"fal-operator": "operator", "fal-sidecar": "sidecar", "fal-runner": "runner"}[name]
    return f'{values[key]["image"]["repository"]}:{values[key]["image"]["tag"] or version}'


def archive(name):
    path = pathlib.Path(IMAGES_DIR) / f"{name}.tar"
    assert path.is_file(), f"{path} missing: scripts/images.sh writes it"
    return path


def image_config(name):
    with tarfile.open(archive(name)) as tar:
        (manifest,) = json.load(tar.extractfile("manifest.json"))
        config = json.load(tar.extractfile(manifest["Config"]))
    return manifest, config


def unpack(tmp_path_factory, name):
    """The unpacked root filesystem of an image (skopeo to an OCI layout, umoci unpack)."""
    work = tmp_path_factory.mktemp(name)
    layout = f"{work}/oci:img"
    subprocess.run(["skopeo", "copy", "--quiet", f"docker-archive:{archive(name)}",
                    f"oci:{layout}"], check=True, capture_output=True)
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    subprocess.run(["umoci", "unpack", *rootless, "--image", layout, str(work / "bundle")],
                   check=True, capture_output=True)
    return work / "bundle" / "rootfs"


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    """name → the unpacked root filesystem."""
    return {name: unpack(tmp_path_factory, name) for name in NAMES}


def run_in_image(name, root, args):
    """Runs the image's entrypoint + args inside its root fs, as the image's user, with
    the image's environment and nothing from the host."""
    _, config = image_config(name)
    cfg = config["config"]
    argv = cfg["Entrypoint"] + args
    env = dict(e.split("=", 1) for e in cfg.get("Env", []))
    cmd = chroot_cmd(root, argv, cfg["User"])
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", NAMES)
def test_archive_is_tagged_as_the_chart_expects(name):
    manifest, config = image_config(name)
    assert manifest["RepoTags"] == [chart_image(name)]
    assert config["os"] == "linux"


@pytest.mark.parametrize("name", NAMES)
def test_image_config(name):
    _, config = image_config(name)
    cfg = config["config"]
    assert cfg["User"] == f"{UID}:{UID}"
    assert cfg["Entrypoint"] == [f"/usr/local/bin/{name}"]
    assert cfg["Cmd"] == {"fal-operator": ["controller"], "fal-sidecar": ["serve"]}[name]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["PATH"] == "/usr/local/bin"


@pytest.mark.parametrize("name", NAMES)
def test_only_the_binary_and_what_it_needs(rootfs, name):
    root = rootfs[name]
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    for f in files:
        assert pathlib.PurePath(f).name not in SHELLS, f"a shell in the image: {f}"
    allowed_exact = {f"usr/local/bin/{name}", "etc/passwd", "etc/group",
                     "etc/ssl/certs/ca-certificates.crt"}
    libs = [f for f in files if f not in allowed_exact]
    for f in libs:
        assert f.startswith(("lib/", "lib64/", "usr/lib/", "usr/lib64/")) and ".so" in f, \
            f"unexpected file in the image: {f}"
    assert set(allowed_exact) <= set(files)
    assert len(libs) <= 8, libs
    passwd = (root / "etc" / "passwd").read_text()
    assert f"nonroot:x:{UID}:{UID}:" in passwd


@pytest.mark.parametrize("name", NAMES)
def test_entrypoint_runs_from_the_image_root(rootfs, name):
    proc = run_in_image(name, rootfs[name], ["--help"])
    assert proc.returncode == 0, proc.stderr
    assert f"Usage: {name}" in proc.stdout


def test_operator_image_has_the_controller(rootfs):
    proc = run_in_image("fal-operator", rootfs["fal-operator"], ["controller", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "[env: FAL_STORE_URL=" in proc.stdout


def test_operator_image_has_the_gateway_the_chart_runs(rootfs, template):
    gateway = one(template(), "Deployment", "fal-serverless-gateway")
    (c,) = gateway["spec"]["template"]["spec"]["containers"]
    assert c["image"] == chart_image("fal-operator"), "the gateway runs the operator image"
    proc = run_in_image("fal-operator", rootfs["fal-operator"], [*c["args"], "--help"])
    assert proc.returncode == 0, proc.stderr
    unknown = [e["name"] for e in c["env"] if e["name"].startswith("FAL_")
               and f"[env: {e['name']}=" not in proc.stdout]
    assert not unknown, f"the gateway in the image does not read {unknown}"


def test_sidecar_image_runs_what_the_operator_injects(rootfs):
    """The operator's injected container names the binary by `command` (resolved on
    the image's PATH) and its `args`; both must work in the image."""
    operator = binary("FAL_OPERATOR_BIN", "fal-operator")
    out = subprocess.run([str(operator), "render", "-f", ROOT / "examples" / "seed-app.yaml"],
                         capture_output=True, text=True, check=True)
    dep = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment")
    sidecar = next(c for c in dep["spec"]["template"]["spec"]["initContainers"]
                   if c["name"] == "fal-sidecar")
    root = rootfs["fal-sidecar"]
    _, config = image_config("fal-sidecar")
    path = dict(e.split("=", 1) for e in config["config"]["Env"])["PATH"].split(":")
    (command,) = sidecar["command"]
    resolved = [d for d in path if os.access(root / d.lstrip("/") / command, os.X_OK)]
    assert resolved, f"{command} is not on the image's PATH {path}"
    cmd = chroot_cmd(root, [f"{resolved[0]}/{command}", *sidecar["args"], "--help"],
                     f"{UID}:{UID}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={})
    assert proc.returncode == 0, proc.stderr
    assert "[env: FAL_SIDECAR_STORE=" in proc.stdout


def test_tools_present():
    for tool in ("skopeo", "umoci"):
        assert shutil.which(tool), f"{tool} missing"
    assert os.access(CHROOT, os.X_OK)


# --- fal-runner ------------------------------------------------------------------------------

def test_runner_image_is_tagged_and_configured_as_the_operator_expects():
    manifest, config = image_config("fal-runner")
    assert manifest["RepoTags"] == [chart_image("fal-runner")]
    cfg = config["config"]
    assert cfg["User"] == f"{UID}:{UID}"
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["PYTHONPATH"] == "/opt/fal-runner"
    assert cfg["Entrypoint"] == ["python3", "-m", "fal_runner"]


SERVED = {
    "apiVersion": "fal.serverless.dev/v1alpha1", "kind": "FalFunction",
    "metadata": {"name": "app", "namespace": "default"},
    "spec": {"source": {"revision": "r1", "configMap": "app-r1", "file": "app.py",
                        "function": "app"}},
}


def test_runner_image_builds_an_environment_and_runs_the_runner(tmp_path_factory, tmp_path):
    """The build Job's command and the pods' python, as the operator renders them, in the
    image's root filesystem as its user: a venv built by Debian's python3 (no
    requirements: nothing to fetch), the runner importable from the environment."""
    root = unpack(tmp_path_factory, "fal-runner")
    manifest = tmp_path / "served.yaml"
    manifest.write_text(yaml.safe_dump(SERVED))
    operator = binary("FAL_OPERATOR_BIN", "fal-operator")
    out = subprocess.run([str(operator), "render", "-f", manifest], capture_output=True, text=True,
                         check=True)
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    build = docs["Job"]["spec"]["template"]["spec"]["containers"][0]["command"]
    serve = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    # The environments claim, as the pod would have it mounted (writable by the runner).
    envs = root / "fal" / "envs"
    envs.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(envs, UID, UID)
    _, config = image_config("fal-runner")
    env = dict(e.split("=", 1) for e in config["config"]["Env"])
    proc = subprocess.run(chroot_cmd(root, build, f"{UID}:{UID}"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "environment ready" in proc.stdout, proc.stdout
    check = [serve[0], "-c", "import fal_runner.serve, fal_serverless, sys; print(sys.prefix)"]
    proc = subprocess.run(chroot_cmd(root, check, f"{UID}:{UID}"), env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == serve[0].rsplit("/bin/", 1)[0], "the environment's own prefix"
