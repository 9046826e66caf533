#!/usr/bin/env bash
# Issue 14's memory attacks against `tailnetd dev` (release build), one fresh process per attack,
# with the process's RSS before and after and the server's own accounting from its /metrics.
# A measurement for the README, not a test: nothing is asserted. Prints a markdown table.
#
#   benches/attack_rss.sh                       # every attack with the default limits
#   benches/attack_rss.sh --attacks partial     # one attack
#   benches/attack_rss.sh --server-arg=--coordinator-max-sessions-per-user=64
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p tailnetd -p benches --bin tailnetd --bin attack_rss >&2
exec target/release/attack_rss --tailnetd target/release/tailnetd "$@"
