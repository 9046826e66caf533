#!/usr/bin/env bash
# A/B of two tailnetd coordinator binaries, runs interleaved (A B A B ...), the same release load
# generator for both. For "did this change move the coordinator?" questions (issue 17).
#
#   benches/coord_ab.sh OLD_TAILNETD NEW_TAILNETD [RUNS] [OUT_JSONL]
#
# Cells (every peer sends update_self at the rate shown, the scheduled send time stamped):
#   quarter-1, quarter-7.5  10 agents x 100 clients, server in a CPU cgroup at 0.25 core: the
#                           loads where `compare --only coord-cap` takes the capacity ratio
#                           (about the Go coordinator's capacity and about tailnetd's)
#   free-3, free-12         10 x 100, server pinned to core 0 without a quota: 6,000 and 24,000
#                           updates/s delivered (server CPU per update when it is not the limit)
#   idle-0.1                40 agents x 50 clients at 0.1 update/s: RSS growth per connected peer
# The server is pinned to core 0 and the load generator to core 1 (taskset). Default 3 runs per
# binary and cell. Appends every run's JSON line (with ab_label, ab_cell, ab_run) to OUT_JSONL
# (default: a temporary file) and prints a table of medians (min–max): server CPU µs per
# delivered update, delivered updates/s, fan-out p99, RSS per peer, failed streams. Needs
#   cargo build --release -p benches --bin loadgen
# CELLS="free-12 idle-0.1" runs only those cells. Traffic stays on 127.0.0.1. Not part of the
# test command.
set -euo pipefail

a=${1:?usage: coord_ab.sh OLD_TAILNETD NEW_TAILNETD [RUNS] [OUT_JSONL]}
b=${2:?usage: coord_ab.sh OLD_TAILNETD NEW_TAILNETD [RUNS] [OUT_JSONL]}
runs=${3:-3}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
loadgen=${LOADGEN:-$repo/target/release/loadgen}
[ -x "$loadgen" ] || { echo "no load generator at $loadgen (cargo build --release -p benches --bin loadgen)" >&2; exit 1; }
# shellcheck source=benches/ab_common.sh
. "$repo/benches/ab_common.sh"
# shellcheck source=benches/coord_common.sh
. "$repo/benches/coord_common.sh"
work=$(mktemp -d)
out=${4:-$work/ab.jsonl}
cg=""
srv=""
trap ab_cleanup EXIT
cg="$(cpu_share_cgroup coordab 0.25)"

write_coord_auth "$work" 40

one_run() { # bin label cell run -> appends the loadgen JSON line to $out
  local bin=$1 label=$2 cell=$3 run=$4 mode rate agents clients held=""
  mode=${cell%-*}
  rate=${cell#*-}
  agents=10 clients=100
  [ "$mode" = idle ] && agents=40 clients=50
  [ "$mode" = quarter ] && held=$cg
  start_server "$work" "$held" "$bin" coordinator --http-addr 127.0.0.1:0 --log warn \
    --metrics-addr "" --coordinator-max-sessions-per-user 100000 --config "$work/coord.toml"
  local line warmup=1
  [ "$mode" = idle ] && warmup=2
  line=$(taskset -c 1 "$loadgen" coordinator --url "http://$srv_addr" --auth-file "$work/auth.json" \
    --agents "$agents" --clients-per-agent "$clients" --rate "$rate" --agent-rate "$rate" \
    --duration 5 --warmup "$warmup" --server-pid "$srv" --threads 1 2>/dev/null | tail -n 1)
  stop_server
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(ab_label=sys.argv[2], ab_cell=sys.argv[3], ab_run=int(sys.argv[4])); print(json.dumps(r))' \
    "$line" "$label" "$cell" "$run" >> "$out"
}

for cell in ${CELLS:-quarter-1 quarter-7.5 free-3 free-12 idle-0.1}; do
  for run in $(seq "$runs"); do
    echo "coord_ab: $cell run $run/$runs" >&2
    one_run "$a" A "$cell" "$run"
    one_run "$b" B "$cell" "$run"
  done
done

python3 - "$out" "$a" "$b" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"A = {sys.argv[2]}\nB = {sys.argv[3]}")
def cell(vals, fmt):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    return f"{fmt(statistics.median(vals))} ({fmt(min(vals))}–{fmt(max(vals))})"
def us(r):
    d = r.get("delivered_updates_per_s")
    return r["server_cpu_util"] * 1e6 / d if d else None
print("| cell | build | server CPU µs per update | delivered/s | fan-out p99 ms | RSS per peer B | failed streams |")
print("|---|---|---|---|---|---|---|")
cells = []
for r in rows:
    if r["ab_cell"] not in cells:
        cells.append(r["ab_cell"])
for c in cells:
    for label in ("A", "B"):
        rs = [r for r in rows if r["ab_cell"] == c and r["ab_label"] == label]
        print(f"| {c} | {label} | {cell([us(r) for r in rs], lambda v: f'{v:.1f}')} "
              f"| {cell([r.get('delivered_updates_per_s') for r in rs], lambda v: f'{v:,.0f}')} "
              f"| {cell([r.get('fanout_p99_ms') for r in rs], lambda v: f'{v:.2f}')} "
              f"| {cell([r.get('rss_per_peer_bytes') for r in rs], lambda v: f'{v:,.0f}')} "
              f"| {sum(r.get('failed_streams', 0) for r in rs)} |")
PY
