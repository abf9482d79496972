#!/usr/bin/env bash
# OCI images of fal-operator and fal-sidecar, built without a Docker daemon (umoci +
# skopeo), written as docker-archive tarballs:
#
#   scripts/images.sh                 # → dist/images/fal-operator.tar, fal-sidecar.tar
#   docker load -i dist/images/fal-sidecar.tar
#   kind load image-archive dist/images/fal-sidecar.tar
#   skopeo copy docker-archive:dist/images/fal-sidecar.tar docker://REGISTRY/fal-sidecar:0.1.0
#
# Each image holds the binary, the shared libraries it links (found with ldd, the
# dynamic loader included), CA certificates and passwd/group entries for the nonroot
# user 65532 — no shell, no package manager. Names and tags are the chart's defaults:
# ghcr.io/fal-serverless-k8s/NAME:VERSION, VERSION being the crates' version.
#
# Environment:
#   FAL_IMAGE_PROFILE   cargo profile of the binaries: release (default) or debug
#   FAL_IMAGE_REPO      repository prefix (default ghcr.io/fal-serverless-k8s)
#   FAL_IMAGES_OUT      output directory (default dist/images)
#   FAL_IMAGE_BINARIES  prebuilt binaries directory: skip cargo, take them from there
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PROFILE=${FAL_IMAGE_PROFILE:-release}
REPO=${FAL_IMAGE_REPO:-ghcr.io/fal-serverless-k8s}
OUT=${FAL_IMAGES_OUT:-$ROOT/dist/images}
UID_GID=65532
IMAGES=(fal-operator fal-sidecar)

log() { echo "images: $*" >&2; }

for tool in umoci skopeo cargo ldd; do
    command -v "$tool" >/dev/null 2>&1 || { log "'$tool' not found (apt-get install umoci skopeo)"; exit 2; }
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

for name in "${IMAGES[@]}"; do
    ref="$REPO/$name:$VERSION"
    layout=$WORK/oci-$name bundle=$WORK/bundle-$name
    umoci init --layout "$layout"
    umoci new --image "$layout:$VERSION"
    umoci unpack "${rootless[@]}" --image "$layout:$VERSION" "$bundle"
    populate "$name" "$bundle"
    umoci repack --image "$layout:$VERSION" "$bundle"
    case "$name" in
        fal-operator) cmd=controller ;;
        fal-sidecar) cmd=serve ;;
    esac
    extra_env=()
    [[ "$name" == fal-sidecar ]] && extra_env=(--config.env FAL_SIDECAR_DATA_DIR=/var/lib/fal-sidecar)
    umoci config --image "$layout:$VERSION" \
        --os linux --architecture "$OCI_ARCH" \
        --config.user "$UID_GID:$UID_GID" \
        --config.workingdir / \
        --config.env PATH=/usr/local/bin \
        --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
        "${extra_env[@]}" \
        --config.entrypoint "/usr/local/bin/$name" \
        --config.cmd "$cmd" \
        --config.label "org.opencontainers.image.title=$name" \
        --config.label "org.opencontainers.image.version=$VERSION" \
        --config.label "org.opencontainers.image.source=https://github.com/fal-serverless-k8s/fal-serverless-k8s"
    umoci gc --layout "$layout"
    rm -f "$OUT/$name.tar"
    skopeo copy --quiet "oci:$layout:$VERSION" "docker-archive:$OUT/$name.tar:$ref"
    log "$OUT/$name.tar  $ref  $(du -h "$OUT/$name.tar" | cut -f1)"
done
