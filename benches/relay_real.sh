#!/usr/bin/env bash
# Relay under Tailscale-style client traffic (issue 16): Tailscale's own derphttp client
# (interop/derpload: one frame per write and flush, 32 packets in flight per pair, 1400 B),
# several relay binaries interleaved run by run (A B C A B C ...), plain, TLS and WebSocket.
#
#   benches/relay_real.sh LABEL=BIN [LABEL=BIN ...]
#
# A BIN whose file name starts with "derper" is run as Tailscale's derper, anything else as
# `tailnetd derp`. Environment: RUNS (3), PAIRS ("10 100"), MODES ("quarter half free"),
# TRANSPORTS ("plain tls"; also "ws", "wss": DERP over WebSocket, plain and TLS), DURATION (4 s),
# HALF_OF (label whose capacity sets the `half` rate; default derper), DERPLOAD (path; default:
# go build with Tailscale's WebSocket tag into $work).
# Modes, run in this order (mode by mode; inside a mode the binaries alternate run by run):
#   `quarter` starts the server inside a CPU cgroup of 0.25 core (v2 cpu.max or v1 CFS quota;
#     needs root) on core 0, so the server is the limit and delivered packets/s (closed loop,
#     32 in flight per pair) is its capacity at a quarter core;
#   `half` runs every server in the same cgroup open loop at half of HALF_OF's median `quarter`
#     capacity for that transport and pair count (so `quarter` must run first, here or in an
#     earlier run into the same $OUT): p99 latency, from each packet's scheduled send time, at
#     the same offered load for everyone;
#   `free` pins the server to core 0 without a quota (the client core is then the limit) for CPU
#     per delivered packet.
# The load generator is pinned to core 1.
# Each run appends one JSON line (derpload's report plus mode, transport, the server's
# user/system CPU split over its lifetime) to $OUT (default relay_real.jsonl); a summary table
# (median and min–max per cell) is printed at the end. Traffic stays on 127.0.0.1.
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: relay_real.sh LABEL=BIN [LABEL=BIN ...]"; exit 1; }
runs=${RUNS:-3}
pairs_list=${PAIRS:-"10 100"}
modes=${MODES:-"quarter half free"}
half_of=${HALF_OF:-derper}
transports=${TRANSPORTS:-"plain tls"}
duration=${DURATION:-4}
out=${OUT:-relay_real.jsonl}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work=$(mktemp -d)
cg=""
cleanup() {
  [ -n "${srv:-}" ] && kill "$srv" 2>/dev/null && wait "$srv" 2>/dev/null || true
  [ -n "$cg" ] && rmdir "$cg" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

derpload=${DERPLOAD:-}
if [ -z "$derpload" ]; then
  (cd "$repo/interop/derpload" && go build -tags ts_debug_websockets -o "$work/derpload" .)
  derpload=$work/derpload
fi
mkdir -p "$work/certs"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$work/certs/localhost.key" -out "$work/certs/localhost.crt" 2>/dev/null

if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  cg=/sys/fs/cgroup/relay-real-$$; mkdir "$cg"; echo "25000 100000" >"$cg/cpu.max"
else
  cg=/sys/fs/cgroup/cpu/relay-real-$$; mkdir "$cg"
  echo 100000 >"$cg/cpu.cfs_period_us"; echo 25000 >"$cg/cpu.cfs_quota_us"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_server BIN MODE TRANSPORT -> sets srv (pid) and url
start_server() {
  local bin=$1 mode=$2 tr=$3 pre=(taskset -c 0)
  [ "$mode" != free ] && pre=(sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' sh "$cg" taskset -c 0)
  local scheme=http; [[ "$tr" == tls || "$tr" == wss ]] && scheme=https
  if [[ "$(basename "$bin")" == derper* ]]; then
    local port; port=$(free_port)
    local args=(-a "127.0.0.1:$port" -stun=false -http-port -1 -c "$work/derper.key")
    [ "$scheme" = https ] && args+=(-certmode manual -hostname localhost -certdir "$work/certs")
    "${pre[@]}" "$bin" "${args[@]}" </dev/null >/dev/null 2>"$work/server.log" &
    srv=$!
    for _ in $(seq 1 200); do
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05
    done
    url="$scheme://localhost:$port/derp"
  else
    local args=(derp --http-addr 127.0.0.1:0 --stun-addr "" --log warn --metrics-addr "" --key-file "$work/tailnetd.key")
    [ "$scheme" = https ] && args+=(--https-addr 127.0.0.1:0 --tls-cert "$work/certs/localhost.crt" --tls-key "$work/certs/localhost.key")
    coproc SRV { exec "${pre[@]}" "$bin" "${args[@]}" 2>"$work/server.log"; }
    srv=$SRV_PID
    local line
    read -r -t 60 line <&"${SRV[0]}" || { echo "server printed nothing" >&2; cat "$work/server.log" >&2; exit 1; }
    local key=http_addr; [ "$scheme" = https ] && key=https_addr
    local addr; addr=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$line" "$key")
    url="$scheme://localhost:${addr##*:}/derp"
  fi
  # the pid that burns the CPU (taskset/sh exec into the server, so $! is it)
}

# half_rate TRANSPORT PAIRS -> half of $half_of's median quarter-core capacity (packets/s)
half_rate() {
  python3 - "$out" "$half_of" "$1" "$2" <<'EOF'
import json, statistics, sys
out, label, tr, pairs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
v = [r["delivered_pps"] for r in map(json.loads, filter(str.strip, open(out)))
     if r["mode"] == "quarter" and r["label"] == label and r["tls"] == tr and r["pairs"] == pairs]
if not v:
    sys.exit(f"half: no quarter run of {label} ({tr}, {pairs} pairs) in {out}; run MODES=quarter first")
print(round(statistics.median(v) / 2))
EOF
}

for mode in $modes; do
  for i in $(seq 1 "$runs"); do
    for tr in $transports; do
      for pairs in $pairs_list; do
        load=(-window 32)
        if [ "$mode" = half ]; then rate=$(half_rate "$tr" "$pairs"); load=(-window 0 -rate "$rate"); fi
        for spec in "$@"; do
          label=${spec%%=*}; bin=${spec#*=}
          start_server "$bin" "$mode" "$tr"
          ca=(); [[ "$tr" == tls || "$tr" == wss ]] && ca=(-ca "$work/certs/localhost.crt")
          [[ "$tr" == ws* ]] && ca+=(-ws)
          line=$(taskset -c 1 "$derpload" -url "$url" "${ca[@]}" -pairs "$pairs" -size 1400 "${load[@]}" \
            -duration "$duration" -warmup 1 -server-pid "$srv" -label "$label" 2>"$work/load.err" | tail -n 1) \
            || { echo "derpload failed:" >&2; cat "$work/load.err" >&2; }
          read -r ut st < <(awk '{print $14, $15}' "/proc/$srv/stat")
          kill "$srv"; wait "$srv" 2>/dev/null || true; srv=
          [ -n "$line" ] || continue
          python3 - "$line" "$mode" "$tr" "$ut" "$st" "$i" "$(cut -d' ' -f1 /proc/loadavg)" >>"$out" <<'EOF'
import json, sys
r = json.loads(sys.argv[1])
r.update(mode=sys.argv[2], tls=sys.argv[3], server_utime_ticks=int(sys.argv[4]),
         server_stime_ticks=int(sys.argv[5]), run=int(sys.argv[6]), loadavg_1m=float(sys.argv[7]))
print(json.dumps(r))
EOF
          tail -n 1 "$out" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); g=lambda k: r.get(k) or 0; print("%s run %d %s %dp %s: %.1f kpps (offered %.1f), server %.2f us/pkt, client %.2f us/pkt, p99 %.0f us, load %.1f" % (r["mode"], r["run"], r["tls"], r["pairs"], r["label"], g("delivered_pps")/1e3, g("actual_offered_pps")/1e3, g("server_cpu_us_per_packet"), g("loadgen_cpu_us_per_packet"), g("latency_p99_us"), g("loadavg_1m")), file=sys.stderr)'
        done
      done
    done
  done
done

python3 "$repo/benches/relay_real_summary.py" "$out"
