#include "service/log.h"

#include <cstdio>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace tokensampler::service {

absl::StatusOr<LogLevel> ParseLogLevel(absl::string_view name) {
  const std::string lower = absl::AsciiStrToLower(name);
  if (lower == "debug") return LogLevel::kDebug;
  if (lower == "info") return LogLevel::kInfo;
  if (lower == "warning" || lower == "warn") return LogLevel::kWarning;
  if (lower == "error") return LogLevel::kError;
  return absl::InvalidArgumentError(
      absl::StrCat("log level must be one of debug, info, warning, error, got \"", name, "\""));
}

absl::string_view LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "unknown";
}

LogField::LogField(absl::string_view k, int v) : key(k), value(absl::StrCat(v)) {}
LogField::LogField(absl::string_view k, int64_t v) : key(k), value(absl::StrCat(v)) {}
LogField::LogField(absl::string_view k, uint64_t v) : key(k), value(absl::StrCat(v)) {}
LogField::LogField(absl::string_view k, double v) : key(k), value(absl::StrFormat("%.6g", v)) {}

std::string LogfmtValue(absl::string_view value) {
  bool bare = !value.empty();
  for (const char c : value) {
    if (c == ' ' || c == '"' || c == '=' || c == '\\' || static_cast<unsigned char>(c) < 0x20 ||
        c == 0x7f) {
      bare = false;
      break;
    }
  }
  if (bare) return std::string(value);
  std::string out = "\"";
  for (const char c : value) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
          absl::StrAppendFormat(&out, "\\x%02x", static_cast<unsigned char>(c));
        } else {
          out += c;
        }
    }
  }
  out += '"';
  return out;
}

Logger::Logger(std::string program, LogLevel level, Sink sink)
    : program_(std::move(program)),
      level_(level),
      sink_(sink != nullptr ? std::move(sink) : [](absl::string_view line) {
        std::fwrite(line.data(), 1, line.size(), stderr);
        std::fflush(stderr);
      }) {}

void Logger::Log(LogLevel level, absl::string_view event, std::initializer_list<LogField> fields) {
  Write(level, event, fields.begin(), fields.end());
}

void Logger::Log(LogLevel level, absl::string_view event, const std::vector<LogField>& fields) {
  Write(level, event, fields.data(), fields.data() + fields.size());
}

void Logger::Write(LogLevel level, absl::string_view event, const LogField* begin,
                   const LogField* end) {
  if (!Enabled(level)) return;
  std::string line = absl::StrCat(
      program_, " ", absl::FormatTime(absl::RFC3339_full, absl::Now(), absl::UTCTimeZone()),
      " level=", LogLevelName(level), " event=", LogfmtValue(event));
  for (const LogField* field = begin; field != end; ++field) {
    absl::StrAppend(&line, " ", field->key, "=", LogfmtValue(field->value));
  }
  line += '\n';
  absl::MutexLock lock(&mu_);
  sink_(line);
}

}  // namespace tokensampler::service
