// Server: a running tokensampler gRPC server — the Sampler service, grpc.health.v1 and server
// reflection — listening on TCP and/or Unix-socket addresses and reachable in-process.
// tokensamplerd is a thin main around it; tests start it in-process.
//
// Thread-safe: every method may be called from any thread.
#ifndef TOKENSAMPLER_SERVICE_SERVER_H_
#define TOKENSAMPLER_SERVICE_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "oneapi/tbb/global_control.h"
#include "oneapi/tbb/task_arena.h"
#include "service/sampler_service.h"

namespace tokensampler::service {

struct ServerOptions {
  // Addresses to listen on: "host:port" (port 0 = a free port chosen by the OS) or
  // "unix:/path/to/socket". May be empty: the server is then reachable only through
  // InProcessChannel().
  std::vector<std::string> listen_addresses;
  // Threads of the sampling arena; 0 = DefaultThreadCount() (cgroup-aware CPU count).
  int threads = 0;
  // Largest request message accepted; gRPC answers RESOURCE_EXHAUSTED beyond it.
  int max_message_bytes = 256 * 1024 * 1024;
  // Session limits and idle timeout (see SessionOptions).
  SessionOptions session;
  // Interval of the HTTP/2 keepalive pings the server sends on an open connection; a client that
  // does not answer within 20 s is gone, and its calls (and session state) are cancelled.
  // absl::ZeroDuration() = no pings.
  absl::Duration keepalive_time = absl::Seconds(60);
};

class Server {
 public:
  // Builds and starts a server. Returns it serving (health SERVING for "" and
  // "tokensampler.v1.Sampler"), or
  //   INVALID_ARGUMENT  an option is out of range (negative threads, max_message_bytes ≤ 0,
  //                     an empty address, session limits ≤ 0, idle timeout ≤ 0, negative
  //                     keepalive);
  //   UNAVAILABLE       an address could not be bound (in use, bad path, no permission).
  static absl::StatusOr<std::unique_ptr<Server>> Start(const ServerOptions& options);

  // Shuts down at once (in-flight calls are cancelled) unless Shutdown() already ran.
  ~Server();

  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The addresses actually bound, in the order of ServerOptions::listen_addresses, with a port
  // of 0 replaced by the chosen port ("127.0.0.1:0" → "127.0.0.1:41234"; "unix:" addresses are
  // returned unchanged).
  const std::vector<std::string>& bound_addresses() const { return bound_addresses_; }

  // The size of the sampling arena (ServerOptions::threads, or the default it resolved to).
  int threads() const { return threads_; }

  // The Sampler service (its session counters, for tests and metrics).
  const SamplerService& service() const { return *service_; }

  // A channel to this server that bypasses the network (tests, embedding). Valid until the
  // server shuts down; `args` apply to the client side (e.g. its max receive message size).
  std::shared_ptr<grpc::Channel> InProcessChannel(const grpc::ChannelArguments& args);

  // Graceful stop: health turns NOT_SERVING, new calls are refused, calls in flight may finish
  // until `deadline` and are cancelled after it; Session streams end with UNAVAILABLE once their
  // current request is answered. Returns once every call has finished.
  // Idempotent: later calls return at once.
  void Shutdown(absl::Time deadline);

  // Blocks until Shutdown() has run (from another thread).
  void Wait();

 private:
  explicit Server(int threads);

  const int threads_;
  // Declaration order is destruction order reversed: the grpc::Server goes first (all calls
  // finished), then the service (waits for its tasks), then the arena they ran in.
  tbb::global_control parallelism_;
  tbb::task_arena arena_;
  std::unique_ptr<SamplerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::string> bound_addresses_;

  absl::Mutex mu_;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_SERVER_H_
