#!/usr/bin/env bash
# Configures (CMake + Ninja) and builds: libraries, tokensamplerd, the tokensampler CLI and the
# tests. Extra arguments go to the CMake configure step, e.g.
#   scripts/build.sh -DCMAKE_BUILD_TYPE=Debug -DTOKENSAMPLER_SANITIZE=address,undefined
# Warnings are errors when TOKENSAMPLER_WERROR=ON (or 1), or when CI=true.
# Build directory: TOKENSAMPLER_BUILD_DIR (default build). Targets: TOKENSAMPLER_BUILD_TARGETS
# (space-separated; default all). Parallelism: TOKENSAMPLER_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir="${TOKENSAMPLER_BUILD_DIR:-build}"
cmake_args=(-S . -B "${build_dir}" -G Ninja)
werror="${TOKENSAMPLER_WERROR:-}"
if [[ -z "${werror}" && "${CI:-}" == "true" ]]; then
  werror=ON
fi
if [[ -n "${werror}" ]]; then
  cmake_args+=("-DTOKENSAMPLER_WERROR=${werror}")
fi

cmake "${cmake_args[@]}" "$@" >/dev/null
targets=()
for target in ${TOKENSAMPLER_BUILD_TARGETS:-}; do
  targets+=(--target "${target}")
done
cmake --build "${build_dir}" -j "${TOKENSAMPLER_JOBS:-2}" "${targets[@]}"
