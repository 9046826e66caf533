# Shared by the coordinator benchmark scripts (sourced, not run).
#
#   quarter_core_cgroup TAG   creates a CPU cgroup held to 0.25 core (v2 or v1) and prints its path
#   write_coord_auth DIR N    writes DIR/auth.json (for the load generators) and DIR/coord.toml
#                             (tailnetd's static auth) for N agents and one user allowed all

quarter_core_cgroup() {
  local cg
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    cg="/sys/fs/cgroup/tailnetd-$1-$$"
    mkdir "$cg"
    echo "25000 100000" > "$cg/cpu.max"
  else
    cg="/sys/fs/cgroup/cpu/tailnetd-$1-$$"
    mkdir "$cg"
    echo 100000 > "$cg/cpu.cfs_period_us"
    echo 25000 > "$cg/cpu.cfs_quota_us"
  fi
  echo "$cg"
}

write_coord_auth() {
  python3 - "$1" "$2" <<'PY'
import json, sys, uuid
work, n = sys.argv[1], int(sys.argv[2])
agents = [{"id": str(uuid.uuid4()), "token": str(uuid.uuid4())} for _ in range(n)]
token = "bench-" + uuid.uuid4().hex
json.dump({"agents": agents, "client_token": token}, open(f"{work}/auth.json", "w"))
with open(f"{work}/coord.toml", "w") as f:
    f.write("[auth]\n")
    for a in agents:
        f.write(f'[[auth.agents]]\ntoken = "{a["token"]}"\nid = "{a["id"]}"\n')
    f.write(f'[[auth.users]]\ntoken = "{token}"\nagents = "all"\n')
PY
}
