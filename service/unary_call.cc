#include "service/unary_call.h"

#include <optional>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "service/status.h"

namespace tokensampler::service {
namespace {

// One unary call. Owned jointly by gRPC (until OnDone) and by its arena task (until the task
// returns): whichever lets go last deletes it.
class UnaryCall final : public grpc::ServerUnaryReactor {
 public:
  UnaryCall(grpc::CallbackServerContext& context, UnaryWork work)
      : context_(context), work_(std::move(work)) {}

  // Refused before any work: answers at once; only gRPC holds the reactor. `call`, when the
  // refusal came after it was opened, stays open until OnDone. The call is answered: a
  // cancellation that arrives before the answer is sent (OnCancel) has nothing left to do.
  void Refuse(const absl::Status& status, std::optional<CallGuard::Call> call = std::nullopt) {
    {
      absl::MutexLock lock(&mu_);
      state_ = State::kAnswered;
    }
    if (call.has_value()) {
      call->Finish(status);
      call_ = std::move(call);
    }
    Finish(ToGrpcStatus(status));
  }

  // Admitted: the arena task takes the second reference.
  void Admitted(CallGuard::Call call, CallGuard::Request request) {
    call_.emplace(std::move(call));
    request_.emplace(std::move(request));
    refs_.store(2, std::memory_order_relaxed);
  }

  // The arena task.
  void Run() {
    {
      absl::MutexLock lock(&mu_);
      if (state_ != State::kQueued) return;  // answered by OnCancel while queued
      state_ = State::kRunning;
    }
    request_->Started();
    absl::Status status = cancelled_.load() ? absl::CancelledError("") : work_(cancelled_);
    {
      absl::MutexLock lock(&mu_);
      state_ = State::kAnswered;
    }
    // Whatever the work said, a call that was cancelled ends as cancelled (or timed out).
    Complete(cancelled_.load() ? CancellationStatus() : std::move(status));
  }

  void OnCancel() override {
    cancelled_.store(true);
    bool answer_now = false;
    {
      absl::MutexLock lock(&mu_);
      if (state_ == State::kQueued) {
        state_ = State::kAnswered;
        answer_now = true;
      }
    }
    // gRPC holds its reference until OnDone, which cannot run before this returns.
    if (answer_now) Complete(CancellationStatus());
  }

  void OnDone() override { Unref(); }

  void Unref() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

 private:
  enum class State { kQueued, kRunning, kAnswered };

  absl::Status CancellationStatus() const {
    if (absl::FromChrono(context_.deadline()) <= absl::Now()) {
      return absl::DeadlineExceededError(
          "the call's deadline passed before its work finished; the work was stopped");
    }
    return absl::CancelledError("the call was cancelled; its work was stopped");
  }

  // Records the outcome, frees the call's share of the limits, then answers. Runs once, for an
  // admitted call (request_ and call_ are set). The call stays open for a drain until this object
  // is deleted (after OnDone).
  void Complete(const absl::Status& status) {
    request_->Done(status);
    call_->Finish(status);
    Finish(ToGrpcStatus(status));
  }

  grpc::CallbackServerContext& context_;
  const UnaryWork work_;
  std::optional<CallGuard::Call> call_;
  std::optional<CallGuard::Request> request_;
  std::atomic<bool> cancelled_{false};
  std::atomic<int> refs_{1};
  absl::Mutex mu_;
  State state_ ABSL_GUARDED_BY(mu_) = State::kQueued;
};

}  // namespace

grpc::ServerUnaryReactor* StartUnaryCall(grpc::CallbackServerContext* context, CallGuard& guard,
                                         tbb::task_arena& arena, RpcMetrics& rpc,
                                         int64_t request_bytes, int64_t rows, UnaryWork work) {
  auto* reactor = new UnaryCall(*context, std::move(work));
  absl::StatusOr<CallGuard::Call> call = guard.OpenCall(*context, rpc);
  if (!call.ok()) {
    reactor->Refuse(call.status());
    return reactor;
  }
  absl::StatusOr<CallGuard::Request> request = call->Admit(request_bytes, rows);
  if (!request.ok()) {
    reactor->Refuse(request.status(), *std::move(call));
    return reactor;
  }
  reactor->Admitted(*std::move(call), *std::move(request));
  guard.Enqueue(arena, [reactor] {
    reactor->Run();
    reactor->Unref();
  });
  return reactor;
}

}  // namespace tokensampler::service
