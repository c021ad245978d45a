// tokensamplerd: the tokensampler gRPC server.
//
//   tokensamplerd [--listen=127.0.0.1:50051] [--listen=unix:/run/ts.sock] [--threads=0]
//                 [--max_message_bytes=268435456] [--drain_seconds=10] [--port_file=PATH]
//                 [--health_listen=0.0.0.0:8081] [--metrics_listen=0.0.0.0:9090]
//                 [--tls_cert=PEM --tls_key=PEM [--tls_client_ca=PEM]] [--auth_token_file=F]
//                 [--session_max_sequences=4096] [--session_max_history_tokens=1048576]
//                 [--session_idle_timeout_seconds=300] [--keepalive_time_seconds=60]
//                 [--log_level=info] ...
//
// Every flag can also come from the environment variable TOKENSAMPLER_<FLAG NAME IN CAPITALS>
// (TOKENSAMPLER_THREADS=4, TOKENSAMPLER_LISTEN=unix:/run/ts.sock,0.0.0.0:50051); a flag on the
// command line wins over its variable. The resolved configuration is logged once at start.
//
// Logs one logfmt line per lifecycle event and per failed call to stderr. SIGTERM or SIGINT →
// drain (health NOT_SERVING, new calls refused, calls in flight get --drain_seconds to finish)
// → exit 0. Exit 1 when it cannot start.
#include <pthread.h>
#include <signal.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/session.h"
#include "service/log.h"
#include "service/server.h"

// --- listeners ---
ABSL_FLAG(std::vector<std::string>, listen, {"127.0.0.1:50051"},
          "Address to listen on: host:port (port 0 = any free port) or unix:/path. Repeatable "
          "(--listen=A --listen=B) or comma-separated.");
ABSL_FLAG(std::vector<std::string>, health_listen, {},
          "Extra addresses that serve only grpc.health.v1, in plaintext and without a token "
          "(Kubernetes probes cannot reach a Unix socket nor speak TLS). Repeatable or "
          "comma-separated; default none.");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port of the Prometheus endpoint (GET /metrics); empty = off.");
ABSL_FLAG(std::string, port_file, "",
          "If set, the bound addresses (port 0 resolved) are written to this file once the "
          "server is serving: one gRPC address per line, then health=ADDRESS lines and a "
          "metrics=ADDRESS line. Written atomically (temporary file + rename).");
ABSL_FLAG(std::string, unix_socket_mode, "0660",
          "Permission bits (octal) given to every Unix socket of --listen; empty = as created.");
// --- work ---
ABSL_FLAG(int32_t, threads, 0,
          "Threads of the sampling arena; 0 = the CPU count, capped by the cgroup CPU quota.");
ABSL_FLAG(int64_t, max_message_bytes, int64_t{256} * 1024 * 1024,
          "Largest request accepted, in bytes; larger ones get RESOURCE_EXHAUSTED.");
ABSL_FLAG(int32_t, max_concurrent_requests, 256,
          "Requests admitted and not yet answered (queued or running); one more gets "
          "RESOURCE_EXHAUSTED at once. 0 = no limit.");
ABSL_FLAG(int64_t, max_inflight_bytes, int64_t{1} << 30,
          "Bytes of the requests admitted and not yet answered; a request that would exceed it "
          "gets RESOURCE_EXHAUSTED at once (a request alone is always admitted). 0 = no limit.");
ABSL_FLAG(int32_t, drain_seconds, 10,
          "On SIGTERM/SIGINT, how long calls in flight may run before they are cancelled.");
// --- sessions ---
ABSL_FLAG(int64_t, session_max_sequences, tokensampler::SessionLimits{}.max_sequences,
          "Session: most sequences live in one stream at a time; an add or fork beyond it gets "
          "RESOURCE_EXHAUSTED.");
ABSL_FLAG(int64_t, session_max_history_tokens, tokensampler::SessionLimits{}.max_history_tokens,
          "Session: most prompt + output tokens of one sequence; an add or step beyond it gets "
          "RESOURCE_EXHAUSTED. The server keeps 4 bytes per token.");
ABSL_FLAG(int32_t, max_beam_width, tokensampler::SessionLimits{}.max_beam_width,
          "Session: largest beam_width of a beam search (AddSequence.beam); a wider one gets "
          "INVALID_ARGUMENT. A beam search counts as beam_width sequences towards "
          "--session_max_sequences.");
ABSL_FLAG(int32_t, session_idle_timeout_seconds, 300,
          "Session: a stream with no request and no work for this long is ended with "
          "RESOURCE_EXHAUSTED and its sequences are released; 0 = never.");
// --- connections ---
ABSL_FLAG(int32_t, keepalive_time_seconds, 60,
          "Ping every client connection this often (HTTP/2 keepalive), also while its streams "
          "are quiet; a client that does not answer within --keepalive_timeout_seconds is gone, "
          "and its calls and Session state are dropped.");
ABSL_FLAG(int32_t, keepalive_timeout_seconds, 20,
          "Close a connection whose keepalive ping is not answered within this time.");
ABSL_FLAG(int32_t, keepalive_min_time_seconds, 300,
          "Shortest interval allowed between a client's keepalive pings; faster pings close the "
          "connection (GOAWAY too_many_pings).");
ABSL_FLAG(bool, keepalive_permit_without_calls, false,
          "Allow client keepalive pings on a connection without calls in flight.");
// --- security ---
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain: serve TLS on the TCP addresses of --listen (with --tls_key).");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA bundle: require client certificates signed by it (mutual TLS).");
ABSL_FLAG(std::string, auth_token_file, "",
          "File of accepted bearer tokens, one per line: every Sampler call must send "
          "\"authorization: Bearer <token>\" (UNAUTHENTICATED otherwise; health is exempt, "
          "reflection is then off).");
// --- transport ---
ABSL_FLAG(std::string, shared_memory, "unix",
          "Where shared-memory logits (RegisterSharedMemory, Logits.shared_memory) are served: "
          "off; unix = Unix-socket listeners only (the client is on this host); all = TCP "
          "listeners too (only when every TCP client runs on this host).");
ABSL_FLAG(int32_t, shared_memory_max_regions, 256,
          "Shared-memory regions registered at a time (all clients); RESOURCE_EXHAUSTED beyond.");
ABSL_FLAG(bool, large_message_tuning, true,
          "HTTP/2 and socket settings for large requests (64 MiB windows, 16 MiB frames, 4-16 "
          "MiB socket reads), and malloc thresholds and 2 malloc arenas that keep large request "
          "buffers for reuse by every thread; false = gRPC's and glibc's defaults.");
// --- logs ---
ABSL_FLAG(std::string, log_level, "info",
          "Least severe level logged: debug, info, warning, error.");
ABSL_FLAG(int32_t, request_log_every, 0,
          "Log one line (event=request, info level) for every Nth request; 0 = none.");

namespace {

using tokensampler::service::LogField;
using tokensampler::service::Logger;
using tokensampler::service::LogLevel;

constexpr absl::string_view kProgram = "tokensamplerd";
constexpr absl::string_view kEnvPrefix = "TOKENSAMPLER_";

// absl flags keep only the last occurrence of a flag; `--listen` is documented as repeatable.
// Returns argv with every `--name=X` / `--name X` merged into one comma-separated
// `--name=X,Y` (the form a std::vector<std::string> flag parses), placed where the first was.
std::vector<std::string> MergeRepeatedFlag(std::vector<std::string> args, absl::string_view name) {
  std::vector<std::string> out;
  std::vector<std::string> values;
  size_t merged_at = 0;
  const std::string dash1 = absl::StrCat("-", name);
  const std::string dash2 = absl::StrCat("--", name);
  for (size_t i = 0; i < args.size(); ++i) {
    const absl::string_view arg = args[i];
    if (arg == "--") {  // everything after is positional
      for (; i < args.size(); ++i) out.push_back(args[i]);
      break;
    }
    std::optional<std::string> value;
    for (const std::string& prefix : {dash1, dash2}) {
      if (arg == prefix && i + 1 < args.size()) {
        value = args[++i];
      } else if (absl::StartsWith(arg, absl::StrCat(prefix, "="))) {
        value = std::string(arg.substr(prefix.size() + 1));
      }
      if (value.has_value()) break;
    }
    if (!value.has_value()) {
      out.push_back(args[i]);
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

// The flags this file defines, by name (not absl's own, nor those of linked libraries).
std::map<std::string, absl::CommandLineFlag*> OwnFlags() {
  std::map<std::string, absl::CommandLineFlag*> own;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (absl::EndsWith(flag->Filename(), "tokensamplerd.cc")) own.emplace(name, flag);
  }
  return own;
}

// Whether `args` set flag `name` on the command line (--name, --name=, -name, --noname).
bool OnCommandLine(const std::vector<std::string>& args, absl::string_view name) {
  for (size_t i = 1; i < args.size(); ++i) {
    absl::string_view arg = args[i];
    if (arg == "--") break;
    if (!absl::ConsumePrefix(&arg, "--")) absl::ConsumePrefix(&arg, "-");
    arg = arg.substr(0, arg.find('='));
    if (arg == name || arg == absl::StrCat("no", name)) return true;
  }
  return false;
}

// Sets every own flag whose TOKENSAMPLER_<NAME> variable is set (the command line, parsed
// afterwards, wins). Returns the names set, or the error naming the variable and its value.
absl::StatusOr<std::vector<std::string>> ApplyEnvironment(
    const std::map<std::string, absl::CommandLineFlag*>& flags) {
  std::vector<std::string> applied;
  for (const auto& [name, flag] : flags) {
    const std::string variable = absl::StrCat(kEnvPrefix, absl::AsciiStrToUpper(name));
    const char* value = std::getenv(variable.c_str());
    if (value == nullptr) continue;
    std::string error;
    if (!flag->ParseFrom(value, &error)) {
      return absl::InvalidArgumentError(
          absl::StrCat("environment variable ", variable, "=\"", value, "\": ", error));
    }
    applied.push_back(name);
  }
  return applied;
}

absl::StatusOr<std::string> ReadFile(absl::string_view flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": cannot read ", path, ": ", std::strerror(errno)));
  }
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// One token per line; blank lines and surrounding spaces ignored.
absl::StatusOr<std::vector<std::string>> ReadTokens(const std::string& path) {
  absl::StatusOr<std::string> contents = ReadFile("auth_token_file", path);
  if (!contents.ok()) return contents.status();
  std::vector<std::string> tokens;
  for (absl::string_view line : absl::StrSplit(*contents, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (!line.empty()) tokens.emplace_back(line);
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--auth_token_file: ", path, " holds no token (one per line)"));
  }
  return tokens;
}

absl::StatusOr<std::optional<uint32_t>> ParseSocketMode(absl::string_view text) {
  if (text.empty()) return std::nullopt;
  uint32_t mode = 0;
  for (const char c : text) {
    if (c < '0' || c > '7' || mode > 0777) {
      mode = 01000;
      break;
    }
    mode = mode * 8 + static_cast<uint32_t>(c - '0');
  }
  if (mode > 0777) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--unix_socket_mode must be octal permission bits up to 0777 (e.g. 0660), got \"", text,
        "\""));
  }
  return mode;
}

// The ServerOptions the flags describe, or the error naming the flag and its value.
absl::StatusOr<tokensampler::service::ServerOptions> OptionsFromFlags(Logger* logger) {
  tokensampler::service::ServerOptions options;
  options.logger = logger;
  options.listen_addresses = absl::GetFlag(FLAGS_listen);
  if (options.listen_addresses.empty()) {
    return absl::InvalidArgumentError("--listen must name at least one address");
  }
  options.health_listen_addresses = absl::GetFlag(FLAGS_health_listen);
  options.metrics_listen_address = absl::GetFlag(FLAGS_metrics_listen);
  options.threads = absl::GetFlag(FLAGS_threads);

  const int64_t max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  if (max_message_bytes <= 0 || max_message_bytes > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("--max_message_bytes must be in [1, ",
                                                   std::numeric_limits<int>::max(), "], got ",
                                                   max_message_bytes));
  }
  options.max_message_bytes = static_cast<int>(max_message_bytes);
  options.max_concurrent_requests = absl::GetFlag(FLAGS_max_concurrent_requests);
  if (options.max_concurrent_requests < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_concurrent_requests must be >= 0 (0 = no limit), got ",
                     options.max_concurrent_requests));
  }
  options.max_inflight_bytes = absl::GetFlag(FLAGS_max_inflight_bytes);
  if (options.max_inflight_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--max_inflight_bytes must be >= 0 (0 = no limit), got ", options.max_inflight_bytes));
  }
  options.request_log_every = absl::GetFlag(FLAGS_request_log_every);
  if (options.request_log_every < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--request_log_every must be >= 0 (0 = off), got ", options.request_log_every));
  }

  for (const auto& [flag, value, min] :
       {std::tuple<const char*, int32_t, int32_t>{"keepalive_time_seconds",
                                                  absl::GetFlag(FLAGS_keepalive_time_seconds), 1},
        {"keepalive_timeout_seconds", absl::GetFlag(FLAGS_keepalive_timeout_seconds), 1},
        {"keepalive_min_time_seconds", absl::GetFlag(FLAGS_keepalive_min_time_seconds), 0}}) {
    // gRPC takes milliseconds in an int.
    if (value < min || value > std::numeric_limits<int>::max() / 1000) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, " must be in [", min, ", ",
                                                     std::numeric_limits<int>::max() / 1000,
                                                     "], got ", value));
    }
  }
  options.keepalive.time = absl::Seconds(absl::GetFlag(FLAGS_keepalive_time_seconds));
  options.keepalive.timeout = absl::Seconds(absl::GetFlag(FLAGS_keepalive_timeout_seconds));
  options.keepalive.min_client_ping_interval =
      absl::Seconds(absl::GetFlag(FLAGS_keepalive_min_time_seconds));
  options.keepalive.permit_without_calls = absl::GetFlag(FLAGS_keepalive_permit_without_calls);

  const int64_t max_sequences = absl::GetFlag(FLAGS_session_max_sequences);
  const int64_t max_history_tokens = absl::GetFlag(FLAGS_session_max_history_tokens);
  const int32_t idle_seconds = absl::GetFlag(FLAGS_session_idle_timeout_seconds);
  const int32_t max_beam_width = absl::GetFlag(FLAGS_max_beam_width);
  for (const auto& [flag, value, least] :
       {std::tuple<const char*, int64_t, int64_t>{"session_max_sequences", max_sequences, 1},
        {"session_max_history_tokens", max_history_tokens, 1},
        {"max_beam_width", max_beam_width, 1},
        {"session_idle_timeout_seconds", idle_seconds, 0}}) {
    if (value < least) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, " must be >= ", least, ", got ", value));
    }
  }
  options.session.limits.max_sequences = max_sequences;
  options.session.limits.max_history_tokens = max_history_tokens;
  options.session.limits.max_beam_width = max_beam_width;
  options.session.idle_timeout =
      idle_seconds == 0 ? absl::InfiniteDuration() : absl::Seconds(idle_seconds);

  const std::string cert = absl::GetFlag(FLAGS_tls_cert);
  const std::string key = absl::GetFlag(FLAGS_tls_key);
  const std::string client_ca = absl::GetFlag(FLAGS_tls_client_ca);
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key must be given together");
  }
  if (!client_ca.empty() && cert.empty()) {
    return absl::InvalidArgumentError(
        "--tls_client_ca (mutual TLS) needs --tls_cert and --tls_key");
  }
  for (const auto& [flag, path, pem] : {std::tuple<const char*, const std::string*, std::string*>{
                                            "tls_cert", &cert, &options.tls.cert_chain},
                                        {"tls_key", &key, &options.tls.private_key},
                                        {"tls_client_ca", &client_ca, &options.tls.client_ca}}) {
    if (path->empty()) continue;
    absl::StatusOr<std::string> contents = ReadFile(flag, *path);
    if (!contents.ok()) return contents.status();
    *pem = *std::move(contents);
  }

  const std::string token_file = absl::GetFlag(FLAGS_auth_token_file);
  if (!token_file.empty()) {
    absl::StatusOr<std::vector<std::string>> tokens = ReadTokens(token_file);
    if (!tokens.ok()) return tokens.status();
    options.auth_tokens = *std::move(tokens);
  }

  absl::StatusOr<tokensampler::service::SharedMemoryMode> shm_mode =
      tokensampler::service::ParseSharedMemoryMode(absl::GetFlag(FLAGS_shared_memory));
  if (!shm_mode.ok())
    return absl::InvalidArgumentError(absl::StrCat("--", shm_mode.status().message()));
  options.shared_memory.mode = *shm_mode;
  options.shared_memory.max_regions = absl::GetFlag(FLAGS_shared_memory_max_regions);
  if (options.shared_memory.max_regions <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("--shared_memory_max_regions must be > 0, got ",
                                                   options.shared_memory.max_regions));
  }
  options.transport.tuned = absl::GetFlag(FLAGS_large_message_tuning);

  absl::StatusOr<std::optional<uint32_t>> mode =
      ParseSocketMode(absl::GetFlag(FLAGS_unix_socket_mode));
  if (!mode.ok()) return mode.status();
  options.unix_socket_mode = *mode;
  return options;
}

bool WritePortFile(const std::string& path, const tokensampler::service::Server& server) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    for (const std::string& address : server.bound_addresses()) out << address << "\n";
    for (const std::string& address : server.health_addresses()) {
      out << "health=" << address << "\n";
    }
    if (!server.metrics_address().empty()) out << "metrics=" << server.metrics_address() << "\n";
    out.close();
    if (!out) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

int Fail(Logger& logger, absl::string_view message) {
  logger.Log(LogLevel::kError, "error", {{"message", message}});
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  // Block the stop signals before any thread exists so that every thread (gRPC's, oneTBB's,
  // civetweb's) inherits the mask and only sigwait() below receives them: no work in a signal
  // handler.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  absl::SetProgramUsageMessage(
      "tokensampler gRPC server: samples next tokens from LLM logits.\n"
      "  tokensamplerd [--listen=127.0.0.1:50051] [--listen=unix:/path] [--threads=N]\n"
      "                [--session_max_sequences=N] [--session_max_history_tokens=N]\n"
      "                [--session_idle_timeout_seconds=S] [--drain_seconds=S] ... (--helpfull)\n"
      "Every flag may also be set by the environment variable TOKENSAMPLER_<FLAG> (the command "
      "line wins).");
  // Errors before --log_level is known are logged at the default level.
  auto logger = std::make_unique<Logger>(std::string(kProgram));

  const std::map<std::string, absl::CommandLineFlag*> own_flags = OwnFlags();
  absl::StatusOr<std::vector<std::string>> from_env = ApplyEnvironment(own_flags);
  if (!from_env.ok()) return Fail(*logger, from_env.status().message());

  std::vector<std::string> args(argv, argv + argc);
  args = MergeRepeatedFlag(std::move(args), "listen");
  args = MergeRepeatedFlag(std::move(args), "health_listen");
  std::vector<char*> arg_ptrs;
  for (std::string& arg : args) arg_ptrs.push_back(arg.data());
  absl::ParseCommandLine(static_cast<int>(arg_ptrs.size()), arg_ptrs.data());

  absl::StatusOr<LogLevel> level =
      tokensampler::service::ParseLogLevel(absl::GetFlag(FLAGS_log_level));
  if (!level.ok()) return Fail(*logger, absl::StrCat("--", level.status().message()));
  logger = std::make_unique<Logger>(std::string(kProgram), *level);

  // The resolved configuration, once: every flag, and which ones came from the environment.
  {
    std::vector<std::string> env_sources;
    for (const std::string& name : *from_env) {
      if (!OnCommandLine(args, name)) {
        env_sources.push_back(absl::StrCat(kEnvPrefix, absl::AsciiStrToUpper(name)));
      }
    }
    std::vector<LogField> config;
    for (const auto& [name, flag] : own_flags) config.emplace_back(name, flag->CurrentValue());
    config.emplace_back("from_env", absl::StrJoin(env_sources, ","));
    logger->Log(LogLevel::kInfo, "config", config);
  }

  const int32_t drain_seconds = absl::GetFlag(FLAGS_drain_seconds);
  if (drain_seconds < 0) {
    return Fail(*logger, absl::StrCat("--drain_seconds must be >= 0, got ", drain_seconds));
  }
  absl::StatusOr<tokensampler::service::ServerOptions> options = OptionsFromFlags(logger.get());
  if (!options.ok()) return Fail(*logger, options.status().message());

  if (options->transport.tuned) tokensampler::service::TuneMallocForLargeMessages();
  absl::StatusOr<std::unique_ptr<tokensampler::service::Server>> server =
      tokensampler::service::Server::Start(*options);
  if (!server.ok()) return Fail(*logger, server.status().ToString());
  logger->Log(LogLevel::kInfo, "start",
              {{"version", TOKENSAMPLER_VERSION},
               {"threads", (*server)->threads()},
               {"max_message_bytes", options->max_message_bytes},
               {"max_concurrent_requests", options->max_concurrent_requests},
               {"max_inflight_bytes", options->max_inflight_bytes},
               {"tls", options->tls.enabled()},
               {"mutual_tls", !options->tls.client_ca.empty()},
               {"auth", !options->auth_tokens.empty()},
               {"session_max_sequences", options->session.limits.max_sequences},
               {"session_max_history_tokens", options->session.limits.max_history_tokens},
               {"session_idle_timeout_seconds", absl::GetFlag(FLAGS_session_idle_timeout_seconds)},
               {"keepalive_time_seconds", absl::GetFlag(FLAGS_keepalive_time_seconds)},
               {"max_beam_width", options->session.limits.max_beam_width},
               {"shared_memory", absl::GetFlag(FLAGS_shared_memory)}});
  for (const std::string& address : (*server)->bound_addresses()) {
    const bool unix_socket = absl::StartsWith(address, "unix");
    logger->Log(LogLevel::kInfo, "listen",
                {{"address", address},
                 {"serves", "grpc"},
                 {"tls", !unix_socket && options->tls.enabled()}});
  }
  for (const std::string& address : (*server)->health_addresses()) {
    logger->Log(LogLevel::kInfo, "listen", {{"address", address}, {"serves", "health"}});
  }
  if (!(*server)->metrics_address().empty()) {
    logger->Log(LogLevel::kInfo, "listen",
                {{"address", (*server)->metrics_address()}, {"serves", "metrics"}});
  }
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty() && !WritePortFile(port_file, **server)) {
    return Fail(*logger,
                absl::StrCat("cannot write --port_file ", port_file, ": ", std::strerror(errno)));
  }

  int signal_number = 0;
  while (sigwait(&stop_signals, &signal_number) != 0) {
  }
  logger->Log(LogLevel::kInfo, "shutdown",
              {{"signal", signal_number == SIGTERM ? "SIGTERM" : "SIGINT"},
               {"drain_seconds", drain_seconds}});
  (*server)->Shutdown(absl::Now() + absl::Seconds(drain_seconds));
  server->reset();
  logger->Log(LogLevel::kInfo, "stop");
  return 0;
}
