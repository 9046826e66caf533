#!/usr/bin/env bash
# Delivered node updates/s through one `tailnetd coordinator` replica against two, each replica
# held to the same CPU share by a cgroup, on one fresh PostgreSQL per run. The load generator
# (`loadgen coordinator --vary-node`: every update changes the node, so every one is a database
# write) runs outside the cgroups.
#
#   benches/ha_throughput.sh MODE [RUNS] [RATE] [QUOTA_US]
#
# MODE: one   — 1 replica; 10 agents × 10 clients on it
#       split — 2 replicas; agents 0–4 and their clients on A, agents 5–9 and theirs on B
#       cross — 2 replicas; every agent on A, every client on B (all updates cross PostgreSQL)
# RATE: update_self/s per peer (agents and clients); QUOTA_US: CPU µs per 100 ms period per
# replica (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us). One JSON line per loadgen per run.
set -euo pipefail
mode=$1; runs=${2:-3}; rate=${3:-20}; quota=${4:-50000}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
pg_bin=${PG_BIN_DIR:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
cargo build --release --locked -q -p tailnetd -p benches --bin tailnetd --bin loadgen
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A cgroup per replica with `quota` µs of CPU per 100 ms.
make_cgroup() {
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    local g=/sys/fs/cgroup/tailnetd-ha-$1
    mkdir -p "$g"; echo "$quota 100000" >"$g/cpu.max"
  else
    local g=/sys/fs/cgroup/cpu/tailnetd-ha-$1
    mkdir -p "$g"; echo 100000 >"$g/cpu.cfs_period_us"; echo "$quota" >"$g/cpu.cfs_quota_us"
  fi
  echo "$g"
}

python3 - >"/tmp/ha-tp-agents.json" <<'PY'
import json, uuid
print(json.dumps([{"id": str(uuid.UUID(int=0x3c1f0000000040008000000000000000 + i)),
                   "token": str(uuid.UUID(int=0x9a0c0000000040008000000000000000 + i))} for i in range(10)]))
PY
user_token=abcdefghij-0123456789012345678901

for run in $(seq 1 "$runs"); do
  dir=$(mktemp -d); pids=()
  cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
              as_pg "$pg_bin/pg_ctl" -D "$dir/data" stop -m immediate >/dev/null 2>&1 || true; rm -rf "$dir"; }
  trap cleanup EXIT
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
  as_pg "$pg_bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
  port=$(free_port)
  as_pg "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/data/log" -w start -o \
    "-p $port -k $dir/data -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off" >/dev/null
  url="postgres://postgres@127.0.0.1:$port/postgres"
  python3 - "$dir" "$user_token" <<'PY'
import json, sys
d, tok = sys.argv[1], sys.argv[2]
agents = json.load(open("/tmp/ha-tp-agents.json"))
with open(f"{d}/replica.toml", "w") as f:
    for a in agents:
        f.write(f'[[auth.agents]]\ntoken = "{a["token"]}"\nid = "{a["id"]}"\n\n')
    f.write(f'[[auth.users]]\ntoken = "{tok}"\nagents = "all"\n')
for name, part in (("all", agents), ("low", agents[:5]), ("high", agents[5:])):
    json.dump({"agents": part, "client_token": tok}, open(f"{d}/auth-{name}.json", "w"))
PY
  n=1; [ "$mode" != one ] && n=2
  addrs=(); rpids=()
  for r in $(seq 1 "$n"); do
    g=$(make_cgroup "$r")
    sh -c 'echo $$ >"$1/cgroup.procs"; shift; exec "$@"' _ "$g" \
      env TAILNETD_METRICS_ADDR=127.0.0.1:0 TAILNETD_DERP_MAP_HEALTH_INTERVAL=0s \
      target/release/tailnetd coordinator --config "$dir/replica.toml" --http-addr 127.0.0.1:0 \
      --postgres-url "$url" --log warn >"$dir/$r.out" 2>"$dir/$r.err" &
    pids+=($!); rpids+=($!)
    for _ in $(seq 1 100); do [ -s "$dir/$r.out" ] && break; sleep 0.1; done
    addrs+=("http://$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["http_addr"])' "$dir/$r.out")")
  done
  common=(coordinator --clients-per-agent 10 --rate "$rate" --agent-rate "$rate" --vary-node --duration 10 --warmup 2)
  case "$mode" in
    one)   target/release/loadgen "${common[@]}" --url "${addrs[0]}" --auth-file "$dir/auth-all.json" --agents 10 --server-pid "${rpids[0]}" --label "one" ;;
    cross) target/release/loadgen "${common[@]}" --url "${addrs[0]}" --client-url "${addrs[1]}" --auth-file "$dir/auth-all.json" --agents 10 --label "cross" ;;
    split) target/release/loadgen "${common[@]}" --url "${addrs[0]}" --auth-file "$dir/auth-low.json" --agents 5 --server-pid "${rpids[0]}" --label "split-a" &
           lg=$!
           target/release/loadgen "${common[@]}" --url "${addrs[1]}" --auth-file "$dir/auth-high.json" --agents 5 --server-pid "${rpids[1]}" --label "split-b"
           wait "$lg" ;;
    *) echo "unknown mode $mode"; exit 2 ;;
  esac
  cleanup; trap - EXIT
done
