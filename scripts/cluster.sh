#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the tests, built from Go modules:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler (+ kubectl), and the
# test kubelet of tests/cluster/ that runs pods as local processes in their own
# network namespaces.
#
#   scripts/cluster.sh up       # build once (cached), start, write .cluster/kubeconfig
#   scripts/cluster.sh status   # what runs
#   scripts/cluster.sh down     # stop everything `up` started (by pid)
#   scripts/cluster.sh build    # only build (or find in the cache) the binaries
#
#   export KUBECONFIG=$PWD/.cluster/kubeconfig PATH=$PWD/.cluster/bin:$PATH
#
# Needs Go (>= the version in tests/cluster/go.mod), openssl, iproute2 and root (the
# pod network namespaces). The first build takes minutes; the binaries are cached in
# $FAL_CLUSTER_CACHE (default ~/.cache/fal-serverless/cluster) under a key of the
# Kubernetes and etcd versions and the build module, and the Go module/build caches go
# there too unless GOMODCACHE/GOCACHE are set.
#
# Environment: FAL_CLUSTER_PORT (apiserver, default 16443; etcd uses +1 and +2, the
# controller manager +3, the scheduler +4, the test kubelet's API +5), FAL_CLUSTER_NET (0-255: the pod network
# 198.18.N.0/24 on bridge falkN; a second cluster on the machine needs another N and
# port), FAL_SIDECAR_BIN (the fal-sidecar binary
# run for the sidecar image; default $CARGO_TARGET_DIR/debug or target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MOD=$ROOT/tests/cluster
STATE=$ROOT/.cluster
K8S_VERSION=1.37.2
ETCD_VERSION=3.7.3
K8S_RELEASE_DATE=2026-10-27T12:01:04Z  # of v$K8S_VERSION (the module proxy's .info): reproducible ldflags
NODE=fal-test-node
PORT=${FAL_CLUSTER_PORT:-16443}
ETCD_PORT=$((PORT + 1)) ETCD_PEER_PORT=$((PORT + 2)) KCM_PORT=$((PORT + 3)) SCHED_PORT=$((PORT + 4))
KUBELET_PORT=$((PORT + 5)) # on the node's pod-network address, not loopback
NET=${FAL_CLUSTER_NET:-0} # pod network: bridge falkN, pods in 198.18.N.0/24 (reserved for tests)
BRIDGE=falk$NET
CACHE=${FAL_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fal-serverless/cluster}
export GOMODCACHE=${GOMODCACHE:-$CACHE/go/mod} GOCACHE=${GOCACHE:-$CACHE/go/cache}
export GOFLAGS=-mod=readonly GOTOOLCHAIN=${GOTOOLCHAIN:-local}
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler test-kubelet)

say() { echo "cluster: $*" >&2; }
die() { echo "cluster: error: $*" >&2; exit 1; }

# --- build ------------------------------------------------------------------------------
find_go() {
  command -v go >/dev/null 2>&1 && return
  [ -x /usr/local/go/bin/go ] && { PATH=/usr/local/go/bin:$PATH; return; }
  die "Go is not installed (need go $(sed -n 's/^go //p' "$MOD/go.mod") or newer to build the control plane): https://go.dev/dl, or put it on PATH"
}

hash_of() { cat "$@" | sha256sum | cut -c1-12; }

# One `go build` for the four Kubernetes commands and etcd (they share most packages).
# The version ldflags make /version and `kubectl version` report the real release.
build_control_plane() {
  local key dir tmp ld=() p
  # go.sum pins every module of the build (go.mod's `tool` lines and comments do not matter).
  key=$(hash_of "$MOD/go.sum" "$MOD/cmd/etcd/main.go")
  dir=$CACHE/k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION-$key
  CP_BIN=$dir/bin
  [ -x "$CP_BIN/kube-apiserver" ] && [ -x "$CP_BIN/etcd" ] && [ -x "$CP_BIN/kubectl" ] && return
  find_go
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.build.lock"
  flock 9
  if [ ! -x "$CP_BIN/kubectl" ]; then
    say "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl v$K8S_VERSION and etcd v$ETCD_VERSION (once; takes minutes) into $dir"
    local major=${K8S_VERSION%%.*} minor=${K8S_VERSION#*.}
    minor=${minor%%.*}
    for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
      ld+=("-X '$p.gitVersion=v$K8S_VERSION'" "-X '$p.gitMajor=$major'" "-X '$p.gitMinor=$minor'"
        "-X '$p.gitTreeState=clean'" "-X '$p.buildDate=$K8S_RELEASE_DATE'")
    done
    tmp=$dir.tmp.$$
    rm -rf "$dir".tmp.* # what an interrupted build left (we hold the lock)
    mkdir -p "$tmp/bin"
    local t0=$SECONDS
    (cd "$MOD" && nice -n 19 go build -trimpath -ldflags "-s -w ${ld[*]}" -o "$tmp/bin/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl ./cmd/etcd)
    rm -rf "$dir"
    mv "$tmp" "$dir"
    say "built in $((SECONDS - t0)) s"
  fi
  flock -u 9
}

# The test kubelet is small and changes with the test harness: its own cache key.
build_kubelet() {
  local key
  key=$(hash_of "$MOD/go.sum" "$MOD"/cmd/test-kubelet/*.go)
  KUBELET_BIN=$CACHE/test-kubelet-$key/test-kubelet
  [ -x "$KUBELET_BIN" ] && return
  find_go
  say "building the test kubelet"
  mkdir -p "${KUBELET_BIN%/*}"
  (cd "$MOD" && nice -n 19 go build -trimpath -ldflags "-s -w" -o "$KUBELET_BIN.tmp.$$" ./cmd/test-kubelet)
  mv "$KUBELET_BIN.tmp.$$" "$KUBELET_BIN"
  # Earlier builds of it are not needed any more.
  find "$CACHE" -maxdepth 1 -name 'test-kubelet-*' ! -path "${KUBELET_BIN%/*}" -exec rm -rf {} +
}

build() {
  build_control_plane
  build_kubelet
  mkdir -p "$STATE/bin"
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    ln -sfn "$CP_BIN/$b" "$STATE/bin/$b"
  done
  ln -sfn "$KUBELET_BIN" "$STATE/bin/test-kubelet"
}

# --- processes -----------------------------------------------------------------------------
pid_of() { cat "$STATE/run/$1.pid" 2>/dev/null || true; }
alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

start() { # NAME CMD…: in its own session, output to .cluster/logs/NAME.log
  local name=$1
  shift
  setsid "$@" >>"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/run/$name.pid"
}

wait_for() { # WHAT SECONDS CMD…
  local what=$1 limit=$2 t0=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ! alive "$what" || [ $((SECONDS - t0)) -ge "$limit" ]; then
      alive "$what" && say "$what not ready after ${limit}s; the last lines of its log:" ||
        say "$what exited; the last lines of its log:"
      tail -n 30 "$STATE/logs/$what.log" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

KUBECTL() { "$STATE/bin/kubectl" --kubeconfig "$STATE/kubeconfig" "$@"; }

# --- certificates (generated once per .cluster/, like envtest) ----------------------------
certs() {
  local pki=$STATE/pki
  [ -f "$pki/admin.crt" ] && return
  command -v openssl >/dev/null || die "openssl is needed to generate the cluster's certificates"
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=fal-test-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
      -subj "/CN=kube-apiserver" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out apiserver.crt -days 3650 -extfile apiserver.ext 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr \
      -subj "/O=system:masters/CN=admin" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out admin.crt -days 3650 -extfile client.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr ./*.ext
  )
}

kubeconfig() {
  local pki=$STATE/pki
  cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fal-test
  cluster:
    server: https://127.0.0.1:$PORT
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $pki/admin.crt
    client-key: $pki/admin.key
contexts:
- name: fal-test
  context: {cluster: fal-test, user: admin, namespace: default}
current-context: fal-test
EOF
}

sidecar_bin() {
  local b=${FAL_SIDECAR_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/fal-sidecar}
  [ -x "$b" ] || say "warning: no fal-sidecar binary at $b (set FAL_SIDECAR_BIN): pods with the sidecar image will not start"
  echo "$b"
}

all_alive() {
  local c
  for c in "${COMPONENTS[@]}"; do alive "$c" || return 1; done
}

up() {
  if all_alive && KUBECTL get --raw /readyz >/dev/null 2>&1; then
    say "already up (KUBECONFIG=$STATE/kubeconfig)"
    return
  fi
  # Anything half-up (a component died) is stopped below and started afresh.
  [ "$(id -u)" = 0 ] || die "the test kubelet needs root (network namespaces for pods)"
  command -v ip >/dev/null || die "iproute2 ('ip') is needed for the pod network"
  local other
  other=$(pgrep -f -- "--bridge $BRIDGE( |$)" | grep -vx "$(pid_of test-kubelet)" || true)
  [ -z "$other" ] || die "the pod network $BRIDGE (198.18.$NET.0/24) belongs to another running test kubelet (pid $other): set FAL_CLUSTER_NET (and FAL_CLUSTER_PORT)"
  down quiet
  build
  local p
  for p in "$PORT" "$ETCD_PORT" "$ETCD_PEER_PORT" "$KCM_PORT" "$SCHED_PORT"; do
    port_taken "$p" && die "port 127.0.0.1:$p is taken (another cluster? set FAL_CLUSTER_PORT to move the ports: apiserver P, etcd P+1/P+2, controller manager P+3, scheduler P+4)"
  done
  local t0=$SECONDS
  rm -rf "$STATE/etcd" "$STATE/kubelet" "$STATE/logs" # a fresh cluster, fresh logs
  mkdir -p "$STATE/run" "$STATE/logs"
  certs
  kubeconfig
  local pki=$STATE/pki bin=$STATE/bin
  start etcd "$bin/etcd" --name fal-test --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "fal-test=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$ETCD_PORT/health" || { down quiet; die "etcd did not start"; }
  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$PORT" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --api-audiences https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=true --cert-dir "$STATE/pki/generated" \
    --endpoint-reconciler-type none --kubelet-preferred-address-types InternalIP
  wait_for kube-apiserver 90 KUBECTL get --raw /readyz || { down quiet; die "kube-apiserver did not start"; }
  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$STATE/kubeconfig" --authentication-kubeconfig "$STATE/kubeconfig" \
    --authorization-kubeconfig "$STATE/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --use-service-account-credentials --controllers '*' \
    --cluster-name fal-test
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$STATE/kubeconfig" --authentication-kubeconfig "$STATE/kubeconfig" \
    --authorization-kubeconfig "$STATE/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false
  start test-kubelet "$bin/test-kubelet" --kubeconfig "$STATE/kubeconfig" --node-name "$NODE" \
    --state-dir "$STATE/kubelet" --bridge "$BRIDGE" --subnet "198.18.$NET" --port "$KUBELET_PORT" --workdir "$MOD/app" --sidecar-bin "$(sidecar_bin)" \
    --image-command "ghcr.io/fal-serverless-k8s/seed-app=python3 app.py"
  wait_for test-kubelet 60 KUBECTL wait --for condition=Ready "node/$NODE" --timeout 2s ||
    { down quiet; die "the test kubelet did not register a Ready node"; }
  # Pods need their namespace's default ServiceAccount (the controller manager makes it).
  wait_for kube-controller-manager 60 KUBECTL get serviceaccount default -n default ||
    { down quiet; die "kube-controller-manager did not create the default ServiceAccount"; }
  say "up in $((SECONDS - t0)) s: export KUBECONFIG=$STATE/kubeconfig PATH=$STATE/bin:\$PATH"
}

stop() { # SECONDS NAME…: SIGTERM to all, SIGKILL to what is left after SECONDS
  local limit=$1 name p i pids=()
  shift
  for name in "$@"; do
    p=$(pid_of "$name")
    [ -n "$p" ] && kill -TERM "$p" 2>/dev/null && pids+=("$p")
    rm -f "$STATE/run/$name.pid"
  done
  local left=${#pids[@]}
  for ((i = 0; i < limit * 10 && left > 0; i++)); do
    sleep 0.1
    left=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=$((left + 1)); done
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}

down() {
  local quiet=${1:-}
  stop 20 test-kubelet
  # Pods of a kubelet that could not clean up (killed): their namespaces and processes.
  local ns pid
  for ns in $(ip netns list 2>/dev/null | awk -v p="^$BRIDGE-" '$1 ~ p {print $1}'); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  stop 10 kube-scheduler kube-controller-manager kube-apiserver etcd
  rm -rf "$STATE/etcd"
  [ -n "$quiet" ] || say "down"
}

status() {
  local c rc=0
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then echo "$c: running (pid $(pid_of "$c"))"; else echo "$c: stopped"; rc=1; fi
  done
  if [ -f "$STATE/kubeconfig" ] && KUBECTL get --raw /readyz >/dev/null 2>&1; then
    echo "apiserver: https://127.0.0.1:$PORT ready, $(KUBECTL version -o json 2>/dev/null | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -1)"
    KUBECTL get nodes 2>/dev/null || true
  fi
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  build) build ;;
  *) echo "usage: $0 up|down|status|build" >&2; exit 2 ;;
esac
