#include "core/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "absl/random/distributions.h"
#include "absl/strings/str_cat.h"
#include "core/dist.h"
#include "core/kernels.h"
#include "core/philox.h"
#include "core/row.h"
#include "core/stages.h"
#include "core/status_macros.h"
#include "core/stopping.h"
#include "tbb/blocked_range.h"
#include "tbb/enumerable_thread_specific.h"
#include "tbb/parallel_for.h"
#include "tbb/task_arena.h"

namespace tokensampler {

struct Sampler::Scratch {
  tbb::enumerable_thread_specific<RowScratch> per_thread;
};

namespace {

constexpr float kPosInf = std::numeric_limits<float>::infinity();

// Steps 4–6 for one sample on the fast path: temperature and truncation in the row's order, then
// mirostat or the draw. `dist` starts as the sample's copy of the processed row (with the row's
// temperature already applied when `tempered`). Returns the token (and μ for mirostat rows).
int32_t SampleOne(const SamplingParams& p, Dist& dist, bool tempered, uint64_t seed, uint64_t step,
                  uint32_t sample, float mu_in, float* mu_out, int32_t vocab) {
  const absl::Span<const Stage> order =
      p.sampler_order.empty() ? DefaultStageOrder() : absl::MakeConstSpan(p.sampler_order);
  const Temperature temperature{p.temperature, p.dynatemp_range, p.dynatemp_exponent};
  // A custom order without temperature still tempers first (the proto's contract).
  if (!tempered && std::find(order.begin(), order.end(), Stage::kTemperature) == order.end()) {
    dist.Temperature(temperature);
  }
  for (Stage stage : order) {
    switch (stage) {
      case Stage::kTemperature:
        if (!tempered) dist.Temperature(temperature);
        break;
      case Stage::kTopK:
        dist.TopK(p.top_k);
        break;
      case Stage::kTopP:
        dist.TopP(p.top_p);
        break;
      case Stage::kMinP:
        dist.MinP(p.min_p);
        break;
      case Stage::kTypicalP:
        dist.TypicalP(p.typical_p);
        break;
      case Stage::kEpsilonCutoff:
        dist.EpsilonCutoff(p.epsilon_cutoff);
        break;
      case Stage::kEtaCutoff:
        dist.EtaCutoff(p.eta_cutoff);
        break;
      case Stage::kTopNSigma:
        if (p.top_n_sigma.has_value()) dist.TopNSigma(*p.top_n_sigma);
        break;
      case Stage::kXtc:
        if (p.xtc_probability > 0.0f) {
          dist.Xtc(Xtc{p.xtc_threshold, p.xtc_probability,
                       UniformDouble(seed, step, sample, DrawPurpose::kXtc)});
        }
        break;
    }
  }
  const double coin = UniformDouble(seed, step, sample, DrawPurpose::kToken);
  if (p.mirostat_mode != 0) {
    const Mirostat mirostat{p.mirostat_mode, p.mirostat_tau, p.mirostat_eta, mu_in, vocab};
    const Mirostat::Result result = dist.Mirostat(mirostat, coin);
    *mu_out = result.mu;
    return result.token;
  }
  return dist.Draw(coin);
}

// Whether the row's (static) temperature runs first, so that it can be applied while decoding.
bool TemperatureFirst(const SamplingParams& p) {
  if (p.greedy() || p.dynatemp_range > 0.0f || p.temperature == 1.0f) return false;
  if (p.sampler_order.empty()) return true;  // the default order starts with temperature
  return p.sampler_order.front() == Stage::kTemperature ||
         std::find(p.sampler_order.begin(), p.sampler_order.end(), Stage::kTemperature) ==
             p.sampler_order.end();
}

// Whether top_k is the first stage to change values: only a static temperature (which divides,
// and top_k selects the same tokens by the undivided values) may come before it.
bool TopKFirst(const SamplingParams& p) {
  if (p.greedy() || p.top_k <= 0 || p.mirostat_mode != 0 || p.dynatemp_range > 0.0f) return false;
  const absl::Span<const Stage> order =
      p.sampler_order.empty() ? DefaultStageOrder() : absl::MakeConstSpan(p.sampler_order);
  for (Stage stage : order) {
    if (stage == Stage::kTopK) return true;
    if (stage != Stage::kTemperature) return false;
  }
  return false;
}

// Whether steps 1–2 can only lower logits: masks and bans (−inf), DRY (subtracts, multiplier
// ≥ 0), penalties that are not rewards (repetition ≥ 1, frequency and presence ≥ 0) and no
// logit_bias (which may raise).
bool StepsOnlyLower(const SamplingParams& p) {
  return p.logit_bias.empty() && p.repetition_penalty >= 1.0f && p.frequency_penalty >= 0.0f &&
         p.presence_penalty >= 0.0f;
}

// Penalties on a float32 row that pass 1 only read, with top_k streamed: they change only prompt
// and output tokens, so they are applied there — to `logits` at those tokens, seeded from
// `source` — and to the stream (what fell under its threshold leaves it), and the changed tokens
// go to scratch.patch_* for the Dist (Dist::Patched). The row is not copied. Returns false when
// the whole row is needed after all: its maximum is +inf or its token was penalised, the stream
// overflowed, or fewer than k of its tokens stay at or above the threshold (or every token is
// −inf).
bool PatchPenalties(const SamplingParams& p, const RowRequest& req, absl::Span<const float> source,
                    absl::Span<float> logits, const kernels::MaxResult& top, RowScratch& scratch) {
  if (!scratch.streamed || top.argmax < 0 || !(top.max < kPosInf)) return false;
  const absl::Span<const int32_t> history[] = {req.prompt_token_ids, req.output_token_ids};
  for (const auto& tokens : history) {
    for (int32_t t : tokens) logits[static_cast<size_t>(t)] = source[static_cast<size_t>(t)];
  }
  Penalties{p, req.prompt_token_ids, req.output_token_ids}.Apply(logits, scratch);
  // marks (zero between uses): 1 = a history token seen, 2 = one whose value changed.
  std::vector<uint8_t>& marks = scratch.marks;
  scratch.patch_ids.clear();
  scratch.patch_values.clear();
  for (const auto& tokens : history) {
    for (int32_t t : tokens) {
      const size_t i = static_cast<size_t>(t);
      if (marks[i] != 0) continue;
      marks[i] = logits[i] != source[i] ? 2 : 1;
      if (marks[i] == 2) {
        scratch.patch_ids.push_back(t);
        scratch.patch_values.push_back(logits[i]);
      }
    }
  }
  // Nothing rose, so the maximum stands unless its own token changed; and the tokens now at or
  // above the stream's threshold are among those it holds.
  bool ok = marks[static_cast<size_t>(top.argmax)] != 2;
  if (ok) {
    kernels::TopStream& held = scratch.stream;
    size_t kept = 0;
    for (size_t i = 0; i < held.count; ++i) {
      const size_t id = static_cast<size_t>(held.ids[i]);
      const float x = marks[id] == 2 ? logits[id] : held.values[i];
      if (x >= held.threshold) {
        held.ids[kept] = held.ids[i];
        held.values[kept] = x;
        ++kept;
      }
    }
    held.count = kept;
    ok = kept >= static_cast<size_t>(held.k);
  }
  for (const auto& tokens : history) {
    for (int32_t t : tokens) marks[static_cast<size_t>(t)] = 0;
  }
  return ok;
}

// A second read of a row in shared memory differed from pass 1 (see Dist::Deferred).
absl::Status SharedRowChanged(size_t row) {
  return absl::AbortedError(absl::StrCat(
      "rows[", row,
      "]: the logits changed while the row was being sampled (read twice, they differed): a "
      "shared-memory region must not be written until the response to the call that reads it "
      "has arrived"));
}

// `processed_out` (empty, or size vocab with n == 1) receives the distribution the sample was drawn
// from (Sampler::RunRow).
// Samples row `row` of `view`, which is row `index` of the request (for messages and results).
absl::Status SampleRow(const LogitsView& view, int row, size_t index, const RowRequest& req,
                       RowScratch& scratch, bool parallel, SampledToken* results,
                       absl::Span<float> processed_out = {}) {
  const SamplingParams& p = *req.params;
  const int32_t vocab = view.vocab_size();
  const size_t r = index;
  RETURN_IF_ERROR(CheckHistory(r, "prompt_token_ids", req.prompt_token_ids, vocab));
  RETURN_IF_ERROR(CheckHistory(r, "output_token_ids", req.output_token_ids, vocab));
  if (p.max_tokens.has_value() &&
      req.output_token_ids.size() >= static_cast<size_t>(*p.max_tokens)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rows[", r, "].output_token_ids has ", req.output_token_ids.size(),
        " tokens and max_tokens is ", *p.max_tokens, ": the sequence has already finished"));
  }

  scratch.Reserve(vocab);
  scratch.source_changed = false;
  const size_t v = static_cast<size_t>(vocab);
  const absl::Span<float> logits(scratch.logits.data(), v);
  const bool wants_logprobs = p.logprobs.has_value();
  const bool raw_mode =
      p.logprobs_mode == LogprobsMode::kRawLogprobs || p.logprobs_mode == LogprobsMode::kRawLogits;
  const bool steps = StepsOneTwoActive(p, req.output_token_ids);
  // A float32 row that steps 1–2 leave alone is not copied: pass 1 only reads it (finding its
  // maximum and any NaN), and the samples read it where it is — the stage that first changes
  // values writes the sample's own copy as it goes (Dist). Any other row is decoded into
  // `logits` by pass 1, which also divides by the temperature when nothing comes between
  // decoding and the temperature. So is a row in another process's memory (it could change
  // between two reads) unless one read is all it takes (greedy), and a row not aligned for
  // float reads.
  //
  // A small top_k that is the first stage to change values keeps its candidates while pass 1
  // reads the row (one stream over the blocks in order), so it needs no second read. Steps 1–2
  // that only lower logits leave it valid after a fix-up (below); penalties alone do even without
  // a copy of the row (PatchPenalties).
  const bool only_lower = StepsOnlyLower(p);
  const bool streams = !parallel && (!steps || only_lower) && TopKFirst(p) &&
                       static_cast<size_t>(p.top_k) <= kernels::TopStream::kMaxK;
  const bool aligned = reinterpret_cast<uintptr_t>(view.RowBytes(row)) % alignof(float) == 0;
  const bool read_once = p.greedy() && !wants_logprobs && processed_out.empty();
  const bool own_floats =
      view.dtype() == DType::kFloat32 && aligned && !(wants_logprobs && raw_mode);
  bool patched = own_floats && !view.shared() && steps && streams &&
                 OnlyPenaltiesActive(p, req.output_token_ids);
  bool read_only = own_floats && (!view.shared() || read_once) && (!steps || patched);
  // Nor is any other row whose top_k is streamed (bf16 / fp16, or float32 in shared memory): the
  // stream keeps every value top_k needs, and a stage that needs the whole row after all decodes
  // it again (Dist::Deferred). A row in shared memory may read differently the second time (its
  // client wrote the region during the call): every second read is checked against pass 1, and
  // the row fails if it differs.
  bool deferred = !read_only && streams && !steps && !(wants_logprobs && raw_mode) &&
                  (view.dtype() != DType::kFloat32 || aligned);
  bool tempered = TemperatureFirst(p) && !read_only && !steps && !(wants_logprobs && raw_mode);
  float divisor = tempered ? p.temperature : 1.0f;
  std::vector<kernels::MaxResult>& blocks = scratch.block_max;
  blocks.resize(NumBlocks(v));
  absl::Span<const float> source = logits;
  if (read_only) {
    source = absl::MakeConstSpan(reinterpret_cast<const float*>(view.RowBytes(row)), v);
  }
  kernels::MaxResult top{kNegInf, -1, -1};
  for (;;) {
    scratch.streamed = false;
    kernels::TopStream* stream = nullptr;
    if (streams) {
      scratch.stream =
          kernels::TopStream::For(p.top_k, scratch.stream_ids.data(), scratch.stream_values.data(),
                                  scratch.stream_scratch.data());
      stream = &scratch.stream;
    }
    ForBlocks(v, parallel, [&](size_t b, size_t begin, size_t end) {
      blocks[b] = kernels::DecodeMax(view.dtype(), view.RowBytes(row), begin, end, divisor,
                                     read_only || deferred ? nullptr : logits.data(), stream);
    });
    scratch.streamed = stream != nullptr && !stream->overflow;
    top = kernels::MaxResult{kNegInf, -1, -1};
    for (const kernels::MaxResult& block : blocks) {
      if (block.nan >= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("logits.data is NaN at row ", r, ", token ", block.nan));
      }
      if (block.argmax >= 0 && (top.argmax < 0 || block.max > top.max)) top = block;
    }
    // Every value −inf once divided: either the row is all −inf, or the temperature pushed its
    // maximum below −FLT_MAX. Decoded again undivided, the temperature stage tells them apart
    // (and makes the second uniform over the tokens at the maximum, as the reference does).
    if (!tempered || top.argmax >= 0) break;
    tempered = false;
    divisor = 1.0f;
  }
  if (deferred && !scratch.streamed) {
    // The stream overflowed (ties): the row is needed after all.
    if (!ReadAgain(view, row, divisor, top.max, logits.data(), parallel, blocks)) {
      return SharedRowChanged(r);
    }
    deferred = false;
  }

  // Raw logprobs are taken before any stage touches the row.
  Normalizer raw_norm;
  if (wants_logprobs && raw_mode) {
    if (p.logprobs_mode == LogprobsMode::kRawLogprobs) {
      raw_norm = Normalizer::Of(logits);
      TopValues(
          logits, *p.logprobs, [&](float l) { return raw_norm.LogProb(l); }, scratch,
          scratch.raw_top);
    } else {
      TopValues(
          logits, *p.logprobs, [](float l) { return l; }, scratch, scratch.raw_top);
    }
  }

  // Steps 1–2 touch few tokens (or apply a mask); then the maximum may have changed.
  if (patched && !PatchPenalties(p, req, source, logits, top, scratch)) {
    // The row is needed after all: the general way, on a copy.
    std::copy(source.begin(), source.end(), logits.begin());
    source = logits;
    read_only = false;
    patched = false;
  }
  if (steps && !patched) {
    MaskAndBias{p, req.output_token_ids}.Apply(logits, scratch);
    Penalties{p, req.prompt_token_ids, req.output_token_ids}.Apply(logits, scratch);
    Dry{p, req.prompt_token_ids, req.output_token_ids}.Apply(logits, scratch);
    NoRepeatNgram{p.no_repeat_ngram_size, req.prompt_token_ids, req.output_token_ids}.Apply(logits);
    // When nothing could rise and the maximum's token kept its value, the maximum and its first
    // index stand (every token before it was lower, and still is); otherwise find them again.
    if (!(only_lower && top.argmax >= 0 && logits[static_cast<size_t>(top.argmax)] == top.max)) {
      top = RowMax(logits, parallel, blocks);
    }
    if (scratch.streamed) {
      // Nothing rose, so the tokens now ≥ the stream's threshold are among those it holds: keep
      // those (with their new values). If fewer than k remain, the threshold may exceed the
      // k-th largest value now: top_k selects the usual way.
      kernels::TopStream& held = scratch.stream;
      size_t kept = 0;
      for (size_t i = 0; i < held.count; ++i) {
        const float x = logits[static_cast<size_t>(held.ids[i])];
        if (x >= held.threshold) {
          held.ids[kept] = held.ids[i];
          held.values[kept] = x;
          ++kept;
        }
      }
      held.count = kept;
      scratch.streamed = kept >= static_cast<size_t>(held.k);
    }
  }
  const float max = top.max;
  const int32_t argmax = static_cast<int32_t>(top.argmax);
  if (argmax < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows[", r,
                     "]: every token is masked (by the logits themselves, allowed_token_ids, "
                     "bad_words, min_tokens, token_bitmask, logit_bias or no_repeat_ngram_size)"));
  }
  float dist_max = max;
  if (max == kPosInf) {
    // +inf logits dominate: the row is uniform over them.
    const auto uniform = [&](size_t begin, size_t end) {
      kernels::InfToUniform(logits.data(), begin, end);
    };
    if (read_only || deferred) {
      // Decoded and made uniform block by block, in one pass.
      if (!ReadAgain(view, row, 1.0f, kPosInf, logits.data(), parallel, blocks, uniform)) {
        return SharedRowChanged(r);
      }
    } else {
      ForBlocks(v, parallel, [&](size_t, size_t begin, size_t end) { uniform(begin, end); });
    }
    source = logits;
    deferred = false;
    dist_max = 0.0f;
    scratch.streamed = false;  // the values it holds are gone
  }
  // Each sample's own row: `logits` unless that holds the source the samples share.
  const absl::Span<float> own = source.data() == logits.data() && p.n > 1
                                    ? absl::Span<float>(scratch.work.data(), v)
                                    : logits;

  const uint64_t seed = p.seed.has_value() ? *p.seed : absl::Uniform<uint64_t>(scratch.entropy);
  const uint64_t step = req.output_token_ids.size();
  const float mu_in = req.mirostat_mu.value_or(2.0f * p.mirostat_tau);
  for (int32_t s = 0; s < p.n; ++s) {
    SampledToken& out = results[s];
    out.row_index = static_cast<uint32_t>(r);
    out.sample_index = req.first_sample_index + static_cast<uint32_t>(s);
    absl::Span<const float> processed = source;
    float mu = mu_in;
    if (p.greedy()) {
      out.token_id = argmax;
    } else {
      Dist dist(source, own, dist_max, scratch, parallel);
      if (patched) dist.Patched(scratch.patch_ids, scratch.patch_values);
      if (deferred) dist.Deferred(&view, row, divisor);
      out.token_id = SampleOne(p, dist, tempered, seed, step, out.sample_index, mu_in, &mu, vocab);
      if ((wants_logprobs && !raw_mode) || !processed_out.empty()) processed = dist.Processed();
      if (scratch.source_changed) return SharedRowChanged(r);
    }
    if (!processed_out.empty())
      std::copy(processed.begin(), processed.end(), processed_out.begin());
    if (p.mirostat_mode != 0) out.mirostat_mu = mu;
    if (wants_logprobs) FillLogprobs(p, view, row, out.token_id, processed, raw_norm, scratch, out);
    const Finish finish = CheckFinish(p, req.output_token_ids, out.token_id);
    out.finish_reason = finish.reason;
    out.stop_token_id = finish.stop_token_id;
    out.stop_sequence_index = finish.stop_sequence_index;
  }
  return absl::OkStatus();
}

}  // namespace

Sampler::Sampler() : scratch_(std::make_unique<Scratch>()) {}
Sampler::~Sampler() = default;

absl::StatusOr<std::vector<SampledToken>> Sampler::Run(const LogitsView& logits,
                                                       absl::Span<const RowRequest> rows,
                                                       const std::atomic<bool>* cancelled) const {
  if (rows.size() != static_cast<size_t>(logits.rows())) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows has ", rows.size(), " entries but logits.rows is ", logits.rows()));
  }
  std::vector<size_t> offsets(rows.size() + 1, 0);
  for (size_t r = 0; r < rows.size(); ++r) {
    offsets[r + 1] = offsets[r] + static_cast<size_t>(rows[r].params->n);
  }
  std::vector<SampledToken> results(offsets.back());
  std::vector<absl::Status> statuses(rows.size());
  // Fewer rows than threads: each row's blocks are spread over the threads as well.
  const bool split_rows =
      logits.vocab_size() >= static_cast<int32_t>(2 * kBlock) &&
      rows.size() < static_cast<size_t>(tbb::this_task_arena::max_concurrency());
  tbb::parallel_for(
      tbb::blocked_range<size_t>(0, rows.size()), [&](const tbb::blocked_range<size_t>& range) {
        RowScratch& scratch = scratch_->per_thread.local();
        for (size_t r = range.begin(); r != range.end(); ++r) {
          if (cancelled != nullptr && cancelled->load(std::memory_order_relaxed)) {
            statuses[r] = absl::CancelledError("the call was cancelled before rows[" +
                                               std::to_string(r) + "] was sampled");
            continue;
          }
          if (!logits.in_pieces()) {
            statuses[r] = SampleRow(logits, static_cast<int>(r), r, rows[r], scratch, split_rows,
                                    results.data() + offsets[r]);
            continue;
          }
          // A row in pieces is copied whole into this thread's scratch (in L2,
          // where pass 1 then reads it) and sampled from there.
          scratch.staged.resize((logits.RowSize() + sizeof(float) - 1) / sizeof(float));
          auto* staged = reinterpret_cast<uint8_t*>(scratch.staged.data());
          logits.CopyRow(static_cast<int>(r), staged);
          const absl::StatusOr<LogitsView> row_view =
              LogitsView::Create(logits.dtype(), 1, static_cast<uint32_t>(logits.vocab_size()),
                                 absl::MakeConstSpan(staged, logits.RowSize()));
          statuses[r] = row_view.ok() ? SampleRow(*row_view, 0, r, rows[r], scratch, split_rows,
                                                  results.data() + offsets[r])
                                      : row_view.status();
        }
      });
  if (cancelled != nullptr && cancelled->load(std::memory_order_relaxed)) {
    return absl::CancelledError("the call was cancelled");
  }
  for (absl::Status& status : statuses) {
    if (!status.ok()) return std::move(status);
  }
  return results;
}

absl::StatusOr<SampledToken> Sampler::RunRow(const LogitsView& logits, int row,
                                             const RowRequest& request, bool split,
                                             absl::Span<float> processed) const {
  if (logits.in_pieces()) {
    return absl::InvalidArgumentError("Sampler::RunRow needs a contiguous view, not one in pieces");
  }
  SampledToken result;
  RETURN_IF_ERROR(SampleRow(logits, row, static_cast<size_t>(row), request,
                            scratch_->per_thread.local(), split, &result, processed));
  return result;
}

}  // namespace tokensampler
