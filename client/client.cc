#include "client/client.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>
#include <grpcpp/support/stub_options.h>

#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "client/health_check.pb.h"
#include "google/protobuf/io/coded_stream.h"

namespace tokensampler {
namespace {

namespace health = client_internal::health;

// The full method name on the wire; our message copy lives in another package (see the proto).
constexpr absl::string_view kHealthCheckMethod = "/grpc.health.v1.Health/Check";

// Prepares `context` for one call: deadline, wait-for-ready, bearer token.
void Configure(grpc::ClientContext& context, absl::Duration timeout, const ClientOptions& options) {
  const absl::Time deadline = absl::Now() + timeout;
  if (deadline != absl::InfiniteFuture()) context.set_deadline(absl::ToChronoTime(deadline));
  context.set_wait_for_ready(options.wait_for_ready);
  if (!options.bearer_token.empty()) {
    context.AddMetadata("authorization", absl::StrCat("Bearer ", options.bearer_token));
  }
}

absl::Status ValidateSecurity(const ClientOptions& options) {
  if (options.tls.has_value() &&
      options.tls->cert_chain.empty() != options.tls->private_key.empty()) {
    return absl::InvalidArgumentError(
        "tls: the client certificate chain and private key must be given together");
  }
  for (const char c : options.bearer_token) {
    // gRPC sends ASCII metadata values as they are; anything else would be refused on send.
    if (c < 0x20 || c > 0x7e) {
      return absl::InvalidArgumentError(
          "bearer_token must be printable ASCII (no newline or control character)");
    }
  }
  return absl::OkStatus();
}

std::shared_ptr<grpc::ChannelCredentials> Credentials(const ClientOptions& options) {
  if (!options.tls.has_value()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = options.tls->root_certs;
  ssl.pem_cert_chain = options.tls->cert_chain;
  ssl.pem_private_key = options.tls->private_key;
  return grpc::SslCredentials(ssl);
}

// One unary call through the generic stub, blocking: gRPC 1.51's generic stub has no blocking
// unary call, so this starts the callback one and waits. (A completion queue of the caller's own,
// polled by this thread as the generated blocking stubs do, moved 16 MiB requests 10–20 % slower
// over a Unix socket.)
template <class Request, class Response>
grpc::Status BlockingUnaryCall(const std::shared_ptr<grpc::Channel>& channel,
                               grpc::ClientContext& context, absl::string_view method,
                               const Request& request, Response* response) {
  grpc::TemplatedGenericStub<Request, Response> stub(channel);
  absl::Notification done;
  grpc::Status status;
  stub.UnaryCall(&context, std::string(method), grpc::StubOptions(), &request, response,
                 [&status, &done](grpc::Status s) {
                   status = std::move(s);
                   done.Notify();
                 });
  done.WaitForNotification();
  return status;
}

// The unary methods whose requests carry `Logits logits = 1` next to `repeated … rows = 2`.
constexpr absl::string_view kSampleMethod = "/tokensampler.v1.Sampler/Sample";
constexpr absl::string_view kVerifyMethod = "/tokensampler.v1.Sampler/Verify";

// A request whose logits bytes are at least this large goes out without a copy of them.
constexpr size_t kAliasMinBytes = size_t{1} << 20;

// Counts the slices gRPC still holds that alias a request's own bytes; a call returns only once
// gRPC has released every one (the transport may hold them a little after the call's status,
// while it finishes a write).
class Aliases {
 public:
  static void Release(void* self) {
    auto* aliases = static_cast<Aliases*>(self);
    absl::MutexLock lock(&aliases->mu_);
    --aliases->held_;
  }
  void Hold() {
    absl::MutexLock lock(&mu_);
    ++held_;
  }
  void WaitForNone() {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](int* held) { return *held == 0; }, &held_));
  }

 private:
  absl::Mutex mu_;
  int held_ ABSL_GUARDED_BY(mu_) = 0;
};

// The wire form of `request` with its logits bytes as a slice of the request's own memory: first
// the message without them, then a second `logits` field that carries only `data`. A parser
// merges two occurrences of an embedded message into one (the protobuf encoding's rule), so the
// server reads exactly `request`. REQUIRES: request.logits() holds `data` (the oneof's other
// members are then unset), which must outlive the call and `aliases`' wait.
template <class Request>
grpc::ByteBuffer AliasingRequest(const Request& request, Aliases& aliases) {
  const v1::Logits& logits = request.logits();
  Request head;
  *head.mutable_rows() = request.rows();
  v1::Logits& head_logits = *head.mutable_logits();
  head_logits.set_dtype(logits.dtype());
  head_logits.set_rows(logits.rows());
  head_logits.set_vocab_size(logits.vocab_size());
  std::string prefix = head.SerializeAsString();

  // <logits: field 1> <length> <data: field 4 of Logits> <length>, both length-delimited.
  using google::protobuf::io::CodedOutputStream;
  constexpr uint8_t kLogitsTag = (1 << 3) | 2;
  constexpr uint8_t kDataTag = (4 << 3) | 2;
  const std::string& data = logits.data();
  const size_t inner = 1 + CodedOutputStream::VarintSize64(data.size()) + data.size();
  uint8_t frame[1 + 10 + 1 + 10];
  uint8_t* end = frame;
  *end++ = kLogitsTag;
  end = CodedOutputStream::WriteVarint64ToArray(inner, end);
  *end++ = kDataTag;
  end = CodedOutputStream::WriteVarint64ToArray(data.size(), end);
  prefix.append(reinterpret_cast<const char*>(frame), static_cast<size_t>(end - frame));

  aliases.Hold();
  grpc::Slice slices[2] = {
      grpc::Slice(prefix),
      // gRPC only reads the bytes (grpc::Slice has no const constructor with a release callback).
      grpc::Slice(const_cast<char*>(data.data()), data.size(), &Aliases::Release, &aliases)};
  return grpc::ByteBuffer(slices, 2);
}

// Whether `request` is sent by AliasedCall: its logits are bytes of at least kAliasMinBytes.
template <class Request>
bool Aliased(const Request& request) {
  return request.logits().source_case() == v1::Logits::kData &&
         request.logits().data().size() >= kAliasMinBytes;
}

// One unary call of `method` with the logits bytes sent from the request's own memory: copying
// them into the message would cost about as much as moving them through a Unix socket. (Smaller
// requests take the generated blocking stub, whose calls return sooner.)
template <class Request, class Response>
grpc::Status AliasedCall(const std::shared_ptr<grpc::Channel>& channel, absl::string_view method,
                         grpc::ClientContext& context, const Request& request, Response* response) {
  Aliases aliases;
  grpc::Status status;
  {
    const grpc::ByteBuffer buffer = AliasingRequest(request, aliases);
    status = BlockingUnaryCall(channel, context, method, buffer, response);
  }
  aliases.WaitForNone();
  return status;
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  const int code = static_cast<int>(status.error_code());
  // Both enums number the canonical codes 0..16 identically.
  const auto absl_code = (code > 0 && code <= static_cast<int>(absl::StatusCode::kUnauthenticated))
                             ? static_cast<absl::StatusCode>(code)
                             : absl::StatusCode::kUnknown;
  return {absl_code, status.error_message()};
}

absl::StatusOr<Client> Client::Create(absl::string_view target, const ClientOptions& options) {
  if (target.empty() || target == "unix:" || target == "unix://") {
    return absl::InvalidArgumentError(
        absl::StrCat("target must be host:port or unix:/path, got \"", target, "\""));
  }
  if (absl::Status valid = ValidateSecurity(options); !valid.ok()) return valid;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_message_bytes);
  args.SetMaxSendMessageSize(options.max_message_bytes);
  args.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, options.use_http_proxy ? 1 : 0);
  if (options.large_message_tuning) {
    // The same settings as the server's (TransportOptions): large fixed windows and frames,
    // large socket reads and writes.
    args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
    args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
    args.SetInt(GRPC_ARG_HTTP2_MAX_FRAME_SIZE, (1 << 24) - 1);
    args.SetInt(GRPC_ARG_HTTP2_WRITE_BUFFER_SIZE, 64 << 20);
    args.SetInt(GRPC_ARG_TCP_READ_CHUNK_SIZE, 4 << 20);
    args.SetInt(GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, 4 << 20);
    args.SetInt(GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, 16 << 20);
  }
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(std::string(target), Credentials(options), args);
  if (channel == nullptr) {
    return absl::InternalError(absl::StrCat("could not create a channel to \"", target, "\""));
  }
  return Client(std::string(target), options, std::move(channel));
}

Client::Client(std::string target, const ClientOptions& options,
               std::shared_ptr<grpc::Channel> channel)
    : target_(std::move(target)),
      options_(options),
      channel_(std::move(channel)),
      stub_(v1::Sampler::NewStub(channel_)) {}

absl::StatusOr<v1::SampleResponse> Client::Sample(const v1::SampleRequest& request,
                                                  absl::Duration timeout) const {
  grpc::ClientContext context;
  Configure(context, timeout, options_);
  v1::SampleResponse response;
  const grpc::Status status =
      Aliased(request) ? AliasedCall(channel_, kSampleMethod, context, request, &response)
                       : stub_->Sample(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::VerifyResponse> Client::Verify(const v1::VerifyRequest& request,
                                                  absl::Duration timeout) const {
  grpc::ClientContext context;
  Configure(context, timeout, options_);
  v1::VerifyResponse response;
  const grpc::Status status =
      Aliased(request) ? AliasedCall(channel_, kVerifyMethod, context, request, &response)
                       : stub_->Verify(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<std::string> Client::RegisterSharedMemory(const std::string& name,
                                                         const std::string& key, uint64_t offset,
                                                         uint64_t byte_size,
                                                         absl::Duration timeout) const {
  grpc::ClientContext context;
  Configure(context, timeout, options_);
  v1::RegisterSharedMemoryRequest request;
  request.set_name(name);
  request.set_key(key);
  request.set_offset(offset);
  request.set_byte_size(byte_size);
  v1::RegisterSharedMemoryResponse response;
  const grpc::Status status = stub_->RegisterSharedMemory(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response.region();
}

absl::Status Client::UnregisterSharedMemory(const std::string& region,
                                            absl::Duration timeout) const {
  grpc::ClientContext context;
  Configure(context, timeout, options_);
  v1::UnregisterSharedMemoryRequest request;
  request.set_region(region);
  v1::UnregisterSharedMemoryResponse response;
  return FromGrpcStatus(stub_->UnregisterSharedMemory(&context, request, &response));
}

absl::StatusOr<v1::ListSharedMemoryResponse> Client::ListSharedMemory(
    const std::vector<std::string>& regions, absl::Duration timeout) const {
  grpc::ClientContext context;
  Configure(context, timeout, options_);
  v1::ListSharedMemoryRequest request;
  for (const std::string& region : regions) request.add_regions(region);
  v1::ListSharedMemoryResponse response;
  const grpc::Status status = stub_->ListSharedMemory(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<bool> Client::Health(absl::string_view service, absl::Duration timeout) const {
  grpc::ClientContext context;
  Configure(context, timeout, options_);
  health::HealthCheckRequest request;
  request.set_service(std::string(service));
  health::HealthCheckResponse response;
  const grpc::Status status =
      BlockingUnaryCall(channel_, context, kHealthCheckMethod, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response.status() == health::HealthCheckResponse::SERVING;
}

}  // namespace tokensampler
