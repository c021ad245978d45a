#include "core/tensor.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace tokensampler {
namespace {

struct HalfCase {
  uint16_t bits;
  float value;
};

class Fp16DecodeTest : public ::testing::TestWithParam<HalfCase> {};

TEST_P(Fp16DecodeTest, DecodesExactly) {
  const HalfCase c = GetParam();
  EXPECT_EQ(Fp16ToFloat(c.bits), c.value);
  EXPECT_EQ(FloatToFp16(c.value), c.bits);
}

INSTANTIATE_TEST_SUITE_P(
    KnownBits, Fp16DecodeTest,
    ::testing::Values(HalfCase{0x0000, 0.0f}, HalfCase{0x3c00, 1.0f}, HalfCase{0xc000, -2.0f},
                      HalfCase{0x3555, 0.333251953125f}, HalfCase{0x7bff, 65504.0f},
                      HalfCase{0x0001, 5.9604644775390625e-8f},     // smallest subnormal
                      HalfCase{0x03ff, 6.0975551605224609375e-5f},  // largest subnormal
                      HalfCase{0x0400, 6.103515625e-5f},            // smallest normal
                      HalfCase{0x7c00, std::numeric_limits<float>::infinity()},
                      HalfCase{0xfc00, -std::numeric_limits<float>::infinity()}));

TEST(Fp16Test, NegativeZeroAndNaN) {
  EXPECT_TRUE(std::signbit(Fp16ToFloat(0x8000)));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(Fp16ToFloat(FloatToFp16(std::nanf("")))));
}

TEST(Fp16Test, RoundsToNearestEven) {
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1).
  EXPECT_EQ(FloatToFp16(1.0f + 0x1.0p-11f), 0x3c00);
  // 1 + 3·2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 (even).
  EXPECT_EQ(FloatToFp16(1.0f + 3 * 0x1.0p-11f), 0x3c02);
  EXPECT_EQ(FloatToFp16(65520.0f), 0x7c00);  // rounds up to Inf
  EXPECT_EQ(FloatToFp16(65519.0f), 0x7bff);
  EXPECT_EQ(FloatToFp16(0x1.0p-25f), 0x0000);  // halfway to the smallest subnormal: even = 0
  EXPECT_EQ(FloatToFp16(0x1.8p-25f), 0x0001);
}

TEST(Fp16Test, EveryHalfRoundTrips) {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = Fp16ToFloat(h);
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToFp16(f), h) << "bits " << bits;
  }
}

TEST(Bf16Test, DecodesUpperHalf) {
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(0xc040), -3.0f);
  EXPECT_EQ(Bf16ToFloat(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_EQ(Bf16ToFloat(0xff80), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(Bf16ToFloat(0x7fc0)));
}

TEST(Bf16Test, RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.0f + 0x1.0p-8f), 0x3f80);      // halfway, even stays
  EXPECT_EQ(FloatToBf16(1.0f + 3 * 0x1.0p-8f), 0x3f82);  // halfway, odd rounds up
  EXPECT_EQ(FloatToBf16(1.0f + 0x1.2p-8f), 0x3f81);      // above halfway
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
}

TEST(LogitsViewTest, ReadsEveryDtype) {
  const std::vector<float> values = {1.5f, -2.0f, 0.25f, -1e30f};
  std::vector<uint8_t> f32(values.size() * 4);
  std::memcpy(f32.data(), values.data(), f32.size());
  auto v32 = LogitsView::Create(DType::kFloat32, 2, 2, f32);
  ASSERT_TRUE(v32.ok());
  EXPECT_EQ(v32->At(1, 1), -1e30f);
  EXPECT_EQ(v32->At(0, 1), -2.0f);

  std::vector<uint8_t> b16(values.size() * 2), f16(values.size() * 2);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t b = FloatToBf16(values[i]), h = FloatToFp16(values[i]);
    std::memcpy(b16.data() + 2 * i, &b, 2);
    std::memcpy(f16.data() + 2 * i, &h, 2);
  }
  auto vb = LogitsView::Create(DType::kBFloat16, 1, 4, b16);
  auto vh = LogitsView::Create(DType::kFloat16, 4, 1, f16);
  ASSERT_TRUE(vb.ok());
  ASSERT_TRUE(vh.ok());
  EXPECT_EQ(vb->At(0, 2), 0.25f);
  EXPECT_EQ(vh->At(1, 0), -2.0f);
  EXPECT_EQ(vh->At(3, 0), -std::numeric_limits<float>::infinity());  // -1e30 overflows fp16
}

TEST(LogitsViewTest, RejectsBadShapes) {
  std::vector<uint8_t> bytes(12);
  auto zero = LogitsView::Create(DType::kFloat32, 1, 0, {});
  EXPECT_EQ(zero.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(zero.status().message(), "logits.vocab_size must be > 0, got 0");
  auto wrong = LogitsView::Create(DType::kFloat32, 2, 2, bytes);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("logits.data has 12 bytes, expected"), std::string::npos);
  EXPECT_TRUE(LogitsView::Create(DType::kBFloat16, 2, 3, bytes).ok());
}

TEST(LogitsViewTest, PiecesMustFollowEachOtherAndMatchTheShape) {
  const std::vector<uint8_t> bytes(4 * 6, 0);
  const absl::Span<const uint8_t> all(bytes);
  // In order: a view; with one piece it is contiguous.
  auto view = LogitsView::CreateFromPieces(DType::kFloat32, 2, 3,
                                           {{0, all.subspan(0, 5)}, {5, all.subspan(5)}});
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_TRUE(view->in_pieces());
  view = LogitsView::CreateFromPieces(DType::kFloat32, 2, 3, {{0, all}});
  ASSERT_TRUE(view.ok());
  EXPECT_FALSE(view->in_pieces());
  // A gap, or a size other than the shape's: refused, with Create's message for the size.
  view = LogitsView::CreateFromPieces(DType::kFloat32, 2, 3,
                                      {{0, all.subspan(0, 5)}, {6, all.subspan(6)}});
  EXPECT_EQ(view.status().code(), absl::StatusCode::kInternal);
  view = LogitsView::CreateFromPieces(DType::kFloat32, 2, 4,
                                      {{0, all.subspan(0, 5)}, {5, all.subspan(5)}});
  EXPECT_EQ(view.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(view.status().message(),
            "logits.data has 24 bytes, expected rows × vocab_size × 4 = 2 × 4 × 4 = 32 for "
            "float32");
}

}  // namespace
}  // namespace tokensampler
