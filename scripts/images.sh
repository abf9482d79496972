#!/usr/bin/env bash
# OCI images of fal-operator, fal-sidecar and the Python runner (fal-runner), built
# without a Docker daemon (umoci + skopeo; mmdebstrap for the runner's Debian), written as
# docker-archive tarballs:
#
#   scripts/images.sh                 # → dist/images/fal-operator.tar, fal-sidecar.tar,
#                                     #   fal-runner.tar
#   docker load -i dist/images/fal-sidecar.tar
#   kind load image-archive dist/images/fal-sidecar.tar
#   skopeo copy docker-archive:dist/images/fal-sidecar.tar docker://REGISTRY/fal-sidecar:0.1.0
#
# Each image holds the binary, the shared libraries it links (found with ldd, the
# dynamic loader included), CA certificates and passwd/group entries for the nonroot
# user 65532 — no shell, no package manager. Names and tags are the chart's defaults:
# ghcr.io/fal-serverless-k8s/NAME:VERSION, VERSION being the crates' version.
#
# fal-runner runs the files served with `fal-operator function serve` and builds their
# environments: a Debian root filesystem made by mmdebstrap from Debian's archive (the
# Essential set, python3, python3-venv for the environment builds, CA certificates; no
# docs, man pages or locales), the checkout's runner/ at /opt/fal-runner (PYTHONPATH),
# user 65532. The Debian tarball is cached under FAL_CI_CACHE per package list and week.
#
# Environment:
#   FAL_IMAGE_PROFILE   cargo profile of the binaries: release (default) or debug
#   FAL_IMAGE_REPO      repository prefix (default ghcr.io/fal-serverless-k8s)
#   FAL_IMAGES_OUT      output directory (default dist/images)
#   FAL_IMAGE_BINARIES  prebuilt binaries directory: skip cargo, take them from there
#   FAL_RUNNER_SUITE    Debian suite of the runner image (default bookworm)
#   FAL_SKIP_RUNNER_IMAGE=1  only fal-operator and fal-sidecar
#   FAL_CI_CACHE        where the runner's Debian tarball is cached
#                       (default /var/tmp/fal-serverless-ci)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PROFILE=${FAL_IMAGE_PROFILE:-release}
REPO=${FAL_IMAGE_REPO:-ghcr.io/fal-serverless-k8s}
OUT=${FAL_IMAGES_OUT:-$ROOT/dist/images}
UID_GID=65532
IMAGES=(fal-operator fal-sidecar)

log() { echo "images: $*" >&2; }

tools=(umoci skopeo cargo ldd)
[[ "${FAL_SKIP_RUNNER_IMAGE:-0}" == 1 ]] || tools+=(mmdebstrap)
for tool in "${tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || { log "'$tool' not found (apt-get install umoci skopeo mmdebstrap)"; exit 2; }
done

case "$PROFILE" in
    release) cargo_profile=release; profile_dir=release ;;
    debug | dev) cargo_profile=dev; profile_dir=debug ;;
    *) log "FAL_IMAGE_PROFILE must be release or debug, not '$PROFILE'"; exit 2 ;;
esac

meta=$(cargo metadata --format-version 1 --no-deps --locked)
VERSION=$(python3 -c 'import json,sys; m=json.loads(sys.stdin.read()); print({p["name"]: p["version"] for p in m["packages"]}["fal-operator"])' <<<"$meta")
TARGET_DIR=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["target_directory"])' <<<"$meta")

if [[ -n "${FAL_IMAGE_BINARIES:-}" ]]; then
    BIN_DIR=$FAL_IMAGE_BINARIES
else
    log "cargo build --profile $cargo_profile (fal-operator, fal-sidecar)"
    # nice: the build shares the machine with whatever else runs there.
    nice -n 19 cargo build --profile "$cargo_profile" --locked -p fal-operator -p fal-sidecar
    BIN_DIR=$TARGET_DIR/$profile_dir
fi

ARCH=$(uname -m)
case "$ARCH" in
    x86_64) OCI_ARCH=amd64 ;;
    aarch64) OCI_ARCH=arm64 ;;
    *) OCI_ARCH=$ARCH ;;
esac

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

# Copies a file into the root fs at the same path, following symlinks (the image gets
# the real file under the name the loader looks for).
put() {
    local src=$1 dst=$2/${1#/}
    mkdir -p "$(dirname "$dst")"
    cp -L "$src" "$dst"
}

# Root filesystem of one image in $2/rootfs.
populate() {
    local name=$1 rootfs=$2/rootfs bin=$BIN_DIR/$1
    [[ -x "$bin" ]] || { log "$bin is missing"; exit 1; }
    install -D -m 0755 "$bin" "$rootfs/usr/local/bin/$name"
    # Shared libraries and the dynamic loader, as ldd resolves them on the build host
    # (glibc; the binaries need nothing beyond libc, libm, libgcc_s and the loader).
    local lib
    while read -r lib; do
        put "$lib" "$rootfs"
    done < <(ldd "$bin" | grep -o '/[^ ]*' | sort -u)
    local certs=/etc/ssl/certs/ca-certificates.crt
    [[ -f $certs ]] || { log "$certs is missing (apt-get install ca-certificates)"; exit 1; }
    put "$certs" "$rootfs"
    mkdir -p "$rootfs/etc" "$rootfs/tmp"
    chmod 1777 "$rootfs/tmp"
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%s:%s:nonroot:/home/nonroot:/sbin/nologin\n' \
        "$UID_GID" "$UID_GID" >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnonroot:x:%s:\n' "$UID_GID" >"$rootfs/etc/group"
    if [[ "$name" == fal-sidecar ]]; then
        # The data dir; in a pod an emptyDir is mounted over it.
        mkdir -p "$rootfs/var/lib/fal-sidecar"
        chmod 1777 "$rootfs/var/lib/fal-sidecar"
    fi
}

rootless=()
[[ "$(id -u)" == 0 ]] || rootless=(--rootless)

# One image: an empty OCI image, its root filesystem made by POPULATE (called with the
# name and the bundle directory), its config (user and labels here, the rest from the
# arguments), written as a docker-archive tarball.
build_image() {
    local name=$1 populate_fn=$2
    shift 2
    local ref="$REPO/$name:$VERSION" layout=$WORK/oci-$name bundle=$WORK/bundle-$name
    umoci init --layout "$layout"
    umoci new --image "$layout:$VERSION"
    umoci unpack "${rootless[@]}" --image "$layout:$VERSION" "$bundle"
    "$populate_fn" "$name" "$bundle"
    umoci repack --image "$layout:$VERSION" "$bundle"
    umoci config --image "$layout:$VERSION" \
        --os linux --architecture "$OCI_ARCH" \
        --config.user "$UID_GID:$UID_GID" \
        "$@" \
        --config.label "org.opencontainers.image.title=$name" \
        --config.label "org.opencontainers.image.version=$VERSION" \
        --config.label "org.opencontainers.image.source=https://github.com/fal-serverless-k8s/fal-serverless-k8s"
    umoci gc --layout "$layout"
    rm -f "$OUT/$name.tar"
    skopeo copy --quiet "oci:$layout:$VERSION" "docker-archive:$OUT/$name.tar:$ref"
    log "$OUT/$name.tar  $ref  $(du -h "$OUT/$name.tar" | cut -f1)"
}

for name in "${IMAGES[@]}"; do
    case "$name" in
        fal-operator) cmd=controller ;;
        fal-sidecar) cmd=serve ;;
    esac
    extra_env=()
    [[ "$name" == fal-sidecar ]] && extra_env=(--config.env FAL_SIDECAR_DATA_DIR=/var/lib/fal-sidecar)
    build_image "$name" populate \
        --config.workingdir / \
        --config.env PATH=/usr/local/bin \
        --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
        "${extra_env[@]}" \
        --config.entrypoint "/usr/local/bin/$name" \
        --config.cmd "$cmd"
done

# --- fal-runner: Debian's python3 and the runner ------------------------------------------
[[ "${FAL_SKIP_RUNNER_IMAGE:-0}" == 1 ]] && exit 0
SUITE=${FAL_RUNNER_SUITE:-bookworm}
PACKAGES=python3,python3-venv,ca-certificates
CACHE=${FAL_CI_CACHE:-/var/tmp/fal-serverless-ci}
key=$(printf '%s %s %s' "$SUITE" "$PACKAGES" "$OCI_ARCH" | sha256sum | cut -c1-12)
debian=$CACHE/runner-rootfs-$SUITE-$key-$(date -u +%G-w%V).tar
if [[ ! -f "$debian" ]]; then
    log "mmdebstrap $SUITE ($PACKAGES) → $debian"
    mkdir -p "$CACHE"
    rm -rf "$CACHE"/runner-rootfs-"$SUITE"-"$key"-*.tar # last week's, an interrupted one
    nice -n 19 mmdebstrap --quiet --variant=essential --architectures="$OCI_ARCH" \
        --include="$PACKAGES" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        "$SUITE" "${debian%.tar}.tmp.tar" # a tarball: mmdebstrap goes by the name
    mv "${debian%.tar}.tmp.tar" "$debian"
fi
# Debian, the runner (fal_serverless for the served files' imports, fal_runner to build
# and serve) and the nonroot user.
populate_runner() {
    local rootfs=$2/rootfs
    tar -xf "$debian" -C "$rootfs" --numeric-owner --exclude='./dev/*'
    mkdir -p "$rootfs/opt/fal-runner"
    (cd runner && find fal_runner fal_serverless -name '*.py' -print0 |
        xargs -0 -I{} install -D -m 0644 {} "$rootfs/opt/fal-runner/{}")
    printf 'nonroot:x:%s:%s:nonroot:/tmp:/usr/sbin/nologin\n' "$UID_GID" "$UID_GID" >>"$rootfs/etc/passwd"
    printf 'nonroot:x:%s:\n' "$UID_GID" >>"$rootfs/etc/group"
}
build_image fal-runner populate_runner \
    --config.workingdir /tmp \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env PYTHONPATH=/opt/fal-runner \
    --config.env HOME=/tmp \
    --config.env PIP_NO_CACHE_DIR=1 \
    --config.env PYTHONUNBUFFERED=1 \
    --config.entrypoint python3 --config.entrypoint -m --config.entrypoint fal_runner
