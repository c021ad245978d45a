#include "client/logits.h"

#include <bit>
#include <cstring>
#include <limits>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace tokensampler {
namespace {

uint32_t FloatBits(float value) { return std::bit_cast<uint32_t>(value); }

// Stores `value` little-endian at `out`, whatever the host byte order.
void Store16(uint16_t value, char* out) {
  out[0] = static_cast<char>(value & 0xffu);
  out[1] = static_cast<char>(value >> 8);
}

// Returns the number of rows, or INVALID_ARGUMENT naming what is wrong with the shape.
absl::StatusOr<uint32_t> RowsOf(size_t elements, uint32_t vocab_size, v1::DType dtype) {
  if (DTypeBytes(dtype) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype must be DTYPE_FLOAT32, DTYPE_BFLOAT16 or DTYPE_FLOAT16, got ",
                     v1::DType_IsValid(dtype) ? v1::DType_Name(dtype) : absl::StrCat(dtype)));
  }
  if (vocab_size == 0) return absl::InvalidArgumentError("vocab_size must be > 0, got 0");
  if (elements % vocab_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("logits hold ", elements,
                                                   " values, which is not a multiple of "
                                                   "vocab_size ",
                                                   vocab_size));
  }
  const size_t rows = elements / vocab_size;
  if (rows > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits hold ", rows, " rows, more than 2^32 - 1"));
  }
  return static_cast<uint32_t>(rows);
}

}  // namespace

uint16_t RoundToBf16(float value) {
  const uint32_t bits = FloatBits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    // NaN: truncating could clear every kept mantissa bit and produce Inf; set the quiet bit.
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  // Adding 0x7fff rounds the dropped half up when it is above one half; the kept LSB decides the
  // tie. A carry out of the mantissa correctly bumps the exponent (up to Inf).
  const uint32_t tie_to_even = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7fffu + tie_to_even) >> 16);
}

uint16_t RoundToFp16(float value) {
  const uint32_t bits = FloatBits(value);
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;

  if (magnitude > 0x7f800000u) {  // NaN: quiet, keep the top payload bits
    return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x03ffu));
  }
  if (magnitude >= 0x477ff000u) {  // ≥ 65520 = 65504 + half an ulp: rounds to Inf (so does Inf)
    return static_cast<uint16_t>(sign | 0x7c00u);
  }
  if (magnitude >= 0x38800000u) {  // ≥ 2^-14: a normal half
    // Rebias the exponent from 127 to 15, then round away the 13 low mantissa bits; a carry
    // moves into the exponent, which is the correct result.
    const uint32_t rebiased = magnitude - (uint32_t{127 - 15} << 23);
    const uint32_t tie_to_even = (rebiased >> 13) & 1u;
    return static_cast<uint16_t>(sign | ((rebiased + 0x0fffu + tie_to_even) >> 13));
  }
  if (magnitude <= 0x33000000u) {  // ≤ 2^-25, half the smallest subnormal: ties to even zero
    return sign;
  }
  // A subnormal half: the result is round(value / 2^-24). value = significand · 2^(e - 150) with
  // the implicit bit restored, so the quotient is significand >> (126 - e).
  const uint32_t exponent = magnitude >> 23;  // 102 ..= 112 here
  const uint32_t significand = (magnitude & 0x007fffffu) | 0x00800000u;
  const uint32_t shift = 126u - exponent;  // 14 ..= 24
  const uint32_t kept = significand >> shift;
  const uint32_t dropped = significand & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  const uint32_t rounded = kept + ((dropped > half || (dropped == half && (kept & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | rounded);  // 0x0400 (the smallest normal) on a carry
}

size_t DTypeBytes(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return 4;
    case v1::DTYPE_BFLOAT16:
    case v1::DTYPE_FLOAT16:
      return 2;
    default:
      return 0;
  }
}

absl::StatusOr<v1::Logits> MakeLogits(absl::Span<const float> values, uint32_t vocab_size,
                                      v1::DType dtype) {
  absl::StatusOr<uint32_t> rows = RowsOf(values.size(), vocab_size, dtype);
  if (!rows.ok()) return rows.status();

  v1::Logits logits;
  logits.set_dtype(dtype);
  logits.set_rows(*rows);
  logits.set_vocab_size(vocab_size);
  std::string* data = logits.mutable_data();
  data->resize(values.size() * DTypeBytes(dtype));
  char* out = data->data();
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      if constexpr (std::endian::native == std::endian::little) {
        // memcpy from an empty span's null data() is undefined even for 0 bytes (UBSan).
        if (!values.empty()) std::memcpy(out, values.data(), values.size() * sizeof(float));
      } else {
        for (float v : values) {
          const uint32_t bits = FloatBits(v);
          for (int i = 0; i < 4; ++i) *out++ = static_cast<char>((bits >> (8 * i)) & 0xffu);
        }
      }
      break;
    case v1::DTYPE_BFLOAT16:
      for (float v : values) {
        Store16(RoundToBf16(v), out);
        out += 2;
      }
      break;
    case v1::DTYPE_FLOAT16:
      for (float v : values) {
        Store16(RoundToFp16(v), out);
        out += 2;
      }
      break;
    default:
      break;  // rejected by RowsOf
  }
  return logits;
}

absl::StatusOr<v1::Logits> MakeLogitsFromBytes(absl::string_view bytes, uint32_t vocab_size,
                                               v1::DType dtype) {
  const size_t element = DTypeBytes(dtype);
  if (element != 0 && bytes.size() % element != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits hold ", bytes.size(), " bytes, not a whole number of ",
                     v1::DType_Name(dtype), " values (", element, " bytes each)"));
  }
  absl::StatusOr<uint32_t> rows =
      RowsOf(element == 0 ? 0 : bytes.size() / element, vocab_size, dtype);
  if (!rows.ok()) return rows.status();

  v1::Logits logits;
  logits.set_dtype(dtype);
  logits.set_rows(*rows);
  logits.set_vocab_size(vocab_size);
  logits.set_data(std::string(bytes));
  return logits;
}

}  // namespace tokensampler
