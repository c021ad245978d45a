// Test helpers for beam search: a toy model whose logits are a deterministic function of the
// prefix, and a reference beam search written independently of core/beam.cc, in double, from
// the definitions (HF transformers `_beam_search` / `_group_beam_search` and BeamHypotheses).
// Thread-compatible.
#ifndef TOKENSAMPLER_TESTS_TESTING_BEAM_TESTING_H_
#define TOKENSAMPLER_TESTS_TESTING_BEAM_TESTING_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "core/philox.h"

namespace tokensampler::testing {

// Logits of a toy model: token v after `prefix` (prompt + output) gets a value in [-5, 5) from a
// hash of (model seed, prefix, v); the EOS token's value grows by `eos_slope` per output token so
// that hypotheses end at varied depths.
struct ToyBeamModel {
  uint64_t seed = 1;
  int32_t vocab = 40;
  int32_t eos = 0;
  double eos_slope = 0.5;
  // Added to the EOS token's and `boosted`'s values (e.g. a stop token), so that finishing
  // continuations crowd the top ranks.
  int32_t boosted = -1;
  double boost = 0.0;

  static uint64_t Mix(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
  }

  std::vector<float> Logits(const std::vector<int32_t>& prompt,
                            const std::vector<int32_t>& output) const {
    uint64_t h = Mix(seed);
    for (int32_t t : prompt) h = Mix(h ^ static_cast<uint64_t>(t));
    for (int32_t t : output) h = Mix(h ^ static_cast<uint64_t>(t));
    std::vector<float> row(static_cast<size_t>(vocab));
    for (int32_t v = 0; v < vocab; ++v) {
      const double u = static_cast<double>(Mix(h + static_cast<uint64_t>(v)) >> 11) * 0x1.0p-53;
      double value = 10.0 * u - 5.0;
      if (v == eos) value += eos_slope * static_cast<double>(output.size()) - 2.0 + boost;
      if (v == boosted) value += boost;
      row[static_cast<size_t>(v)] = static_cast<float>(value);
    }
    return row;
  }
};

enum class RefStopping { kHeuristic, kTrue, kNever };

struct RefConfig {
  int32_t width = 1;
  double length_penalty = 1.0;
  RefStopping stopping = RefStopping::kHeuristic;
  int32_t num_return = 1;
  int32_t groups = 1;
  double diversity = 0.0;
  int32_t max_tokens = 12;
  int32_t min_tokens = 0;
  int32_t stop_token = -1;  // a stop_token_ids entry (-1: none); ends with STOP
  double repetition_penalty = 1.0;
  // Beam sampling.
  bool do_sample = false;
  double temperature = 1.0;
  int32_t top_k = 0;
  uint64_t seed = 0;
};

struct RefSlot {
  uint32_t parent;
  int32_t token;
  double score;
};

struct RefHypothesis {
  std::vector<int32_t> tokens;
  double score;
  bool eos;           // ended by EOS
  bool stop = false;  // ended by the stop token (neither: by max_tokens)
};

struct RefResult {
  std::vector<std::vector<RefSlot>> steps;                      // live beams after each step
  std::vector<RefHypothesis> hypotheses;                        // best first
  double min_margin = std::numeric_limits<double>::infinity();  // closest decisive comparison
};

// Beam search on `model` (anything with `std::vector<float> Logits(prompt, output) const` and an
// `eos` token id) from `prompt`, straight from the definitions.
template <typename Model>
RefResult ReferenceBeamSearch(const Model& model, const std::vector<int32_t>& prompt,
                              const RefConfig& c) {
  struct Running {
    std::vector<int32_t> out;
    double score;
    int32_t group;
  };
  // HF's BeamHypotheses: an n-best list with its worst score.
  struct Pool {
    std::vector<RefHypothesis> beams;
    double worst = 1e9;
  };
  RefResult result;
  const int32_t S = c.width / c.groups;
  const int32_t K = std::max(2, 1 + 1 + (c.stop_token >= 0 ? 1 : 0)) * S;  // EOS (+ stop)
  const double kInf = std::numeric_limits<double>::infinity();
  auto note = [&](double a, double b) {
    if (std::isfinite(a) && std::isfinite(b)) {
      result.min_margin = std::min(result.min_margin, std::fabs(a - b));
    }
  };
  // The row's scores: log-softmax of the processed logits (repetition penalty, min_tokens),
  // with sampling the log of the sampled-from distribution (temperature, top_k).
  auto scores_of = [&](const std::vector<int32_t>& out) {
    std::vector<float> l = model.Logits(prompt, out);
    std::vector<double> x(l.size());
    std::set<int32_t> seen(prompt.begin(), prompt.end());
    seen.insert(out.begin(), out.end());
    for (size_t v = 0; v < l.size(); ++v) {
      double value = l[v];
      if (c.repetition_penalty != 1.0 && seen.count(static_cast<int32_t>(v)) > 0) {
        value = value > 0 ? value / c.repetition_penalty : value * c.repetition_penalty;
      }
      x[v] = value;
    }
    if (static_cast<int32_t>(out.size()) < c.min_tokens) {
      x[static_cast<size_t>(model.eos)] = -kInf;
      if (c.stop_token >= 0) x[static_cast<size_t>(c.stop_token)] = -kInf;
    }
    if (c.do_sample) {
      for (double& value : x) value /= c.temperature;
      if (c.top_k > 0 && c.top_k < static_cast<int32_t>(x.size())) {
        std::vector<double> sorted = x;
        std::sort(sorted.rbegin(), sorted.rend());
        const double cut = sorted[static_cast<size_t>(c.top_k - 1)];
        for (double& value : x) {
          if (value < cut) value = -kInf;
        }
      }
    }
    double m = -kInf;
    for (double value : x) m = std::max(m, value);
    double sum = 0;
    for (double value : x) sum += std::exp(value - m);
    for (double& value : x) value = value - m - std::log(sum);
    return x;
  };

  std::vector<Running> running = {{{}, 0.0, -1}};
  std::vector<Pool> pools(static_cast<size_t>(c.groups));
  std::vector<bool> done(static_cast<size_t>(c.groups), false);
  for (int32_t step = 0;; ++step) {
    std::vector<std::vector<double>> rows;
    for (const Running& r : running) rows.push_back(scores_of(r.out));
    std::vector<Running> next;
    std::vector<RefSlot> slots;
    std::vector<int32_t> this_step_tokens;
    for (int32_t g = 0; g < c.groups; ++g) {
      if (done[static_cast<size_t>(g)]) continue;
      // (score, position of the beam in its group, token, input row)
      std::vector<std::tuple<double, int32_t, int32_t, uint32_t>> cand;
      int32_t position = 0;
      for (size_t i = 0; i < running.size(); ++i) {
        if (running[i].group != -1 && running[i].group != g) continue;
        for (size_t v = 0; v < rows[i].size(); ++v) {
          if (!std::isfinite(rows[i][v])) continue;
          const double count = static_cast<double>(std::count(
              this_step_tokens.begin(), this_step_tokens.end(), static_cast<int32_t>(v)));
          cand.emplace_back(running[i].score + rows[i][v] - c.diversity * count, position,
                            static_cast<int32_t>(v), static_cast<uint32_t>(i));
        }
        ++position;
      }
      auto better = [](const auto& a, const auto& b) {
        if (std::get<0>(a) != std::get<0>(b)) return std::get<0>(a) > std::get<0>(b);
        if (std::get<1>(a) != std::get<1>(b)) return std::get<1>(a) < std::get<1>(b);
        return std::get<2>(a) < std::get<2>(b);
      };
      std::vector<std::tuple<double, int32_t, int32_t, uint32_t>> top;
      if (!c.do_sample) {
        std::sort(cand.begin(), cand.end(), better);
        for (size_t i = 0; i + 1 < cand.size() && i < static_cast<size_t>(K); ++i) {
          note(std::get<0>(cand[i]), std::get<0>(cand[i + 1]));
        }
        top.assign(cand.begin(), cand.begin() + std::min<ptrdiff_t>(K, std::ssize(cand)));
      } else {
        // Sequential draws without replacement in (position, token) order.
        std::sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) {
          return std::make_pair(std::get<1>(a), std::get<2>(a)) <
                 std::make_pair(std::get<1>(b), std::get<2>(b));
        });
        double m = -kInf;
        for (const auto& t : cand) m = std::max(m, std::get<0>(t));
        std::vector<double> w;
        for (const auto& t : cand) w.push_back(std::exp(std::get<0>(t) - m));
        for (int32_t k = 0; k < K && k < static_cast<int32_t>(cand.size()); ++k) {
          double total = 0;
          for (double x : w) total += x;
          const double u =
              UniformDouble(c.seed, static_cast<uint64_t>(step), 0, DrawPurpose::kBeamCandidates,
                            static_cast<uint32_t>(g * K + k));
          double acc = 0;
          size_t pick = 0;
          for (size_t i = 0; i < w.size(); ++i) {
            if (w[i] == 0) continue;
            acc += w[i];
            pick = i;
            note(acc / total, u);
            if (acc > u * total) break;
          }
          top.push_back(cand[pick]);
          w[pick] = 0;
        }
        std::sort(top.begin(), top.end(), better);
        for (size_t i = 0; i + 1 < top.size(); ++i)
          note(std::get<0>(top[i]), std::get<0>(top[i + 1]));
      }
      Pool& pool = pools[static_cast<size_t>(g)];
      std::vector<Running> group_next;
      std::vector<RefSlot> group_slots;
      for (size_t rank = 0; rank < top.size(); ++rank) {
        const auto& [score, position_unused, token, row] = top[rank];
        std::vector<int32_t> out = running[row].out;
        out.push_back(token);
        const bool eos = token == model.eos;
        const bool stop = !eos && token == c.stop_token;
        const bool length = static_cast<int32_t>(out.size()) >= c.max_tokens;
        if (eos || stop || length) {
          if (rank >= static_cast<size_t>(S)) continue;
          // BeamHypotheses.add with length = generated tokens including the last.
          const double hyp_score =
              score / std::pow(static_cast<double>(out.size()), c.length_penalty);
          note(hyp_score, pool.worst);
          if (static_cast<int32_t>(pool.beams.size()) < S || hyp_score > pool.worst) {
            pool.beams.push_back({out, hyp_score, eos, stop});
            if (static_cast<int32_t>(pool.beams.size()) > S) {
              size_t worst_i = 0;
              for (size_t i = 1; i < pool.beams.size(); ++i) {
                if (pool.beams[i].score < pool.beams[worst_i].score) worst_i = i;
              }
              pool.beams.erase(pool.beams.begin() + static_cast<ptrdiff_t>(worst_i));
              pool.worst = kInf;
              for (const auto& b : pool.beams) pool.worst = std::min(pool.worst, b.score);
            } else {
              pool.worst = std::min(pool.worst, hyp_score);
            }
          }
          continue;
        }
        group_next.push_back({out, score, g});
        group_slots.push_back({row, token, score});
        if (static_cast<int32_t>(group_next.size()) == S) break;
      }
      for (const Running& r : group_next) this_step_tokens.push_back(r.out.back());
      bool group_done = group_next.empty();
      if (!group_done && static_cast<int32_t>(pool.beams.size()) == S) {
        if (c.stopping == RefStopping::kTrue) {
          group_done = true;
        } else {
          const double cur = static_cast<double>(step + 1);
          const double len = c.stopping == RefStopping::kNever && c.length_penalty > 0
                                 ? static_cast<double>(c.max_tokens)
                                 : cur;
          const double attainable = group_next.front().score / std::pow(len, c.length_penalty);
          note(pool.worst, attainable);
          group_done = pool.worst >= attainable;
        }
      }
      done[static_cast<size_t>(g)] = group_done;
      if (!group_done) {
        next.insert(next.end(), group_next.begin(), group_next.end());
        slots.insert(slots.end(), group_slots.begin(), group_slots.end());
      }
    }
    result.steps.push_back(slots);
    running = std::move(next);
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
  }
  for (const Pool& pool : pools) {
    // Within a pool, the order of equal scores is the order of insertion.
    std::vector<RefHypothesis> sorted = pool.beams;
    std::stable_sort(
        sorted.begin(), sorted.end(),
        [](const RefHypothesis& a, const RefHypothesis& b) { return a.score > b.score; });
    result.hypotheses.insert(result.hypotheses.end(), sorted.begin(), sorted.end());
  }
  std::stable_sort(
      result.hypotheses.begin(), result.hypotheses.end(),
      [](const RefHypothesis& a, const RefHypothesis& b) { return a.score > b.score; });
  for (size_t i = 0; i + 1 < result.hypotheses.size(); ++i) {
    note(result.hypotheses[i].score, result.hypotheses[i + 1].score);
  }
  if (static_cast<int32_t>(result.hypotheses.size()) > c.num_return) {
    result.hypotheses.resize(static_cast<size_t>(c.num_return));
  }
  return result;
}

}  // namespace tokensampler::testing

#endif  // TOKENSAMPLER_TESTS_TESTING_BEAM_TESTING_H_
