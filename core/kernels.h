// Internal: the SIMD kernels of the row pipeline (Google Highway, dispatched at run time to the
// best instruction set of the machine: AVX-512, AVX2, SSE4 or plain x86-64).
//
// Every kernel works on a range [begin, end) of one row so that callers can cut a row into
// fixed blocks and run the blocks on several threads; a kernel's result for a range does not
// depend on which thread runs it, so combining block results in block order gives the same
// bits for any thread count.
//
// Weights are w = ExpF(v − max), computed in float with a fixed sequence of IEEE operations
// including fused multiply-adds (std::fma in scalar code; SIMD targets without FMA run the scalar
// code), so the SIMD kernels, the scalar tails and the reference implementation give the same
// bits. Sums of weights are accumulated in double.
#ifndef TOKENSAMPLER_CORE_KERNELS_H_
#define TOKENSAMPLER_CORE_KERNELS_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/tensor.h"

namespace tokensampler::kernels {

// e^x in float, within 1.07 ulp for x in [−87.3, 88.7] (a 16-entry table of 2^(j/16) and a
// degree-3 polynomial); 0 below −87.3, for −inf and for NaN. Non-decreasing over [−88, 0] (every
// float checked), the range of weights. Bit-identical to the SIMD version.
float ExpF(float x);

// The smallest float ≥ t (±inf beyond the float range): for a float x, x < t ⇔ x < RoundUp(t),
// so a double threshold becomes a float comparison.
float RoundUp(double t);

// Floats in an order-preserving unsigned encoding (−0 just below +0), for bisection over the
// float order.
inline uint32_t OrderedBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;
}
inline float FromOrderedBits(uint32_t o) {
  const uint32_t u = (o & 0x80000000u) != 0 ? o & 0x7fffffffu : ~o;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The name of the instruction set the kernels run with on this machine ("AVX3", "AVX2", …).
const char* TargetName();

// For tests: the instruction sets the kernels were compiled for that this machine runs, and a
// way to make every kernel run with one of them (0: the best again). Not thread-safe.
std::vector<int64_t> AvailableTargets();
void UseTargetForTest(int64_t target);

struct MaxResult {
  float max;       // largest value (−inf when every value is −inf)
  int64_t argmax;  // its lowest index, or −1 when every value is −inf
  int64_t nan;     // lowest index of a NaN, or −1
};

// The largest values of a row, kept while pass 1 reads it (for a small top_k, which then needs
// no second read of the row). Every value ≥ `threshold` is appended (id and value, in id order);
// when `cap` are held, the threshold rises to the k-th largest held value and those below it
// are dropped. The threshold so never exceeds the row's k-th largest value: what is held at the
// end includes every token top_k keeps, ties included. −inf is never held. Each rise leaves room
// for k + 16 more values (2k + 16 held at the first; never more than 12k + 256). A threshold set
// after j values admits about k / j of the values that follow, so the next rise comes after
// ≈ 1.3 j more: a 128k-token row with k = 50 compacts about nine times, and the threshold stays
// close to the k-th largest value so far, so that few vectors have a value to append (each one
// is a branch the core mispredicts; with 12k + 256 of room after the first rise, they made
// pass 1 cost twice a plain read).
struct TopStream {
  // The largest k, and the buffer room each of ids / values / scratch needs.
  static constexpr size_t kMaxK = 256;
  static constexpr size_t kCapacity = 12 * kMaxK + 256 + 64;

  int32_t k = 0;
  size_t cap = 0;  // compact when this many are held: k + 16 more than after the last rise
  float threshold = -std::numeric_limits<float>::max();  // never raised: every finite value held
  size_t count = 0;
  bool overflow = false;  // ties kept more than half the room at once: given up
  int32_t* ids = nullptr;
  float* values = nullptr;
  float* scratch = nullptr;

  // A stream for top k (1 ≤ k ≤ kMaxK) over buffers of kCapacity.
  static TopStream For(int32_t k, int32_t* ids, float* values, float* scratch) {
    TopStream s;
    s.k = k;
    s.cap = 2 * static_cast<size_t>(k) + 16;
    s.ids = ids;
    s.values = values;
    s.scratch = scratch;
    return s;
  }
};

// Decodes row bytes [begin, end) (element indexes) of `dtype` into out[begin, end), divided by
// `divisor` when it is not 1, and finds the maximum and the first NaN. With out == null the
// decoded values are not stored (the row is only read; float32 rows must be aligned for floats),
// and the maximum's index is found by decoding its chunk again. With `top`, also streams the
// (decoded, divided) values through it; calls for consecutive ranges continue one stream.
MaxResult DecodeMax(DType dtype, const uint8_t* row, size_t begin, size_t end, float divisor,
                    float* out, TopStream* top = nullptr);

// Reads `bytes` bytes once (SIMD, bandwidth-bound) and returns their XOR: the benchmark's floor.
uint64_t StreamingRead(const uint8_t* data, size_t bytes);

// The maximum of v[begin, end) (NaN must not occur).
MaxResult Max(const float* v, size_t begin, size_t end);

// The kernels that change values read them from `v` and write them to `out` / `v_out`, which may
// be v itself (in place) or another buffer (a sample's own copy of a row it only read so far).

// x = v[i], divided by `divisor` when that is not 1 (and then stored at v_out[i] unless v_out is
// null); w[i] = ExpF(x − max) (0 for −inf). Returns Σ w in double. REQUIRES: max ≥ every x — the
// weights are taken relative to the maximum (the SIMD code relies on x − max ≤ 0).
double Weights(const float* v, float* v_out, float* w, size_t begin, size_t end, float divisor,
               float max);

// Σ ExpF(x − max) over [begin, end) in double, x as in Weights (the weights, not stored).
// REQUIRES: as Weights.
double SumExp(const float* v, size_t begin, size_t end, float divisor, float max);

// Weights, and also writes to head[0…] the ids of the tokens with w ≥ head_min (in id order);
// `*head_count` receives how many. head has room for end − begin ids. head may be null (no
// head). With `weighted`, also *weighted = Σ w·(x − max) over the tokens with w > 0, in double:
// WeightedLogits of the result, without a pass of its own.
double WeightsAndHead(const float* v, float* v_out, float* w, size_t begin, size_t end,
                      float divisor, float max, float head_min, int32_t* head, size_t* head_count,
                      double* weighted = nullptr);

// out[i] = v[i] / divisor.
void Scale(const float* v, float* out, size_t begin, size_t end, float divisor);

struct SumCount {
  double sum;     // Σ w of the kept tokens
  int64_t count;  // kept tokens (v ≠ −inf)
};

// out[i] = v[i], or −inf (and w[i] = 0) for every token with v < t: removed. `w` may be null (no
// weights yet).
SumCount CutValueBelow(const float* v, float* out, float* w, size_t begin, size_t end, float t);

// The same for every token with w < t; tokens with v = −inf count as removed.
SumCount CutWeightBelow(const float* v, float* out, float* w, size_t begin, size_t end, float t);

// For each range j (n ≤ 16): sums[j] += Σ w and counts[j] += count over tokens with
// from[j] ≤ v ≤ to[j]. The sums are accumulated in float within the call (for bracketing a cut;
// relative error below 1e-4 for calls of up to 4096 tokens) and added to sums[j] in double.
void MassInRanges(const float* v, const float* w, size_t begin, size_t end, const float* from,
                  const float* to, int n, double* sums, int64_t* counts);

// Σ w over tokens with from ≤ v ≤ to, in double (exact up to the order of additions).
double MassInRange(const float* v, const float* w, size_t begin, size_t end, float from, float to);

// Writes the ids of tokens with in_from ≤ v ≤ in_to but not out_from ≤ v ≤ out_to (in id
// order); returns how many. ids needs room for end − begin ids.
size_t SelectRanges(const float* v, size_t begin, size_t end, float in_from, float in_to,
                    float out_from, float out_to, int32_t* ids);

// Narrows a gathered band of n entries (v[i], w[i], ids[i]) in place: keeps, in order, those
// with keep_from ≤ v ≤ keep_to and not gone_from ≤ v ≤ gone_to, and sets *kept to how many.
// Returns Σ w (in double, exact up to the order of additions) and the count of the entries with
// gone_from ≤ v ≤ gone_to.
SumCount NarrowBand(float* v, float* w, int32_t* ids, size_t n, float keep_from, float keep_to,
                    float gone_from, float gone_to, size_t* kept);

// Writes the ids of tokens with w ≥ t (and w > 0) to ids (in id order); returns how many.
size_t SelectWeightAtLeast(const float* w, size_t begin, size_t end, float t, int32_t* ids);

// Σ v and Σ v² − style moments of the kept tokens for top_n_sigma: returns {Σ v, count} and
// with `mean` given, Σ (v − mean)² in `squares`.
SumCount SumValues(const float* v, size_t begin, size_t end);
double SumSquares(const float* v, size_t begin, size_t end, double mean);

// Σ w · (v − max) over kept tokens, in double (for the entropy).
double WeightedLogits(const float* v, const float* w, size_t begin, size_t end, float max);

// Keeps only the tokens equal to +inf, as 0; every other becomes −inf.
void InfToUniform(float* v, size_t begin, size_t end);

}  // namespace tokensampler::kernels

#endif  // TOKENSAMPLER_CORE_KERNELS_H_
