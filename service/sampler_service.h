// SamplerService: the tokensampler.v1.Sampler gRPC service (callback API): the stateless Sample
// and Verify (speculative decoding) and the stateful Session stream (service/session_stream.h).
//
// Thread-safe: gRPC calls the handlers from many threads at once. Handlers never block a gRPC
// thread: each call goes through the server's CallGuard (drain, token, limits, metrics) and is
// enqueued into the tbb::task_arena the service is handed (StartUnaryCall; a Session stream
// admits each of its requests the same way); the work runs there (core parallelises inside the
// same arena), and the call (the request's response) is finished from that task.
#ifndef TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_
#define TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>

#include "absl/status/status.h"
#include "core/sampler.h"
#include "core/speculative.h"
#include "oneapi/tbb/task_arena.h"
#include "service/call_guard.h"
#include "service/metrics.h"
#include "service/received_request.h"
#include "service/request_logits.h"
#include "service/session_stream.h"
#include "service/shared_memory.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {

// The generated callback service with every method raw: the handlers parse their messages
// themselves — Sample without copying its logits bytes (ReceivedSampleRequest), the others with
// protobuf (ParseReceived) — so that a message that does not parse is answered INVALID_ARGUMENT
// naming its type. (gRPC 1.51's typed callback methods answer such a request UNIMPLEMENTED with
// no message, and end a typed stream at such a message as if the client had closed it.) Built
// from the per-method classes: on v1::Sampler::CallbackService a raw method would hide the
// typed one.
using SamplerServiceBase = v1::Sampler::WithRawCallbackMethod_Sample<
    v1::Sampler::WithRawCallbackMethod_Session<v1::Sampler::WithRawCallbackMethod_Verify<
        v1::Sampler::WithRawCallbackMethod_RegisterSharedMemory<
            v1::Sampler::WithRawCallbackMethod_UnregisterSharedMemory<
                v1::Sampler::WithRawCallbackMethod_ListSharedMemory<v1::Sampler::Service>>>>>>;

class SamplerService final : public SamplerServiceBase {
 public:
  // `arena` runs every call's work; `guard` admits and accounts every call (and waits for the
  // tasks it enqueued); `metrics` holds the per-RPC metrics and the session gauges;
  // `shared_memory` (nullable: none) holds the registered regions; `max_tensor_bytes` bounds the
  // dense size of shared-memory and sparse tensors (RequestLogits::Resolve). All borrowed: they
  // must outlive the service, and the service must outlive the grpc::Server it is registered with
  // (grpc::Server::Shutdown waits for every call to be finished).
  SamplerService(tbb::task_arena& arena, CallGuard& guard, Metrics& metrics,
                 SessionOptions session_options = {}, SharedMemoryRegistry* shared_memory = nullptr,
                 int64_t max_tensor_bytes = int64_t{256} << 20);
  ~SamplerService() override = default;

  SamplerService(const SamplerService&) = delete;
  SamplerService& operator=(const SamplerService&) = delete;

  // The synchronous methods, which the raw ones disable.
  using SamplerServiceBase::ListSharedMemory;
  using SamplerServiceBase::RegisterSharedMemory;
  using SamplerServiceBase::Sample;
  using SamplerServiceBase::Session;
  using SamplerServiceBase::UnregisterSharedMemory;
  using SamplerServiceBase::Verify;

  // Sample (see sampler.proto for the status codes): a SampleRequest in, a SampleResponse out.
  grpc::ServerUnaryReactor* Sample(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;

  // Verify (see sampler.proto): speculative decoding, admitted and run like Sample.
  grpc::ServerUnaryReactor* Verify(grpc::CallbackServerContext* context,
                                   const grpc::ByteBuffer* request,
                                   grpc::ByteBuffer* response) override;
  // RegisterSharedMemory, UnregisterSharedMemory, ListSharedMemory (see sampler.proto).
  grpc::ServerUnaryReactor* RegisterSharedMemory(grpc::CallbackServerContext* context,
                                                 const grpc::ByteBuffer* request,
                                                 grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* UnregisterSharedMemory(grpc::CallbackServerContext* context,
                                                   const grpc::ByteBuffer* request,
                                                   grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* ListSharedMemory(grpc::CallbackServerContext* context,
                                             const grpc::ByteBuffer* request,
                                             grpc::ByteBuffer* response) override;

  // Session (see sampler.proto): one SessionStream per stream.
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Session(
      grpc::CallbackServerContext* context) override;

  // Session streams open now and the sequences live in them (for tests and metrics), and the
  // session steps stopped so far because their stream was cancelled.
  int64_t live_sessions() const { return sessions_.live_sessions(); }
  int64_t live_sequences() const { return sessions_.live_sequences(); }
  int64_t cancelled_session_steps() const { return sessions_.cancelled_steps(); }

 private:
  // The body of Sample; runs in the arena. Returns OK with `response` filled, or the error
  // (CANCELLED once `cancelled` is set).
  absl::Status SampleInArena(const ReceivedSampleRequest& request, v1::SampleResponse& response,
                             const SharedMemoryAccess& access,
                             const std::atomic<bool>& cancelled) const;
  // What a call may reach of the shared-memory registry.
  SharedMemoryAccess AccessOf(const grpc::CallbackServerContext& context) const;
  // AccessOf for a request whose tensor is `logits` (the caller only for a shared-memory one).
  SharedMemoryAccess AccessFor(const grpc::CallbackServerContext& context,
                               const v1::Logits& logits) const;

  // The body of Verify; runs in the arena (as SampleInArena).
  absl::Status VerifyInArena(const v1::VerifyRequest& request, v1::VerifyResponse& response,
                             const SharedMemoryAccess& access,
                             const std::atomic<bool>& cancelled) const;

  tbb::task_arena& arena_;
  CallGuard& guard_;
  RpcMetrics& sample_metrics_;
  RpcMetrics& session_metrics_;
  RpcMetrics& verify_metrics_;
  RpcMetrics& register_metrics_;
  RpcMetrics& unregister_metrics_;
  RpcMetrics& list_metrics_;
  SharedMemoryRegistry* const shared_memory_;
  // Largest dense size of a shared-memory or sparse tensor (the server's max_message_bytes).
  const int64_t max_tensor_bytes_;
  const Sampler sampler_;
  const Verifier verifier_{sampler_};
  const SessionOptions session_options_;

  // Destroyed first: waits for the session streams and their tasks, which use sampler_ and
  // session_options_.
  SessionRegistry sessions_;
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_
