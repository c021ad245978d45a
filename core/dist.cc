#include "core/dist.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <numeric>

namespace tokensampler {
namespace {

constexpr double kDoubleMax = std::numeric_limits<double>::max();
constexpr double kDoubleInf = std::numeric_limits<double>::infinity();
constexpr int kMaxPivots = 16;
constexpr size_t kBandMax = 512;  // tokens sorted around a cut
constexpr size_t kSampleSize = 256;
// FindCut's list (the tokens with key ≤ the upper pivot) is gathered for top_p up to this many
// tokens (more than kSparseMax: the kept set becomes sparse, and the list serves only the
// tokens around the cut and the mass below them), and for typical_p up to this share of the row.
constexpr int64_t kTopPListMax = 4096;
constexpr size_t kTypicalListShare = 2;

// Bisection over the float order for a predicate that is false, then true (First) or true, then
// false (Last) on [from, to]: the first float where it holds (REQUIRES: it holds at `to`), or the
// last one (REQUIRES: it holds at `from`).
template <typename Pred>
float FirstWhere(float from, float to, Pred holds) {
  uint32_t lo = kernels::OrderedBits(from), hi = kernels::OrderedBits(to);
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (holds(kernels::FromOrderedBits(mid))) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return kernels::FromOrderedBits(lo);
}
template <typename Pred>
float LastWhere(float from, float to, Pred holds) {
  uint32_t lo = kernels::OrderedBits(from), hi = kernels::OrderedBits(to);
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    if (holds(kernels::FromOrderedBits(mid))) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return kernels::FromOrderedBits(lo);
}

}  // namespace

double KeyOf(const Key& key, float v) {
  const double x = static_cast<double>(v);
  if (key.kind == Key::kNegValue) return -x;
  const double log_q = (x - key.max) - key.log_total;
  return std::abs(-log_q - key.entropy);
}

Dist::Range Dist::KeyRange(const Key& key, double pivot) const {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr float kMax = std::numeric_limits<float>::max();
  if (pivot == -kDoubleInf) return {kInf, -kInf};  // nothing
  if (key.kind == Key::kNegValue) {
    // −v ≤ pivot ⇔ v ≥ −pivot ⇔ v ≥ kernels::RoundUp(−pivot).
    return {pivot >= kDoubleMax ? -kMax : kernels::RoundUp(-pivot), kInf};
  }
  // The typical key is V-shaped in v (non-increasing, then non-decreasing): {key ≤ pivot} is an
  // interval of floats around the minimum, whose ends are found by bisection over the float
  // order with the key computed exactly as everywhere else.
  const auto k = [&](float v) { return KeyOf(key, v); };
  const double center = key.max + key.log_total - key.entropy;
  float v0 =
      static_cast<float>(std::clamp(center, -static_cast<double>(kMax), static_cast<double>(kMax)));
  // The float nearest the centre is within half an ulp of it: the minimum is among its
  // neighbours.
  float probe = std::nextafter(std::nextafter(v0, -kInf), -kInf);
  for (int i = 0; i < 5; ++i, probe = std::nextafter(probe, kInf)) {
    if (k(probe) < k(v0)) v0 = probe;
  }
  if (!(k(v0) <= pivot)) return {kInf, -kInf};
  const auto inside = [&](float v) { return k(v) <= pivot; };
  return {FirstWhere(-kMax, v0, inside), LastWhere(v0, kMax, inside)};
}

kernels::MaxResult RowMax(absl::Span<const float> v, bool parallel,
                          std::vector<kernels::MaxResult>& blocks) {
  blocks.resize(NumBlocks(v.size()));
  ForBlocks(v.size(), parallel, [&](size_t b, size_t begin, size_t end) {
    blocks[b] = kernels::Max(v.data(), begin, end);
  });
  kernels::MaxResult r{kNegInf, -1, -1};
  for (const kernels::MaxResult& block : blocks) {
    if (block.argmax >= 0 && (r.argmax < 0 || block.max > r.max)) {
      r.max = block.max;
      r.argmax = block.argmax;
    }
  }
  return r;
}

Dist::Dist(absl::Span<const float> source, absl::Span<float> row, float max, RowScratch& scratch,
           bool parallel)
    : values_(source), row_(row), s_(scratch), parallel_(parallel), max_(max) {
  const size_t blocks = NumBlocks(source.size());
  s_.block_sums.assign(blocks, 0.0);
  s_.block_counts.assign(blocks, 0);
}

// --- Dense machinery ------------------------------------------------------------------------

void Dist::Materialize() {
  if (!pending_) return;
  pending_ = false;
  if (deferred_view_ != nullptr) {
    const bool same = ReadAgain(*deferred_view_, deferred_row_, deferred_divisor_, max_,
                                row_.data(), parallel_, s_.block_max);
    Wrote();
    if (!same) {
      std::fill(row_.begin(), row_.end(), max_);
      s_.source_changed = true;
    }
  }
  // (No weights exist yet: every stage that computes them calls this first.)
  const absl::Span<float> own = Own();
  for (size_t i = 0; i < patch_ids_.size(); ++i) {
    own[static_cast<size_t>(patch_ids_[i])] = patch_values_[i];
  }
}

absl::Span<float> Dist::Own() {
  s_.streamed = false;  // the caller changes values
  if (values_.data() != row_.data()) {
    ForBlocks(values_.size(), parallel_, [&](size_t, size_t begin, size_t end) {
      std::copy(values_.begin() + static_cast<ptrdiff_t>(begin),
                values_.begin() + static_cast<ptrdiff_t>(end),
                row_.begin() + static_cast<ptrdiff_t>(begin));
    });
    Wrote();
  }
  return row_;
}

void Dist::ApplyDivision() {
  if (divisor_ == 1.0f) return;
  const float d = divisor_;
  ForBlocks(values_.size(), parallel_, [&](size_t, size_t begin, size_t end) {
    kernels::Scale(values_.data(), row_.data(), begin, end, d);
  });
  Wrote();
  max_ = max_ / d;
  divisor_ = 1.0f;
  weights_valid_ = false;
  head_valid_ = false;
}

void Dist::EnsureWeights(bool head, double* weighted) {
  std::vector<double>& parts = s_.keys;
  if (weights_valid_ && (!head || head_valid_)) {
    if (weighted != nullptr) {
      parts.assign(s_.block_sums.size(), 0.0);
      ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
        parts[b] = kernels::WeightedLogits(values_.data(), s_.wf.data(), begin, end, max_);
      });
      *weighted = std::accumulate(parts.begin(), parts.end(), 0.0);
    }
    return;
  }
  const float d = divisor_;
  const float max = d == 1.0f ? max_ : max_ / d;
  std::vector<int64_t>& heads = s_.block_counts;
  heads.assign(s_.block_sums.size(), 0);
  if (weighted != nullptr) parts.assign(s_.block_sums.size(), 0.0);
  int32_t* head_ids = s_.head_ids.data();
  // A pending division is applied on the way: the divided values go to the own row.
  float* divided = d == 1.0f ? nullptr : row_.data();
  ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
    if (head || weighted != nullptr) {
      size_t count = 0;
      s_.block_sums[b] = kernels::WeightsAndHead(
          values_.data(), divided, s_.wf.data(), begin, end, d, max, kHeadMin,
          head ? head_ids + begin : nullptr, &count, weighted != nullptr ? &parts[b] : nullptr);
      heads[b] = static_cast<int64_t>(count);
    } else {
      s_.block_sums[b] =
          kernels::Weights(values_.data(), divided, s_.wf.data(), begin, end, d, max);
    }
  });
  if (divided != nullptr) Wrote();
  max_ = max;
  divisor_ = 1.0f;
  total_ = 0.0;
  for (double sum : s_.block_sums) total_ += sum;
  weights_valid_ = true;
  if (weighted != nullptr) *weighted = std::accumulate(parts.begin(), parts.end(), 0.0);
  if (head) {
    head_size_ = 0;
    for (size_t b = 0; b < heads.size(); ++b) {
      const size_t c = static_cast<size_t>(heads[b]);
      std::copy(head_ids + b * kBlock, head_ids + b * kBlock + c, head_ids + head_size_);
      head_size_ += c;
    }
    head_valid_ = true;
  }
}

void Dist::TotalBlocks() {
  head_valid_ = false;
  total_ = 0.0;
  count_ = 0;
  for (size_t b = 0; b < s_.block_sums.size(); ++b) {
    total_ += s_.block_sums[b];
    count_ += s_.block_counts[b];
  }
}

void Dist::CutValueBelow(float t) {
  ApplyDivision();
  float* w = weights_valid_ ? s_.wf.data() : nullptr;
  ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
    const kernels::SumCount r =
        kernels::CutValueBelow(values_.data(), row_.data(), w, begin, end, t);
    s_.block_sums[b] = r.sum;
    s_.block_counts[b] = r.count;
  });
  Wrote();
  TotalBlocks();
  MaybeSparse();
}

void Dist::CutWeightBelow(double t) {
  EnsureWeights();
  const float tf = kernels::RoundUp(t);
  ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
    const kernels::SumCount r =
        kernels::CutWeightBelow(values_.data(), row_.data(), s_.wf.data(), begin, end, tf);
    s_.block_sums[b] = r.sum;
    s_.block_counts[b] = r.count;
  });
  Wrote();
  TotalBlocks();
  MaybeSparse();
}

void Dist::KeepMax() {
  ApplyDivision();
  CutValueBelow(max_);
}

void Dist::CutBelowProbability(double cut) {
  EnsureWeights();
  if (1.0 / total_ < cut) {  // even the most likely token (weight 1) is below the cut
    KeepMax();
    return;
  }
  CutWeightBelow(cut * total_);
}

double Dist::Entropy(bool head) {
  double weighted = 0.0;
  EnsureWeights(head, &weighted);
  // H = −Σ q (v − max − log Σ) = log Σ − Σ w (v − max) / Σ.
  return std::log(total_) - weighted / total_;
}

size_t Dist::Select(const Key& key, double lo, double hi) {
  const Range in = KeyRange(key, hi);
  const Range below = KeyRange(key, lo);
  const size_t blocks = NumBlocks(values_.size());
  std::vector<int64_t>& counts = s_.block_counts;
  counts.assign(blocks, 0);
  int32_t* ids = s_.ids.data();
  ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
    counts[b] = static_cast<int64_t>(kernels::SelectRanges(
        values_.data(), begin, end, in.from, in.to, below.from, below.to, ids + begin));
  });
  // Compact the per-block runs in block order (id order).
  size_t out = 0;
  for (size_t b = 0; b < blocks; ++b) {
    const size_t c = static_cast<size_t>(counts[b]);
    std::copy(ids + b * kBlock, ids + b * kBlock + c, ids + out);
    out += c;
  }
  return out;
}

void Dist::ToSparse(const Key& key, double cut) {
  ApplyDivision();
  const size_t m = Select(key, -kDoubleInf, cut);
  s_.sparse_ids.assign(s_.ids.begin(), s_.ids.begin() + static_cast<ptrdiff_t>(m));
  s_.sparse_values.resize(m);
  for (size_t i = 0; i < m; ++i) {
    s_.sparse_values[i] = values_[static_cast<size_t>(s_.sparse_ids[i])];
  }
  sparse_ = true;
  count_ = static_cast<int64_t>(m);
}

void Dist::ToSparseFromList(const Key& key, const Cut& cut) {
  // The list narrowed in place to key ≤ cut (SIMD; nothing else reads it) becomes the sparse set.
  const Range keep = KeyRange(key, cut.key);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  size_t kept = 0;
  kernels::NarrowBand(s_.list_values.data(), s_.list_weights.data(), s_.list_ids.data(),
                      s_.list_ids.size(), keep.from, keep.to, kInf, -kInf, &kept);
  s_.list_ids.resize(kept);
  s_.list_values.resize(kept);
  std::swap(s_.sparse_ids, s_.list_ids);
  std::swap(s_.sparse_values, s_.list_values);
  sparse_ = true;
  count_ = static_cast<int64_t>(kept);
}

void Dist::GatherSelected(size_t m, std::vector<int32_t>& ids, std::vector<float>& values,
                          std::vector<float>& weights) const {
  ids.assign(s_.ids.begin(), s_.ids.begin() + static_cast<ptrdiff_t>(m));
  values.resize(m);
  weights.resize(m);
  for (size_t i = 0; i < m; ++i) {
    const size_t id = static_cast<size_t>(ids[i]);
    values[i] = values_[id];
    weights[i] = s_.wf[id];
  }
}

void Dist::MaybeSparse() {
  if (count_ >= 0 && count_ <= kSparseMax) ToSparse(Key{}, kDoubleMax);
}

Dist::Cut Dist::FindCut(const Key& key, double fraction, double lo_key, double lo_cumulative,
                        int64_t lo_known, size_t list_max) {
  const size_t n = values_.size();
  // Sampled keys give the pivots: sorted when first needed (the head's estimate usually brackets
  // the cut in one pass without them).
  std::vector<double>& sample = s_.keys;
  const size_t stride = std::max<size_t>(1, n / kSampleSize);
  bool sample_sorted = false;
  const auto sort_sample = [&] {
    if (sample_sorted) return;
    sample.clear();
    for (size_t i = stride / 2; i < n; i += stride) {
      if (values_[i] != kNegInf) sample.push_back(KeyOf(key, values_[i]));
    }
    std::sort(sample.begin(), sample.end());
    sample.erase(std::unique(sample.begin(), sample.end()), sample.end());
    sample_sorted = true;
  };

  // Invariant: mass(key ≤ lo) < fraction·total ≤ mass(key ≤ hi) (with a margin for the order of
  // additions), so the cut lies in (lo, hi]. The tokens in (lo, hi] are `band`: at first the
  // whole row; once a pass has narrowed it, they are gathered into compact arrays so that later
  // passes read only them.
  double lo = lo_key, hi = kDoubleMax;
  double lo_sum = lo_cumulative * total_;
  int64_t lo_count = lo_known, hi_count = -1;
  // Bracketing passes sum in float per block (relative error < 1e-4): pivots this close to the
  // cut bracket nothing, and the exact mass below the final lo is computed in double.
  const double below = fraction * total_ * (1.0 - 1e-3);
  const double above = fraction * total_ * (1.0 + 1e-3);
  const float* band_v = values_.data();
  const float* band_w = s_.wf.data();
  const int32_t* band_ids = nullptr;  // null: the band is the row itself (index = id)
  size_t band_size = n;
  double band_base = 0.0;  // exact mass of key ≤ the lo the band was gathered at
  int64_t band_base_count = 0;
  bool lo_moved = false;

  // The list: every token with key ≤ list_hi, gathered from one selection over the row. The band
  // (lo, hi] is then a copy of it narrowed in place, which also sums what lies at or below lo
  // (the exact mass the band's base needs, in double, in id order).
  bool listed = false;
  double list_hi = -kDoubleInf;
  const auto band_from_list = [&] {
    const size_t m = Select(key, -kDoubleInf, hi);
    GatherSelected(m, s_.list_ids, s_.list_values, s_.list_weights);
    listed = true;
    list_hi = hi;
    s_.band_ids = s_.list_ids;
    s_.band_values = s_.list_values;
    s_.band_weights = s_.list_weights;
    const Range keep = KeyRange(key, hi);
    const Range gone = KeyRange(key, lo);
    size_t out = 0;
    const kernels::SumCount below_lo =
        kernels::NarrowBand(s_.band_values.data(), s_.band_weights.data(), s_.band_ids.data(), m,
                            keep.from, keep.to, gone.from, gone.to, &out);
    s_.band_ids.resize(out);
    s_.band_values.resize(out);
    s_.band_weights.resize(out);
    return below_lo.sum;
  };
  const auto list_fits = [&] {
    return hi_count >= 0 && static_cast<uint64_t>(hi_count) <= list_max;
  };

  std::vector<double>& pivots = s_.pivots;
  pivots.clear();
  if (head_valid_ && head_size_ <= kHeadMax) {
    // First pass pivots from an estimate of mass(key ≤ t): the head's tokens exactly, the rest
    // from the strided sample (each sampled token stands for `stride` tokens; none of them is
    // heavy, so the estimate is good). Pivots sit where the estimate crosses the target mass
    // scaled by 1 ± δ, so that one pass usually brackets the cut tightly.
    auto& est = s_.band;  // (key, weight) — reused; the band is built after this
    est.clear();
    std::vector<double>& est_w = s_.block_sums_scratch;
    est_w.clear();
    for (size_t i = 0; i < head_size_; ++i) {
      const size_t id = static_cast<size_t>(s_.head_ids[i]);
      est.emplace_back(KeyOf(key, values_[id]), static_cast<int32_t>(est_w.size()));
      est_w.push_back(static_cast<double>(s_.wf[id]));
    }
    for (size_t i = stride / 2; i < n; i += stride) {
      if (values_[i] == kNegInf || s_.wf[i] >= kHeadMin) continue;
      est.emplace_back(KeyOf(key, values_[i]), static_cast<int32_t>(est_w.size()));
      est_w.push_back(static_cast<double>(s_.wf[i]) * static_cast<double>(stride));
    }
    std::sort(est.begin(), est.end());
    constexpr double kDeltas[] = {-0.1, -0.03, 0.03, 0.1};
    // Against the estimate's own total: the sample's error in the bulk's mass moves every
    // crossing alike, and the pivots above the target would otherwise be missing whenever the
    // estimate falls short of the total by more than the largest δ.
    const double est_total = std::accumulate(est_w.begin(), est_w.end(), 0.0);
    double cumulative = 0.0;
    size_t d = 0;
    for (const auto& [k, index] : est) {
      cumulative += est_w[static_cast<size_t>(index)];
      while (d < std::size(kDeltas) && cumulative >= fraction * est_total * (1.0 + kDeltas[d])) {
        if (k > lo && (pivots.empty() || pivots.back() != k)) pivots.push_back(k);
        ++d;
      }
    }
  } else {
    // Geometric positions in the sample (most cuts fall in the first few).
    sort_sample();
    const size_t above_lo =
        static_cast<size_t>(std::upper_bound(sample.begin(), sample.end(), lo) - sample.begin());
    for (size_t pos = 0; above_lo + pos < sample.size() && pivots.size() + 2 < 8;
         pos = pos == 0 ? 1 : pos * 2) {
      pivots.push_back(sample[above_lo + pos]);
    }
    if (above_lo < sample.size() && (pivots.empty() || pivots.back() != sample.back())) {
      pivots.push_back(sample.back());
    }
  }
  pivots.push_back(kDoubleMax);  // and the largest key possible: the kept count

  float from[kMaxPivots], to[kMaxPivots];
  for (int pass = 0; pass < 12; ++pass) {
    const int np = static_cast<int>(pivots.size());
    for (int j = 0; j < np; ++j) {
      const Range r = KeyRange(key, pivots[static_cast<size_t>(j)]);
      from[j] = r.from;
      to[j] = r.to;
    }
    const size_t blocks = NumBlocks(band_size);
    s_.pivot_sums.assign(blocks * kMaxPivots, 0.0);
    s_.pivot_counts.assign(blocks * kMaxPivots, 0);
    ForBlocks(band_size, parallel_ && band_ids == nullptr, [&](size_t b, size_t begin, size_t end) {
      kernels::MassInRanges(band_v, band_w, begin, end, from, to, np,
                            s_.pivot_sums.data() + b * kMaxPivots,
                            s_.pivot_counts.data() + b * kMaxPivots);
    });
    const double old_lo = lo, old_hi = hi;
    for (int j = 0; j < np; ++j) {
      // Within a gathered band the ranges count only the band's tokens: add what lies below it.
      double sum = band_ids == nullptr ? 0.0 : band_base;
      int64_t count = band_ids == nullptr ? 0 : band_base_count;
      for (size_t b = 0; b < blocks; ++b) {
        sum += s_.pivot_sums[b * kMaxPivots + static_cast<size_t>(j)];
        count += s_.pivot_counts[b * kMaxPivots + static_cast<size_t>(j)];
      }
      const double p = pivots[static_cast<size_t>(j)];
      if (sum < below && p > lo) {
        lo = p;
        lo_count = count;
        lo_moved = true;
      }
      if ((sum >= above || p == kDoubleMax) && p < hi) hi = p;
      if (p == hi) hi_count = count;
      if (p == kDoubleMax) count_ = count;
    }
    if (hi_count < 0 || static_cast<size_t>(hi_count - lo_count) <= kBandMax) break;
    if (lo == old_lo && hi == old_hi && pass > 0) break;  // no progress (ties): sort what is left
    // Gather the band (lo, hi] so that the next passes read only it.
    if (band_ids == nullptr && list_fits()) {
      const double below_lo = band_from_list();
      band_base = lo_moved ? below_lo : lo_sum;
      band_base_count = lo_count;
      lo_sum = band_base;
      lo_moved = false;
    } else if (band_ids == nullptr) {
      GatherSelected(Select(key, lo, hi), s_.band_ids, s_.band_values, s_.band_weights);
      band_base = lo_moved ? ExactMass(key, lo) : lo_sum;
      band_base_count = lo_count;
      lo_sum = band_base;
      lo_moved = false;
    } else {
      // Narrow the gathered band in place (order kept); what leaves below lo joins the base.
      const Range keep = KeyRange(key, hi);
      const Range gone = KeyRange(key, lo);
      size_t out = 0;
      const kernels::SumCount left =
          kernels::NarrowBand(s_.band_values.data(), s_.band_weights.data(), s_.band_ids.data(),
                              band_size, keep.from, keep.to, gone.from, gone.to, &out);
      band_base += left.sum;
      band_base_count += left.count;
      s_.band_values.resize(out);
      s_.band_weights.resize(out);
      s_.band_ids.resize(out);
      lo_sum = band_base;
      lo_count = band_base_count;
      lo_moved = false;
    }
    band_v = s_.band_values.data();
    band_w = s_.band_weights.data();
    band_ids = s_.band_ids.data();
    band_size = s_.band_ids.size();
    // Next pivots: the sample's keys inside (lo, hi) where it has some, else evenly spaced.
    sort_sample();
    pivots.clear();
    const auto first = std::upper_bound(sample.begin(), sample.end(), lo);
    const auto last = std::lower_bound(sample.begin(), sample.end(), hi);
    const ptrdiff_t inside = last - first;
    if (inside >= kMaxPivots) {
      for (int j = 1; j < kMaxPivots; ++j) pivots.push_back(first[inside * j / kMaxPivots]);
    } else if (inside >= 4) {
      pivots.assign(first, last);
    } else {
      double lo_end = lo, hi_end = hi;
      if (lo_end == -kDoubleInf || hi_end == kDoubleMax) {
        // An open end: the band's own extreme keys bound it.
        double kmin = kDoubleInf, kmax = -kDoubleInf;
        for (size_t i = 0; i < band_size; ++i) {
          const double k = KeyOf(key, band_v[i]);
          kmin = std::min(kmin, k);
          kmax = std::max(kmax, k);
        }
        if (lo_end == -kDoubleInf) lo_end = kmin;
        if (hi_end == kDoubleMax) hi_end = kmax;
        pivots.push_back(lo_end);
      }
      for (int j = 1; j < kMaxPivots - 1; ++j) {
        pivots.push_back(lo_end + (hi_end - lo_end) * j / kMaxPivots);
      }
      pivots.push_back(hi_end);
    }
    pivots.erase(
        std::remove_if(pivots.begin(), pivots.end(), [&](double p) { return !(p > lo && p < hi); }),
        pivots.end());
    if (pivots.empty()) break;
  }
  if (band_ids == nullptr && list_fits()) {
    // The first pass bracketed the cut closely: the band from the list.
    const double below_lo = band_from_list();
    if (lo_moved) lo_sum = below_lo;
    lo_moved = false;
    band_v = s_.band_values.data();
    band_ids = s_.band_ids.data();
    band_size = s_.band_ids.size();
  }
  if (lo_moved) {
    // lo came from a bracketing pass: its exact mass, in double.
    lo_sum = band_ids == nullptr ? ExactMass(key, lo) : band_base + BandMass(key, lo, band_size);
  }

  // Sort the band (lo, hi] by (key, id) and apply the reference's rule from lo's mass on.
  auto& band = s_.band;
  band.clear();
  if (band_ids == nullptr) {
    const size_t m = Select(key, lo, hi);
    for (size_t i = 0; i < m; ++i) {
      const int32_t id = s_.ids[i];
      band.emplace_back(KeyOf(key, values_[static_cast<size_t>(id)]), id);
    }
  } else {
    for (size_t i = 0; i < band_size; ++i) {
      const double k = KeyOf(key, band_v[i]);
      if (k > lo && k <= hi) band.emplace_back(k, band_ids[i]);
    }
  }
  std::sort(band.begin(), band.end());
  double cumulative = lo == lo_key ? lo_cumulative : lo_sum / total_;
  for (size_t i = 0; i < band.size(); ++i) {
    cumulative += static_cast<double>(s_.wf[static_cast<size_t>(band[i].second)]) / total_;
    if (cumulative >= fraction) {
      size_t last = i;
      while (last + 1 < band.size() && band[last + 1].first == band[i].first) ++last;
      return {band[i].first, lo_count + static_cast<int64_t>(last + 1),
              listed && band[i].first <= list_hi};
    }
  }
  // Rounding left the cumulative mass short of the fraction: keep everything (the reference).
  return {kDoubleMax, lo_count + static_cast<int64_t>(band.size()),
          listed && list_hi >= kDoubleMax};
}

double Dist::ExactMass(const Key& key, double lo) {
  const Range r = KeyRange(key, lo);
  std::vector<double>& parts = s_.block_sums_scratch;
  parts.assign(NumBlocks(values_.size()), 0.0);
  ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
    parts[b] = kernels::MassInRange(values_.data(), s_.wf.data(), begin, end, r.from, r.to);
  });
  double sum = 0.0;
  for (double part : parts) sum += part;
  return sum;
}

double Dist::BandMass(const Key& key, double lo, size_t band_size) {
  const Range r = KeyRange(key, lo);
  return kernels::MassInRange(s_.band_values.data(), s_.band_weights.data(), 0, band_size, r.from,
                              r.to);
}

// --- Stages ---------------------------------------------------------------------------------

void Dist::Temperature(const tokensampler::Temperature& t) {
  if (sparse_) {
    t.Apply(absl::MakeSpan(s_.sparse_values), s_);
    return;
  }
  if (t.range > 0.0f) {
    // Dynamic temperature: the reference's formula over the kept set.
    Materialize();
    ApplyDivision();
    // The reference's entropy bit for bit (row.h): exact 128-bit sums per block, in any order,
    // from the SIMD weights (the same bits as the scalar ExpF); the same pass counts the kept.
    EnsureWeights();
    std::vector<EntropySums> parts(NumBlocks(values_.size()));
    ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
      parts[b] = EntropyTerms(values_.data(), s_.wf.data(), begin, end, max_);
    });
    EntropySums sums;
    for (const EntropySums& part : parts) sums.Add(part);
    if (sums.kept <= 1) return;
    const double h = sums.Entropy();
    const double normalized = h / std::log(static_cast<double>(sums.kept));
    const double t_min = std::max(0.0, static_cast<double>(t.temperature) - t.range);
    const double t_max = static_cast<double>(t.temperature) + t.range;
    const float dyn =
        static_cast<float>(t_min + (t_max - t_min) * std::pow(normalized, t.exponent));
    if (!(dyn >= SamplingParams::kGreedyTemperature)) {
      KeepMax();
      return;
    }
    SetDivisor(dyn);
    return;
  }
  ApplyDivision();  // at most one temperature runs; this only guards the invariant
  SetDivisor(t.temperature);
}

void Dist::SetDivisor(float d) {
  divisor_ = d;
  weights_valid_ = false;
  if (std::isfinite(max_) && max_ / d == kNegInf) {
    // The maximum falls below −FLT_MAX: as in the reference's Temperature, every token below it
    // has probability 0 and the row is uniform over the tokens at it (undivided).
    divisor_ = 1.0f;
    Materialize();
    const absl::Span<float> own = Own();
    const float at = max_;
    ForBlocks(own.size(), parallel_, [&](size_t, size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i) own[i] = own[i] == at ? 0.0f : kNegInf;
    });
    max_ = 0.0f;
    count_ = -1;
    return;
  }
  // Division is monotone: some value overflows to +inf exactly when the maximum does. Then, as
  // in the reference's Temperature and as for +inf input logits, the row is uniform over the
  // overflowed tokens.
  if (max_ / d != std::numeric_limits<float>::infinity()) return;
  Materialize();
  ApplyDivision();
  const absl::Span<float> own = Own();
  ForBlocks(own.size(), parallel_, [&](size_t, size_t begin, size_t end) {
    kernels::InfToUniform(own.data(), begin, end);
  });
  max_ = 0.0f;
  count_ = -1;
}

void Dist::TopK(int32_t k) {
  if (sparse_) {
    tokensampler::TopK{k}.Apply(absl::MakeSpan(s_.sparse_values), s_);
    return;
  }
  if (k <= 0) return;
  if (count_ >= 0 && k >= count_) return;
  // A pending temperature is not applied to the row: division by it is monotone, so the
  // candidates are selected by their undivided values and only they are divided.
  const float d = divisor_;
  const Key key{};
  std::vector<float>& cand = s_.cand_values;  // the candidates' divided values, by id order
  double pivot = -kDoubleInf;
  size_t m = 0;
  if (s_.streamed) {
    // Pass 1 kept the tokens at or above a threshold ≤ the k-th largest value (kernels.h): they
    // are the candidates (with their current values, patched ones included), and the threshold
    // is the pivot (none: every finite value is held).
    const kernels::TopStream& stream = s_.stream;
    m = stream.count;
    std::copy(stream.ids, stream.ids + m, s_.ids.begin());
    std::copy(stream.values, stream.values + m, cand.begin());
    if (stream.threshold != -std::numeric_limits<float>::max()) {
      pivot = static_cast<double>(stream.threshold);
    }
  } else {
    Materialize();
    pivot = TopKPivot(values_, k, s_.keys);
    m = Select(key, -kDoubleInf, pivot == -kDoubleInf ? kDoubleMax : -pivot);
    // Fewer than k above the pivot: it was too high; take everything kept instead.
    if (m < static_cast<size_t>(k) && pivot != -kDoubleInf) {
      pivot = -kDoubleInf;
      m = Select(key, -kDoubleInf, kDoubleMax);
    }
    for (size_t i = 0; i < m; ++i) cand[i] = values_[static_cast<size_t>(s_.ids[i])];
  }
  if (pivot == -kDoubleInf && m <= static_cast<size_t>(k)) {
    count_ = static_cast<int64_t>(m);  // k ≥ the kept tokens: nothing to cut
    Materialize();
    MaybeSparse();
    return;
  }
  if (d != 1.0f) {
    for (size_t i = 0; i < m; ++i) cand[i] /= d;
  }
  // The k-th largest candidate value is the threshold; ties with it stay.
  std::vector<float>& vals = s_.band_values;
  vals.assign(cand.begin(), cand.begin() + static_cast<ptrdiff_t>(m));
  std::nth_element(vals.begin(), vals.begin() + (k - 1), vals.end(), std::greater<>());
  const float threshold = vals[static_cast<size_t>(k - 1)];
  if (d != 1.0f) {
    // Tokens under the pivot divide to at most `outside`. If that reaches the threshold, one of
    // them may tie with it (rounding can merge neighbours), and a division to −inf is a removed
    // token: then divide the whole row and select again.
    const float outside =
        pivot == -kDoubleInf ? kNegInf : std::nextafter(static_cast<float>(pivot), kNegInf) / d;
    if (!(threshold > outside) || threshold == kNegInf) {
      Materialize();
      ApplyDivision();  // (which also drops the stream: it holds undivided values)
      TopK(k);
      return;
    }
    DivisionTaken(max_ / d);
  }
  s_.sparse_ids.clear();
  s_.sparse_values.clear();
  for (size_t i = 0; i < m; ++i) {
    if (cand[i] >= threshold) {
      s_.sparse_ids.push_back(s_.ids[i]);
      s_.sparse_values.push_back(cand[i]);
    }
  }
  sparse_ = true;
  count_ = static_cast<int64_t>(s_.sparse_ids.size());
}

void Dist::TopP(float p) {
  if (sparse_) {
    tokensampler::TopP{p}.Apply(absl::MakeSpan(s_.sparse_values), s_);
    return;
  }
  if (p >= 1.0f) return;
  Materialize();
  EnsureWeights(/*head=*/true);
  const Key key{};
  double lo = -kDoubleInf, lo_cumulative = 0.0;
  int64_t lo_count = 0;
  if (head_size_ <= kHeadMax) {
    // The head holds the largest values: walk it in the reference's order (value descending,
    // id ascending) with the reference's cumulative sum; the cut is usually there.
    auto& band = s_.band;
    band.clear();
    for (size_t i = 0; i < head_size_; ++i) {
      const int32_t id = s_.head_ids[i];
      band.emplace_back(KeyOf(key, values_[static_cast<size_t>(id)]), id);
    }
    std::sort(band.begin(), band.end());
    double cumulative = 0.0;
    for (size_t i = 0; i < band.size(); ++i) {
      cumulative += static_cast<double>(s_.wf[static_cast<size_t>(band[i].second)]) / total_;
      if (cumulative >= static_cast<double>(p)) {
        size_t last = i;
        while (last + 1 < band.size() && band[last + 1].first == band[i].first) ++last;
        s_.sparse_ids.clear();
        for (size_t j = 0; j <= last; ++j) s_.sparse_ids.push_back(band[j].second);
        std::sort(s_.sparse_ids.begin(), s_.sparse_ids.end());
        s_.sparse_values.resize(s_.sparse_ids.size());
        for (size_t j = 0; j < s_.sparse_ids.size(); ++j) {
          s_.sparse_values[j] = values_[static_cast<size_t>(s_.sparse_ids[j])];
        }
        sparse_ = true;
        count_ = static_cast<int64_t>(s_.sparse_ids.size());
        return;
      }
    }
    if (!band.empty()) {
      lo = band.back().first;
      lo_cumulative = cumulative;
      lo_count = static_cast<int64_t>(band.size());
    }
  }
  // A kept set this small becomes sparse, so the list saves the selection of it.
  const Cut cut = FindCut(key, static_cast<double>(p), lo, lo_cumulative, lo_count,
                          static_cast<size_t>(kTopPListMax));
  if (cut.count <= kSparseMax) {
    if (cut.listed) {
      ToSparseFromList(key, cut);
    } else {
      ToSparse(key, cut.key);
    }
  } else if (cut.key != kDoubleMax) {
    CutValueBelow(static_cast<float>(-cut.key));
  }
}

void Dist::MinP(float min_p) {
  if (sparse_) {
    tokensampler::MinP{min_p}.Apply(absl::MakeSpan(s_.sparse_values));
    return;
  }
  if (min_p <= 0.0f) return;
  Materialize();
  if (weights_valid_) {
    CutWeightBelow(static_cast<double>(min_p));
    return;
  }
  // Without weights yet: ExpF is monotone (checked over every float in [−88, 0]), so the kept
  // tokens are those at or above the smallest value v with ExpF(v − max) ≥ min_p, found by
  // bisection over the float order — no exponential of the whole row. A pending temperature
  // stays pending: division is monotone too, so the smallest undivided value that divides to
  // at least that v is found the same way, and only the kept tokens are divided.
  const float d = divisor_;
  const float max = d == 1.0f ? max_ : max_ / d;
  const auto keeps = [&](float v) { return kernels::ExpF(v - max) >= min_p; };
  const float lowest = -std::numeric_limits<float>::max();
  if (keeps(lowest)) return;                        // every finite value is kept
  const float hi = FirstWhere(lowest, max, keeps);  // keeps(max): ExpF(0) = 1 ≥ min_p
  const float raw_hi =
      d == 1.0f ? hi : FirstWhere(lowest, max_, [&](float x) { return x / d >= hi; });
  const size_t m = Select(Key{}, -kDoubleInf, -static_cast<double>(raw_hi));
  if (static_cast<int64_t>(m) <= kSparseMax) {
    s_.sparse_ids.assign(s_.ids.begin(), s_.ids.begin() + static_cast<ptrdiff_t>(m));
    s_.sparse_values.resize(m);
    for (size_t i = 0; i < m; ++i) {
      s_.sparse_values[i] = values_[static_cast<size_t>(s_.sparse_ids[i])] / d;
    }
    sparse_ = true;
    count_ = static_cast<int64_t>(m);
    DivisionTaken(max);
  } else {
    ApplyDivision();
    CutValueBelow(hi);
  }
}

void Dist::TypicalP(float mass) {
  if (sparse_) {
    tokensampler::TypicalP{mass}.Apply(absl::MakeSpan(s_.sparse_values), s_);
    return;
  }
  if (mass >= 1.0f) return;
  Materialize();
  const double h = Entropy(/*head=*/true);
  Key key;
  key.kind = Key::kTypical;
  key.max = static_cast<double>(max_);
  key.log_total = std::log(total_);
  key.entropy = h;
  // The kept set always becomes sparse (often thousands of tokens of the bulk).
  const Cut cut = FindCut(key, static_cast<double>(mass), -kDoubleInf, 0.0, 0,
                          values_.size() / kTypicalListShare);
  if (cut.listed) {
    ToSparseFromList(key, cut);
  } else {
    ToSparse(key, cut.key);
  }
}

void Dist::EpsilonCutoff(float epsilon) {
  if (sparse_) {
    tokensampler::EpsilonCutoff{epsilon}.Apply(absl::MakeSpan(s_.sparse_values), s_);
    return;
  }
  if (epsilon <= 0.0f) return;
  Materialize();
  CutBelowProbability(static_cast<double>(epsilon));
}

void Dist::EtaCutoff(float eta) {
  if (sparse_) {
    tokensampler::EtaCutoff{eta}.Apply(absl::MakeSpan(s_.sparse_values), s_);
    return;
  }
  if (eta <= 0.0f) return;
  Materialize();
  const double h = Entropy();
  const double e = static_cast<double>(eta);
  CutBelowProbability(std::min(e, std::sqrt(e) * std::exp(-h)));
}

void Dist::TopNSigma(float n) {
  if (sparse_) {
    tokensampler::TopNSigma{n}.Apply(absl::MakeSpan(s_.sparse_values));
    return;
  }
  Materialize();
  ApplyDivision();
  const size_t blocks = NumBlocks(values_.size());
  std::vector<double>& parts = s_.keys;
  parts.assign(blocks, 0.0);
  std::vector<int64_t>& counts = s_.block_counts;
  counts.assign(blocks, 0);
  ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
    const kernels::SumCount r = kernels::SumValues(values_.data(), begin, end);
    parts[b] = r.sum;
    counts[b] = r.count;
  });
  double sum = 0.0;
  int64_t count = 0;
  for (size_t b = 0; b < blocks; ++b) {
    sum += parts[b];
    count += counts[b];
  }
  const double mean = sum / static_cast<double>(count);
  ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
    parts[b] = kernels::SumSquares(values_.data(), begin, end, mean);
  });
  double squares = 0.0;
  for (double part : parts) squares += part;
  const double sigma = std::sqrt(squares / static_cast<double>(count));
  const double threshold = static_cast<double>(max_) - static_cast<double>(n) * sigma;
  CutValueBelow(kernels::RoundUp(threshold));
}

void Dist::Xtc(const tokensampler::Xtc& xtc) {
  if (sparse_) {
    xtc.Apply(absl::MakeSpan(s_.sparse_values), s_);
    return;
  }
  if (!(xtc.coin < static_cast<double>(xtc.probability))) return;
  Materialize();
  EnsureWeights();
  const float cut = kernels::RoundUp(static_cast<double>(xtc.threshold) * total_);
  // Few tokens can reach the threshold (at most 1 / threshold): select them per block.
  const size_t blocks = NumBlocks(values_.size());
  std::vector<int64_t>& counts = s_.block_counts;
  counts.assign(blocks, 0);
  int32_t* ids = s_.ids.data();
  ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
    counts[b] = static_cast<int64_t>(
        kernels::SelectWeightAtLeast(s_.wf.data(), begin, end, cut, ids + begin));
  });
  size_t above = 0;
  float least = 0.0f;
  for (size_t b = 0; b < blocks; ++b) {
    for (int64_t i = 0; i < counts[b]; ++i) {
      const float w = s_.wf[static_cast<size_t>(ids[b * kBlock + static_cast<size_t>(i)])];
      least = above == 0 ? w : std::min(least, w);
      ++above;
    }
  }
  if (above < 2) return;
  const absl::Span<float> own = Own();
  for (size_t b = 0; b < blocks; ++b) {
    for (int64_t i = 0; i < counts[b]; ++i) {
      const size_t id = static_cast<size_t>(ids[b * kBlock + static_cast<size_t>(i)]);
      if (s_.wf[id] > least) own[id] = kNegInf;
    }
  }
  // The maximum went: weights are relative to the new one.
  max_ = RowMax(values_, parallel_, s_.block_max).max;
  weights_valid_ = false;
  count_ = -1;
}

int32_t Dist::Draw(double coin) {
  if (sparse_) {
    const std::vector<float>& kept = s_.sparse_values;
    if (static_cast<int64_t>(kept.size()) <= kSparseMax) {
      const int32_t index = tokensampler::Draw(kept, coin, s_);
      return s_.sparse_ids[static_cast<size_t>(index)];
    }
    // Many kept (typical_p keeps a band of the bulk): the reference's draw over them, with the
    // weights by the SIMD kernel (the same bits as its scalar ExpF; the sum differs only in the
    // order of its double additions, as on the dense row).
    const float max = kernels::Max(kept.data(), 0, kept.size()).max;
    const double total =
        kernels::Weights(kept.data(), nullptr, s_.wf.data(), 0, kept.size(), 1.0f, max);
    const int32_t index = DrawFromWeights(s_.wf.data(), kept.size(), total, coin);
    return s_.sparse_ids[static_cast<size_t>(index)];
  }
  Materialize();
  // When nothing but the draw needs the weights, they are summed per block without being
  // stored (a pending temperature divides on the way, nothing is written), and only the blocks
  // the scan reaches are computed (normally one).
  const bool stored = weights_valid_;
  const float d = divisor_;
  const float max = d == 1.0f ? max_ : max_ / d;
  if (!stored) {
    ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
      s_.block_sums[b] = kernels::SumExp(values_.data(), begin, end, d, max);
    });
    total_ = 0.0;
    for (double sum : s_.block_sums) total_ += sum;
  }
  const size_t blocks = s_.block_sums.size();
  const auto block_weights = [&](size_t b) {
    const size_t begin = b * kBlock, end = std::min(values_.size(), begin + kBlock);
    if (!stored) kernels::Weights(values_.data(), nullptr, s_.wf.data(), begin, end, d, max);
    return std::pair(begin, end);
  };
  // The block holding the target by the block sums, then token by token from there on.
  const double target = coin * total_;
  double cumulative = 0.0;
  size_t b = 0;
  while (b + 1 < blocks && cumulative + s_.block_sums[b] <= target) {
    cumulative += s_.block_sums[b];
    ++b;
  }
  int32_t last_positive = -1;
  for (; b < blocks; ++b) {
    const auto [begin, end] = block_weights(b);
    for (size_t i = begin; i < end; ++i) {
      const float w = s_.wf[i];
      if (w <= 0.0f) continue;
      cumulative += static_cast<double>(w);
      last_positive = static_cast<int32_t>(i);
      if (cumulative > target) return last_positive;
    }
  }
  if (last_positive >= 0) return last_positive;  // rounding: the last kept token
  for (size_t back = blocks; back-- > 0;) {
    const auto [begin, end] = block_weights(back);
    for (size_t i = end; i-- > begin;) {
      if (s_.wf[i] > 0.0f) return static_cast<int32_t>(i);
    }
  }
  return -1;  // unreachable: the maximum has weight 1
}

void Dist::KeepFirst(size_t keep) {
  // The first `keep` kept tokens by (value descending, id ascending) — the reference's sorted
  // order — selected above a sampled pivot and ranked there; they become the sparse set.
  Materialize();
  const Key key{};
  const double pivot =
      TopKPivot(values_, static_cast<int32_t>(std::min<size_t>(keep, 1 << 30)), s_.keys);
  size_t m = Select(key, -kDoubleInf, pivot == -kDoubleInf ? kDoubleMax : -pivot);
  if (m < keep) m = Select(key, -kDoubleInf, kDoubleMax);
  auto& ranked = s_.pairs;
  ranked.clear();
  for (size_t i = 0; i < m; ++i) {
    ranked.emplace_back(values_[static_cast<size_t>(s_.ids[i])], s_.ids[i]);
  }
  const auto before = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  if (keep < ranked.size()) {
    std::nth_element(ranked.begin(), ranked.begin() + static_cast<ptrdiff_t>(keep), ranked.end(),
                     before);
    ranked.resize(keep);
  }
  std::sort(ranked.begin(), ranked.end(),
            [](const auto& a, const auto& b) { return a.second < b.second; });
  s_.sparse_ids.clear();
  s_.sparse_values.clear();
  for (const auto& [value, id] : ranked) {
    s_.sparse_ids.push_back(id);
    s_.sparse_values.push_back(value);
  }
  sparse_ = true;
  count_ = static_cast<int64_t>(s_.sparse_ids.size());
}

tokensampler::Mirostat::Result Dist::Mirostat(const tokensampler::Mirostat& m, double coin) {
  if (sparse_) {
    tokensampler::Mirostat::Result r = m.Apply(absl::MakeSpan(s_.sparse_values), coin, s_);
    r.token = s_.sparse_ids[static_cast<size_t>(r.token)];
    return r;
  }
  Materialize();
  {
    ApplyDivision();
    if (m.mode == 1) {
      // The 100 largest (ranked), the number kept, and then exactly KeepV1 of them.
      std::vector<int64_t>& counts = s_.block_counts;
      counts.assign(NumBlocks(values_.size()), 0);
      ForBlocks(values_.size(), parallel_, [&](size_t b, size_t begin, size_t end) {
        counts[b] = kernels::SumValues(values_.data(), begin, end).count;
      });
      size_t n = 0;
      for (int64_t c : counts) n += static_cast<size_t>(c);
      KeepFirst(std::min<size_t>(100, n));
      auto& top = s_.band_values;
      top.assign(s_.sparse_values.begin(), s_.sparse_values.end());
      std::sort(top.begin(), top.end(), std::greater<>());
      const size_t keep = m.KeepV1(top, n);
      if (keep != top.size()) {
        if (keep >= n) {
          ToSparse(Key{}, kDoubleMax);
        } else {
          KeepFirst(keep);
        }
      }
    } else {
      // v2 keeps the tokens whose surprise is at most μ: since ExpF and the surprise are monotone
      // in the logit, that is every value from a threshold found by bisection (at least the
      // first maximum).
      EnsureWeights();
      const double log2_total = std::log2(total_);
      const float max = max_;
      const auto keeps = [&](float v) { return m.KeepV2(v, max, log2_total); };
      if (!keeps(max)) {
        KeepFirst(1);
      } else {
        const float hi = FirstWhere(-std::numeric_limits<float>::max(), max, keeps);
        ToSparse(Key{}, -static_cast<double>(hi));
      }
    }
  }
  tokensampler::Mirostat::Result r = m.DrawKept(s_.sparse_values, coin, s_);
  r.token = s_.sparse_ids[static_cast<size_t>(r.token)];
  return r;
}

absl::Span<const float> Dist::Processed() {
  if (sparse_) {
    std::fill(row_.begin(), row_.end(), kNegInf);
    for (size_t i = 0; i < s_.sparse_ids.size(); ++i) {
      row_[static_cast<size_t>(s_.sparse_ids[i])] = s_.sparse_values[i];
    }
    Wrote();
  } else {
    Materialize();
    ApplyDivision();
  }
  return values_;
}

}  // namespace tokensampler
