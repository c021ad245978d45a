#include "tests/bench/chain.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace tokensampler::bench {

std::vector<std::string> DefaultChains() {
  return {"temperature=0",
          "temperature=0.8",
          "top_k=50,top_p=0.95,temperature=0.8",
          "top_p=0.9",
          "min_p=0.05,temperature=0.8",
          "repetition_penalty=1.1,frequency_penalty=0.5,presence_penalty=0.5,history=64,"
          "top_k=40,top_p=0.95,temperature=0.8",
          "typical_p=0.9"};
}

absl::StatusOr<Chain> ParseChain(absl::string_view spec) {
  Chain chain;
  chain.name = std::string(spec);
  chain.params.seed = 1;
  for (absl::string_view item : absl::StrSplit(spec, ',', absl::SkipEmpty())) {
    const std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(item, '=');
    float f = 0.0f;
    int i = 0;
    const bool is_float = absl::SimpleAtof(kv.second, &f);
    const bool is_int = absl::SimpleAtoi(kv.second, &i);
    SamplingParams& p = chain.params;
    const auto need = [&](bool ok) -> absl::Status {
      return ok ? absl::OkStatus()
                : absl::InvalidArgumentError(
                      absl::StrCat("chain value for ", kv.first, " is not a number: ", kv.second));
    };
    absl::Status status = absl::OkStatus();
    if (kv.first == "temperature")
      status = need(is_float), p.temperature = f;
    else if (kv.first == "top_k")
      status = need(is_int), p.top_k = i;
    else if (kv.first == "top_p")
      status = need(is_float), p.top_p = f;
    else if (kv.first == "min_p")
      status = need(is_float), p.min_p = f;
    else if (kv.first == "typical_p")
      status = need(is_float), p.typical_p = f;
    else if (kv.first == "epsilon_cutoff")
      status = need(is_float), p.epsilon_cutoff = f;
    else if (kv.first == "eta_cutoff")
      status = need(is_float), p.eta_cutoff = f;
    else if (kv.first == "top_n_sigma")
      status = need(is_float), p.top_n_sigma = f;
    else if (kv.first == "xtc_probability")
      status = need(is_float), p.xtc_probability = f;
    else if (kv.first == "xtc_threshold")
      status = need(is_float), p.xtc_threshold = f;
    else if (kv.first == "repetition_penalty")
      status = need(is_float), p.repetition_penalty = f;
    else if (kv.first == "frequency_penalty")
      status = need(is_float), p.frequency_penalty = f;
    else if (kv.first == "presence_penalty")
      status = need(is_float), p.presence_penalty = f;
    else if (kv.first == "dry_multiplier")
      status = need(is_float), p.dry_multiplier = f;
    else if (kv.first == "mirostat_mode")
      status = need(is_int), p.mirostat_mode = i;
    else if (kv.first == "logprobs")
      status = need(is_int), p.logprobs = i;
    else if (kv.first == "history")
      status = need(is_int), chain.history_tokens = i;
    else
      status = absl::InvalidArgumentError(absl::StrCat("unknown chain key: ", kv.first));
    if (!status.ok()) return status;
  }
  return chain;
}

}  // namespace tokensampler::bench
