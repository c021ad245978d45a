#include "core/philox.h"

namespace tokensampler {
namespace {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

inline void MulHiLo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = uint64_t{a} * b;
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

}  // namespace

PhiloxCounter Philox4x32(PhiloxCounter c, PhiloxKey k) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    MulHiLo(kMul0, c[0], hi0, lo0);
    MulHiLo(kMul1, c[2], hi1, lo1);
    c = {hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0};
    k[0] += kWeyl0;
    k[1] += kWeyl1;
  }
  return c;
}

double UniformDouble(uint64_t seed, uint64_t step, uint32_t sample, DrawPurpose purpose,
                     uint32_t lane) {
  const PhiloxCounter counter = {static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                                 sample,
                                 (static_cast<uint32_t>(purpose) << 24) | (lane & 0xffffffu)};
  const PhiloxKey key = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  const PhiloxCounter bits = Philox4x32(counter, key);
  // 53 bits → [0, 1): exact in double, no platform library involved.
  const uint64_t mantissa = (uint64_t{bits[0]} << 21) | (bits[1] >> 11);
  return static_cast<double>(mantissa) * 0x1.0p-53;
}

}  // namespace tokensampler
