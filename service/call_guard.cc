#include "service/call_guard.h"

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace tokensampler::service {
namespace {

constexpr absl::string_view kBearerPrefix = "bearer ";

// Compares without an early exit, so the time taken does not tell how much of a guess matched.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff = static_cast<unsigned char>(diff | (x ^ y));
  }
  return diff == 0;
}

// Client mistakes and overload are warnings; our own failures are errors.
LogLevel LevelOf(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInternal:
    case absl::StatusCode::kUnknown:
    case absl::StatusCode::kDataLoss:
      return LogLevel::kError;
    default:
      return LogLevel::kWarning;
  }
}

double Milliseconds(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

}  // namespace

CallGuard::CallGuard(CallGuardOptions options, Metrics& metrics, Logger* logger)
    : options_(std::move(options)), metrics_(metrics), logger_(logger) {}

CallGuard::~CallGuard() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](int* in_flight) { return *in_flight == 0; }, &tasks_in_flight_));
}

absl::StatusOr<CallGuard::Call> CallGuard::OpenCall(const grpc::CallbackServerContext& context,
                                                    RpcMetrics& rpc) {
  rpc.CallStarted();
  std::string peer = context.peer();
  absl::Status refusal;
  absl::string_view reason;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) {
      refusal = absl::UnavailableError(
          "the server is draining (shutting down); retry on another instance");
      reason = "draining";
    }
  }
  if (refusal.ok()) {
    refusal = Authenticate(context);
    reason = "unauthenticated";
  }
  if (!refusal.ok()) {
    rpc.Rejected(reason);
    rpc.CallHandled(refusal.code());
    LogError(rpc, peer, refusal);
    return refusal;
  }
  {
    absl::MutexLock lock(&mu_);
    ++open_calls_;
  }
  rpc.CallOpened();
  return Call(*this, rpc, std::move(peer));
}

absl::Status CallGuard::Authenticate(const grpc::CallbackServerContext& context) const {
  if (options_.auth_tokens.empty()) return absl::OkStatus();
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError(
        "missing bearer token: send the metadata \"authorization: Bearer <token>\"");
  }
  const absl::string_view value(it->second.data(), it->second.size());
  if (value.size() <= kBearerPrefix.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kBearerPrefix.size()), kBearerPrefix)) {
    return absl::UnauthenticatedError("the authorization metadata must be \"Bearer <token>\"");
  }
  const absl::string_view token = value.substr(kBearerPrefix.size());
  bool match = false;
  for (const std::string& accepted : options_.auth_tokens) {
    match |= ConstantTimeEquals(token, accepted);
  }
  if (!match) return absl::UnauthenticatedError("invalid bearer token");
  return absl::OkStatus();
}

void CallGuard::StartDrain() {
  std::map<int64_t, std::function<void()>> subscribers;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) return;
    draining_ = true;
    subscribers = drain_subscribers_;
    notifying_ = true;
    notifying_thread_ = std::this_thread::get_id();
  }
  for (auto& [id, on_drain] : subscribers) {
    bool still_subscribed = false;
    {
      absl::MutexLock lock(&mu_);
      still_subscribed = drain_subscribers_.count(id) > 0;
    }
    if (still_subscribed) on_drain();
  }
  absl::MutexLock lock(&mu_);
  notifying_ = false;
}

bool CallGuard::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

int CallGuard::WaitForIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithDeadline(absl::Condition(
                            +[](int* open) { return *open == 0; }, &open_calls_),
                        deadline);
  return open_calls_;
}

int CallGuard::open_calls() const {
  absl::MutexLock lock(&mu_);
  return open_calls_;
}

int64_t CallGuard::SubscribeDrain(std::function<void()> on_drain) {
  int64_t id = 0;
  {
    absl::MutexLock lock(&mu_);
    id = next_subscription_++;
    if (!draining_) {
      drain_subscribers_.emplace(id, std::move(on_drain));
      return id;
    }
  }
  on_drain();
  return id;
}

void CallGuard::UnsubscribeDrain(int64_t id) {
  absl::MutexLock lock(&mu_);
  drain_subscribers_.erase(id);
  if (notifying_ && notifying_thread_ != std::this_thread::get_id()) {
    mu_.Await(absl::Condition(
        +[](bool* notifying) { return !*notifying; }, &notifying_));
  }
}

void CallGuard::Enqueue(tbb::task_arena& arena, std::function<void()> task) {
  {
    absl::MutexLock lock(&mu_);
    ++tasks_in_flight_;
  }
  arena.enqueue([this, task = std::move(task)] {
    task();
    absl::MutexLock lock(&mu_);
    --tasks_in_flight_;
  });
}

absl::Status CallGuard::Reserve(RpcMetrics& rpc, int64_t bytes) {
  absl::MutexLock lock(&mu_);
  if (options_.max_concurrent_requests > 0 &&
      requests_in_flight_ >= options_.max_concurrent_requests) {
    rpc.Rejected("concurrency");
    return absl::ResourceExhaustedError(absl::StrCat(
        "server overloaded: ", requests_in_flight_, " requests in flight, max_concurrent_requests=",
        options_.max_concurrent_requests, "; retry with backoff"));
  }
  if (options_.max_inflight_bytes > 0 && requests_in_flight_ > 0 &&
      bytes_in_flight_ + bytes > options_.max_inflight_bytes) {
    rpc.Rejected("bytes");
    return absl::ResourceExhaustedError(absl::StrCat(
        "server overloaded: ", bytes_in_flight_, " bytes in flight + this request's ", bytes,
        " > max_inflight_bytes=", options_.max_inflight_bytes, "; retry with backoff"));
  }
  ++requests_in_flight_;
  bytes_in_flight_ += bytes;
  metrics_.AddInFlightBytes(bytes);
  return absl::OkStatus();
}

void CallGuard::Release(int64_t bytes) {
  absl::MutexLock lock(&mu_);
  --requests_in_flight_;
  bytes_in_flight_ -= bytes;
  metrics_.AddInFlightBytes(-bytes);
}

void CallGuard::CloseCall() {
  absl::MutexLock lock(&mu_);
  --open_calls_;
}

void CallGuard::LogError(const RpcMetrics& rpc, const std::string& peer,
                         const absl::Status& status) const {
  if (logger_ == nullptr || status.ok()) return;
  logger_->Log(LevelOf(status.code()), "rpc_error",
               {{"rpc", rpc.name()},
                {"code", absl::StatusCodeToString(status.code())},
                {"peer", peer},
                {"message", status.message()}});
}

// --- Call ---

CallGuard::Call::Call(CallGuard& guard, RpcMetrics& rpc, std::string peer)
    : guard_(&guard), rpc_(&rpc), peer_(std::move(peer)) {}

CallGuard::Call::Call(Call&& other) noexcept
    : guard_(std::exchange(other.guard_, nullptr)),
      rpc_(other.rpc_),
      peer_(std::move(other.peer_)),
      finished_(other.finished_) {}

CallGuard::Call& CallGuard::Call::operator=(Call&& other) noexcept {
  if (this != &other) {
    Close();
    guard_ = std::exchange(other.guard_, nullptr);
    rpc_ = other.rpc_;
    peer_ = std::move(other.peer_);
    finished_ = other.finished_;
  }
  return *this;
}

CallGuard::Call::~Call() { Close(); }

void CallGuard::Call::Close() {
  if (guard_ == nullptr) return;
  Finish(absl::CancelledError("the call was dropped"));
  std::exchange(guard_, nullptr)->CloseCall();
}

absl::StatusOr<CallGuard::Request> CallGuard::Call::Admit(int64_t bytes, int64_t rows) {
  if (absl::Status reserved = guard_->Reserve(*rpc_, bytes); !reserved.ok()) return reserved;
  rpc_->RequestAdmitted(bytes);
  return Request(*guard_, *rpc_, peer_, bytes, rows);
}

void CallGuard::Call::Finish(const absl::Status& status) {
  if (guard_ == nullptr || finished_) return;
  finished_ = true;
  rpc_->CallHandled(status.code());
  rpc_->CallClosed();
  guard_->LogError(*rpc_, peer_, status);
}

// --- Request ---

CallGuard::Request::Request(CallGuard& guard, RpcMetrics& rpc, std::string peer, int64_t bytes,
                            int64_t rows)
    : guard_(&guard),
      rpc_(&rpc),
      peer_(std::move(peer)),
      bytes_(bytes),
      rows_(rows),
      admitted_(absl::Now()) {}

CallGuard::Request::Request(Request&& other) noexcept
    : guard_(std::exchange(other.guard_, nullptr)),
      rpc_(other.rpc_),
      peer_(std::move(other.peer_)),
      bytes_(other.bytes_),
      rows_(other.rows_),
      admitted_(other.admitted_),
      started_(other.started_) {}

CallGuard::Request& CallGuard::Request::operator=(Request&& other) noexcept {
  if (this != &other) {
    Done(absl::CancelledError("the request was dropped"));
    guard_ = std::exchange(other.guard_, nullptr);
    rpc_ = other.rpc_;
    peer_ = std::move(other.peer_);
    bytes_ = other.bytes_;
    rows_ = other.rows_;
    admitted_ = other.admitted_;
    started_ = other.started_;
  }
  return *this;
}

CallGuard::Request::~Request() { Done(absl::CancelledError("the request was dropped")); }

void CallGuard::Request::Started() {
  if (guard_ == nullptr || started_ != absl::InfinitePast()) return;
  started_ = absl::Now();
  rpc_->RequestStarted(started_ - admitted_);
}

void CallGuard::Request::Done(const absl::Status& status) {
  if (guard_ == nullptr) return;
  CallGuard* guard = std::exchange(guard_, nullptr);
  const absl::Time now = absl::Now();
  const bool started = started_ != absl::InfinitePast();
  const absl::Duration queue_wait = (started ? started_ : now) - admitted_;
  const absl::Duration sampling = started ? now - started_ : absl::ZeroDuration();
  rpc_->RequestDone(status.code(), rows_, started, sampling, now - admitted_);
  guard->Release(bytes_);
  const int every = guard->options_.request_log_every;
  if (every > 0 && guard->logger_ != nullptr &&
      guard->requests_done_.fetch_add(1, std::memory_order_relaxed) %
              static_cast<uint64_t>(every) ==
          0) {
    guard->logger_->Log(LogLevel::kInfo, "request",
                        {{"rpc", rpc_->name()},
                         {"code", absl::StatusCodeToString(status.code())},
                         {"rows", rows_},
                         {"bytes", bytes_},
                         {"queue_ms", Milliseconds(queue_wait)},
                         {"sampling_ms", Milliseconds(sampling)},
                         {"total_ms", Milliseconds(now - admitted_)},
                         {"peer", peer_}});
  }
}

}  // namespace tokensampler::service
