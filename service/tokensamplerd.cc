// tokensamplerd: the tokensampler gRPC server.
//
//   tokensamplerd [--listen=127.0.0.1:50051] [--listen=unix:/run/ts.sock] [--threads=0]
//                 [--max_message_bytes=268435456] [--shutdown_grace_seconds=10] [--port_file=PATH]
//                 [--session_max_sequences=4096] [--session_max_history_tokens=1048576]
//                 [--session_idle_timeout_seconds=300] [--keepalive_seconds=60]
//
// Logs one line per lifecycle event to stderr. SIGTERM or SIGINT → graceful shutdown (calls in
// flight get --shutdown_grace_seconds to finish) → exit 0. Exit 1 when it cannot start.
#include <pthread.h>
#include <signal.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/session.h"
#include "service/server.h"

ABSL_FLAG(std::vector<std::string>, listen, {"127.0.0.1:50051"},
          "Address to listen on: host:port (port 0 = any free port) or unix:/path. Repeatable "
          "(--listen=A --listen=B) or comma-separated.");
ABSL_FLAG(int32_t, threads, 0,
          "Threads of the sampling arena; 0 = the CPU count, capped by the cgroup CPU quota.");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{256} * 1024 * 1024,
          "Largest request accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int32_t, shutdown_grace_seconds, 10,
          "On SIGTERM/SIGINT, how long calls in flight may run before they are cancelled.");
ABSL_FLAG(int64_t, session_max_sequences, tokensampler::SessionLimits{}.max_sequences,
          "Session: most sequences live in one stream at a time; an add or fork beyond it gets "
          "RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, session_max_history_tokens, tokensampler::SessionLimits{}.max_history_tokens,
          "Session: most prompt + output tokens of one sequence; an add or step beyond it gets "
          "RESOURCE_EXHAUSTED. The server keeps 4 bytes per token.");
ABSL_FLAG(int32_t, session_idle_timeout_seconds, 300,
          "Session: a stream with no request and no work for this long is ended with "
          "RESOURCE_EXHAUSTED and its sequences are released; 0 = never.");
ABSL_FLAG(int32_t, keepalive_seconds, 60,
          "Interval of HTTP/2 keepalive pings to clients; a client that does not answer within "
          "20 s is considered gone and its calls and Session state are dropped. 0 = no pings.");
ABSL_FLAG(std::string, port_file, "",
          "If set, the bound addresses (port 0 resolved) are written to this file, one per line, "
          "once the server is serving. Written atomically (temporary file + rename).");

namespace {

constexpr absl::string_view kProgram = "tokensamplerd";

// One line per lifecycle event: "tokensamplerd <RFC 3339 time> event=<event> <fields>".
void LogEvent(absl::string_view event, absl::string_view fields = "") {
  const std::string line = absl::StrCat(
      kProgram, " ", absl::FormatTime(absl::RFC3339_full, absl::Now(), absl::UTCTimeZone()),
      " event=", event, fields.empty() ? "" : " ", fields, "\n");
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
}

// absl flags keep only the last occurrence of a flag; `--listen` is documented as repeatable.
// Returns argv with every `--listen=X` / `--listen X` merged into one comma-separated
// `--listen=X,Y` (the form a std::vector<std::string> flag parses), placed where the first was.
std::vector<std::string> MergeRepeatedFlag(int argc, char** argv, absl::string_view name) {
  std::vector<std::string> out;
  std::vector<std::string> values;
  size_t merged_at = 0;
  const std::string dash1 = absl::StrCat("-", name);
  const std::string dash2 = absl::StrCat("--", name);
  for (int i = 0; i < argc; ++i) {
    const absl::string_view arg = argv[i];
    if (arg == "--") {  // everything after is positional
      for (; i < argc; ++i) out.emplace_back(argv[i]);
      break;
    }
    std::optional<std::string> value;
    for (const std::string& prefix : {dash1, dash2}) {
      if (arg == prefix && i + 1 < argc) {
        value = argv[++i];
      } else if (absl::StartsWith(arg, absl::StrCat(prefix, "="))) {
        value = std::string(arg.substr(prefix.size() + 1));
      }
      if (value.has_value()) break;
    }
    if (!value.has_value()) {
      out.emplace_back(arg);
      continue;
    }
    if (values.empty()) {
      merged_at = out.size();
      out.emplace_back();
    }
    values.push_back(*std::move(value));
  }
  if (!values.empty()) out[merged_at] = absl::StrCat(dash2, "=", absl::StrJoin(values, ","));
  return out;
}

bool WritePortFile(const std::string& path, const std::vector<std::string>& addresses) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    for (const std::string& address : addresses) out << address << "\n";
    out.close();
    if (!out) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Block the stop signals before any thread exists so that every thread (gRPC's, oneTBB's)
  // inherits the mask and only sigwait() below receives them: no work in a signal handler.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  absl::SetProgramUsageMessage(
      "tokensampler gRPC server: samples next tokens from LLM logits.\n"
      "  tokensamplerd [--listen=127.0.0.1:50051] [--listen=unix:/path] [--threads=N]\n"
      "                [--session_max_sequences=N] [--session_max_history_tokens=N]\n"
      "                [--session_idle_timeout_seconds=S] [--keepalive_seconds=S]");
  std::vector<std::string> args = MergeRepeatedFlag(argc, argv, "listen");
  std::vector<char*> arg_ptrs;
  for (std::string& arg : args) arg_ptrs.push_back(arg.data());
  absl::ParseCommandLine(static_cast<int>(arg_ptrs.size()), arg_ptrs.data());

  const int64_t max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  if (max_message_bytes <= 0 || max_message_bytes > std::numeric_limits<int>::max()) {
    LogEvent("error",
             absl::StrCat("message=\"--max_message_bytes must be in [1, ",
                          std::numeric_limits<int>::max(), "], got ", max_message_bytes, "\""));
    return 1;
  }
  const int32_t grace_seconds = absl::GetFlag(FLAGS_shutdown_grace_seconds);
  if (grace_seconds < 0) {
    LogEvent("error", absl::StrCat("message=\"--shutdown_grace_seconds must be >= 0, got ",
                                   grace_seconds, "\""));
    return 1;
  }

  const int64_t max_sequences = absl::GetFlag(FLAGS_session_max_sequences);
  const int64_t max_history_tokens = absl::GetFlag(FLAGS_session_max_history_tokens);
  const int32_t idle_seconds = absl::GetFlag(FLAGS_session_idle_timeout_seconds);
  const int32_t keepalive_seconds = absl::GetFlag(FLAGS_keepalive_seconds);
  for (const auto& [flag, value, least] :
       {std::tuple<absl::string_view, int64_t, int64_t>{"session_max_sequences", max_sequences, 1},
        {"session_max_history_tokens", max_history_tokens, 1},
        {"session_idle_timeout_seconds", idle_seconds, 0},
        {"keepalive_seconds", keepalive_seconds, 0}}) {
    if (value < least) {
      LogEvent("error",
               absl::StrCat("message=\"--", flag, " must be >= ", least, ", got ", value, "\""));
      return 1;
    }
  }

  tokensampler::service::ServerOptions options;
  options.listen_addresses = absl::GetFlag(FLAGS_listen);
  options.session.limits.max_sequences = max_sequences;
  options.session.limits.max_history_tokens = max_history_tokens;
  options.session.idle_timeout =
      idle_seconds == 0 ? absl::InfiniteDuration() : absl::Seconds(idle_seconds);
  options.keepalive_time = absl::Seconds(keepalive_seconds);
  if (options.listen_addresses.empty()) {
    LogEvent("error", "message=\"--listen must name at least one address\"");
    return 1;
  }
  options.threads = absl::GetFlag(FLAGS_threads);
  options.max_message_bytes = static_cast<int>(max_message_bytes);
  absl::StatusOr<std::unique_ptr<tokensampler::service::Server>> server =
      tokensampler::service::Server::Start(options);
  if (!server.ok()) {
    LogEvent("error", absl::StrCat("message=\"", server.status().ToString(), "\""));
    return 1;
  }
  LogEvent("start",
           absl::StrCat("version=", TOKENSAMPLER_VERSION, " threads=", (*server)->threads(),
                        " max_message_bytes=", max_message_bytes, " session_max_sequences=",
                        max_sequences, " session_max_history_tokens=", max_history_tokens,
                        " session_idle_timeout_seconds=", idle_seconds,
                        " keepalive_seconds=", keepalive_seconds));
  for (const std::string& address : (*server)->bound_addresses()) {
    LogEvent("listen", absl::StrCat("address=", address));
  }
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty() && !WritePortFile(port_file, (*server)->bound_addresses())) {
    LogEvent("error", absl::StrCat("message=\"cannot write --port_file ", port_file, ": ",
                                   std::strerror(errno), "\""));
    return 1;
  }

  int signal_number = 0;
  while (sigwait(&stop_signals, &signal_number) != 0) {
  }
  LogEvent("shutdown", absl::StrCat("signal=", signal_number == SIGTERM ? "SIGTERM" : "SIGINT",
                                    " grace_seconds=", grace_seconds));
  (*server)->Shutdown(absl::Now() + absl::Seconds(grace_seconds));
  server->reset();
  LogEvent("stop");
  return 0;
}
