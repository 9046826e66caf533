#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: formatting and lints, the Rust workspace
# (unit, integration, property and fuzz-corpus tests), and the Go interop suites that drive the
# built tailnetd binary with the real Tailscale (and Coder) Go clients.
#
# It installs only what the machine lacks, starts what the tests need, and cleans up after itself.
# Nothing is cached outside the clone except what cargo and Go cache by themselves.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TERM_COLOR=never
export RUST_BACKTRACE=1

step() { printf '\n==> %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
need() { command -v "$1" >/dev/null 2>&1; }

started=$(date +%s)

step "toolchain"
need cargo || { echo "cargo is required (https://rustup.rs)"; exit 1; }
cargo --version
if ! rustup component list --installed 2>/dev/null | grep -q '^rustfmt'; then rustup component add rustfmt; fi
if ! rustup component list --installed 2>/dev/null | grep -q '^clippy'; then rustup component add clippy; fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "build (debug, all targets)"
cargo build --workspace --all-targets --locked

step "clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "proto stays pure (no tokio in its dependency tree)"
if cargo tree -p proto -e normal --locked 2>/dev/null | grep -Eq '^[^a-z]*(tokio|mio|socket2) '; then
  echo "proto depends on an I/O runtime:"; cargo tree -p proto -e normal | grep -E 'tokio|mio|socket2'
  exit 1
fi

step "cargo test (workspace)"
cargo test --workspace --locked

step "benchmark smoke test (compare --quick: every tailnetd workload runs and reports; no speed asserted)"
cargo run --locked -q -p benches --bin compare -- --quick

if [ -d interop ] && ls interop/*/go.mod >/dev/null 2>&1; then
  need go || { echo "go is required for the interop suites"; exit 1; }
  export TAILNETD_BIN="$repo/target/debug/tailnetd"
  step "gofmt"
  unformatted=$(gofmt -l interop)
  if [ -n "$unformatted" ]; then echo "gofmt -l lists:"; echo "$unformatted"; exit 1; fi
  for mod in interop/*/; do
    [ -f "$mod/go.mod" ] || continue
    step "go test ./... in $mod"
    (cd "$mod" && go vet ./... && go test -count=1 -timeout 20m ./...)
  done
fi

step "done in $(( $(date +%s) - started )) s"
