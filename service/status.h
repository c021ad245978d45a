// The one mapping from absl::Status (what core and the converters return) to grpc::Status (what
// goes on the wire). Pure functions: thread-safe.
#ifndef TOKENSAMPLER_SERVICE_STATUS_H_
#define TOKENSAMPLER_SERVICE_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace tokensampler::service {

// Returns a grpc::Status with the code of the same name (absl and gRPC share the canonical code
// numbers) and the same message. An OK status maps to grpc::Status::OK; a code outside the
// canonical set maps to UNKNOWN.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_STATUS_H_
