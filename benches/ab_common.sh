# Shared by the scripts that measure one cell at a time by hand (sourced, not run): relay_ab.sh,
# ceiling_ab.sh, coord_ab.sh and coord-crosscheck.sh. `compare` does the same in Rust for whole
# tables; these keep its conventions: the server pinned to core 0, the load generator to core 1,
# a CPU share as `CpuShare` in src/capacity.rs, the relay cell as `compare` runs it.
#
#   cpu_share_cgroup TAG SHARE     creates a CPU cgroup held to SHARE of one core (cgroup v2's
#                                  cpu.max, else v1's CFS quota) and prints its path
#   start_server DIR CGROUP CMD... starts CMD pinned to core 0, in CGROUP unless it is "", with
#                                  stdout in DIR/server.out and stderr in DIR/server.log; waits
#                                  for its start-up line and sets `srv` (its pid) and `srv_addr`
#                                  (its "http_addr")
#   stop_server                    ends `srv`
#   ab_cleanup                     for an EXIT trap: ends `srv`, removes the cgroup `cg` and the
#                                  directory `work` (any of them may be unset or empty)
#   relay_load URL TRANSPORT FLUSH PAIRS SIZE LABEL
#                                  runs `loadgen relay` ($loadgen) on core 1 against `srv`: closed
#                                  loop, 32 packets in flight per pair, 1 s warm-up, 5 s measured;
#                                  prints its JSON line
#   relay_run_line NAME RUN JSON   prints one run's line: packets/s, Gbit/s, CPU of both sides,
#                                  write-offs, loss
#   relay_summary DIR NAME...      for each NAME, the runs in DIR/NAME.jsonl: packets/s, Gbit/s
#                                  and server CPU µs per packet as median (min–max), write-offs

cpu_share_cgroup() {
  local cg quota
  quota=$(python3 -c "print(round($2 * 100000))")
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    cg="/sys/fs/cgroup/tailnetd-$1-$$"
    mkdir "$cg"
    echo "$quota 100000" > "$cg/cpu.max"
  else
    cg="/sys/fs/cgroup/cpu/tailnetd-$1-$$"
    mkdir "$cg"
    echo 100000 > "$cg/cpu.cfs_period_us"
    echo "$quota" > "$cg/cpu.cfs_quota_us"
  fi
  echo "$cg"
}

start_server() {
  local dir=$1 cgroup=$2
  shift 2
  : > "$dir/server.out"
  if [ -n "$cgroup" ]; then
    sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$cgroup" taskset -c 0 "$@" \
      > "$dir/server.out" 2> "$dir/server.log" &
  else
    taskset -c 0 "$@" > "$dir/server.out" 2> "$dir/server.log" &
  fi
  srv=$!
  srv_addr=""
  for _ in $(seq 600); do
    srv_addr="$(grep -o '"http_addr":"[^"]*"' "$dir/server.out" 2>/dev/null | cut -d'"' -f4 || true)"
    [ -n "$srv_addr" ] && return 0
    kill -0 "$srv" 2>/dev/null || break
    sleep 0.1
  done
  echo "server did not start ($*): $(cat "$dir/server.log")" >&2
  return 1
}

stop_server() {
  [ -n "${srv:-}" ] || return 0
  kill "$srv" 2>/dev/null || true
  wait "$srv" 2>/dev/null || true
  srv=""
}

ab_cleanup() {
  stop_server
  [ -n "${cg:-}" ] && rmdir "$cg" 2>/dev/null || true
  [ -n "${work:-}" ] && rm -rf "$work" || true
}

relay_load() {
  taskset -c 1 "$loadgen" relay --url "$1" --transport "$2" --flush "$3" --pairs "$4" \
    --size "$5" --rate 0 --duration 5 --warmup 1 --window 32 --server-pid "$srv" \
    --label "$6" 2>/dev/null | tail -n 1
}

relay_run_line() {
  python3 - "$@" <<'PY'
import json, sys
name, run, r = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(f"run {run} {name:13}: {r['delivered_pps']:>10,.0f} pkt/s, {r['delivered_gbps']:.3f} Gbit/s, "
      f"server {r['server_cpu_util'] or 0:.2f} core ({r['server_cpu_us_per_packet'] or 0:.2f} µs/pkt), "
      f"load generator {r['loadgen_cpu_util'] or 0:.2f} core, write-offs {r['window_stalls']}, "
      f"loss {r['loss']:.4f}")
PY
}

relay_summary() {
  python3 - "$@" <<'PY'
import json, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
def spread(v, f):
    return f"{f(statistics.median(v))} ({f(min(v))}–{f(max(v))})"
for name in names:
    rs = [json.loads(l) for l in open(f"{out}/{name}.jsonl") if l.strip()]
    if not rs:
        print(f"{name:13} no runs")
        continue
    pps = [r["delivered_pps"] for r in rs]
    gbps = [r["delivered_gbps"] for r in rs]
    us = [r["server_cpu_us_per_packet"] or 0 for r in rs]
    print(f"{name:13} pkt/s {spread(pps, lambda v: f'{v:,.0f}')}   "
          f"Gbit/s {spread(gbps, lambda v: f'{v:.3f}')}   "
          f"server µs/pkt {spread(us, lambda v: f'{v:.2f}')}   "
          f"write-offs {sum(r['window_stalls'] for r in rs)}   (n={len(rs)})")
PY
}
