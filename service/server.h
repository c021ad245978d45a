// Server: a running tokensampler gRPC server — the Sampler service, grpc.health.v1 and server
// reflection — listening on TCP (optionally TLS / mutual TLS) and/or Unix-socket addresses and
// reachable in-process; optionally a health-only listener (for Kubernetes probes when the data
// listener is a Unix socket) and a Prometheus metrics endpoint. Every Sampler call goes through
// one CallGuard (drain, bearer token, limits, metrics, logs). tokensamplerd is a thin main
// around it; tests start it in-process.
//
// Lifecycle: Start() binds everything with health NOT_SERVING, then reports SERVING. Shutdown()
// drains: health NOT_SERVING and new calls refused with UNAVAILABLE (listeners stay open so
// probes read NOT_SERVING), calls in flight run to completion until the deadline, then the
// listeners close and whatever is left is cancelled.
//
// Thread-safe: every method may be called from any thread.
#ifndef TOKENSAMPLER_SERVICE_SERVER_H_
#define TOKENSAMPLER_SERVICE_SERVER_H_

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <cstdint>
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
#include "service/call_guard.h"
#include "service/log.h"
#include "service/metrics.h"
#include "service/sampler_service.h"
#include "service/shared_memory.h"

namespace prometheus {
class Exposer;
}  // namespace prometheus

namespace tokensampler::service {

// TLS for the TCP addresses of ServerOptions::listen_addresses (Unix sockets stay plaintext:
// they are local and protected by their file mode). PEM contents, not paths.
struct TlsOptions {
  std::string cert_chain;   // the server's certificate chain; set together with private_key
  std::string private_key;  // its key
  // CA bundle that client certificates must chain to; set = mutual TLS (a client without a
  // valid certificate cannot connect). Requires cert_chain and private_key.
  std::string client_ca;

  bool enabled() const { return !cert_chain.empty() || !private_key.empty(); }
};

// HTTP/2 keepalive (gRPC's defaults, except `time`).
struct KeepaliveOptions {
  // The server pings a connection this often, also while its streams are quiet, and drops it
  // when a ping is not answered within `timeout`: a client that vanished without closing its
  // connection (a crashed host) is found within time + timeout, and its calls — and the state of
  // its Session streams — are freed. (gRPC's default is 2 hours.)
  absl::Duration time = absl::Seconds(60);
  absl::Duration timeout = absl::Seconds(20);
  // Clients may ping at most this often; more frequent pings end the connection (GOAWAY
  // "too_many_pings").
  absl::Duration min_client_ping_interval = absl::Minutes(5);
  // Whether clients may ping while they have no call in flight.
  bool permit_without_calls = false;
};

// HTTP/2 and socket settings for large messages (docs/performance.md "Transport" has the
// measurements behind the values). gRPC's defaults suit small messages: a 64 KiB initial stream
// window grown by BDP probes, 16 KiB frames, 8 KiB socket reads growing slowly — a 16 MiB
// request then takes hundreds of window updates and read calls.
struct TransportOptions {
  // Apply the settings below (false = gRPC's defaults).
  bool tuned = true;
  // Initial HTTP/2 stream and connection window the server advertises (lookahead), bytes.
  int window_bytes = 64 << 20;
  // Largest HTTP/2 frame the server accepts (at most 2^24 - 1).
  int max_frame_bytes = (1 << 24) - 1;
  // Socket reads: first and largest chunk, bytes.
  int read_chunk_bytes = 4 << 20;
  int max_read_chunk_bytes = 16 << 20;
};

// Process-wide: makes glibc malloc keep large freed blocks for reuse instead of returning them
// to the kernel. By default a block above its mmap threshold (dynamic, at most 32 MiB) is
// mmap'ed for each request and unmapped after it, so every large request — a 64 × 128256 fp32
// batch is 31 MiB — pays its page faults again (≈ 8000 faults). With both thresholds at 1 GiB the
// same heap memory serves request after request. Kept memory is only reused by the arena that
// freed it, so the number of malloc arenas is capped at 2 (glibc's default is 8 per core, one per
// thread in practice): otherwise every gRPC and sampling thread's arena holds its own copy of the
// largest request it has seen, and RSS creeps up for minutes (the 60 s soak: 82 → 92 MiB and
// rising with 16+ arenas; 50 → 51 MiB, flat within 3 %, with 2). Call once at start, before
// threads allocate (tokensamplerd does when --large_message_tuning is on).
void TuneMallocForLargeMessages();

struct ServerOptions {
  // Addresses to listen on: "host:port" (port 0 = a free port chosen by the OS) or
  // "unix:/path/to/socket". May be empty: the server is then reachable only through
  // InProcessChannel().
  std::vector<std::string> listen_addresses;
  // Addresses that serve only grpc.health.v1 (plaintext, never a token): Kubernetes gRPC probes
  // cannot reach a Unix socket nor speak TLS. Reports the same status as the main listeners.
  std::vector<std::string> health_listen_addresses;
  // "host:port" of the Prometheus endpoint (GET /metrics); empty = off.
  std::string metrics_listen_address;
  // Threads of the sampling arena; 0 = DefaultThreadCount() (cgroup-aware CPU count).
  int threads = 0;
  // Largest request message accepted; gRPC answers RESOURCE_EXHAUSTED beyond it.
  int max_message_bytes = 256 * 1024 * 1024;
  // Session limits and idle timeout (see SessionOptions).
  SessionOptions session;
  // Overload limits (see CallGuardOptions): beyond them a request gets RESOURCE_EXHAUSTED at
  // once instead of waiting in an unbounded queue. 0 = no limit.
  int max_concurrent_requests = 256;
  int64_t max_inflight_bytes = int64_t{1} << 30;
  TlsOptions tls;
  // Accepted bearer tokens; empty = no authentication. Every Sampler call must carry
  // "authorization: Bearer <token>" (UNAUTHENTICATED otherwise); health is exempt, and
  // reflection (which could not check a token) is then not served.
  std::vector<std::string> auth_tokens;
  // Permission bits given to every Unix socket after it is bound (e.g. 0660); nullopt = as
  // created (0777 minus the umask).
  std::optional<uint32_t> unix_socket_mode;
  KeepaliveOptions keepalive;
  // Log every Nth request (event=request); 0 = none.
  int request_log_every = 0;
  // Shared-memory logits: where they are served and how many regions (see shared_memory.h).
  SharedMemoryOptions shared_memory;
  // Large-message settings of every listener.
  TransportOptions transport;
  // Serve grpc.reflection.v1alpha (ignored when auth_tokens is set).
  bool reflection = true;
  // Where lifecycle events and failed calls are logged; null = nowhere. Borrowed: must outlive
  // the server.
  Logger* logger = nullptr;
};

class Server {
 public:
  // Builds and starts a server. Returns it serving (health SERVING for "" and
  // "tokensampler.v1.Sampler" on every listener), or
  //   INVALID_ARGUMENT  an option is out of range (negative threads or limits,
  //                     max_message_bytes ≤ 0, an empty address, TLS key without certificate,
  //                     a client CA without a certificate, a socket mode above 0777,
  //                     session limits ≤ 0, idle timeout ≤ 0, ...);
  //   UNAVAILABLE       an address could not be bound (in use, bad path, no permission, a
  //                     certificate gRPC rejects), or a socket's mode could not be set.
  static absl::StatusOr<std::unique_ptr<Server>> Start(const ServerOptions& options);

  // Shuts down at once (in-flight calls are cancelled) unless Shutdown() already ran.
  ~Server();

  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The addresses actually bound, in the order of ServerOptions::listen_addresses, with a port
  // of 0 replaced by the chosen port ("127.0.0.1:0" → "127.0.0.1:41234"; "unix:" addresses are
  // returned unchanged).
  const std::vector<std::string>& bound_addresses() const { return bound_addresses_; }
  // The same for health_listen_addresses.
  const std::vector<std::string>& health_addresses() const { return health_addresses_; }
  // "host:port" of the metrics endpoint (port 0 resolved), or "" when off.
  const std::string& metrics_address() const { return metrics_address_; }

  // The size of the sampling arena (ServerOptions::threads, or the default it resolved to).
  int threads() const { return threads_; }

  // The Sampler service (its session counters, for tests).
  const SamplerService& service() const { return *service_; }

  // The server's metrics (for components that own gauges: sessions, shared memory).
  Metrics& metrics() { return *metrics_; }

  // The registered shared-memory regions.
  SharedMemoryRegistry& shared_memory() { return *shared_memory_; }

  // The sampling arena. Work enqueued here competes with the calls for its threads (an
  // embedding application may share it; tests use it to keep the threads busy).
  tbb::task_arena& arena() { return arena_; }

  // A channel to this server that bypasses the network (tests, embedding). Valid until the
  // server shuts down; `args` apply to the client side (e.g. its max receive message size).
  std::shared_ptr<grpc::Channel> InProcessChannel(const grpc::ChannelArguments& args);

  // Graceful stop (drain): health turns NOT_SERVING and new calls get UNAVAILABLE, streams are
  // told to finish (CallGuard::SubscribeDrain: Session streams end with UNAVAILABLE once their
  // current request is answered), calls in flight may finish until `deadline`; then the
  // listeners close and what is left is cancelled. Returns once every call has finished.
  // Idempotent: later calls return at once.
  void Shutdown(absl::Time deadline);

  // Blocks until Shutdown() has run (from another thread).
  void Wait();

 private:
  Server(int threads, const ServerOptions& options);

  // Health of every listener, and the tokensampler_serving gauge.
  void SetServing(bool serving);

  const int threads_;
  Logger* const logger_;
  // Declaration order is destruction order reversed: the listeners go first (all calls
  // finished), then the service, the guard (waits for its tasks), the metrics (stops observing
  // the arena), then the arena they ran in.
  tbb::global_control parallelism_;
  tbb::task_arena arena_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<CallGuard> guard_;
  // Outlives the service: requests hold its regions until they finish.
  std::unique_ptr<SharedMemoryRegistry> shared_memory_;
  std::unique_ptr<SamplerService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::CallbackGenericService> health_fallback_;
  std::unique_ptr<grpc::Server> health_server_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::vector<std::string> bound_addresses_;
  std::vector<std::string> health_addresses_;
  std::string metrics_address_;

  absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_SERVER_H_
