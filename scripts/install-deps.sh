#!/usr/bin/env bash
# Installs tokensampler's build and test dependencies from Debian 12 packages (no other source).
# Idempotent: when every package is already installed it does nothing, without touching apt.
# Runs as root (a fresh machine or container) or through sudo.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libtbb-dev libgtest-dev libgmock-dev libbenchmark-dev libhwy-dev
  prometheus-cpp-dev libcurl4-openssl-dev openssl
  python3-grpcio python3-numpy python3-protobuf python3-matplotlib
  # The fuzz targets (scripts/test.sh fuzz): clang and its runtimes (libFuzzer, ASan, UBSan),
  # which --no-install-recommends would leave out.
  clang libclang-rt-14-dev
)

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "${package}" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("${package}")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo >/dev/null; then
    echo "install-deps: run as root to install: ${missing[*]}" >&2
    exit 1
  fi
  sudo=(sudo)
fi

echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
