// ToGrpcStatus: every canonical code keeps its number and its message.
#include "service/status.h"

#include <string>

#include "gtest/gtest.h"

namespace tokensampler::service {
namespace {

TEST(ToGrpcStatusTest, OkIsOk) { EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok()); }

TEST(ToGrpcStatusTest, EveryCodeKeepsItsNumberAndMessage) {
  for (int code = 1; code <= 16; ++code) {
    const absl::Status status(static_cast<absl::StatusCode>(code), "rows[3].params.top_p bad");
    const grpc::Status mapped = ToGrpcStatus(status);
    EXPECT_EQ(static_cast<int>(mapped.error_code()), code)
        << absl::StatusCodeToString(status.code());
    EXPECT_EQ(mapped.error_message(), "rows[3].params.top_p bad");
  }
  EXPECT_EQ(ToGrpcStatus(absl::InvalidArgumentError("x")).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(ToGrpcStatus(absl::ResourceExhaustedError("x")).error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(ToGrpcStatus(absl::UnavailableError("x")).error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST(ToGrpcStatusTest, UnknownCodeIsUnknown) {
  const absl::Status status(static_cast<absl::StatusCode>(42), "odd");
  EXPECT_EQ(ToGrpcStatus(status).error_code(), grpc::StatusCode::UNKNOWN);
  EXPECT_EQ(ToGrpcStatus(status).error_message(), "odd");
}

}  // namespace
}  // namespace tokensampler::service
