#!/usr/bin/env bash
# Benchmarks of the data path, with baselines measured in the same run:
#   backend      = nginx `return 200` (a fast static responder)
#   direct       = wrk → backend
#   nginx-proxy  = wrk → nginx reverse proxy (keep-alive upstream) → backend
#   sidecar      = wrk → fal-sidecar serve → backend
# plus sidecar RSS idle and under load, and queue submits/s against the embedded store.
# Usage: scripts/bench.sh [seconds-per-run] [connections]
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
CONNS=${2:-64}
THREADS=1   # wrk shares the 2 cores with the servers; one load thread is enough

need=()
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "== building release binaries"
cargo build --release -p fal-sidecar --locked 2>&1 | tail -1
BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/fal-sidecar

WORK=$(mktemp -d /tmp/fal-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACK=$(port); PROXY=$(port); SIDE=$(port); SIDEQ=$(port); SIDEA=$(port)

mkdir -p "$WORK/nginx/logs"
cat > "$WORK/nginx/nginx.conf" <<NGX
worker_processes auto;
error_log $WORK/nginx/logs/error.log warn;
pid $WORK/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$BACK; keepalive 256; }
  server { listen 127.0.0.1:$BACK; location / { return 200 "ok\n"; } }
  server {
    listen 127.0.0.1:$PROXY;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGX
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
pids+=($!)

"$BIN" serve --upstream "http://127.0.0.1:$BACK" --listen "127.0.0.1:$SIDE" --queue-listen "127.0.0.1:$SIDEQ" \
  --admin-listen "127.0.0.1:$SIDEA" --data-dir "$WORK/data" --max-queue 10000000 --max-concurrency 64 \
  >"$WORK/sidecar.log" 2>&1 &
SPID=$!
pids+=($SPID)
for _ in $(seq 100); do curl -sf "127.0.0.1:$SIDEA/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "127.0.0.1:$SIDE/" >/dev/null || { echo "sidecar did not come up"; cat "$WORK/sidecar.log"; exit 1; }

rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/VmHWM/{print $2}' "/proc/$1/status"; }
IDLE_RSS=$(rss_kb $SPID)

# wrk → "rps p50_ms p99_ms"
measure() {
  local out
  out=$(wrk -t$THREADS -c"$CONNS" -d"${DUR}s" --latency "$@")
  python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
def pct(p):
    m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s|m)\s*$" % p, out, re.M)
    if not m:
        sys.exit("cannot parse wrk output:\n" + out)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3, "m": 6e4}[m.group(2)]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
p50 = pct(50)
p99 = pct(99)
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {errs.group(1) if errs else 0}")
PY
}

echo "== warm-up"; wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$SIDE/" >/dev/null; wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$PROXY/" >/dev/null
echo "== direct";      read -r D_RPS D_P50 D_P99 D_ERR < <(measure "http://127.0.0.1:$BACK/")
echo "== nginx proxy"; read -r N_RPS N_P50 N_P99 N_ERR < <(measure "http://127.0.0.1:$PROXY/")
echo "== fal-sidecar"; read -r S_RPS S_P50 S_P99 S_ERR < <(measure "http://127.0.0.1:$SIDE/")
LOAD_HWM=$(hwm_kb $SPID)

# Queue submits through the run API (embedded store, durable group commit).
cat > "$WORK/submit.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"prompt": "a cat"}'
wrk.headers["Content-Type"] = "application/json"
LUA
echo "== queue submits"; read -r Q_RPS Q_P50 Q_P99 Q_ERR < <(measure -s "$WORK/submit.lua" "http://127.0.0.1:$SIDE/fal/queue/submit/")
SUBMIT_HWM=$(hwm_kb $SPID)

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
cat <<REPORT

| path | req/s | p50 ms | p99 ms | non-2xx |
|---|---:|---:|---:|---:|
| direct (nginx return 200) | $D_RPS | $D_P50 | $D_P99 | $D_ERR |
| nginx reverse proxy | $N_RPS | $N_P50 | $N_P99 | $N_ERR |
| fal-sidecar (direct call) | $S_RPS | $S_P50 | $S_P99 | $S_ERR |
| fal-sidecar queue submit | $Q_RPS | $Q_P50 | $Q_P99 | $Q_ERR |

sidecar/nginx-proxy throughput: $(ratio $S_RPS $N_RPS)   (target ≥ 1.00)
sidecar/nginx-proxy p99:        $(ratio $S_P99 $N_P99)   (target ≤ 1.00)
sidecar/direct throughput:      $(ratio $S_RPS $D_RPS)
submits/s:                      $Q_RPS   (target ≥ 10000)
sidecar RSS idle:               $((IDLE_RSS / 1024)) MiB ($IDLE_RSS kB; target ≤ 15 MB)
sidecar peak RSS, proxy load:   $((LOAD_HWM / 1024)) MiB
sidecar peak RSS, after submits: $((SUBMIT_HWM / 1024)) MiB
(wrk -t$THREADS -c$CONNS -d${DUR}s, $(nproc) cores shared by load generator and servers)
REPORT
