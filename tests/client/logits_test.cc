#include "client/logits.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokensampler {
namespace {

using ::testing::HasSubstr;

float FromBits(uint32_t bits) { return std::bit_cast<float>(bits); }

// Exact binary16 → double decoding, written independently of the code under test.
double Fp16ToDouble(uint16_t h) {
  const int sign = (h & 0x8000) ? -1 : 1;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  if (exp == 0x1f) {
    return mant == 0 ? sign * std::numeric_limits<double>::infinity()
                     : std::numeric_limits<double>::quiet_NaN();
  }
  if (exp == 0) return sign * std::ldexp(mant, -24);
  return sign * std::ldexp(1024 + mant, exp - 25);
}

bool IsFp16NaN(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0; }
bool IsBf16NaN(uint16_t b) { return (b & 0x7f80) == 0x7f80 && (b & 0x007f) != 0; }

struct Case {
  const char* name;
  uint32_t float_bits;
  uint16_t expected;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// --- bfloat16 ---

class RoundToBf16Test : public ::testing::TestWithParam<Case> {};

TEST_P(RoundToBf16Test, GivesExactBits) {
  const Case& c = GetParam();
  EXPECT_EQ(RoundToBf16(FromBits(c.float_bits)), c.expected)
      << std::hex << "float bits 0x" << c.float_bits;
}

INSTANTIATE_TEST_SUITE_P(
    KnownPatterns, RoundToBf16Test,
    ::testing::Values(Case{"one", 0x3f800000u, 0x3f80}, Case{"minus_two", 0xc0000000u, 0xc000},
                      Case{"pi", 0x40490fdbu, 0x4049},  // 0x0fdb < 0x8000: down
                      Case{"zero", 0x00000000u, 0x0000}, Case{"minus_zero", 0x80000000u, 0x8000},
                      Case{"below_half_rounds_down", 0x3f807fffu, 0x3f80},
                      Case{"above_half_rounds_up", 0x3f808001u, 0x3f81},
                      Case{"tie_to_even_stays", 0x3f808000u, 0x3f80},    // 0x3f80 is even
                      Case{"tie_to_even_goes_up", 0x3f818000u, 0x3f82},  // 0x3f81 is odd
                      Case{"carry_into_exponent", 0x3fffffffu, 0x4000},
                      Case{"max_float_overflows_to_inf", 0x7f7fffffu, 0x7f80},
                      Case{"largest_finite_bf16", 0x7f7f0000u, 0x7f7f},
                      Case{"tie_below_inf_to_even_inf", 0x7f7f8000u,
                           0x7f80},  // 0x7f7f odd → 0x7f80
                      Case{"minus_max_float_to_minus_inf", 0xff7fffffu, 0xff80},
                      Case{"inf", 0x7f800000u, 0x7f80}, Case{"minus_inf", 0xff800000u, 0xff80},
                      Case{"quiet_nan", 0x7fc00000u, 0x7fc0},
                      Case{"minus_quiet_nan", 0xffc00000u, 0xffc0},
                      Case{"signalling_nan_low_payload_stays_nan", 0x7f800001u, 0x7fc0},
                      Case{"nan_payload_kept", 0x7fa10000u, 0x7fe1},
                      Case{"nan_would_round_to_inf", 0x7f80ffffu, 0x7fc0},
                      Case{"smallest_subnormal_to_zero", 0x00000001u, 0x0000},
                      Case{"subnormal_exact", 0x00010000u, 0x0001},
                      Case{"subnormal_tie_to_even_zero", 0x00008000u, 0x0000},
                      Case{"subnormal_tie_to_even_up", 0x00018000u, 0x0002},
                      Case{"subnormal_carry_to_normal", 0x007fffffu, 0x0080}),
    [](const ::testing::TestParamInfo<Case>& test_info) {
      return std::string(test_info.param.name);
    });

// Reference: the nearer of the two bf16 neighbours by exact double arithmetic, ties to even.
uint16_t ReferenceBf16(uint32_t bits) {
  const uint16_t down = static_cast<uint16_t>(bits >> 16);
  if ((bits & 0xffffu) == 0) return down;
  const uint16_t up = static_cast<uint16_t>(down + 1);
  const double x = FromBits(bits);
  const double d_down = std::abs(x - static_cast<double>(FromBits(uint32_t{down} << 16)));
  // `up` may be ±Inf (0x7f80): its distance is then measured from 2^128, the next power.
  const double up_value = (up & 0x7fff) == 0x7f80 ? std::copysign(std::ldexp(1.0, 128), x)
                                                  : FromBits(uint32_t{up} << 16);
  const double d_up = std::abs(up_value - x);
  if (d_down != d_up) return d_down < d_up ? down : up;
  return (down & 1u) == 0 ? down : up;
}

TEST(RoundToBf16Test, MatchesReferenceOnStridedFloats) {
  // All 2^32 floats would take minutes; an odd stride still hits every value of the low 16
  // (rounded-away) bits, in every exponent and both signs.
  int checked = 0;
  for (uint64_t bits = 0; bits <= 0xffffffffu; bits += 4093) {
    const auto b = static_cast<uint32_t>(bits);
    if ((b & 0x7fffffffu) > 0x7f800000u) continue;
    ASSERT_EQ(RoundToBf16(FromBits(b)), ReferenceBf16(b)) << std::hex << "bits 0x" << b;
    ++checked;
  }
  EXPECT_GT(checked, 1000000);
}

TEST(RoundToBf16Test, EveryBf16ValueRoundTrips) {
  for (uint32_t b = 0; b <= 0xffffu; ++b) {
    const float f = FromBits(b << 16);
    if (IsBf16NaN(static_cast<uint16_t>(b))) {
      EXPECT_TRUE(IsBf16NaN(RoundToBf16(f))) << std::hex << b;
    } else {
      ASSERT_EQ(RoundToBf16(f), b) << std::hex << b;
    }
  }
}

// --- float16 ---

class RoundToFp16Test : public ::testing::TestWithParam<Case> {};

TEST_P(RoundToFp16Test, GivesExactBits) {
  const Case& c = GetParam();
  EXPECT_EQ(RoundToFp16(FromBits(c.float_bits)), c.expected)
      << std::hex << "float bits 0x" << c.float_bits;
}

INSTANTIATE_TEST_SUITE_P(
    KnownPatterns, RoundToFp16Test,
    ::testing::Values(
        Case{"one", 0x3f800000u, 0x3c00}, Case{"minus_two", 0xc0000000u, 0xc000},
        Case{"zero", 0x00000000u, 0x0000}, Case{"minus_zero", 0x80000000u, 0x8000},
        Case{"point_one", 0x3dcccccdu, 0x2e66}, Case{"one_third", 0x3eaaaaabu, 0x3555},
        Case{"max_half_65504", 0x477fe000u, 0x7bff},
        Case{"just_below_65520_stays_finite", 0x477fefffu, 0x7bff},
        Case{"65520_tie_to_even_inf", 0x477ff000u, 0x7c00},
        Case{"minus_65520_to_minus_inf", 0xc77ff000u, 0xfc00},
        Case{"65536_to_inf", 0x47800000u, 0x7c00}, Case{"max_float_to_inf", 0x7f7fffffu, 0x7c00},
        Case{"inf", 0x7f800000u, 0x7c00}, Case{"minus_inf", 0xff800000u, 0xfc00},
        Case{"quiet_nan", 0x7fc00000u, 0x7e00}, Case{"minus_quiet_nan", 0xffc00000u, 0xfe00},
        Case{"signalling_nan_low_payload_stays_nan", 0x7f800001u, 0x7e00},
        Case{"nan_payload_kept", 0x7fa02000u, 0x7f01},
        Case{"tie_to_even_stays", 0x3f801000u, 0x3c00},    // 1 + 2^-11
        Case{"tie_to_even_goes_up", 0x3f803000u, 0x3c02},  // 1 + 3·2^-11
        Case{"above_half_rounds_up", 0x3f801001u, 0x3c01},
        Case{"carry_into_exponent_2047_5", 0x44fff000u, 0x6800},  // 2047.5 → 2048
        Case{"smallest_normal", 0x38800000u, 0x0400},
        Case{"largest_subnormal", 0x387fc000u, 0x03ff},                // 1023·2^-24
        Case{"subnormal_tie_carries_to_normal", 0x387fe000u, 0x0400},  // 1023.5·2^-24
        Case{"smallest_subnormal", 0x33800000u, 0x0001},
        Case{"minus_smallest_subnormal", 0xb3800000u, 0x8001},
        Case{"half_smallest_subnormal_ties_to_zero", 0x33000000u, 0x0000},  // 2^-25
        Case{"just_above_half_smallest_subnormal_rounds_up", 0x33000001u, 0x0001},
        Case{"three_halves_subnormal_ties_to_two", 0x33c00000u, 0x0002},  // 1.5·2^-24
        Case{"five_halves_subnormal_ties_to_two", 0x34200000u, 0x0002},   // 2.5·2^-24
        Case{"quarter_smallest_subnormal_to_zero", 0x32800000u, 0x0000},
        Case{"minus_tiny_to_minus_zero", 0x80000001u, 0x8000}),
    [](const ::testing::TestParamInfo<Case>& test_info) {
      return std::string(test_info.param.name);
    });

TEST(RoundToFp16Test, EveryFp16ValueRoundTrips) {
  for (uint32_t h = 0; h <= 0xffffu; ++h) {
    const auto half = static_cast<uint16_t>(h);
    const auto f = static_cast<float>(Fp16ToDouble(half));
    if (IsFp16NaN(half)) {
      EXPECT_TRUE(IsFp16NaN(RoundToFp16(f))) << std::hex << h;
    } else {
      ASSERT_EQ(RoundToFp16(f), half) << std::hex << h;
    }
  }
}

// Reference: the nearest binary16 by exhaustive search over the 65536 values in exact double
// arithmetic (a float and every half are exact doubles), ties to the even pattern; beyond
// 65520 the nearest is Inf (IEEE: |x| ≥ max + half an ulp overflows).
uint16_t ReferenceFp16(float x) {
  const double v = x;
  if (std::isinf(v)) return v > 0 ? 0x7c00 : 0xfc00;
  if (std::abs(v) >= 65520.0) return v > 0 ? 0x7c00 : 0xfc00;
  const uint16_t sign = std::signbit(v) ? 0x8000 : 0x0000;
  uint16_t best = sign;
  double best_d = std::abs(v);
  for (uint16_t m = 1; m < 0x7c00; ++m) {
    const double d = std::abs(std::abs(v) - Fp16ToDouble(m));
    if (d < best_d || (d == best_d && (m & 1u) == 0)) {
      best = static_cast<uint16_t>(sign | m);
      best_d = d;
    }
  }
  return best;
}

TEST(RoundToFp16Test, MatchesExhaustiveSearchReference) {
  // Representative floats around every binade the half range touches, plus tie points.
  std::vector<float> inputs;
  for (int e = -27; e <= 16; ++e) {
    for (const double frac : {1.0, 1.0001, 1.25, 1.33333, 1.5, 1.75, 1.99951171875, 1.999999}) {
      inputs.push_back(static_cast<float>(std::ldexp(frac, e)));
      inputs.push_back(static_cast<float>(-std::ldexp(frac, e)));
    }
    for (int k = 0; k < 8; ++k) {  // exact midpoints between neighbouring halves of the binade
      inputs.push_back(static_cast<float>(std::ldexp(1.0 + (2 * k + 1) / 2048.0, e)));
    }
  }
  for (const float x : inputs) {
    EXPECT_EQ(RoundToFp16(x), ReferenceFp16(x)) << "x = " << x;
  }
}

#if defined(__FLT16_MAX__)
// GCC's _Float16 conversion (libgcc's __truncsfhf2, IEEE round-to-nearest-even) as a second,
// independent reference over a strided sweep of all floats.
TEST(RoundToFp16Test, MatchesCompilerFloat16OnStridedFloats) {
  int checked = 0;
  for (uint64_t bits = 0; bits <= 0xffffffffu; bits += 4093) {
    const auto b = static_cast<uint32_t>(bits);
    const float f = FromBits(b);
    if (std::isnan(f)) continue;
    const auto h = static_cast<_Float16>(f);
    uint16_t expected;
    std::memcpy(&expected, &h, sizeof(expected));
    ASSERT_EQ(RoundToFp16(f), expected) << std::hex << "bits 0x" << b;
    ++checked;
  }
  EXPECT_GT(checked, 1000000);
}
#endif

// --- DTypeBytes / MakeLogits / MakeLogitsFromBytes ---

TEST(DTypeBytesTest, SizesPerDType) {
  EXPECT_EQ(DTypeBytes(v1::DTYPE_FLOAT32), 4u);
  EXPECT_EQ(DTypeBytes(v1::DTYPE_BFLOAT16), 2u);
  EXPECT_EQ(DTypeBytes(v1::DTYPE_FLOAT16), 2u);
  EXPECT_EQ(DTypeBytes(v1::DTYPE_UNSPECIFIED), 0u);
  EXPECT_EQ(DTypeBytes(static_cast<v1::DType>(17)), 0u);
}

std::vector<uint8_t> Bytes(const std::string& data) { return {data.begin(), data.end()}; }

TEST(MakeLogitsTest, Float32IsLittleEndianCopy) {
  const float values[] = {1.0f, -2.0f, 0.5f, -std::numeric_limits<float>::infinity()};
  absl::StatusOr<v1::Logits> logits = MakeLogits(values, 2, v1::DTYPE_FLOAT32);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->dtype(), v1::DTYPE_FLOAT32);
  EXPECT_EQ(logits->rows(), 2u);
  EXPECT_EQ(logits->vocab_size(), 2u);
  EXPECT_EQ(Bytes(logits->data()),
            (std::vector<uint8_t>{0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0,  //
                                  0x00, 0x00, 0x00, 0x3f, 0x00, 0x00, 0x80, 0xff}));
}

TEST(MakeLogitsTest, Bfloat16RoundsAndStoresLittleEndian) {
  const float values[] = {1.0f, FromBits(0x3f818000u), -3.0f};
  absl::StatusOr<v1::Logits> logits = MakeLogits(values, 3, v1::DTYPE_BFLOAT16);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->rows(), 1u);
  EXPECT_EQ(Bytes(logits->data()), (std::vector<uint8_t>{0x80, 0x3f, 0x82, 0x3f, 0x40, 0xc0}));
}

TEST(MakeLogitsTest, Float16RoundsAndStoresLittleEndian) {
  const float values[] = {1.0f, 65504.0f, 1e6f, 0.1f};
  absl::StatusOr<v1::Logits> logits = MakeLogits(values, 1, v1::DTYPE_FLOAT16);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->rows(), 4u);
  EXPECT_EQ(Bytes(logits->data()),
            (std::vector<uint8_t>{0x00, 0x3c, 0xff, 0x7b, 0x00, 0x7c, 0x66, 0x2e}));
}

TEST(MakeLogitsTest, RejectsUnspecifiedDType) {
  const float values[] = {1.0f};
  absl::StatusOr<v1::Logits> logits = MakeLogits(values, 1, v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(logits.status().message(), HasSubstr("DTYPE_UNSPECIFIED"));
}

TEST(MakeLogitsTest, RejectsZeroVocab) {
  const float values[] = {1.0f};
  absl::StatusOr<v1::Logits> logits = MakeLogits(values, 0, v1::DTYPE_FLOAT32);
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(logits.status().message(), HasSubstr("vocab_size must be > 0"));
}

TEST(MakeLogitsTest, RejectsPartialRow) {
  const float values[] = {1.0f, 2.0f, 3.0f};
  absl::StatusOr<v1::Logits> logits = MakeLogits(values, 2, v1::DTYPE_FLOAT32);
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(logits.status().message(), HasSubstr("not a multiple of vocab_size 2"));
}

TEST(MakeLogitsTest, EmptyValuesGiveZeroRows) {
  absl::StatusOr<v1::Logits> logits = MakeLogits({}, 4, v1::DTYPE_FLOAT32);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->rows(), 0u);
  EXPECT_TRUE(logits->data().empty());
}

TEST(MakeLogitsFromBytesTest, KeepsBytesAndComputesRows) {
  const std::string bytes = {'\x80', '\x3f', '\x00', '\x40', '\x40', '\x40', '\x80', '\x40'};
  absl::StatusOr<v1::Logits> logits = MakeLogitsFromBytes(bytes, 2, v1::DTYPE_BFLOAT16);
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->rows(), 2u);
  EXPECT_EQ(logits->vocab_size(), 2u);
  EXPECT_EQ(logits->dtype(), v1::DTYPE_BFLOAT16);
  EXPECT_EQ(logits->data(), bytes);
}

TEST(MakeLogitsFromBytesTest, RejectsPartialElement) {
  absl::StatusOr<v1::Logits> logits = MakeLogitsFromBytes("abcdef", 1, v1::DTYPE_FLOAT32);
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(logits.status().message(), HasSubstr("6 bytes"));
}

TEST(MakeLogitsFromBytesTest, RejectsPartialRow) {
  absl::StatusOr<v1::Logits> logits = MakeLogitsFromBytes("abcdef", 2, v1::DTYPE_FLOAT16);
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(logits.status().message(), HasSubstr("not a multiple of vocab_size 2"));
}

TEST(MakeLogitsFromBytesTest, RejectsUnspecifiedDType) {
  absl::StatusOr<v1::Logits> logits = MakeLogitsFromBytes("abcd", 1, v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tokensampler
