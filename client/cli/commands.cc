#include "client/cli/commands.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <future>
#include <iterator>
#include <map>
#include <random>
#include <sstream>
#include <tuple>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "client/cli/random_logits.h"
#include "client/client.h"
#include "client/logits.h"
#include "client/session_client.h"
#include "google/protobuf/util/json_util.h"

// --- connection and output ---
ABSL_FLAG(std::string, target, "127.0.0.1:50051",
          "Server address: host:port or unix:/path/to.sock.");
ABSL_FLAG(int64_t, timeout_ms, 10000, "Deadline of each call, in milliseconds (> 0).");
ABSL_FLAG(int32_t, max_message_bytes, 256 << 20,
          "Largest message the client sends or receives; -1 = no limit.");
ABSL_FLAG(bool, wait_for_ready, false,
          "Wait (up to --timeout_ms) for the server to become reachable instead of failing at "
          "once with UNAVAILABLE.");
ABSL_FLAG(bool, tls, false,
          "Connect with TLS (implied by --tls_ca / --tls_cert), verifying the server against "
          "the system's roots unless --tls_ca is given.");
ABSL_FLAG(std::string, tls_ca, "", "PEM CA bundle that the server's certificate must chain to.");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM client certificate chain, for a server requiring mutual TLS (with --tls_key).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, auth_token_file, "",
          "File whose first non-blank line is the bearer token sent with every call.");
ABSL_FLAG(bool, json, false,
          "sample: print the response as one line of JSON; decode: one line per step.");
ABSL_FLAG(uint32_t, sequences, 2, "decode: number of sequences to decode (each forked --n times).");
ABSL_FLAG(
    uint32_t, speculative, 0,
    "decode: speculative decoding with this many draft tokens per step from a weaker toy "
    "draft model, verified by the server (Step.drafts); prints the acceptance rate. 0 = off.");
ABSL_FLAG(uint32_t, steps, 8, "decode: most steps to run (fewer when every sequence finishes).");
// --- decode: beam search ---
ABSL_FLAG(std::optional<uint32_t>, beam_width, std::nullopt,
          "decode: run each sequence as a beam search of this width (AddSequence.beam); prints "
          "the beams of every step and the finished hypotheses.");
ABSL_FLAG(std::optional<float>, length_penalty, std::nullopt,
          "decode, beam search: 1.0; hypothesis score = sum logprob / length^length_penalty.");
ABSL_FLAG(std::optional<std::string>, early_stopping, std::nullopt,
          "decode, beam search: true, heuristic (default) or never.");
ABSL_FLAG(std::optional<uint32_t>, num_return_sequences, std::nullopt,
          "decode, beam search: 1; hypotheses to return, <= --beam_width.");
ABSL_FLAG(std::optional<uint32_t>, num_beam_groups, std::nullopt,
          "decode, beam search: 1; groups of diverse beam search (divides --beam_width).");
ABSL_FLAG(std::optional<float>, diversity_penalty, std::nullopt,
          "decode, beam search: 0; Hamming diversity penalty between groups.");
ABSL_FLAG(bool, do_sample, false, "decode, beam search: beam sampling with the sampling flags.");
ABSL_FLAG(std::string, service, "",
          "health: the service to ask about (\"\" = the whole server, or "
          "tokensampler.v1.Sampler).");

// --- logits source ---
ABSL_FLAG(std::string, logits, "",
          "sample: a file of raw little-endian logits in --dtype, row-major [rows x --vocab] "
          "(e.g. numpy's arr.astype('<f4').tofile(FILE)).");
ABSL_FLAG(bool, random, false,
          "sample: generate realistic random logits (bulk sigma*N(0,1), sigma ~ U[2,3), 1-8 "
          "peaked tokens) from --seed instead of reading --logits.");
ABSL_FLAG(std::optional<uint32_t>, rows, std::nullopt,
          "sample: number of rows (--random: default 1; --logits: checked against the file).");
ABSL_FLAG(std::optional<uint32_t>, vocab, std::nullopt,
          "sample, decode: vocabulary size (required).");
ABSL_FLAG(std::string, dtype, "f32",
          "sample, decode: element type on the wire (and of the --logits file): f32, bf16 or "
          "f16.");
ABSL_FLAG(uint64_t, seed, 0, "sample: seed of the --random logits; decode: of the toy model.");

// --- row history (the same for every row) ---
ABSL_FLAG(std::vector<std::string>, prompt_token_ids, {},
          "sample, decode: prompt token ids of every row / sequence, comma-separated (repetition "
          "penalty, DRY). decode's default: sequence i starts with token i.");
ABSL_FLAG(std::vector<std::string>, output_token_ids, {},
          "sample: tokens generated so far, comma-separated (penalties; its length is the "
          "seeded RNG step).");

// --- SamplingParams: only flags given on the command line are set in the request ---
ABSL_FLAG(std::optional<float>, temperature, std::nullopt, "1.0; 0 = greedy; >= 0.");
ABSL_FLAG(std::optional<int32_t>, top_k, std::nullopt, "0 or -1 = off.");
ABSL_FLAG(std::optional<float>, top_p, std::nullopt, "1.0; (0, 1].");
ABSL_FLAG(std::optional<float>, min_p, std::nullopt, "0; [0, 1].");
ABSL_FLAG(std::optional<float>, repetition_penalty, std::nullopt,
          "1.0; > 0; over prompt and output.");
ABSL_FLAG(std::optional<float>, frequency_penalty, std::nullopt, "0; [-2, 2]; output only.");
ABSL_FLAG(std::optional<float>, presence_penalty, std::nullopt, "0; [-2, 2]; output only.");
ABSL_FLAG(std::optional<uint64_t>, sample_seed, std::nullopt,
          "SamplingParams.seed: seeded, reproducible draws (unset = fresh entropy).");
ABSL_FLAG(std::vector<std::string>, logit_bias, {},
          "token:bias pairs, comma-separated, e.g. 12:-100,7:2.5.");
ABSL_FLAG(std::optional<int32_t>, logprobs, std::nullopt,
          "Number of top logprobs to return; -1 = every token with non-zero probability.");
ABSL_FLAG(std::optional<std::string>, logprobs_mode, std::nullopt,
          "raw_logprobs (default), processed_logprobs, raw_logits or processed_logits.");
ABSL_FLAG(std::optional<float>, typical_p, std::nullopt, "1.0 = off; (0, 1].");
ABSL_FLAG(std::optional<float>, epsilon_cutoff, std::nullopt, "0 = off; [0, 1).");
ABSL_FLAG(std::optional<float>, eta_cutoff, std::nullopt, "0 = off; [0, 1).");
ABSL_FLAG(std::optional<float>, top_n_sigma, std::nullopt, "Off when unset; > 0.");
ABSL_FLAG(std::optional<float>, xtc_threshold, std::nullopt, "0.1; [0, 1].");
ABSL_FLAG(std::optional<float>, xtc_probability, std::nullopt, "0 = off; [0, 1].");
ABSL_FLAG(std::optional<float>, dynatemp_range, std::nullopt, "0 = off; >= 0.");
ABSL_FLAG(std::optional<float>, dynatemp_exponent, std::nullopt, "1.0; > 0.");
ABSL_FLAG(std::optional<int32_t>, mirostat_mode, std::nullopt, "0 = off, 1 or 2.");
ABSL_FLAG(std::optional<float>, mirostat_tau, std::nullopt, "5.0; > 0.");
ABSL_FLAG(std::optional<float>, mirostat_eta, std::nullopt, "0.1; > 0.");
ABSL_FLAG(std::optional<float>, dry_multiplier, std::nullopt, "0 = off; >= 0.");
ABSL_FLAG(std::optional<float>, dry_base, std::nullopt, "1.75; > 1.");
ABSL_FLAG(std::optional<int32_t>, dry_allowed_length, std::nullopt, "2; >= 1.");
ABSL_FLAG(std::optional<int32_t>, dry_penalty_last_n, std::nullopt, "-1 = whole history; 0 = off.");
ABSL_FLAG(std::optional<int32_t>, no_repeat_ngram_size, std::nullopt, "0 = off; >= 0.");
ABSL_FLAG(std::optional<int32_t>, penalty_last_n, std::nullopt, "0 = whole history; >= 0.");
ABSL_FLAG(std::vector<std::string>, allowed_token_ids, {},
          "Only these tokens may be sampled (comma-separated; empty = all).");
ABSL_FLAG(std::vector<std::string>, eos_token_ids, {}, "EOS token ids, comma-separated.");
ABSL_FLAG(std::optional<int32_t>, min_tokens, std::nullopt,
          "0; EOS and stop ids are masked while the output is shorter.");
ABSL_FLAG(std::optional<bool>, ignore_eos, std::nullopt, "false; --ignore_eos=true to set.");
ABSL_FLAG(std::optional<int32_t>, max_tokens, std::nullopt, "Unset = no limit; >= 1.");
ABSL_FLAG(std::vector<std::string>, stop_token_ids, {}, "Stop token ids, comma-separated.");
ABSL_FLAG(std::optional<int32_t>, n, std::nullopt, "1; independent samples per row, [1, 128].");
ABSL_FLAG(std::vector<std::string>, sampler_order, {},
          "Custom stage order, e.g. top_k,top_p,temperature (empty = default order).");
ABSL_FLAG(std::optional<std::string>, preset, std::nullopt,
          "Named preset (greedy, precise, balanced, creative, brainstorm, ...); explicit flags "
          "override it.");

namespace tokensampler::cli {
namespace {

absl::Status BadFlag(absl::string_view flag, absl::string_view rule, absl::string_view value) {
  return absl::InvalidArgumentError(
      absl::StrCat("--", flag, " must be ", rule, ", got \"", value, "\""));
}

// The contents of the file `path` named by --`flag`.
absl::StatusOr<std::string> ReadFile(absl::string_view flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(
        absl::StrCat("--", flag, ": cannot open \"", path, "\": ", std::strerror(errno)));
  }
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) {
    return absl::DataLossError(absl::StrCat("--", flag, ": error reading \"", path, "\""));
  }
  return bytes;
}

absl::Duration TimeoutFromFlags() { return absl::Milliseconds(absl::GetFlag(FLAGS_timeout_ms)); }

absl::StatusOr<Client> ClientFromFlags() {
  if (absl::GetFlag(FLAGS_timeout_ms) <= 0) {
    return BadFlag("timeout_ms", "> 0", absl::StrCat(absl::GetFlag(FLAGS_timeout_ms)));
  }
  ClientOptions options;
  options.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.wait_for_ready = absl::GetFlag(FLAGS_wait_for_ready);
  const std::string ca = absl::GetFlag(FLAGS_tls_ca);
  const std::string cert = absl::GetFlag(FLAGS_tls_cert);
  const std::string key = absl::GetFlag(FLAGS_tls_key);
  if (absl::GetFlag(FLAGS_tls) || !ca.empty() || !cert.empty() || !key.empty()) {
    ClientTlsOptions& tls = options.tls.emplace();
    for (const auto& [flag, path, pem] :
         {std::tuple<const char*, const std::string*, std::string*>{"tls_ca", &ca, &tls.root_certs},
          {"tls_cert", &cert, &tls.cert_chain},
          {"tls_key", &key, &tls.private_key}}) {
      if (path->empty()) continue;
      absl::StatusOr<std::string> pem_or = ReadFile(flag, *path);
      if (!pem_or.ok()) return pem_or.status();
      *pem = *std::move(pem_or);
    }
  }
  const std::string token_file = absl::GetFlag(FLAGS_auth_token_file);
  if (!token_file.empty()) {
    absl::StatusOr<std::string> token = ReadFile("auth_token_file", token_file);
    if (!token.ok()) return token.status();
    // The first non-blank line (the server's file may list several accepted tokens).
    for (absl::string_view line : absl::StrSplit(*token, '\n')) {
      line = absl::StripAsciiWhitespace(line);
      if (!line.empty()) {
        options.bearer_token = std::string(line);
        break;
      }
    }
    if (options.bearer_token.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--auth_token_file: \"", token_file, "\" holds no token"));
    }
  }
  return Client::Create(absl::GetFlag(FLAGS_target), options);
}

// Appends `ids` to a repeated int32 field.
void AddAll(const std::vector<int32_t>& ids, google::protobuf::RepeatedField<int32_t>* field) {
  field->Add(ids.begin(), ids.end());
}

// Parses the token-id list --`flag` into `field`.
absl::Status AddTokenIds(absl::string_view flag, const std::vector<std::string>& items,
                         google::protobuf::RepeatedField<int32_t>* field) {
  absl::StatusOr<std::vector<int32_t>> ids = ParseTokenIds(flag, items);
  if (!ids.ok()) return ids.status();
  AddAll(*ids, field);
  return absl::OkStatus();
}

// Prints `status` as FormatError does and returns the exit code of a failed command.
int Fail(std::ostream& err, const absl::Status& status) {
  err << FormatError(status) << "\n";
  return 1;
}

}  // namespace

absl::StatusOr<v1::DType> ParseDType(absl::string_view name) {
  if (name == "f32" || name == "fp32" || name == "float32") return v1::DTYPE_FLOAT32;
  if (name == "bf16" || name == "bfloat16") return v1::DTYPE_BFLOAT16;
  if (name == "f16" || name == "fp16" || name == "float16") return v1::DTYPE_FLOAT16;
  return BadFlag("dtype", "f32, bf16 or f16", name);
}

absl::StatusOr<v1::LogprobsMode> ParseLogprobsMode(absl::string_view name) {
  if (name == "raw_logprobs") return v1::RAW_LOGPROBS;
  if (name == "processed_logprobs") return v1::PROCESSED_LOGPROBS;
  if (name == "raw_logits") return v1::RAW_LOGITS;
  if (name == "processed_logits") return v1::PROCESSED_LOGITS;
  return BadFlag("logprobs_mode",
                 "raw_logprobs, processed_logprobs, raw_logits or processed_logits", name);
}

absl::StatusOr<std::vector<int32_t>> ParseTokenIds(absl::string_view flag,
                                                   absl::Span<const std::string> items) {
  std::vector<int32_t> ids;
  ids.reserve(items.size());
  for (const std::string& item : items) {
    int32_t id;
    if (!absl::SimpleAtoi(item, &id)) return BadFlag(flag, "a list of int32 token ids", item);
    ids.push_back(id);
  }
  return ids;
}

absl::StatusOr<std::vector<std::pair<int32_t, float>>> ParseLogitBias(
    absl::Span<const std::string> items) {
  std::vector<std::pair<int32_t, float>> bias;
  bias.reserve(items.size());
  for (const std::string& item : items) {
    const std::pair<absl::string_view, absl::string_view> parts =
        absl::StrSplit(item, absl::MaxSplits(':', 1));
    int32_t id;
    float value;
    if (!absl::StrContains(item, ':') || !absl::SimpleAtoi(parts.first, &id) ||
        !absl::SimpleAtof(parts.second, &value)) {
      return BadFlag("logit_bias", "a list of token:bias pairs such as 12:-100", item);
    }
    bias.emplace_back(id, value);
  }
  return bias;
}

absl::StatusOr<std::vector<v1::SamplerStage>> ParseSamplerOrder(
    absl::Span<const std::string> items) {
  std::vector<v1::SamplerStage> stages;
  stages.reserve(items.size());
  for (const std::string& item : items) {
    v1::SamplerStage stage;
    if (item.empty() || absl::AsciiStrToLower(item) != item ||
        !v1::SamplerStage_Parse(absl::StrCat("SAMPLER_STAGE_", absl::AsciiStrToUpper(item)),
                                &stage) ||
        stage == v1::SAMPLER_STAGE_UNSPECIFIED) {
      return BadFlag("sampler_order",
                     "a list of top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, "
                     "top_n_sigma, xtc, temperature",
                     item);
    }
    stages.push_back(stage);
  }
  return stages;
}

absl::StatusOr<v1::SamplingParams> SamplingParamsFromFlags() {
  v1::SamplingParams params;
// Sets params.<field> when --<field> was given.
#define TS_SET_IF_GIVEN(field) \
  if (const auto value = absl::GetFlag(FLAGS_##field); value.has_value()) params.set_##field(*value)

  TS_SET_IF_GIVEN(temperature);
  TS_SET_IF_GIVEN(top_k);
  TS_SET_IF_GIVEN(top_p);
  TS_SET_IF_GIVEN(min_p);
  TS_SET_IF_GIVEN(repetition_penalty);
  TS_SET_IF_GIVEN(frequency_penalty);
  TS_SET_IF_GIVEN(presence_penalty);
  TS_SET_IF_GIVEN(logprobs);
  TS_SET_IF_GIVEN(typical_p);
  TS_SET_IF_GIVEN(epsilon_cutoff);
  TS_SET_IF_GIVEN(eta_cutoff);
  TS_SET_IF_GIVEN(top_n_sigma);
  TS_SET_IF_GIVEN(xtc_threshold);
  TS_SET_IF_GIVEN(xtc_probability);
  TS_SET_IF_GIVEN(dynatemp_range);
  TS_SET_IF_GIVEN(dynatemp_exponent);
  TS_SET_IF_GIVEN(mirostat_mode);
  TS_SET_IF_GIVEN(mirostat_tau);
  TS_SET_IF_GIVEN(mirostat_eta);
  TS_SET_IF_GIVEN(dry_multiplier);
  TS_SET_IF_GIVEN(dry_base);
  TS_SET_IF_GIVEN(dry_allowed_length);
  TS_SET_IF_GIVEN(dry_penalty_last_n);
  TS_SET_IF_GIVEN(no_repeat_ngram_size);
  TS_SET_IF_GIVEN(penalty_last_n);
  TS_SET_IF_GIVEN(min_tokens);
  TS_SET_IF_GIVEN(ignore_eos);
  TS_SET_IF_GIVEN(max_tokens);
  TS_SET_IF_GIVEN(n);
  TS_SET_IF_GIVEN(preset);
#undef TS_SET_IF_GIVEN

  if (const auto seed = absl::GetFlag(FLAGS_sample_seed); seed.has_value()) params.set_seed(*seed);
  if (const auto mode = absl::GetFlag(FLAGS_logprobs_mode); mode.has_value()) {
    absl::StatusOr<v1::LogprobsMode> parsed = ParseLogprobsMode(*mode);
    if (!parsed.ok()) return parsed.status();
    params.set_logprobs_mode(*parsed);
  }

  absl::StatusOr<std::vector<std::pair<int32_t, float>>> bias =
      ParseLogitBias(absl::GetFlag(FLAGS_logit_bias));
  if (!bias.ok()) return bias.status();
  for (const auto& [id, value] : *bias) (*params.mutable_logit_bias())[id] = value;

  absl::Status status = AddTokenIds("allowed_token_ids", absl::GetFlag(FLAGS_allowed_token_ids),
                                    params.mutable_allowed_token_ids());
  if (status.ok()) {
    status = AddTokenIds("eos_token_ids", absl::GetFlag(FLAGS_eos_token_ids),
                         params.mutable_eos_token_ids());
  }
  if (status.ok()) {
    status = AddTokenIds("stop_token_ids", absl::GetFlag(FLAGS_stop_token_ids),
                         params.mutable_stop_token_ids());
  }
  if (!status.ok()) return status;

  absl::StatusOr<std::vector<v1::SamplerStage>> order =
      ParseSamplerOrder(absl::GetFlag(FLAGS_sampler_order));
  if (!order.ok()) return order.status();
  for (v1::SamplerStage stage : *order) params.add_sampler_order(stage);
  return params;
}

absl::StatusOr<v1::Logits> LogitsFromFlags() {
  const std::string path = absl::GetFlag(FLAGS_logits);
  const bool random = absl::GetFlag(FLAGS_random);
  if (path.empty() == !random) {
    return absl::InvalidArgumentError("exactly one of --logits FILE or --random is required");
  }
  const std::optional<uint32_t> vocab = absl::GetFlag(FLAGS_vocab);
  if (!vocab.has_value()) return absl::InvalidArgumentError("--vocab is required");
  if (*vocab == 0) return BadFlag("vocab", "> 0", "0");
  absl::StatusOr<v1::DType> dtype = ParseDType(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) return dtype.status();
  const std::optional<uint32_t> rows = absl::GetFlag(FLAGS_rows);

  if (random) {
    if (rows.has_value() && *rows == 0) return BadFlag("rows", "> 0", "0");
    const std::vector<float> values =
        RandomLogits(rows.value_or(1), *vocab, absl::GetFlag(FLAGS_seed));
    return MakeLogits(values, *vocab, *dtype);
  }

  absl::StatusOr<std::string> bytes = ReadFile("logits", path);
  if (!bytes.ok()) return bytes.status();
  absl::StatusOr<v1::Logits> logits = MakeLogitsFromBytes(*bytes, *vocab, *dtype);
  if (!logits.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--logits \"", path, "\": ", logits.status().message()));
  }
  if (logits->rows() == 0) {
    return absl::InvalidArgumentError(absl::StrCat("--logits \"", path, "\" is empty"));
  }
  if (rows.has_value() && *rows != logits->rows()) {
    return absl::InvalidArgumentError(absl::StrCat("--logits \"", path, "\" holds ", logits->rows(),
                                                   " rows of --vocab ", *vocab, ", but --rows is ",
                                                   *rows));
  }
  return logits;
}

absl::StatusOr<v1::SampleRequest> SampleRequestFromFlags() {
  absl::StatusOr<v1::Logits> logits = LogitsFromFlags();
  if (!logits.ok()) return logits.status();
  absl::StatusOr<v1::SamplingParams> params = SamplingParamsFromFlags();
  if (!params.ok()) return params.status();
  absl::StatusOr<std::vector<int32_t>> prompt =
      ParseTokenIds("prompt_token_ids", absl::GetFlag(FLAGS_prompt_token_ids));
  if (!prompt.ok()) return prompt.status();
  absl::StatusOr<std::vector<int32_t>> output =
      ParseTokenIds("output_token_ids", absl::GetFlag(FLAGS_output_token_ids));
  if (!output.ok()) return output.status();

  v1::SampleRequest request;
  const uint32_t rows = logits->rows();
  *request.mutable_logits() = *std::move(logits);
  request.mutable_rows()->Reserve(static_cast<int>(rows));
  for (uint32_t i = 0; i < rows; ++i) {
    v1::SampleRow* row = request.add_rows();
    *row->mutable_params() = *params;
    AddAll(*prompt, row->mutable_prompt_token_ids());
    AddAll(*output, row->mutable_output_token_ids());
  }
  return request;
}

std::string FinishReasonName(v1::FinishReason reason) {
  if (reason == v1::FINISH_REASON_UNSPECIFIED) return "none";
  if (!v1::FinishReason_IsValid(reason)) return absl::StrCat(static_cast<int>(reason));
  return std::string(absl::StripPrefix(v1::FinishReason_Name(reason), "FINISH_REASON_"));
}

namespace {

// The fields v1::SampledToken and v1::SequenceResult share (same names), as FormatResult prints
// them after the "row r sample s" / "step s sequence id" prefix.
template <typename Result>
void AppendResult(const Result& result, bool with_logprobs, std::string& line) {
  absl::StrAppend(&line, ": token ", result.token_id());
  if (with_logprobs) absl::StrAppend(&line, " logprob ", result.logprob());
  if (!result.top_logprobs().empty()) {
    absl::StrAppend(&line, " [top:");
    for (const v1::TokenLogprob& top : result.top_logprobs()) {
      absl::StrAppend(&line, " ", top.token_id(), ":", top.logprob());
    }
    absl::StrAppend(&line, "]");
  }
  absl::StrAppend(&line, " finish=", FinishReasonName(result.finish_reason()));
  if (result.has_stop_token_id()) {
    absl::StrAppend(&line, " stop_token_id=", result.stop_token_id());
  } else if (result.has_stop_sequence_index()) {
    absl::StrAppend(&line, " stop_sequence_index=", result.stop_sequence_index());
  }
  if (result.has_mirostat_mu()) absl::StrAppend(&line, " mirostat_mu=", result.mirostat_mu());
}

}  // namespace

std::string FormatResult(const v1::SampledToken& result, bool with_logprobs) {
  std::string line = absl::StrCat("row ", result.row_index(), " sample ", result.sample_index());
  AppendResult(result, with_logprobs, line);
  return line;
}

std::string FormatSequenceResult(int step, const v1::SequenceResult& result, bool with_logprobs) {
  std::string line = absl::StrCat("step ", step, " sequence ", result.sequence_id());
  AppendResult(result, with_logprobs, line);
  return line;
}

std::string FormatResponseText(const v1::SampleResponse& response, bool with_logprobs) {
  std::string text;
  for (const v1::SampledToken& result : response.results()) {
    absl::StrAppend(&text, FormatResult(result, with_logprobs), "\n");
  }
  return text;
}

absl::StatusOr<std::string> FormatResponseJson(const google::protobuf::Message& response) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(response, &json, options);
  if (!status.ok()) {
    return absl::InternalError(absl::StrCat("printing JSON failed: ", status.ToString()));
  }
  json.push_back('\n');
  return json;
}

std::string FormatError(const absl::Status& status) {
  return absl::StrCat("error: ", absl::StatusCodeToString(status.code()), ": ", status.message());
}

int RunSample(std::ostream& out, std::ostream& err) {
  absl::StatusOr<v1::SampleRequest> request = SampleRequestFromFlags();
  if (!request.ok()) return Fail(err, request.status());
  absl::StatusOr<Client> client = ClientFromFlags();
  if (!client.ok()) return Fail(err, client.status());
  absl::StatusOr<v1::SampleResponse> response = client->Sample(*request, TimeoutFromFlags());
  if (!response.ok()) return Fail(err, response.status());
  if (!absl::GetFlag(FLAGS_json)) {
    out << FormatResponseText(*response, absl::GetFlag(FLAGS_logprobs).has_value());
    return 0;
  }
  absl::StatusOr<std::string> json = FormatResponseJson(*response);
  if (!json.ok()) return Fail(err, json.status());
  out << *json;
  return 0;
}

namespace {

// Waits for `future` until `timeout`; DEADLINE_EXCEEDED if it is not ready by then.
template <typename T>
absl::StatusOr<T> Await(std::future<T>& future, absl::Duration timeout) {
  if (future.wait_for(absl::ToChronoMilliseconds(timeout)) != std::future_status::ready) {
    return absl::DeadlineExceededError(
        absl::StrCat("no answer from the server within ", absl::FormatDuration(timeout)));
  }
  return future.get();
}

// Sends `request` on `session` and waits (until `timeout`) for its answer: the response, or the
// error of the request or of the wait.
absl::StatusOr<v1::SessionResponse> Exchange(SessionClient& session, v1::SessionRequest request,
                                             absl::Duration timeout) {
  std::future<absl::StatusOr<v1::SessionResponse>> answer = session.Send(std::move(request));
  absl::StatusOr<absl::StatusOr<v1::SessionResponse>> response = Await(answer, timeout);
  if (!response.ok()) return response.status();
  return *std::move(response);
}

// Exchange for a decode step; with `json`, also prints the response as one line to `out`.
absl::StatusOr<v1::SessionResponse> ExchangeStep(SessionClient& session, v1::SessionRequest request,
                                                 absl::Duration timeout, bool json,
                                                 std::ostream& out) {
  absl::StatusOr<v1::SessionResponse> response = Exchange(session, std::move(request), timeout);
  if (!response.ok() || !json) return response;
  absl::StatusOr<std::string> line = FormatResponseJson(*response);
  if (!line.ok()) return line.status();
  out << *line;
  return response;
}

// The toy model's next-token logits for a sequence whose prompt + output is `history`.
std::vector<float> ToyRow(uint64_t seed, const std::vector<int32_t>& history, uint32_t vocab) {
  const size_t size = history.size();
  return ToyModelLogits(seed, size >= 2 ? history[size - 2] : -1, history[size - 1], vocab);
}

// What both decode loops read from the flags besides the sampling and beam parameters.
struct DecodeFlags {
  std::vector<int32_t> prompt;  // --prompt_token_ids (empty: see PromptOf)
  Client client;
  absl::Duration timeout;
  bool json = false;
  uint64_t seed = 0;  // the toy model's

  // Sequence i's prompt: --prompt_token_ids, or else the single token i % vocab.
  std::vector<int32_t> PromptOf(uint32_t i, uint32_t vocab) const {
    return prompt.empty() ? std::vector<int32_t>{static_cast<int32_t>(i % vocab)} : prompt;
  }
};

absl::StatusOr<DecodeFlags> DecodeFlagsFromFlags() {
  absl::StatusOr<std::vector<int32_t>> prompt =
      ParseTokenIds("prompt_token_ids", absl::GetFlag(FLAGS_prompt_token_ids));
  if (!prompt.ok()) return prompt.status();
  absl::StatusOr<Client> client = ClientFromFlags();
  if (!client.ok()) return client.status();
  return DecodeFlags{*std::move(prompt), *std::move(client), TimeoutFromFlags(),
                     absl::GetFlag(FLAGS_json), absl::GetFlag(FLAGS_seed)};
}

// A step request of `rows` (vocab `vocab`, sent as `dtype`) for `ids`.
absl::StatusOr<v1::SessionRequest> StepRequest(const std::vector<float>& rows, uint32_t vocab,
                                               v1::DType dtype, const std::vector<uint64_t>& ids) {
  absl::StatusOr<v1::Logits> logits = MakeLogits(rows, vocab, dtype);
  if (!logits.ok()) return logits.status();
  v1::SessionRequest request;
  *request.mutable_step()->mutable_logits() = *std::move(logits);
  request.mutable_step()->mutable_sequence_ids()->Add(ids.begin(), ids.end());
  return request;
}

}  // namespace

std::string FormatBeamResult(int step, const v1::SequenceResult& result) {
  std::string text;
  for (int i = 0; i < result.beams_size(); ++i) {
    const v1::BeamSlot& slot = result.beams(i);
    absl::StrAppend(&text, "step ", step, " sequence ", result.sequence_id(), " beam ", i,
                    ": parent ", slot.parent_beam(), " token ", slot.token_id(), " score ",
                    absl::StrFormat("%.4f", slot.cumulative_score()), "\n");
  }
  for (int i = 0; i < result.hypotheses_size(); ++i) {
    const v1::BeamHypothesis& h = result.hypotheses(i);
    absl::StrAppend(&text, "sequence ", result.sequence_id(), " hypothesis ", i, ": ",
                    absl::StrJoin(h.token_ids(), " "),
                    " score=", absl::StrFormat("%.4f", h.score()),
                    " finish=", FinishReasonName(h.finish_reason()), "\n");
  }
  return text;
}

absl::StatusOr<std::optional<v1::BeamSearchParams>> BeamParamsFromFlags() {
  const std::optional<uint32_t> width = absl::GetFlag(FLAGS_beam_width);
  const std::optional<float> length_penalty = absl::GetFlag(FLAGS_length_penalty);
  const std::optional<std::string> early_stopping = absl::GetFlag(FLAGS_early_stopping);
  const std::optional<uint32_t> num_return = absl::GetFlag(FLAGS_num_return_sequences);
  const std::optional<uint32_t> groups = absl::GetFlag(FLAGS_num_beam_groups);
  const std::optional<float> diversity = absl::GetFlag(FLAGS_diversity_penalty);
  const bool do_sample = absl::GetFlag(FLAGS_do_sample);
  if (!width.has_value()) {
    if (length_penalty || early_stopping || num_return || groups || diversity || do_sample) {
      return absl::InvalidArgumentError(
          "--length_penalty, --early_stopping, --num_return_sequences, --num_beam_groups, "
          "--diversity_penalty and --do_sample need --beam_width");
    }
    return std::nullopt;
  }
  v1::BeamSearchParams beam;
  beam.set_beam_width(*width);  // the server checks the range
  if (length_penalty.has_value()) beam.set_length_penalty(*length_penalty);
  if (early_stopping.has_value()) {
    if (*early_stopping == "true") {
      beam.set_early_stopping(v1::EARLY_STOPPING_TRUE);
    } else if (*early_stopping == "heuristic") {
      beam.set_early_stopping(v1::EARLY_STOPPING_HEURISTIC);
    } else if (*early_stopping == "never") {
      beam.set_early_stopping(v1::EARLY_STOPPING_NEVER);
    } else {
      return BadFlag("early_stopping", "one of true, heuristic, never", *early_stopping);
    }
  }
  if (num_return.has_value()) beam.set_num_return_sequences(*num_return);
  if (groups.has_value()) beam.set_num_beam_groups(*groups);
  if (diversity.has_value()) beam.set_diversity_penalty(*diversity);
  beam.set_do_sample(do_sample);
  return beam;
}

namespace {

// `decode --beam_width`: each sequence is a beam search; the worker side (this loop) keeps one
// history per live beam and reorders them by parent_beam after every step, as a model worker
// reorders its KV cache.
int RunBeamDecode(std::ostream& out, std::ostream& err, const v1::SamplingParams& params,
                  const v1::BeamSearchParams& beam, uint32_t vocab, v1::DType dtype) {
  const uint32_t sequences = absl::GetFlag(FLAGS_sequences);
  const uint32_t steps = absl::GetFlag(FLAGS_steps);
  absl::StatusOr<DecodeFlags> flags = DecodeFlagsFromFlags();
  if (!flags.ok()) return Fail(err, flags.status());
  const absl::Duration timeout = flags->timeout;
  const bool json = flags->json;
  const uint64_t seed = flags->seed;

  std::unique_ptr<SessionClient> session = SessionClient::Open(flags->client);
  // Per live search: the history (prompt + output) of each live beam, in slot order.
  std::map<uint64_t, std::vector<std::vector<int32_t>>> beams;
  v1::SessionRequest start;
  for (uint32_t i = 0; i < sequences; ++i) {
    v1::AddSequence& add = *start.add_add();
    add.set_sequence_id(i);
    *add.mutable_params() = params;
    *add.mutable_beam() = beam;
    std::vector<int32_t> history = flags->PromptOf(i, vocab);
    add.mutable_prompt_token_ids()->Add(history.begin(), history.end());
    beams[i] = {history};  // one row (the prompt) at the first step
  }
  if (absl::StatusOr<v1::SessionResponse> r = Exchange(*session, std::move(start), timeout);
      !r.ok()) {
    return Fail(err, r.status());
  }
  for (uint32_t step = 0; step < steps && !beams.empty(); ++step) {
    std::vector<uint64_t> ids;
    std::vector<float> rows;
    for (const auto& [id, histories] : beams) {
      ids.push_back(id);
      for (const std::vector<int32_t>& history : histories) {
        const std::vector<float> row = ToyRow(seed, history, vocab);
        rows.insert(rows.end(), row.begin(), row.end());
      }
    }
    absl::StatusOr<v1::SessionRequest> request = StepRequest(rows, vocab, dtype, ids);
    if (!request.ok()) return Fail(err, request.status());
    absl::StatusOr<v1::SessionResponse> response =
        ExchangeStep(*session, *std::move(request), timeout, json, out);
    if (!response.ok()) return Fail(err, response.status());
    for (const v1::SequenceResult& result : response->results()) {
      if (!json) out << FormatBeamResult(static_cast<int>(step), result);
      std::vector<std::vector<int32_t>>& histories = beams[result.sequence_id()];
      std::vector<std::vector<int32_t>> next;
      for (const v1::BeamSlot& slot : result.beams()) {
        next.push_back(histories.at(slot.parent_beam()));
        next.back().push_back(slot.token_id());
      }
      histories = std::move(next);
      if (result.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        beams.erase(result.sequence_id());
      }
    }
  }
  if (!json) {
    for (const auto& [id, histories] : beams) {
      out << "sequence " << id << ": search not finished after " << steps << " steps ("
          << histories.size() << " live beams)\n";
    }
  }
  if (absl::Status closed = session->Close(); !closed.ok()) return Fail(err, closed);
  return 0;
}

}  // namespace

namespace {

// The draft model's proposals for one sequence (decode --speculative): k tokens drawn one after
// the other from softmax(ToyDraftLogits) with `gen` (or its argmax for greedy decoding, sent as
// point masses), and the k + 1 target rows (after the history, then after each draft).
struct SpeculativeProposal {
  std::vector<int32_t> drafts;
  std::vector<float> draft_probs;  // k × vocab, empty when greedy
  std::vector<float> target_rows;  // (k + 1) × vocab
};

SpeculativeProposal Propose(uint64_t seed, std::vector<int32_t> path, uint32_t k, uint32_t vocab,
                            bool greedy, std::mt19937_64& gen) {
  SpeculativeProposal proposal;
  const auto context = [&](size_t back) -> int64_t {
    return path.size() > back ? path[path.size() - 1 - back] : -1;
  };
  for (uint32_t j = 0; j <= k; ++j) {
    const std::vector<float> target = ToyRow(seed, path, vocab);
    proposal.target_rows.insert(proposal.target_rows.end(), target.begin(), target.end());
    if (j == k) break;
    const std::vector<float> draft = ToyDraftLogits(seed, context(1), context(0), vocab);
    const float max = *std::max_element(draft.begin(), draft.end());
    int32_t token =
        static_cast<int32_t>(std::max_element(draft.begin(), draft.end()) - draft.begin());
    if (!greedy) {
      std::vector<double> q(draft.size());
      double total = 0.0;
      for (size_t i = 0; i < draft.size(); ++i) {
        total += q[i] = std::exp(static_cast<double>(draft[i]) - max);
      }
      // 53 random bits → [0, 1), then the inverse CDF.
      const double u = static_cast<double>(gen() >> 11) * 0x1.0p-53 * total;
      double cumulative = 0.0;
      for (size_t i = 0; i < q.size(); ++i) {
        cumulative += q[i];
        if (u < cumulative || i + 1 == q.size()) {
          token = static_cast<int32_t>(i);
          break;
        }
      }
      for (double x : q) proposal.draft_probs.push_back(static_cast<float>(x / total));
    }
    proposal.drafts.push_back(token);
    path.push_back(token);
  }
  return proposal;
}

}  // namespace

int RunDecode(std::ostream& out, std::ostream& err) {
  const std::optional<uint32_t> vocab = absl::GetFlag(FLAGS_vocab);
  if (!vocab.has_value()) return Fail(err, absl::InvalidArgumentError("--vocab is required"));
  if (*vocab == 0) return Fail(err, BadFlag("vocab", "> 0", "0"));
  const uint32_t sequences = absl::GetFlag(FLAGS_sequences);
  if (sequences == 0) return Fail(err, BadFlag("sequences", "> 0", "0"));
  const uint32_t steps = absl::GetFlag(FLAGS_steps);
  if (steps == 0) return Fail(err, BadFlag("steps", "> 0", "0"));
  if (!absl::GetFlag(FLAGS_output_token_ids).empty() || !absl::GetFlag(FLAGS_logits).empty() ||
      absl::GetFlag(FLAGS_random) || absl::GetFlag(FLAGS_rows).has_value()) {
    return Fail(err, absl::InvalidArgumentError(
                         "decode takes no --logits, --random, --rows or --output_token_ids: the "
                         "toy model makes the logits and the server keeps the history"));
  }
  absl::StatusOr<v1::DType> dtype = ParseDType(absl::GetFlag(FLAGS_dtype));
  if (!dtype.ok()) return Fail(err, dtype.status());
  absl::StatusOr<v1::SamplingParams> params = SamplingParamsFromFlags();
  if (!params.ok()) return Fail(err, params.status());
  absl::StatusOr<std::optional<v1::BeamSearchParams>> beam = BeamParamsFromFlags();
  if (!beam.ok()) return Fail(err, beam.status());
  if (beam->has_value()) {
    if (absl::GetFlag(FLAGS_speculative) > 0) {
      return Fail(err, absl::InvalidArgumentError(
                           "--speculative cannot be combined with --beam_width (drafts are "
                           "verified for plain sequences only)"));
    }
    if (params->has_n()) {
      return Fail(err, absl::InvalidArgumentError("--n cannot be combined with --beam_width (use "
                                                  "--num_return_sequences for more hypotheses)"));
    }
    return RunBeamDecode(out, err, *params, **beam, *vocab, *dtype);
  }
  // --n samples of a sequence are the sequence and n - 1 forks of it.
  const int32_t n = params->has_n() ? params->n() : 1;
  if (n < 1) return Fail(err, BadFlag("n", ">= 1", absl::StrCat(n)));
  params->clear_n();
  absl::StatusOr<DecodeFlags> flags = DecodeFlagsFromFlags();
  if (!flags.ok()) return Fail(err, flags.status());
  const absl::Duration timeout = flags->timeout;
  const bool json = flags->json;
  const bool with_logprobs = params->has_logprobs();
  const uint64_t seed = flags->seed;

  // Sequence i is id i·n; its forks are i·n + 1 … i·n + n - 1. One request adds and forks all.
  std::unique_ptr<SessionClient> session = SessionClient::Open(flags->client);
  std::map<uint64_t, std::vector<int32_t>> histories;  // prompt + output of live sequences
  std::map<uint64_t, std::pair<std::vector<int32_t>, std::string>> done;  // output, finish
  v1::SessionRequest start;
  for (uint32_t i = 0; i < sequences; ++i) {
    const uint64_t id = uint64_t{i} * static_cast<uint64_t>(n);
    v1::AddSequence& add = *start.add_add();
    add.set_sequence_id(id);
    *add.mutable_params() = *params;
    std::vector<int32_t> history = flags->PromptOf(i, *vocab);
    add.mutable_prompt_token_ids()->Add(history.begin(), history.end());
    if (n > 1) start.add_fork()->set_parent_id(id);
    for (int32_t k = 0; k < n; ++k) {
      if (k > 0)
        start.mutable_fork(start.fork_size() - 1)->add_child_ids(id + static_cast<uint64_t>(k));
      histories[id + static_cast<uint64_t>(k)] = history;
    }
  }
  const size_t prompt_size = histories.begin()->second.size();
  if (absl::StatusOr<v1::SessionResponse> r = Exchange(*session, std::move(start), timeout);
      !r.ok()) {
    return Fail(err, r.status());
  }

  const uint32_t speculative = absl::GetFlag(FLAGS_speculative);
  const bool greedy = params->has_temperature() && params->temperature() < 1e-5f;
  std::mt19937_64 draft_gen(seed);  // the draft model's own draws
  uint64_t drafted = 0, accepted = 0, emitted = 0, verifications = 0;
  for (uint32_t step = 0; step < steps && !histories.empty(); ++step) {
    // The toy model: each live sequence's next-token logits from its last two tokens (with
    // --speculative: k + 1 rows, after the history and after each of the k drafts).
    std::vector<uint64_t> ids;
    std::vector<float> rows;
    std::vector<v1::SequenceDrafts> drafts_of_step;
    for (const auto& [id, history] : histories) {
      ids.push_back(id);
      SpeculativeProposal proposal = Propose(seed, history, speculative, *vocab, greedy, draft_gen);
      rows.insert(rows.end(), proposal.target_rows.begin(), proposal.target_rows.end());
      if (speculative == 0) continue;
      v1::SequenceDrafts& drafts = drafts_of_step.emplace_back();
      drafts.set_sequence_id(id);
      drafts.mutable_draft_token_ids()->Add(proposal.drafts.begin(), proposal.drafts.end());
      if (!proposal.draft_probs.empty()) {
        absl::StatusOr<v1::Logits> probs =
            MakeLogits(proposal.draft_probs, *vocab, v1::DTYPE_FLOAT32);
        if (!probs.ok()) return Fail(err, probs.status());
        *drafts.mutable_draft_probs() = *std::move(probs);
      }
    }
    absl::StatusOr<v1::SessionRequest> request = StepRequest(rows, *vocab, *dtype, ids);
    if (!request.ok()) return Fail(err, request.status());
    for (v1::SequenceDrafts& drafts : drafts_of_step) {
      *request->mutable_step()->add_drafts() = std::move(drafts);
    }
    absl::StatusOr<v1::SessionResponse> response =
        ExchangeStep(*session, *std::move(request), timeout, json, out);
    if (!response.ok()) return Fail(err, response.status());
    for (const v1::SequenceResult& result : response->results()) {
      std::vector<int32_t>& history = histories[result.sequence_id()];
      if (speculative > 0) {
        const v1::VerifyResult& verify = result.verify();
        if (!json) {
          out << "step " << step << " sequence " << result.sequence_id() << ": accepted "
              << verify.num_accepted() << "/" << speculative << " tokens "
              << absl::StrJoin(verify.token_ids(), " ")
              << " finish=" << FinishReasonName(result.finish_reason()) << "\n";
        }
        history.insert(history.end(), verify.token_ids().begin(), verify.token_ids().end());
        drafted += speculative;
        accepted += verify.num_accepted();
        emitted += static_cast<uint64_t>(verify.token_ids_size());
        ++verifications;
      } else {
        if (!json) {
          out << FormatSequenceResult(static_cast<int>(step), result, with_logprobs) << "\n";
        }
        history.push_back(result.token_id());
      }
      if (result.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        done[result.sequence_id()] = {
            std::vector<int32_t>(history.begin() + static_cast<std::ptrdiff_t>(prompt_size),
                                 history.end()),
            FinishReasonName(result.finish_reason())};
        histories.erase(result.sequence_id());
      }
    }
  }
  for (const auto& [id, history] : histories) {
    done[id] = {std::vector<int32_t>(history.begin() + static_cast<std::ptrdiff_t>(prompt_size),
                                     history.end()),
                "none"};
  }
  if (!json) {
    for (const auto& [id, output] : done) {
      out << "sequence " << id << ": " << absl::StrJoin(output.first, " ")
          << " finish=" << output.second << "\n";
    }
  }
  if (!json && speculative > 0 && drafted > 0) {
    out << absl::StrFormat(
        "acceptance rate: %.3f (%d of %d drafts accepted; %.2f tokens per verification)\n",
        static_cast<double>(accepted) / static_cast<double>(drafted), accepted, drafted,
        static_cast<double>(emitted) / static_cast<double>(verifications));
  }
  // Unfinished sequences are released with the stream.
  if (absl::Status closed = session->Close(); !closed.ok()) return Fail(err, closed);
  return 0;
}

int RunHealth(std::ostream& out, std::ostream& err) {
  absl::StatusOr<Client> client = ClientFromFlags();
  if (!client.ok()) return Fail(err, client.status());
  absl::StatusOr<bool> serving = client->Health(absl::GetFlag(FLAGS_service), TimeoutFromFlags());
  if (!serving.ok()) return Fail(err, serving.status());
  out << (*serving ? "SERVING" : "NOT_SERVING") << "\n";
  return *serving ? 0 : 1;
}

}  // namespace tokensampler::cli
