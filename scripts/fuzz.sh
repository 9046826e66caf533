#!/usr/bin/env bash
# Coverage-guided fuzzing campaign (libFuzzer via cargo-fuzz on the nightly toolchain): runs each
# target of fuzz/Cargo.toml for a fixed time, one after the other, then minimises its corpus.
# Not part of the test command or CI; the test command replays the committed corpora instead.
#
#   scripts/fuzz.sh [--minutes N] [--no-cmin] [target...]    (default: 5 minutes, every target)
#
# Resumable: each target starts from fuzz/corpus/<target>/ (the committed, minimised corpus plus
# whatever earlier runs added) and writes what it finds back there, so repeated runs keep
# growing it; `cargo fuzz cmin` then shrinks it to the inputs that still add coverage. Commit
# the corpus changes. Crashes, timeouts (-timeout) and memory blow-ups (-rss_limit_mb,
# -malloc_limit_mb) land in fuzz/artifacts/<target>/ (not committed): turn each into a fix and
# a regression test (see fuzz/README.md). The script exits non-zero if any target found one.
#
# Polite on a shared machine: one target at a time, one process, `nice -n 19`.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo/fuzz"

minutes=5
cmin=1
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --minutes=*) minutes="${1#*=}"; shift ;;
    --no-cmin) cmin=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done

all_targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^tailnetd-fuzz$')
if [ ${#targets[@]} -eq 0 ]; then
  # shellcheck disable=SC2206
  targets=($all_targets)
fi
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$all_targets" || { echo "unknown target $t; targets: $(echo $all_targets)" >&2; exit 2; }
done

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "installing the nightly toolchain (libFuzzer needs -Zsanitizer)"
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# The same flags for build, run and cmin, so nothing is rebuilt between them.
build_flags=(--release --debug-assertions)
seconds=$(( minutes * 60 ))
# -timeout: one input running longer is a hang. -rss_limit_mb / -malloc_limit_mb: a process
# above 512 MiB, or a single allocation above 64 MiB, is an unbounded allocation.
fuzz_flags=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=512 -malloc_limit_mb=64
  -max_len=65536 -print_final_stats=1)
logs="$repo/target/fuzz-logs"
mkdir -p "$logs"

echo "==> build ($(date -u +%H:%M:%S))"
nice -n 19 cargo +nightly fuzz build "${build_flags[@]}"

found=()
summary=()
for t in "${targets[@]}"; do
  corpus="corpus/$t"
  mkdir -p "$corpus" "artifacts/$t"
  before=$(find "$corpus" -type f | wc -l)
  echo "==> $t: ${minutes} min from $before inputs ($(date -u +%H:%M:%S); log: target/fuzz-logs/$t.log)"
  artifacts_before=$(find "artifacts/$t" -type f | wc -l)
  set +e
  nice -n 19 cargo +nightly fuzz run "${build_flags[@]}" "$t" "$corpus" -- "${fuzz_flags[@]}" \
    >"$logs/$t.log" 2>&1
  rc=$?
  set -e
  grown=$(find "$corpus" -type f | wc -l)
  stats=$(grep -E '^(#[0-9]+.*(DONE|pulse)|stat::number_of_executed_units|stat::peak_rss_mb)' "$logs/$t.log" | tail -n 3 | tr '\n' ' ')
  if [ $rc -ne 0 ] || [ "$(find "artifacts/$t" -type f | wc -l)" -gt "$artifacts_before" ]; then
    echo "    FOUND something (exit $rc): $(grep -E '^(==[0-9]+==ERROR|thread .* panicked|SUMMARY|.*Test unit written to)' "$logs/$t.log" | head -n 4)"
    found+=("$t")
  fi
  after=$grown
  if [ "$cmin" = 1 ]; then
    echo "    cmin ($grown inputs)"
    nice -n 19 cargo +nightly fuzz cmin "${build_flags[@]}" "$t" "$corpus" -- -timeout=10 \
      -rss_limit_mb=512 >"$logs/$t.cmin.log" 2>&1 || echo "    cmin failed: see target/fuzz-logs/$t.cmin.log"
    after=$(find "$corpus" -type f | wc -l)
  fi
  line=$(printf '%-20s %4d -> %5d -> %4d inputs  %s' "$t" "$before" "$grown" "$after" "$stats")
  echo "    $line"
  summary+=("$line")
done

printf '\n==> summary (inputs: before -> after the run -> after cmin)\n'
printf '%s\n' "${summary[@]}"
if [ ${#found[@]} -gt 0 ]; then
  echo "findings in: ${found[*]} (see fuzz/artifacts/<target>/ and target/fuzz-logs/)"
  exit 1
fi
