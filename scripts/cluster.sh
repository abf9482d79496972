#!/usr/bin/env bash
# A real Kubernetes cluster on this machine for the tests, built from Go modules:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy (+ kubectl),
# CoreDNS, and the test kubelet of tests/cluster/ that runs pods as local processes in
# their own network namespaces. An unmodified Helm chart installs into it: Service
# ClusterIPs route (from pods and from the host), names resolve, pods get the in-cluster
# API (KUBERNETES_SERVICE_HOST), PVCs bind (hostPath provisioner, default StorageClass).
#
#   scripts/cluster.sh up       # build once (cached), start, write .cluster/kubeconfig
#   scripts/cluster.sh status   # what runs
#   scripts/cluster.sh down     # stop what `up` started (by pid), remove what it added
#   scripts/cluster.sh build    # only build (or find in the cache) the binaries
#
#   export KUBECONFIG=$PWD/.cluster/kubeconfig PATH=$PWD/.cluster/bin:$PATH
#
# Needs Go (>= the version in tests/cluster/go.mod), openssl, iproute2, nft and root
# (the pod network namespaces). The first build takes minutes; the binaries are cached
# in $FAL_CLUSTER_CACHE (default ~/.cache/fal-serverless/cluster) under a key of the
# versions and the build modules, and the Go module/build caches go there too unless
# GOMODCACHE/GOCACHE are set.
#
# Addresses (N = FAL_CLUSTER_NET, 0-31; everything on the reserved 198.18.0.0/15 and
# loopback, nothing on other interfaces):
#   198.18.N.0/24  pod network on bridge falkN; 198.18.N.1 the node (the apiserver
#                  listens there, on FAL_CLUSTER_PORT; kubeconfig points there),
#                  pods .2-.253, 198.18.N.254 the Service router (below)
#   198.19.8N.0/21 Services (2,046 of them: a benchmark makes 1,000 functions, each with
#                  its Service): .1 the `kubernetes` Service, .10 kube-dns (CoreDNS)
# kube-proxy (nftables mode) runs in a network namespace of its own, falkNsvc, whose
# eth0 sits on the bridge at 198.18.N.254; the host and the pods route 198.19.8N.0/21
# there, it DNATs to the endpoints and masquerades (masqueradeAll), so replies come
# back through it. Its rules are in that namespace only: two clusters' kube-proxies
# (whose nftables table name is fixed) never meet, the host's ruleset is untouched, and
# `down` removes all of it with the namespace. NodePorts are not routed.
#
# Environment: FAL_CLUSTER_PORT (apiserver, default 16443; etcd uses +1 and +2, the
# controller manager +3, the scheduler +4, the test kubelet's API +5; all loopback but
# the apiserver's and the kubelet's, on the node address), FAL_CLUSTER_NET (default 0;
# a second cluster on the machine needs another N and port), FAL_CLUSTER_STATE (the
# state directory, default .cluster/ of the checkout: a second cluster of one checkout
# needs its own), FAL_SIDECAR_BIN / FAL_OPERATOR_BIN (the binaries the fal-sidecar and
# fal-operator images run; default $CARGO_TARGET_DIR/debug or target/debug),
# FAL_RUNNER_PYTHON (the python3 the runner image runs, see runner_image_env). The Redis
# image runs redis-server from PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MOD=$ROOT/tests/cluster
STATE=${FAL_CLUSTER_STATE:-$ROOT/.cluster}
K8S_VERSION=1.37.2
ETCD_VERSION=3.7.3
K8S_RELEASE_DATE=2026-10-27T12:01:04Z  # of v$K8S_VERSION (the module proxy's .info): reproducible ldflags
NODE=fal-test-node
PORT=${FAL_CLUSTER_PORT:-16443}
ETCD_PORT=$((PORT + 1)) ETCD_PEER_PORT=$((PORT + 2)) KCM_PORT=$((PORT + 3)) SCHED_PORT=$((PORT + 4))
KUBELET_PORT=$((PORT + 5)) # on the node's pod-network address, not loopback
NET=${FAL_CLUSTER_NET:-0} # pod network: bridge falkN, pods in 198.18.N.0/24 (reserved for tests)
BRIDGE=falk$NET
NODE_IP=198.18.$NET.1
SVC_NS=falk${NET}svc SVC_ROUTER=198.18.$NET.254 # kube-proxy's namespace and its address
case $NET in ([0-9] | [12][0-9] | 3[01]) ;; (*) echo "FAL_CLUSTER_NET must be 0-31, not $NET" >&2; exit 2 ;; esac
SVC_NET=198.19.$((8 * NET)) # the first /24 of the network's Service range
SERVICE_CIDR=$SVC_NET.0/21 API_SVC_IP=$SVC_NET.1 DNS_IP=$SVC_NET.10
DOMAIN=cluster.local
CACHE=${FAL_CLUSTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fal-serverless/cluster}
export GOMODCACHE=${GOMODCACHE:-$CACHE/go/mod} GOCACHE=${GOCACHE:-$CACHE/go/cache}
export GOFLAGS=-mod=readonly GOTOOLCHAIN=${GOTOOLCHAIN:-local}
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy test-kubelet)
K8S_COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl)
COREDNS_VERSION=$(sed -n 's#^require github.com/coredns/coredns v##p' "$MOD/coredns/go.mod")
COREDNS_IMAGE=registry.k8s.io/coredns/coredns:v$COREDNS_VERSION

say() { echo "cluster: $*" >&2; }
die() { echo "cluster: error: $*" >&2; exit 1; }

# --- build ------------------------------------------------------------------------------
find_go() {
  command -v go >/dev/null 2>&1 && return
  [ -x /usr/local/go/bin/go ] && { PATH=/usr/local/go/bin:$PATH; return; }
  die "Go is not installed (need go $(sed -n 's/^go //p' "$MOD/go.mod") or newer to build the control plane): https://go.dev/dl, or put it on PATH"
}

hash_of() { cat "$@" | sha256sum | cut -c1-12; }

# One `go build` for the Kubernetes commands and etcd (they share most packages).
# The version ldflags make /version and `kubectl version` report the real release.
build_control_plane() {
  local key dir tmp ld=() p
  # go.sum pins every module of the build (go.mod's `tool` lines and comments do not
  # matter); the list of commands is part of the key.
  key=$(hash_of "$MOD/go.sum" "$MOD/cmd/etcd/main.go" <(echo "${K8S_COMMANDS[*]}"))
  dir=$CACHE/k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION-$key
  CP_BIN=$dir/bin
  [ -x "$CP_BIN/kubectl" ] && return
  find_go
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.build.lock"
  flock 9
  if [ ! -x "$CP_BIN/kubectl" ]; then
    say "building ${K8S_COMMANDS[*]} v$K8S_VERSION and etcd v$ETCD_VERSION (once; takes minutes) into $dir"
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
      "${K8S_COMMANDS[@]/#/k8s.io/kubernetes/cmd/}" ./cmd/etcd)
    rm -rf "$dir"
    mv "$tmp" "$dir"
    say "built in $((SECONDS - t0)) s"
  fi
  flock -u 9
}

# CoreDNS: its own module (tests/cluster/coredns: its dependencies are newer than the
# Kubernetes release's), its own cache key and lock. coredns_bin only names the binary.
coredns_bin() {
  COREDNS_BIN=$CACHE/coredns-v$COREDNS_VERSION-$(hash_of "$MOD/coredns/go.sum" "$MOD/coredns/main.go")/coredns
}

build_coredns() {
  local t0=$SECONDS
  find_go
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.coredns.lock"
  flock 8
  if [ ! -x "$COREDNS_BIN" ]; then
    say "building CoreDNS v$COREDNS_VERSION (once) into ${COREDNS_BIN%/*}"
    mkdir -p "${COREDNS_BIN%/*}"
    (cd "$MOD/coredns" && nice -n 19 go build -trimpath -ldflags "-s -w" -o "$COREDNS_BIN.tmp.$$" .)
    mv "$COREDNS_BIN.tmp.$$" "$COREDNS_BIN"
    say "CoreDNS built in $((SECONDS - t0)) s"
  fi
  flock -u 8
}

# The test kubelet is small and changes with the test harness: its own cache key.
build_kubelet() {
  local key
  key=$(hash_of "$MOD/go.sum" "$MOD"/cmd/test-kubelet/*.go)
  KUBELET_BIN=$CACHE/test-kubelet-$key/test-kubelet
  [ -x "$KUBELET_BIN" ] && { touch "${KUBELET_BIN%/*}"; return; } # in use (see below)
  find_go
  say "building the test kubelet"
  mkdir -p "${KUBELET_BIN%/*}"
  (cd "$MOD" && nice -n 19 go build -trimpath -ldflags "-s -w" -o "$KUBELET_BIN.tmp.$$" ./cmd/test-kubelet)
  mv "$KUBELET_BIN.tmp.$$" "$KUBELET_BIN"
  # Builds not used for a week go (other checkouts of the cache may run other versions
  # of it: a running one re-executes /proc/self/exe, a new `up` would build again).
  find "$CACHE" -maxdepth 1 -name 'test-kubelet-*' -mtime +7 ! -path "${KUBELET_BIN%/*}" -exec rm -rf {} +
}

build() {
  local pid=
  coredns_bin
  # Alongside the Kubernetes build, whose long single-threaded links leave a core idle.
  if [ ! -x "$COREDNS_BIN" ]; then
    build_coredns &
    pid=$!
  fi
  build_control_plane
  [ -z "$pid" ] || wait "$pid" || die "building CoreDNS failed"
  build_kubelet
  mkdir -p "$STATE/bin"
  for b in etcd "${K8S_COMMANDS[@]}"; do
    ln -sfn "$CP_BIN/$b" "$STATE/bin/$b"
  done
  ln -sfn "$COREDNS_BIN" "$STATE/bin/coredns"
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

# --- certificates (generated once per state dir, like envtest) -----------------------------
# The CA, client and service-account keys stay; the apiserver's serving certificate is
# made again when its names change (another FAL_CLUSTER_NET): 127.0.0.1, the node
# address, the `kubernetes` Service IP and kubernetes.default.svc… (in-cluster clients).
certs() {
  local pki=$STATE/pki
  local san="subjectAltName=IP:127.0.0.1,IP:$NODE_IP,IP:$API_SVC_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.$DOMAIN"
  [ -f "$pki/admin.crt" ] && [ "$(cat "$pki/apiserver.san" 2>/dev/null)" = "$san" ] && return
  command -v openssl >/dev/null || die "openssl is needed to generate the cluster's certificates"
  mkdir -p "$pki"
  (
    cd "$pki"
    if [ ! -f admin.crt ]; then
      openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
        -subj "/CN=fal-test-ca" 2>/dev/null
      openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr \
        -subj "/O=system:masters/CN=admin" 2>/dev/null
      printf 'extendedKeyUsage=clientAuth\n' >client.ext
      openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -out admin.crt -days 3650 -extfile client.ext 2>/dev/null
      openssl genrsa -out sa.key 2048 2>/dev/null
      openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    fi
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
      -subj "/CN=kube-apiserver" 2>/dev/null
    printf '%s\nextendedKeyUsage=serverAuth\n' "$san" >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out apiserver.crt -days 3650 -extfile apiserver.ext 2>/dev/null
    echo "$san" >apiserver.san
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
    server: https://$NODE_IP:$PORT
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

fal_bin() { # NAME VAR: the workspace binary an image runs
  local b=${!2:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/$1}
  [ -x "$b" ] || say "warning: no $1 binary at $b (set $2): pods with the $1 image will not start"
  echo "$b"
}

all_alive() {
  local c
  for c in "${COMPONENTS[@]}"; do alive "$c" || return 1; done
}

# --- the node's network ----------------------------------------------------------------
# The bridge holds the node address before the apiserver binds it; kube-proxy's
# namespace (see the top of this file) is the Service router on the bridge.
net_up() {
  ip link add "$BRIDGE" type bridge
  ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  ip netns add "$SVC_NS"
  ip link add "$SVC_NS" type veth peer name eth0 netns "$SVC_NS"
  ip link set "$SVC_NS" master "$BRIDGE" up
  ip -n "$SVC_NS" addr add "$SVC_ROUTER/24" dev eth0
  ip -n "$SVC_NS" link set eth0 up
  ip -n "$SVC_NS" link set lo up
  # Forwarding in that namespace only; the host forwards nothing.
  ip netns exec "$SVC_NS" sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'
  # It routes back out of the interface a packet came in on (every Service packet), so
  # by default it would send ICMP redirects: pods could learn a route past it, and each
  # redirect resets the per-host clock of ICMP rate limiting (inet_peer rate_last, shared
  # with the redirect backoff), so the port-unreachable that answers a Service without
  # endpoints was suppressed for a pod that had used Services (IcmpOutRateLimitHost; the
  # fetch timed out instead of being refused). No redirects, and the router's ICMP
  # answers are not rate limited per host.
  ip netns exec "$SVC_NS" sh -c 'for f in all default eth0; do echo 0 >/proc/sys/net/ipv4/conf/$f/send_redirects; done
    echo 0 >/proc/sys/net/ipv4/icmp_ratelimit'
  # A route for the Service range, so that what kube-proxy does not DNAT reaches its
  # forward-hook rules (reject: no endpoints, invalid port; drop: unallocated IP)
  # instead of dying unrouted without an answer, as on a node with a default route.
  ip -n "$SVC_NS" route add "$SERVICE_CIDR" dev eth0
  ip route add "$SERVICE_CIDR" via "$SVC_ROUTER" dev "$BRIDGE" src "$NODE_IP"
}

net_down() {
  local pid
  for pid in $(ip netns pids "$SVC_NS" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  # kube-proxy's rules and conntrack entries live and die with its namespace.
  ip netns del "$SVC_NS" 2>/dev/null || true
  ip link del "$SVC_NS" 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true # its address and the Service route with it
}

kube_proxy_config() {
  cat >"$STATE/kube-proxy.yaml" <<EOF
# Written by scripts/cluster.sh; kube-proxy runs in network namespace $SVC_NS.
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kubeconfig}
hostnameOverride: $NODE
mode: nftables
clusterCIDR: 198.18.$NET.0/24
# Every Service connection is masqueraded to the router's address: replies must come
# back through the namespace that did the DNAT (pods and the host share the bridge).
nftables: {masqueradeAll: true, syncPeriod: 30s, minSyncPeriod: 0s}
# Leave the machine's conntrack limits and timeouts alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
EOF
}

addons() { # CoreDNS and the default StorageClass (tests/cluster/addons)
  local f
  for f in "$MOD"/addons/*.yaml; do
    echo ---
    sed -e "s/@DNS_IP@/$DNS_IP/g" -e "s#@COREDNS_IMAGE@#$COREDNS_IMAGE#g" "$f"
  done | KUBECTL apply -f - >/dev/null
}

# The PersistentVolumes' directories the hostPath provisioner made (while the API is up).
remove_volumes() {
  local p
  alive kube-apiserver || return 0
  for p in $(KUBECTL get pv --request-timeout 5s -o jsonpath='{range .items[*]}{.spec.hostPath.path}{"\n"}{end}' 2>/dev/null); do
    case $p in /tmp/hostpath_pv/?*) rm -rf -- "$p" ;; esac
  done
  rmdir /tmp/hostpath_pv 2>/dev/null || true # the provisioner made it; others' volumes keep it
}

# The Python runner image (served files and their environment builds) as the test
# kubelet runs it: the host's python3 (FAL_RUNNER_PYTHON, default python3 on PATH; a
# venv's python is fine, it must be able to make venvs) first on PATH, and the
# checkout's runner/ on PYTHONPATH, as the image's config sets them to its own.
runner_image_env() {
  local repo=ghcr.io/fal-serverless-k8s/fal-runner py
  py=$("${FAL_RUNNER_PYTHON:-python3}" -c 'import sys; print(sys.executable)') ||
    die "no python3 for the runner image (set FAL_RUNNER_PYTHON)"
  RUNNER_IMAGE_ENV=(
    --image-env "$repo=PATH=${py%/*}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    --image-env "$repo=PYTHONPATH=$ROOT/runner"
  )
}

up() {
  if all_alive && KUBECTL get --raw /readyz >/dev/null 2>&1; then
    say "already up (KUBECONFIG=$STATE/kubeconfig)"
    return
  fi
  # Anything half-up (a component died) is stopped below and started afresh.
  [ "$(id -u)" = 0 ] || die "the test kubelet needs root (network namespaces for pods)"
  command -v ip >/dev/null || die "iproute2 ('ip') is needed for the pod network"
  command -v nft >/dev/null || die "nft is needed (kube-proxy's nftables mode)"
  local other
  other=$(pgrep -f -- "--bridge $BRIDGE( |$)" | grep -vx "$(pid_of test-kubelet)" || true)
  [ -z "$other" ] || die "the pod network $BRIDGE (198.18.$NET.0/24) belongs to another running test kubelet (pid $other): set FAL_CLUSTER_NET (and FAL_CLUSTER_PORT)"
  down quiet
  build
  local p
  for p in "$PORT" "$ETCD_PORT" "$ETCD_PEER_PORT" "$KCM_PORT" "$SCHED_PORT"; do
    port_taken "$p" && die "port 127.0.0.1:$p is taken (another cluster? set FAL_CLUSTER_PORT to move the ports: apiserver P, etcd P+1/P+2, controller manager P+3, scheduler P+4)"
  done
  runner_image_env
  local t0=$SECONDS
  rm -rf "$STATE/etcd" "$STATE/kubelet" "$STATE/logs" # a fresh cluster, fresh logs
  mkdir -p "$STATE/run" "$STATE/logs"
  certs
  kubeconfig
  kube_proxy_config
  net_up || { down quiet; die "could not set up the node network ($BRIDGE, $SVC_NS)"; }
  local pki=$STATE/pki bin=$STATE/bin
  start etcd "$bin/etcd" --name fal-test --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "fal-test=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn
  wait_for etcd 30 curl -fsS "http://127.0.0.1:$ETCD_PORT/health" || { down quiet; die "etcd did not start"; }
  # On the node address (not loopback): pods reach it there, through the `kubernetes`
  # Service whose endpoint the lease reconciler publishes (the advertise address).
  start kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$PORT" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --authorization-mode RBAC \
    --service-account-issuer "https://kubernetes.default.svc.$DOMAIN" \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --api-audiences "https://kubernetes.default.svc.$DOMAIN" \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --allow-privileged=true --cert-dir "$STATE/pki/generated" \
    --kubelet-preferred-address-types InternalIP
  # curl, not kubectl: polled every 0.2 s, and kubectl costs a CPU-heavy exec each time.
  wait_for kube-apiserver 90 curl -fsS --cacert "$pki/ca.crt" "https://$NODE_IP:$PORT/readyz" ||
    { down quiet; die "kube-apiserver did not start"; }
  local t_api=$((SECONDS - t0))
  # Its controllers use the admin credentials (no --use-service-account-credentials): a
  # ServiceAccount and token per controller cost 3-5 s of `up` on two cores, and only
  # change which identity Kubernetes' own controllers have; the project's components
  # run as their own ServiceAccounts under RBAC either way.
  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$STATE/kubeconfig" --authentication-kubeconfig "$STATE/kubeconfig" \
    --authorization-kubeconfig "$STATE/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --controllers '*' \
    --enable-hostpath-provisioner \
    --cluster-name fal-test
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$STATE/kubeconfig" --authentication-kubeconfig "$STATE/kubeconfig" \
    --authorization-kubeconfig "$STATE/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false
  start kube-proxy ip netns exec "$SVC_NS" "$bin/kube-proxy" --config "$STATE/kube-proxy.yaml"
  start test-kubelet "$bin/test-kubelet" --kubeconfig "$STATE/kubeconfig" --node-name "$NODE" \
    --state-dir "$STATE/kubelet" --bridge "$BRIDGE" --subnet "198.18.$NET" --port "$KUBELET_PORT" --workdir "$MOD/app" \
    --pod-route "$SERVICE_CIDR=$SVC_ROUTER" --cluster-dns "$DNS_IP" --cluster-domain "$DOMAIN" \
    --sidecar-bin "$(fal_bin fal-sidecar FAL_SIDECAR_BIN)" \
    --image-command "ghcr.io/fal-serverless-k8s/fal-operator=$(fal_bin fal-operator FAL_OPERATOR_BIN)" \
    --image-command "docker.io/library/redis=redis-server" --image-command "redis=redis-server" \
    --image-command "${COREDNS_IMAGE%:*}=$COREDNS_BIN" \
    --image-command "ghcr.io/fal-serverless-k8s/seed-app=python3 app.py" \
    "${RUNNER_IMAGE_ENV[@]}"
  # kube-system exists once the apiserver's post-start hooks ran (moments after readyz).
  wait_for kube-apiserver 30 addons || { down quiet; die "could not apply tests/cluster/addons"; }
  wait_for test-kubelet 60 KUBECTL wait --for condition=Ready "node/$NODE" --timeout 2s ||
    { down quiet; die "the test kubelet did not register a Ready node"; }
  # Pods need their namespace's default ServiceAccount (the controller manager makes it).
  wait_for kube-controller-manager 60 KUBECTL get serviceaccount default -n default ||
    { down quiet; die "kube-controller-manager did not create the default ServiceAccount"; }
  # The cluster DNS answering through its Service from the host: CoreDNS runs, reached
  # the API through the `kubernetes` Service, and kube-proxy routes both.
  if ! wait_for kube-proxy 60 "$bin/test-kubelet" dns-query "$DNS_IP" "kubernetes.default.svc.$DOMAIN."; then
    KUBECTL get pods -n kube-system -o wide >&2 || true
    tail -n 20 "$STATE"/kubelet/pods/kube-system_coredns-*/logs/coredns.log >&2 2>/dev/null || true
    down quiet
    die "the cluster DNS ($DNS_IP) did not answer"
  fi
  say "up in $((SECONDS - t0)) s (API ready after $t_api s): export KUBECONFIG=$STATE/kubeconfig PATH=$STATE/bin:\$PATH"
  say "node $NODE_IP, pods 198.18.$NET.0/24, Services $SERVICE_CIDR, DNS $DNS_IP"
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
  stop 2 kube-proxy
  remove_volumes
  net_down
  # Two seconds are plenty: the apiserver drops its endpoint lease at once, then waits
  # up to a minute for connections to drain (its own loopback clients among them);
  # nothing of the cluster is kept anyway.
  stop 2 kube-scheduler kube-controller-manager kube-apiserver
  stop 5 etcd
  rm -rf "$STATE/etcd"
  [ -n "$quiet" ] || say "down"
}

status() {
  local c rc=0
  for c in "${COMPONENTS[@]}"; do
    if alive "$c"; then echo "$c: running (pid $(pid_of "$c"))"; else echo "$c: stopped"; rc=1; fi
  done
  if [ -f "$STATE/kubeconfig" ] && KUBECTL get --raw /readyz >/dev/null 2>&1; then
    echo "apiserver: https://$NODE_IP:$PORT ready, $(KUBECTL version -o json 2>/dev/null | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -1)"
    if "$STATE/bin/test-kubelet" dns-query "$DNS_IP" "kubernetes.default.svc.$DOMAIN." >/dev/null 2>&1; then
      echo "dns: $DNS_IP answers; Services $SERVICE_CIDR via $SVC_ROUTER (namespace $SVC_NS)"
    else
      echo "dns: $DNS_IP does not answer"
    fi
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
