#!/usr/bin/env bash
# Configures (CMake + Ninja, into build/) and builds everything: libraries, tokensamplerd, the
# tokensampler CLI and the tests. Extra arguments go to the CMake configure step, e.g.
#   scripts/build.sh -DCMAKE_BUILD_TYPE=Debug -DTOKENSAMPLER_SANITIZE=address,undefined
# Warnings are errors when TOKENSAMPLER_WERROR=ON (or 1), or when CI=true.
# Parallelism: TOKENSAMPLER_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

cmake_args=(-S . -B build -G Ninja)
werror="${TOKENSAMPLER_WERROR:-}"
if [[ -z "${werror}" && "${CI:-}" == "true" ]]; then
  werror=ON
fi
if [[ -n "${werror}" ]]; then
  cmake_args+=("-DTOKENSAMPLER_WERROR=${werror}")
fi

cmake "${cmake_args[@]}" "$@" >/dev/null
cmake --build build -j "${TOKENSAMPLER_JOBS:-2}"
