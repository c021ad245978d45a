// `tokensampler-bench rpc`: how long a whole Sample step takes through the service, by
// transport, against the core alone on the same batch in the same run; and `--load`: many
// concurrent callers for a bounded time (throughput, latency percentiles, errors).
//
// It drives a running server (--tcp_target / --unix_target) or, by default, starts one in this
// process on 127.0.0.1:0 and a temporary Unix socket (shared memory on for both). Each
// configuration (batch × vocab × dtype) is timed for every path:
//   tcp     the logits as bytes in the request, over TCP loopback
//   uds     the same over the Unix socket
//   shm     a SharedMemoryRef to a region registered once (over the Unix socket)
//   sparse  the top-k candidates + log-sum-exp of the rest (over the Unix socket)
// Each prints one JSON line:
//   {"bench":"rpc","path":…,"rows":…,"vocab":…,"dtype":…,"dense_bytes":…,"request_bytes":…,
//    "steps":…,"p50_ms":…,"p99_ms":…,"mean_ms":…,"effective_gbps":…,"core_ms":…,
//    "ratio_to_core":…,"chain":…}
// effective_gbps = the dense tensor's bytes / p50 (what the worker would otherwise have sent);
// core_ms = the median of Sampler::Run on the same dense batch in an arena of --threads threads,
// one run right before each RPC step (so that both see the same machine). The worker's own work
// (filling the region, computing top-k on its GPU) is not timed. Load mode prints one line:
//   {"bench":"load","rpc":"sample"|"session","path":…,"concurrency":…,"duration_s":…,
//    "requests":…,"ok":…,"throughput_rps":…,"rows_per_s":…,"p50_ms":…,"p99_ms":…,
//    "p999_ms":…,"errors":{CODE:count,…}}
#include "tests/bench/rpc_bench.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/cli/random_logits.h"
#include "client/client.h"
#include "client/logits.h"
#include "client/session_client.h"
#include "client/shared_memory.h"
#include "core/sampler.h"
#include "core/tensor.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/reflection.h"
#include "service/server.h"
#include "tbb/task_arena.h"
#include "tests/bench/chain.h"

ABSL_FLAG(std::string, paths, "tcp,uds,shm,sparse", "rpc: paths to time (tcp, uds, shm, sparse)");
ABSL_FLAG(std::string, batches, "32,64", "rpc: batch sizes (rows)");
ABSL_FLAG(std::string, vocabs, "128256,151936", "rpc: vocabulary sizes");
ABSL_FLAG(std::string, dtypes, "f32,bf16", "rpc: wire dtypes (f32, bf16, f16)");
ABSL_FLAG(int, steps, 30, "rpc: timed steps per configuration and path (after 3 untimed)");
ABSL_FLAG(int, sparse_k, 1024, "rpc: candidates per row of the sparse path");
ABSL_FLAG(std::string, rpc_chain, "top_k=50,top_p=0.95,temperature=0.8",
          "rpc: the sampling parameters of every row");
ABSL_FLAG(std::string, tcp_target, "", "rpc: host:port of a running server (default: start one)");
ABSL_FLAG(std::string, unix_target, "",
          "rpc: unix:/path of a running server, for uds / shm / sparse (default: start one)");
ABSL_FLAG(bool, tuned, true,
          "rpc: large-message settings on the server it starts and on its clients (and the "
          "malloc thresholds of TuneMallocForLargeMessages)");
ABSL_FLAG(bool, malloc_tuning, true, "rpc: TuneMallocForLargeMessages() when --tuned");
ABSL_FLAG(bool, load, false,
          "rpc: load mode — --concurrency callers for --duration seconds on the first path, "
          "with --rows × --vocab --dtype batches");
ABSL_FLAG(int, concurrency, 8, "load: concurrent callers (each with its own connection)");
ABSL_FLAG(double, duration, 10.0, "load: seconds");
ABSL_FLAG(std::string, load_rpc, "sample", "load: sample (unary) or session (one stream each)");

// Shared with the core bench (bench_main.cc).
ABSL_DECLARE_FLAG(int, rows);
ABSL_DECLARE_FLAG(int, vocab);
ABSL_DECLARE_FLAG(std::string, dtype);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(int, threads);

namespace tokensampler::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Millis(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double at = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(at));
  const size_t hi = std::min(v.size() - 1, lo + 1);
  return v[lo] + (v[hi] - v[lo]) * (at - static_cast<double>(lo));
}

double Mean(const std::vector<double>& v) {
  double sum = 0.0;
  for (double x : v) sum += x;
  return v.empty() ? 0.0 : sum / static_cast<double>(v.size());
}

absl::StatusOr<std::vector<int>> Ints(const std::string& list, const char* flag) {
  std::vector<int> out;
  for (absl::string_view item : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    int value = 0;
    if (!absl::SimpleAtoi(item, &value) || value <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": bad entry \"", item, "\""));
    }
    out.push_back(value);
  }
  return out;
}

absl::StatusOr<v1::DType> WireDType(absl::string_view name) {
  if (name == "f32") return v1::DTYPE_FLOAT32;
  if (name == "bf16") return v1::DTYPE_BFLOAT16;
  if (name == "f16") return v1::DTYPE_FLOAT16;
  return absl::InvalidArgumentError(absl::StrCat("dtype must be f32, bf16 or f16, got ", name));
}

DType CoreDType(v1::DType dtype) {
  return dtype == v1::DTYPE_FLOAT32    ? DType::kFloat32
         : dtype == v1::DTYPE_BFLOAT16 ? DType::kBFloat16
                                       : DType::kFloat16;
}

// "top_k=50,top_p=0.95" → the proto message, field by field through reflection.
absl::StatusOr<v1::SamplingParams> ProtoParams(const std::string& spec) {
  v1::SamplingParams params;
  const google::protobuf::Descriptor* descriptor = params.GetDescriptor();
  const google::protobuf::Reflection* reflection = params.GetReflection();
  for (absl::string_view item : absl::StrSplit(spec, ',', absl::SkipEmpty())) {
    const std::vector<std::string> kv = absl::StrSplit(item, absl::MaxSplits('=', 1));
    const google::protobuf::FieldDescriptor* field =
        kv.size() == 2 ? descriptor->FindFieldByName(kv[0]) : nullptr;
    if (field == nullptr || field->is_repeated()) {
      return absl::InvalidArgumentError(absl::StrCat("--rpc_chain: unknown entry \"", item, "\""));
    }
    double value = 0.0;
    if (!absl::SimpleAtod(kv[1], &value)) {
      return absl::InvalidArgumentError(absl::StrCat("--rpc_chain: bad value \"", item, "\""));
    }
    switch (field->cpp_type()) {
      case google::protobuf::FieldDescriptor::CPPTYPE_FLOAT:
        reflection->SetFloat(&params, field, static_cast<float>(value));
        break;
      case google::protobuf::FieldDescriptor::CPPTYPE_INT32:
        reflection->SetInt32(&params, field, static_cast<int32_t>(value));
        break;
      case google::protobuf::FieldDescriptor::CPPTYPE_UINT64:
        reflection->SetUInt64(&params, field, static_cast<uint64_t>(value));
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat("--rpc_chain: unsupported \"", item, "\""));
    }
  }
  return params;
}

// The server to talk to: one started here, or the targets given.
struct Targets {
  std::unique_ptr<service::Server> server;
  std::string socket_path;
  std::string tcp;
  std::string unix_socket;

  ~Targets() {
    if (server != nullptr) server->Shutdown(absl::Now() + absl::Seconds(2));
    server.reset();
    if (!socket_path.empty()) unlink(socket_path.c_str());
  }
};

absl::StatusOr<std::unique_ptr<Targets>> StartTargets() {
  auto targets = std::make_unique<Targets>();
  targets->tcp = absl::GetFlag(FLAGS_tcp_target);
  targets->unix_socket = absl::GetFlag(FLAGS_unix_target);
  if (!targets->tcp.empty() || !targets->unix_socket.empty()) return targets;
  targets->socket_path = absl::StrCat("/tmp/ts_bench_", getpid(), ".sock");
  service::ServerOptions options;
  options.listen_addresses = {"127.0.0.1:0", absl::StrCat("unix:", targets->socket_path)};
  options.threads = std::max(1, absl::GetFlag(FLAGS_threads));
  options.max_message_bytes = 512 << 20;
  options.max_inflight_bytes = 0;
  options.max_concurrent_requests = 0;
  options.shared_memory.mode = service::SharedMemoryMode::kAll;
  options.transport.tuned = absl::GetFlag(FLAGS_tuned);
  absl::StatusOr<std::unique_ptr<service::Server>> server = service::Server::Start(options);
  if (!server.ok()) return server.status();
  targets->server = *std::move(server);
  targets->tcp = targets->server->bound_addresses()[0];
  targets->unix_socket = targets->server->bound_addresses()[1];
  return targets;
}

absl::StatusOr<Client> MakeClient(const std::string& target) {
  ClientOptions options;
  options.max_message_bytes = -1;
  options.large_message_tuning = absl::GetFlag(FLAGS_tuned);
  options.wait_for_ready = true;
  return Client::Create(target, options);
}

// One batch: the dense values and their encodings.
struct Batch {
  uint32_t rows = 0;
  uint32_t vocab = 0;
  v1::DType dtype = v1::DTYPE_FLOAT32;
  v1::Logits dense;   // bytes
  v1::Logits sparse;  // top-k candidates
};

absl::StatusOr<Batch> MakeBatch(uint32_t rows, uint32_t vocab, v1::DType dtype, bool sparse) {
  Batch batch{rows, vocab, dtype, {}, {}};
  const std::vector<float> values = cli::RandomLogits(rows, vocab, absl::GetFlag(FLAGS_seed));
  absl::StatusOr<v1::Logits> dense = MakeLogits(values, vocab, dtype);
  if (!dense.ok()) return dense.status();
  batch.dense = *std::move(dense);
  if (sparse) {
    const uint32_t k =
        std::min<uint32_t>(static_cast<uint32_t>(absl::GetFlag(FLAGS_sparse_k)), vocab);
    absl::StatusOr<v1::Logits> candidates = SparseLogitsFromDense(values, vocab, k, dtype);
    if (!candidates.ok()) return candidates.status();
    batch.sparse = *std::move(candidates);
  }
  return batch;
}

v1::SampleRequest Request(const v1::Logits& logits, const v1::SamplingParams& params) {
  v1::SampleRequest request;
  *request.mutable_logits() = logits;
  for (uint32_t r = 0; r < logits.rows(); ++r) {
    v1::SampleRow& row = *request.add_rows();
    *row.mutable_params() = params;
    row.mutable_params()->set_seed(r + 1);
  }
  return request;
}

// Sampler::Run on the dense batch, in an arena of --threads threads: the core-only reference.
// The matrix times one core step before every RPC step, so both see the same machine.
class CoreRunner {
 public:
  static absl::StatusOr<std::unique_ptr<CoreRunner>> Create(const Batch& batch,
                                                            const std::string& chain_spec) {
    absl::StatusOr<Chain> chain = ParseChain(chain_spec);
    if (!chain.ok()) return chain.status();
    auto runner = std::unique_ptr<CoreRunner>(new CoreRunner());
    const std::string& data = batch.dense.data();
    absl::StatusOr<LogitsView> view = LogitsView::Create(
        CoreDType(batch.dtype), batch.rows, batch.vocab,
        absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()), data.size()));
    if (!view.ok()) return view.status();
    runner->view_ = *view;
    runner->params_.assign(batch.rows, chain->params);
    runner->rows_.resize(batch.rows);
    for (uint32_t r = 0; r < batch.rows; ++r) {
      runner->params_[r].seed = r + 1;
      runner->rows_[r].params = &runner->params_[r];
    }
    return runner;
  }

  // One timed run, in milliseconds.
  double Step() {
    const auto t0 = Clock::now();
    arena_.execute([&] { (void)sampler_.Run(view_, rows_); });
    return Millis(Clock::now() - t0);
  }

 private:
  CoreRunner() : arena_(std::max(1, absl::GetFlag(FLAGS_threads))) {}

  LogitsView view_;
  std::vector<SamplingParams> params_;
  std::vector<RowRequest> rows_;
  tbb::task_arena arena_;
  Sampler sampler_;
};

int RunMatrix(Targets& targets) {
  absl::StatusOr<std::vector<int>> batches = Ints(absl::GetFlag(FLAGS_batches), "batches");
  absl::StatusOr<std::vector<int>> vocabs = Ints(absl::GetFlag(FLAGS_vocabs), "vocabs");
  absl::StatusOr<v1::SamplingParams> params = ProtoParams(absl::GetFlag(FLAGS_rpc_chain));
  for (const absl::Status& s : {batches.status(), vocabs.status(), params.status()}) {
    if (!s.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(s.message()).c_str());
      return 2;
    }
  }
  const std::vector<std::string> paths = absl::StrSplit(absl::GetFlag(FLAGS_paths), ',');
  const bool want_sparse = std::find(paths.begin(), paths.end(), "sparse") != paths.end();
  const int steps = std::max(1, absl::GetFlag(FLAGS_steps));
  absl::StatusOr<Client> tcp = MakeClient(targets.tcp);
  absl::StatusOr<Client> uds = MakeClient(targets.unix_socket);
  if (!tcp.ok() || !uds.ok()) {
    std::fprintf(stderr, "error: cannot create clients\n");
    return 2;
  }
  const std::vector<std::string> dtype_names = absl::StrSplit(absl::GetFlag(FLAGS_dtypes), ',');
  for (const std::string& dtype_name : dtype_names) {
    absl::StatusOr<v1::DType> dtype = WireDType(dtype_name);
    if (!dtype.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(dtype.status().message()).c_str());
      return 2;
    }
    for (const int rows : *batches) {
      for (const int vocab : *vocabs) {
        absl::StatusOr<Batch> batch = MakeBatch(static_cast<uint32_t>(rows),
                                                static_cast<uint32_t>(vocab), *dtype, want_sparse);
        if (!batch.ok()) {
          std::fprintf(stderr, "error: %s\n", std::string(batch.status().message()).c_str());
          return 2;
        }
        absl::StatusOr<std::unique_ptr<CoreRunner>> core =
            CoreRunner::Create(*batch, absl::GetFlag(FLAGS_rpc_chain));
        if (!core.ok()) {
          std::fprintf(stderr, "error: %s\n", core.status().ToString().c_str());
          return 2;
        }
        const uint64_t dense_bytes = batch->dense.data().size();
        for (const std::string& path : paths) {
          const Client* client = path == "tcp" ? &*tcp : &*uds;
          std::unique_ptr<SharedMemoryBuffer> buffer;
          std::string region;
          v1::SampleRequest request;
          if (path == "tcp" || path == "uds") {
            request = Request(batch->dense, *params);
          } else if (path == "shm") {
            absl::StatusOr<SharedMemoryBuffer> created = SharedMemoryBuffer::Create(
                absl::StrCat("/ts_bench_", getpid(), "_", rows, "_", vocab), dense_bytes);
            if (!created.ok()) {
              std::fprintf(stderr, "error: %s\n", created.status().ToString().c_str());
              return 1;
            }
            buffer = std::make_unique<SharedMemoryBuffer>(*std::move(created));
            std::memcpy(buffer->data(), batch->dense.data().data(), dense_bytes);
            absl::StatusOr<std::string> handle = client->RegisterSharedMemory(
                "bench", buffer->key(), 0, dense_bytes, absl::Seconds(10));
            if (!handle.ok()) {
              std::fprintf(stderr, "error: %s\n", handle.status().ToString().c_str());
              return 1;
            }
            region = *handle;
            request =
                Request(SharedMemoryLogits(region, 0, batch->rows, batch->vocab, *dtype), *params);
          } else if (path == "sparse") {
            request = Request(batch->sparse, *params);
          } else {
            std::fprintf(stderr, "error: unknown path %s\n", path.c_str());
            return 2;
          }
          std::vector<double> times;
          std::vector<double> core_times;
          for (int i = -3; i < steps; ++i) {
            const double core_step = (*core)->Step();
            if (i >= 0) core_times.push_back(core_step);
            const auto t0 = Clock::now();
            absl::StatusOr<v1::SampleResponse> response =
                client->Sample(request, absl::Seconds(60));
            const double ms = Millis(Clock::now() - t0);
            if (!response.ok()) {
              std::fprintf(stderr, "error: %s %s\n", path.c_str(),
                           response.status().ToString().c_str());
              return 1;
            }
            if (i >= 0) times.push_back(ms);
          }
          if (!region.empty()) (void)client->UnregisterSharedMemory(region, absl::Seconds(10));
          const double p50 = Percentile(times, 0.5);
          const double core_ms = Percentile(core_times, 0.5);
          std::printf(
              "{\"bench\":\"rpc\",\"path\":\"%s\",\"rows\":%d,\"vocab\":%d,\"dtype\":\"%s\","
              "\"dense_bytes\":%llu,\"request_bytes\":%zu,\"steps\":%d,\"p50_ms\":%.3f,"
              "\"p99_ms\":%.3f,\"mean_ms\":%.3f,\"effective_gbps\":%.3f,\"core_ms\":%.3f,"
              "\"ratio_to_core\":%.2f,\"threads\":%d,\"tuned\":%s,\"chain\":\"%s\"}\n",
              path.c_str(), rows, vocab, dtype_name.c_str(),
              static_cast<unsigned long long>(dense_bytes), request.ByteSizeLong(), steps, p50,
              Percentile(times, 0.99), Mean(times), static_cast<double>(dense_bytes) / p50 / 1e6,
              core_ms, p50 / core_ms, absl::GetFlag(FLAGS_threads),
              absl::GetFlag(FLAGS_tuned) ? "true" : "false",
              absl::GetFlag(FLAGS_rpc_chain).c_str());
          std::fflush(stdout);
        }
      }
    }
  }
  return 0;
}

int RunLoad(Targets& targets) {
  absl::StatusOr<v1::DType> dtype = WireDType(absl::GetFlag(FLAGS_dtype));
  absl::StatusOr<v1::SamplingParams> params = ProtoParams(absl::GetFlag(FLAGS_rpc_chain));
  const std::string path = std::string(*absl::StrSplit(absl::GetFlag(FLAGS_paths), ',').begin());
  const std::string rpc = absl::GetFlag(FLAGS_load_rpc);
  const int concurrency = std::max(1, absl::GetFlag(FLAGS_concurrency));
  if (!dtype.ok() || !params.ok() || (rpc != "sample" && rpc != "session") ||
      (path != "tcp" && path != "uds" && path != "shm" && path != "sparse") ||
      (rpc == "session" && path == "sparse")) {
    std::fprintf(stderr,
                 "error: load needs --dtype f32|bf16|f16, a valid --rpc_chain, --load_rpc "
                 "sample|session and a first --paths entry tcp|uds|shm|sparse (sparse: sample "
                 "only)\n");
    return 2;
  }
  absl::StatusOr<Batch> batch =
      MakeBatch(static_cast<uint32_t>(absl::GetFlag(FLAGS_rows)),
                static_cast<uint32_t>(absl::GetFlag(FLAGS_vocab)), *dtype, path == "sparse");
  if (!batch.ok()) {
    std::fprintf(stderr, "error: %s\n", batch.status().ToString().c_str());
    return 2;
  }
  const std::string& target = path == "tcp" ? targets.tcp : targets.unix_socket;
  const auto duration = std::chrono::duration<double>(absl::GetFlag(FLAGS_duration));
  std::mutex mu;
  std::vector<double> latencies;
  std::map<std::string, int64_t> errors;
  int64_t ok_count = 0;
  std::vector<std::thread> callers;
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(duration);
  for (int c = 0; c < concurrency; ++c) {
    callers.emplace_back([&, c] {
      std::vector<double> mine;
      std::map<std::string, int64_t> my_errors;
      int64_t my_ok = 0;
      const auto record = [&](const absl::Status& status, double ms) {
        mine.push_back(ms);
        if (status.ok()) {
          ++my_ok;
        } else {
          ++my_errors[std::string(absl::StatusCodeToString(status.code()))];
        }
      };
      absl::StatusOr<Client> client = MakeClient(target);
      if (!client.ok()) {
        record(client.status(), 0.0);
      } else {
        v1::Logits logits = path == "sparse" ? batch->sparse : batch->dense;
        std::unique_ptr<SharedMemoryBuffer> buffer;
        std::string region;
        if (path == "shm") {
          const size_t bytes = batch->dense.data().size();
          absl::StatusOr<SharedMemoryBuffer> created =
              SharedMemoryBuffer::Create(absl::StrCat("/ts_load_", getpid(), "_", c), bytes);
          if (created.ok()) {
            buffer = std::make_unique<SharedMemoryBuffer>(*std::move(created));
            std::memcpy(buffer->data(), batch->dense.data().data(), bytes);
            absl::StatusOr<std::string> handle =
                client->RegisterSharedMemory("load", buffer->key(), 0, bytes, absl::Seconds(10));
            if (handle.ok()) region = *handle;
            logits = SharedMemoryLogits(region, 0, batch->rows, batch->vocab, *dtype);
          }
        }
        if (rpc == "sample") {
          const v1::SampleRequest request = Request(logits, *params);
          while (Clock::now() < deadline) {
            const auto t0 = Clock::now();
            absl::StatusOr<v1::SampleResponse> response =
                client->Sample(request, absl::Seconds(30));
            record(response.status(), Millis(Clock::now() - t0));
          }
        } else {
          std::unique_ptr<SessionClient> session = SessionClient::Open(*client);
          std::vector<uint64_t> ids(batch->rows);
          v1::SamplingParams sequence_params = *params;
          for (uint32_t r = 0; r < batch->rows; ++r) {
            ids[r] = r;
            sequence_params.set_seed(r + 1);
            const absl::Status added = session->Add(r, sequence_params).get();
            if (!added.ok()) record(added, 0.0);
          }
          while (Clock::now() < deadline) {
            const auto t0 = Clock::now();
            absl::StatusOr<std::vector<v1::SequenceResult>> step = session->Step(logits, ids).get();
            record(step.status(), Millis(Clock::now() - t0));
          }
          (void)session->Close();
        }
        if (!region.empty()) (void)client->UnregisterSharedMemory(region, absl::Seconds(10));
      }
      std::lock_guard<std::mutex> lock(mu);
      latencies.insert(latencies.end(), mine.begin(), mine.end());
      for (const auto& [code, n] : my_errors) errors[code] += n;
      ok_count += my_ok;
    });
  }
  for (std::thread& t : callers) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<std::string> error_fields;
  for (const auto& [code, n] : errors) error_fields.push_back(absl::StrCat("\"", code, "\":", n));
  std::printf(
      "{\"bench\":\"load\",\"rpc\":\"%s\",\"path\":\"%s\",\"rows\":%u,\"vocab\":%u,"
      "\"dtype\":\"%s\",\"concurrency\":%d,\"duration_s\":%.2f,\"requests\":%zu,\"ok\":%lld,"
      "\"throughput_rps\":%.1f,\"rows_per_s\":%.0f,\"p50_ms\":%.3f,\"p99_ms\":%.3f,"
      "\"p999_ms\":%.3f,\"threads\":%d,\"errors\":{%s}}\n",
      rpc.c_str(), path.c_str(), batch->rows, batch->vocab, absl::GetFlag(FLAGS_dtype).c_str(),
      concurrency, seconds, latencies.size(), static_cast<long long>(ok_count),
      static_cast<double>(ok_count) / seconds,
      static_cast<double>(ok_count) * batch->rows / seconds, Percentile(latencies, 0.5),
      Percentile(latencies, 0.99), Percentile(latencies, 0.999), absl::GetFlag(FLAGS_threads),
      absl::StrJoin(error_fields, ",").c_str());
  std::fflush(stdout);
  return 0;
}

}  // namespace

int RpcMain() {
  if (absl::GetFlag(FLAGS_tuned) && absl::GetFlag(FLAGS_malloc_tuning)) {
    service::TuneMallocForLargeMessages();
  }
  absl::StatusOr<std::unique_ptr<Targets>> targets = StartTargets();
  if (!targets.ok()) {
    std::fprintf(stderr, "error: %s\n", targets.status().ToString().c_str());
    return 1;
  }
  return absl::GetFlag(FLAGS_load) ? RunLoad(**targets) : RunMatrix(**targets);
}

}  // namespace tokensampler::bench
