#include "core/philox.h"

#include <set>

#include "gtest/gtest.h"

namespace tokensampler {
namespace {

// Known-answer vectors of Philox4x32-10 (Random123's kat_vectors).
TEST(PhiloxTest, KnownAnswers) {
  EXPECT_EQ(Philox4x32({0, 0, 0, 0}, {0, 0}),
            (PhiloxCounter{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(Philox4x32({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
            (PhiloxCounter{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(Philox4x32({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (PhiloxCounter{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(PhiloxTest, UniformIsInUnitIntervalAndKeyedByEveryCoordinate) {
  std::set<double> seen;
  for (uint64_t seed : {0ull, 1ull, 0xffffffffffffffffull}) {
    for (uint64_t step : {0ull, 1ull, 1ull << 40}) {
      for (uint32_t sample : {0u, 1u}) {
        for (DrawPurpose purpose : {DrawPurpose::kToken, DrawPurpose::kXtc}) {
          const double u = UniformDouble(seed, step, sample, purpose);
          EXPECT_GE(u, 0.0);
          EXPECT_LT(u, 1.0);
          seen.insert(u);
        }
      }
    }
  }
  EXPECT_EQ(seen.size(), 3u * 3u * 2u * 2u);
  EXPECT_EQ(UniformDouble(7, 3, 1, DrawPurpose::kToken),
            UniformDouble(7, 3, 1, DrawPurpose::kToken));
}

TEST(PhiloxTest, UniformMeanIsHalf) {
  // 100000 draws: the mean of U[0,1) has σ = 1/sqrt(12·1e5) ≈ 0.00091; 5σ bound.
  double sum = 0.0;
  for (uint64_t step = 0; step < 100000; ++step) {
    sum += UniformDouble(42, step, 0, DrawPurpose::kToken);
  }
  EXPECT_NEAR(sum / 100000.0, 0.5, 0.0046);
}

}  // namespace
}  // namespace tokensampler
