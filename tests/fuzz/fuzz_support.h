// Support for the fuzz targets (tests/fuzz/*_fuzzer.cc): FuzzInput, which turns the fuzzer's
// bytes into typed values, and FUZZ_CHECK, the oracle's assertion.
//
// FuzzInput plays the role of LLVM's FuzzedDataProvider, but is our own so that the same fuzz
// target also builds with GCC as a corpus-replay test (tests/fuzz/replay_main.cc; GCC has no
// <fuzzer/FuzzedDataProvider.h>). It consumes from the front; once the bytes run out every
// value is zero / the low end of its range, so any input is a valid program for the target.
//
// Thread-compatible.
#ifndef TOKENSAMPLER_TESTS_FUZZ_FUZZ_SUPPORT_H_
#define TOKENSAMPLER_TESTS_FUZZ_FUZZ_SUPPORT_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>

// Aborts (a crash the fuzzer records, with its input) when `cond` is false. Always on.
#define FUZZ_CHECK(cond, ...)                                                            \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                                 \
      std::fprintf(stderr, "\n");                                                        \
      std::abort();                                                                      \
    }                                                                                    \
  } while (false)

namespace tokensampler::fuzzing {

class FuzzInput {
 public:
  FuzzInput(const uint8_t* data, size_t size) : data_(data), size_(size) {}

  bool empty() const { return size_ == 0; }
  size_t remaining() const { return size_; }

  // sizeof(T) bytes (little-endian; missing bytes are zero).
  template <typename T>
  T Integral() {
    static_assert(std::is_integral_v<T>);
    using U = std::make_unsigned_t<T>;
    U value = 0;
    for (size_t i = 0; i < sizeof(T) && size_ > 0; ++i) {
      value = static_cast<U>(value | static_cast<U>(static_cast<U>(*data_) << (8 * i)));
      ++data_;
      --size_;
    }
    return static_cast<T>(value);
  }

  // A value in [lo, hi], consuming only as many bytes as the range needs.
  template <typename T>
  T IntegralInRange(T lo, T hi) {
    static_assert(std::is_integral_v<T>);
    const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
    uint64_t value = 0;
    for (uint64_t covered = 0; covered < range && size_ > 0; covered = (covered << 8) | 0xff) {
      value = (value << 8) | *data_;
      ++data_;
      --size_;
    }
    if (range != std::numeric_limits<uint64_t>::max()) value %= range + 1;
    return static_cast<T>(static_cast<uint64_t>(lo) + value);
  }

  bool Bool() { return (Integral<uint8_t>() & 1) != 0; }

  // True with probability ≈ percent / 100 over uniform bytes.
  bool Percent(int percent) { return Integral<uint8_t>() * 100 < percent * 256; }

  template <typename T>
  T OneOf(std::initializer_list<T> values) {
    const size_t i = IntegralInRange<size_t>(0, values.size() - 1);
    return *(values.begin() + static_cast<ptrdiff_t>(i));
  }

  // A float that is often one of the values that break numerics: NaN, ±Inf, ±0, denormals,
  // ±FLT_MAX, the smallest normal, values near the exp() overflow / underflow limits; else
  // raw bits (any float) or a small integer / 8.
  float Float() {
    constexpr float kInf = std::numeric_limits<float>::infinity();
    switch (Integral<uint8_t>() % 16) {
      case 0:
        return std::numeric_limits<float>::quiet_NaN();
      case 1:
        return Bool() ? kInf : -kInf;
      case 2:
        return Bool() ? 0.0f : -0.0f;
      case 3:
        return (Bool() ? 1.0f : -1.0f) * std::numeric_limits<float>::denorm_min() *
               static_cast<float>(Integral<uint8_t>() + 1);
      case 4:
        return Bool() ? std::numeric_limits<float>::max() : std::numeric_limits<float>::lowest();
      case 5:
        return (Bool() ? 1.0f : -1.0f) * std::numeric_limits<float>::min();
      case 6:
        return OneOf({88.7f, 89.0f, -87.3f, -103.9f, -104.0f, 1e30f, -1e30f, 1e-30f});
      case 7:
      case 8: {
        const uint32_t bits = Integral<uint32_t>();
        float out;
        std::memcpy(&out, &bits, sizeof(out));
        return out;
      }
      default:
        return static_cast<float>(Integral<int8_t>()) / 8.0f;
    }
  }

  // A finite float in [lo, hi] (lo ≤ hi), evenly spaced over 2^16 steps.
  float FloatInRange(float lo, float hi) {
    const float t = static_cast<float>(Integral<uint16_t>()) / 65535.0f;
    return lo + (hi - lo) * t;
  }

  std::string Bytes(size_t n) {
    n = n < size_ ? n : size_;
    std::string out(reinterpret_cast<const char*>(data_), n);
    data_ += n;
    size_ -= n;
    return out;
  }

 private:
  const uint8_t* data_;
  size_t size_;
};

// A tiny deterministic generator (splitmix64) for bulk data derived from a few input bytes:
// a 20 000-token row costs the fuzzer 8 bytes of seed instead of 80 000 bytes of input.
class SplitMix {
 public:
  explicit SplitMix(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1).
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

 private:
  uint64_t state_;
};

}  // namespace tokensampler::fuzzing

#endif  // TOKENSAMPLER_TESTS_FUZZ_FUZZ_SUPPORT_H_
