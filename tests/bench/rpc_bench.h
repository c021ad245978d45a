// `tokensampler-bench rpc`: the service end to end by transport, and --load (see rpc_bench.cc).
#ifndef TOKENSAMPLER_TESTS_BENCH_RPC_BENCH_H_
#define TOKENSAMPLER_TESTS_BENCH_RPC_BENCH_H_

namespace tokensampler::bench {

// Runs the rpc benchmark with the parsed flags; returns the process exit code.
int RpcMain();

}  // namespace tokensampler::bench

#endif  // TOKENSAMPLER_TESTS_BENCH_RPC_BENCH_H_
