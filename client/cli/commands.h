// The `tokensampler` CLI: its flags, the request they build, the output it prints, and the
// `sample` / `decode` / `health` subcommands. main.cc only parses the command line and dispatches
// here.
//
// Flags are process-wide absl flags (declared below so tests can set them with absl::SetFlag).
// Every sampling parameter flag is optional-typed: a flag that is not given leaves the proto
// field unset, so the server applies its default (or the --preset's value); an explicit value,
// even an out-of-range one, is sent as given and the server answers INVALID_ARGUMENT.
//
// Thread-safety: the *FromFlags functions and Run* read global flags: call them from one thread.
// The parsers and formatters are pure functions: thread-safe.
#ifndef TOKENSAMPLER_CLIENT_CLI_COMMANDS_H_
#define TOKENSAMPLER_CLIENT_CLI_COMMANDS_H_

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "tokensampler/v1/sampler.pb.h"

// Connection and output.
ABSL_DECLARE_FLAG(std::string, target);
ABSL_DECLARE_FLAG(int64_t, timeout_ms);
ABSL_DECLARE_FLAG(int32_t, max_message_bytes);
ABSL_DECLARE_FLAG(bool, wait_for_ready);
ABSL_DECLARE_FLAG(bool, tls);
ABSL_DECLARE_FLAG(std::string, tls_ca);
ABSL_DECLARE_FLAG(std::string, tls_cert);
ABSL_DECLARE_FLAG(std::string, tls_key);
ABSL_DECLARE_FLAG(std::string, auth_token_file);
ABSL_DECLARE_FLAG(bool, json);
ABSL_DECLARE_FLAG(std::string, service);
ABSL_DECLARE_FLAG(uint32_t, sequences);
ABSL_DECLARE_FLAG(uint32_t, steps);

// Logits source.
ABSL_DECLARE_FLAG(std::string, logits);
ABSL_DECLARE_FLAG(bool, random);
ABSL_DECLARE_FLAG(std::optional<uint32_t>, rows);
ABSL_DECLARE_FLAG(std::optional<uint32_t>, vocab);
ABSL_DECLARE_FLAG(std::string, dtype);
ABSL_DECLARE_FLAG(uint64_t, seed);

// Row history.
ABSL_DECLARE_FLAG(std::vector<std::string>, prompt_token_ids);
ABSL_DECLARE_FLAG(std::vector<std::string>, output_token_ids);

// SamplingParams (names as in the proto; --sample_seed is SamplingParams.seed).
ABSL_DECLARE_FLAG(std::optional<float>, temperature);
ABSL_DECLARE_FLAG(std::optional<int32_t>, top_k);
ABSL_DECLARE_FLAG(std::optional<float>, top_p);
ABSL_DECLARE_FLAG(std::optional<float>, min_p);
ABSL_DECLARE_FLAG(std::optional<float>, repetition_penalty);
ABSL_DECLARE_FLAG(std::optional<float>, frequency_penalty);
ABSL_DECLARE_FLAG(std::optional<float>, presence_penalty);
ABSL_DECLARE_FLAG(std::optional<uint64_t>, sample_seed);
ABSL_DECLARE_FLAG(std::vector<std::string>, logit_bias);
ABSL_DECLARE_FLAG(std::optional<int32_t>, logprobs);
ABSL_DECLARE_FLAG(std::optional<std::string>, logprobs_mode);
ABSL_DECLARE_FLAG(std::optional<float>, typical_p);
ABSL_DECLARE_FLAG(std::optional<float>, epsilon_cutoff);
ABSL_DECLARE_FLAG(std::optional<float>, eta_cutoff);
ABSL_DECLARE_FLAG(std::optional<float>, top_n_sigma);
ABSL_DECLARE_FLAG(std::optional<float>, xtc_threshold);
ABSL_DECLARE_FLAG(std::optional<float>, xtc_probability);
ABSL_DECLARE_FLAG(std::optional<float>, dynatemp_range);
ABSL_DECLARE_FLAG(std::optional<float>, dynatemp_exponent);
ABSL_DECLARE_FLAG(std::optional<int32_t>, mirostat_mode);
ABSL_DECLARE_FLAG(std::optional<float>, mirostat_tau);
ABSL_DECLARE_FLAG(std::optional<float>, mirostat_eta);
ABSL_DECLARE_FLAG(std::optional<float>, dry_multiplier);
ABSL_DECLARE_FLAG(std::optional<float>, dry_base);
ABSL_DECLARE_FLAG(std::optional<int32_t>, dry_allowed_length);
ABSL_DECLARE_FLAG(std::optional<int32_t>, dry_penalty_last_n);
ABSL_DECLARE_FLAG(std::optional<int32_t>, no_repeat_ngram_size);
ABSL_DECLARE_FLAG(std::optional<int32_t>, penalty_last_n);
ABSL_DECLARE_FLAG(std::vector<std::string>, allowed_token_ids);
ABSL_DECLARE_FLAG(std::vector<std::string>, eos_token_ids);
ABSL_DECLARE_FLAG(std::optional<int32_t>, min_tokens);
ABSL_DECLARE_FLAG(std::optional<bool>, ignore_eos);
ABSL_DECLARE_FLAG(std::optional<int32_t>, max_tokens);
ABSL_DECLARE_FLAG(std::vector<std::string>, stop_token_ids);
ABSL_DECLARE_FLAG(std::optional<int32_t>, n);
ABSL_DECLARE_FLAG(std::vector<std::string>, sampler_order);
ABSL_DECLARE_FLAG(std::optional<std::string>, preset);

namespace tokensampler::cli {

// --- parsers (pure) ---

// "f32" / "fp32" / "float32", "bf16" / "bfloat16", "f16" / "fp16" / "float16".
// Returns INVALID_ARGUMENT naming --dtype and the value otherwise.
absl::StatusOr<v1::DType> ParseDType(absl::string_view name);

// "raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits".
// Returns INVALID_ARGUMENT naming --logprobs_mode and the value otherwise.
absl::StatusOr<v1::LogprobsMode> ParseLogprobsMode(absl::string_view name);

// Integers of a list flag (`--stop_token_ids=2,7`). Returns INVALID_ARGUMENT naming `--flag` and
// the item that is not an int32. Range checks against the vocabulary are the server's.
absl::StatusOr<std::vector<int32_t>> ParseTokenIds(absl::string_view flag,
                                                   absl::Span<const std::string> items);

// `--logit_bias=12:-100,7:2.5`: token id → bias. Returns INVALID_ARGUMENT naming --logit_bias and
// the malformed item.
absl::StatusOr<std::vector<std::pair<int32_t, float>>> ParseLogitBias(
    absl::Span<const std::string> items);

// `--sampler_order=top_k,top_p,temperature`: stage names as in the proto without the prefix
// (top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, top_n_sigma, xtc, temperature).
// Returns INVALID_ARGUMENT naming --sampler_order and the unknown name.
absl::StatusOr<std::vector<v1::SamplerStage>> ParseSamplerOrder(
    absl::Span<const std::string> items);

// --- requests from flags ---

// The SamplingParams with exactly the explicitly given parameter flags set.
// Returns INVALID_ARGUMENT for a malformed flag value (parse errors only; ranges are checked by
// the server so that its messages are the ones users see).
absl::StatusOr<v1::SamplingParams> SamplingParamsFromFlags();

// The logits tensor: --logits FILE (raw little-endian --dtype values, rows = size / (vocab ×
// element size), checked against --rows when given) or --random (RandomLogits(--rows (default 1),
// --vocab, --seed) encoded as --dtype). Exactly one of the two, and --vocab, are required.
// Returns INVALID_ARGUMENT for missing or inconsistent flags, NOT_FOUND when FILE cannot be read.
absl::StatusOr<v1::Logits> LogitsFromFlags();

// The whole request: LogitsFromFlags() plus one row per logits row, each with
// SamplingParamsFromFlags() and the --prompt_token_ids / --output_token_ids history.
absl::StatusOr<v1::SampleRequest> SampleRequestFromFlags();

// --- output (pure) ---

// "FINISH_REASON_EOS" → "EOS"; FINISH_REASON_UNSPECIFIED → "none".
std::string FinishReasonName(v1::FinishReason reason);

// One line, no newline:
// `row 0 sample 0: token 1234 logprob -0.53 [top: 1234:-0.53 77:-1.9] finish=none`.
// `logprob` appears only with `with_logprobs` (the server fills it only when the request set
// `logprobs`; otherwise it is a meaningless 0), the top list only when the result has
// top_logprobs. STOP names what matched (`finish=STOP stop_token_id=7`); mirostat rows add
// `mirostat_mu=...`.
std::string FormatResult(const v1::SampledToken& result, bool with_logprobs);

// One line, no newline, like FormatResult for a Session step:
// `step 3 sequence 7: token 1234 logprob -0.53 [top: 1234:-0.53 77:-1.9] finish=none`.
std::string FormatSequenceResult(int step, const v1::SequenceResult& result, bool with_logprobs);

// The lines of a beam search's step result, each ending in '\n': one per live beam
// (`step 2 sequence 0 beam 1: parent 0 token 17 score -3.2100`), then, when the search is over,
// one per hypothesis (`sequence 0 hypothesis 0: 12 7 1 score=-0.8300 finish=EOS`).
std::string FormatBeamResult(int step, const v1::SequenceResult& result);

// The beam-search flags (--beam_width, --length_penalty, --early_stopping true|heuristic|never,
// --num_return_sequences, --num_beam_groups, --diversity_penalty, --do_sample) as
// BeamSearchParams; nullopt without --beam_width; INVALID_ARGUMENT for a bad --early_stopping or
// another beam flag without --beam_width.
absl::StatusOr<std::optional<v1::BeamSearchParams>> BeamParamsFromFlags();

// FormatResult of every result, one per line, each ending in '\n'.
std::string FormatResponseText(const v1::SampleResponse& response, bool with_logprobs);

// A response (SampleResponse, SessionResponse) as one line of proto3 JSON with the proto's field
// names (`token_id`, `top_logprobs`, ...), zero values included, plus '\n'. Returns INTERNAL if
// printing fails.
absl::StatusOr<std::string> FormatResponseJson(const google::protobuf::Message& response);

// "error: INVALID_ARGUMENT: <message>" (no newline).
std::string FormatError(const absl::Status& status);

// --- subcommands ---

// `tokensampler sample`: builds the request from flags, calls --target, prints the results (text
// or --json) to `out`. Returns the process exit code: 0 on success; 1 after printing FormatError
// to `err` for any error, local or from the server.
int RunSample(std::ostream& out, std::ostream& err);

// `tokensampler decode`: a demo of the Session stream. Decodes --sequences sequences (each with
// --n - 1 forks) for up to --steps steps with the sampling-parameter flags, the logits coming from
// a toy trigram model (ToyModelLogits(--seed, last two tokens, --vocab)). Prints one line per
// sequence per step (FormatSequenceResult) and a summary line per sequence
// (`sequence 3: 12 7 9 finish=LENGTH`), or with --json one SessionResponse per step.
// With --speculative k, each step proposes k drafts per sequence from a weaker toy draft model
// (ToyDraftLogits; sampled from its softmax and sent with draft_probs, or its argmax as point
// masses when --temperature=0), sends k + 1 target rows per sequence with Step.drafts, prints
// `step 2 sequence 0: accepted 3/4 tokens 5 9 13 2 finish=none` and at the end
// `acceptance rate: 0.578 (370 of 640 drafts accepted; 3.31 tokens per verification)`.
// With --beam_width each sequence is a beam search instead: the loop keeps one history per live
// beam, reordered by parent_beam each step, and prints FormatBeamResult per step. The two do
// not combine (drafts are for plain sequences). Returns 0, or 1 after printing FormatError to
// `err` (bad flags, or the server's error, e.g.
// `add[0].params.top_p must be in (0, 1], got 0`).
int RunDecode(std::ostream& out, std::ostream& err);

// `tokensampler health`: asks --target's health service about --service. Prints SERVING or
// NOT_SERVING to `out` and returns 0 / 1; on an error prints FormatError to `err` and returns 1.
int RunHealth(std::ostream& out, std::ostream& err);

}  // namespace tokensampler::cli

#endif  // TOKENSAMPLER_CLIENT_CLI_COMMANDS_H_
