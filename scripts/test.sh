#!/usr/bin/env bash
# Installs the dependencies, builds, and runs every test (ctest: core, service, client,
# integration against the real tokensamplerd binary, deploy: the manifests and the image). Exits
# non-zero if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
./scripts/build.sh
ctest --test-dir build --output-on-failure -j "${TOKENSAMPLER_JOBS:-2}" --timeout 600
