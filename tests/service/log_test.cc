// Logger: logfmt lines, quoting, levels.
#include "service/log.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokensampler::service {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::MatchesRegex;

TEST(LogfmtValueTest, BareWhenSafeQuotedOtherwise) {
  EXPECT_EQ(LogfmtValue("127.0.0.1:50051"), "127.0.0.1:50051");
  EXPECT_EQ(LogfmtValue("unix:/run/ts.sock"), "unix:/run/ts.sock");
  EXPECT_EQ(LogfmtValue(""), "\"\"");
  EXPECT_EQ(LogfmtValue("two words"), "\"two words\"");
  EXPECT_EQ(LogfmtValue("a=b"), "\"a=b\"");
  EXPECT_EQ(LogfmtValue("say \"hi\"\n\\"), "\"say \\\"hi\\\"\\n\\\\\"");
  EXPECT_EQ(LogfmtValue(std::string("\x01", 1)), "\"\\x01\"");
}

TEST(LogLevelTest, ParsesNamesAndRejectsOthers) {
  EXPECT_EQ(ParseLogLevel("debug").value(), LogLevel::kDebug);
  EXPECT_EQ(ParseLogLevel("INFO").value(), LogLevel::kInfo);
  EXPECT_EQ(ParseLogLevel("warn").value(), LogLevel::kWarning);
  EXPECT_EQ(ParseLogLevel("warning").value(), LogLevel::kWarning);
  EXPECT_EQ(ParseLogLevel("error").value(), LogLevel::kError);
  const absl::Status bad = ParseLogLevel("loud").status();
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.message(), "log level must be one of debug, info, warning, error, got \"loud\"");
}

TEST(LoggerTest, WritesOneLogfmtLinePerEventAtOrAboveItsLevel) {
  std::vector<std::string> lines;
  Logger logger("tokensamplerd", LogLevel::kWarning,
                [&lines](absl::string_view line) { lines.emplace_back(line); });
  logger.Log(LogLevel::kInfo, "start", {{"threads", 4}});
  logger.Log(LogLevel::kWarning, "rpc_error",
             {{"code", "INVALID_ARGUMENT"}, {"message", "top_p must be in (0, 1], got 1.5"}});
  logger.Log(LogLevel::kError, "error", std::vector<LogField>{{"ok", false}, {"ratio", 0.25}});
  EXPECT_FALSE(logger.Enabled(LogLevel::kInfo));
  EXPECT_THAT(
      lines,
      ElementsAre(
          MatchesRegex("tokensamplerd [0-9T:.+-]+ level=warning event=rpc_error "
                       "code=INVALID_ARGUMENT message=\"top_p must be in \\(0, 1\\], got 1.5\"\n"),
          MatchesRegex("tokensamplerd [^ ]+ level=error event=error ok=false ratio=0.25\n")));
}

}  // namespace
}  // namespace tokensampler::service
