// Steady state allocates nothing per row: once the per-thread scratch has grown, a batch of 64
// rows makes exactly as many heap allocations as a batch of 1 (the batch's own result vectors),
// for every chain of the benchmark. Counts calls of the global operator new.
#include <atomic>
#include <cstdlib>
#include <new>
#include <vector>

#include "core/sampler.h"
#include "gtest/gtest.h"
#include "tbb/task_arena.h"
#include "tests/bench/chain.h"
#include "tests/testing/core_testing.h"

// The replacements pair malloc with free on purpose; GCC cannot see that through inlining.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

namespace {
std::atomic<long> g_allocations{0};
}  // namespace

void* operator new(std::size_t size) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace tokensampler {
namespace {

long AllocationsOf(const Sampler& sampler, const LogitsView& view,
                   const std::vector<RowRequest>& rows) {
  tbb::task_arena arena(1);
  const long before = g_allocations.load();
  arena.execute([&] {
    auto out = sampler.Run(view, rows);
    ASSERT_TRUE(out.ok()) << out.status();
  });
  return g_allocations.load() - before;
}

TEST(AllocationTest, NoAllocationPerRowInSteadyState) {
  constexpr uint32_t kVocab = 32000;
  constexpr uint32_t kRows = 64;
  std::vector<float> values(static_cast<size_t>(kRows) * kVocab);
  uint64_t state = 1;
  for (float& v : values) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    v = static_cast<float>(state >> 40) / static_cast<float>(1 << 24) * 12.0f;
  }
  const std::vector<uint8_t> bytes = testing::F32Bytes(values);
  auto all = LogitsView::Create(DType::kFloat32, kRows, kVocab, bytes);
  auto one = LogitsView::Create(DType::kFloat32, 1, kVocab,
                                absl::MakeConstSpan(bytes.data(), size_t{kVocab} * 4));
  ASSERT_TRUE(all.ok() && one.ok());
  const std::vector<int32_t> history(64, 7);
  for (const std::string& spec : bench::DefaultChains()) {
    const absl::StatusOr<bench::Chain> chain = bench::ParseChain(spec);
    ASSERT_TRUE(chain.ok());
    SamplingParams params = chain->params;
    params.seed = 3;
    const std::vector<RowRequest> batch(kRows, RowRequest{&params, {}, history, std::nullopt});
    const std::vector<RowRequest> single(1, RowRequest{&params, {}, history, std::nullopt});
    const Sampler sampler;
    AllocationsOf(sampler, *all, batch);  // warm up: scratch grows to its size
    const long for_one = AllocationsOf(sampler, *one, single);
    const long for_many = AllocationsOf(sampler, *all, batch);
    EXPECT_EQ(for_many, for_one) << spec;
  }
}

}  // namespace
}  // namespace tokensampler
