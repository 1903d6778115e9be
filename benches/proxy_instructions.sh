#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's
# callgrind: the same OpenAI request sent N times through Switchyard's
# remote-upstream route to `proxy_overhead`'s instant upstream. Unlike req/s
# on a shared machine, the count repeats to within a fraction of a percent
# from run to run, so it can tell two builds apart. The kernel's share (the
# socket calls) is not counted: `proxy_overhead` measures the whole.
#
#   cargo build --release -p benches -p gateway
#   benches/proxy_instructions.sh [--requests N] [--connections C] BINARY...
#
# Every BINARY is counted in turn; the first is the anchor of the last column.
# `nginx` as a BINARY counts nginx instead (one worker, no master process,
# the configuration `proxy_overhead` writes), as the reference.
# With --cpu, the proxy runs without valgrind and the table gives its user
# and system CPU time and its context switches a request instead (from
# /proc, at the clock tick's resolution: use tens of thousands of requests).
# Needs valgrind and python3 (and nginx for that).
set -euo pipefail
requests=4000
connections=8
cpu=""
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --requests) requests=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --cpu) cpu=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || set -- target/release/switchyard
root="$(cd "$(dirname "$0")/.." && pwd)"
upstream_bin="$root/target/release/proxy_overhead"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# C keep-alive connections sending N requests in all, each checked for 200.
load() {
  python3 - "$1" "$2" "$3" <<'EOF'
import http.client, sys, threading
port, n, c = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
body = b'{"model":"fast","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
failed = []
def worker(k):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(k):
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            failed.append(r.status)
threads = [threading.Thread(target=worker, args=(n // c,)) for _ in range(c)]
for t in threads: t.start()
for t in threads: t.join()
if failed:
    sys.exit(f"answers other than 200: {failed[:5]}")
EOF
}

up=$(free_port)
"$upstream_bin" --upstream-only "$up" &
anchor=""
if [[ -n $cpu ]]; then
  echo "| binary | connections | requests | user µs per request | system µs per request | context switches per request |"
  echo "|---|---|---|---|---|---|"
else
  echo "| binary | connections | requests | instructions per request | ÷ first |"
  echo "|---|---|---|---|---|"
fi

# The process's user and system clock ticks and its threads' context
# switches so far.
usage() {
  echo "$(awk '{print $14, $15}' "/proc/$1/stat") $(cat /proc/"$1"/task/*/status | awk '/ctxt_switches/ {n += $2} END {print n}')"
}
# The proxy BINARY on 127.0.0.1:PORT in the background: under callgrind,
# or as it is with --cpu.
start() {
  local bin=$1 port=$2 d="$work"
  local counted=(valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out.%p")
  [[ -z $cpu ]] || counted=(env)
  if [[ $bin == nginx ]]; then
    cat >"$work/nginx.conf" <<EOF
worker_processes 1; master_process off; daemon off; pid $d/nginx.pid; error_log $d/nginx.err;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $d/body; proxy_temp_path $d/proxy;
  fastcgi_temp_path $d/fcgi; uwsgi_temp_path $d/uwsgi; scgi_temp_path $d/scgi;
  upstream fast { server 127.0.0.1:$up; keepalive 128; }
  server {
    listen 127.0.0.1:$port;
    location / { proxy_pass http://fast; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
    "${counted[@]}" nginx -p "$work" -c "$work/nginx.conf" 2>"$work/valgrind.log" &
  else
    printf 'server: { http: 127.0.0.1:%s }\nupstreams:\n  - { name: fast, endpoints: [http://127.0.0.1:%s] }\n' \
      "$port" "$up" >"$work/switchyard.yaml"
    RUST_LOG=warn "${counted[@]}" "$bin" serve --config "$work/switchyard.yaml" 2>"$work/valgrind.log" &
  fi
}

for bin in "$@"; do
  port=$(free_port)
  rm -f "$work"/callgrind.out.*
  start "$bin" "$port"
  pid=$!
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 0.2
  done
  load "$port" 400 "$connections" # warm: connections, pools, lazy statics
  if [[ -n $cpu ]]; then
    before=$(usage "$pid")
    load "$port" "$requests" "$connections"
    after=$(usage "$pid")
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    python3 - "$bin" "$connections" "$requests" "$(getconf CLK_TCK)" $before $after <<'EOF'
import sys
bin, c, n, tck = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
u0, s0, x0, u1, s1, x1 = map(int, sys.argv[5:11])
per = lambda ticks: ticks * 1e6 / tck / n
print(f"| {bin} | {c} | {n} | {per(u1 - u0):.2f} | {per(s1 - s0):.2f} | {(x1 - x0) / n:.2f} |")
EOF
    continue
  fi
  callgrind_control --zero "$pid" >/dev/null 2>&1
  load "$port" "$requests" "$connections"
  callgrind_control --dump "$pid" >/dev/null 2>&1
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$work"/callgrind.out."$pid".1)
  per=$((total / requests))
  anchor=${anchor:-$per}
  ratio=$(python3 -c "print(f'{$per / $anchor:.3f}')")
  echo "| $bin | $connections | $requests | $per | $ratio |"
done
