// How many CPUs this process may use: the cgroup CPU quota (v2 `cpu.max`, v1
// `cpu.cfs_quota_us` / `cpu.cfs_period_us`) capped by std::thread::hardware_concurrency().
// oneTBB sizes itself from the affinity mask and ignores CFS quotas, so a container limited to
// 2 CPUs on a 64-core host would otherwise start 64 threads and be throttled.
// Pure functions over their arguments and the file system: thread-safe.
#ifndef TOKENSAMPLER_SERVICE_CPU_QUOTA_H_
#define TOKENSAMPLER_SERVICE_CPU_QUOTA_H_

#include <optional>
#include <string>

#include "absl/strings/string_view.h"

namespace tokensampler::service {

// Parses the contents of a cgroup v2 `cpu.max` file ("$MAX $PERIOD", MAX may be "max").
// Returns ceil(MAX / PERIOD) (at least 1), or nullopt when unlimited or malformed.
std::optional<int> ParseCgroupV2CpuMax(absl::string_view contents);

// Parses cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` contents.
// Returns ceil(quota / period) (at least 1), or nullopt when the quota is -1 (unlimited) or a
// value is malformed.
std::optional<int> ParseCgroupV1CpuQuota(absl::string_view quota_us, absl::string_view period_us);

// Returns the CPU limit of the cgroup mounted at `cgroup_root`: `cpu.max` there (v2), else
// `cpu/` or `cpu,cpuacct/` `cpu.cfs_quota_us` + `cpu.cfs_period_us` (v1). nullopt when no
// quota is set or the files cannot be read.
std::optional<int> CgroupCpuLimit(const std::string& cgroup_root = "/sys/fs/cgroup");

// Returns min(hardware_concurrency, CgroupCpuLimit()), at least 1: the default size of the
// sampling arena (`tokensamplerd --threads=0`).
int DefaultThreadCount();

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_CPU_QUOTA_H_
