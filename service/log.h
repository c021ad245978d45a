// Logger: structured one-line logs (logfmt) for tokensamplerd and the Server.
//
//   tokensamplerd 2025-01-02T03:04:05.123456Z level=info event=listen address=127.0.0.1:50051
//
// Every line is "<program> <RFC 3339 UTC time> level=<level> event=<event>" followed by the
// event's key=value fields; a value with a space, a quote, '=' or a control character (or an
// empty one) is double-quoted with \" \\ \n \t escapes, so each line parses as logfmt. Lines
// below the logger's level are dropped before they are formatted.
//
// Thread-safe: Log() may be called from any thread; each line reaches the sink whole.
#ifndef TOKENSAMPLER_SERVICE_LOG_H_
#define TOKENSAMPLER_SERVICE_LOG_H_

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace tokensampler::service {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// "debug", "info", "warning", "error" → the level; INVALID_ARGUMENT naming the value otherwise.
absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name);
absl::string_view LogLevelName(LogLevel level);

// One key=value pair of a log line; the constructors format numbers and booleans.
struct LogField {
  LogField(absl::string_view k, absl::string_view v) : key(k), value(v) {}
  LogField(absl::string_view k, const std::string& v) : key(k), value(v) {}
  LogField(absl::string_view k, const char* v) : key(k), value(v) {}
  LogField(absl::string_view k, bool v) : key(k), value(v ? "true" : "false") {}
  LogField(absl::string_view k, int v);
  LogField(absl::string_view k, int64_t v);
  LogField(absl::string_view k, uint64_t v);
  LogField(absl::string_view k, double v);

  std::string key;
  std::string value;
};

// Returns `value` as a logfmt value: unchanged when it is safe bare, else quoted and escaped.
std::string LogfmtValue(absl::string_view value);

class Logger {
 public:
  // Receives each formatted line, '\n' included.
  using Sink = std::function<void(absl::string_view line)>;

  // Writes lines of `level` and above to `sink` (default: stderr, flushed per line).
  explicit Logger(std::string program, LogLevel level = LogLevel::kInfo, Sink sink = nullptr);

  Logger(const Logger&) = delete;
  Logger& operator=(const Logger&) = delete;

  bool Enabled(LogLevel level) const { return level >= level_; }
  LogLevel level() const { return level_; }

  void Log(LogLevel level, absl::string_view event, std::initializer_list<LogField> fields = {});
  void Log(LogLevel level, absl::string_view event, const std::vector<LogField>& fields);

 private:
  const std::string program_;
  const LogLevel level_;
  void Write(LogLevel level, absl::string_view event, const LogField* begin, const LogField* end);

  const Sink sink_;
  absl::Mutex mu_;  // serialises sink calls
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_LOG_H_
