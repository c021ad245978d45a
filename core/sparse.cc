#include "core/sparse.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tbb/blocked_range.h"
#include "tbb/parallel_for.h"

namespace tokensampler {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The bit pattern of -inf in `dtype`, little-endian, in the low DTypeSize(dtype) bytes.
uint32_t NegInfBits(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 0xff800000u;
    case DType::kBFloat16:
      return 0xff80u;
    case DType::kFloat16:
      return 0xfc00u;
  }
  return 0;
}

float Decode(DType dtype, const uint8_t* p) {
  if (dtype == DType::kFloat32) {
    float f;
    std::memcpy(&f, p, sizeof(f));
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return dtype == DType::kBFloat16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
}

absl::Status RowError(int row, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("rows[", row, "]: sparse logits: ", message));
}

absl::Status FieldError(int row, absl::string_view field, absl::string_view message) {
  return absl::InvalidArgumentError(
      absl::StrCat("rows[", row, "].params.", field, " ", message,
                   " with sparse logits (it would change the distribution: the tokens outside "
                   "the candidates are unknown); send dense logits"));
}

bool Configured(const SamplingParams& p, Stage stage) {
  switch (stage) {
    case Stage::kTopK:
      return p.top_k > 0;
    case Stage::kTopP:
      return p.top_p < 1.0f;
    case Stage::kMinP:
      return p.min_p > 0.0f;
    case Stage::kTypicalP:
      return p.typical_p < 1.0f;
    case Stage::kEpsilonCutoff:
      return p.epsilon_cutoff > 0.0f;
    case Stage::kEtaCutoff:
      return p.eta_cutoff > 0.0f;
    case Stage::kTopNSigma:
      return p.top_n_sigma.has_value();
    case Stage::kXtc:
      return p.xtc_probability > 0.0f;
    case Stage::kTemperature:
      return false;
  }
  return false;
}

}  // namespace

absl::StatusOr<SparseBatch> SparseBatch::Create(const SparseRows& sparse) {
  const uint32_t v = sparse.vocab_size;
  if (v == 0) return absl::InvalidArgumentError("logits.vocab_size must be > 0, got 0");
  if (v > static_cast<uint32_t>(INT32_MAX)) {
    return absl::InvalidArgumentError(absl::StrCat("logits.vocab_size must be < 2^31, got ", v));
  }
  const uint32_t k = sparse.k;
  if (k == 0 || k > v) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits.sparse.k must be in [1, vocab_size = ", v, "], got ", k));
  }
  const size_t width = DTypeSize(sparse.dtype);
  const uint64_t cells = uint64_t{sparse.rows} * k;
  if (sparse.token_ids.size() != cells * 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        "logits.sparse.token_ids has ", sparse.token_ids.size(),
        " bytes, expected rows × k × 4 = ", sparse.rows, " × ", k, " × 4 = ", cells * 4));
  }
  if (sparse.values.size() != cells * width) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits.sparse.values has ", sparse.values.size(),
                     " bytes, expected rows × k × ", width, " = ", sparse.rows, " × ", k, " × ",
                     width, " = ", cells * width, " for ", DTypeName(sparse.dtype)));
  }
  if (sparse.rest_logsumexp.size() != sparse.rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits.sparse.rest_logsumexp has ", sparse.rest_logsumexp.size(),
                     " entries, expected one per row (", sparse.rows, ")"));
  }

  SparseBatch batch;
  batch.k_ = k;
  const size_t row_bytes = size_t{v} * width;
  batch.dense_.resize(sparse.rows * row_bytes);
  batch.words_per_row_ = (size_t{v} + 63) / 64;
  batch.members_.assign(sparse.rows * batch.words_per_row_, 0);
  batch.stats_.resize(sparse.rows);
  batch.ids_.resize(cells);
  if (cells > 0) std::memcpy(batch.ids_.data(), sparse.token_ids.data(), cells * 4);

  std::vector<absl::Status> errors(sparse.rows);
  const uint32_t neg_inf = NegInfBits(sparse.dtype);
  tbb::parallel_for(tbb::blocked_range<size_t>(0, sparse.rows), [&](const auto& range) {
    for (size_t r = range.begin(); r != range.end(); ++r) {
      const int row = static_cast<int>(r);
      uint8_t* dense = batch.dense_.data() + r * row_bytes;
      if (width == 4) {
        std::fill_n(reinterpret_cast<uint32_t*>(dense), v, neg_inf);
      } else {
        std::fill_n(reinterpret_cast<uint16_t*>(dense), v, static_cast<uint16_t>(neg_inf));
      }
      uint64_t* members = batch.members_.data() + r * batch.words_per_row_;
      const int32_t* ids = batch.ids_.data() + r * k;
      const uint8_t* values = sparse.values.data() + r * k * width;
      float max = kNegInf;
      float min = std::numeric_limits<float>::infinity();
      for (uint32_t j = 0; j < k; ++j) {
        const int32_t id = ids[j];
        if (id < 0 || static_cast<uint32_t>(id) >= v) {
          errors[r] = absl::InvalidArgumentError(absl::StrCat(
              "logits.sparse.token_ids[", r, "][", j, "] must be in [0, ", v, "), got ", id));
          break;
        }
        const size_t t = static_cast<size_t>(id);
        const uint64_t bit = uint64_t{1} << (t % 64);
        if (members[t / 64] & bit) {
          errors[r] = absl::InvalidArgumentError(absl::StrCat(
              "logits.sparse.token_ids[", r, "] holds token ", id, " twice (at index ", j, ")"));
          break;
        }
        members[t / 64] |= bit;
        const float x = Decode(sparse.dtype, values + j * width);
        if (std::isnan(x)) {
          errors[r] = absl::InvalidArgumentError(
              absl::StrCat("logits.sparse.values is NaN at row ", r, ", candidate ", j));
          break;
        }
        std::memcpy(dense + t * width, values + j * width, width);
        max = std::max(max, x);
        min = std::min(min, x);
      }
      if (!errors[r].ok()) continue;
      const float rest = sparse.rest_logsumexp[r];
      if (std::isnan(rest) || rest == std::numeric_limits<float>::infinity()) {
        errors[r] = absl::InvalidArgumentError(absl::StrCat(
            "logits.sparse.rest_logsumexp[", r, "] must be finite or -inf, got ", rest));
        continue;
      }
      if (k == v && rest != kNegInf) {
        errors[r] = absl::InvalidArgumentError(
            absl::StrCat("logits.sparse.rest_logsumexp[", r, "] must be -inf when k == vocab_size ",
                         "(no token is outside the candidates), got ", rest));
        continue;
      }
      RowStats& stats = batch.stats_[r];
      double sum = 0.0;
      if (max != kNegInf) {
        for (uint32_t j = 0; j < k; ++j) {
          sum += std::exp(static_cast<double>(Decode(sparse.dtype, values + j * width)) - max);
        }
      }
      stats.lse = max == kNegInf ? -std::numeric_limits<double>::infinity()
                                 : static_cast<double>(max) + std::log(sum);
      stats.rest = rest;
      stats.max = max;
      // Candidates are the k largest, so no other token is above the smallest of them; and no
      // single token is above the log-sum-exp of all the others.
      stats.bound = std::min(min, rest);
      (void)row;
    }
  });
  for (absl::Status& error : errors) {
    if (!error.ok()) return std::move(error);
  }
  absl::StatusOr<LogitsView> view =
      LogitsView::Create(sparse.dtype, sparse.rows, v, absl::MakeConstSpan(batch.dense_));
  if (!view.ok()) return view.status();
  batch.view_ = *view;
  return batch;
}

bool SparseBatch::IsCandidate(int row, int32_t token) const {
  if (token < 0 || token >= view_.vocab_size()) return false;
  const size_t t = static_cast<size_t>(token);
  return (members_[static_cast<size_t>(row) * words_per_row_ + t / 64] >> (t % 64)) & 1u;
}

double SparseBatch::CandidateMass(int row) const {
  const RowStats& s = stats_[static_cast<size_t>(row)];
  if (s.rest == -std::numeric_limits<double>::infinity()) return 1.0;
  if (s.lse == -std::numeric_limits<double>::infinity()) return 0.0;
  return 1.0 / (1.0 + std::exp(s.rest - s.lse));
}

absl::Status SparseBatch::Prepare(int row, SamplingParams& p, absl::Span<const int32_t> prompt,
                                  absl::Span<const int32_t> output) const {
  const RowStats& stats = stats_[static_cast<size_t>(row)];
  const int k = static_cast<int>(k_);

  // Features that read or change tokens the row does not have.
  if (p.mirostat_mode != 0) {
    return FieldError(row, "mirostat_mode", absl::StrCat(p.mirostat_mode, " cannot be used"));
  }
  if (!p.allowed_token_ids.empty()) return FieldError(row, "allowed_token_ids", "cannot be used");
  if (!p.token_bitmask.empty()) return FieldError(row, "token_bitmask", "cannot be used");
  if (!p.bad_words.empty()) return FieldError(row, "bad_words", "cannot be used");
  if (p.dry_multiplier > 0.0f) return FieldError(row, "dry_multiplier", "cannot be used");
  if (p.no_repeat_ngram_size > 0) {
    return FieldError(row, "no_repeat_ngram_size", "cannot be used");
  }
  if (p.logprobs.has_value() && (*p.logprobs < 0 || *p.logprobs > k)) {
    return FieldError(row, "logprobs", absl::StrCat(*p.logprobs, " must be in [0, k = ", k, "]"));
  }

  // Step 1–2 features that touch tokens: each touched token must be a candidate. `lowest` is
  // a lower bound of the processed value of each touched token (what the core computes, or
  // less: penalty windows only shorten what is penalised).
  struct Touch {
    int32_t token;
    float lowest;
  };
  std::vector<Touch> touched;
  const auto touch = [&](absl::string_view field, int32_t token) -> absl::Status {
    if (!IsCandidate(row, token)) {
      return FieldError(row, field,
                        absl::StrCat("touches token ", token, ", which is not a candidate,"));
    }
    touched.push_back({token, Value(row, token)});
    return absl::OkStatus();
  };
  for (const auto& [token, bias] : p.logit_bias) {
    if (absl::Status s = touch("logit_bias", token); !s.ok()) return s;
    touched.back().lowest += bias;
  }
  if (p.repetition_penalty != 1.0f) {
    for (absl::Span<const int32_t> history : {prompt, output}) {
      for (int32_t token : history) {
        if (absl::Status s = touch("repetition_penalty", token); !s.ok()) return s;
      }
    }
  }
  if (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) {
    for (int32_t token : output) {
      if (absl::Status s =
              touch(p.frequency_penalty != 0.0f ? "frequency_penalty" : "presence_penalty", token);
          !s.ok()) {
        return s;
      }
    }
  }
  if (p.min_tokens > 0 && output.size() < static_cast<size_t>(p.min_tokens)) {
    for (int32_t token : p.eos_token_ids) {
      if (absl::Status s = touch("min_tokens", token); !s.ok()) return s;
      touched.back().lowest = kNegInf;
    }
    for (int32_t token : p.stop_token_ids) {
      if (absl::Status s = touch("min_tokens", token); !s.ok()) return s;
      touched.back().lowest = kNegInf;
    }
  }
  // Penalties lower (or raise) a touched token's value; bound them from below per token.
  if (!touched.empty()) {
    std::sort(touched.begin(), touched.end(),
              [](const Touch& a, const Touch& b) { return a.token < b.token; });
    std::vector<Touch> merged;
    for (const Touch& t : touched) {
      if (!merged.empty() && merged.back().token == t.token) {
        merged.back().lowest = std::min(merged.back().lowest, t.lowest);
      } else {
        merged.push_back(t);
      }
    }
    touched = std::move(merged);
    for (Touch& t : touched) {
      float x = t.lowest;
      if (p.repetition_penalty != 1.0f) {
        x = std::min(x, x > 0.0f ? x / p.repetition_penalty : x * p.repetition_penalty);
      }
      const auto count = std::count(output.begin(), output.end(), t.token);
      x -= std::max(p.frequency_penalty, 0.0f) * static_cast<float>(count);
      if (count > 0) x -= std::max(p.presence_penalty, 0.0f);
      t.lowest = x;
    }
  }
  const bool steps_active = !touched.empty();

  // How many candidates are certain to stay above every non-candidate after steps 1–2.
  const auto enough_stay_above = [&](int needed) {
    if (stats.rest == -std::numeric_limits<double>::infinity()) return true;
    if (!steps_active) return true;  // the candidates are the k largest
    int lowered = 0;
    for (const Touch& t : touched) {
      if (t.lowest < Value(row, t.token) && !(t.lowest > stats.bound)) ++lowered;
    }
    return k - lowered >= needed;
  };

  if (p.greedy()) {
    if (p.logprobs.has_value() && p.logprobs_mode == LogprobsMode::kProcessedLogprobs) {
      return FieldError(row, "logprobs_mode",
                        "PROCESSED_LOGPROBS of a greedy row (a softmax over every token) cannot "
                        "be used");
    }
    if (!enough_stay_above(1)) {
      return RowError(row,
                      "logit_bias / penalties / min_tokens may push every candidate below the "
                      "tokens outside them; send dense logits");
    }
    return absl::OkStatus();
  }

  if (p.dynatemp_range > 0.0f) {
    return FieldError(row, "dynatemp_range",
                      "(dynamic temperature uses the entropy of every token) cannot be used");
  }
  // The first truncation stage decides; temperature counts when it runs before it.
  const absl::Span<const Stage> order =
      p.sampler_order.empty() ? DefaultStageOrder() : absl::MakeConstSpan(p.sampler_order);
  bool tempered = p.sampler_order.empty() ||
                  std::find(order.begin(), order.end(), Stage::kTemperature) == order.end();
  std::optional<Stage> first;
  for (Stage stage : order) {
    if (stage == Stage::kTemperature) {
      tempered = true;
      continue;
    }
    if (Configured(p, stage)) {
      first = stage;
      break;
    }
  }
  const float temperature = tempered ? p.temperature : 1.0f;
  if (!first.has_value()) {
    return RowError(row,
                    "the row samples from the whole vocabulary; sparse logits need top_k ≤ k, "
                    "top_p or min_p as the first truncation stage (or greedy)");
  }
  switch (*first) {
    case Stage::kTopK:
      if (p.top_k > k) {
        return FieldError(row, "top_k", absl::StrCat(p.top_k, " is larger than k = ", k, " and"));
      }
      if (!enough_stay_above(p.top_k)) {
        return RowError(
            row, absl::StrCat("logit_bias / penalties / min_tokens may push the top ", p.top_k,
                              " candidates below the tokens outside them; send "
                              "dense logits"));
      }
      return absl::OkStatus();
    case Stage::kTopP: {
      if (steps_active) {
        return FieldError(row, "top_p",
                          "as the first truncation stage after logit_bias / penalties / "
                          "min_tokens cannot be used");
      }
      if (temperature != 1.0f) {
        return FieldError(
            row, "top_p",
            absl::StrCat("as the first truncation stage after temperature ", temperature,
                         " (the rest's mass is known at temperature 1 only: use "
                         "top_k ≤ k first, or sampler_order with top_p before "
                         "temperature) cannot be used"));
      }
      const double mass = CandidateMass(row);
      if (mass < static_cast<double>(p.top_p)) {
        return RowError(
            row, absl::StrFormat("top_p %g needs tokens outside the %d candidates (they hold "
                                 "%.6f of the probability mass); send more candidates or dense "
                                 "logits",
                                 p.top_p, k, mass));
      }
      p.top_p = std::min(1.0f, static_cast<float>(static_cast<double>(p.top_p) / mass));
      return absl::OkStatus();
    }
    case Stage::kMinP: {
      if (steps_active) {
        return FieldError(row, "min_p",
                          "as the first truncation stage after logit_bias / penalties / "
                          "min_tokens cannot be used");
      }
      if (stats.rest == -std::numeric_limits<double>::infinity()) return absl::OkStatus();
      // p_i ≥ min_p · p_max  ⇔  l_i ≥ l_max + T · ln(min_p).
      const double threshold =
          static_cast<double>(stats.max) +
          static_cast<double>(temperature) * std::log(static_cast<double>(p.min_p));
      if (!(threshold > static_cast<double>(stats.bound))) {
        return RowError(row,
                        absl::StrFormat("min_p %g keeps logits ≥ %.6g, and tokens outside the "
                                        "%d candidates may reach %.6g; send more candidates or "
                                        "dense logits",
                                        p.min_p, threshold, k, stats.bound));
      }
      return absl::OkStatus();
    }
    default:
      return FieldError(row, StageName(*first),
                        "as the first truncation stage (it needs every token's probability) "
                        "cannot be used");
  }
}

void SparseBatch::FixLogprobs(const SamplingParams& params, SampledToken& token) const {
  if (!params.logprobs.has_value() || params.logprobs_mode != LogprobsMode::kRawLogprobs) return;
  const RowStats& s = stats_[token.row_index];
  if (s.rest == -std::numeric_limits<double>::infinity() ||
      s.lse == -std::numeric_limits<double>::infinity()) {
    return;
  }
  const float shift = static_cast<float>(-std::log1p(std::exp(s.rest - s.lse)));
  token.logprob += shift;
  for (TokenLogprob& top : token.top_logprobs) top.logprob += shift;
}

}  // namespace tokensampler
