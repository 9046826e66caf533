#!/usr/bin/env bash
# A/B of two tailnetd relay binaries at one relay cell, runs interleaved (A B A B ...), the same
# load generator for both. For "did this change move the relay?" questions: a refactor should
# leave the two min–max ranges overlapping.
#
#   benches/relay_ab.sh OLD_TAILNETD NEW_TAILNETD [RUNS] [PAIRS] [SIZE] [FLUSH]
#
# Defaults: 5 runs each, the headline cell (100 pairs × 1400 B, `batched` flush, closed loop with
# 32 packets in flight per pair, as `compare` runs it). The server is pinned to core 0 and the
# load generator to core 1 (taskset), as in `compare`. Needs a release load generator:
#   cargo build --release -p benches --bin loadgen
# Prints one line per run and a summary per binary: packets/s, Gbit/s and server CPU µs per
# packet, median (min–max). Traffic stays on 127.0.0.1.
set -euo pipefail

usage="usage: relay_ab.sh OLD_TAILNETD NEW_TAILNETD [RUNS] [PAIRS] [SIZE] [FLUSH]"
a=${1:?$usage}
b=${2:?$usage}
runs=${3:-5}
pairs=${4:-100}
size=${5:-1400}
flush=${6:-batched}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
loadgen=${LOADGEN:-$repo/target/release/loadgen}
[ -x "$loadgen" ] || { echo "no load generator at $loadgen (cargo build --release -p benches --bin loadgen)"; exit 1; }
# shellcheck source=benches/ab_common.sh
. "$repo/benches/ab_common.sh"
work=$(mktemp -d)
trap ab_cleanup EXIT

: >"$work/A.jsonl"; : >"$work/B.jsonl"
for i in $(seq 1 "$runs"); do
  for side in A B; do
    bin=$a; [ "$side" = B ] && bin=$b
    start_server "$work" "" "$bin" derp --http-addr 127.0.0.1:0 --stun-addr "" --log warn \
      --metrics-addr "" --key-file "$work/key"
    line=$(relay_load "http://$srv_addr/derp" derp "$flush" "$pairs" "$size" "$side")
    stop_server
    echo "$line" >>"$work/$side.jsonl"
    relay_run_line "$side" "$i" "$line"
  done
done

echo "A = $a"
echo "B = $b"
relay_summary "$work" A B
