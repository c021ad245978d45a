// Integration of Sampler.Session: the real tokensamplerd binary (its session flags, TCP and Unix
// socket, SIGTERM), the C++ SessionClient against it, and a client process that dies in the
// middle of a session (the `tokensampler decode` CLI, SIGKILLed) against an in-process Server
// whose live-session counters show that the state is freed.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/logits.h"
#include "client/session_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/server.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/beam_testing.h"
#include "tests/testing/service_testing.h"
#include "tests/testing/session_testing.h"

#ifndef TOKENSAMPLERD_PATH
#error "TOKENSAMPLERD_PATH must name the tokensamplerd binary"
#endif
#ifndef TOKENSAMPLER_CLI_PATH
#error "TOKENSAMPLER_CLI_PATH must name the tokensampler CLI binary"
#endif

namespace tokensampler {
namespace {

using ::testing::HasSubstr;
using ::testing::SizeIs;
using ::testing::StartsWith;
using ::tokensampler::testing::AddSequence;
using ::tokensampler::testing::CreateTestChannel;
using ::tokensampler::testing::DaemonProcess;
using ::tokensampler::testing::SetDeadline;
using ::tokensampler::testing::SetStep;
using ::tokensampler::testing::TestSession;
using ::tokensampler::testing::UniqueTempPath;
using ::tokensampler::testing::WaitUntil;

constexpr auto kWait = std::chrono::seconds(20);

// Starts `argv` with stdout to `out_path` ("" = discarded) and stderr discarded; returns the
// pid, or -1 (after a test failure) when it cannot start.
pid_t Spawn(std::vector<std::string> argv, const std::string& out_path = "") {
  std::vector<char*> argv_ptrs;
  for (std::string& arg : argv) argv_ptrs.push_back(arg.data());
  argv_ptrs.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO,
                                   out_path.empty() ? "/dev/null" : out_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = -1;
  const int rc = posix_spawn(&pid, argv[0].c_str(), &actions, nullptr, argv_ptrs.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    ADD_FAILURE() << "posix_spawn " << argv[0] << ": " << std::strerror(rc);
    return -1;
  }
  return pid;
}

// Waits (≤ 60 s, then SIGKILL) for `pid` to exit; its exit code, or 128 + the killing signal.
std::optional<int> WaitForExit(pid_t pid) {
  int status = 0;
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (waitpid(pid, &status, WNOHANG) == 0) {
    if (absl::Now() > deadline) {
      ADD_FAILURE() << "process " << pid << " did not exit within 60 s";
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return std::nullopt;
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return std::nullopt;
}

// A row of `vocab` logits whose largest entry is `top` (then top + 1, ...).
std::vector<float> Peaked(int top, int vocab = 16) {
  std::vector<float> row(static_cast<size_t>(vocab), 0.0f);
  for (int k = 0; k < 3; ++k)
    row[static_cast<size_t>((top + k) % vocab)] = 6.0f - 2.0f * static_cast<float>(k);
  return row;
}

v1::SamplingParams Seeded(uint64_t seed) {
  v1::SamplingParams p;
  p.set_seed(seed);
  p.set_repetition_penalty(1.3f);
  p.set_logprobs(0);
  return p;
}

class SessionDaemonTest : public ::testing::Test {
 protected:
  void StartDaemon(const std::vector<std::string>& extra_args = {}) {
    socket_path_ = UniqueTempPath("session.sock");
    std::vector<std::string> args = {"--listen=127.0.0.1:0",
                                     absl::StrCat("--listen=unix:", socket_path_), "--threads=2"};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon =
        DaemonProcess::Start(TOKENSAMPLERD_PATH, args);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    ASSERT_THAT(daemon_->addresses(), SizeIs(2));
  }

  void TearDown() override {
    daemon_.reset();
    if (!socket_path_.empty()) std::remove(socket_path_.c_str());
  }

  v1::SampleResponse SampleOk(const std::string& address, const v1::SampleRequest& request) {
    auto stub = v1::Sampler::NewStub(CreateTestChannel(address));
    grpc::ClientContext context;
    SetDeadline(context);
    v1::SampleResponse response;
    const grpc::Status status = stub->Sample(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  std::unique_ptr<DaemonProcess> daemon_;
  std::string socket_path_;
};

TEST_F(SessionDaemonTest, StepsMatchSampleOverTcpAndUnixSocket) {
  StartDaemon();
  for (const std::string& address : daemon_->addresses()) {
    auto stub = v1::Sampler::NewStub(CreateTestChannel(address));
    TestSession session(*stub);
    v1::SessionRequest add;
    AddSequence(add, 5, Seeded(3), {1, 2});
    session.CallOk(add);
    std::vector<int32_t> output;
    for (int step = 0; step < 6; ++step) {
      const std::vector<float> row = Peaked(step);
      v1::SessionRequest request;
      SetStep(request, {row}, {5}, v1::DTYPE_BFLOAT16);
      const v1::SessionResponse got = session.CallOk(request);
      v1::SampleRequest reference;
      *reference.mutable_logits() = tokensampler::testing::MakeLogits({row}, v1::DTYPE_BFLOAT16);
      v1::SampleRow& ref_row = *reference.add_rows();
      *ref_row.mutable_params() = Seeded(3);
      ref_row.add_prompt_token_ids(1);
      ref_row.add_prompt_token_ids(2);
      ref_row.mutable_output_token_ids()->Add(output.begin(), output.end());
      const v1::SampleResponse want = SampleOk(address, reference);
      ASSERT_EQ(got.results_size(), 1) << address;
      EXPECT_EQ(got.results(0).token_id(), want.results(0).token_id()) << address;
      EXPECT_EQ(got.results(0).logprob(), want.results(0).logprob()) << address;
      output.push_back(want.results(0).token_id());
    }
    EXPECT_TRUE(session.Close().ok()) << address;
  }
}

TEST_F(SessionDaemonTest, LimitFlagsGiveResourceExhaustedInTheResponse) {
  StartDaemon({"--session_max_sequences=3", "--session_max_history_tokens=10"});
  auto stub = v1::Sampler::NewStub(CreateTestChannel(daemon_->addresses()[1]));
  TestSession session(*stub);
  v1::SessionRequest four;
  for (uint64_t id = 1; id <= 4; ++id) AddSequence(four, id, Seeded(id));
  const v1::SessionResponse over = session.Call(four);
  EXPECT_EQ(over.error().code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(over.error().message(),
            "add[3]: the session would hold 4 sequences; the limit is 3 (a beam search counts as "
            "beam_width sequences)");
  v1::SessionRequest long_prompt;
  long_prompt.add_release(3);
  AddSequence(long_prompt, 9, Seeded(9), std::vector<int32_t>(11, 1));
  const v1::SessionResponse too_long = session.Call(long_prompt);
  EXPECT_EQ(too_long.error().code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(too_long.error().message(), "add[0]: prompt_token_ids has 11 tokens; the limit is 10");
  // The stream goes on: 1 and 2 step.
  v1::SessionRequest step;
  SetStep(step, {Peaked(1), Peaked(2)}, {1, 2});
  EXPECT_EQ(session.CallOk(step).results_size(), 2);
  EXPECT_TRUE(session.Close().ok());
}

TEST_F(SessionDaemonTest, IdleTimeoutFlagEndsTheStream) {
  StartDaemon({"--session_idle_timeout_seconds=1"});
  auto stub = v1::Sampler::NewStub(CreateTestChannel(daemon_->addresses()[0]));
  TestSession session(*stub);
  v1::SessionRequest add;
  AddSequence(add, 1, Seeded(1));
  AddSequence(add, 2, Seeded(2));
  session.CallOk(add);
  const grpc::Status status = session.AwaitEnd();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(status.error_message(),
            "the session stream was idle for more than 1s (--session_idle_timeout_seconds); its "
            "2 sequences are released");
}

TEST_F(SessionDaemonTest, SigtermEndsOpenStreamsWithUnavailableAndExitsCleanly) {
  // A drain deadline far beyond the test's own bounds: the streams must end by themselves.
  StartDaemon({"--drain_seconds=600"});
  std::vector<std::unique_ptr<v1::Sampler::Stub>> stubs;
  std::vector<std::unique_ptr<TestSession>> sessions;
  for (const std::string& address : daemon_->addresses()) {  // TCP and Unix socket
    stubs.push_back(v1::Sampler::NewStub(CreateTestChannel(address)));
    sessions.push_back(std::make_unique<TestSession>(*stubs.back()));
    v1::SessionRequest add;
    AddSequence(add, 1, Seeded(1));
    sessions.back()->CallOk(add);
  }
  std::future<absl::StatusOr<int>> exit =
      std::async(std::launch::async, [this] { return daemon_->Stop(SIGTERM, absl::Seconds(60)); });
  for (std::unique_ptr<TestSession>& session : sessions) {
    const grpc::Status status = session->AwaitEnd();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_THAT(status.error_message(), HasSubstr("shutting down"));
  }
  const absl::StatusOr<int> code = exit.get();
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0) << daemon_->Stderr();
  // The drain waited for both streams (calls_in_flight=2) and none had to be cancelled at its
  // deadline: they ended with their status within --drain_seconds.
  const std::string log = daemon_->Stderr();
  EXPECT_THAT(log, HasSubstr("event=drain calls_in_flight=2"));
  EXPECT_THAT(log, HasSubstr("event=drained calls_cancelled=0"));
  EXPECT_THAT(log, HasSubstr("event=rpc_error rpc=Session code=UNAVAILABLE"));
  EXPECT_THAT(log, HasSubstr("event=stop"));
}

TEST_F(SessionDaemonTest, SessionNeedsTheBearerTokenWhenAuthIsOn) {
  const std::string token_file = UniqueTempPath("tokens.txt");
  {
    std::ofstream out(token_file);
    out << "session-daemon-token\n";
  }
  StartDaemon({absl::StrCat("--auth_token_file=", token_file)});
  for (const std::string& address : daemon_->addresses()) {
    auto stub = v1::Sampler::NewStub(CreateTestChannel(address));
    {
      TestSession session(*stub);
      v1::SessionRequest add;
      AddSequence(add, 1, Seeded(1));
      session.Write(add);  // may already fail: the server ends the stream at once
      EXPECT_EQ(session.AwaitEnd().error_code(), grpc::StatusCode::UNAUTHENTICATED) << address;
    }
    // The C++ SessionClient sends the client's token with the stream.
    ClientOptions options;
    options.bearer_token = "session-daemon-token";
    absl::StatusOr<Client> client = Client::Create(address, options);
    ASSERT_TRUE(client.ok()) << client.status();
    std::unique_ptr<SessionClient> session = SessionClient::Open(*client);
    EXPECT_TRUE(session->Add(1, Seeded(1), {1, 2}).get().ok()) << address;
    absl::StatusOr<std::vector<v1::SequenceResult>> step =
        session->Step(*MakeLogits(Peaked(1), 16, v1::DTYPE_FLOAT32), std::vector<uint64_t>{1})
            .get();
    ASSERT_TRUE(step.ok()) << address << ": " << step.status();
    EXPECT_THAT(*step, SizeIs(1));
    EXPECT_TRUE(session->Close().ok()) << address;
    // Without the token, the first call fails with UNAUTHENTICATED.
    absl::StatusOr<Client> anonymous = Client::Create(address);
    ASSERT_TRUE(anonymous.ok()) << anonymous.status();
    std::unique_ptr<SessionClient> refused = SessionClient::Open(*anonymous);
    EXPECT_EQ(refused->Add(1, Seeded(1), {1, 2}).get().code(), absl::StatusCode::kUnauthenticated);
  }
  std::remove(token_file.c_str());
}

// ---------------------------------------------------------------------------------------------
// SessionClient (client/session_client.h) against the daemon.

TEST_F(SessionDaemonTest, SessionClientAddForkStepReleaseMatchSample) {
  StartDaemon();
  absl::StatusOr<Client> client = Client::Create(daemon_->addresses()[1]);
  ASSERT_TRUE(client.ok()) << client.status();
  std::unique_ptr<SessionClient> session = SessionClient::Open(*client);
  const std::vector<int32_t> prompt = {4, 5};
  ASSERT_TRUE(session->Add(1, Seeded(8), prompt).get().ok());
  ASSERT_TRUE(session->Fork(1, std::vector<uint64_t>{2, 3}).get().ok());

  // The first step of 1, 2, 3 is Sample with n = 3 on the same row.
  const std::vector<float> row = Peaked(3);
  std::vector<float> rows;
  for (int i = 0; i < 3; ++i) rows.insert(rows.end(), row.begin(), row.end());
  absl::StatusOr<std::vector<v1::SequenceResult>> results =
      session->Step(*MakeLogits(rows, 16, v1::DTYPE_FLOAT32), std::vector<uint64_t>{1, 2, 3}).get();
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_THAT(*results, SizeIs(3));
  v1::SampleRequest reference;
  *reference.mutable_logits() = *MakeLogits(row, 16, v1::DTYPE_FLOAT32);
  v1::SampleRow& ref_row = *reference.add_rows();
  *ref_row.mutable_params() = Seeded(8);
  ref_row.mutable_params()->set_n(3);
  ref_row.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
  absl::StatusOr<v1::SampleResponse> want = client->Sample(reference, absl::Seconds(20));
  ASSERT_TRUE(want.ok()) << want.status();
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ((*results)[static_cast<size_t>(i)].sequence_id(), static_cast<uint64_t>(i + 1));
    EXPECT_EQ((*results)[static_cast<size_t>(i)].token_id(), want->results(i).token_id()) << i;
  }

  ASSERT_TRUE(session->Release(std::vector<uint64_t>{2, 3}).get().ok());
  const absl::Status gone = session->Release(std::vector<uint64_t>{2}).get();
  EXPECT_EQ(gone.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(gone.message(), "release[0]: sequence 2 is not in this session");
  EXPECT_TRUE(session->Close().ok());
  // After Close every call fails at once.
  EXPECT_EQ(session->Add(7, Seeded(7)).get().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(SessionDaemonTest, SessionClientBeamSearchMatchesTheReference) {
  StartDaemon();
  absl::StatusOr<Client> client = Client::Create(daemon_->addresses()[1]);
  ASSERT_TRUE(client.ok()) << client.status();
  std::unique_ptr<SessionClient> session = SessionClient::Open(*client);
  testing::ToyBeamModel model;
  model.seed = 21;
  model.vocab = 40;
  model.eos = 2;
  testing::RefConfig c;
  c.width = 3;
  c.num_return = 3;
  c.max_tokens = 9;
  c.length_penalty = 0.0;
  const std::vector<int32_t> prompt = {8, 9};
  const testing::RefResult want = testing::ReferenceBeamSearch(model, prompt, c);
  ASSERT_GE(want.min_margin, 1e-5);
  v1::SamplingParams params;
  params.add_eos_token_ids(2);
  params.set_max_tokens(9);
  v1::BeamSearchParams beam;
  beam.set_beam_width(3);
  beam.set_num_return_sequences(3);
  beam.set_length_penalty(0.0f);
  ASSERT_TRUE(session->AddBeamSearch(5, params, beam, prompt).get().ok());
  // Pipelined with a plain sequence in the same steps (rows: its row first, then the beams').
  ASSERT_TRUE(session->Add(6, Seeded(3), {1}).get().ok());
  std::vector<std::vector<int32_t>> histories = {{}};
  for (size_t step = 0;; ++step) {
    ASSERT_LT(step, want.steps.size());
    std::vector<float> rows = Peaked(1, 40);
    for (const auto& h : histories) {
      const std::vector<float> row = model.Logits(prompt, h);
      rows.insert(rows.end(), row.begin(), row.end());
    }
    absl::StatusOr<std::vector<v1::SequenceResult>> results =
        session->Step(*MakeLogits(rows, 40, v1::DTYPE_FLOAT32), std::vector<uint64_t>{6, 5}).get();
    ASSERT_TRUE(results.ok()) << results.status();
    ASSERT_THAT(*results, SizeIs(2));
    const v1::SequenceResult& r = (*results)[1];
    ASSERT_EQ(r.sequence_id(), 5u);
    ASSERT_EQ(r.beams_size(), static_cast<int>(want.steps[step].size()));
    std::vector<std::vector<int32_t>> next;
    for (int i = 0; i < r.beams_size(); ++i) {
      EXPECT_EQ(r.beams(i).parent_beam(), want.steps[step][static_cast<size_t>(i)].parent);
      EXPECT_EQ(r.beams(i).token_id(), want.steps[step][static_cast<size_t>(i)].token);
      next.push_back(histories.at(r.beams(i).parent_beam()));
      next.back().push_back(r.beams(i).token_id());
    }
    histories = std::move(next);
    if (r.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      ASSERT_EQ(r.hypotheses_size(), static_cast<int>(want.hypotheses.size()));
      for (int i = 0; i < r.hypotheses_size(); ++i) {
        EXPECT_EQ(std::vector<int32_t>(r.hypotheses(i).token_ids().begin(),
                                       r.hypotheses(i).token_ids().end()),
                  want.hypotheses[static_cast<size_t>(i)].tokens);
      }
      break;
    }
  }
  EXPECT_TRUE(session->Close().ok());
}

TEST_F(SessionDaemonTest, MaxBeamWidthComesFromFlagOrEnvironment) {
  socket_path_ = UniqueTempPath("session.sock");
  absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon =
      DaemonProcess::Start(TOKENSAMPLERD_PATH, {"--listen=127.0.0.1:0"}, absl::Seconds(30),
                           {"TOKENSAMPLER_MAX_BEAM_WIDTH=2"});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  absl::StatusOr<Client> client = Client::Create((*daemon)->addresses()[0]);
  ASSERT_TRUE(client.ok()) << client.status();
  std::unique_ptr<SessionClient> session = SessionClient::Open(*client);
  v1::BeamSearchParams beam;
  beam.set_beam_width(3);
  const absl::Status wide = session->AddBeamSearch(1, v1::SamplingParams(), beam).get();
  EXPECT_EQ(wide.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(wide.message(),
            "add[0].beam.beam_width must be in [1, 2] (the server's --max_beam_width), got 3");
  beam.set_beam_width(2);
  EXPECT_TRUE(session->AddBeamSearch(1, v1::SamplingParams(), beam).get().ok());
  EXPECT_TRUE(session->Close().ok());
  // A bad value stops the daemon naming the flag.
  EXPECT_THAT(
      DaemonProcess::Start(TOKENSAMPLERD_PATH, {"--listen=127.0.0.1:0", "--max_beam_width=0"})
          .status()
          .message(),
      HasSubstr("--max_beam_width must be >= 1, got 0"));
}

TEST_F(SessionDaemonTest, SessionClientPipelinesAndEachFutureGetsItsOwnAnswer) {
  StartDaemon();
  absl::StatusOr<Client> client = Client::Create(daemon_->addresses()[0]);
  ASSERT_TRUE(client.ok()) << client.status();
  std::unique_ptr<SessionClient> session = SessionClient::Open(*client);
  v1::SamplingParams greedy;
  greedy.set_temperature(0.0f);
  // Sent without waiting: an add, ten steps, a failing add, and a step after it.
  std::future<absl::Status> added = session->Add(1, greedy);
  std::vector<std::future<absl::StatusOr<std::vector<v1::SequenceResult>>>> steps;
  for (int i = 0; i < 10; ++i) {
    steps.push_back(
        session->Step(*MakeLogits(Peaked(i), 16, v1::DTYPE_FLOAT16), std::vector<uint64_t>{1}));
  }
  std::future<absl::Status> duplicate = session->Add(1, greedy);
  std::future<absl::StatusOr<std::vector<v1::SequenceResult>>> last =
      session->Step(*MakeLogits(Peaked(15), 16, v1::DTYPE_FLOAT32), std::vector<uint64_t>{1});
  EXPECT_TRUE(added.get().ok());
  for (int i = 0; i < 10; ++i) {
    absl::StatusOr<std::vector<v1::SequenceResult>> result = steps[static_cast<size_t>(i)].get();
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ((*result)[0].token_id(), i) << "greedy picks the peak of step " << i;
  }
  const absl::Status exists = duplicate.get();
  EXPECT_EQ(exists.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(exists.message(), "add[0]: sequence 1 already exists");
  absl::StatusOr<std::vector<v1::SequenceResult>> after = last.get();
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ((*after)[0].token_id(), 15);
  EXPECT_TRUE(session->Close().ok());
}

TEST_F(SessionDaemonTest, SessionClientReportsTheEndOfTheStream) {
  StartDaemon({"--session_idle_timeout_seconds=1"});
  absl::StatusOr<Client> client = Client::Create(daemon_->addresses()[1]);
  ASSERT_TRUE(client.ok()) << client.status();
  std::unique_ptr<SessionClient> session = SessionClient::Open(*client);
  ASSERT_TRUE(session->Add(1, Seeded(1)).get().ok());
  std::shared_future<absl::Status> ended = session->Ended();
  ASSERT_EQ(ended.wait_for(kWait), std::future_status::ready);
  EXPECT_EQ(ended.get().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(ended.get().message(), HasSubstr("idle for more than 1s"));
  // Later calls fail with the stream's status; Close() returns it.
  const absl::Status later = session->Release(std::vector<uint64_t>{1}).get();
  EXPECT_EQ(later.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(session->Close().code(), absl::StatusCode::kResourceExhausted);
}

TEST(SessionClientTest, UnreachableServerFailsTheFirstCallWithUnavailable) {
  absl::StatusOr<Client> client = Client::Create(absl::StrCat("unix:", UniqueTempPath("none")));
  ASSERT_TRUE(client.ok()) << client.status();
  std::unique_ptr<SessionClient> session = SessionClient::Open(*client);
  std::future<absl::Status> added = session->Add(1, Seeded(1));
  ASSERT_EQ(added.wait_for(kWait), std::future_status::ready);
  EXPECT_EQ(added.get().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(session->Ended().get().code(), absl::StatusCode::kUnavailable);
}

// An in-process server on 127.0.0.1:0, whose session counters the test can read.
absl::StatusOr<std::unique_ptr<service::Server>> StartInProcessServer() {
  service::ServerOptions options;
  options.listen_addresses = {"127.0.0.1:0"};
  options.threads = 1;
  return service::Server::Start(options);
}

TEST(SessionClientTest, DestroyingAnOpenSessionCancelsIt) {
  absl::StatusOr<std::unique_ptr<service::Server>> server = StartInProcessServer();
  ASSERT_TRUE(server.ok()) << server.status();
  absl::StatusOr<Client> client = Client::Create((*server)->bound_addresses()[0]);
  ASSERT_TRUE(client.ok()) << client.status();
  {
    std::unique_ptr<SessionClient> session = SessionClient::Open(*client);
    ASSERT_TRUE(session->Add(1, Seeded(1)).get().ok());
    EXPECT_EQ((*server)->service().live_sequences(), 1);
  }
  EXPECT_TRUE(WaitUntil([&] {
    return (*server)->service().live_sessions() == 0 && (*server)->service().live_sequences() == 0;
  }));
}

// ---------------------------------------------------------------------------------------------
// A client process that dies: its connection drops, the server cancels the stream and frees it.

TEST(SessionClientProcessTest, KilledClientProcessFreesItsSessionState) {
  absl::StatusOr<std::unique_ptr<service::Server>> server = StartInProcessServer();
  ASSERT_TRUE(server.ok()) << server.status();
  const service::SamplerService& service = (*server)->service();

  // `tokensampler decode` with (practically) endless steps.
  const pid_t pid = Spawn({TOKENSAMPLER_CLI_PATH, "decode",
                           absl::StrCat("--target=", (*server)->bound_addresses()[0]), "--vocab=16",
                           "--sequences=3", "--steps=4000000000"});
  ASSERT_GT(pid, 0);

  const bool decoding =
      WaitUntil([&] { return service.live_sessions() == 1 && service.live_sequences() == 3; });
  kill(pid, SIGKILL);
  EXPECT_EQ(WaitForExit(pid), 128 + SIGKILL);
  ASSERT_TRUE(decoding) << "the CLI never had its 3 sequences live";
  EXPECT_TRUE(WaitUntil([&] {
    return service.live_sessions() == 0 && service.live_sequences() == 0;
  })) << service.live_sessions()
      << " sessions, " << service.live_sequences() << " sequences";
}

// ---------------------------------------------------------------------------------------------
// The session flags at start-up.

TEST(SessionDaemonStartupTest, BadSessionFlagsExitWithOneNamingTheFlag) {
  for (const std::string flag :
       {"--session_max_sequences=0", "--session_max_history_tokens=-5",
        "--session_idle_timeout_seconds=-1", "--keepalive_time_seconds=0"}) {
    std::string log;
    absl::StatusOr<int> exit =
        DaemonProcess::RunToExit(TOKENSAMPLERD_PATH, {"--listen=127.0.0.1:0", flag}, &log);
    ASSERT_TRUE(exit.ok()) << exit.status();
    EXPECT_EQ(*exit, 1) << flag << "\n" << log;
    EXPECT_THAT(log, HasSubstr("event=error")) << flag;
    EXPECT_THAT(log, HasSubstr(flag.substr(0, flag.find('=')))) << log;
  }
}

TEST(SessionDaemonStartupTest, HelpListsTheSessionFlags) {
  const std::string out_path = UniqueTempPath("help.txt");
  const pid_t pid = Spawn({TOKENSAMPLERD_PATH, "--help"}, out_path);
  ASSERT_GT(pid, 0);
  const std::optional<int> exit = WaitForExit(pid);
  const std::string help = tokensampler::testing::ReadWholeFile(out_path);
  std::remove(out_path.c_str());
  ASSERT_TRUE(exit.has_value());
  for (const char* flag : {"--session_max_sequences", "--session_max_history_tokens",
                           "--session_idle_timeout_seconds", "--keepalive_time_seconds"}) {
    EXPECT_THAT(help, HasSubstr(flag));
  }
  EXPECT_THAT(help, HasSubstr("default: 4096"));
  EXPECT_THAT(help, HasSubstr("default: 1048576"));
  EXPECT_THAT(help, HasSubstr("default: 300"));
}

TEST(SessionDaemonStartupTest, SessionFlagsAreLoggedAtStart) {
  absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = DaemonProcess::Start(
      TOKENSAMPLERD_PATH,
      {"--listen=127.0.0.1:0", "--session_max_sequences=10", "--session_max_history_tokens=100",
       "--session_idle_timeout_seconds=0", "--keepalive_time_seconds=5", "--max_beam_width=3"});
  ASSERT_TRUE(daemon.ok()) << daemon.status();
  EXPECT_THAT((*daemon)->Stderr(),
              HasSubstr("session_max_sequences=10 session_max_history_tokens=100 "
                        "session_idle_timeout_seconds=0 keepalive_time_seconds=5 "
                        "max_beam_width=3"));
  absl::StatusOr<int> stopped = (*daemon)->Stop();
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  EXPECT_EQ(*stopped, 0);
}

}  // namespace
}  // namespace tokensampler
