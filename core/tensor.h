// Logits tensors: element types and a read-only view over caller-owned bytes.
// LogitsView is a value (pointer + shape); it is thread-safe to read from many threads as long
// as the bytes it views outlive it and are not written meanwhile.
#ifndef TOKENSAMPLER_CORE_TENSOR_H_
#define TOKENSAMPLER_CORE_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace tokensampler {

enum class DType : uint8_t { kFloat32, kBFloat16, kFloat16 };

// Bytes per element.
constexpr size_t DTypeSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }
absl::string_view DTypeName(DType dtype);

// bfloat16 is the upper half of an IEEE float32: exact.
inline float Bf16ToFloat(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

// IEEE binary16 → float32, exact for every input including subnormals, ±Inf and NaN.
inline float Fp16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // Inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // normal: rebias 15 → 127
  } else if (mant == 0) {
    bits = sign;  // ±0
  } else {
    // Subnormal: value = mant · 2^-24, which is a normal float32.
    uint32_t m = mant;
    uint32_t e = 113;  // 127 - 14
    while ((m & 0x400u) == 0) {
      m <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((m & 0x3ffu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// float32 → bfloat16 / float16 with round-to-nearest-even (used by clients, tests, benchmarks).
uint16_t FloatToBf16(float value);
uint16_t FloatToFp16(float value);

// A dense [rows × vocab] tensor of `dtype` elements, row-major, little-endian, over bytes owned by
// the caller (a request's `data`, a shared-memory mapping). Never copies the bytes.
class LogitsView {
 public:
  LogitsView() = default;

  // Returns a view, or INVALID_ARGUMENT naming the field when vocab_size is 0 or
  // bytes.size() != rows × vocab_size × DTypeSize(dtype). `shared`: the bytes are another
  // process's memory (a shared-memory region), which may change while they are read; the
  // sampler then copies each row as it reads it, or reads it twice only when it checks the
  // second read against the first (Dist::Deferred).
  static absl::StatusOr<LogitsView> Create(DType dtype, uint32_t rows, uint32_t vocab_size,
                                           absl::Span<const uint8_t> bytes, bool shared = false);

  // Consecutive bytes of a tensor held in pieces: `offset` is where `bytes` starts in the tensor.
  struct Piece {
    size_t offset = 0;
    absl::Span<const uint8_t> bytes;
  };
  // A view over bytes in pieces, as gRPC hands a request to its handler (slices of at most
  // 64 KiB): `pieces` in order, each starting where the previous ends, together rows ×
  // vocab_size × DTypeSize(dtype) bytes (the same error as Create otherwise). The pieces are
  // borrowed like Create's bytes. Rows straddle pieces: only Sampler::Run takes such a view, and
  // copies each row into contiguous scratch when it samples it (CopyRow); RowBytes and At need a
  // view from Create.
  static absl::StatusOr<LogitsView> CreateFromPieces(DType dtype, uint32_t rows,
                                                     uint32_t vocab_size,
                                                     absl::Span<const Piece> pieces);

  DType dtype() const { return dtype_; }
  bool shared() const { return shared_; }
  bool in_pieces() const { return !pieces_.empty(); }
  int rows() const { return rows_; }
  int vocab_size() const { return vocab_size_; }

  // The logit of `token` in `row`, decoded to float. REQUIRES: indices in range.
  float At(int row, int token) const {
    const uint8_t* p = RowBytes(row) + static_cast<size_t>(token) * DTypeSize(dtype_);
    switch (dtype_) {
      case DType::kFloat32: {
        float f;
        std::memcpy(&f, p, sizeof(f));
        return f;
      }
      case DType::kBFloat16:
        return Bf16ToFloat(Load16(p));
      case DType::kFloat16:
        return Fp16ToFloat(Load16(p));
    }
    return 0.0f;
  }

  // The raw bytes of one row. REQUIRES: 0 <= row < rows(), !in_pieces().
  const uint8_t* RowBytes(int row) const { return data_ + static_cast<size_t>(row) * RowSize(); }

  // Bytes per row.
  size_t RowSize() const { return static_cast<size_t>(vocab_size_) * DTypeSize(dtype_); }

  // Copies row `row`'s RowSize() bytes to `out`, from any view. REQUIRES: 0 <= row < rows().
  void CopyRow(int row, uint8_t* out) const;

 private:
  static uint16_t Load16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }

  const uint8_t* data_ = nullptr;   // null when in pieces
  absl::Span<const Piece> pieces_;  // empty unless in pieces
  DType dtype_ = DType::kFloat32;
  int rows_ = 0;
  int vocab_size_ = 0;
  bool shared_ = false;
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_TENSOR_H_
