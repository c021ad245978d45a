// Fault tests against the real tokensamplerd binary over real gRPC on loopback: bytes that are
// not gRPC (garbage, HTTP/1.1, malformed HTTP/2 frames, bad HPACK, a gRPC message that claims
// 4 GiB, a body that is not protobuf, a connection cut mid-message), oversized messages on both
// RPCs, client processes killed mid-stream, thousands of sequences opened and never released,
// cancellations and deadlines under load, and SIGTERM under mixed unary + stream load. After
// every fault the daemon must still be up, answer the next calls correctly, and give back the
// memory and the state (its metrics gauges and its RSS from /proc).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/operations_testing.h"
#include "tests/testing/service_testing.h"
#include "tests/testing/session_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

#ifndef TOKENSAMPLERD_PATH
#error "TOKENSAMPLERD_PATH must name the tokensamplerd binary"
#endif
#ifndef TOKENSAMPLER_CLI_PATH
#error "TOKENSAMPLER_CLI_PATH must name the tokensampler CLI binary"
#endif

namespace tokensampler {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;
using ::tokensampler::testing::AddSequence;
using ::tokensampler::testing::CreateTestChannel;
using ::tokensampler::testing::DaemonProcess;
using ::tokensampler::testing::MakeRequest;
using ::tokensampler::testing::MetricSample;
using ::tokensampler::testing::ParsePrometheusText;
using ::tokensampler::testing::SetDeadline;
using ::tokensampler::testing::SetStep;
using ::tokensampler::testing::TestSession;
using ::tokensampler::testing::WaitFor;

// Whether this test (and so the daemon, built alike) runs under AddressSanitizer.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kAddressSanitizer = true;
#else
constexpr bool kAddressSanitizer = false;
#endif
#else
constexpr bool kAddressSanitizer = false;
#endif

// Resident set size of `pid` in KiB (VmRSS of /proc/<pid>/status), or -1.
int64_t RssKib(pid_t pid) {
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    absl::string_view rest = line;
    if (absl::ConsumePrefix(&rest, "VmRSS:")) {
      rest = absl::StripAsciiWhitespace(absl::StripSuffix(absl::StripAsciiWhitespace(rest), "kB"));
      int64_t kib = -1;
      return absl::SimpleAtoi(rest, &kib) ? kib : -1;
    }
  }
  return -1;
}

// A row of `vocab` logits whose argmax is `top`, so far ahead (e^40) that any draw at
// temperature 1 gives it: the drawn token is then known.
std::vector<float> Peaked(int top, int vocab) {
  std::vector<float> row(static_cast<size_t>(vocab), 0.0f);
  row[static_cast<size_t>(top)] = 40.0f;
  return row;
}

// ---------------------------------------------------------------------------------------------
// Raw bytes on the TCP socket.

// A blocking TCP connection to "127.0.0.1:port" whose reads time out after 200 ms.
class RawConnection {
 public:
  explicit RawConnection(const std::string& address) {
    const std::vector<std::string> parts = absl::StrSplit(address, ':');
    int port = 0;
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[1], &port)) return;
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    inet_pton(AF_INET, parts[0].c_str(), &addr.sin_addr);
    if (connect(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) != 0) {
      close(fd_);
      fd_ = -1;
      return;
    }
    timeval timeout{.tv_sec = 0, .tv_usec = 200000};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    const int one = 1;
    setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  ~RawConnection() {
    if (fd_ >= 0) close(fd_);
  }
  RawConnection(const RawConnection&) = delete;
  RawConnection& operator=(const RawConnection&) = delete;

  bool connected() const { return fd_ >= 0; }

  // Sends every byte (false when the server has closed the connection meanwhile: allowed).
  bool Send(const std::string& bytes) {
    size_t sent = 0;
    while (sent < bytes.size()) {
      const ssize_t n = send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) return false;
      sent += static_cast<size_t>(n);
    }
    return true;
  }

  // Reads what the server sends until it closes the connection or is quiet for 200 ms (at most
  // 5 s in all); returns the bytes.
  std::string Drain() {
    std::string out;
    char buffer[4096];
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (absl::Now() < deadline) {
      const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
      if (n <= 0) break;  // closed, reset or quiet
      out.append(buffer, static_cast<size_t>(n));
    }
    return out;
  }

 private:
  int fd_ = -1;
};

constexpr std::string_view kPreface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// One HTTP/2 frame: 24-bit length, type, flags, 31-bit stream id, payload. `length` overrides
// the real payload length (to lie about it).
std::string Frame(uint8_t type, uint8_t flags, uint32_t stream, const std::string& payload,
                  std::optional<uint32_t> length = std::nullopt) {
  const uint32_t len = length.value_or(static_cast<uint32_t>(payload.size()));
  std::string out;
  out.push_back(static_cast<char>((len >> 16) & 0xff));
  out.push_back(static_cast<char>((len >> 8) & 0xff));
  out.push_back(static_cast<char>(len & 0xff));
  out.push_back(static_cast<char>(type));
  out.push_back(static_cast<char>(flags));
  out.push_back(static_cast<char>((stream >> 24) & 0x7f));  // the reserved bit stays 0
  for (int shift : {16, 8, 0}) out.push_back(static_cast<char>((stream >> shift) & 0xff));
  return out + payload;
}

constexpr uint8_t kData = 0x0, kHeaders = 0x1, kSettings = 0x4, kPing = 0x6, kWindowUpdate = 0x8;
constexpr uint8_t kEndStream = 0x1, kEndHeaders = 0x4;

// HPACK "literal header field without indexing — new name", no Huffman coding (RFC 7541 6.2.2).
std::string Literal(std::string_view name, std::string_view value) {
  std::string out(1, '\0');
  out.push_back(static_cast<char>(name.size()));
  out.append(name);
  out.push_back(static_cast<char>(value.size()));
  out.append(value);
  return out;
}

// The HEADERS block of a gRPC call of `method` on stream 1.
std::string GrpcHeaders(std::string_view method) {
  return Frame(kHeaders, kEndHeaders, 1,
               Literal(":method", "POST") + Literal(":scheme", "http") + Literal(":path", method) +
                   Literal(":authority", "localhost") +
                   Literal("content-type", "application/grpc") + Literal("te", "trailers"));
}

// A gRPC length-prefixed message: compressed flag, 32-bit big-endian length, body.
std::string GrpcMessage(const std::string& body, std::optional<uint32_t> length = std::nullopt,
                        uint8_t compressed = 0) {
  const uint32_t len = length.value_or(static_cast<uint32_t>(body.size()));
  std::string out(1, static_cast<char>(compressed));
  for (int shift : {24, 16, 8, 0}) out.push_back(static_cast<char>((len >> shift) & 0xff));
  return out + body;
}

struct GarbageCase {
  std::string name;
  std::string bytes;
};

std::vector<GarbageCase> GarbageCases() {
  std::mt19937 rng(12);
  std::string noise(4096, '\0');
  for (char& c : noise) c = static_cast<char>(rng());
  const std::string preface = std::string(kPreface) + Frame(kSettings, 0, 0, "");
  v1::SampleRequest valid = MakeRequest({Peaked(3, 8)});
  const std::string sample = "/tokensampler.v1.Sampler/Sample";
  return {
      {"random bytes", noise},
      {"an HTTP/1.1 request", "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"},
      {"the preface alone, then silence", std::string(kPreface)},
      {"half a preface", std::string(kPreface.substr(0, 10))},
      {"preface then random bytes", preface + noise},
      {"DATA on stream 0", preface + Frame(kData, 0, 0, "abcd")},
      {"a frame longer than SETTINGS_MAX_FRAME_SIZE",
       preface + Frame(kData, 0, 1, "xyz", 0xffffff)},
      {"an unknown frame type", preface + Frame(0xee, 0xff, 3, noise.substr(0, 64))},
      {"HEADERS with an HPACK index that does not exist",
       preface + Frame(kHeaders, kEndHeaders, 1, "\xff\xff\xff\xff\x0f")},
      {"HEADERS on an even stream id", preface + Frame(kHeaders, kEndHeaders, 2, "\x82")},
      {"a zero WINDOW_UPDATE", preface + Frame(kWindowUpdate, 0, 0, std::string(4, '\0'))},
      {"a flood of PINGs",
       [&] {
         std::string out = preface;
         for (int i = 0; i < 2000; ++i) out += Frame(kPing, 0, 0, std::string(8, 'p'));
         return out;
       }()},
      {"a gRPC message that claims 4 GiB",
       preface + GrpcHeaders(sample) + Frame(kData, 0, 1, GrpcMessage("abc", 0xffffffffu))},
      {"a gRPC message that is not protobuf",
       preface + GrpcHeaders(sample) +
           Frame(kData, kEndStream, 1, GrpcMessage("\xff\xff\xff\xff\xff\xff\xff\xff\x01"))},
      {"a compressed message without an encoding",
       preface + GrpcHeaders(sample) +
           Frame(kData, kEndStream, 1, GrpcMessage(valid.SerializeAsString(), {}, 1))},
      {"a call cut in the middle of its message",
       preface + GrpcHeaders(sample) +
           Frame(kData, 0, 1, GrpcMessage(valid.SerializeAsString()).substr(0, 20))},
      {"a Session stream whose message is not protobuf",
       preface + GrpcHeaders("/tokensampler.v1.Sampler/Session") +
           Frame(kData, 0, 1, GrpcMessage("\x1a\xff\xff\xff\xff\x0f"))},
      {"an unknown method", preface + GrpcHeaders("/tokensampler.v1.Sampler/Nope") +
                                Frame(kData, kEndStream, 1, GrpcMessage(""))},
  };
}

class FaultTest : public ::testing::Test {
 protected:
  void StartDaemon(std::vector<std::string> args = {}) {
    args.insert(args.begin(), {"--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0"});
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon =
        DaemonProcess::Start(TOKENSAMPLERD_PATH, args);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
    stub_ = v1::Sampler::NewStub(CreateTestChannel(daemon_->addresses()[0]));
  }

  // A greedy Sample of a peaked row must give its argmax: the daemon is up and correct.
  void ExpectServesCorrectly(const std::string& after) {
    const int top = next_top_++ % 64;
    v1::SampleRequest request = MakeRequest({Peaked(top, 64)});
    grpc::ClientContext context;
    SetDeadline(context);
    v1::SampleResponse response;
    const grpc::Status status = stub_->Sample(&context, request, &response);
    ASSERT_TRUE(status.ok()) << "after " << after << ": " << status.error_message() << "\n"
                             << daemon_->Stderr();
    ASSERT_EQ(response.results_size(), 1) << "after " << after;
    EXPECT_EQ(response.results(0).token_id(), top) << "after " << after;
  }

  std::optional<double> Gauge(absl::string_view name, testing::Labels labels = {}) {
    absl::StatusOr<std::string> text = testing::HttpGet(daemon_->metrics_address());
    if (!text.ok()) return std::nullopt;
    absl::StatusOr<std::map<std::string, double>> samples = ParsePrometheusText(*text);
    if (!samples.ok()) return std::nullopt;
    return MetricSample(*samples, name, std::move(labels));
  }

  void ExpectCleanExit() {
    absl::StatusOr<int> exit = daemon_->Stop(SIGTERM, absl::Seconds(60));
    ASSERT_TRUE(exit.ok()) << exit.status();
    EXPECT_EQ(*exit, 0) << daemon_->Stderr();
  }

  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<v1::Sampler::Stub> stub_;
  int next_top_ = 5;
};

TEST_F(FaultTest, GarbageAndMalformedHttp2AreDroppedAndTheServerKeepsServing) {
  StartDaemon({"--threads=2"});
  ExpectServesCorrectly("start");
  // A connection that stays open, silent, through everything below.
  RawConnection idle(daemon_->addresses()[0]);
  ASSERT_TRUE(idle.connected());
  ASSERT_TRUE(idle.Send(std::string(kPreface)));
  for (const GarbageCase& c : GarbageCases()) {
    RawConnection connection(daemon_->addresses()[0]);
    ASSERT_TRUE(connection.connected()) << c.name;
    connection.Send(c.bytes);
    connection.Drain();
    ExpectServesCorrectly(c.name);
  }
  // The same faults many times, on connections opened together.
  for (int round = 0; round < 10; ++round) {
    std::vector<std::unique_ptr<RawConnection>> connections;
    for (const GarbageCase& c : GarbageCases()) {
      connections.push_back(std::make_unique<RawConnection>(daemon_->addresses()[0]));
      connections.back()->Send(c.bytes);
    }
    ExpectServesCorrectly(absl::StrCat("round ", round, " with every fault at once"));
  }
  // The last round's connections close as their objects go; the server ends their streams soon
  // after, not before this line.
  EXPECT_TRUE(WaitFor([&] { return Gauge("tokensampler_live_sessions") == 0.0; }))
      << "live sessions: " << Gauge("tokensampler_live_sessions").value_or(-1);
  ExpectCleanExit();
}

TEST_F(FaultTest, OversizedMessagesAreRefusedOnBothRpcsAndTheServerKeepsServing) {
  StartDaemon({"--max_message_bytes=65536"});
  const v1::SampleRequest big =
      MakeRequest(std::vector<std::vector<float>>(8, std::vector<float>(4096, 0.5f)));
  ASSERT_GT(big.ByteSizeLong(), 65536u);
  for (int i = 0; i < 5; ++i) {
    grpc::ClientContext context;
    SetDeadline(context);
    v1::SampleResponse response;
    const grpc::Status status = stub_->Sample(&context, big, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
    ExpectServesCorrectly("an oversized Sample");
  }
  {
    TestSession session(*stub_);
    v1::SessionRequest add;
    AddSequence(add, 1, v1::SamplingParams());
    session.CallOk(add);
    v1::SessionRequest step;
    SetStep(step, std::vector<std::vector<float>>(1, std::vector<float>(40000, 0.5f)), {1});
    ASSERT_GT(step.ByteSizeLong(), 65536u);
    session.Write(step);
    EXPECT_EQ(session.AwaitEnd().error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  }
  EXPECT_TRUE(WaitFor([&] {
    return Gauge("tokensampler_live_sessions") == 0.0 &&
           Gauge("tokensampler_live_sequences") == 0.0;
  }));
  ExpectServesCorrectly("an oversized Session step");
  ExpectCleanExit();
}

// ---------------------------------------------------------------------------------------------
// Clients that vanish.

TEST_F(FaultTest, KilledClientProcessesFreeTheirStreamsAndSequences) {
  StartDaemon({"--threads=2"});
  // Four `tokensampler decode` processes with (practically) endless steps, 5 sequences each.
  std::vector<pid_t> clients;
  for (int i = 0; i < 4; ++i) {
    std::vector<std::string> argv = {
        TOKENSAMPLER_CLI_PATH, "decode",        absl::StrCat("--target=", daemon_->addresses()[0]),
        "--vocab=64",          "--sequences=5", "--steps=4000000000"};
    std::vector<char*> ptrs;
    for (std::string& arg : argv) ptrs.push_back(arg.data());
    ptrs.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
    pid_t pid = -1;
    ASSERT_EQ(posix_spawn(&pid, ptrs[0], &actions, nullptr, ptrs.data(), environ), 0);
    posix_spawn_file_actions_destroy(&actions);
    clients.push_back(pid);
  }
  const bool decoding = WaitFor([&] {
    return Gauge("tokensampler_live_sessions") == 4.0 &&
           Gauge("tokensampler_live_sequences") == 20.0;
  });
  // Killed while stepping (their steps run back to back): mid-stream, often mid-request.
  for (pid_t pid : clients) kill(pid, SIGKILL);
  for (pid_t pid : clients) {
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFSIGNALED(status));
  }
  ASSERT_TRUE(decoding) << "the clients never had their 20 sequences live";
  EXPECT_TRUE(WaitFor([&] {
    return Gauge("tokensampler_live_sessions") == 0.0 &&
           Gauge("tokensampler_live_sequences") == 0.0 &&
           Gauge("tokensampler_requests_in_flight", {{"rpc", "Session"}}) == 0.0;
  })) << "state of killed clients not freed";
  ExpectServesCorrectly("killed clients");
  ExpectCleanExit();
}

TEST_F(FaultTest, ThousandsOfUnreleasedSequencesAreFreedWhenTheirStreamEnds) {
  // One sampling thread: the sequences' memory comes from one malloc arena, so a round's freed
  // memory is what the next round reuses (RSS is then a fair measure of a leak).
  StartDaemon({"--threads=1", "--session_idle_timeout_seconds=8"});
  constexpr int kSequences = 4000;
  constexpr int kPromptTokens = 4000;  // 4000 × 4000 × 4 bytes = 64 MB of histories per round
  constexpr int kPerRequest = 100;
  std::vector<int32_t> prompt(kPromptTokens);
  for (int i = 0; i < kPromptTokens; ++i) prompt[static_cast<size_t>(i)] = (i * 7919) % 32000;
  v1::SamplingParams params;
  params.set_seed(3);

  const int64_t rss_start = RssKib(daemon_->pid());
  std::vector<int64_t> rss_after;
  // Each round's stream ends another way; none releases its sequences.
  const std::vector<std::string> endings = {"half-close",   "cancel",     "deadline",
                                            "idle timeout", "half-close", "cancel"};
  for (const std::string& ending : endings) {
    SCOPED_TRACE(ending);
    {
      // The deadline round's deadline passes after its adds (about a second, a few under ASan)
      // and before the idle timeout.
      TestSession session(*stub_, ending == "deadline" ? absl::Seconds(5) : absl::Seconds(120));
      for (int first = 0; first < kSequences; first += kPerRequest) {
        v1::SessionRequest request;
        for (int id = first; id < first + kPerRequest; ++id) {
          AddSequence(request, static_cast<uint64_t>(id), params, prompt);
        }
        ASSERT_EQ(session.CallOk(request).error().code(), 0);
      }
      v1::SessionRequest step;
      SetStep(step, {Peaked(17, 32000)}, {123});
      const v1::SessionResponse stepped = session.CallOk(step);
      ASSERT_EQ(stepped.results_size(), 1);
      EXPECT_EQ(stepped.results(0).token_id(), 17);
      EXPECT_THAT(Gauge("tokensampler_live_sequences"), ::testing::Optional(double{kSequences}));
      const grpc::Status end = ending == "half-close" ? session.Close()
                               : ending == "cancel"   ? session.Cancel()
                                                      : session.AwaitEnd();
      EXPECT_EQ(end.error_code(), ending == "half-close" ? grpc::StatusCode::OK
                                  : ending == "cancel"   ? grpc::StatusCode::CANCELLED
                                  : ending == "deadline" ? grpc::StatusCode::DEADLINE_EXCEEDED
                                                         : grpc::StatusCode::RESOURCE_EXHAUSTED)
          << end.error_message();
    }
    ASSERT_TRUE(WaitFor([&] {
      return Gauge("tokensampler_live_sessions") == 0.0 &&
             Gauge("tokensampler_live_sequences") == 0.0;
    })) << "the stream's sequences were not released";
    ExpectServesCorrectly(ending);
    rss_after.push_back(RssKib(daemon_->pid()));
  }
  // Every round held 64 MB of histories; had they leaked, RSS would grow by that much per
  // round. Freed, the rounds after the first reuse the first one's memory.
  ASSERT_GT(rss_start, 0);
  std::string curve = absl::StrCat("daemon RSS (KiB) at start ", rss_start, ", after each round:");
  for (int64_t rss : rss_after) absl::StrAppend(&curve, " ", rss);
  std::printf("%s\n", curve.c_str());  // the figure for docs/reliability.md
  const int64_t first = rss_after.front();
  for (size_t i = 1; i < rss_after.size() && !kAddressSanitizer; ++i) {
    EXPECT_LT(rss_after[i], first + 32 * 1024)
        << "RSS after round " << i << " (" << endings[i] << "): " << rss_after[i]
        << " KiB; after round 0: " << first << " KiB; at start: " << rss_start << " KiB";
  }
  // Under ASan the freed histories sit in its quarantine (256 MB) on purpose, so RSS says
  // nothing; there the sanitized daemon's leak check at exit (exit code 23 on a leak) decides.
  ExpectCleanExit();
}

// ---------------------------------------------------------------------------------------------
// Cancellations and deadlines while others are served.

TEST_F(FaultTest, CancellationsAndDeadlinesUnderLoadLeaveEveryOtherCallCorrect) {
  StartDaemon({"--threads=2"});
  // Heavy calls (16 rows × 128k vocab, typical_p) that are cancelled or run out of time, next to
  // light calls that must all succeed with the right token.
  v1::SampleRequest heavy = MakeRequest(
      std::vector<std::vector<float>>(16, std::vector<float>(131072, 0.25f)), v1::DTYPE_BFLOAT16);
  for (v1::SampleRow& row : *heavy.mutable_rows()) row.mutable_params()->set_typical_p(0.9f);
  std::atomic<int> light_ok{0}, light_failed{0}, heavy_done{0};
  absl::Mutex mu;
  std::map<int, int> heavy_codes;
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      auto stub = v1::Sampler::NewStub(CreateTestChannel(daemon_->addresses()[0]));
      for (int i = 0; i < 12; ++i) {
        if (t % 2 == 0) {
          // Heavy: half with a deadline too short to finish, half cancelled by the client.
          grpc::ClientContext context;
          SetDeadline(context, absl::Milliseconds(t == 0 ? 1 : 60));
          v1::SampleResponse response;
          std::thread canceller;
          if (t == 4) {
            SetDeadline(context);
            canceller = std::thread([&context, i] {
              absl::SleepFor(absl::Milliseconds(1 + 7 * i));
              context.TryCancel();
            });
          }
          const grpc::Status status = stub->Sample(&context, heavy, &response);
          if (canceller.joinable()) canceller.join();
          absl::MutexLock lock(&mu);
          ++heavy_codes[status.error_code()];
          ++heavy_done;
        } else {
          const int top = (t * 100 + i) % 64;
          grpc::ClientContext context;
          SetDeadline(context);
          v1::SampleResponse response;
          const grpc::Status status =
              stub->Sample(&context, MakeRequest({Peaked(top, 64)}), &response);
          if (status.ok() && response.results_size() == 1 &&
              response.results(0).token_id() == top) {
            ++light_ok;
          } else {
            ++light_failed;
          }
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(light_failed.load(), 0);
  EXPECT_EQ(light_ok.load(), 36);
  EXPECT_EQ(heavy_done.load(), 36);
  for (const auto& [code, count] : heavy_codes) {
    EXPECT_THAT(code, AnyOf(grpc::StatusCode::OK, grpc::StatusCode::CANCELLED,
                            grpc::StatusCode::DEADLINE_EXCEEDED))
        << count << " heavy calls ended with code " << code;
  }
  EXPECT_GT(
      heavy_codes[grpc::StatusCode::CANCELLED] + heavy_codes[grpc::StatusCode::DEADLINE_EXCEEDED],
      0);
  // Nothing is left running or counted in flight.
  EXPECT_TRUE(WaitFor([&] {
    return Gauge("tokensampler_requests_in_flight", {{"rpc", "Sample"}}) == 0.0 &&
           Gauge("tokensampler_in_flight_bytes") == 0.0;
  }));
  ExpectServesCorrectly("cancellations and deadlines");
  ExpectCleanExit();
}

// ---------------------------------------------------------------------------------------------
// SIGTERM under mixed load.

TEST_F(FaultTest, SigtermUnderStreamAndUnaryLoadAnswersOrRefusesEveryRequestAndExitsZero) {
  StartDaemon({"--threads=2", "--drain_seconds=60"});
  constexpr int kVocab = 2048;
  // The token each session step expects (its rows peak there).
  const auto expected_token = [](int step, int s, size_t r) {
    return (static_cast<size_t>(step * 31 + s * 7) + r) % static_cast<size_t>(kVocab);
  };
  std::atomic<int> answered{0}, wrong{0};
  absl::Mutex mu;
  std::map<std::string, int> endings;  // how each client ended
  const auto record = [&](const std::string& what) {
    absl::MutexLock lock(&mu);
    ++endings[what];
  };
  std::vector<std::thread> threads;
  // Four Session streams stepping 8 sequences each, every token checked (greedy argmax).
  for (int s = 0; s < 4; ++s) {
    threads.emplace_back([&, s] {
      auto stub = v1::Sampler::NewStub(CreateTestChannel(daemon_->addresses()[0]));
      TestSession session(*stub);
      v1::SessionRequest add;
      std::vector<uint64_t> ids;
      v1::SamplingParams greedy;
      greedy.set_temperature(0.0f);
      for (uint64_t id = 0; id < 8; ++id) {
        AddSequence(add, id, greedy);
        ids.push_back(id);
      }
      if (!session.Write(add) || !session.Read().has_value()) {
        record("session refused at start");
        return;
      }
      for (int step = 0;; ++step) {
        std::vector<std::vector<float>> rows;
        for (size_t r = 0; r < ids.size(); ++r) {
          rows.push_back(Peaked(static_cast<int>(expected_token(step, s, r)), kVocab));
        }
        v1::SessionRequest request;
        SetStep(request, rows, ids);
        if (!session.Write(request)) break;
        std::optional<v1::SessionResponse> response = session.Read();
        if (!response.has_value()) break;
        ++answered;
        if (response->error().code() != 0 || response->results_size() != 8) {
          ++wrong;
          continue;
        }
        for (size_t r = 0; r < ids.size(); ++r) {
          if (response->results(static_cast<int>(r)).token_id() !=
              static_cast<int32_t>(expected_token(step, s, r))) {
            ++wrong;
          }
        }
      }
      const grpc::Status end = session.AwaitEnd();
      record(absl::StrCat("session ", end.error_code()));
    });
  }
  // Four unary callers.
  for (int u = 0; u < 4; ++u) {
    threads.emplace_back([&, u] {
      auto stub = v1::Sampler::NewStub(CreateTestChannel(daemon_->addresses()[0]));
      for (int i = 0;; ++i) {
        const int top = (u * 13 + i) % kVocab;
        std::vector<std::vector<float>> rows(16, Peaked(top, kVocab));
        grpc::ClientContext context;
        SetDeadline(context);
        v1::SampleResponse response;
        const grpc::Status status = stub->Sample(&context, MakeRequest(rows), &response);
        if (!status.ok()) {
          record(absl::StrCat("unary ", status.error_code() == grpc::StatusCode::CANCELLED
                                            ? "not admitted"
                                            : absl::StrCat(status.error_code())));
          return;
        }
        ++answered;
        if (response.results_size() != 16 || response.results(0).token_id() != top) ++wrong;
      }
    });
  }
  // The clients run until the daemon refuses them: SIGTERM whatever happens, then join.
  const bool loaded = WaitFor([&] { return answered.load() >= 200; });
  absl::StatusOr<int> exit = daemon_->Stop(SIGTERM, absl::Seconds(90));
  for (std::thread& thread : threads) thread.join();
  EXPECT_TRUE(loaded) << answered.load() << " answers before SIGTERM";
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(*exit, 0) << daemon_->Stderr();
  EXPECT_EQ(wrong.load(), 0);
  // Every stream ended with UNAVAILABLE (the drain) after its last answer. Every unary caller's
  // last call was refused with UNAVAILABLE (the drain, or no listener any more) — or, when it
  // reached the daemon in the moment gRPC's own shutdown began after the drain, was reset by
  // gRPC (CANCELLED) before our service saw it: gRPC cancels calls that arrive once
  // grpc::Server::Shutdown has started, before the client has read the GOAWAY. Such a call was
  // never admitted — the daemon cancelled none of the calls it admitted (calls_cancelled=0) —
  // so nothing admitted was lost; but the client sees CANCELLED, not UNAVAILABLE (open finding
  // of issue 12: service/server.cc's Shutdown would have to keep refusing until clients have
  // read the GOAWAY).
  const std::string unavailable = absl::StrCat(grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(endings["session " + unavailable], 4);
  EXPECT_EQ(endings["unary " + unavailable] + endings["unary not admitted"], 4);
  for (const auto& [ending, count] : endings) {
    EXPECT_THAT(ending, AnyOf("session " + unavailable, "unary " + unavailable,
                              std::string("unary not admitted")))
        << count << " clients";
  }
  EXPECT_THAT(daemon_->Stderr(), HasSubstr("calls_cancelled=0"));
}

}  // namespace
}  // namespace tokensampler
