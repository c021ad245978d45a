// Building the `Logits` message of a request from float values on the client side.
//
// The float → bfloat16 / float16 conversions round to nearest, ties to even (IEEE 754's default,
// what PyTorch and NumPy do), so a tensor a worker already holds in bf16/fp16 and the same values
// converted here give identical bytes. They are written here rather than taken from core/ because
// a model worker links only the client library.
// Pure functions: thread-safe.
#ifndef TOKENSAMPLER_CLIENT_LOGITS_H_
#define TOKENSAMPLER_CLIENT_LOGITS_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "tokensampler/v1/sampler.pb.h"

namespace tokensampler {

// Returns the bfloat16 bit pattern nearest to `value` (ties to even). Overflow rounds to ±Inf;
// NaN stays NaN (made quiet, sign and upper payload kept) and never turns into Inf.
uint16_t RoundToBf16(float value);

// Returns the IEEE binary16 bit pattern nearest to `value` (ties to even), including subnormal
// results. |value| ≥ 65520 rounds to ±Inf; NaN stays NaN (made quiet, sign and upper payload kept).
uint16_t RoundToFp16(float value);

// Bytes per element of `dtype`: 4 for DTYPE_FLOAT32, 2 for DTYPE_BFLOAT16 and DTYPE_FLOAT16,
// 0 for DTYPE_UNSPECIFIED or an unknown value.
size_t DTypeBytes(v1::DType dtype);

// Returns a Logits message holding `values`, a row-major [rows × vocab_size] tensor with
// rows = values.size() / vocab_size, encoded little-endian as `dtype` (float32 bytes are copied,
// bf16 / fp16 are rounded with RoundToBf16 / RoundToFp16).
// Returns INVALID_ARGUMENT when `dtype` is unspecified or unknown, `vocab_size` is 0, or
// values.size() is not a multiple of `vocab_size` (or gives more than 2^32 - 1 rows).
absl::StatusOr<v1::Logits> MakeLogits(absl::Span<const float> values, uint32_t vocab_size,
                                      v1::DType dtype);

// Returns a Logits message holding `bytes` unchanged: a row-major tensor already encoded
// little-endian as `dtype` (for example a file written by numpy's `tofile`, or a bf16 tensor's
// raw storage), with rows = bytes.size() / (vocab_size × element size).
// Returns INVALID_ARGUMENT when `dtype` is unspecified or unknown, `vocab_size` is 0, or the size
// is not a whole number of rows.
absl::StatusOr<v1::Logits> MakeLogitsFromBytes(absl::string_view bytes, uint32_t vocab_size,
                                               v1::DType dtype);

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CLIENT_LOGITS_H_
