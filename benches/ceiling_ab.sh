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
# Prints one line per run and a summary per server: delivered packets/s, Gbit/s and server CPU µs
# per packet, median (min–max); the raw JSON lines go to OUT (default: a temporary directory).
# Traffic stays on 127.0.0.1.
set -euo pipefail

runs=${1:-3}
pairs=${2:-100}
size=${3:-100}
flush=${4:-per-packet}
share=${5:-0.5}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin=${BIN_DIR:-$repo/target/release}
loadgen=$bin/loadgen
for b in tailnetd loadgen tcpfwd; do
  [ -x "$bin/$b" ] || { echo "no $bin/$b (cargo build --release --bin tailnetd -p benches --bin loadgen --bin tcpfwd)"; exit 1; }
done
# shellcheck source=benches/ab_common.sh
. "$repo/benches/ab_common.sh"
work=$(mktemp -d)
out=${6:-$work}
mkdir -p "$out"
cg=""
trap ab_cleanup EXIT
[ "$share" != none ] && cg=$(cpu_share_cgroup ceiling "$share")

one_run() { # server label -> prints the loadgen JSON line
  local which=$1 label=$2 url
  case $which in
    tailnetd) start_server "$work" "$cg" "$bin/tailnetd" derp --http-addr 127.0.0.1:0 \
      --stun-addr "" --log warn --metrics-addr "" --key-file "$work/key"
      url="http://$srv_addr/derp" ;;
    tcpfwd) start_server "$work" "$cg" "$bin/tcpfwd" --listen 127.0.0.1:0 --engine tokio
      url=$srv_addr ;;
    tcpfwd-uring) start_server "$work" "$cg" "$bin/tcpfwd" --listen 127.0.0.1:0 --engine uring
      url=$srv_addr ;;
  esac
  # One run is a command substitution, where `set -e` does not hold: a server that did not start
  # ends the run here (and, through the failed assignment, the script) instead of running the
  # load generator against nothing.
  [ -n "$srv_addr" ] || exit 1
  local transport=raw
  [ "$which" = tailnetd ] && transport=derp
  relay_load "$url" "$transport" "$flush" "$pairs" "$size" "$label"
  stop_server
}

servers=(tailnetd tcpfwd tcpfwd-uring)
for s in "${servers[@]}"; do : >"$out/$s.jsonl"; done
echo "cell: $pairs pairs × $size B, flush $flush, server share $share core, $runs runs each"
for i in $(seq 1 "$runs"); do
  for s in "${servers[@]}"; do
    line=$(one_run "$s" "$s")
    echo "$line" >>"$out/$s.jsonl"
    relay_run_line "$s" "$i" "$line"
  done
done

relay_summary "$out" "${servers[@]}"
