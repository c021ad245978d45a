#!/usr/bin/env bash
# Installs the dependencies, builds, and runs the tests. Exits non-zero if anything fails.
#   scripts/test.sh [MODE...]     (default: plain)
#   plain     build/: every ctest — core, service, client, integration against the real
#             tokensamplerd binary, Python, deploy (the manifests, the image's packages, the
#             sidecar pod), the fuzz corpora replayed, the 60 s soak.
#   sanitize  build-asan/: everything built with ASan + UBSan (-fno-sanitize-recover=all; the
#             daemon the integration and Python tests start is the sanitized one), every ctest
#             but the soak (it measures RSS, which ASan's quarantine inflates on purpose), the
#             bench smoke test and deploy (it checks the image's libraries against the plain,
#             not the sanitized, binaries).
#   fuzz      build-fuzz/: clang, libFuzzer + ASan + UBSan; only the fuzz targets, each fuzzed
#             for TOKENSAMPLER_FUZZ_SECONDS (default 30) from its seed corpus (ctest -L fuzz).
#   all       plain, sanitize, fuzz (what .ci/run runs).
set -euo pipefail
cd "$(dirname "$0")/.."

modes=("$@")
if [[ ${#modes[@]} -eq 0 ]]; then
  modes=(plain)
elif [[ "${modes[*]}" == "all" ]]; then
  modes=(plain sanitize fuzz)
fi

jobs="${TOKENSAMPLER_JOBS:-2}"
./scripts/install-deps.sh
for mode in "${modes[@]}"; do
  echo "test.sh: ${mode}" >&2
  case "${mode}" in
    plain)
      ./scripts/build.sh
      ctest --test-dir build --output-on-failure -j "${jobs}" --timeout 600
      ;;
    sanitize)
      TOKENSAMPLER_BUILD_DIR=build-asan ./scripts/build.sh \
        -DTOKENSAMPLER_SANITIZE=address,undefined
      # Leaks are reported (detect_leaks is on by default); the suppressions cover only
      # third-party code (tests/sanitizers/lsan.supp says why for each).
      ASAN_OPTIONS="detect_leaks=1:strict_init_order=1:detect_stack_use_after_return=1" \
      LSAN_OPTIONS="suppressions=${PWD}/tests/sanitizers/lsan.supp:print_suppressions=0" \
      UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
        ctest --test-dir build-asan --output-on-failure -j "${jobs}" --timeout 1200 \
          --label-exclude 'soak|bench|deploy'
      ;;
    fuzz)
      CC=clang CXX=clang++ TOKENSAMPLER_BUILD_DIR=build-fuzz TOKENSAMPLER_BUILD_TARGETS=fuzzers \
        ./scripts/build.sh -DTOKENSAMPLER_FUZZ=ON -DTOKENSAMPLER_SANITIZE=address,undefined \
          "-DTOKENSAMPLER_FUZZ_SECONDS=${TOKENSAMPLER_FUZZ_SECONDS:-30}"
      ctest --test-dir build-fuzz --output-on-failure -j "${jobs}" --label-regex fuzz
      ;;
    *)
      echo "test.sh: unknown mode ${mode} (plain, sanitize, fuzz, all)" >&2
      exit 2
      ;;
  esac
done
