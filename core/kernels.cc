// SIMD kernels of the row pipeline, compiled once per instruction set by Highway's
// foreach_target and dispatched at run time (see kernels.h).
#include "core/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "core/kernels.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

// Constants of ExpF, shared by the scalar and the SIMD code so both evaluate the same
// operations: e^x = 2^(n/16) · e^r with n = round(x·16/log 2) and r = x − n·log 2/16 (|r| ≤
// 0.0217, in two parts), 2^(n/16) = 2^⌊n/16⌋ · kExpTable[n mod 16], and e^r − 1 by a degree-3
// polynomial (its error, r⁴/24 ≤ 1e-8 of the result, is below a tenth of an ulp).
#ifndef TOKENSAMPLER_CORE_KERNELS_CONSTANTS_
#define TOKENSAMPLER_CORE_KERNELS_CONSTANTS_
namespace tokensampler::kernels::internal {
// Below this e^x would be under FLT_MIN: the weight is 0. At and above it every result and every
// 2^⌊n/16⌋ · kExpTable[…] is a normal float, so the scale is built by adding to the exponent bits.
constexpr float kExpMin = -87.3f;
constexpr float kExpMax = 88.7f;             // the largest n (2047) whose result is finite
constexpr float kExpScale = 0x1.715476p+4f;  // 16 / log 2
constexpr float kMagic = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer in the low bits
constexpr float kLn2Over16Hi = 0x1.62ep-5f;  // log 2 / 16 in 12 bits: n·hi is exact
constexpr float kLn2Over16Lo = 0x1.0bfbe8p-19f;
constexpr float kExpC3 = 1.0f / 6.0f;
// 2^(j/16) rounded to float, j = 0…15; aligned for one 512-bit load.
alignas(64) constexpr float kExpTable[16] = {
    0x1.000000p+0f, 0x1.0b5586p+0f, 0x1.172b84p+0f, 0x1.2387a6p+0f, 0x1.306fe0p+0f, 0x1.3dea64p+0f,
    0x1.4bfdaep+0f, 0x1.5ab07ep+0f, 0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f, 0x1.9c4918p+0f,
    0x1.ae89fap+0f, 0x1.c199bep+0f, 0x1.d5818ep+0f, 0x1.ea4afap+0f};
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
}  // namespace tokensampler::kernels::internal

// Scalar versions: the tails of the SIMD loops and Highway's scalar target.
namespace tokensampler::kernels::scalar {
using namespace internal;  // NOLINT

// The smallest float ≥ t (±inf beyond the float range): for a float x, x < t ⇔ x < RoundUp(t).
inline float RoundUp(double t) {
  if (t > static_cast<double>(std::numeric_limits<float>::max())) return kPosInf;
  if (t < -static_cast<double>(std::numeric_limits<float>::max())) {
    return t == -std::numeric_limits<double>::infinity() ? kNegInf
                                                         : -std::numeric_limits<float>::max();
  }
  float f = static_cast<float>(t);
  if (static_cast<double>(f) < t) f = std::nextafter(f, kPosInf);
  return f;
}

inline MaxResult Finish(const float* v, size_t begin, size_t end, float max, bool has_nan) {
  MaxResult r{max, -1, -1};
  for (size_t i = begin; i < end && has_nan; ++i) {
    if (std::isnan(v[i])) {
      r.nan = static_cast<int64_t>(i);
      break;
    }
  }
  for (size_t i = begin; i < end && max != kNegInf; ++i) {
    if (v[i] == max) {
      r.argmax = static_cast<int64_t>(i);
      break;
    }
  }
  return r;
}

// TopStream: `t` (the k-th largest held value) becomes the threshold; what is below it goes.
// KeepFrom moves the held entries i… that are ≥ t down to out… (out ≤ i) and returns the new end;
// RoseTo then sets the threshold, the count and the room until the next rise.
inline size_t KeepFrom(TopStream& s, float t, size_t i, size_t out) {
  for (; i < s.count; ++i) {
    if (s.values[i] >= t) {
      s.ids[out] = s.ids[i];
      s.values[out] = s.values[i];
      ++out;
    }
  }
  return out;
}

inline void RoseTo(TopStream& s, float t, size_t count) {
  s.count = count;
  s.threshold = t;
  const size_t room = 12 * static_cast<size_t>(s.k) + 256;  // kCapacity holds it and a vector
  s.cap = std::min(room, s.count + static_cast<size_t>(s.k) + 16);
  if (s.count > room / 2) s.overflow = true;  // ties at t: holding them all narrows nothing
}

inline void RaiseTo(TopStream& s, float t) { RoseTo(s, t, KeepFrom(s, t, 0, 0)); }

inline void Compact(TopStream& s) {
  std::copy(s.values, s.values + s.count, s.scratch);
  std::nth_element(s.scratch, s.scratch + (s.k - 1), s.scratch + s.count, std::greater<>());
  RaiseTo(s, s.scratch[s.k - 1]);
}

// TopStream: one value.
inline void Offer(TopStream& s, size_t i, float x) {
  if (s.overflow || !(x >= s.threshold)) return;
  s.ids[s.count] = static_cast<int32_t>(i);
  s.values[s.count] = x;
  if (++s.count >= s.cap) Compact(s);
}

inline MaxResult DecodeMax(DType dtype, const uint8_t* row, size_t begin, size_t end, float divisor,
                           float* out, TopStream* top) {
  float max = kNegInf;
  int64_t argmax = -1, nan = -1;
  for (size_t i = begin; i < end; ++i) {
    uint16_t bits = 0;
    float x = 0.0f;
    switch (dtype) {
      case DType::kFloat32:
        std::memcpy(&x, row + 4 * i, 4);
        break;
      case DType::kBFloat16:
        std::memcpy(&bits, row + 2 * i, 2);
        x = Bf16ToFloat(bits);
        break;
      case DType::kFloat16:
        std::memcpy(&bits, row + 2 * i, 2);
        x = Fp16ToFloat(bits);
        break;
    }
    if (divisor != 1.0f) x /= divisor;
    if (out != nullptr) out[i] = x;
    if (top != nullptr) Offer(*top, i, x);
    if (std::isnan(x)) {
      if (nan < 0) nan = static_cast<int64_t>(i);
    } else if (x > max) {
      max = x;
      argmax = static_cast<int64_t>(i);
    }
  }
  if (nan >= 0) return MaxResult{kNegInf, -1, nan};
  return MaxResult{max, argmax, -1};
}

inline double SumExp(const float* v, size_t begin, size_t end, float divisor, float max) {
  double sum = 0.0;
  for (size_t i = begin; i < end; ++i) {
    const float x = divisor != 1.0f ? v[i] / divisor : v[i];
    sum += static_cast<double>(ExpF(x - max));
  }
  return sum;
}

inline MaxResult Max(const float* v, size_t begin, size_t end) {
  float max = kNegInf;
  for (size_t i = begin; i < end; ++i) max = v[i] > max ? v[i] : max;
  return Finish(v, begin, end, max, false);
}

inline double Weights(const float* v, float* v_out, float* w, size_t begin, size_t end,
                      float divisor, float max, float head_min = 0.0f, int32_t* head = nullptr,
                      size_t* head_count = nullptr, double* weighted = nullptr) {
  double sum = 0.0;
  double weighted_sum = 0.0;
  size_t heads = 0;
  for (size_t i = begin; i < end; ++i) {
    float x = v[i];
    if (divisor != 1.0f) {
      x /= divisor;
      if (v_out != nullptr) v_out[i] = x;
    }
    w[i] = ExpF(x - max);
    sum += static_cast<double>(w[i]);
    if (head != nullptr && w[i] >= head_min) head[heads++] = static_cast<int32_t>(i);
    if (weighted != nullptr && w[i] > 0.0f) {
      weighted_sum += static_cast<double>(w[i]) * (static_cast<double>(x) - max);
    }
  }
  if (head_count != nullptr) *head_count = heads;
  if (weighted != nullptr) *weighted = weighted_sum;
  return sum;
}

template <class Removed>
SumCount Cut(const float* v, float* out, float* w, size_t begin, size_t end, Removed removed) {
  SumCount r{0.0, 0};
  for (size_t i = begin; i < end; ++i) {
    const float e = w != nullptr ? w[i] : 0.0f;
    if (v[i] == kNegInf || removed(v[i], e)) {
      out[i] = kNegInf;
      if (w != nullptr) w[i] = 0.0f;
    } else {
      out[i] = v[i];
      ++r.count;
      r.sum += static_cast<double>(e);
    }
  }
  return r;
}

inline void MassInRanges(const float* v, const float* w, size_t begin, size_t end,
                         const float* from, const float* to, int np, double* sums,
                         int64_t* counts) {
  for (size_t i = begin; i < end; ++i) {
    for (int j = 0; j < np; ++j) {
      if (v[i] >= from[j] && v[i] <= to[j]) {
        sums[j] += static_cast<double>(w[i]);
        ++counts[j];
      }
    }
  }
}

inline double MassInRange(const float* v, const float* w, size_t begin, size_t end, float from,
                          float to) {
  double sum = 0.0;
  for (size_t i = begin; i < end; ++i) {
    if (v[i] >= from && v[i] <= to) sum += static_cast<double>(w[i]);
  }
  return sum;
}

inline size_t SelectRanges(const float* v, size_t begin, size_t end, float in_from, float in_to,
                           float out_from, float out_to, int32_t* ids) {
  size_t out = 0;
  for (size_t i = begin; i < end; ++i) {
    if (v[i] >= in_from && v[i] <= in_to && !(v[i] >= out_from && v[i] <= out_to)) {
      ids[out++] = static_cast<int32_t>(i);
    }
  }
  return out;
}

inline SumCount NarrowBand(float* v, float* w, int32_t* ids, size_t n, float keep_from,
                           float keep_to, float gone_from, float gone_to, size_t* kept) {
  // Branch-free: which side an entry falls on is a coin flip to the predictor.
  SumCount gone{0.0, 0};
  size_t out = 0;
  for (size_t i = 0; i < n; ++i) {
    const float x = v[i];
    const float e = w[i];
    const int32_t id = ids[i];
    const bool below = (x >= gone_from) & (x <= gone_to);
    const bool keep = !below & (x >= keep_from) & (x <= keep_to);
    gone.sum += below ? static_cast<double>(e) : 0.0;
    gone.count += below;
    v[out] = x;
    w[out] = e;
    ids[out] = id;
    out += keep;
  }
  *kept = out;
  return gone;
}

inline SumCount SumValues(const float* v, size_t begin, size_t end) {
  SumCount r{0.0, 0};
  for (size_t i = begin; i < end; ++i) {
    if (v[i] == kNegInf) continue;
    r.sum += static_cast<double>(v[i]);
    ++r.count;
  }
  return r;
}

inline double SumSquares(const float* v, size_t begin, size_t end, double mean) {
  double sum = 0.0;
  for (size_t i = begin; i < end; ++i) {
    if (v[i] == kNegInf) continue;
    const double d = static_cast<double>(v[i]) - mean;
    sum += d * d;
  }
  return sum;
}

inline double WeightedLogits(const float* v, const float* w, size_t begin, size_t end, float max) {
  double sum = 0.0;
  for (size_t i = begin; i < end; ++i) {
    if (w[i] > 0.0f) sum += static_cast<double>(w[i]) * (static_cast<double>(v[i]) - max);
  }
  return sum;
}

inline void InfToUniform(float* v, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) v[i] = v[i] == kPosInf ? 0.0f : kNegInf;
}

inline void Scale(const float* v, float* out, size_t begin, size_t end, float divisor) {
  for (size_t i = begin; i < end; ++i) out[i] = v[i] / divisor;
}

inline size_t SelectWeightAtLeast(const float* w, size_t begin, size_t end, float t, int32_t* ids) {
  size_t out = 0;
  for (size_t i = begin; i < end; ++i) {
    if (w[i] >= t && w[i] > 0.0f) ids[out++] = static_cast<int32_t>(i);
  }
  return out;
}

}  // namespace tokensampler::kernels::scalar
#endif

HWY_BEFORE_NAMESPACE();
namespace tokensampler::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using namespace internal;  // NOLINT: the constants above

#if HWY_TARGET == HWY_SCALAR
// Highway's scalar target (plain x86-64 without SSSE3) lacks half vectors: it runs the scalar
// code, which computes the same values.
MaxResult DecodeMaxImpl(DType dtype, const uint8_t* row, size_t begin, size_t end, float divisor,
                        float* out, TopStream* top) {
  return scalar::DecodeMax(dtype, row, begin, end, divisor, out, top);
}
MaxResult MaxImpl(const float* v, size_t begin, size_t end) { return scalar::Max(v, begin, end); }
double WeightsImpl(const float* v, float* v_out, float* w, size_t begin, size_t end, float divisor,
                   float max) {
  return scalar::Weights(v, v_out, w, begin, end, divisor, max);
}
double SumExpImpl(const float* v, size_t begin, size_t end, float divisor, float max) {
  return scalar::SumExp(v, begin, end, divisor, max);
}
double WeightsAndHeadImpl(const float* v, float* v_out, float* w, size_t begin, size_t end,
                          float divisor, float max, float head_min, int32_t* head,
                          size_t* head_count, double* weighted) {
  return scalar::Weights(v, v_out, w, begin, end, divisor, max, head_min, head, head_count,
                         weighted);
}
SumCount CutValueBelowImpl(const float* v, float* out, float* w, size_t begin, size_t end,
                           float t) {
  return scalar::Cut(v, out, w, begin, end, [&](float x, float) { return x < t; });
}
SumCount CutWeightBelowImpl(const float* v, float* out, float* w, size_t begin, size_t end,
                            float t) {
  return scalar::Cut(v, out, w, begin, end, [&](float, float e) { return e < t; });
}
SumCount SumValuesImpl(const float* v, size_t begin, size_t end) {
  return scalar::SumValues(v, begin, end);
}
double SumSquaresImpl(const float* v, size_t begin, size_t end, double mean) {
  return scalar::SumSquares(v, begin, end, mean);
}
double WeightedLogitsImpl(const float* v, const float* w, size_t begin, size_t end, float max) {
  return scalar::WeightedLogits(v, w, begin, end, max);
}
void InfToUniformImpl(float* v, size_t begin, size_t end) { scalar::InfToUniform(v, begin, end); }
void ScaleImpl(const float* v, float* out, size_t begin, size_t end, float divisor) {
  scalar::Scale(v, out, begin, end, divisor);
}
uint64_t StreamingReadImpl(const uint8_t* data, size_t bytes) {
  uint64_t out = 0;
  for (size_t j = 0; j < bytes; ++j) out ^= static_cast<uint64_t>(data[j]) << (8 * (j % 8));
  return out;
}
size_t SelectWeightAtLeastImpl(const float* w, size_t begin, size_t end, float t, int32_t* ids) {
  return scalar::SelectWeightAtLeast(w, begin, end, t, ids);
}
void MassInRangesImpl(const float* v, const float* w, size_t begin, size_t end, const float* from,
                      const float* to, int np, double* sums, int64_t* counts) {
  scalar::MassInRanges(v, w, begin, end, from, to, np, sums, counts);
}
double MassInRangeImpl(const float* v, const float* w, size_t begin, size_t end, float from,
                       float to) {
  return scalar::MassInRange(v, w, begin, end, from, to);
}
size_t SelectRangesImpl(const float* v, size_t begin, size_t end, float in_from, float in_to,
                        float out_from, float out_to, int32_t* ids) {
  return scalar::SelectRanges(v, begin, end, in_from, in_to, out_from, out_to, ids);
}
SumCount NarrowBandImpl(float* v, float* w, int32_t* ids, size_t n, float keep_from, float keep_to,
                        float gone_from, float gone_to, size_t* kept) {
  return scalar::NarrowBand(v, w, ids, n, keep_from, keep_to, gone_from, gone_to, kept);
}
const char* TargetNameImpl() { return hwy::TargetName(HWY_TARGET); }

#else
using DF = hn::ScalableTag<float>;
using DI = hn::RebindToSigned<DF>;
using DU = hn::RebindToUnsigned<DF>;
using DFH = hn::Half<DF>;
using DD = hn::Rebind<double, DFH>;
using VF = hn::Vec<DF>;
using VD = hn::Vec<DD>;

// e^x of N vectors at once, for x ≤ 0 or −inf (a value minus the row's maximum): the same IEEE
// operations as the scalar ExpF, which there never reaches its kExpMax clamp. Each step runs across
// the N vectors before the next, so the core overlaps N independent dependency chains instead of
// waiting one out at a time. Seven multiply-adds per vector (Cephes' degree-5 e^x took eleven).
template <size_t N>
HWY_INLINE void ExpN(DF df, VF (&x)[N]) {
  const DI di;
  VF t[N], n[N], r[N], q[N];
  hn::Mask<DF> kept[N];
  for (size_t j = 0; j < N; ++j) kept[j] = hn::Ge(x[j], hn::Set(df, kExpMin));
  for (size_t j = 0; j < N; ++j)
    t[j] = hn::MulAdd(x[j], hn::Set(df, kExpScale), hn::Set(df, kMagic));
  for (size_t j = 0; j < N; ++j) n[j] = hn::Sub(t[j], hn::Set(df, kMagic));
  for (size_t j = 0; j < N; ++j) r[j] = hn::NegMulAdd(n[j], hn::Set(df, kLn2Over16Hi), x[j]);
  for (size_t j = 0; j < N; ++j) r[j] = hn::NegMulAdd(n[j], hn::Set(df, kLn2Over16Lo), r[j]);
  for (size_t j = 0; j < N; ++j) {
    const VF a = hn::MulAdd(r[j], hn::Set(df, kExpC3), hn::Set(df, 0.5f));
    q[j] = hn::MulAdd(hn::Mul(r[j], r[j]), a, r[j]);
  }
  // scale = 2^⌊n/16⌋ · kExpTable[n mod 16], by adding ⌊n/16⌋ to the table entry's exponent (a
  // normal float where kept); then e^x = scale + scale·q in one rounding. Below kExpMin: 0.
  for (size_t j = 0; j < N; ++j) {
    const auto bits = hn::BitCast(di, t[j]);
#if HWY_TARGET <= HWY_AVX3
    // vpermps takes the low 4 bits of each index: n mod 16.
    const VF entry = VF{_mm512_permutexvar_ps(bits.raw, _mm512_load_ps(kExpTable))};
#elif HWY_TARGET == HWY_AVX2
    // Two 8-entry lookups (the low 3 bits), the upper half where bit 3 is set.
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(kExpTable), bits.raw);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(kExpTable + 8), bits.raw);
    const VF entry =
        VF{_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(bits.raw, 28)))};
#else
    const VF entry = hn::GatherIndex(df, kExpTable, hn::And(bits, hn::Set(di, 15)));
#endif
    const auto exponent =
        hn::ShiftLeft<23>(hn::BitCast(di, hn::ShiftRight<4>(hn::BitCast(DU(), bits))));
    const VF scale = hn::BitCast(df, hn::Add(hn::BitCast(di, entry), exponent));
#if HWY_TARGET <= HWY_AVX3
    x[j] = VF{_mm512_maskz_fmadd_ps(kept[j].raw, scale.raw, q[j].raw, scale.raw)};
#else
    x[j] = hn::IfThenElseZero(kept[j], hn::MulAdd(scale, q[j], scale));
#endif
  }
}

// Appends the lanes of `v` selected by `m` at out (writes a whole vector there: the caller
// guarantees room for Lanes(d) values). Compress in a register and a plain store: AMD's Zen
// cores run a compress-to-memory as slow microcode.
template <class D, class V, class M, typename T>
HWY_INLINE size_t AppendSelected(D d, V v, M m, T* out) {
  hn::StoreU(hn::Compress(v, m), d, out);
  return hn::CountTrue(d, m);
}

HWY_INLINE VD Lower(VF v) { return hn::PromoteTo(DD(), hn::LowerHalf(DFH(), v)); }
HWY_INLINE VD Upper(VF v) { return hn::PromoteTo(DD(), hn::UpperHalf(DFH(), v)); }

HWY_INLINE double SumD(VD v) { return hn::GetLane(hn::SumOfLanes(DD(), v)); }

// Index of the first lane of v[begin, end) equal to `target`, or -1.
int64_t FindFirstEqual(const float* v, size_t begin, size_t end, float target, bool nan) {
  const DF df;
  const size_t n = hn::Lanes(df);
  const VF t = hn::Set(df, target);
  size_t i = begin;
  for (; i + n <= end; i += n) {
    const VF x = hn::LoadU(df, v + i);
    const auto m = nan ? hn::IsNaN(x) : hn::Eq(x, t);
    const intptr_t first = hn::FindFirstTrue(df, m);
    if (first >= 0) return static_cast<int64_t>(i) + first;
  }
  for (; i < end; ++i) {
    if (nan ? std::isnan(v[i]) : v[i] == target) return static_cast<int64_t>(i);
  }
  return -1;
}

// Element i of a 16-bit row, which may lie at any address (a request's bytes inside gRPC's
// slices, a region at any offset): SIMD loads are unaligned anyway, scalar ones go through memcpy.
HWY_INLINE uint16_t Load16(const uint8_t* row, size_t i) {
  uint16_t bits;
  std::memcpy(&bits, row + 2 * i, sizeof(bits));
  return bits;
}

// A vector of fp16 values from their bits.
HWY_INLINE VF DecodeF16(const uint16_t* p) {
  const DF df;
#if HWY_TARGET == HWY_SSSE3 || HWY_TARGET == HWY_SSE4
  // No F16C: Highway 1.0's emulated promotion decodes ±inf and NaN as finite numbers, so the
  // bits are decoded here. Exponent and mantissa move into a float's fields, and multiplying by
  // 2^112 re-biases the exponent (exact, subnormal halves included); all-ones exponents (inf,
  // NaN) get the float's all-ones exponent instead.
  const DU du;
  const DI di;
  const auto h = hn::PromoteTo(du, hn::LoadU(hn::Rebind<uint16_t, DF>(), p));
  const auto sign = hn::ShiftLeft<16>(hn::And(h, hn::Set(du, 0x8000u)));
  const auto em = hn::ShiftLeft<13>(hn::And(h, hn::Set(du, 0x7fffu)));
  const VF finite = hn::Mul(hn::BitCast(df, em), hn::Set(df, 0x1.0p112f));
  const VF special = hn::BitCast(df, hn::Or(em, hn::Set(du, 0x7f800000u)));
  const auto is_special = hn::Gt(hn::BitCast(di, em), hn::Set(di, (0x7c00 << 13) - 1));
  const VF f = hn::IfThenElse(hn::RebindMask(df, is_special), special, finite);
  return hn::BitCast(df, hn::Or(hn::BitCast(du, f), sign));
#else
  return hn::PromoteTo(
      df, hn::LoadU(hn::Rebind<hwy::float16_t, DF>(), reinterpret_cast<const hwy::float16_t*>(p)));
#endif
}

// TopStream's compaction with the k-th largest held value found by bisection over the float
// order, each step one SIMD count of the held values (they are in L1): ≈ 30 passes over at most
// a few thousand floats, several times cheaper than a selection (nth_element).
void CompactTop(TopStream& s) {
  const DF df;
  const size_t n = hn::Lanes(df);
  const auto at_least = [&](float t) {
    const VF vt = hn::Set(df, t);
    size_t count = 0, i = 0;
    for (; i + n <= s.count; i += n)
      count += hn::CountTrue(df, hn::Ge(hn::LoadU(df, s.values + i), vt));
    for (; i < s.count; ++i) count += s.values[i] >= t ? 1 : 0;
    return count;
  };
  VF vtop = hn::Set(df, s.threshold);
  size_t i = 0;
  for (; i + n <= s.count; i += n) vtop = hn::Max(vtop, hn::LoadU(df, s.values + i));
  float top = hn::GetLane(hn::MaxOfLanes(df, vtop));
  for (; i < s.count; ++i) top = std::max(top, s.values[i]);
  // The largest t with at least k held values ≥ t: every held value is ≥ the threshold.
  uint32_t lo = OrderedBits(s.threshold), hi = OrderedBits(top);
  const size_t k = static_cast<size_t>(s.k);
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    if (at_least(FromOrderedBits(mid)) >= k) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  // scalar::RaiseTo's filter, compressed a vector at a time (its branch on each held value was
  // mispredicted about half the time); the tail by the scalar filter.
  const float t = FromOrderedBits(lo);
  const DI di;
  const VF vt = hn::Set(df, t);
  size_t out = 0;
  i = 0;
  for (; i + n <= s.count; i += n) {
    const VF x = hn::LoadU(df, s.values + i);
    const auto m = hn::Ge(x, vt);
    // out ≤ i: the whole vectors stored at out overwrite only entries already loaded.
    AppendSelected(di, hn::LoadU(di, s.ids + i), hn::RebindMask(di, m), s.ids + out);
    out += AppendSelected(df, x, m, s.values + out);
  }
  scalar::RoseTo(s, t, scalar::KeepFrom(s, t, i, out));
}

// Pass 1's loop: decodes each value (`load(i)`, a vector at i; `load_one(i)`, one value), divides
// it by `divisor` unless that is 1, stores it at out[i] (unless out is null) and finds the
// maximum, the first index holding it and whether any value is NaN (when `track_nan`). The index
// costs no second pass over the row: the maximum of each chunk of kChunk values is kept as it is
// reduced, the first chunk that reaches the row's maximum is the one where the running maximum
// last rose strictly, and only that chunk is searched (`values`: the decoded row, out or the
// source itself when that is fp32 and undivided; null: that chunk is decoded again).
constexpr size_t kChunk = 1024;

template <class Load, class LoadOne>
MaxResult DecodeMaxBody(const Load& load, const LoadOne& load_one, const float* values,
                        size_t begin, size_t end, float divisor, float* out, bool track_nan,
                        TopStream* top = nullptr) {
  const DF df;
  const DI di;
  const size_t n = hn::Lanes(df);
  const bool divide = divisor != 1.0f;
  const VF vdiv = hn::Set(df, divisor);
  if (top != nullptr && top->overflow) top = nullptr;
  VF vtop = hn::Set(df, top != nullptr ? top->threshold : 0.0f);
  auto nan = hn::Ne(vdiv, vdiv);  // no NaN seen yet (a mask of false)
  bool snan = false;
  float max = kNegInf;
  size_t max_chunk = begin;
  for (size_t c = begin; c < end; c += kChunk) {
    const size_t c_end = std::min(end, c + kChunk);
    VF vmax = hn::Set(df, kNegInf);
    size_t i = c;
    for (; i + n <= c_end; i += n) {
      VF x = load(i);
      if (divide) x = hn::Div(x, vdiv);
      if (out != nullptr) hn::StoreU(x, df, out + i);
      vmax = hn::Max(vmax, x);
      if (track_nan) nan = hn::Or(nan, hn::IsNaN(x));
      if (top != nullptr) {
        const auto held = hn::Ge(x, vtop);
        if (!hn::AllFalse(df, held)) {
          // count < cap ≤ kCapacity − 64: room for a whole vector.
          AppendSelected(di, hn::Iota(di, static_cast<int32_t>(i)), hn::RebindMask(di, held),
                         top->ids + top->count);
          top->count += AppendSelected(df, x, held, top->values + top->count);
          if (top->count >= top->cap) {
            CompactTop(*top);
            if (top->overflow)
              top = nullptr;
            else
              vtop = hn::Set(df, top->threshold);
          }
        }
      }
    }
    float chunk_max = hn::GetLane(hn::MaxOfLanes(df, vmax));
    // The scalar tail: NaN never wins a comparison, so it is tracked apart.
    for (; i < c_end; ++i) {
      float x = load_one(i);
      if (divide) x /= divisor;
      if (out != nullptr) out[i] = x;
      if (top != nullptr) {
        scalar::Offer(*top, i, x);
        if (top->overflow)
          top = nullptr;
        else
          vtop = hn::Set(df, top->threshold);
      }
      if (std::isnan(x)) snan = true;
      if (x > chunk_max) chunk_max = x;
    }
    if (chunk_max > max) {
      max = chunk_max;
      max_chunk = c;
    }
  }
  // The first index of the maximum (or of a NaN) in [from, to): in `values`, or, when the
  // decoded row was not stored, by decoding again (the same operations give the same bits).
  const auto first = [&](size_t from, size_t to, bool find_nan) -> int64_t {
    if (values != nullptr) return FindFirstEqual(values, from, to, max, find_nan);
    const VF vmax = hn::Set(df, max);
    size_t i = from;
    for (; i + n <= to; i += n) {
      VF x = load(i);
      if (divide) x = hn::Div(x, vdiv);
      const intptr_t hit = hn::FindFirstTrue(df, find_nan ? hn::IsNaN(x) : hn::Eq(x, vmax));
      if (hit >= 0) return static_cast<int64_t>(i) + hit;
    }
    for (; i < to; ++i) {
      float x = load_one(i);
      if (divide) x /= divisor;
      if (find_nan ? std::isnan(x) : x == max) return static_cast<int64_t>(i);
    }
    return -1;
  };
  MaxResult r{max, -1, -1};
  if (track_nan && (snan || !hn::AllFalse(df, nan))) {
    // With a NaN the maximum is meaningless; the caller fails the row anyway.
    r.max = kNegInf;
    r.nan = first(begin, end, true);
  } else if (max != kNegInf) {
    r.argmax = first(max_chunk, std::min(end, max_chunk + kChunk), false);
  }
  return r;
}

MaxResult DecodeMaxImpl(DType dtype, const uint8_t* row, size_t begin, size_t end, float divisor,
                        float* out, TopStream* top) {
  const DF df;
  switch (dtype) {
    case DType::kFloat32: {
      // out == null: read only (REQUIRES: the row aligned for floats). Otherwise the row may be
      // unaligned: vectors load unaligned, single values go through memcpy.
      const float* src = reinterpret_cast<const float*>(row);
      const auto load_one = [&](size_t i) {
        float x;
        std::memcpy(&x, row + 4 * i, sizeof(x));
        return x;
      };
      // Not stored and not divided: the source itself holds the decoded values.
      const float* values = out != nullptr ? out : divisor == 1.0f ? src : nullptr;
      return DecodeMaxBody([&](size_t i) { return hn::LoadU(df, src + i); }, load_one, values,
                           begin, end, divisor, out, true, top);
    }
    case DType::kBFloat16: {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(row);
      const DU du;
      const hn::Rebind<uint16_t, DF> d16;
      return DecodeMaxBody(
          [&](size_t i) {
            return hn::BitCast(df, hn::ShiftLeft<16>(hn::PromoteTo(du, hn::LoadU(d16, src + i))));
          },
          [&](size_t i) { return Bf16ToFloat(Load16(row, i)); }, out, begin, end, divisor, out,
          true, top);
    }
    case DType::kFloat16: {
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
      return DecodeMaxBody([&](size_t i) { return DecodeF16(bits + i); },
                           [&](size_t i) { return Fp16ToFloat(Load16(row, i)); }, out, begin, end,
                           divisor, out, true, top);
    }
  }
  return MaxResult{kNegInf, -1, -1};
}

MaxResult MaxImpl(const float* v, size_t begin, size_t end) {
  const DF df;
  return DecodeMaxBody([&](size_t i) { return hn::LoadU(df, v + i); },
                       [&](size_t i) { return v[i]; }, v, begin, end, 1.0f, nullptr, false);
}

// With kWeighted, also *weighted = Σ w·(x − max) over the tokens with w > 0, in double (the
// entropy's sum, which otherwise takes a pass of its own: WeightedLogits).
template <bool kWeighted>
double WeightsBody(const float* v, float* v_out, float* w, size_t begin, size_t end, float divisor,
                   float max, float head_min, int32_t* head, size_t* head_count, double* weighted) {
#if HWY_TARGET == HWY_SSSE3 || HWY_TARGET == HWY_SSE4
  // No fused multiply-add: the vector ExpF would round differently from the scalar one.
  return scalar::Weights(v, v_out, w, begin, end, divisor, max, head_min, head, head_count,
                         weighted);
#endif
  const DF df;
  const DI di;
  const auto iota0 = hn::Iota(di, 0);
  const DD dd;
  const size_t n = hn::Lanes(df);
  const VF vmax = hn::Set(df, max);
  const VF vdiv = hn::Set(df, divisor);
  const VF vhead = hn::Set(df, head_min);
  const VD vmax_d = hn::Set(dd, static_cast<double>(max));
  const bool divide = divisor != 1.0f;
  VD acc0 = hn::Zero(dd), acc1 = hn::Zero(dd), acc_weighted = hn::Zero(dd);
  size_t heads = 0;
  size_t i = begin;
  // Two vectors per step (see ExpN), then one at a time.
  const auto step = [&](auto unroll) {
    constexpr size_t kU = decltype(unroll)::value;
    VF e[kU], xs[kU];
    for (size_t j = 0; j < kU; ++j) {
      VF x = hn::LoadU(df, v + i + j * n);
      if (divide) {
        x = hn::Div(x, vdiv);
        if (v_out != nullptr) hn::StoreU(x, df, v_out + i + j * n);
      }
      xs[j] = x;
      e[j] = hn::Sub(x, vmax);
    }
    ExpN(df, e);
    for (size_t j = 0; j < kU; ++j) {
      hn::StoreU(e[j], df, w + i + j * n);
      const VD w0 = Lower(e[j]), w1 = Upper(e[j]);
      acc0 = hn::Add(acc0, w0);
      acc1 = hn::Add(acc1, w1);
      if constexpr (kWeighted) {
        // WeightedLogits skips the tokens with w = 0. Here their terms are −0 (x − max ≤ 0),
        // which leaves a sum unchanged, once −inf (whose w·(x − max) would be NaN) is clamped to
        // the lowest float: one operation instead of a compare and a select per half.
        const VF x = hn::Max(xs[j], hn::Set(df, std::numeric_limits<float>::lowest()));
        const VD t0 = hn::Mul(w0, hn::Sub(Lower(x), vmax_d));
        const VD t1 = hn::Mul(w1, hn::Sub(Upper(x), vmax_d));
        acc_weighted = hn::Add(acc_weighted, hn::Add(t0, t1));
      }
      if (head != nullptr) {
        const auto m = hn::Ge(e[j], vhead);
        if (!hn::AllFalse(df, m)) {
          // heads ≤ i − begin, so a whole vector at head + heads stays within [begin, end).
          const auto ids = hn::Add(iota0, hn::Set(di, static_cast<int32_t>(i + j * n)));
          heads += AppendSelected(di, ids, hn::RebindMask(di, m), head + heads);
        }
      }
    }
  };
  for (; i + 2 * n <= end; i += 2 * n) step(std::integral_constant<size_t, 2>());
  for (; i + n <= end; i += n) step(std::integral_constant<size_t, 1>());
  double sum = SumD(hn::Add(acc0, acc1));
  double weighted_sum = kWeighted ? SumD(acc_weighted) : 0.0;
  for (; i < end; ++i) {
    float x = v[i];
    if (divide) {
      x /= divisor;
      if (v_out != nullptr) v_out[i] = x;
    }
    w[i] = ExpF(x - max);
    sum += static_cast<double>(w[i]);
    if (head != nullptr && w[i] >= head_min) head[heads++] = static_cast<int32_t>(i);
    if (kWeighted && w[i] > 0.0f) {
      weighted_sum += static_cast<double>(w[i]) * (static_cast<double>(x) - max);
    }
  }
  if (head_count != nullptr) *head_count = heads;
  if (kWeighted) *weighted = weighted_sum;
  return sum;
}

double SumExpImpl(const float* v, size_t begin, size_t end, float divisor, float max) {
#if HWY_TARGET == HWY_SSSE3 || HWY_TARGET == HWY_SSE4
  return scalar::SumExp(v, begin, end, divisor, max);
#endif
  const DF df;
  const DD dd;
  const size_t n = hn::Lanes(df);
  const VF vmax = hn::Set(df, max);
  const VF vdiv = hn::Set(df, divisor);
  const bool divide = divisor != 1.0f;
  VD acc0 = hn::Zero(dd), acc1 = hn::Zero(dd);
  size_t i = begin;
  const auto step = [&](auto unroll) {  // as in WeightsBody
    constexpr size_t kU = decltype(unroll)::value;
    VF e[kU];
    for (size_t j = 0; j < kU; ++j) {
      const VF x = hn::LoadU(df, v + i + j * n);
      e[j] = hn::Sub(divide ? hn::Div(x, vdiv) : x, vmax);
    }
    ExpN(df, e);
    for (size_t j = 0; j < kU; ++j) {
      acc0 = hn::Add(acc0, Lower(e[j]));
      acc1 = hn::Add(acc1, Upper(e[j]));
    }
  };
  for (; i + 2 * n <= end; i += 2 * n) step(std::integral_constant<size_t, 2>());
  for (; i + n <= end; i += n) step(std::integral_constant<size_t, 1>());
  double sum = SumD(hn::Add(acc0, acc1));
  for (; i < end; ++i) sum += static_cast<double>(ExpF((divide ? v[i] / divisor : v[i]) - max));
  return sum;
}

double WeightsImpl(const float* v, float* v_out, float* w, size_t begin, size_t end, float divisor,
                   float max) {
  return WeightsBody<false>(v, v_out, w, begin, end, divisor, max, 0.0f, nullptr, nullptr, nullptr);
}

double WeightsAndHeadImpl(const float* v, float* v_out, float* w, size_t begin, size_t end,
                          float divisor, float max, float head_min, int32_t* head,
                          size_t* head_count, double* weighted) {
  if (weighted != nullptr) {
    return WeightsBody<true>(v, v_out, w, begin, end, divisor, max, head_min, head, head_count,
                             weighted);
  }
  return WeightsBody<false>(v, v_out, w, begin, end, divisor, max, head_min, head, head_count,
                            nullptr);
}

// Shared body of the cuts: `removed(x, e)` is the mask of tokens to remove.
template <class Removed, class ScalarRemoved>
SumCount Cut(const float* v, float* out_v, float* w, size_t begin, size_t end, Removed removed,
             ScalarRemoved scalar_removed) {
  const DF df;
  const DD dd;
  const size_t n = hn::Lanes(df);
  const VF neg_inf = hn::Set(df, kNegInf);
  VD acc0 = hn::Zero(dd), acc1 = hn::Zero(dd);
  int64_t count = 0;
  size_t i = begin;
  for (; i + n <= end; i += n) {
    const VF x = hn::LoadU(df, v + i);
    const VF e = w != nullptr ? hn::LoadU(df, w + i) : hn::Zero(df);
    const auto out = hn::Or(removed(x, e), hn::Eq(x, neg_inf));
    hn::StoreU(hn::IfThenElse(out, neg_inf, x), df, out_v + i);
    count += static_cast<int64_t>(n - hn::CountTrue(df, out));
    if (w != nullptr) {
      const VF kept = hn::IfThenZeroElse(out, e);
      hn::StoreU(kept, df, w + i);
      acc0 = hn::Add(acc0, Lower(kept));
      acc1 = hn::Add(acc1, Upper(kept));
    }
  }
  double sum = SumD(hn::Add(acc0, acc1));
  for (; i < end; ++i) {
    const float e = w != nullptr ? w[i] : 0.0f;
    if (v[i] == kNegInf || scalar_removed(v[i], e)) {
      out_v[i] = kNegInf;
      if (w != nullptr) w[i] = 0.0f;
    } else {
      out_v[i] = v[i];
      ++count;
      sum += static_cast<double>(e);
    }
  }
  return {sum, count};
}

SumCount CutValueBelowImpl(const float* v, float* out, float* w, size_t begin, size_t end,
                           float t) {
  const VF vt = hn::Set(DF(), t);
  return Cut(
      v, out, w, begin, end, [&](VF x, VF) { return hn::Lt(x, vt); },
      [&](float x, float) { return x < t; });
}

SumCount CutWeightBelowImpl(const float* v, float* out, float* w, size_t begin, size_t end,
                            float t) {
  const VF vt = hn::Set(DF(), t);
  return Cut(
      v, out, w, begin, end, [&](VF, VF e) { return hn::Lt(e, vt); },
      [&](float, float e) { return e < t; });
}

SumCount SumValuesImpl(const float* v, size_t begin, size_t end) {
  const DF df;
  const DD dd;
  const size_t n = hn::Lanes(df);
  const VF neg_inf = hn::Set(df, kNegInf);
  VD acc = hn::Zero(dd);
  int64_t count = 0;
  size_t i = begin;
  for (; i + n <= end; i += n) {
    const VF x = hn::LoadU(df, v + i);
    const auto kept = hn::Ne(x, neg_inf);
    const VF y = hn::IfThenElseZero(kept, x);
    acc = hn::Add(acc, hn::Add(Lower(y), Upper(y)));
    count += static_cast<int64_t>(hn::CountTrue(df, kept));
  }
  double sum = SumD(acc);
  for (; i < end; ++i) {
    if (v[i] == kNegInf) continue;
    sum += static_cast<double>(v[i]);
    ++count;
  }
  return {sum, count};
}

double SumSquaresImpl(const float* v, size_t begin, size_t end, double mean) {
  const DF df;
  const DD dd;
  const size_t n = hn::Lanes(df);
  const VD neg_inf = hn::Set(dd, -std::numeric_limits<double>::infinity());
  const VD vmean = hn::Set(dd, mean);
  VD acc = hn::Zero(dd);
  size_t i = begin;
  for (; i + n <= end; i += n) {
    const VF x = hn::LoadU(df, v + i);
    const VD x0 = Lower(x), x1 = Upper(x);
    const VD d0 = hn::Sub(x0, vmean), d1 = hn::Sub(x1, vmean);
    const VD z0 = hn::IfThenElseZero(hn::Ne(x0, neg_inf), hn::Mul(d0, d0));
    const VD z1 = hn::IfThenElseZero(hn::Ne(x1, neg_inf), hn::Mul(d1, d1));
    acc = hn::Add(acc, hn::Add(z0, z1));
  }
  double sum = SumD(acc);
  for (; i < end; ++i) {
    if (v[i] == kNegInf) continue;
    const double d = static_cast<double>(v[i]) - mean;
    sum += d * d;
  }
  return sum;
}

double WeightedLogitsImpl(const float* v, const float* w, size_t begin, size_t end, float max) {
  const DF df;
  const DD dd;
  const size_t n = hn::Lanes(df);
  const VD vmax = hn::Set(dd, static_cast<double>(max));
  VD acc = hn::Zero(dd);
  size_t i = begin;
  for (; i + n <= end; i += n) {
    const VF x = hn::LoadU(df, v + i);
    const VF e = hn::LoadU(df, w + i);
    // w = 0 for removed tokens; (−inf − max) · 0 would be NaN, so mask on w.
    const VD e0 = Lower(e), e1 = Upper(e);
    const VD t0 =
        hn::IfThenElseZero(hn::Gt(e0, hn::Zero(dd)), hn::Mul(e0, hn::Sub(Lower(x), vmax)));
    const VD t1 =
        hn::IfThenElseZero(hn::Gt(e1, hn::Zero(dd)), hn::Mul(e1, hn::Sub(Upper(x), vmax)));
    acc = hn::Add(acc, hn::Add(t0, t1));
  }
  double sum = SumD(acc);
  for (; i < end; ++i) {
    if (w[i] > 0.0f) sum += static_cast<double>(w[i]) * (static_cast<double>(v[i]) - max);
  }
  return sum;
}

void InfToUniformImpl(float* v, size_t begin, size_t end) {
  const DF df;
  const size_t n = hn::Lanes(df);
  const VF pos_inf = hn::Set(df, kPosInf);
  const VF neg_inf = hn::Set(df, kNegInf);
  size_t i = begin;
  for (; i + n <= end; i += n) {
    const VF x = hn::LoadU(df, v + i);
    hn::StoreU(hn::IfThenZeroElse(hn::Eq(x, pos_inf), neg_inf), df, v + i);
  }
  for (; i < end; ++i) v[i] = v[i] == kPosInf ? 0.0f : kNegInf;
}

uint64_t StreamingReadImpl(const uint8_t* data, size_t bytes) {
  const hn::ScalableTag<uint64_t> du64;
  const size_t n = hn::Lanes(du64);
  const uint64_t* words = reinterpret_cast<const uint64_t*>(data);
  const size_t count = bytes / 8;
  auto a = hn::Zero(du64), b = hn::Zero(du64), c = hn::Zero(du64), d = hn::Zero(du64);
  size_t i = 0;
  for (; i + 4 * n <= count; i += 4 * n) {
    a = hn::Xor(a, hn::LoadU(du64, words + i));
    b = hn::Xor(b, hn::LoadU(du64, words + i + n));
    c = hn::Xor(c, hn::LoadU(du64, words + i + 2 * n));
    d = hn::Xor(d, hn::LoadU(du64, words + i + 3 * n));
  }
  const auto all = hn::Xor(hn::Xor(a, b), hn::Xor(c, d));
  HWY_ALIGN uint64_t lanes[hn::MaxLanes(du64)];
  hn::Store(all, du64, lanes);
  uint64_t out = 0;
  for (size_t j = 0; j < n; ++j) out ^= lanes[j];
  for (; i < count; ++i) out ^= words[i];
  for (size_t j = count * 8; j < bytes; ++j) out ^= data[j];
  return out;
}

void ScaleImpl(const float* v, float* out, size_t begin, size_t end, float divisor) {
  const DF df;
  const size_t n = hn::Lanes(df);
  const VF vdiv = hn::Set(df, divisor);
  size_t i = begin;
  for (; i + n <= end; i += n) hn::StoreU(hn::Div(hn::LoadU(df, v + i), vdiv), df, out + i);
  for (; i < end; ++i) out[i] = v[i] / divisor;
}

size_t SelectWeightAtLeastImpl(const float* w, size_t begin, size_t end, float t, int32_t* ids) {
  const DF df;
  const DI di;
  const size_t n = hn::Lanes(df);
  const VF vt = hn::Set(df, t);
  size_t out = 0;
  size_t i = begin;
  for (; i + n <= end; i += n) {
    const VF e = hn::LoadU(df, w + i);
    const auto m = hn::And(hn::Ge(e, vt), hn::Gt(e, hn::Zero(df)));
    if (hn::AllFalse(df, m)) continue;
    for (size_t j = 0; j < n; ++j) {
      if (w[i + j] >= t && w[i + j] > 0.0f) ids[out++] = static_cast<int32_t>(i + j);
    }
  }
  (void)di;
  for (; i < end; ++i) {
    if (w[i] >= t && w[i] > 0.0f) ids[out++] = static_cast<int32_t>(i);
  }
  return out;
}

const char* TargetNameImpl() { return hwy::TargetName(HWY_TARGET); }

// GCC's SLP vectoriser gathers MassInRangesGroup's scalar counts (a mask move and a popcount
// each, on the integer units) back into a vector every step: seven shuffles per vector on the
// vector pipes the comparisons need. Without it, 4 ranges over 128k tokens take 27 µs, not 34.
#if defined(__GNUC__) && !defined(__clang__)
#define TOKENSAMPLER_NO_SLP __attribute__((optimize("no-tree-slp-vectorize")))
#else
#define TOKENSAMPLER_NO_SLP
#endif

// G ranges in one pass, their accumulators in registers (a runtime count kept them on the stack,
// where each add waited for the previous one's store: 35 µs for one range over 128k tokens).
// Ranges open to +inf (top_p's keys) take one comparison. Per lane, a block's float sums are
// exact enough for the bracketing passes; the counts are exact.
template <int G, bool kOpen>
HWY_INLINE TOKENSAMPLER_NO_SLP void MassInRangesGroup(const float* v, const float* w, size_t begin,
                                                      size_t end, const float* from,
                                                      const float* to, double* sums,
                                                      int64_t* counts) {
  const DF df;
  const size_t n = hn::Lanes(df);
  VF acc[G], lo[G], hi[G];
  size_t cnt[G];
  for (int j = 0; j < G; ++j) {
    acc[j] = hn::Zero(df);
    cnt[j] = 0;
    lo[j] = hn::Set(df, from[j]);
    hi[j] = hn::Set(df, to[j]);
  }
  size_t i = begin;
  for (; i + n <= end; i += n) {
    const VF x = hn::LoadU(df, v + i);
    const VF e = hn::LoadU(df, w + i);
    // Unrolled, or GCC keeps the arrays on the stack and loops over them.
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j) {
      const auto m = kOpen ? hn::Ge(x, lo[j]) : hn::And(hn::Ge(x, lo[j]), hn::Le(x, hi[j]));
      acc[j] = hn::Add(acc[j], hn::IfThenElseZero(m, e));
      cnt[j] += hn::CountTrue(df, m);  // on the integer units, beside the vector adds
    }
  }
  for (int j = 0; j < G; ++j) {
    sums[j] += SumD(hn::Add(Lower(acc[j]), Upper(acc[j])));
    counts[j] += static_cast<int64_t>(cnt[j]);
  }
  scalar::MassInRanges(v, w, i, end, from, to, G, sums, counts);
}

template <bool kOpen>
TOKENSAMPLER_NO_SLP void MassInRangesBy4(const float* v, const float* w, size_t begin, size_t end,
                                         const float* from, const float* to, int np, double* sums,
                                         int64_t* counts) {
  // Four ranges per pass over the block (in L1 or L2 after the first).
  for (int j = 0; j < np; j += 4) {
    const float* f = from + j;
    const float* t = to + j;
    switch (std::min(4, np - j)) {
      case 1:
        MassInRangesGroup<1, kOpen>(v, w, begin, end, f, t, sums + j, counts + j);
        break;
      case 2:
        MassInRangesGroup<2, kOpen>(v, w, begin, end, f, t, sums + j, counts + j);
        break;
      case 3:
        MassInRangesGroup<3, kOpen>(v, w, begin, end, f, t, sums + j, counts + j);
        break;
      default:
        MassInRangesGroup<4, kOpen>(v, w, begin, end, f, t, sums + j, counts + j);
        break;
    }
  }
}

void MassInRangesImpl(const float* v, const float* w, size_t begin, size_t end, const float* from,
                      const float* to, int np, double* sums, int64_t* counts) {
  // NaN is never a value here, so x ≤ +inf holds for every x.
  if (std::all_of(to, to + np, [](float t) { return t == kPosInf; })) {
    MassInRangesBy4<true>(v, w, begin, end, from, to, np, sums, counts);
  } else {
    MassInRangesBy4<false>(v, w, begin, end, from, to, np, sums, counts);
  }
}

double MassInRangeImpl(const float* v, const float* w, size_t begin, size_t end, float from,
                       float to) {
  const DF df;
  const DD dd;
  const size_t n = hn::Lanes(df);
  const VF lo = hn::Set(df, from), hi = hn::Set(df, to);
  VD acc = hn::Zero(dd);
  size_t i = begin;
  for (; i + n <= end; i += n) {
    const VF x = hn::LoadU(df, v + i);
    const VF e = hn::IfThenElseZero(hn::And(hn::Ge(x, lo), hn::Le(x, hi)), hn::LoadU(df, w + i));
    acc = hn::Add(acc, hn::Add(Lower(e), Upper(e)));
  }
  return SumD(acc) + scalar::MassInRange(v, w, i, end, from, to);
}

// SelectRanges with the comparisons the call needs, chosen at compile time: `kOpen` (in_to =
// +inf: one comparison for "in") and `kOut` (an out range to leave out: two more). Vectors with
// nothing selected skip the append. (Appending on every vector instead, branch-free, was 2×
// faster when half the tokens are selected and slower on rows that select few: typical_p's
// median row got 4 % slower, its mean 3–8 % faster.)
template <bool kOpen, bool kOut>
size_t SelectRangesBody(const float* v, size_t begin, size_t end, float in_from, float in_to,
                        float out_from, float out_to, int32_t* ids) {
  const DF df;
  const DI di;
  const auto iota0 = hn::Iota(di, 0);
  const size_t n = hn::Lanes(df);
  const VF a = hn::Set(df, in_from), b = hn::Set(df, in_to);
  const VF c = hn::Set(df, out_from), d = hn::Set(df, out_to);
  size_t out = 0;
  size_t i = begin;
  for (; i + n <= end; i += n) {
    const VF x = hn::LoadU(df, v + i);
    auto m = kOpen ? hn::Ge(x, a) : hn::And(hn::Ge(x, a), hn::Le(x, b));
    if (hn::AllFalse(df, m)) continue;
    if (kOut) m = hn::AndNot(hn::And(hn::Ge(x, c), hn::Le(x, d)), m);
    // out ≤ i − begin, so a whole vector at ids + out stays within the caller's end − begin.
    out += AppendSelected(di, hn::Add(iota0, hn::Set(di, static_cast<int32_t>(i))),
                          hn::RebindMask(di, m), ids + out);
  }
  return out + scalar::SelectRanges(v, i, end, in_from, in_to, out_from, out_to, ids + out);
}

size_t SelectRangesImpl(const float* v, size_t begin, size_t end, float in_from, float in_to,
                        float out_from, float out_to, int32_t* ids) {
  const bool open = in_to == kPosInf, left_out = out_from <= out_to;
  if (open) {
    return left_out
               ? SelectRangesBody<true, true>(v, begin, end, in_from, in_to, out_from, out_to, ids)
               : SelectRangesBody<true, false>(v, begin, end, in_from, in_to, out_from, out_to,
                                               ids);
  }
  return left_out
             ? SelectRangesBody<false, true>(v, begin, end, in_from, in_to, out_from, out_to, ids)
             : SelectRangesBody<false, false>(v, begin, end, in_from, in_to, out_from, out_to, ids);
}

SumCount NarrowBandImpl(float* v, float* w, int32_t* ids, size_t n, float keep_from, float keep_to,
                        float gone_from, float gone_to, size_t* kept) {
  const DF df;
  const DD dd;
  const DI di;
  const size_t lanes = hn::Lanes(df);
  const VF kf = hn::Set(df, keep_from), kt = hn::Set(df, keep_to);
  const VF gf = hn::Set(df, gone_from), gt = hn::Set(df, gone_to);
  VD acc0 = hn::Zero(dd), acc1 = hn::Zero(dd);
  size_t gone_count = 0, out = 0, i = 0;
  for (; i + lanes <= n; i += lanes) {
    const VF x = hn::LoadU(df, v + i);
    const VF e = hn::LoadU(df, w + i);
    const auto id = hn::LoadU(di, ids + i);
    const auto gone = hn::And(hn::Ge(x, gf), hn::Le(x, gt));
    const auto keep = hn::AndNot(gone, hn::And(hn::Ge(x, kf), hn::Le(x, kt)));
    const VF ge = hn::IfThenElseZero(gone, e);
    acc0 = hn::Add(acc0, Lower(ge));
    acc1 = hn::Add(acc1, Upper(ge));
    gone_count += hn::CountTrue(df, gone);
    // out ≤ i: the whole vectors stored at out overwrite only entries already loaded.
    AppendSelected(df, x, keep, v + out);
    AppendSelected(df, e, keep, w + out);
    out += AppendSelected(di, id, hn::RebindMask(di, keep), ids + out);
  }
  // The tail, moved down to out first so that the scalar loop compacts it in place after.
  const size_t tail = n - i;
  if (out != i) {
    std::copy(v + i, v + n, v + out);
    std::copy(w + i, w + n, w + out);
    std::copy(ids + i, ids + n, ids + out);
  }
  size_t tail_kept = 0;
  const SumCount rest = scalar::NarrowBand(v + out, w + out, ids + out, tail, keep_from, keep_to,
                                           gone_from, gone_to, &tail_kept);
  *kept = out + tail_kept;
  return SumCount{SumD(hn::Add(acc0, acc1)) + rest.sum,
                  static_cast<int64_t>(gone_count) + rest.count};
}

#endif  // HWY_TARGET == HWY_SCALAR

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace tokensampler::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace tokensampler::kernels {

using internal::kNegInf;

// Two clones, picked once at load time: with FMA instructions each std::fma below is one
// instruction; the portable default calls libm's fmaf for each (≈ 20–35 ns per ExpF). Both
// round each fused operation once, so they give the same bits.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("fma", "default")))
#endif
float ExpF(float x) {
  using namespace internal;          // NOLINT
  if (!(x >= kExpMin)) return 0.0f;  // and NaN, as the SIMD code's mask
  if (x > kExpMax) x = kExpMax;
  // The same fused operations as the SIMD ExpN (see the constants).
  const float t = std::fma(x, kExpScale, kMagic);  // n in the low bits
  const float n = t - kMagic;
  float r = std::fma(-n, kLn2Over16Hi, x);
  r = std::fma(-n, kLn2Over16Lo, r);
  const float a = std::fma(r, kExpC3, 0.5f);
  const float q = std::fma(r * r, a, r);  // e^r − 1
  uint32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof(t));
  // t's bits are kMagic's plus n: the low 4 bits are n mod 16, and ⌊n/16⌋ · 2^23 is
  // (t_bits >> 4) << 23 (kMagic's part shifts out).
  uint32_t scale_bits;
  std::memcpy(&scale_bits, &kExpTable[t_bits & 15u], sizeof(scale_bits));
  scale_bits += (t_bits >> 4) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return std::fma(scale, q, scale);
}

float RoundUp(double t) { return scalar::RoundUp(t); }

HWY_EXPORT(DecodeMaxImpl);
HWY_EXPORT(MaxImpl);
HWY_EXPORT(WeightsImpl);
HWY_EXPORT(SumExpImpl);
HWY_EXPORT(WeightsAndHeadImpl);
HWY_EXPORT(CutValueBelowImpl);
HWY_EXPORT(CutWeightBelowImpl);
HWY_EXPORT(SumValuesImpl);
HWY_EXPORT(SumSquaresImpl);
HWY_EXPORT(WeightedLogitsImpl);
HWY_EXPORT(InfToUniformImpl);
HWY_EXPORT(TargetNameImpl);
HWY_EXPORT(MassInRangesImpl);
HWY_EXPORT(MassInRangeImpl);
HWY_EXPORT(SelectRangesImpl);
HWY_EXPORT(NarrowBandImpl);
HWY_EXPORT(ScaleImpl);
HWY_EXPORT(StreamingReadImpl);
HWY_EXPORT(SelectWeightAtLeastImpl);

const char* TargetName() { return HWY_DYNAMIC_DISPATCH(TargetNameImpl)(); }

std::vector<int64_t> AvailableTargets() { return hwy::SupportedAndGeneratedTargets(); }

void UseTargetForTest(int64_t target) { hwy::SetSupportedTargetsForTest(target); }

void MassInRanges(const float* v, const float* w, size_t begin, size_t end, const float* from,
                  const float* to, int n, double* sums, int64_t* counts) {
  HWY_DYNAMIC_DISPATCH(MassInRangesImpl)(v, w, begin, end, from, to, n, sums, counts);
}
double MassInRange(const float* v, const float* w, size_t begin, size_t end, float from, float to) {
  return HWY_DYNAMIC_DISPATCH(MassInRangeImpl)(v, w, begin, end, from, to);
}
size_t SelectRanges(const float* v, size_t begin, size_t end, float in_from, float in_to,
                    float out_from, float out_to, int32_t* ids) {
  return HWY_DYNAMIC_DISPATCH(SelectRangesImpl)(v, begin, end, in_from, in_to, out_from, out_to,
                                                ids);
}

SumCount NarrowBand(float* v, float* w, int32_t* ids, size_t n, float keep_from, float keep_to,
                    float gone_from, float gone_to, size_t* kept) {
  return HWY_DYNAMIC_DISPATCH(NarrowBandImpl)(v, w, ids, n, keep_from, keep_to, gone_from, gone_to,
                                              kept);
}
MaxResult DecodeMax(DType dtype, const uint8_t* row, size_t begin, size_t end, float divisor,
                    float* out, TopStream* top) {
  return HWY_DYNAMIC_DISPATCH(DecodeMaxImpl)(dtype, row, begin, end, divisor, out, top);
}
void Scale(const float* v, float* out, size_t begin, size_t end, float divisor) {
  HWY_DYNAMIC_DISPATCH(ScaleImpl)(v, out, begin, end, divisor);
}
uint64_t StreamingRead(const uint8_t* data, size_t bytes) {
  return HWY_DYNAMIC_DISPATCH(StreamingReadImpl)(data, bytes);
}
size_t SelectWeightAtLeast(const float* w, size_t begin, size_t end, float t, int32_t* ids) {
  return HWY_DYNAMIC_DISPATCH(SelectWeightAtLeastImpl)(w, begin, end, t, ids);
}
MaxResult Max(const float* v, size_t begin, size_t end) {
  return HWY_DYNAMIC_DISPATCH(MaxImpl)(v, begin, end);
}
double Weights(const float* v, float* v_out, float* w, size_t begin, size_t end, float divisor,
               float max) {
  return HWY_DYNAMIC_DISPATCH(WeightsImpl)(v, v_out, w, begin, end, divisor, max);
}
double SumExp(const float* v, size_t begin, size_t end, float divisor, float max) {
  return HWY_DYNAMIC_DISPATCH(SumExpImpl)(v, begin, end, divisor, max);
}
double WeightsAndHead(const float* v, float* v_out, float* w, size_t begin, size_t end,
                      float divisor, float max, float head_min, int32_t* head, size_t* head_count,
                      double* weighted) {
  return HWY_DYNAMIC_DISPATCH(WeightsAndHeadImpl)(v, v_out, w, begin, end, divisor, max, head_min,
                                                  head, head_count, weighted);
}
SumCount CutValueBelow(const float* v, float* out, float* w, size_t begin, size_t end, float t) {
  return HWY_DYNAMIC_DISPATCH(CutValueBelowImpl)(v, out, w, begin, end, t);
}
SumCount CutWeightBelow(const float* v, float* out, float* w, size_t begin, size_t end, float t) {
  return HWY_DYNAMIC_DISPATCH(CutWeightBelowImpl)(v, out, w, begin, end, t);
}
SumCount SumValues(const float* v, size_t begin, size_t end) {
  return HWY_DYNAMIC_DISPATCH(SumValuesImpl)(v, begin, end);
}
double SumSquares(const float* v, size_t begin, size_t end, double mean) {
  return HWY_DYNAMIC_DISPATCH(SumSquaresImpl)(v, begin, end, mean);
}
double WeightedLogits(const float* v, const float* w, size_t begin, size_t end, float max) {
  return HWY_DYNAMIC_DISPATCH(WeightedLogitsImpl)(v, w, begin, end, max);
}
void InfToUniform(float* v, size_t begin, size_t end) {
  HWY_DYNAMIC_DISPATCH(InfToUniformImpl)(v, begin, end);
}

}  // namespace tokensampler::kernels
#endif  // HWY_ONCE
