#!/usr/bin/env bash
# Cross-relay throughput and latency through the DERP mesh vs the QUIC mesh, runs interleaved
# (derp quic derp quic ...). Two tailnetd relays of one region meshed with each other; senders
# on relay 1, receivers on relay 2 (loadgen relay --recv-url), so every packet crosses the mesh.
#
#   benches/mesh_ab.sh [TAILNETD] [RUNS] [PAIRS] [SIZE]
#
# Defaults: target/release/tailnetd, 3 runs each, 100 pairs, 1312-byte packets (the largest
# WireGuard packet of a 1280-MTU Tailscale tunnel; it fits one QUIC datagram, 1400 would not),
# closed loop with 32 packets in flight per pair. Both relays are pinned to core 0, the load
# generator to core 1. Prints one line per run (Gbit/s, p99, CPU seconds of each relay per
# second of the run) and the medians with min–max. Needs
#   cargo build --release --bin tailnetd && cargo build --release -p benches --bin loadgen
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin=${1:-$repo/target/release/tailnetd}
runs=${2:-3}
pairs=${3:-100}
size=${4:-1312}
loadgen=${LOADGEN:-$repo/target/release/loadgen}
[ -x "$loadgen" ] || { echo "no load generator at $loadgen"; exit 1; }
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
python3 -c 'import os; print(os.urandom(32).hex())' >"$work/mesh.key"
free() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=="udp" else socket.SOCK_STREAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"; }
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
metric() { curl -s "http://$1/metrics" | awk -v n="$2" '$1 ~ "^"n {s+=$2} END {print s+0}'; }

one_run() { # mesh(derp|quic) -> JSON line
  local mesh=$1 h1 h2 u1 u2 args1 args2
  h1=$(free tcp); h2=$(free tcp); u1=$(free udp); u2=$(free udp)
  if [ "$mesh" = derp ]; then
    args1=(--mesh-with "http://127.0.0.1:$h2/derp"); args2=(--mesh-with "http://127.0.0.1:$h1/derp")
  else
    args1=(--mesh-quic-addr "127.0.0.1:$u1" --mesh-quic-with "127.0.0.1:$u2")
    args2=(--mesh-quic-addr "127.0.0.1:$u2" --mesh-quic-with "127.0.0.1:$u1")
  fi
  for i in 1 2; do
    local h=$h1 a=("${args1[@]}"); [ $i = 2 ] && { h=$h2; a=("${args2[@]}"); }
    taskset -c 0 "$bin" derp --http-addr "127.0.0.1:$h" --stun-addr "" --log warn \
      --metrics-addr 127.0.0.1:0 --key-file "$work/key$i" --mesh-psk-file "$work/mesh.key" \
      "${a[@]}" >"$work/ann$i" 2>"$work/server$i.log" &
    pids+=($!); eval "pid$i=$!"
  done
  local m1 m2
  for _ in $(seq 100); do [ -s "$work/ann1" ] && [ -s "$work/ann2" ] && break; sleep 0.1; done
  m1=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics_addr"])' "$work/ann1")
  m2=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics_addr"])' "$work/ann2")
  for _ in $(seq 100); do
    [ "$(metric "$m1" derp_mesh_peer_connected)" = 1 ] && [ "$(metric "$m2" derp_mesh_peer_connected)" = 1 ] && break
    sleep 0.1
  done
  local c1 c2 t0 out
  c1=$(cpu "$pid1"); c2=$(cpu "$pid2"); t0=$(date +%s.%N)
  out=$(taskset -c 1 "$loadgen" relay --url "http://127.0.0.1:$h1/derp" --recv-url "http://127.0.0.1:$h2/derp" \
    --transport derp --pairs "$pairs" --size "$size" --rate 0 --duration 5 --warmup 2 --window 32 \
    --label "$mesh" 2>/dev/null | tail -n 1)
  python3 - "$out" "$(cpu "$pid1")" "$c1" "$(cpu "$pid2")" "$c2" "$t0" "$(date +%s.%N)" \
    "$(metric "$m1" derp_mesh_quic_stream_packets)" "$(metric "$m1" derp_mesh_forward_dropped)" <<'PY'
import json, os, sys
r = json.loads(sys.argv[1]); hz = os.sysconf("SC_CLK_TCK"); wall = float(sys.argv[7]) - float(sys.argv[6])
r["relay1_cpu_util"] = (int(sys.argv[2]) - int(sys.argv[3])) / hz / wall
r["relay2_cpu_util"] = (int(sys.argv[4]) - int(sys.argv[5])) / hz / wall
r["stream_packets"] = float(sys.argv[8]); r["mesh_dropped"] = float(sys.argv[9])
print(json.dumps(r))
PY
  kill "$pid1" "$pid2"; wait "$pid1" "$pid2" 2>/dev/null || true; pids=()
  rm -f "$work/ann1" "$work/ann2"
}

echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$work/derp.jsonl"; : >"$work/quic.jsonl"
for i in $(seq 1 "$runs"); do
  for mesh in derp quic; do
    out=$(one_run "$mesh"); echo "$out" >>"$work/$mesh.jsonl"
    python3 - "$i" "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
print(f"run {sys.argv[1]} {r['label']}: {r['delivered_gbps']:.3f} Gbit/s p99 {r['latency_p99_us']:.0f} µs "
      f"loss {r['loss']:.4f} stalls {r['window_stalls']} relay1 cpu {r['relay1_cpu_util']:.2f} relay2 cpu {r['relay2_cpu_util']:.2f} "
      f"loadgen cpu {r['loadgen_cpu_util'] or 0:.2f} stream packets {r['stream_packets']:.0f} mesh drops {r['mesh_dropped']:.0f}")
PY
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$work/derp.jsonl" "$work/quic.jsonl" <<'PY'
import json, statistics, sys
for path in sys.argv[1:]:
    rs = [json.loads(l) for l in open(path) if l.strip()]
    def s(k):
        v = sorted(r[k] or 0 for r in rs)
        return f"{statistics.median(v):.3f} ({v[0]:.3f}–{v[-1]:.3f})"
    print(f"{rs[0]['label']}: Gbit/s {s('delivered_gbps')}; p99 µs {s('latency_p99_us')}; relay1 cpu {s('relay1_cpu_util')}; "
          f"relay2 cpu {s('relay2_cpu_util')}; loadgen cpu {s('loadgen_cpu_util')} (n={len(rs)})")
PY
