#!/usr/bin/env bash
# Runs a libFuzzer binary for a bounded time from the committed seed corpus (read-only: new
# inputs go to a scratch corpus in the build tree), and prints libFuzzer's final statistics
# (stat::number_of_executed_units = the executions). ctest's fuzz_* tests call this; for a
# longer run give more seconds (docs/reliability.md):
#   tests/fuzz/run_fuzzer.sh <fuzzer binary> <seconds> <scratch dir> <seed corpus dir> [flags...]
# A crash, leak, sanitizer report or FUZZ_CHECK failure makes libFuzzer exit non-zero and write
# the input to <scratch dir>/artifacts/.
set -euo pipefail
binary=$1 seconds=$2 scratch=$3 seeds=$4
shift 4
mkdir -p "${scratch}/corpus" "${scratch}/artifacts"
exec "${binary}" -max_total_time="${seconds}" -print_final_stats=1 -timeout=60 -rss_limit_mb=4096 \
  -artifact_prefix="${scratch}/artifacts/" "$@" "${scratch}/corpus" "${seeds}"
