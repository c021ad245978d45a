// The cgroup-aware CPU count behind `tokensamplerd --threads=0`.
#include "service/cpu_quota.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tokensampler::service {
namespace {

TEST(CpuQuotaTest, ParsesCgroupV2CpuMax) {
  EXPECT_EQ(ParseCgroupV2CpuMax("max 100000\n"), std::nullopt);
  EXPECT_EQ(ParseCgroupV2CpuMax("200000 100000\n"), 2);
  EXPECT_EQ(ParseCgroupV2CpuMax("150000 100000"), 2);  // rounded up
  EXPECT_EQ(ParseCgroupV2CpuMax("50000 100000"), 1);   // at least one
  EXPECT_EQ(ParseCgroupV2CpuMax("garbage"), std::nullopt);
  EXPECT_EQ(ParseCgroupV2CpuMax("100000 0"), std::nullopt);
  EXPECT_EQ(ParseCgroupV2CpuMax(""), std::nullopt);
}

TEST(CpuQuotaTest, ParsesCgroupV1Quota) {
  EXPECT_EQ(ParseCgroupV1CpuQuota("-1\n", "100000\n"), std::nullopt);
  EXPECT_EQ(ParseCgroupV1CpuQuota("400000\n", "100000\n"), 4);
  EXPECT_EQ(ParseCgroupV1CpuQuota("250000", "100000"), 3);
  EXPECT_EQ(ParseCgroupV1CpuQuota("x", "100000"), std::nullopt);
}

class CgroupDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = absl::StrCat(::testing::TempDir(), "/cgroup_", getpid(), "_",
                         ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  void Write(const std::string& relative, const std::string& contents) {
    std::filesystem::create_directories(std::filesystem::path(root_ + relative).parent_path());
    std::ofstream(root_ + relative) << contents;
  }
  std::string root_;
};

TEST_F(CgroupDirTest, ReadsV2) {
  Write("/cpu.max", "300000 100000\n");
  EXPECT_EQ(CgroupCpuLimit(root_), 3);
}

TEST_F(CgroupDirTest, ReadsV1) {
  Write("/cpu,cpuacct/cpu.cfs_quota_us", "200000\n");
  Write("/cpu,cpuacct/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(CgroupCpuLimit(root_), 2);
}

TEST_F(CgroupDirTest, UnlimitedOrMissingIsNoLimit) {
  EXPECT_EQ(CgroupCpuLimit(root_), std::nullopt);
  Write("/cpu/cpu.cfs_quota_us", "-1\n");
  Write("/cpu/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(CgroupCpuLimit(root_), std::nullopt);
}

TEST(CpuQuotaTest, DefaultThreadCountIsWithinTheMachine) {
  const int threads = DefaultThreadCount();
  EXPECT_GE(threads, 1);
  if (std::thread::hardware_concurrency() > 0) {
    EXPECT_LE(threads, static_cast<int>(std::thread::hardware_concurrency()));
  }
}

}  // namespace
}  // namespace tokensampler::service
