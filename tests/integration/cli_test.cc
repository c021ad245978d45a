// Integration: the `tokensampler` CLI binary and the C++ client library (tokensampler::Client)
// against the real tokensamplerd binary, on 127.0.0.1:0 and on a temporary Unix socket.
// The CLI runs as a child process; its stdout, stderr and exit code are checked.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/cli/random_logits.h"
#include "client/client.h"
#include "client/logits.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/beam_testing.h"
#include "tests/testing/operations_testing.h"

#ifndef TOKENSAMPLERD_PATH
#error "TOKENSAMPLERD_PATH must name the tokensamplerd binary"
#endif
#ifndef TOKENSAMPLER_CLI_PATH
#error "TOKENSAMPLER_CLI_PATH must name the tokensampler CLI binary"
#endif

namespace tokensampler {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::EndsWith;
using ::testing::HasSubstr;
using ::testing::MatchesRegex;
using ::testing::SizeIs;
using ::testing::StartsWith;
using ::tokensampler::testing::DaemonProcess;
using ::tokensampler::testing::ReadWholeFile;
using ::tokensampler::testing::UniqueTempPath;

constexpr absl::Duration kTimeout = absl::Seconds(20);

struct CliResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs the CLI with `args` to completion (≤ 60 s, then SIGKILL) and returns what it printed.
CliResult RunCli(const std::vector<std::string>& args) {
  CliResult result;
  const std::string out_path = UniqueTempPath("cli_out.txt");
  const std::string err_path = UniqueTempPath("cli_err.txt");
  std::vector<std::string> argv = {TOKENSAMPLER_CLI_PATH};
  argv.insert(argv.end(), args.begin(), args.end());
  std::vector<char*> argv_ptrs;
  for (std::string& arg : argv) argv_ptrs.push_back(arg.data());
  argv_ptrs.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0].c_str(), &actions, nullptr, argv_ptrs.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    ADD_FAILURE() << "posix_spawn " << argv[0] << ": " << std::strerror(rc);
    return result;
  }
  int status = 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (absl::Now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      ADD_FAILURE() << "the CLI did not exit within 60 s";
      break;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  result.out = ReadWholeFile(out_path);
  result.err = ReadWholeFile(err_path);
  std::remove(out_path.c_str());
  std::remove(err_path.c_str());
  return result;
}

std::vector<std::string> Lines(const std::string& text) {
  return absl::StrSplit(text, '\n', absl::SkipEmpty());
}

// Two rows of vocab 8 whose argmaxes are tokens 5 and 2 (runner-ups 1 and 6).
const std::vector<float>& TwoRows() {
  static const auto* const kRows = new std::vector<float>{
      0.0f, 3.0f, -1.0f, 0.5f, 0.0f, 4.0f, -2.0f, 1.0f,   // row 0: 5, then 1
      0.0f, 1.0f, 6.0f,  0.5f, 0.0f, 2.0f, 5.0f,  -1.0f,  // row 1: 2, then 6
  };
  return *kRows;
}

class CliTest : public ::testing::Test {
 protected:
  void StartDaemon(const std::vector<std::string>& extra_args = {}) {
    socket_path_ = UniqueTempPath("cli.sock");
    std::vector<std::string> args = {"--listen=127.0.0.1:0",
                                     absl::StrCat("--listen=unix:", socket_path_), "--threads=2"};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon =
        DaemonProcess::Start(TOKENSAMPLERD_PATH, args);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    ASSERT_THAT(daemon_->addresses(), SizeIs(2));
  }

  // Writes TwoRows() as a raw float32 file and returns its path.
  std::string WriteTwoRowsFile() {
    logits_path_ = UniqueTempPath("logits.f32");
    std::ofstream out(logits_path_, std::ios::binary);
    out << MakeLogits(TwoRows(), 8, v1::DTYPE_FLOAT32)->data();
    return logits_path_;
  }

  void TearDown() override {
    daemon_.reset();
    if (!socket_path_.empty()) std::remove(socket_path_.c_str());
    if (!logits_path_.empty()) std::remove(logits_path_.c_str());
  }

  std::string tcp() const { return daemon_->addresses()[0]; }
  std::string unix_socket() const { return daemon_->addresses()[1]; }

  std::unique_ptr<DaemonProcess> daemon_;
  std::string socket_path_;
  std::string logits_path_;
};

// --- the CLI ---

TEST_F(CliTest, HealthPrintsServingOnTcpAndUnix) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  for (const std::string& target : {tcp(), unix_socket()}) {
    const CliResult r = RunCli({"health", absl::StrCat("--target=", target)});
    EXPECT_EQ(r.exit_code, 0) << target << ": " << r.err;
    EXPECT_EQ(r.out, "SERVING\n") << target;
  }
  const CliResult sampler =
      RunCli({"health", "--target=" + tcp(), "--service=tokensampler.v1.Sampler"});
  EXPECT_EQ(sampler.exit_code, 0) << sampler.err;
  EXPECT_EQ(sampler.out, "SERVING\n");
}

TEST_F(CliTest, GreedyFromFileWithLogprobs) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  const std::string file = WriteTwoRowsFile();
  for (const std::string& target : {tcp(), unix_socket()}) {
    const CliResult r = RunCli({"sample", "--target=" + target, "--logits=" + file, "--vocab=8",
                                "--temperature=0", "--logprobs=2"});
    ASSERT_EQ(r.exit_code, 0) << target << ": " << r.err;
    const std::vector<std::string> lines = Lines(r.out);
    ASSERT_THAT(lines, SizeIs(2)) << r.out;
    EXPECT_THAT(lines[0], MatchesRegex("row 0 sample 0: token 5 logprob -[0-9.e-]+ "
                                       "\\[top: 5:-[0-9.e-]+ 1:-[0-9.e-]+\\] finish=none"));
    EXPECT_THAT(lines[1], MatchesRegex("row 1 sample 0: token 2 logprob -[0-9.e-]+ "
                                       "\\[top: 2:-[0-9.e-]+ 6:-[0-9.e-]+\\] finish=none"));
  }
}

TEST_F(CliTest, RawLogitsModeReportsTheLogitsAsSent) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  const std::string file = WriteTwoRowsFile();
  const CliResult r = RunCli({"sample", "--target=" + tcp(), "--logits=" + file, "--vocab=8",
                              "--temperature=0", "--logprobs=1", "--logprobs_mode=raw_logits"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(Lines(r.out),
              ElementsAre("row 0 sample 0: token 5 logprob 4 [top: 5:4] finish=none",
                          "row 1 sample 0: token 2 logprob 6 [top: 2:6] finish=none"));
}

TEST_F(CliTest, JsonOutput) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  const std::string file = WriteTwoRowsFile();
  const CliResult r = RunCli({"sample", "--target=" + tcp(), "--logits=" + file, "--vocab=8",
                              "--dtype=f32", "--temperature=0", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(Lines(r.out), SizeIs(1));
  EXPECT_THAT(r.out, AllOf(StartsWith("{\"results\":["), HasSubstr("\"token_id\":5"),
                           HasSubstr("\"token_id\":2"), HasSubstr("\"row_index\":1")));
}

TEST_F(CliTest, SeededRandomSamplingIsReproducibleAcrossTransportsAndDTypes) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  const std::vector<std::string> args = {"sample",        "--random",     "--rows=3",
                                         "--vocab=32000", "--seed=11",    "--sample_seed=7",
                                         "--n=4",         "--top_p=0.95", "--logprobs=3"};
  std::vector<std::string> on_tcp = args;
  on_tcp.push_back("--target=" + tcp());
  std::vector<std::string> on_unix = args;
  on_unix.push_back("--target=" + unix_socket());
  const CliResult first = RunCli(on_tcp);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_THAT(Lines(first.out), SizeIs(12));  // 3 rows × n = 4
  const CliResult again = RunCli(on_unix);
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(first.out, again.out);

  for (const char* dtype : {"--dtype=bf16", "--dtype=f16"}) {
    std::vector<std::string> half = on_tcp;
    half.push_back(dtype);
    const CliResult r = RunCli(half);
    EXPECT_EQ(r.exit_code, 0) << dtype << ": " << r.err;
    EXPECT_THAT(Lines(r.out), SizeIs(12)) << dtype;
  }
}

TEST_F(CliTest, InvalidArgumentPrintsTheServerMessageAndExitsOne) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  const CliResult r = RunCli({"sample", "--target=" + tcp(), "--random", "--vocab=8", "--top_p=0"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, StartsWith("error: INVALID_ARGUMENT: "));
  EXPECT_THAT(r.err, HasSubstr("top_p"));
  EXPECT_THAT(r.err, HasSubstr("got 0"));

  const CliResult bias =
      RunCli({"sample", "--target=" + tcp(), "--random", "--vocab=8", "--logit_bias=8:1"});
  EXPECT_EQ(bias.exit_code, 1);
  EXPECT_THAT(bias.err, StartsWith("error: INVALID_ARGUMENT: "));

  // The server keeps serving. Without --logprobs no logprob is printed.
  const CliResult ok = RunCli({"sample", "--target=" + tcp(), "--logits=" + WriteTwoRowsFile(),
                               "--vocab=8", "--preset=greedy"});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(ok.out,
            "row 0 sample 0: token 5 finish=none\n"
            "row 1 sample 0: token 2 finish=none\n");
}

TEST_F(CliTest, OversizedRequestIsResourceExhausted) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon({"--max_message_bytes=4096"}));
  const CliResult r = RunCli({"sample", "--target=" + tcp(), "--random", "--vocab=2048"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, StartsWith("error: RESOURCE_EXHAUSTED: "));
  const CliResult ok = RunCli({"sample", "--target=" + tcp(), "--random", "--vocab=64"});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
}

TEST_F(CliTest, StoppedServerIsUnavailable) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  const std::string target = tcp();
  absl::StatusOr<int> exit = daemon_->Stop(SIGTERM);
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(*exit, 0);
  const CliResult r = RunCli({"health", "--target=" + target, "--timeout_ms=5000"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, StartsWith("error: UNAVAILABLE: "));
}

// --- decode: the Session stream ---

// The greedy chain of the toy model from `first`: what `decode --temperature 0` must print.
std::vector<int32_t> GreedyToyChain(uint64_t seed, int32_t first, uint32_t vocab, int steps) {
  std::vector<int32_t> history = {first};
  for (int i = 0; i < steps; ++i) {
    const size_t size = history.size();
    const std::vector<float> row =
        cli::ToyModelLogits(seed, size >= 2 ? history[size - 2] : -1, history[size - 1], vocab);
    history.push_back(static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin()));
  }
  return std::vector<int32_t>(history.begin() + 1, history.end());
}

TEST_F(CliTest, DecodeGreedyFollowsTheToyModelOnBothTransports) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  for (const std::string& target : {tcp(), unix_socket()}) {
    const CliResult r = RunCli({"decode", "--target=" + target, "--vocab=64", "--sequences=3",
                                "--steps=5", "--temperature=0", "--seed=7"});
    ASSERT_EQ(r.exit_code, 0) << target << ": " << r.err;
    const std::vector<std::string> lines = Lines(r.out);
    ASSERT_THAT(lines, SizeIs(5 * 3 + 3)) << r.out;
    for (int seq = 0; seq < 3; ++seq) {
      const std::vector<int32_t> chain = GreedyToyChain(7, seq, 64, 5);
      for (int step = 0; step < 5; ++step) {
        EXPECT_EQ(lines[static_cast<size_t>(step * 3 + seq)],
                  absl::StrCat("step ", step, " sequence ", seq, ": token ",
                               chain[static_cast<size_t>(step)], " finish=none"));
      }
      EXPECT_EQ(lines[static_cast<size_t>(15 + seq)],
                absl::StrCat("sequence ", seq, ": ", absl::StrJoin(chain, " "), " finish=none"));
    }
  }
}

// decode --speculative with greedy decoding: the drafts are verified by the server and the
// tokens are exactly the greedy chain of the (target) toy model; the acceptance rate line counts
// the accepted drafts printed on the step lines.
TEST_F(CliTest, DecodeSpeculativeGreedyFollowsTheTargetModel) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  const CliResult r = RunCli({"decode", "--target=" + tcp(), "--vocab=500", "--sequences=2",
                              "--steps=6", "--temperature=0", "--seed=4", "--speculative=3"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<std::string> lines = Lines(r.out);
  ASSERT_THAT(lines, SizeIs(6 * 2 + 2 + 1)) << r.out;
  int accepted = 0;
  for (int i = 0; i < 12; ++i) {
    int a = 0;
    ASSERT_EQ(std::sscanf(lines[static_cast<size_t>(i)].c_str(),
                          "step %*d sequence %*d: accepted %d/3", &a),
              1)
        << lines[static_cast<size_t>(i)];
    accepted += a;
  }
  for (int seq = 0; seq < 2; ++seq) {
    const std::string& summary = lines[static_cast<size_t>(12 + seq)];
    ASSERT_THAT(summary, StartsWith(absl::StrCat("sequence ", seq, ": ")));
    const std::vector<std::string> words = absl::StrSplit(summary, ' ');
    const int tokens = static_cast<int>(words.size()) - 3;  // "sequence", "N:", …, "finish=none"
    ASSERT_GE(tokens, 6);
    const std::vector<int32_t> chain = GreedyToyChain(4, seq, 500, tokens);
    EXPECT_EQ(summary,
              absl::StrCat("sequence ", seq, ": ", absl::StrJoin(chain, " "), " finish=none"));
  }
  EXPECT_THAT(lines.back(), StartsWith(absl::StrCat("acceptance rate: ")));
  EXPECT_THAT(lines.back(), HasSubstr(absl::StrCat("(", accepted, " of 36 drafts accepted;")));
}

// The C++ client's Verify against the daemon: greedy drafts along the toy model's chain are all
// accepted and the bonus token follows; a bad draft is INVALID_ARGUMENT naming it.
TEST_F(CliTest, ClientVerifyAgainstTheDaemon) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  absl::StatusOr<Client> client = Client::Create(unix_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  const std::vector<int32_t> chain = GreedyToyChain(5, 0, 300, 4);
  v1::VerifyRequest request;
  v1::VerifyRow& row = *request.add_rows();
  row.mutable_params()->set_temperature(0.0f);
  row.add_prompt_token_ids(0);
  row.mutable_draft_token_ids()->Add(chain.begin(), chain.begin() + 3);
  std::vector<float> rows;
  std::vector<int32_t> history = {0};
  for (int j = 0; j <= 3; ++j) {
    const size_t size = history.size();
    const std::vector<float> r =
        cli::ToyModelLogits(5, size >= 2 ? history[size - 2] : -1, history[size - 1], 300);
    rows.insert(rows.end(), r.begin(), r.end());
    if (j < 3) history.push_back(chain[static_cast<size_t>(j)]);
  }
  *request.mutable_logits() = *MakeLogits(rows, 300, v1::DTYPE_BFLOAT16);
  absl::StatusOr<v1::VerifyResponse> response = client->Verify(request, kTimeout);
  ASSERT_TRUE(response.ok()) << response.status();
  ASSERT_EQ(response->results_size(), 1);
  EXPECT_EQ(response->results(0).num_accepted(), 3u);
  EXPECT_THAT(response->results(0).token_ids(),
              ElementsAre(chain[0], chain[1], chain[2], chain[3]));

  request.mutable_rows(0)->set_draft_token_ids(2, 300);
  response = client->Verify(request, kTimeout);
  EXPECT_EQ(response.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(response.status().message(),
            "rows[0].draft_token_ids[2] = 300 is out of range [0, 300)");
}

// Sampled: reproducible with --sample_seed, and the drafts are sent with their probabilities.
TEST_F(CliTest, DecodeSpeculativeSampledIsReproducible) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  const std::vector<std::string> args = {
      "decode",       "--target=" + unix_socket(), "--vocab=2000", "--sequences=3",
      "--steps=5",    "--sample_seed=9",           "--seed=1",     "--speculative=4",
      "--top_p=0.95", "--repetition_penalty=1.1"};
  const CliResult r = RunCli(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(Lines(r.out).back(),
              MatchesRegex("acceptance rate: [0-9.]+ \\([0-9]+ of 60 drafts accepted; [0-9.]+ "
                           "tokens per verification\\)"));
  EXPECT_EQ(RunCli(args).out, r.out);
}

TEST_F(CliTest, DecodeForksAreTheNSamplesOfSampleAndStopAtMaxTokens) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  const std::vector<std::string> args = {"decode",         "--target=" + unix_socket(),
                                         "--vocab=1000",   "--sequences=2",
                                         "--n=3",          "--sample_seed=11",
                                         "--max_tokens=2", "--steps=9",
                                         "--logprobs=1",   "--seed=3"};
  const CliResult r = RunCli(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<std::string> lines = Lines(r.out);
  // Two steps of six sequences (2 × (1 + 2 forks)), then a summary line each.
  ASSERT_THAT(lines, SizeIs(2 * 6 + 6)) << r.out;
  for (int i = 0; i < 6; ++i) {
    EXPECT_THAT(lines[static_cast<size_t>(6 + i)], EndsWith("finish=LENGTH"));
    EXPECT_THAT(lines[static_cast<size_t>(12 + i)], EndsWith("finish=LENGTH"));
  }
  // Seeded: the same run prints the same.
  EXPECT_EQ(RunCli(args).out, r.out);

  // Step 0 of sequence 1 (ids 3, 4, 5; prompt {1}) is Sample with n = 3 on the same row.
  absl::StatusOr<Client> client = Client::Create(unix_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  v1::SampleRequest request;
  *request.mutable_logits() =
      *MakeLogits(cli::ToyModelLogits(3, -1, 1, 1000), 1000, v1::DTYPE_FLOAT32);
  v1::SampleRow& row = *request.add_rows();
  row.mutable_params()->set_seed(11);
  row.mutable_params()->set_n(3);
  row.mutable_params()->set_max_tokens(2);
  row.mutable_params()->set_logprobs(1);
  row.add_prompt_token_ids(1);
  absl::StatusOr<v1::SampleResponse> want = client->Sample(request, kTimeout);
  ASSERT_TRUE(want.ok()) << want.status();
  for (int k = 0; k < 3; ++k) {
    EXPECT_THAT(lines[static_cast<size_t>(3 + k)],
                StartsWith(absl::StrCat("step 0 sequence ", 3 + k, ": token ",
                                        want->results(k).token_id(), " logprob ")));
  }
}

TEST_F(CliTest, DecodeJsonPrintsOneResponsePerStep) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  const CliResult r = RunCli({"decode", "--target=" + tcp(), "--vocab=32", "--steps=3", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<std::string> lines = Lines(r.out);
  ASSERT_THAT(lines, SizeIs(3));
  for (const std::string& line : lines) {
    EXPECT_THAT(line, StartsWith("{\"request_id\":"));
    EXPECT_THAT(line, HasSubstr("\"sequence_id\":\"1\""));
  }
}

TEST_F(CliTest, DecodeErrorsPrintTheServerMessageAndExitOne) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon({"--session_max_sequences=2"}));
  const CliResult bad_param = RunCli({"decode", "--target=" + tcp(), "--vocab=8", "--top_p=0"});
  EXPECT_EQ(bad_param.exit_code, 1);
  EXPECT_EQ(bad_param.out, "");
  EXPECT_EQ(bad_param.err,
            "error: INVALID_ARGUMENT: add[0].params.top_p must be in (0, 1], got 0\n");
  const CliResult too_many = RunCli({"decode", "--target=" + tcp(), "--vocab=8", "--sequences=3"});
  EXPECT_EQ(too_many.exit_code, 1);
  EXPECT_EQ(too_many.err,
            "error: RESOURCE_EXHAUSTED: add[2]: the session would hold 3 sequences; the limit "
            "is 2 (a beam search counts as beam_width sequences)\n");
}

// --- decode --beam-width: beam search through the Session stream ---

// cli::ToyModelLogits as a model of the reference beam search (tests/testing/beam_testing.h).
struct CliToyModel {
  uint64_t seed;
  uint32_t vocab;
  int32_t eos;
  std::vector<float> Logits(const std::vector<int32_t>& prompt,
                            const std::vector<int32_t>& output) const {
    std::vector<int32_t> history = prompt;
    history.insert(history.end(), output.begin(), output.end());
    const size_t size = history.size();
    return cli::ToyModelLogits(seed, size >= 2 ? history[size - 2] : -1, history[size - 1], vocab);
  }
};

TEST_F(CliTest, DecodeBeamWidthPrintsTheReferenceBeamsAndHypotheses) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  for (const char* stopping : {"heuristic", "never"}) {
    const CliResult r =
        RunCli({"decode", "--target=" + unix_socket(), "--vocab=64", "--sequences=2", "--steps=20",
                "--seed=5", "--beam-width", "4", "--max-tokens=8", "--eos-token-ids=1",
                "--num-return-sequences=3", "--length-penalty=1.5",
                std::string("--early-stopping=") + stopping});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    for (int seq = 0; seq < 2; ++seq) {
      testing::RefConfig c;
      c.width = 4;
      c.max_tokens = 8;
      c.num_return = 3;
      c.length_penalty = 1.5;
      c.stopping = std::string(stopping) == "never" ? testing::RefStopping::kNever
                                                    : testing::RefStopping::kHeuristic;
      const CliToyModel model{5, 64, 1};
      const testing::RefResult want = testing::ReferenceBeamSearch(model, {seq}, c);
      ASSERT_GE(want.min_margin, 1e-5);
      // What the CLI must print for this sequence, in order, with each score cut out (the
      // scores are compared within 1e-3: the printed ones are rounded to 4 decimals).
      std::vector<std::string> expected;
      std::vector<double> expected_scores;
      for (size_t step = 0; step < want.steps.size(); ++step) {
        for (size_t i = 0; i < want.steps[step].size(); ++i) {
          const auto& slot = want.steps[step][i];
          expected.push_back(absl::StrCat("step ", step, " sequence ", seq, " beam ", i,
                                          ": parent ", slot.parent, " token ", slot.token,
                                          " score #"));
          expected_scores.push_back(slot.score);
        }
      }
      for (size_t i = 0; i < want.hypotheses.size(); ++i) {
        const auto& h = want.hypotheses[i];
        expected.push_back(absl::StrCat("sequence ", seq, " hypothesis ", i, ": ",
                                        absl::StrJoin(h.tokens, " "),
                                        " score=# finish=", h.eos ? "EOS" : "LENGTH"));
        expected_scores.push_back(h.score);
      }
      std::vector<std::string> printed;
      std::vector<double> printed_scores;
      for (const std::string& line : Lines(r.out)) {
        if (!absl::StrContains(line, absl::StrCat("sequence ", seq, " "))) continue;
        // Cut the number after "score " / "score=" out.
        const size_t at = line.find("score") + 6;
        const size_t end = std::min(line.find(' ', at), line.size());
        double score = 0;
        EXPECT_TRUE(absl::SimpleAtod(line.substr(at, end - at), &score)) << line;
        printed.push_back(line.substr(0, at) + "#" + line.substr(end));
        printed_scores.push_back(score);
      }
      ASSERT_EQ(printed_scores.size(), expected_scores.size()) << r.out;
      for (size_t i = 0; i < printed_scores.size(); ++i) {
        EXPECT_NEAR(printed_scores[i], expected_scores[i], 1e-3) << printed[i];
      }
      EXPECT_EQ(printed, expected) << stopping << "\n" << r.out;
    }
  }
}

TEST_F(CliTest, DecodeBeamErrors) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon({"--max_beam_width=2"}));
  const CliResult wide = RunCli({"decode", "--target=" + tcp(), "--vocab=8", "--beam-width=4"});
  EXPECT_EQ(wide.exit_code, 1);
  EXPECT_EQ(wide.err,
            "error: INVALID_ARGUMENT: add[0].beam.beam_width must be in [1, 2] (the server's "
            "--max_beam_width), got 4\n");
  const CliResult bad_mode = RunCli(
      {"decode", "--target=" + tcp(), "--vocab=8", "--beam-width=2", "--early-stopping=soon"});
  EXPECT_EQ(bad_mode.exit_code, 1);
  EXPECT_THAT(bad_mode.err, HasSubstr("early_stopping"));
  EXPECT_THAT(bad_mode.err, HasSubstr("soon"));
  const CliResult no_width =
      RunCli({"decode", "--target=" + tcp(), "--vocab=8", "--num-return-sequences=2"});
  EXPECT_EQ(no_width.exit_code, 1);
  EXPECT_THAT(no_width.err, HasSubstr("need --beam_width"));
  const CliResult with_drafts =
      RunCli({"decode", "--target=" + tcp(), "--vocab=8", "--beam-width=2", "--speculative=3"});
  EXPECT_EQ(with_drafts.exit_code, 1);
  EXPECT_EQ(with_drafts.err,
            "error: INVALID_ARGUMENT: --speculative cannot be combined with --beam_width (drafts "
            "are verified for plain sequences only)\n");
}

// --- the C++ client library ---

TEST_F(CliTest, ClientSamplesEveryDTypeOnBothTransports) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  for (const std::string& target : {tcp(), unix_socket()}) {
    absl::StatusOr<Client> client = Client::Create(target);
    ASSERT_TRUE(client.ok()) << client.status();
    for (const v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16, v1::DTYPE_FLOAT16}) {
      v1::SampleRequest request;
      *request.mutable_logits() = *MakeLogits(TwoRows(), 8, dtype);
      for (int i = 0; i < 2; ++i) request.add_rows()->mutable_params()->set_temperature(0.0f);
      absl::StatusOr<v1::SampleResponse> response = client->Sample(request, kTimeout);
      ASSERT_TRUE(response.ok()) << target << " " << v1::DType_Name(dtype) << ": "
                                 << response.status();
      ASSERT_EQ(response->results_size(), 2);
      EXPECT_EQ(response->results(0).token_id(), 5) << v1::DType_Name(dtype);
      EXPECT_EQ(response->results(1).token_id(), 2) << v1::DType_Name(dtype);
      EXPECT_EQ(response->results(1).row_index(), 1u);
    }
  }
}

TEST_F(CliTest, ClientSeededRowsRepeat) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  absl::StatusOr<Client> client = Client::Create(unix_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  v1::SampleRequest request;
  std::vector<float> flat(1000, 0.0f);  // uniform: the seed alone decides
  *request.mutable_logits() = *MakeLogits(flat, 1000, v1::DTYPE_FLOAT32);
  v1::SamplingParams* params = request.add_rows()->mutable_params();
  params->set_seed(1234);
  params->set_n(8);
  absl::StatusOr<v1::SampleResponse> first = client->Sample(request, kTimeout);
  absl::StatusOr<v1::SampleResponse> second = client->Sample(request, kTimeout);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(first->results_size(), 8);
  std::vector<int32_t> a, b;
  for (const v1::SampledToken& t : first->results()) a.push_back(t.token_id());
  for (const v1::SampledToken& t : second->results()) b.push_back(t.token_id());
  EXPECT_EQ(a, b);
}

TEST_F(CliTest, ClientErrorsKeepCodeAndMessage) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon({"--max_message_bytes=4096"}));
  absl::StatusOr<Client> client = Client::Create(tcp());
  ASSERT_TRUE(client.ok()) << client.status();

  v1::SampleRequest bad;
  *bad.mutable_logits() = *MakeLogits(TwoRows(), 8, v1::DTYPE_FLOAT32);
  bad.add_rows()->mutable_params()->set_temperature(-1.0f);
  bad.add_rows();
  absl::StatusOr<v1::SampleResponse> invalid = client->Sample(bad, kTimeout);
  EXPECT_EQ(invalid.status().code(), absl::StatusCode::kInvalidArgument) << invalid.status();
  EXPECT_THAT(invalid.status().message(), HasSubstr("rows[0].params.temperature"));

  v1::SampleRequest big;
  *big.mutable_logits() = *MakeLogits(std::vector<float>(2048, 0.0f), 2048, v1::DTYPE_FLOAT32);
  big.add_rows();
  absl::StatusOr<v1::SampleResponse> exhausted = client->Sample(big, kTimeout);
  EXPECT_EQ(exhausted.status().code(), absl::StatusCode::kResourceExhausted) << exhausted.status();
}

TEST_F(CliTest, ClientHealth) {
  ASSERT_NO_FATAL_FAILURE(StartDaemon());
  absl::StatusOr<Client> client = Client::Create(unix_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<bool> overall = client->Health("", kTimeout);
  ASSERT_TRUE(overall.ok()) << overall.status();
  EXPECT_TRUE(*overall);
  absl::StatusOr<bool> sampler = client->Health("tokensampler.v1.Sampler", kTimeout);
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  EXPECT_TRUE(*sampler);
  EXPECT_EQ(client->Health("no.such.Service", kTimeout).status().code(),
            absl::StatusCode::kNotFound);

  ASSERT_TRUE(daemon_->Stop(SIGTERM).ok());
  EXPECT_EQ(client->Health("", kTimeout).status().code(), absl::StatusCode::kUnavailable);
}

// --- secured servers: TLS, mutual TLS, bearer tokens; the health-only port ---

TEST_F(CliTest, TalksToAMutualTlsServerWithABearerToken) {
  absl::StatusOr<tokensampler::testing::TestPki> pki =
      tokensampler::testing::TestPki::Generate(UniqueTempPath("cli_pki"));
  ASSERT_TRUE(pki.ok()) << pki.status();
  const std::string token_file = UniqueTempPath("cli_token.txt");
  std::ofstream(token_file) << "cli-secret\n";
  ASSERT_NO_FATAL_FAILURE(StartDaemon(
      {"--health_listen=127.0.0.1:0", absl::StrCat("--tls_cert=", pki->server_cert),
       absl::StrCat("--tls_key=", pki->server_key), absl::StrCat("--tls_client_ca=", pki->ca_cert),
       absl::StrCat("--auth_token_file=", token_file)}));
  const std::vector<std::string> tls = {absl::StrCat("--tls_ca=", pki->ca_cert),
                                        absl::StrCat("--tls_cert=", pki->client_cert),
                                        absl::StrCat("--tls_key=", pki->client_key)};
  const auto sample = [&](std::vector<std::string> extra) {
    std::vector<std::string> args = {"sample", "--target=" + tcp(),
                                     "--logits=" + WriteTwoRowsFile(), "--vocab=8",
                                     "--temperature=0"};
    args.insert(args.end(), extra.begin(), extra.end());
    return RunCli(args);
  };
  std::vector<std::string> secured = tls;
  secured.push_back(absl::StrCat("--auth_token_file=", token_file));
  const CliResult ok = sample(secured);
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(ok.out, "row 0 sample 0: token 5 finish=none\nrow 1 sample 0: token 2 finish=none\n");

  const CliResult no_token = sample(tls);
  EXPECT_EQ(no_token.exit_code, 1);
  EXPECT_THAT(no_token.err, StartsWith("error: UNAUTHENTICATED: missing bearer token"));

  const CliResult no_client_cert = sample(
      {absl::StrCat("--tls_ca=", pki->ca_cert), absl::StrCat("--auth_token_file=", token_file)});
  EXPECT_EQ(no_client_cert.exit_code, 1);
  EXPECT_THAT(no_client_cert.err, StartsWith("error: UNAVAILABLE: "));

  const CliResult plaintext = sample({absl::StrCat("--auth_token_file=", token_file)});
  EXPECT_EQ(plaintext.exit_code, 1);
  EXPECT_THAT(plaintext.err, StartsWith("error: UNAVAILABLE: "));

  // The Unix socket is plaintext; the token is still required there.
  const CliResult unix_ok = RunCli({"sample", "--target=" + unix_socket(), "--random", "--vocab=16",
                                    absl::StrCat("--auth_token_file=", token_file)});
  EXPECT_EQ(unix_ok.exit_code, 0) << unix_ok.err;

  // Probes: the health port needs neither TLS nor a token.
  const CliResult health =
      RunCli({"health", absl::StrCat("--target=", daemon_->health_addresses()[0])});
  EXPECT_EQ(health.exit_code, 0) << health.err;
  EXPECT_EQ(health.out, "SERVING\n");

  const CliResult missing_file = sample({"--auth_token_file=/nonexistent/token"});
  EXPECT_EQ(missing_file.exit_code, 1);
  EXPECT_THAT(missing_file.err, HasSubstr("--auth_token_file: cannot open"));
  std::remove(token_file.c_str());
  pki->Remove();
}

}  // namespace
}  // namespace tokensampler
