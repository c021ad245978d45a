#include "client/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "client/logits.h"

namespace tokensampler {
namespace {

void AppendValue(float value, v1::DType dtype, std::string& out) {
  if (dtype == v1::DTYPE_FLOAT32) {
    char bytes[4];
    std::memcpy(bytes, &value, 4);
    out.append(bytes, 4);
    return;
  }
  const uint16_t half = dtype == v1::DTYPE_BFLOAT16 ? RoundToBf16(value) : RoundToFp16(value);
  const char bytes[2] = {static_cast<char>(half & 0xffu), static_cast<char>(half >> 8)};
  out.append(bytes, 2);
}

}  // namespace

absl::StatusOr<SharedMemoryBuffer> SharedMemoryBuffer::Create(const std::string& key, size_t size) {
  if (key.size() < 2 || key[0] != '/' || key.find('/', 1) != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("key must be a POSIX shm name \"/name\", got \"", key, "\""));
  }
  if (size == 0) return absl::InvalidArgumentError("size must be > 0, got 0");
  const int fd = shm_open(key.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) {
    const std::string message = absl::StrCat("shm_open ", key, ": ", std::strerror(errno));
    return errno == EEXIST ? absl::AlreadyExistsError(message) : absl::InternalError(message);
  }
  SharedMemoryBuffer buffer;
  buffer.key_ = key;
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    const std::string message = absl::StrCat("ftruncate ", key, ": ", std::strerror(errno));
    close(fd);
    shm_unlink(key.c_str());
    return absl::InternalError(message);
  }
  void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int mmap_errno = errno;
  close(fd);
  if (data == MAP_FAILED) {
    shm_unlink(key.c_str());
    return absl::InternalError(absl::StrCat("mmap ", key, ": ", std::strerror(mmap_errno)));
  }
  buffer.data_ = static_cast<uint8_t*>(data);
  buffer.size_ = size;
  return buffer;
}

SharedMemoryBuffer::~SharedMemoryBuffer() { Reset(); }

SharedMemoryBuffer::SharedMemoryBuffer(SharedMemoryBuffer&& other) noexcept
    : key_(std::move(other.key_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {
  other.key_.clear();
}

SharedMemoryBuffer& SharedMemoryBuffer::operator=(SharedMemoryBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    key_ = std::move(other.key_);
    other.key_.clear();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void SharedMemoryBuffer::Reset() {
  if (data_ != nullptr) munmap(data_, size_);
  if (!key_.empty()) shm_unlink(key_.c_str());
  data_ = nullptr;
  size_ = 0;
  key_.clear();
}

v1::Logits SharedMemoryLogits(const std::string& region, uint64_t offset, uint32_t rows,
                              uint32_t vocab_size, v1::DType dtype) {
  v1::Logits logits;
  logits.set_dtype(dtype);
  logits.set_rows(rows);
  logits.set_vocab_size(vocab_size);
  v1::SharedMemoryRef& ref = *logits.mutable_shared_memory();
  ref.set_region(region);
  ref.set_offset(offset);
  ref.set_byte_size(uint64_t{rows} * vocab_size * DTypeBytes(dtype));
  return logits;
}

absl::StatusOr<v1::Logits> SparseLogits(absl::Span<const int32_t> token_ids,
                                        absl::Span<const float> values,
                                        absl::Span<const float> rest_logsumexp, uint32_t k,
                                        uint32_t vocab_size, v1::DType dtype) {
  if (DTypeBytes(dtype) == 0) {
    return absl::InvalidArgumentError(
        "dtype must be DTYPE_FLOAT32, DTYPE_BFLOAT16 or "
        "DTYPE_FLOAT16");
  }
  if (k == 0) return absl::InvalidArgumentError("k must be > 0, got 0");
  const size_t rows = rest_logsumexp.size();
  if (token_ids.size() != rows * k || values.size() != rows * k) {
    return absl::InvalidArgumentError(
        absl::StrCat("token_ids (", token_ids.size(), ") and values (", values.size(),
                     ") must hold rows × k = ", rows, " × ", k, " entries"));
  }
  v1::Logits logits;
  logits.set_dtype(dtype);
  logits.set_rows(static_cast<uint32_t>(rows));
  logits.set_vocab_size(vocab_size);
  v1::SparseCandidates& sparse = *logits.mutable_sparse();
  sparse.set_k(k);
  std::string& ids = *sparse.mutable_token_ids();
  ids.resize(token_ids.size() * 4);
  for (size_t i = 0; i < token_ids.size(); ++i) {
    const uint32_t id = static_cast<uint32_t>(token_ids[i]);
    for (size_t b = 0; b < 4; ++b) ids[4 * i + b] = static_cast<char>((id >> (8 * b)) & 0xffu);
  }
  std::string& encoded = *sparse.mutable_values();
  encoded.reserve(values.size() * DTypeBytes(dtype));
  for (float value : values) AppendValue(value, dtype, encoded);
  sparse.mutable_rest_logsumexp()->Add(rest_logsumexp.begin(), rest_logsumexp.end());
  return logits;
}

absl::StatusOr<v1::Logits> SparseLogitsFromDense(absl::Span<const float> logits,
                                                 uint32_t vocab_size, uint32_t k, v1::DType dtype) {
  if (vocab_size == 0 || logits.size() % vocab_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "logits hold ", logits.size(), " values, not a whole number of rows of ", vocab_size));
  }
  if (k == 0 || k > vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("k must be in [1, vocab_size = ", vocab_size, "], got ", k));
  }
  const size_t rows = logits.size() / vocab_size;
  std::vector<int32_t> ids(rows * k);
  std::vector<float> values(rows * k);
  std::vector<float> rest(rows);
  std::vector<int32_t> order(vocab_size);
  for (size_t r = 0; r < rows; ++r) {
    const float* row = logits.data() + r * vocab_size;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [row](int32_t a, int32_t b) {
      return row[a] > row[b] || (row[a] == row[b] && a < b);
    });
    float max = -std::numeric_limits<float>::infinity();
    for (uint32_t j = k; j < vocab_size; ++j) max = std::max(max, row[order[j]]);
    double sum = 0.0;
    if (max != -std::numeric_limits<float>::infinity()) {
      for (uint32_t j = k; j < vocab_size; ++j) {
        sum += std::exp(static_cast<double>(row[order[j]]) - max);
      }
    }
    rest[r] = max == -std::numeric_limits<float>::infinity()
                  ? max
                  : static_cast<float>(static_cast<double>(max) + std::log(sum));
    for (uint32_t j = 0; j < k; ++j) {
      ids[r * k + j] = order[j];
      values[r * k + j] = row[order[j]];
    }
  }
  return SparseLogits(ids, values, rest, k, vocab_size, dtype);
}

}  // namespace tokensampler
