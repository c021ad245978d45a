// StartUnaryCall: the whole life of a unary tokensampler call, for any unary RPC — admission
// through the CallGuard (drain, token, limits), the work on the sampling arena, cancellation and
// deadlines, metrics and logs. A handler is one call to it.
//
// Cancellation: when the client cancels or the deadline passes (gRPC calls OnCancel), a call
// still waiting in the arena's queue is answered at once and its work never runs (its slot
// under the limits is freed at once); a call already running sees its `cancelled` flag set,
// which core's Sampler::Run checks between rows. Either way the status is DEADLINE_EXCEEDED
// if the deadline passed, CANCELLED otherwise.
//
// Thread-safe.
#ifndef TOKENSAMPLER_SERVICE_UNARY_CALL_H_
#define TOKENSAMPLER_SERVICE_UNARY_CALL_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "core/status_macros.h"
#include "oneapi/tbb/task_arena.h"
#include "service/call_guard.h"
#include "service/metrics.h"
#include "service/received_request.h"

namespace tokensampler::service {

// What a unary call does on a sampling thread: fills the response and returns OK, or returns
// the error. It should stop early (CANCELLED) once `cancelled` becomes true.
using UnaryWork = std::function<absl::Status(const std::atomic<bool>& cancelled)>;

// Starts the call and returns its reactor (hand it back to gRPC). `request_bytes` and `rows`
// size the request for the limits and metrics. REQUIRES: `guard` and `arena` outlive the call;
// whatever `work` captures (typically the request and response) stays valid until the reactor
// is finished, which gRPC guarantees for its own request and response objects.
grpc::ServerUnaryReactor* StartUnaryCall(grpc::CallbackServerContext* context, CallGuard& guard,
                                         tbb::task_arena& arena, RpcMetrics& rpc,
                                         int64_t request_bytes, int64_t rows, UnaryWork work);

// The same for a raw method (service/received_request.h): parses `request_bytes` as a Request —
// bytes that do not parse are answered INVALID_ARGUMENT naming the message type, admitted,
// counted and logged like any call — then runs `work(request, response, cancelled)` as
// StartUnaryCall does and sends the Response it filled. `rows(request)` sizes the call for the
// limits and metrics. REQUIRES: as StartUnaryCall; `response_bytes` is gRPC's.
template <typename Request, typename Response, typename Rows, typename Work>
grpc::ServerUnaryReactor* StartRawUnaryCall(grpc::CallbackServerContext* context, CallGuard& guard,
                                            tbb::task_arena& arena, RpcMetrics& rpc,
                                            const grpc::ByteBuffer& request_bytes,
                                            grpc::ByteBuffer* response_bytes, const Rows& rows,
                                            Work work) {
  const auto size = static_cast<int64_t>(request_bytes.Length());
  auto request = std::make_shared<Request>();
  if (absl::Status parsed = ParseReceived(request_bytes, *request); !parsed.ok()) {
    return StartUnaryCall(context, guard, arena, rpc, size, 0,
                          [parsed](const std::atomic<bool>&) { return parsed; });
  }
  return StartUnaryCall(
      context, guard, arena, rpc, size, rows(*request),
      [request, response_bytes, work = std::move(work)](const std::atomic<bool>& cancelled) {
        Response response;
        RETURN_IF_ERROR(work(*request, response, cancelled));
        *response_bytes = SerializeForWire(response);
        return absl::OkStatus();
      });
}

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_UNARY_CALL_H_
