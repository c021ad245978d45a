#include "service/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "service/cpu_quota.h"

namespace tokensampler::service {
namespace {

// "host:0" + chosen port → "host:port"; Unix-socket addresses stay as they are.
std::string BoundAddress(const std::string& address, int port) {
  if (absl::StartsWith(address, "unix:") || absl::StartsWith(address, "unix-abstract:")) {
    return address;
  }
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return address;
  return absl::StrCat(address.substr(0, colon), ":", port);
}

}  // namespace

Server::Server(int threads)
    : threads_(threads),
      // oneTBB starts hardware_concurrency - 1 workers by default; allow one per arena slot.
      parallelism_(tbb::global_control::max_allowed_parallelism, static_cast<size_t>(threads) + 1),
      // No thread ever joins the arena with execute(): all of its slots are for workers.
      arena_(threads, /*reserved_for_masters=*/0) {}

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads must be >= 0 (0 = the CPU count), got ", options.threads));
  }
  if (options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes must be > 0, got ", options.max_message_bytes));
  }
  for (const std::string& address : options.listen_addresses) {
    if (address.empty()) return absl::InvalidArgumentError("listen address must not be empty");
  }
  if (options.session.limits.max_sequences <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("session max_sequences must be > 0, got ",
                                                   options.session.limits.max_sequences));
  }
  if (options.session.limits.max_history_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("session max_history_tokens must be > 0, got ",
                                                   options.session.limits.max_history_tokens));
  }
  if (options.session.idle_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("session idle_timeout must be > 0 (infinite = never), got ",
                     absl::FormatDuration(options.session.idle_timeout)));
  }
  if (options.keepalive_time < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("keepalive_time must be >= 0, got ",
                                                   absl::FormatDuration(options.keepalive_time)));
  }

  const int threads = options.threads > 0 ? options.threads : DefaultThreadCount();
  std::unique_ptr<Server> server(new Server(threads));
  server->service_ = std::make_unique<SamplerService>(server->arena_, options.session);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  // Without this gRPC sets SO_REUSEPORT, and a second server on a busy port would silently
  // share its traffic instead of failing to start.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  if (options.keepalive_time > absl::ZeroDuration()) {
    // Pings find clients that vanished without closing their connection (a crashed host), so
    // that their Session streams end and free their state.
    builder.AddChannelArgument(
        GRPC_ARG_KEEPALIVE_TIME_MS,
        static_cast<int>(std::min<int64_t>(absl::ToInt64Milliseconds(options.keepalive_time),
                                           std::numeric_limits<int>::max())));
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
    // Keep pinging a connection whose streams are open but quiet (a worker between requests).
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  }
  builder.RegisterService(server->service_.get());
  // ServerBuilder writes each chosen port when BuildAndStart() returns.
  std::vector<int> ports(options.listen_addresses.size(), 0);
  for (size_t i = 0; i < options.listen_addresses.size(); ++i) {
    builder.AddListeningPort(options.listen_addresses[i], grpc::InsecureServerCredentials(),
                             &ports[i]);
  }
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("could not start a gRPC server listening on [",
                                               absl::StrJoin(options.listen_addresses, ", "),
                                               "] (address in use or not bindable?)"));
  }
  for (size_t i = 0; i < options.listen_addresses.size(); ++i) {
    if (ports[i] == 0) {
      return absl::UnavailableError(
          absl::StrCat("could not listen on ", options.listen_addresses[i]));
    }
    server->bound_addresses_.push_back(BoundAddress(options.listen_addresses[i], ports[i]));
  }
  grpc::HealthCheckServiceInterface* health = server->server_->GetHealthCheckService();
  health->SetServingStatus("", true);
  health->SetServingStatus(v1::Sampler::service_full_name(), true);
  return server;
}

Server::~Server() { Shutdown(absl::Now()); }

std::shared_ptr<grpc::Channel> Server::InProcessChannel(const grpc::ChannelArguments& args) {
  return server_->InProcessChannel(args);
}

void Server::Shutdown(absl::Time deadline) {
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_ || server_ == nullptr) return;
    shut_down_ = true;
  }
  // Probes see NOT_SERVING before the listeners close.
  server_->GetHealthCheckService()->Shutdown();
  // Session streams never end by themselves: end them once their current request is answered,
  // and let their UNAVAILABLE status reach the clients before the transports close.
  service_->DrainSessions(deadline);
  server_->Shutdown(absl::ToChronoTime(deadline));
}

void Server::Wait() {
  if (server_ != nullptr) server_->Wait();
}

}  // namespace tokensampler::service
