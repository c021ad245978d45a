// Philox4x32-10 (Salmon et al., SC'11): a counter-based generator. The same (key, counter) gives
// the same bits on every machine, thread and batch layout, which is what seeded rows need.
// Pure functions: thread-safe.
#ifndef TOKENSAMPLER_CORE_PHILOX_H_
#define TOKENSAMPLER_CORE_PHILOX_H_

#include <array>
#include <cstdint>

namespace tokensampler {

using PhiloxCounter = std::array<uint32_t, 4>;
using PhiloxKey = std::array<uint32_t, 2>;

// Ten rounds of Philox4x32 over `counter` with `key`.
PhiloxCounter Philox4x32(PhiloxCounter counter, PhiloxKey key);

// Why a draw is made; part of the counter so that different uses in one step never share bits.
enum class DrawPurpose : uint32_t {
  kToken = 0,    // the categorical draw of the token
  kXtc = 1,      // XTC's coin
  kAccept = 2,   // speculative decoding: accept / reject coins (one per position)
  kRecover = 3,  // speculative decoding: residual draw
  // Beam search with do_sample: the draws of the continuations (lane = group · K + draw).
  kBeamCandidates = 16,
};

// A uniform double in [0, 1) with 53 random bits, keyed by (seed, step, sample, purpose, lane).
// `step` is the number of output tokens already in the sequence; `sample` the sample index.
double UniformDouble(uint64_t seed, uint64_t step, uint32_t sample, DrawPurpose purpose,
                     uint32_t lane = 0);

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_PHILOX_H_
