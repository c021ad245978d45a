// tokensampler::Client: the C++ client of the tokensampler.v1.Sampler service, for model workers
// (stateless Sample, Verify and Health; the Session stream is SessionClient,
// client/session_client.h).
//
// A Client owns one gRPC channel (TCP `host:port`, plaintext or TLS / mutual TLS, or a Unix socket
// `unix:/path`) and turns every RPC outcome into absl::Status / absl::StatusOr with the gRPC code
// and message unchanged. It can send a bearer token with every call. The channel connects lazily
// and reconnects by itself; creating a Client does no I/O.
//
// Thread-safety: thread-safe. One Client may be shared by any number of threads; calls run
// concurrently over the one channel (HTTP/2 multiplexes them).
#ifndef TOKENSAMPLER_CLIENT_CLIENT_H_
#define TOKENSAMPLER_CLIENT_CLIENT_H_

#include <grpcpp/channel.h>
#include <grpcpp/support/status.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "tokensampler/v1/sampler.grpc.pb.h"
#include "tokensampler/v1/sampler.pb.h"

namespace tokensampler {

// TLS towards a server started with --tls_cert (PEM contents, not paths).
struct ClientTlsOptions {
  // CA bundle that the server's certificate must chain to; empty = the system's roots.
  std::string root_certs;
  // The client's certificate chain and key, for a server that requires mutual TLS
  // (--tls_client_ca); both or neither.
  std::string cert_chain;
  std::string private_key;
};

struct ClientOptions {
  // Largest message the client sends or receives, in bytes; -1 = no limit. A bigger request
  // fails locally with RESOURCE_EXHAUSTED. The server has its own limit (--max_message_bytes,
  // default 256 MiB), which answers RESOURCE_EXHAUSTED as well.
  int max_message_bytes = 256 << 20;

  // When false (gRPC's default) a call fails at once with UNAVAILABLE while the channel cannot
  // connect. When true it waits for the server until the call's timeout instead (useful right
  // after starting a server).
  bool wait_for_ready = false;

  // gRPC honours http_proxy / https_proxy from the environment unless told not to. A worker
  // talks to its sidecar or an in-cluster Service directly, so proxies are off by default.
  bool use_http_proxy = false;

  // Set = TLS (the server's TCP listener was started with --tls_cert); nullopt = plaintext
  // (a Unix socket, or a TCP listener without TLS).
  std::optional<ClientTlsOptions> tls;

  // Non-empty = sent with every call as "authorization: Bearer <token>" (a server started with
  // --auth_token_file answers UNAUTHENTICATED without it). It is also the namespace of the
  // shared-memory regions this client registers.
  std::string bearer_token;

  // HTTP/2 settings for large messages on the client side of the channel (large windows and
  // frames, large socket reads; see docs/performance.md "Transport"). false = gRPC's defaults.
  bool large_message_tuning = true;
};

// Returns the absl::Status with the same code and message as `status` (gRPC and Abseil share the
// canonical code numbers). OK maps to OK; a code outside the canonical set maps to UNKNOWN.
absl::Status FromGrpcStatus(const grpc::Status& status);

class Client {
 public:
  // Returns a client for `target`: "host:port" (e.g. "127.0.0.1:50051", "[::1]:50051"),
  // "unix:/path/to.sock", or any other gRPC target URI ("dns:///name:port").
  // Returns INVALID_ARGUMENT for an empty target or "unix:" without a path, a TLS certificate
  // without its key (or the reverse), or a bearer token that cannot be sent as metadata (a
  // character outside printable ASCII). Does not connect: an unreachable server, or a TLS
  // handshake that fails, shows up as UNAVAILABLE on the first call.
  static absl::StatusOr<Client> Create(absl::string_view target, const ClientOptions& options = {});

  Client(Client&&) = default;
  Client& operator=(Client&&) = default;
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  ~Client() = default;

  // Runs one stateless sampling step (Sampler.Sample) and returns the response: Σ n results,
  // row-major. `timeout` bounds the whole call; absl::InfiniteDuration() sets no deadline.
  // Returns the server's status otherwise, e.g. INVALID_ARGUMENT naming the bad field and value,
  // RESOURCE_EXHAUSTED over a message-size limit, UNAVAILABLE when the server is unreachable or
  // shutting down, DEADLINE_EXCEEDED when `timeout` passes first. Logits bytes of 1 MiB or more
  // are sent from `request`'s own memory, not copied into the message (the server reads the same
  // message); the call returns once gRPC has let go of them.
  absl::StatusOr<v1::SampleResponse> Sample(const v1::SampleRequest& request,
                                            absl::Duration timeout) const;

  // Verifies speculative drafts (Sampler.Verify) and returns the response: one VerifyResult per
  // row (accepted drafts + a recovered or bonus token). Errors as for Sample, e.g.
  // INVALID_ARGUMENT `rows[0].draft_probs row 1 sums to 4; it must sum to 1 within 0.001 …`.
  absl::StatusOr<v1::VerifyResponse> Verify(const v1::VerifyRequest& request,
                                            absl::Duration timeout) const;
  // Shared memory (client/shared_memory.h has the buffer and Logits helpers). Register maps
  // [offset, offset + byte_size) of the object `key` ("/name" or a path under /dev/shm) in the
  // server and returns the region's handle, to put in SharedMemoryRef.region; the server's
  // status otherwise (FAILED_PRECONDITION when shared memory is off for this connection — by
  // default the server serves it on Unix sockets only; NOT_FOUND, OUT_OF_RANGE, ...).
  absl::StatusOr<std::string> RegisterSharedMemory(const std::string& name, const std::string& key,
                                                   uint64_t offset, uint64_t byte_size,
                                                   absl::Duration timeout) const;
  // Unmaps the region `region` (a handle) in the server.
  absl::Status UnregisterSharedMemory(const std::string& region, absl::Duration timeout) const;
  // The regions of this client's bearer token, or those named by `regions` (handles).
  absl::StatusOr<v1::ListSharedMemoryResponse> ListSharedMemory(
      const std::vector<std::string>& regions, absl::Duration timeout) const;

  // Asks the server's grpc.health.v1 health service (Health.Check) about `service`: "" for the
  // server as a whole, or a service name such as "tokensampler.v1.Sampler".
  // Returns true when SERVING, false for any other serving status (NOT_SERVING while shutting
  // down, UNKNOWN). Returns NOT_FOUND when the server does not know `service`, and the call's
  // status for any other failure (UNAVAILABLE, DEADLINE_EXCEEDED, UNIMPLEMENTED without a health
  // service).
  absl::StatusOr<bool> Health(absl::string_view service, absl::Duration timeout) const;

  // The target this client was created with.
  const std::string& target() const { return target_; }

  // The channel and options, shared by the SessionClients opened on this client.
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  const ClientOptions& options() const { return options_; }

 private:
  Client(std::string target, const ClientOptions& options, std::shared_ptr<grpc::Channel> channel);

  std::string target_;
  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Sampler::Stub> stub_;
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CLIENT_CLIENT_H_
