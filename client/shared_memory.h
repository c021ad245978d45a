// Client helpers for the fast inputs of tokensampler: shared-memory logits and sparse candidates.
//
//   SharedMemoryBuffer buffer = *SharedMemoryBuffer::Create("/worker0-logits", bytes);
//   std::string region = *client.RegisterSharedMemory("logits", buffer.key(), 0, buffer.size(),
//                                                     absl::Seconds(1));
//   ... write rows × vocab values into buffer.data() (e.g. cudaMemcpy from the GPU) ...
//   *request.mutable_logits() = SharedMemoryLogits(region, 0, rows, vocab, DTYPE_BFLOAT16);
//   client.Sample(request, ...);                 // the server reads buffer.data() in place
//
// A worker reuses one region for every step (overwrite, then Sample): registering is the only
// expensive call. The server maps the object when it is registered; unlinking it afterwards
// (this class does on destruction) is fine — the memory lives until both sides unmap it.
//
// Thread-safety: SharedMemoryBuffer is thread-compatible; the functions are pure (thread-safe).
#ifndef TOKENSAMPLER_CLIENT_SHARED_MEMORY_H_
#define TOKENSAMPLER_CLIENT_SHARED_MEMORY_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokensampler/v1/sampler.pb.h"

namespace tokensampler {

// A POSIX shared-memory object created by this process and mapped read-write.
class SharedMemoryBuffer {
 public:
  // Creates (O_EXCL) the object `key` ("/name") of `size` bytes and maps it. Returns
  // INVALID_ARGUMENT for a key that is not "/name" or a size of 0, ALREADY_EXISTS when the key
  // is taken, INTERNAL when shm_open / ftruncate / mmap fail.
  static absl::StatusOr<SharedMemoryBuffer> Create(const std::string& key, size_t size);

  // Unmaps and unlinks the object (a server that mapped it keeps its mapping).
  ~SharedMemoryBuffer();
  SharedMemoryBuffer(SharedMemoryBuffer&& other) noexcept;
  SharedMemoryBuffer& operator=(SharedMemoryBuffer&& other) noexcept;
  SharedMemoryBuffer(const SharedMemoryBuffer&) = delete;
  SharedMemoryBuffer& operator=(const SharedMemoryBuffer&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  // The key to register ("/name"); /dev/shm/name is the same object.
  const std::string& key() const { return key_; }

 private:
  SharedMemoryBuffer() = default;
  void Reset();

  std::string key_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// A Logits message that points at [offset, offset + rows × vocab_size × sizeof(dtype)) of the
// registered region `region` (the handle RegisterSharedMemory returned).
v1::Logits SharedMemoryLogits(const std::string& region, uint64_t offset, uint32_t rows,
                              uint32_t vocab_size, v1::DType dtype);

// Sparse candidates: a Logits message holding, per row, the `k` candidate ids and values
// (row-major [rows × k]) and the log-sum-exp of the logits outside them (`rest_logsumexp`, one
// per row; -inf when there are none). `values` are encoded as `dtype` (bf16 / fp16 rounded to
// nearest even). Returns INVALID_ARGUMENT when the sizes do not match rows × k or dtype is
// unspecified. The server checks the ids.
absl::StatusOr<v1::Logits> SparseLogits(absl::Span<const int32_t> token_ids,
                                        absl::Span<const float> values,
                                        absl::Span<const float> rest_logsumexp, uint32_t k,
                                        uint32_t vocab_size, v1::DType dtype);

// Computes the sparse candidates of dense rows on the CPU (a worker would do this on the GPU:
// torch.topk + torch.logsumexp): per row the k largest logits (ties by lower id) and the
// log-sum-exp of the rest. `logits` is row-major [rows × vocab_size]. Returns INVALID_ARGUMENT
// for k outside [1, vocab_size] or a size that is not a whole number of rows.
absl::StatusOr<v1::Logits> SparseLogitsFromDense(absl::Span<const float> logits,
                                                 uint32_t vocab_size, uint32_t k, v1::DType dtype);

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CLIENT_SHARED_MEMORY_H_
