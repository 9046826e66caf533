#!/usr/bin/env bash
# Cross-check of the coordinator load generator's lean client against Coder's own Go client
# (issue 17): the same workload (A agents x C clients, every peer sending update_self at a fixed
# rate, the scheduled send time in the node's as_of) from `loadgen coordinator` (the lean Rust
# client `compare` uses) and from `interop/gocoord/coordload` (codersdk's stack: coder/websocket,
# tailnet.NewDRPCClient, the Coordinate stream), against the same server held to the same CPU
# share, at the loads where `compare`'s capacity ratio is taken. If the lean client made the
# servers' work easier or harder than Coder's client does, the server's CPU per delivered update
# (and the deliveries and latencies) would differ between the two rows of a case.
#
#   benches/coord-crosscheck.sh [--no-build] [--runs N] [--out DIR]
#
# Cases (10 agents x 100 clients, server in a CPU cgroup at 0.25 core like `compare --only
# coord-cap`): tailnetd at 1 update/s per peer (about the Go coordinator's capacity) and at 7.5
# (about tailnetd's), the Go coordinator (interop/gocoord) at 1. Server pinned to core 0, client
# to core 1, the clients alternating within each case. Writes DIR/crosscheck.jsonl (every run)
# and DIR/crosscheck.md (medians with min-max). Not part of the test command.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
build=1
runs=3
out="benches/results/coord-crosscheck"
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) build=0; shift ;;
    --runs) runs="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

target="${CARGO_TARGET_DIR:-$repo/target}"
gobin="$target/gobin"
if [ "$build" = 1 ]; then
  cargo build --release --locked -p tailnetd --bin tailnetd -p benches --bin loadgen
  mkdir -p "$gobin"
  (cd interop/gocoord && go build -o "$gobin/gocoord" . && go build -o "$gobin/coordload" ./coordload)
fi
tailnetd="$target/release/tailnetd"
loadgen="$target/release/loadgen"
for b in "$tailnetd" "$loadgen" "$gobin/gocoord" "$gobin/coordload"; do
  [ -x "$b" ] || { echo "missing $b (run without --no-build)" >&2; exit 1; }
done

mkdir -p "$out"
work="$(mktemp -d)"
cg=""
cleanup() {
  pkill -P $$ 2>/dev/null || true
  [ -n "$cg" ] && rmdir "$cg" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The CPU cgroup the server runs in: 0.25 core (quota per 100 ms period), v2 or v1.
# shellcheck source=benches/coord_common.sh
. "$repo/benches/coord_common.sh"
cg="$(quarter_core_cgroup xcheck)"

agents=10
clients=100
write_coord_auth "$work" "$agents"

# Starts a server in the cgroup, pinned to core 0; sets $srv_pid and $srv_addr.
start_server() {
  local which="$1" log="$work/server.log"
  : > "$work/server.out"
  if [ "$which" = tailnetd ]; then
    sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$cg" taskset -c 0 "$tailnetd" \
      coordinator --http-addr 127.0.0.1:0 --log warn --metrics-addr "" \
      --coordinator-max-sessions-per-user 100000 --config "$work/coord.toml" \
      > "$work/server.out" 2> "$log" &
  else
    sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$cg" taskset -c 0 "$gobin/gocoord" \
      -addr 127.0.0.1:0 > "$work/server.out" 2> "$log" &
  fi
  srv_pid=$!
  for _ in $(seq 100); do
    srv_addr="$(grep -o '"http_addr":"[^"]*"' "$work/server.out" 2>/dev/null | cut -d'"' -f4 || true)"
    [ -n "$srv_addr" ] && return 0
    sleep 0.1
  done
  echo "server $which did not start: $(cat "$log")" >&2
  return 1
}

stop_server() {
  kill "$srv_pid" 2>/dev/null || true
  wait "$srv_pid" 2>/dev/null || true
}

results="$out/crosscheck.jsonl"
: > "$results"
for case in "tailnetd 1" "tailnetd 7.5" "gocoord 1"; do
  set -- $case
  server="$1" rate="$2"
  for run in $(seq "$runs"); do
    for client in lean coder-go; do
      echo "crosscheck: $server rate $rate, $client, run $run/$runs" >&2
      start_server "$server"
      if [ "$client" = lean ]; then
        line="$(taskset -c 1 "$loadgen" coordinator --url "http://$srv_addr" --flavor "$server" \
          --auth-file "$work/auth.json" --agents "$agents" --clients-per-agent "$clients" \
          --rate "$rate" --agent-rate "$rate" --duration 5 --warmup 1 --server-pid "$srv_pid" \
          | tail -n 1)"
      else
        line="$(taskset -c 1 "$gobin/coordload" -url "http://$srv_addr" -flavor "$server" \
          -auth-file "$work/auth.json" -agents "$agents" -clients-per-agent "$clients" \
          -rate "$rate" -agent-rate "$rate" -duration 5 -warmup 1 -server-pid "$srv_pid" \
          | tail -n 1)"
      fi
      stop_server
      python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(xc_server=sys.argv[2], xc_rate=float(sys.argv[3]), xc_client=sys.argv[4], xc_run=int(sys.argv[5])); print(json.dumps(r))' \
        "$line" "$server" "$rate" "$client" "$run" >> "$results"
    done
  done
done

python3 - "$results" "$out/crosscheck.md" "$runs" "$(git describe --always --dirty)" <<'PY'
import json, statistics, sys
path, md, runs, commit = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
rows = [json.loads(l) for l in open(path)]
def cell(vals, fmt):
    if not vals:
        return "–"
    return f"{fmt(statistics.median(vals))} ({fmt(min(vals))}–{fmt(max(vals))})"
def us(r):
    return r["server_cpu_util"] * 1e6 / r["delivered_updates_per_s"] if r.get("delivered_updates_per_s") else None
lines = [
    "# Coordinator load: the lean client against Coder's Go client",
    "",
    f"Generated by `benches/coord-crosscheck.sh` at commit {commit}: 10 agents × 100 clients, every peer at the rate shown, "
    "server in a CPU cgroup at 0.25 core pinned to core 0, client pinned to core 1, 1 s warm-up and a 5 s window, "
    f"{runs} runs per row with the two clients alternating. `lean` is `loadgen coordinator` (the client `compare` uses); "
    "`coder-go` is `interop/gocoord/coordload` (codersdk's stack: coder/websocket, `tailnet.NewDRPCClient`, the Coordinate stream). "
    "Medians (min–max).",
    "",
    "| server | rate per peer | offered updates/s | client | delivered updates/s | fan-out p99 ms | to-agent p99 ms | server CPU µs per update | client CPU (core) | failed streams |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
order = []
for r in rows:
    k = (r["xc_server"], r["xc_rate"], r["xc_client"])
    if k not in order:
        order.append(k)
for k in order:
    rs = [r for r in rows if (r["xc_server"], r["xc_rate"], r["xc_client"]) == k]
    name = "tailnetd" if k[0] == "tailnetd" else "Go coordinator"
    lines.append(
        f"| {name} | {k[1]:g} | {rs[0]['offered_deliveries_per_s']:,.0f} | {k[2]} "
        f"| {cell([r['delivered_updates_per_s'] for r in rs], lambda v: f'{v:,.0f}')} "
        f"| {cell([r['fanout_p99_ms'] for r in rs], lambda v: f'{v:.1f}')} "
        f"| {cell([r['to_agent_p99_ms'] for r in rs], lambda v: f'{v:.1f}')} "
        f"| {cell([v for v in map(us, rs) if v is not None], lambda v: f'{v:.1f}')} "
        f"| {cell([r['loadgen_cpu_util'] for r in rs], lambda v: f'{v:.2f}')} "
        f"| {sum(r['failed_streams'] for r in rs)} |"
    )
open(md, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
