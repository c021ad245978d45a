// `tokensampler`: command-line client of the tokensampler service.
//
//   tokensampler sample --target 127.0.0.1:50051 --random --vocab 32000 --temperature 0 --logprobs
//   5 tokensampler decode --target 127.0.0.1:50051 --vocab 32000 --sequences 2 --steps 8 --top_p
//   0.9 tokensampler health --target unix:/run/tokensampler.sock
//
// Exit codes: 0 success (health: SERVING); 1 an error, printed as "error: CODE: message" (health:
// also NOT_SERVING); 2 a usage error (no or unknown subcommand).
#include <algorithm>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "client/cli/commands.h"

namespace {

constexpr absl::string_view kUsage =
    "tokensampler <sample|decode|health> [flags]\n"
    "\n"
    "  sample  sample next tokens from logits (--logits FILE or --random, --vocab V) with\n"
    "          sampling-parameter flags; prints one line per result, or --json\n"
    "  decode  demo of the Session stream: decode --sequences sequences of a toy trigram\n"
    "          model (--vocab V, --seed) for --steps steps with sampling-parameter flags;\n"
    "          prints one line per sequence per step, then each sequence;\n"
    "          --speculative K: K drafts per step from a weaker toy draft model, verified\n"
    "          by the server; prints the acceptance rate;\n"
    "          --beam-width N: each sequence is a beam search; prints the beams and the\n"
    "          hypotheses (not with --speculative)\n"
    "  health  print SERVING (exit 0) or NOT_SERVING (exit 1)\n"
    "\n"
    "Flag names take '-' or '_' alike (--beam-width = --beam_width).\n"
    "Run `tokensampler --helpfull` for every flag.";

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  // The flags live in commands.cc; let --help list them (absl's default: only main's file).
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view path) {
    return absl::StrContains(path, "client/cli/");
  };
  absl::SetFlagsUsageConfig(usage_config);
  // Abseil flag names use '_'; accept '-' too (`--beam-width 4`), in the name part only.
  std::vector<std::string> spelled(argv, argv + argc);
  std::vector<char*> normalized;
  for (std::string& arg : spelled) {
    if (arg.size() > 2 && arg.compare(0, 2, "--") == 0) {
      const size_t end = std::min(arg.find('='), arg.size());
      std::replace(arg.begin() + 2, arg.begin() + static_cast<std::ptrdiff_t>(end), '-', '_');
    }
    normalized.push_back(arg.data());
  }
  const std::vector<char*> args =
      absl::ParseCommandLine(static_cast<int>(normalized.size()), normalized.data());
  const std::string_view command = args.size() == 2 ? args[1] : "";
  if (command == "sample") return tokensampler::cli::RunSample(std::cout, std::cerr);
  if (command == "decode") return tokensampler::cli::RunDecode(std::cout, std::cerr);
  if (command == "health") return tokensampler::cli::RunHealth(std::cout, std::cerr);
  std::cerr << "usage: " << kUsage << "\n";
  return 2;
}
