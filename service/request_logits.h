// RequestLogits: a request's `Logits` resolved from whichever source it used — bytes in the
// message, a registered shared-memory region (no copy), or sparse candidates (densified by
// core/sparse.h) — to the LogitsView the core samples from, plus what keeps those bytes alive.
//
// Thread-compatible: one request's work owns it.
#ifndef TOKENSAMPLER_SERVICE_REQUEST_LOGITS_H_
#define TOKENSAMPLER_SERVICE_REQUEST_LOGITS_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/sparse.h"
#include "core/tensor.h"
#include "service/shared_memory.h"
#include "tokensampler/v1/sampler.pb.h"

namespace tokensampler::service {

// Who is asking, for shared-memory references. `registry` null = shared memory unavailable.
struct SharedMemoryAccess {
  const SharedMemoryRegistry* registry = nullptr;
  SharedMemoryCaller caller;
};

class RequestLogits {
 public:
  // Resolves `logits`. Errors name the field under "logits." (callers prefix the message's
  // path, e.g. "step."): INVALID_ARGUMENT for the shape checks of LogitsFromProto, a
  // shared-memory byte_size other than rows × vocab_size × dtype size, or sparse logits when
  // `allow_sparse` is false (and SparseBatch::Create's errors); OUT_OF_RANGE for a reference
  // beyond its region (offset + byte_size, overflow included); NOT_FOUND for an unknown region;
  // FAILED_PRECONDITION when shared memory is off for the caller or the region is unreadable;
  // RESOURCE_EXHAUSTED when a shared-memory or sparse tensor's dense size (rows × vocab_size ×
  // dtype size) is above `max_tensor_bytes` — the bound a dense request has from the message
  // size limit, which keeps a small request from making the server allocate without limit.
  // Ownership: borrows `logits` (must outlive this) for `data`; holds the region for
  // `shared_memory`; owns the dense copy for `sparse`.
  // `data_pieces`, when not empty, are the bytes of `data` (left empty in `logits`) where the
  // request was received (ReceivedSampleRequest); they must outlive this.
  static absl::StatusOr<RequestLogits> Resolve(
      const v1::Logits& logits, const SharedMemoryAccess& access, bool allow_sparse,
      int64_t max_tensor_bytes, absl::Span<const LogitsView::Piece> data_pieces = {});

  RequestLogits(RequestLogits&&) = default;
  RequestLogits& operator=(RequestLogits&&) = default;

  const LogitsView& view() const { return view_; }
  // Set for sparse logits: the per-row exactness checks and the logprob correction.
  const SparseBatch* sparse() const { return sparse_.has_value() ? &*sparse_ : nullptr; }

  // After the view has been read: FAILED_PRECONDITION naming the region if it faulted during
  // the read (its object was truncated under it), OK otherwise.
  absl::Status CheckAfterRead() const;

 private:
  RequestLogits() = default;

  LogitsView view_;
  SharedMemoryRegistry::Lease lease_;
  std::optional<SparseBatch> sparse_;
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_REQUEST_LOGITS_H_
