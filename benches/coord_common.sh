# Shared by the coordinator benchmark scripts (sourced, not run; the server and cgroup helpers
# are in ab_common.sh).
#
#   write_coord_auth DIR N    writes DIR/auth.json (for the load generators) and DIR/coord.toml
#                             (tailnetd's static auth) for N agents and one user allowed all

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
