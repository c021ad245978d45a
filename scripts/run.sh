#!/usr/bin/env bash
# Installs the dependencies, builds, and starts tokensamplerd in the foreground with its defaults
# (127.0.0.1:50051). Arguments go to tokensamplerd, e.g. scripts/run.sh --listen=unix:/tmp/ts.sock
# Stop it with Ctrl-C (graceful shutdown).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
./scripts/build.sh
exec ./build/service/tokensamplerd "$@"
