#!/usr/bin/env bash
# Database cost of tailnetd replicas: PostgreSQL statements per connect and per node update
# (src/bin/ha_cost.rs), RUNS times, each on a fresh PostgreSQL (pg_stat_statements preloaded)
# with two fresh `tailnetd coordinator` replicas (release build). Prints one JSON line per run.
#
#   benches/ha.sh [RUNS] [CLIENTS] [ROUNDS]
#
# PostgreSQL binaries: $PG_BIN_DIR or the newest /usr/lib/postgresql/*/bin; as root, PostgreSQL
# runs as the `postgres` user.
set -euo pipefail
runs=${1:-3}; clients=${2:-100}; rounds=${3:-10}
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
pg_bin=${PG_BIN_DIR:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
# HA_PROFILE=debug skips the release build: the statement counts do not depend on it (each phase
# is measured after it settled, so nothing depends on timing).
profile=${HA_PROFILE:-release}
if [ "$profile" = release ]; then cargo build --release --locked -q -p tailnetd -p benches --bin tailnetd --bin ha_cost
else cargo build --locked -q -p tailnetd -p benches --bin tailnetd --bin ha_cost; fi
bin="target/$profile"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

agent_id=3c1f2b6e-8d4a-4e57-9b1a-2f6e8c0d4a21
agent_token=9a0c4a53-53c7-4f38-9a3e-0d7c2b7f7c11
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
    "-p $port -k $dir/data -c listen_addresses=127.0.0.1 -c fsync=off -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=top" >/dev/null
  url="postgres://postgres@127.0.0.1:$port/postgres"
  cat >"$dir/replica.toml" <<TOML
[[auth.agents]]
token = "$agent_token"
id = "$agent_id"

[[auth.users]]
token = "$user_token"
agents = "all"
TOML
  addrs=()
  for r in a b; do
    TAILNETD_METRICS_ADDR=127.0.0.1:0 TAILNETD_DERP_MAP_HEALTH_INTERVAL=0s \
      "$bin/tailnetd" coordinator --config "$dir/replica.toml" --http-addr 127.0.0.1:0 \
      --postgres-url "$url" --log warn >"$dir/$r.out" 2>"$dir/$r.err" &
    pids+=($!)
    for _ in $(seq 1 100); do [ -s "$dir/$r.out" ] && break; sleep 0.1; done
    addrs+=("$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["http_addr"])' "$dir/$r.out")")
  done
  "$bin/ha_cost" --pg-url "$url" --a "${addrs[0]}" --b "${addrs[1]}" --agent-id "$agent_id" \
    --agent-token "$agent_token" --user-token "$user_token" --clients "$clients" --rounds "$rounds"
  cleanup; trap - EXIT
done
