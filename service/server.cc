#include "service/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/impl/server_builder_option.h>
#include <grpcpp/security/server_credentials.h>
#include <malloc.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "prometheus/exposer.h"
#include "service/cpu_quota.h"

#ifndef TOKENSAMPLER_VERSION
#define TOKENSAMPLER_VERSION "unknown"
#endif

namespace tokensampler::service {
namespace {

bool IsUnixAddress(absl::string_view address) {
  return absl::StartsWith(address, "unix:") || absl::StartsWith(address, "unix-abstract:");
}

// "host:0" + chosen port → "host:port"; Unix-socket addresses stay as they are.
std::string BoundAddress(const std::string& address, int port) {
  if (IsUnixAddress(address)) return address;
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return address;
  return absl::StrCat(address.substr(0, colon), ":", port);
}

// The file of a "unix:" address ("unix:/p", "unix:///p", "unix:rel"); nullopt for
// "unix-abstract:" (no file) and other schemes.
std::optional<std::string> UnixSocketPath(absl::string_view address) {
  if (!absl::ConsumePrefix(&address, "unix:")) return std::nullopt;
  absl::ConsumePrefix(&address, "//");
  return std::string(address);
}

// Takes reflection off one builder. Linking gRPC's reflection library registers its plugin for
// every server of the process; the health-only listener and a server with tokens (reflection
// cannot check them) must not serve it.
class NoReflectionOption final : public grpc::ServerBuilderOption {
 public:
  void UpdateArguments(grpc::ChannelArguments* /*args*/) override {}
  void UpdatePlugins(std::vector<std::unique_ptr<grpc::ServerBuilderPlugin>>* plugins) override {
    std::erase_if(*plugins, [](const std::unique_ptr<grpc::ServerBuilderPlugin>& plugin) {
      return plugin->name() == kReflectionPluginName;
    });
  }

 private:
  static constexpr absl::string_view kReflectionPluginName = "proto_server_reflection";
};

// The health-only listener answers every other method with UNIMPLEMENTED. (gRPC also refuses to
// start a server that has nothing but the default health service.)
class HealthOnlyFallback final : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    class Reactor final : public grpc::ServerGenericBidiReactor {
     public:
      explicit Reactor(const std::string& method) {
        Finish(
            grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                         absl::StrCat("this listener serves only grpc.health.v1, not ", method)));
      }
      void OnDone() override { delete this; }
    };
    return new Reactor(context->method());
  }
};

int64_t Millis(absl::Duration d) { return absl::ToInt64Milliseconds(d); }

// Large-message settings (see TransportOptions).
void ApplyTransportOptions(const TransportOptions& transport, grpc::ServerBuilder& builder) {
  if (!transport.tuned) return;
  // A large fixed window: a whole request flows without waiting for window updates, and BDP
  // probing (which would only grow it from 64 KiB) is off.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, transport.window_bytes);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, transport.max_frame_bytes);
  builder.AddChannelArgument(GRPC_ARG_TCP_READ_CHUNK_SIZE, transport.read_chunk_bytes);
  builder.AddChannelArgument(GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, transport.read_chunk_bytes);
  builder.AddChannelArgument(GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, transport.max_read_chunk_bytes);
}

absl::Status ValidateOptions(const ServerOptions& options) {
  if (options.threads < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads must be >= 0 (0 = the CPU count), got ", options.threads));
  }
  if (options.max_message_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_message_bytes must be > 0, got ", options.max_message_bytes));
  }
  if (options.max_concurrent_requests < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_concurrent_requests must be >= 0 (0 = no limit), got ",
                     options.max_concurrent_requests));
  }
  if (options.session.limits.max_sequences <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("session max_sequences must be > 0, got ",
                                                   options.session.limits.max_sequences));
  }
  if (options.session.limits.max_history_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("session max_history_tokens must be > 0, got ",
                                                   options.session.limits.max_history_tokens));
  }
  if (options.session.limits.max_beam_width <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("session max_beam_width must be > 0, got ",
                                                   options.session.limits.max_beam_width));
  }
  if (options.session.idle_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("session idle_timeout must be > 0 (infinite = never), got ",
                     absl::FormatDuration(options.session.idle_timeout)));
  }
  if (options.max_inflight_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_inflight_bytes must be >= 0 (0 = no limit), got ", options.max_inflight_bytes));
  }
  if (options.shared_memory.max_regions <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("shared_memory max_regions must be > 0, got ",
                                                   options.shared_memory.max_regions));
  }
  const TransportOptions& transport = options.transport;
  if (transport.window_bytes <= 0 || transport.read_chunk_bytes <= 0 ||
      transport.max_read_chunk_bytes < transport.read_chunk_bytes ||
      transport.max_frame_bytes < 16384 || transport.max_frame_bytes > (1 << 24) - 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "transport: window_bytes (", transport.window_bytes, ") and read_chunk_bytes (",
        transport.read_chunk_bytes, ") must be > 0, max_read_chunk_bytes (",
        transport.max_read_chunk_bytes, ") ≥ read_chunk_bytes, max_frame_bytes (",
        transport.max_frame_bytes, ") in [16384, 16777215]"));
  }
  if (options.request_log_every < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("request_log_every must be >= 0 (0 = off), got ", options.request_log_every));
  }
  for (const auto* addresses : {&options.listen_addresses, &options.health_listen_addresses}) {
    for (const std::string& address : *addresses) {
      if (address.empty()) return absl::InvalidArgumentError("listen address must not be empty");
    }
  }
  if (IsUnixAddress(options.metrics_listen_address)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics_listen_address must be host:port, got \"", options.metrics_listen_address, "\""));
  }
  const TlsOptions& tls = options.tls;
  if (tls.cert_chain.empty() != tls.private_key.empty()) {
    return absl::InvalidArgumentError(
        "tls: the certificate chain and the private key must be given together");
  }
  if (!tls.client_ca.empty() && tls.cert_chain.empty()) {
    return absl::InvalidArgumentError(
        "tls: a client CA (mutual TLS) needs the server's certificate chain and key");
  }
  for (const auto& [name, pem] :
       {std::pair<const char*, const std::string*>{"certificate chain", &tls.cert_chain},
        {"private key", &tls.private_key},
        {"client CA", &tls.client_ca}}) {
    if (!pem->empty() && !absl::StrContains(*pem, "-----BEGIN ")) {
      return absl::InvalidArgumentError(
          absl::StrCat("tls: the ", name, " is not PEM (no \"-----BEGIN \" line)"));
    }
  }
  for (const std::string& token : options.auth_tokens) {
    if (token.empty()) return absl::InvalidArgumentError("auth tokens must not be empty");
  }
  if (options.unix_socket_mode.has_value() && *options.unix_socket_mode > 0777) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "unix_socket_mode must be at most 0777, got 0%o", *options.unix_socket_mode));
  }
  const KeepaliveOptions& keepalive = options.keepalive;
  const absl::Duration max_ms = absl::Milliseconds(std::numeric_limits<int>::max());
  for (const auto& [name, value, min] :
       {std::tuple<const char*, absl::Duration, absl::Duration>{"keepalive time", keepalive.time,
                                                                absl::Milliseconds(1)},
        {"keepalive timeout", keepalive.timeout, absl::Milliseconds(1)},
        {"keepalive min client ping interval", keepalive.min_client_ping_interval,
         absl::ZeroDuration()}}) {
    if (value < min || value > max_ms) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be in [", absl::FormatDuration(min), ", ",
                       absl::FormatDuration(max_ms), "], got ", absl::FormatDuration(value)));
    }
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::ServerCredentials> TcpCredentials(const TlsOptions& tls) {
  if (!tls.enabled()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl(
      tls.client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                            : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_root_certs = tls.client_ca;
  ssl.pem_key_cert_pairs.push_back({tls.private_key, tls.cert_chain});
  return grpc::SslServerCredentials(ssl);
}

// Binds `addresses` on `builder`; returns the chosen ports through the vector it fills after
// BuildAndStart() (ServerBuilder writes them then).
void AddListeners(grpc::ServerBuilder& builder, const std::vector<std::string>& addresses,
                  const std::shared_ptr<grpc::ServerCredentials>& tcp_credentials,
                  std::vector<int>& ports) {
  ports.assign(addresses.size(), 0);
  for (size_t i = 0; i < addresses.size(); ++i) {
    builder.AddListeningPort(
        addresses[i],
        IsUnixAddress(addresses[i]) ? grpc::InsecureServerCredentials() : tcp_credentials,
        &ports[i]);
  }
}

absl::StatusOr<std::vector<std::string>> BoundAddresses(const std::vector<std::string>& addresses,
                                                        const std::vector<int>& ports) {
  std::vector<std::string> bound;
  for (size_t i = 0; i < addresses.size(); ++i) {
    if (ports[i] == 0) {
      return absl::UnavailableError(absl::StrCat("could not listen on ", addresses[i]));
    }
    bound.push_back(BoundAddress(addresses[i], ports[i]));
  }
  return bound;
}

}  // namespace

Server::Server(int threads, const ServerOptions& options)
    : threads_(threads),
      logger_(options.logger),
      // oneTBB starts hardware_concurrency - 1 workers by default; allow one per arena slot.
      parallelism_(tbb::global_control::max_allowed_parallelism, static_cast<size_t>(threads) + 1),
      // No thread ever joins the arena with execute(): all of its slots are for workers.
      arena_(threads, /*reserved_for_masters=*/0),
      metrics_(std::make_unique<Metrics>(TOKENSAMPLER_VERSION, threads)),
      guard_(std::make_unique<CallGuard>(
          CallGuardOptions{.max_concurrent_requests = options.max_concurrent_requests,
                           .max_inflight_bytes = options.max_inflight_bytes,
                           .auth_tokens = options.auth_tokens,
                           .request_log_every = options.request_log_every},
          *metrics_, options.logger)),
      shared_memory_(
          std::make_unique<SharedMemoryRegistry>(options.shared_memory, &metrics_->shm_regions())),
      service_(std::make_unique<SamplerService>(arena_, *guard_, *metrics_, options.session,
                                                shared_memory_.get(), options.max_message_bytes)) {
  metrics_->ObserveArena(arena_);
}

void TuneMallocForLargeMessages() {
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_ARENA_MAX, 2);
}

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  if (absl::Status valid = ValidateOptions(options); !valid.ok()) return valid;

  const int threads = options.threads > 0 ? options.threads : DefaultThreadCount();
  std::unique_ptr<Server> server(new Server(threads, options));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  // Without this gRPC sets SO_REUSEPORT, and a second server on a busy port would silently
  // share its traffic instead of failing to start.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  const KeepaliveOptions& keepalive = options.keepalive;
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(Millis(keepalive.time)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS,
                             static_cast<int>(Millis(keepalive.timeout)));
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             static_cast<int>(Millis(keepalive.min_client_ping_interval)));
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS,
                             keepalive.permit_without_calls ? 1 : 0);
  // Keep pinging a connection whose streams are open but quiet (a worker between Session
  // requests): the pings find clients that vanished without closing their connection, so that
  // their streams end and free their session state.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  ApplyTransportOptions(options.transport, builder);
  if (!options.reflection || !options.auth_tokens.empty()) {
    builder.SetOption(std::make_unique<NoReflectionOption>());
  }
  builder.RegisterService(server->service_.get());
  std::vector<int> ports;
  AddListeners(builder, options.listen_addresses, TcpCredentials(options.tls), ports);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr) {
    return absl::UnavailableError(absl::StrCat(
        "could not start a gRPC server listening on [",
        absl::StrJoin(options.listen_addresses, ", "),
        "] (address in use or not bindable, or a TLS certificate / key gRPC rejects?)"));
  }
  // Not serving until everything below is up. gRPC's default health service starts with ""
  // SERVING: for the microseconds until this line a probe could read that, before any address
  // is logged or written to a port file.
  server->SetServing(false);
  absl::StatusOr<std::vector<std::string>> bound = BoundAddresses(options.listen_addresses, ports);
  if (!bound.ok()) return bound.status();
  server->bound_addresses_ = *std::move(bound);

  if (options.unix_socket_mode.has_value()) {
    for (const std::string& address : options.listen_addresses) {
      const std::optional<std::string> path = UnixSocketPath(address);
      if (path.has_value() && chmod(path->c_str(), *options.unix_socket_mode) != 0) {
        return absl::UnavailableError(absl::StrFormat("could not set the mode of %s to 0%o: %s",
                                                      *path, *options.unix_socket_mode,
                                                      std::strerror(errno)));
      }
    }
  }

  if (!options.health_listen_addresses.empty()) {
    grpc::ServerBuilder health_builder;
    health_builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
    health_builder.SetOption(std::make_unique<NoReflectionOption>());
    server->health_fallback_ = std::make_unique<HealthOnlyFallback>();
    health_builder.RegisterCallbackGenericService(server->health_fallback_.get());
    std::vector<int> health_ports;
    AddListeners(health_builder, options.health_listen_addresses, grpc::InsecureServerCredentials(),
                 health_ports);
    server->health_server_ = health_builder.BuildAndStart();
    if (server->health_server_ == nullptr) {
      return absl::UnavailableError(
          absl::StrCat("could not start the health listener on [",
                       absl::StrJoin(options.health_listen_addresses, ", "), "]"));
    }
    server->SetServing(false);
    bound = BoundAddresses(options.health_listen_addresses, health_ports);
    if (!bound.ok()) return bound.status();
    server->health_addresses_ = *std::move(bound);
  }

  if (!options.metrics_listen_address.empty()) {
    try {
      server->exposer_ =
          std::make_unique<prometheus::Exposer>(options.metrics_listen_address, /*threads=*/2);
    } catch (const std::exception& e) {
      return absl::UnavailableError(absl::StrCat("could not serve metrics on ",
                                                 options.metrics_listen_address, ": ", e.what()));
    }
    for (const std::weak_ptr<prometheus::Collectable>& collectable :
         server->metrics_->Collectables()) {
      server->exposer_->RegisterCollectable(collectable);
    }
    const std::vector<int> metrics_ports = server->exposer_->GetListeningPorts();
    if (metrics_ports.empty()) {
      return absl::UnavailableError(
          absl::StrCat("could not serve metrics on ", options.metrics_listen_address));
    }
    server->metrics_address_ = BoundAddress(options.metrics_listen_address, metrics_ports[0]);
  }

  if (server->logger_ != nullptr && !options.auth_tokens.empty() && !options.tls.enabled()) {
    for (const std::string& address : options.listen_addresses) {
      if (!IsUnixAddress(address)) {
        server->logger_->Log(LogLevel::kWarning, "insecure_auth",
                             {{"address", address},
                              {"message",
                               "bearer tokens cross this TCP listener in plaintext; give "
                               "--tls_cert and --tls_key"}});
      }
    }
  }
  server->SetServing(true);
  {
    absl::MutexLock lock(&server->mu_);
    server->started_ = true;
  }
  return server;
}

Server::~Server() { Shutdown(absl::Now()); }

std::shared_ptr<grpc::Channel> Server::InProcessChannel(const grpc::ChannelArguments& args) {
  return server_->InProcessChannel(args);
}

void Server::SetServing(bool serving) {
  for (grpc::Server* server : {server_.get(), health_server_.get()}) {
    if (server == nullptr) continue;
    grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
    health->SetServingStatus("", serving);
    health->SetServingStatus(v1::Sampler::service_full_name(), serving);
  }
  metrics_->SetServing(serving);
}

void Server::Shutdown(absl::Time deadline) {
  bool log = false;
  {
    absl::MutexLock lock(&mu_);
    if (shut_down_ || server_ == nullptr) return;
    shut_down_ = true;
    // A server that failed to start is torn down without drain logs.
    log = started_ && logger_ != nullptr;
  }
  const absl::Time start = absl::Now();
  // Probes read NOT_SERVING and new calls are refused while the calls in flight finish; the
  // listeners stay open until then so that the NOT_SERVING answer can be read.
  // Counted first: streams told of the drain may end at once.
  const int in_flight = guard_->open_calls();
  guard_->StartDrain();
  SetServing(false);
  if (log) {
    logger_->Log(LogLevel::kInfo, "drain",
                 {{"calls_in_flight", in_flight},
                  {"deadline_seconds", absl::ToDoubleSeconds(deadline - start)}});
  }
  const int left = guard_->WaitForIdle(deadline);
  // Closes the listeners; what is still running after `deadline` is cancelled. Once every call
  // is done, gRPC would otherwise also wait (until `deadline`) for idle clients to hang up after
  // its GOAWAY: a second is enough for refusals still being written.
  server_->Shutdown(absl::ToChronoTime(
      left == 0 ? std::min(deadline, absl::Now() + absl::Seconds(1)) : deadline));
  if (log) {
    logger_->Log(
        left == 0 ? LogLevel::kInfo : LogLevel::kWarning, "drained",
        {{"calls_cancelled", left}, {"seconds", absl::ToDoubleSeconds(absl::Now() - start)}});
  }
  if (health_server_ != nullptr) health_server_->Shutdown(absl::ToChronoTime(absl::Now()));
  exposer_.reset();  // civetweb takes up to a second to stop its threads
}

void Server::Wait() {
  if (server_ != nullptr) server_->Wait();
}

}  // namespace tokensampler::service
