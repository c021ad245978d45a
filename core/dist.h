// Internal: the fast steps 4–6 of one sample. A Dist is the distribution the sample is drawn
// from while the stages narrow it:
//   dense  — the processed row in a vocabulary-sized buffer (removed tokens −inf), with float
//            weights w = ExpF(v − max) and their per-block sums; every stage is O(V) SIMD passes
//            over fixed blocks (kernels.h), thresholds are found by sampling pivots, counting the
//            mass at or below each pivot in one pass and sorting only the few tokens between the
//            two pivots around the cut; no stage sorts the vocabulary;
//   sparse — once few tokens remain (after top_k, or a cut that leaves ≤ kSparseMax), their ids
//            and values in id order; the reference stages (stages.h) then run on that compact
//            array, which gives exactly their result on the whole row.
// The result equals the reference pipeline's: the same kept tokens, the same weights (the same
// ExpF), sums that differ only by the order of double additions.
//
// Blocks may run on several threads (`parallel`); every result is combined in block order, so
// the tokens do not depend on the thread count. Thread-compatible; the scratch is the caller's.
#ifndef TOKENSAMPLER_CORE_DIST_H_
#define TOKENSAMPLER_CORE_DIST_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "absl/types/span.h"
#include "core/kernels.h"
#include "core/row.h"
#include "core/stages.h"
#include "core/tensor.h"
#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"
#include "tbb/task_arena.h"

namespace tokensampler {

// Rows are cut into blocks of this many tokens (the unit of intra-row parallelism).
constexpr size_t kBlock = 4096;

inline size_t NumBlocks(size_t n) { return (n + kBlock - 1) / kBlock; }

// Runs fn(block, begin, end) for every block of a row of n tokens, on several threads when
// `parallel`. Callers store per-block results and combine them in block order.
template <typename Fn>
void ForBlocks(size_t n, bool parallel, Fn&& fn) {
  const size_t blocks = NumBlocks(n);
  if (parallel && blocks > 1) {
    // Isolated: while it waits, this thread must not pick up another row, which would reuse the
    // thread's scratch that this row is still using.
    tbb::this_task_arena::isolate([&] {
      tbb::parallel_for(tbb::blocked_range<size_t>(0, blocks, 1),
                        [&](const tbb::blocked_range<size_t>& range) {
                          for (size_t b = range.begin(); b != range.end(); ++b) {
                            fn(b, b * kBlock, std::min(n, (b + 1) * kBlock));
                          }
                        });
    });
  } else {
    for (size_t b = 0; b < blocks; ++b) fn(b, b * kBlock, std::min(n, (b + 1) * kBlock));
  }
}

// Max and first argmax of a row, block by block.
kernels::MaxResult RowMax(absl::Span<const float> v, bool parallel,
                          std::vector<kernels::MaxResult>& blocks);

// Sort keys of the threshold stages: a stage keeps the tokens whose key is ≤ a cut, and orders
// tokens by (key, id). top_p: key = −v. typical_p: key = |−((v − max) − log_total) − h| in
// double, exactly HF's score. −inf tokens have no key (never counted).
struct Key {
  enum Kind : uint8_t { kNegValue, kTypical } kind = kNegValue;
  double max = 0.0;
  double log_total = 0.0;
  double entropy = 0.0;
};

// The key of one value.
double KeyOf(const Key& key, float v);

// Reads row `row` of `view` a second time: decodes it (divided by `divisor`) into out, runs
// then(begin, end) on each block once it is decoded, and returns whether this read found what
// pass 1 did — the maximum `max` (+inf included) and no NaN. A row in shared memory can fail
// this when its client writes the region during the call; a row the request carries cannot.
// `blocks` is scratch for the per-block results.
template <typename Then>
bool ReadAgain(const LogitsView& view, int row, float divisor, float max, float* out, bool parallel,
               std::vector<kernels::MaxResult>& blocks, Then then) {
  const size_t n = static_cast<size_t>(view.vocab_size());
  blocks.resize(NumBlocks(n));
  ForBlocks(n, parallel, [&](size_t b, size_t begin, size_t end) {
    blocks[b] = kernels::DecodeMax(view.dtype(), view.RowBytes(row), begin, end, divisor, out);
    then(begin, end);
  });
  float seen = -std::numeric_limits<float>::infinity();
  for (const kernels::MaxResult& block : blocks) {
    if (block.nan >= 0) return false;
    if (block.argmax >= 0) seen = std::max(seen, block.max);
  }
  return seen == max;
}
inline bool ReadAgain(const LogitsView& view, int row, float divisor, float max, float* out,
                      bool parallel, std::vector<kernels::MaxResult>& blocks) {
  return ReadAgain(view, row, divisor, max, out, parallel, blocks, [](size_t, size_t) {});
}

class Dist {
 public:
  // Once a stage leaves at most this many tokens, the Dist turns sparse.
  static constexpr int64_t kSparseMax = 1024;
  // The "head": tokens within ln 1024 ≈ 6.9 nats of the maximum, listed by the weights pass.
  // Cuts by mass (top_p) usually fall among them; they are then sorted and nothing else is read.
  static constexpr float kHeadMin = 1.0f / 1024.0f;
  static constexpr size_t kHeadMax = 4096;

  // `source` is the processed row the sample starts from (steps 1–2 done, no NaN, no +inf),
  // read-only: the request's own bytes or the decoded row, shared by a row's samples; `max` its
  // maximum (finite). `row` is the sample's own buffer of the same size (it may be `source`
  // itself). Stages read `source` until one changes values: that stage's pass writes its result
  // into `row` — the copy costs no pass of its own — and the Dist works on `row` from then on.
  Dist(absl::Span<const float> source, absl::Span<float> row, float max, RowScratch& scratch,
       bool parallel);

  // `source` lacks the penalties of these tokens (`values`: their processed values): SampleRow
  // penalised a row it only read by patching pass 1's top-k stream. A streamed top_k reads the
  // stream; any stage that reads the dense row first copies the source with the patch applied.
  // The spans must outlive the Dist. REQUIRES: before any stage; max is the patched row's.
  void Patched(absl::Span<const int32_t> ids, absl::Span<const float> values) {
    patch_ids_ = ids;
    patch_values_ = values;
    pending_ = true;
  }
  // `source` is not filled: pass 1 read row `row` of `view` (divided by `divisor`) without
  // storing it, and kept only its top-k stream. A streamed top_k reads the stream; any stage that
  // reads the dense row first decodes the row into the sample's own buffer, as pass 1 did. A row
  // in shared memory may read differently the second time (the client wrote it, or a SIGBUS
  // turned it to zeros): unless that read has pass 1's maximum (the Dist's `max`) and no NaN, the
  // row becomes uniform at `max` — every stage stays safe — and scratch.source_changed is set
  // for SampleRow to fail the row. `view` must outlive the Dist. REQUIRES: before any stage.
  void Deferred(const LogitsView* view, int row, float divisor) {
    deferred_view_ = view;
    deferred_row_ = row;
    deferred_divisor_ = divisor;
    pending_ = true;
  }

  // The stages, with the semantics of their reference structs in stages.h.
  void Temperature(const tokensampler::Temperature& t);
  void TopK(int32_t k);
  void TopP(float p);
  void MinP(float min_p);
  void TypicalP(float mass);
  void EpsilonCutoff(float epsilon);
  void EtaCutoff(float eta);
  void TopNSigma(float n);
  void Xtc(const tokensampler::Xtc& xtc);

  // The inverse-CDF draw in token-id order.
  int32_t Draw(double coin);
  // Mirostat's truncation and draw (on the kept tokens, as the reference).
  tokensampler::Mirostat::Result Mirostat(const tokensampler::Mirostat& m, double coin);

  // The distribution as a vocabulary-sized row (removed tokens −inf), for processed logprobs.
  absl::Span<const float> Processed();

  bool sparse() const { return sparse_; }

 private:
  // The floats v with key(v) ≤ a pivot: from ≤ v ≤ to (empty when from > to).
  struct Range {
    float from;
    float to;
  };
  Range KeyRange(const Key& key, double pivot) const;
  // Σ w over the row's tokens with key ≤ lo, in double.
  double ExactMass(const Key& key, double lo);
  // Σ w over the gathered band's tokens with key ≤ lo, in double.
  double BandMass(const Key& key, double lo, size_t band_size);

  struct Cut {
    double key;     // keep tokens with key ≤ this
    int64_t count;  // how many that is
    // scratch.list_* holds every token with key ≤ `key` (and perhaps more above it), in id order
    // with its value and weight: ToSparseFromList need not read the row.
    bool listed = false;
  };

  // Makes the sample's own row current (copying the source if no stage has written yet), for a
  // change in place; returns it.
  absl::Span<float> Own();
  // Makes the dense row complete if it is not (Patched, Deferred): the source copied into row_
  // with the patch applied, or the deferred row decoded into row_. Every stage calls it before
  // its first read of the dense row (a stage with nothing to do returns before).
  void Materialize();
  // After a pass wrote every value into row_: the row is current (and pass 1's top-k stream,
  // which holds the values the sample started from, no longer applies).
  void Wrote() {
    values_ = row_;
    s_.streamed = false;
  }
  // Applies a pending temperature division (without computing weights).
  void ApplyDivision();
  // A stage turned sparse with its kept values divided by the pending temperature: the division
  // is done (the row is not used again); `max` is the divided maximum.
  void DivisionTaken(float max) {
    max_ = max;
    divisor_ = 1.0f;
    weights_valid_ = false;
  }
  // Computes weights and block sums if they are not current (applies a pending division); with
  // `head`, also the ids of the tokens with w ≥ kHeadMin (head_ids_, in id order); with
  // `weighted`, also Σ w·(v − max) over the row (in the same pass when the weights are computed
  // now, else in a pass of its own).
  void EnsureWeights(bool head = false, double* weighted = nullptr);
  // Stores per-block (sum, count) results and totals them.
  void TotalBlocks();
  // Cuts by value / weight over all blocks; turns sparse when few remain.
  void CutValueBelow(float t);
  void CutWeightBelow(double t);
  // Keeps only the tokens equal to the maximum.
  void KeepMax();
  // The reference's CutBelowProbability on the dense row.
  void CutBelowProbability(double cut);
  // Shannon entropy (nats) of the current weights (computing them, with the head when `head`,
  // if they are not current).
  double Entropy(bool head = false);
  // The smallest cut key whose kept mass reaches `fraction` of the total (ties at the cut kept),
  // with the reference's cumulative rule, given that the tokens with key ≤ lo (lo_count of them)
  // hold the cumulative fraction lo_cumulative < fraction. Once a pass has bracketed the cut
  // between pivots lo < hi with at most `list_max` tokens at key ≤ hi, those tokens are gathered
  // once (scratch.list_*): the tokens around the cut and the exact mass below lo come from them,
  // not from more passes over the row, and the result says whether the list holds the kept set.
  // REQUIRES: weights current.
  Cut FindCut(const Key& key, double fraction, double lo, double lo_cumulative, int64_t lo_count,
              size_t list_max);
  // Turns sparse, keeping the tokens with key ≤ `cut` (for kNegValue keys and the default cut:
  // every kept token).
  void ToSparse(const Key& key, double cut);
  // The same from the list of `cut` (REQUIRES: cut.listed, and nothing changed since FindCut, whose
  // weights applied any pending division).
  void ToSparseFromList(const Key& key, const Cut& cut);
  // Sets the pending temperature division (divisor_ must be 1). When it overflows the maximum
  // to +inf, applies it at once and keeps only the overflowed tokens (uniform), as the
  // reference does.
  void SetDivisor(float d);
  void MaybeSparse();
  // Turns sparse with exactly the first `keep` kept tokens in the reference's sorted order.
  void KeepFirst(size_t keep);
  // Selects ids with lo < key ≤ hi into scratch.ids (in id order); returns how many.
  size_t Select(const Key& key, double lo, double hi);
  // Copies the first m selected ids (scratch.ids) to `ids`, and their values and weights.
  void GatherSelected(size_t m, std::vector<int32_t>& ids, std::vector<float>& values,
                      std::vector<float>& weights) const;

  absl::Span<const float> values_;       // the current values: the source, or row_ once written
  bool pending_ = false;                 // values_ is not complete yet: see Materialize
  absl::Span<const int32_t> patch_ids_;  // a patch values_ lacks
  absl::Span<const float> patch_values_;
  const LogitsView* deferred_view_ = nullptr;  // a row values_ does not hold yet
  int deferred_row_ = 0;
  float deferred_divisor_ = 1.0f;
  absl::Span<float> row_;
  RowScratch& s_;
  const bool parallel_;
  float max_;
  float divisor_ = 1.0f;  // pending temperature division of values_
  bool weights_valid_ = false;
  bool head_valid_ = false;  // head_ids_ lists every token with w ≥ kHeadMin
  size_t head_size_ = 0;
  double total_ = 0.0;
  int64_t count_ = -1;  // kept tokens, −1 = not known
  bool sparse_ = false;
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_DIST_H_
