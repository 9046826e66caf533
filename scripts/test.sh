#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: formatting and lints, the Rust workspace
# (unit, integration, property and fuzz-corpus tests), and the Go interop suites that drive the
# built tailnetd binary with the real Tailscale and Coder Go code (clients, coderd, agents).
#
# It installs only what the machine lacks (cargo-machete from crates.io, PostgreSQL and Chromium
# from the system's packages when a suite needs them), starts what the tests need, and cleans up
# after itself.
# Nothing is cached outside the clone except what cargo and Go cache by themselves.
#
# Time on two cores is the constraint, so independent work overlaps: Go module downloads and
# the PostgreSQL install (network-bound) start first and run behind the Rust build; the Go test
# binaries compile behind `cargo test`; the Go suites then run two at a time. Every step's wall
# time is printed at the end.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TERM_COLOR=never
export RUST_BACKTRACE=1
# Coder's forks of Go modules are not in the public checksum database.
export GONOSUMDB="${GONOSUMDB:+$GONOSUMDB,}github.com/coder"

logs="$repo/target/test-logs"
mkdir -p "$logs"
started=$(date +%s)
timings=()
step_name=""
step_start=0

finish_step() {
  if [ -n "$step_name" ]; then timings+=("$(printf '%5d s  %s' $(( $(date +%s) - step_start )) "$step_name")"); fi
}
step() {
  finish_step
  step_name="$*"
  step_start=$(date +%s)
  printf '\n==> %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"
}
need() { command -v "$1" >/dev/null 2>&1; }

bg_pids=()
cleanup() {
  for p in "${bg_pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

go_modules=()
if [ -d interop ]; then
  for mod in interop/*/; do [ -f "$mod/go.mod" ] && go_modules+=("${mod%/}"); done
fi

step "toolchain"
need cargo || { echo "cargo is required (https://rustup.rs)"; exit 1; }
cargo --version
if ! rustup component list --installed 2>/dev/null | grep -q '^rustfmt'; then rustup component add rustfmt; fi
if ! rustup component list --installed 2>/dev/null | grep -q '^clippy'; then rustup component add clippy; fi
if [ ${#go_modules[@]} -gt 0 ]; then
  need go || { echo "go is required for the interop suites"; exit 1; }
  go version
fi

# Network-bound preparation, behind the Rust build.
if [ ${#go_modules[@]} -gt 0 ]; then
  step "background: Go module downloads (log: target/test-logs/go-download.log)"
  (
    for mod in "${go_modules[@]}"; do
      echo "== $mod"
      (cd "$mod" && go list -deps -test ./... >/dev/null)
    done
    # interop/acme builds Pebble (the ACME test CA, a tool of its go.mod) in its test; compile
    # it here so that build is a cache hit.
    if [ -d interop/acme ]; then
      echo "== pebble"
      (cd interop/acme && go build -o /dev/null github.com/letsencrypt/pebble/v2/cmd/pebble)
    fi
    # interop/tailscale's mesh tests run Tailscale's derper and derpprobe, which they build with
    # `go install ...@<pinned version>` once per run; fetch and compile them here, behind the
    # Rust build, so that the test's own install finds everything cached.
    if [ -d interop/tailscale ]; then
      echo "== derper, derpprobe"
      ts_version=$(cd interop/tailscale && go list -m -f '{{.Version}}' tailscale.com)
      GOBIN="$logs/gotools" GOFLAGS=-mod=mod go install \
        "tailscale.com/cmd/derper@$ts_version" "tailscale.com/cmd/derpprobe@$ts_version"
    fi
  ) >"$logs/go-download.log" 2>&1 &
  go_download=$!
  bg_pids+=("$go_download")
fi
# interop/coderd runs Coder's own server (and its HA coordinator) on a real PostgreSQL, and the
# coordinator's replica tests (coordinator/tests/it/ha.rs) start a throwaway PostgreSQL server.
needs_postgres=1
pg_bin=""
find_pg() { pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1); [ -n "$pg_bin" ] && [ -x "$pg_bin/postgres" ]; }
if [ "$needs_postgres" = 1 ] && ! find_pg; then
  step "background: install PostgreSQL (apt-get; log: target/test-logs/postgres-install.log)"
  (
    export DEBIAN_FRONTEND=noninteractive
    apt-get update && apt-get install -y --no-install-recommends postgresql
  ) >"$logs/postgres-install.log" 2>&1 &
  pg_install=$!
  bg_pids+=("$pg_install")
fi

# tests/it/operator.rs renders the status page in headless Chromium; here a missing browser is a
# failure, not a skip (TAILNETD_REQUIRE_CHROMIUM). Installed after PostgreSQL's install (one apt
# at a time holds the dpkg lock), behind the Rust build.
find_chromium() { need chromium || need chromium-browser; }
if ! find_chromium; then
  step "background: install Chromium (apt-get; log: target/test-logs/chromium-install.log)"
  (
    export DEBIAN_FRONTEND=noninteractive
    if [ -n "${pg_install:-}" ]; then
      # Not this subshell's child: poll until PostgreSQL's install (and its apt-get update) ends.
      while kill -0 "$pg_install" 2>/dev/null; do sleep 1; done
    else
      apt-get update
    fi
    apt-get install -y --no-install-recommends chromium fonts-dejavu-core
  ) >"$logs/chromium-install.log" 2>&1 &
  chromium_install=$!
  bg_pids+=("$chromium_install")
fi
export TAILNETD_REQUIRE_CHROMIUM=1

step "cargo fmt --check"
cargo fmt --all -- --check

step "shell scripts parse (bash -n)"
for f in scripts/*.sh benches/*.sh deploy/*.sh .ci/run; do
  [ -f "$f" ] && bash -n "$f"
done

step "unused dependencies (cargo-machete)"
if ! need cargo-machete; then cargo install --locked --quiet cargo-machete; fi
cargo machete

step "build (debug, all targets)"
cargo build --workspace --all-targets --locked

step "clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "proto stays pure (no tokio in its dependency tree)"
if cargo tree -p proto -e normal --locked 2>/dev/null | grep -Eq '^[^a-z]*(tokio|mio|socket2) '; then
  echo "proto depends on an I/O runtime:"; cargo tree -p proto -e normal | grep -E 'tokio|mio|socket2'
  exit 1
fi

if [ ${#go_modules[@]} -gt 0 ]; then
  step "gofmt"
  unformatted=$(gofmt -l interop)
  if [ -n "$unformatted" ]; then echo "gofmt -l lists:"; echo "$unformatted"; exit 1; fi
  # Set before the Go test binaries compile: without it their TestMain would build tailnetd
  # itself and wait on cargo's lock behind `cargo test`.
  export TAILNETD_BIN="$repo/target/debug/tailnetd"
  step "background: go vet and compile the Go test binaries (log: target/test-logs/go-compile.log)"
  (
    wait "$go_download" 2>/dev/null || true
    for mod in "${go_modules[@]}"; do
      echo "== $mod"
      (cd "$mod" && go vet ./... && go test -count=1 -run '^$' ./... >/dev/null) || { echo "FAILED: $mod"; exit 1; }
    done
  ) >"$logs/go-compile.log" 2>&1 &
  go_compile=$!
  bg_pids+=("$go_compile")
fi

if [ "$needs_postgres" = 1 ]; then
  if [ -n "${pg_install:-}" ] && ! wait "$pg_install"; then cat "$logs/postgres-install.log"; exit 1; fi
  pg_install=""
  find_pg || { echo "PostgreSQL server binaries not found after install"; exit 1; }
  export PG_BIN_DIR="$pg_bin"
fi

if [ -n "${chromium_install:-}" ] && ! wait "$chromium_install"; then cat "$logs/chromium-install.log"; exit 1; fi
chromium_install=""
find_chromium || { echo "Chromium not found after install"; exit 1; }

step "cargo test (workspace)"
cargo test --workspace --locked

step "benchmark smoke test (compare --quick: every tailnetd workload runs; sanity only, no speed asserted)"
cargo run --locked -q -p benches --bin compare -- --quick

if [ ${#go_modules[@]} -gt 0 ]; then
  step "go vet and Go test binaries compiled"
  if ! wait "$go_compile"; then cat "$logs/go-download.log" "$logs/go-compile.log"; exit 1; fi
  tail -n 20 "$logs/go-compile.log"
  if [ "$needs_postgres" = 1 ]; then
    if [ -n "${pg_install:-}" ] && ! wait "$pg_install"; then cat "$logs/postgres-install.log"; exit 1; fi
    find_pg || { echo "PostgreSQL server binaries not found after install"; exit 1; }
    export PG_BIN_DIR="$pg_bin"
    echo "PostgreSQL: $pg_bin"
  fi

  # The suites, two at a time (each is mostly waiting on loopback I/O and timers).
  step "Go interop suites (two at a time; logs: target/test-logs/go-*.log)"
  running=()
  failed=()
  run_suite() {
    local mod=$1 name
    name=$(basename "$mod")
    (cd "$mod" && go test -count=1 -timeout 20m ./... >"$logs/go-$name.log" 2>&1) &
    running+=("$!:$mod")
  }
  reap_one() {
    local entry pid mod rest=()
    entry=${running[0]}
    pid=${entry%%:*}; mod=${entry#*:}
    if wait "$pid"; then echo "ok    $mod"; else echo "FAIL  $mod"; failed+=("$mod"); fi
    cat "$logs/go-$(basename "$mod").log"
    rest=("${running[@]:1}")
    running=("${rest[@]}")
  }
  for mod in "${go_modules[@]}"; do
    [ ${#running[@]} -ge 2 ] && reap_one
    run_suite "$mod"
  done
  while [ ${#running[@]} -gt 0 ]; do reap_one; done
  if [ ${#failed[@]} -gt 0 ]; then echo "failed Go suites: ${failed[*]}"; exit 1; fi
fi

finish_step
printf '\n==> step times\n'
printf '%s\n' "${timings[@]}"
printf '\n==> done in %d s\n' $(( $(date +%s) - started ))
