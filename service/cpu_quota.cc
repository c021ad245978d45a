#include "service/cpu_quota.h"

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

namespace tokensampler::service {
namespace {

// ceil(quota / period) clamped to [1, INT32_MAX]; nullopt unless both are positive.
std::optional<int> CpusFromQuota(int64_t quota, int64_t period) {
  if (quota <= 0 || period <= 0) return std::nullopt;
  const int64_t cpus = (quota + period - 1) / period;
  return static_cast<int>(std::clamp<int64_t>(cpus, 1, INT32_MAX));
}

std::optional<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return std::nullopt;
  return contents.str();
}

}  // namespace

std::optional<int> ParseCgroupV2CpuMax(absl::string_view contents) {
  const std::vector<absl::string_view> fields =
      absl::StrSplit(absl::StripAsciiWhitespace(contents), ' ', absl::SkipEmpty());
  if (fields.size() != 2 || fields[0] == "max") return std::nullopt;
  int64_t quota = 0;
  int64_t period = 0;
  if (!absl::SimpleAtoi(fields[0], &quota) || !absl::SimpleAtoi(fields[1], &period)) {
    return std::nullopt;
  }
  return CpusFromQuota(quota, period);
}

std::optional<int> ParseCgroupV1CpuQuota(absl::string_view quota_us, absl::string_view period_us) {
  int64_t quota = 0;
  int64_t period = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(quota_us), &quota) ||
      !absl::SimpleAtoi(absl::StripAsciiWhitespace(period_us), &period)) {
    return std::nullopt;
  }
  return CpusFromQuota(quota, period);  // quota -1 = unlimited
}

std::optional<int> CgroupCpuLimit(const std::string& cgroup_root) {
  if (std::optional<std::string> cpu_max = ReadFile(cgroup_root + "/cpu.max")) {
    return ParseCgroupV2CpuMax(*cpu_max);
  }
  for (const char* controller : {"/cpu", "/cpu,cpuacct"}) {
    const std::string dir = cgroup_root + controller;
    std::optional<std::string> quota = ReadFile(dir + "/cpu.cfs_quota_us");
    std::optional<std::string> period = ReadFile(dir + "/cpu.cfs_period_us");
    if (quota && period) return ParseCgroupV1CpuQuota(*quota, *period);
  }
  return std::nullopt;
}

int DefaultThreadCount() {
  int cpus = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (std::optional<int> limit = CgroupCpuLimit()) cpus = std::min(cpus, *limit);
  return std::max(cpus, 1);
}

}  // namespace tokensampler::service
