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
ROUNDS=${ROUNDS:-3}
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

# Two nginx instances: the backend (one worker, shared by every path measured) and the
# reverse proxy baseline (as many workers as the sidecar has threads), so neither proxy
# gets to answer "backend" requests inside its own event loop.
nginx_conf() { # name workers server-block
  mkdir -p "$WORK/$1/logs"
  cat > "$WORK/$1/nginx.conf" <<NGX
worker_processes $2;
error_log $WORK/$1/logs/error.log warn;
pid $WORK/$1/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/$1/body;
  proxy_temp_path $WORK/$1/proxy;
  fastcgi_temp_path $WORK/$1/fcgi;
  uwsgi_temp_path $WORK/$1/uwsgi;
  scgi_temp_path $WORK/$1/scgi;
  keepalive_requests 1000000;
  $3
}
NGX
  "$NGINX" -p "$WORK/$1" -c "$WORK/$1/nginx.conf" -g 'daemon off;' &
  pids+=($!)
}
CORES=$(nproc)
nginx_conf backend 1 "server { listen 127.0.0.1:$BACK; location / { return 200 \"ok\\n\"; } }"
nginx_conf proxy "$CORES" "upstream backend { server 127.0.0.1:$BACK; keepalive 256; }
  server { listen 127.0.0.1:$PROXY; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
sleep 0.5

FAL_SIDECAR_WORKER_THREADS=$CORES "$BIN" serve --upstream "http://127.0.0.1:$BACK" --listen "127.0.0.1:$SIDE" --queue-listen "127.0.0.1:$SIDEQ" \
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
# Alternate the paths over several rounds and keep the median: the machine is shared.
: > "$WORK/direct"; : > "$WORK/nginx"; : > "$WORK/side"
for r in $(seq "$ROUNDS"); do
  echo "== round $r/$ROUNDS: direct, nginx proxy, fal-sidecar"
  measure "http://127.0.0.1:$BACK/" >> "$WORK/direct"
  measure "http://127.0.0.1:$PROXY/" >> "$WORK/nginx"
  measure "http://127.0.0.1:$SIDE/" >> "$WORK/side"
done
median() { python3 -c 'import sys,statistics as s; rows=[list(map(float,l.split())) for l in open(sys.argv[1]) if l.strip()]; print(" ".join(("%.3f" % s.median(c)).rstrip("0").rstrip(".") for c in zip(*rows)))' "$1"; }
read -r D_RPS D_P50 D_P99 D_ERR < <(median "$WORK/direct")
read -r N_RPS N_P50 N_P99 N_ERR < <(median "$WORK/nginx")
read -r S_RPS S_P50 S_P99 S_ERR < <(median "$WORK/side")
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

# BENCH_PNG=path: the comparison as a picture (scripts/benchplot.py; matplotlib in a venv
# of its own when the system python has none).
if [ -n "${BENCH_PNG:-}" ]; then
  python3 - "$BENCH_PNG" "$CONNS" "$D_RPS $D_P50 $D_P99" "$N_RPS $N_P50 $N_P99" "$S_RPS $S_P50 $S_P99" <<'PY'
import sys
sys.path.insert(0, "scripts")
from benchplot import plot
def row(s):
    rps, p50, p99 = map(float, s.split())
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99}
out, conns, d, n, s = sys.argv[1:]
plot(out, f"fal-sidecar vs an nginx reverse proxy in front of the same app ({conns} conns)",
     [("nginx proxy", row(n)), ("fal-sidecar", row(s))], baseline="nginx proxy")
PY
fi
