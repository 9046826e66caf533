#!/usr/bin/env bash
# Is the forwarder a ceiling? tailnetd's relay against the TCP forwarder's two engines (`tcpfwd
# --engine tokio` and `--engine uring`) at one relay cell, runs interleaved (T F U T F U ...), the
# same load generator for all three, optionally with the server held to a CPU share by a cgroup so
# that the server, not the load generator, is the limit.
#
#   benches/ceiling_ab.sh [RUNS] [PAIRS] [SIZE] [FLUSH] [SHARE] [OUT]
#
# Defaults: 3 runs, 100 pairs × 100 B, `per-packet` flush (one frame per write, Tailscale's
# client's shape; `batched` is the load generator's 32-packet writes), SHARE 0.5 core (`none`: no
# cgroup). Closed loop, 32 packets in flight per pair, as `compare` runs the relay cells. Server
# pinned to core 0, load generator to core 1. Needs release binaries:
#   cargo build --release --bin tailnetd -p benches --bin loadgen --bin tcpfwd
# Prints one line per run and a summary per server: delivered packets/s and server CPU µs per
# packet, median (min–max); the raw JSON lines go to OUT (default: a temporary directory).
# Traffic stays on 127.0.0.1.
set -euo pipefail

runs=${1:-3}
pairs=${2:-100}
size=${3:-100}
flush=${4:-per-packet}
share=${5:-0.5}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin=${BIN_DIR:-$repo/target/release}
for b in tailnetd loadgen tcpfwd; do
  [ -x "$bin/$b" ] || { echo "no $bin/$b (cargo build --release --bin tailnetd -p benches --bin loadgen --bin tcpfwd)"; exit 1; }
done
work=$(mktemp -d)
out=${6:-$work}
mkdir -p "$out"
cg=""
cleanup() {
  [ -n "${srv:-}" ] && kill "$srv" 2>/dev/null || true
  [ -n "$cg" ] && rmdir "$cg" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if [ "$share" != none ]; then
  # As `CpuShare` in src/capacity.rs: cgroup v2's cpu.max, else v1's CFS quota.
  quota=$(python3 -c "print(round($share * 100000))")
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    cg=/sys/fs/cgroup/tailnetd-ceiling-$$
    mkdir "$cg"
    echo "$quota 100000" >"$cg/cpu.max"
  else
    cg=/sys/fs/cgroup/cpu/tailnetd-ceiling-$$
    mkdir "$cg"
    echo 100000 >"$cg/cpu.cfs_period_us"
    echo "$quota" >"$cg/cpu.cfs_quota_us"
  fi
fi

one_run() { # server label -> prints the loadgen JSON line
  local which=$1 label=$2 cmd transport url line addr
  case $which in
    tailnetd) cmd=("$bin/tailnetd" derp --http-addr 127.0.0.1:0 --stun-addr "" --log warn \
      --metrics-addr "" --key-file "$work/key"); transport=derp ;;
    tcpfwd) cmd=("$bin/tcpfwd" --listen 127.0.0.1:0 --engine tokio); transport=raw ;;
    tcpfwd-uring) cmd=("$bin/tcpfwd" --listen 127.0.0.1:0 --engine uring); transport=raw ;;
  esac
  if [ -n "$cg" ]; then
    coproc SRV { exec sh -c 'echo $$ >"$1/cgroup.procs" && shift && exec taskset -c 0 "$@"' sh "$cg" \
      "${cmd[@]}" 2>"$work/server.log"; }
  else
    coproc SRV { exec taskset -c 0 "${cmd[@]}" 2>"$work/server.log"; }
  fi
  srv=$SRV_PID
  read -r -t 60 line <&"${SRV[0]}" || { echo "server printed nothing" >&2; cat "$work/server.log" >&2; exit 1; }
  addr=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["http_addr"])' "$line")
  url=$addr; [ "$transport" = derp ] && url="http://$addr/derp"
  taskset -c 1 "$bin/loadgen" relay --url "$url" --transport "$transport" --flush "$flush" \
    --pairs "$pairs" --size "$size" --rate 0 --duration 5 --warmup 1 --window 32 \
    --server-pid "$srv" --label "$label" 2>/dev/null | tail -n 1
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=
}

servers=(tailnetd tcpfwd tcpfwd-uring)
for s in "${servers[@]}"; do : >"$out/$s.jsonl"; done
echo "cell: $pairs pairs × $size B, flush $flush, server share $share core, $runs runs each"
for i in $(seq 1 "$runs"); do
  for s in "${servers[@]}"; do
    line=$(one_run "$s" "$s")
    echo "$line" >>"$out/$s.jsonl"
    python3 - "$s" "$i" "$line" <<'EOF'
import json, sys
s, i, r = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(f"run {i} {s:13}: {r['delivered_pps']:>10,.0f} pkt/s, server {r['server_cpu_util'] or 0:.2f} core "
      f"({r['server_cpu_us_per_packet'] or 0:.2f} µs/pkt), load generator {r['loadgen_cpu_util'] or 0:.2f} core, "
      f"stalls {r['window_stalls']}, loss {r['loss']:.4f}")
EOF
  done
done

python3 - "$out" "${servers[@]}" <<'EOF'
import json, statistics, sys
out, servers = sys.argv[1], sys.argv[2:]
def spread(v):
    return f"{statistics.median(v):,.2f} ({min(v):,.2f}–{max(v):,.2f})"
for s in servers:
    rs = [json.loads(l) for l in open(f"{out}/{s}.jsonl") if l.strip()]
    pps = [r["delivered_pps"] for r in rs]
    us = [r["server_cpu_us_per_packet"] or 0 for r in rs]
    stalls = sum(r["window_stalls"] for r in rs)
    print(f"{s:13} pkt/s {spread(pps)}   server µs/pkt {spread(us)}   stalls {stalls}")
EOF
