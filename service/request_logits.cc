#include "service/request_logits.h"

#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "service/convert.h"

namespace tokensampler::service {

absl::StatusOr<RequestLogits> RequestLogits::Resolve(
    const v1::Logits& logits, const SharedMemoryAccess& access, bool allow_sparse,
    int64_t max_tensor_bytes, absl::Span<const LogitsView::Piece> data_pieces) {
  RequestLogits out;
  if (logits.source_case() == v1::Logits::kSharedMemory ||
      logits.source_case() == v1::Logits::kSparse) {
    ASSIGN_OR_RETURN(const DType dtype, DTypeFromProto(logits.dtype()));
    // rows and vocab_size are 32-bit: the product fits in 64 bits.
    const uint64_t dense = uint64_t{logits.rows()} * logits.vocab_size() * DTypeSize(dtype);
    if (dense > static_cast<uint64_t>(max_tensor_bytes)) {
      return absl::ResourceExhaustedError(
          absl::StrCat("logits: rows × vocab_size × ", DTypeSize(dtype), " = ", logits.rows(),
                       " × ", logits.vocab_size(), " × ", DTypeSize(dtype), " = ", dense,
                       " bytes is above the largest tensor this server samples (", max_tensor_bytes,
                       " bytes, its --max_message_bytes)"));
    }
  }
  switch (logits.source_case()) {
    case v1::Logits::kData:
    case v1::Logits::SOURCE_NOT_SET: {
      ASSIGN_OR_RETURN(out.view_, LogitsFromProto(logits, data_pieces));
      return out;
    }
    case v1::Logits::kSharedMemory: {
      ASSIGN_OR_RETURN(const DType dtype, DTypeFromProto(logits.dtype()));
      if (access.registry == nullptr) {
        return absl::FailedPreconditionError(
            "logits.shared_memory: this server has no shared memory; send the logits as bytes");
      }
      const v1::SharedMemoryRef& ref = logits.shared_memory();
      absl::StatusOr<SharedMemoryRegistry::Lease> lease =
          access.registry->Find(access.caller, ref.region());
      if (!lease.ok()) {
        return absl::Status(lease.status().code(),
                            absl::StrCat("logits.shared_memory.", lease.status().message()));
      }
      out.lease_ = *std::move(lease);
      const absl::Span<const uint8_t> bytes = out.lease_.region->bytes();
      if (ref.offset() > bytes.size() || ref.byte_size() > bytes.size() - ref.offset()) {
        return absl::OutOfRangeError(
            absl::StrCat("logits.shared_memory: offset + byte_size = ", ref.offset(), " + ",
                         ref.byte_size(), " is beyond the end of ", out.lease_.description));
      }
      const uint64_t expected = uint64_t{logits.rows()} * logits.vocab_size() * DTypeSize(dtype);
      if (ref.byte_size() != expected) {
        return absl::InvalidArgumentError(
            absl::StrCat("logits.shared_memory.byte_size is ", ref.byte_size(),
                         ", expected rows × vocab_size × ", DTypeSize(dtype), " = ", logits.rows(),
                         " × ", logits.vocab_size(), " × ", DTypeSize(dtype), " = ", expected,
                         " for ", DTypeName(dtype)));
      }
      RETURN_IF_ERROR(out.lease_.region->CheckReadable(
          absl::StrCat("logits.shared_memory: ", out.lease_.description)));
      ASSIGN_OR_RETURN(out.view_, LogitsView::Create(dtype, logits.rows(), logits.vocab_size(),
                                                     bytes.subspan(ref.offset(), ref.byte_size()),
                                                     /*shared=*/true));
      return out;
    }
    case v1::Logits::kSparse: {
      if (!allow_sparse) {
        return absl::InvalidArgumentError(
            "logits.sparse is accepted by Sample only; send dense logits (data or "
            "shared_memory)");
      }
      ASSIGN_OR_RETURN(const DType dtype, DTypeFromProto(logits.dtype()));
      const v1::SparseCandidates& sparse = logits.sparse();
      const auto bytes = [](const std::string& s) {
        return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
      };
      ASSIGN_OR_RETURN(
          SparseBatch batch,
          SparseBatch::Create(SparseRows{.dtype = dtype,
                                         .rows = logits.rows(),
                                         .vocab_size = logits.vocab_size(),
                                         .k = sparse.k(),
                                         .token_ids = bytes(sparse.token_ids()),
                                         .values = bytes(sparse.values()),
                                         .rest_logsumexp = absl::Span<const float>(
                                             sparse.rest_logsumexp().data(),
                                             static_cast<size_t>(sparse.rest_logsumexp_size()))}));
      out.sparse_.emplace(std::move(batch));
      out.view_ = out.sparse_->view();
      return out;
    }
  }
  return absl::InvalidArgumentError("logits: unknown source");
}

absl::Status RequestLogits::CheckAfterRead() const {
  if (lease_.region != nullptr && lease_.region->faulted()) {
    return lease_.region->CheckReadable(absl::StrCat("logits.shared_memory: ", lease_.description));
  }
  return absl::OkStatus();
}

}  // namespace tokensampler::service
