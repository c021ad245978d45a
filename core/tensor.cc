#include "core/tensor.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace tokensampler {

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat16:
      return "float16";
  }
  return "unknown";
}

uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);                    // to nearest even
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

uint16_t FloatToFp16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // Inf or NaN
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to ≥ 65520 → Inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): value / 2^-24 rounded to nearest even.
    if (abs < 0x33000000u) return sign;  // < 2^-25: rounds to zero
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 113 - exp + 13
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t mid = 1u << (shift - 1u);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  // Normal: rebias and round the 13 dropped bits to nearest even.
  const uint32_t rebased = abs - (112u << 23);
  const uint32_t rounding = 0xfffu + ((rebased >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rebased + rounding) >> 13));
}

absl::StatusOr<LogitsView> LogitsView::Create(DType dtype, uint32_t rows, uint32_t vocab_size,
                                              absl::Span<const uint8_t> bytes, bool shared) {
  if (vocab_size == 0) {
    return absl::InvalidArgumentError("logits.vocab_size must be > 0, got 0");
  }
  if (vocab_size > static_cast<uint32_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits.vocab_size must be < 2^31, got ", vocab_size));
  }
  const uint64_t expected = uint64_t{rows} * vocab_size * DTypeSize(dtype);
  if (bytes.size() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits.data has ", bytes.size(), " bytes, expected rows × vocab_size × ",
                     DTypeSize(dtype), " = ", rows, " × ", vocab_size, " × ", DTypeSize(dtype),
                     " = ", expected, " for ", DTypeName(dtype)));
  }
  LogitsView view;
  view.data_ = bytes.data();
  view.dtype_ = dtype;
  view.rows_ = static_cast<int>(rows);
  view.vocab_size_ = static_cast<int>(vocab_size);
  view.shared_ = shared;
  return view;
}

absl::StatusOr<LogitsView> LogitsView::CreateFromPieces(DType dtype, uint32_t rows,
                                                        uint32_t vocab_size,
                                                        absl::Span<const Piece> pieces) {
  size_t total = 0;
  for (const Piece& piece : pieces) {
    if (piece.offset != total) {
      return absl::InternalError(absl::StrCat("logits: a piece starts at byte ", piece.offset,
                                              " where the previous ones end at ", total));
    }
    total += piece.bytes.size();
  }
  // The shape checks and their messages, on a stand-in of the pieces' total size.
  ASSIGN_OR_RETURN(LogitsView view,
                   Create(dtype, rows, vocab_size, absl::Span<const uint8_t>(nullptr, total)));
  if (pieces.size() == 1) {
    view.data_ = pieces[0].bytes.data();
  } else {
    view.data_ = nullptr;
    view.pieces_ = pieces;
  }
  return view;
}

void LogitsView::CopyRow(int row, uint8_t* out) const {
  const size_t size = RowSize();
  const size_t begin = static_cast<size_t>(row) * size;
  if (pieces_.empty()) {
    std::memcpy(out, data_ + begin, size);
    return;
  }
  // The last piece that starts at or before `begin`, then forward.
  auto it = std::upper_bound(pieces_.begin(), pieces_.end(), begin,
                             [](size_t at, const Piece& piece) { return at < piece.offset; });
  --it;
  size_t at = begin, left = size;
  for (; left > 0; ++it) {
    const size_t skip = at - it->offset;
    const size_t n = std::min(left, it->bytes.size() - skip);
    std::memcpy(out, it->bytes.data() + skip, n);
    out += n;
    at += n;
    left -= n;
  }
}

}  // namespace tokensampler
