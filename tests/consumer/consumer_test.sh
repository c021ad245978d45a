#!/usr/bin/env bash
# ctest client_consumer_test: proves the installed C++ client works for a project outside this
# tree. Installs the `client` component of the build into a temporary prefix, configures and
# builds tests/consumer against it (find_package(tokensampler), tokensampler::client), starts the
# real tokensamplerd on 127.0.0.1:0 and a Unix socket, runs the consumer against both addresses,
# and stops the daemon with SIGTERM expecting a clean exit. Every step is bounded by `timeout`;
# the temporary directory and the daemon go away on any exit.
#
# Usage: consumer_test.sh BUILD_DIR CONSUMER_SOURCE_DIR TOKENSAMPLERD CMAKE CXX_COMPILER
#                         BUILD_TYPE [SANITIZE]
set -euo pipefail

build_dir=$1 consumer_src=$2 daemon=$3 cmake=$4 cxx=$5 build_type=$6 sanitize=${7:-}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ts_consumer.XXXXXX")
daemon_pid=
cleanup() {
  if [[ -n "${daemon_pid}" ]] && kill -0 "${daemon_pid}" 2>/dev/null; then
    kill -KILL "${daemon_pid}" 2>/dev/null || true
    wait "${daemon_pid}" 2>/dev/null || true
  fi
  rm -rf "${tmp}"
}
trap cleanup EXIT
fail() {
  echo "consumer_test: FAIL: $*" >&2
  exit 1
}

prefix=${tmp}/prefix
echo "== install (component client) into ${prefix}"
timeout 120 "${cmake}" --install "${build_dir}" --prefix "${prefix}" --component client

# The package must not bring core/ or its dependencies (oneTBB, Highway) to a worker.
config_dir=$(dirname "$(find "${prefix}" -name tokensamplerConfig.cmake -print -quit)")
[[ -f ${config_dir}/tokensamplerConfigVersion.cmake ]] || fail "no tokensampler package config"
targets=$(cat "${config_dir}"/tokensamplerTargets*.cmake)
for forbidden in tokensampler_core TBB:: hwy:: "${build_dir}"; do
  if grep -qF -- "${forbidden}" <<<"${targets}"; then
    fail "the exported targets reference ${forbidden}"
  fi
done
[[ -f ${prefix}/include/tokensampler/client/client.h ]] || fail "client/client.h not installed"
[[ -f ${prefix}/include/tokensampler/tokensampler/v1/sampler.pb.h ]] ||
  fail "tokensampler/v1/sampler.pb.h not installed"

echo "== configure and build ${consumer_src}"
flags=()
if [[ -n "${sanitize}" ]]; then
  # The installed static libraries are instrumented: the consumer links the same runtime.
  flags+=("-DCMAKE_CXX_FLAGS=-fsanitize=${sanitize} -fno-omit-frame-pointer"
          "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=${sanitize}")
fi
timeout 300 "${cmake}" -S "${consumer_src}" -B "${tmp}/build" -G Ninja \
  -DCMAKE_PREFIX_PATH="${prefix}" -DCMAKE_CXX_COMPILER="${cxx}" \
  -DCMAKE_BUILD_TYPE="${build_type}" "${flags[@]}"
timeout 600 "${cmake}" --build "${tmp}/build" -j 2

echo "== start ${daemon}"
"${daemon}" --listen=127.0.0.1:0 --listen="unix:${tmp}/ts.sock" \
  --port_file="${tmp}/ports.txt" 2>"${tmp}/daemon.log" &
daemon_pid=$!
for _ in $(seq 300); do
  [[ -s ${tmp}/ports.txt ]] && break
  kill -0 "${daemon_pid}" 2>/dev/null || fail "tokensamplerd exited early: $(cat "${tmp}/daemon.log")"
  sleep 0.1
done
[[ -s ${tmp}/ports.txt ]] || fail "tokensamplerd did not serve within 30 s"
mapfile -t addresses <"${tmp}/ports.txt"
[[ ${#addresses[@]} -eq 2 ]] || fail "expected 2 bound addresses, got: ${addresses[*]}"

for address in "${addresses[@]}"; do
  echo "== worker ${address}"
  out=$(timeout 60 "${tmp}/build/worker" "${address}") || fail "worker ${address} failed: ${out:-}"
  echo "${out}"
  grep -qx "worker: ok" <<<"${out}" || fail "worker ${address} did not report ok"
done

echo "== stop tokensamplerd"
kill -TERM "${daemon_pid}"
for _ in $(seq 300); do
  kill -0 "${daemon_pid}" 2>/dev/null || break
  sleep 0.1
done
kill -0 "${daemon_pid}" 2>/dev/null && fail "tokensamplerd did not stop within 30 s of SIGTERM"
status=0
wait "${daemon_pid}" || status=$?
daemon_pid=
[[ ${status} -eq 0 ]] || fail "tokensamplerd exited with ${status}: $(cat "${tmp}/daemon.log")"
echo "consumer_test: ok"
