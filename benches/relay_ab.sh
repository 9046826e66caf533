#!/usr/bin/env bash
# A/B of two tailnetd relay binaries at one relay cell, runs interleaved (A B A B ...), the same
# load generator for both. For "did this change move the relay?" questions: a refactor should
# leave the two min–max ranges overlapping.
#
#   benches/relay_ab.sh OLD_TAILNETD NEW_TAILNETD [RUNS] [PAIRS] [SIZE]
#
# Defaults: 5 runs each, the headline cell (100 pairs × 1400 B, closed loop with 32 packets in
# flight per pair, as `compare` runs it). The server is pinned to core 0 and the load generator
# to core 1 (taskset), as in `compare`. Needs a release load generator:
#   cargo build --release -p benches --bin loadgen
# Prints one line per run and a summary (min / median / max Gbit/s and server CPU s per
# delivered Gpacket) for each binary. Traffic stays on 127.0.0.1.
set -euo pipefail

a=${1:?usage: relay_ab.sh OLD_TAILNETD NEW_TAILNETD [RUNS] [PAIRS] [SIZE]}
b=${2:?usage: relay_ab.sh OLD_TAILNETD NEW_TAILNETD [RUNS] [PAIRS] [SIZE]}
runs=${3:-5}
pairs=${4:-100}
size=${5:-1400}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
loadgen=${LOADGEN:-$repo/target/release/loadgen}
[ -x "$loadgen" ] || { echo "no load generator at $loadgen (cargo build --release -p benches --bin loadgen)"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${srv:-}" ] && kill "$srv" 2>/dev/null || true' EXIT

one_run() { # bin label -> prints the loadgen JSON line
  local bin=$1 label=$2
  coproc SRV { exec taskset -c 0 "$bin" derp --http-addr 127.0.0.1:0 --stun-addr "" --log warn \
    --key-file "$work/key" 2>"$work/server.log"; }
  srv=$SRV_PID
  local line
  read -r -t 60 line <&"${SRV[0]}" || { echo "server printed nothing" >&2; cat "$work/server.log" >&2; exit 1; }
  local addr
  addr=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["http_addr"])' "$line")
  taskset -c 1 "$loadgen" relay --url "http://$addr/derp" --transport derp --pairs "$pairs" \
    --size "$size" --rate 0 --duration 5 --warmup 1 --window 32 --server-pid "$srv" \
    --label "$label" 2>/dev/null | tail -n 1
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=
}

: >"$work/a.jsonl"; : >"$work/b.jsonl"
for i in $(seq 1 "$runs"); do
  for side in a b; do
    bin=$a; [ "$side" = b ] && bin=$b
    out=$(one_run "$bin" "$side")
    echo "$out" >>"$work/$side.jsonl"
    python3 - "$side" "$i" "$out" <<'EOF'
import json, sys
side, i, r = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(f"run {i} {side}: {r['delivered_gbps']:.3f} Gbit/s, {r['delivered_pps']:.0f} pkt/s, "
      f"server cpu {r['server_cpu_util'] or 0:.2f} core, load generator {r['loadgen_cpu_util'] or 0:.2f} core, "
      f"stalls {r['window_stalls']}, loss {r['loss']:.4f}")
EOF
  done
done

python3 - "$work/a.jsonl" "$work/b.jsonl" "$a" "$b" <<'EOF'
import json, statistics, sys
for path, name, bin in ((sys.argv[1], "A", sys.argv[3]), (sys.argv[2], "B", sys.argv[4])):
    rs = [json.loads(l) for l in open(path) if l.strip()]
    g = sorted(r["delivered_gbps"] for r in rs)
    us = sorted(1e6 * (r["server_cpu_s"] or 0) / max(r["received_window"], 1) for r in rs)
    print(f"{name} {bin}: Gbit/s min {g[0]:.3f} median {statistics.median(g):.3f} max {g[-1]:.3f}; "
          f"server CPU µs per delivered packet min {us[0]:.2f} median {statistics.median(us):.2f} max {us[-1]:.2f} (n={len(rs)})")
EOF
