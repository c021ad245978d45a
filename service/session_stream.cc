#include "service/session_stream.h"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "core/status_macros.h"
#include "service/convert.h"
#include "service/received_request.h"
#include "service/status.h"

namespace tokensampler::service {
namespace {

// Responses written or waiting before the stream stops processing (and so reading) requests:
// one on the wire and one ready behind it.
constexpr size_t kMaxResponsesQueued = 2;

absl::Status Prefixed(absl::string_view prefix, const absl::Status& status) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

template <typename T>
absl::Span<const T> SpanOf(const google::protobuf::RepeatedField<T>& field) {
  return absl::Span<const T>(field.data(), static_cast<size_t>(field.size()));
}

// How often the reaper looks for idle streams: a stream ends between idle_timeout and
// idle_timeout + tick after its last activity.
absl::Duration ReaperTick(absl::Duration idle_timeout) {
  return std::clamp(idle_timeout / 4, absl::Milliseconds(1), absl::Seconds(1));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// SessionRegistry

SessionRegistry::SessionRegistry(const SessionOptions& options, CallGuard& guard, Metrics& metrics)
    : options_(options), guard_(guard), metrics_(metrics) {
  if (options_.idle_timeout != absl::InfiniteDuration()) {
    reaper_ = std::thread([this] { ReapIdleStreams(); });
  }
  drain_subscription_ = guard_.SubscribeDrain([this] { BeginShutdown(); });
}

SessionRegistry::~SessionRegistry() {
  guard_.UnsubscribeDrain(drain_subscription_);
  {
    absl::MutexLock lock(&mu_);
    stop_reaper_ = true;
  }
  if (reaper_.joinable()) reaper_.join();
  {
    // The server has shut down, so every stream is finished; wait for their OnDone to have
    // unregistered them (it touches this registry).
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](absl::flat_hash_set<SessionStream*>* streams) { return streams->empty(); }, &streams_));
  }
  absl::MutexLock lock(&tasks_mu_);
  tasks_mu_.Await(absl::Condition(
      +[](int* in_flight) { return *in_flight == 0; }, &tasks_in_flight_));
}

void SessionRegistry::BeginShutdown() {
  absl::MutexLock lock(&mu_);
  if (shutting_down_) return;
  shutting_down_ = true;
  for (SessionStream* stream : streams_) stream->Drain();
}

bool SessionRegistry::Register(SessionStream* stream) {
  absl::MutexLock lock(&mu_);
  streams_.insert(stream);
  live_sessions_.fetch_add(1, std::memory_order_relaxed);
  metrics_.live_sessions().Increment();
  return !shutting_down_;
}

void SessionRegistry::Unregister(SessionStream* stream) {
  absl::MutexLock lock(&mu_);
  streams_.erase(stream);
  live_sessions_.fetch_sub(1, std::memory_order_relaxed);
  metrics_.live_sessions().Decrement();
}

void SessionRegistry::TaskStarted() {
  absl::MutexLock lock(&tasks_mu_);
  ++tasks_in_flight_;
}

void SessionRegistry::TaskDone() {
  absl::MutexLock lock(&tasks_mu_);
  --tasks_in_flight_;
}

void SessionRegistry::ReapIdleStreams() {
  const absl::Duration tick = ReaperTick(options_.idle_timeout);
  absl::MutexLock lock(&mu_);
  while (!stop_reaper_) {
    mu_.AwaitWithTimeout(absl::Condition(&stop_reaper_), tick);
    if (stop_reaper_) break;
    // Holding mu_ keeps every stream alive: OnDone unregisters (under mu_) before deleting.
    const absl::Time now = absl::Now();
    for (SessionStream* stream : streams_) stream->ExpireIfIdle(now);
  }
}

// ---------------------------------------------------------------------------------------------
// SessionStream: the state machine

namespace {

// The reactor of a Session call the CallGuard refused: ends at once with the refusal.
class RefusedSession final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit RefusedSession(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* SessionStream::Refuse(
    const grpc::Status& status) {
  return new RefusedSession(status);
}

SessionStream* SessionStream::Start(grpc::CallbackServerContext* context, CallGuard::Call call,
                                    const Env& env) {
  auto* stream = new SessionStream(context, std::move(call), env);
  const bool accepted = env.registry->Register(stream);
  stream->Pump([stream, accepted]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (!accepted) {
      stream->end_status_ =
          grpc::Status(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
    }
  });
  return stream;
}

SessionStream::SessionStream(grpc::CallbackServerContext* context, CallGuard::Call call,
                             const Env& env)
    : env_(env),
      context_(context),
      call_(std::move(call)),
      table_(env.options->limits),
      admission_(absl::FailedPreconditionError("no request admitted")),
      last_activity_(absl::Now()) {}

void SessionStream::OnReadDone(bool ok) {
  // The buffer is the reader's alone until the next read starts: parsed without the lock.
  v1::SessionRequest request;
  absl::Status parsed = absl::OkStatus();
  if (ok) {
    ++messages_read_;
    parsed = ParseReceived(read_buffer_, request,
                           absl::StrCat("message ", messages_read_, " of the stream"));
    read_buffer_.Clear();
  }
  Pump([this, ok, &request, &parsed]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    read_in_flight_ = false;
    if (ok && parsed.ok()) {
      pending_.push_back(std::move(request));
      last_activity_ = absl::Now();
    } else if (ok) {
      // Nothing after it can be trusted to be what the client sent: stop reading.
      reads_done_ = true;
      read_error_ = ToGrpcStatus(absl::InvalidArgumentError(
          absl::StrCat(parsed.message(),
                       "; the stream ends here (the requests before it were "
                       "answered, its sequences are released)")));
    } else {
      reads_done_ = true;  // half-close by the client, or the call is over
    }
  });
}

void SessionStream::OnWriteDone(bool ok) {
  Pump([this, ok]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    write_in_flight_ = false;
    writes_.pop_front();
    last_activity_ = absl::Now();
    // A failed write means the stream is broken (the client is gone): stop as if cancelled.
    if (!ok) cancelled_.store(true);
  });
}

void SessionStream::OnCancel() {
  Pump([this]() ABSL_NO_THREAD_SAFETY_ANALYSIS { cancelled_.store(true); });
}

void SessionStream::OnDone() {
  // Every operation has completed and no task runs (Finish waited for it). Closing the call
  // first lets a drain that waits for it go on; it must happen before Unregister, after which
  // the registry, and so the guard, may go away.
  { const CallGuard::Call closed = std::move(call_); }
  SessionRegistry* registry = env_.registry;
  registry->AddLiveSequences(-table_.size());
  registry->Unregister(this);
  delete this;
}

void SessionStream::Drain() {
  Pump([this]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (!end_status_.has_value()) {
      end_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                 "the server is shutting down; the session's sequences are "
                                 "released");
    }
  });
}

void SessionStream::ExpireIfIdle(absl::Time now) {
  Pump([this, now]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    const absl::Duration timeout = env_.options->idle_timeout;
    if (end_status_.has_value() || finishing_ || task_running_ || !pending_.empty() ||
        now - last_activity_ < timeout) {
      return;
    }
    // No task runs: table_ is ours to read.
    end_status_ = grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("the session stream was idle for more than ", absl::FormatDuration(timeout),
                     " (--session_idle_timeout_seconds); its ", table_.size(),
                     " sequences are released"));
    // A response the client does not read holds a write forever: cancel the call instead.
    if (write_in_flight_) try_cancel_wanted_ = true;
  });
}

void SessionStream::Pump(const std::function<void()>& update) {
  int started = 0;
  bool first = true;
  for (;;) {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      if (first) {
        update();
        first = false;
      }
      starting_ -= started;
      actions = NextActions();
      started = actions.starts();
      if (actions.none()) return;
    }
    // Each operation below was counted in starting_, so no other thread finishes the call (and
    // OnDone deletes this) before the loop has re-locked mu_ and subtracted it.
    if (actions.try_cancel) context_->TryCancel();
    if (actions.write != nullptr) StartWrite(actions.write);
    if (actions.read) StartRead(&read_buffer_);
    if (actions.task) {
      // current_ is the task's from now on, but the task has not started yet.
      // Rows for the limits and metrics: the step's logits rows (beams and drafts take several).
      admission_ = call_.Admit(static_cast<int64_t>(current_.ByteSizeLong()),
                               current_.has_step() ? current_.step().logits().rows() : 0);
      env_.registry->TaskStarted();
      if (admission_.ok()) {
        env_.arena->enqueue([this] { RunTask(); });
      } else {
        // Over the server's limits: answered at once here, not in the arena (whose busy threads
        // may be what the limits protect). No gRPC operation waits: the nested Pump only starts
        // operations, and this turn's starts keep the stream from finishing under it.
        RunTask();
      }
    }
    if (actions.finish.has_value()) {
      absl::Status outcome(static_cast<absl::StatusCode>(actions.finish->error_code()),
                           actions.finish->error_message());
      // A client's cancel may reach the stream as a failed read (taken for a half-close) before
      // OnCancel: account it as what it was.
      if (outcome.ok() && context_->IsCancelled()) {
        outcome = absl::CancelledError("the session stream was cancelled");
      }
      call_.Finish(outcome);
      Finish(*std::move(actions.finish));
      return;  // OnDone may delete this at any moment now
    }
  }
}

SessionStream::Actions SessionStream::NextActions() {
  Actions actions;
  if (finishing_) return actions;
  const bool cancelled = cancelled_.load();
  if (try_cancel_wanted_ && !try_cancel_issued_) {
    try_cancel_issued_ = true;
    actions.try_cancel = true;
  }
  if (!cancelled) {
    if (!write_in_flight_ && !writes_.empty()) {
      write_in_flight_ = true;
      actions.write = &writes_.front();  // deque elements stay put while others are added
    }
    if (!end_status_.has_value() && !task_running_ && !pending_.empty() &&
        writes_.size() < kMaxResponsesQueued) {
      current_ = std::move(pending_.front());
      pending_.pop_front();
      task_running_ = true;
      actions.task = true;
    }
    if (!end_status_.has_value() && !read_in_flight_ && !reads_done_ && pending_.empty()) {
      read_in_flight_ = true;
      actions.read = true;
    }
  }
  starting_ += actions.starts();
  if (!actions.none() || starting_ > 0 || task_running_ || write_in_flight_) return actions;

  // Nothing in progress: is the stream over? (A read may still be in flight; Finish ends it.)
  if (cancelled) {
    actions.finish = grpc::Status(grpc::StatusCode::CANCELLED, "the session stream was cancelled");
  } else if (end_status_.has_value()) {
    if (writes_.empty()) actions.finish = *end_status_;
  } else if (reads_done_ && pending_.empty() && writes_.empty()) {
    actions.finish = read_error_.value_or(grpc::Status::OK);
  }
  if (actions.finish.has_value()) finishing_ = true;
  return actions;
}

// ---------------------------------------------------------------------------------------------
// SessionStream: the work

void SessionStream::RunTask() {
  SessionRegistry* const registry = env_.registry;  // outlives this
  const int64_t sequences_before = table_.size();
  v1::SessionResponse response;
  response.set_request_id(current_.request_id());
  // Over the server's limits, the request is answered with RESOURCE_EXHAUSTED without running.
  absl::Status status = admission_.status();
  if (status.ok()) {
    admission_->Started();
    status = Apply(current_, response);
    admission_->Done(status);
  }
  admission_ = absl::FailedPreconditionError("no request admitted");
  if (!status.ok()) {
    if (status.code() == absl::StatusCode::kCancelled) registry->CountCancelledStep();
    response.clear_results();
    const grpc::Status wire = ToGrpcStatus(status);
    response.mutable_error()->set_code(static_cast<int32_t>(wire.error_code()));
    response.mutable_error()->set_message(wire.error_message());
  }
  current_.Clear();
  registry->AddLiveSequences(table_.size() - sequences_before);
  Pump([this, &response]() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    task_running_ = false;
    last_activity_ = absl::Now();
    // A cancelled stream writes nothing more; its response is dropped.
    if (!cancelled_.load()) writes_.push_back(SerializeForWire(response));
  });
  registry->TaskDone();  // last: the registry's destructor waits for it
}

absl::Status SessionStream::Apply(const v1::SessionRequest& request,
                                  v1::SessionResponse& response) {
  // The parts run in the documented order: release, add, fork, step.
  for (int i = 0; i < request.release_size(); ++i) {
    RETURN_IF_ERROR(
        Prefixed(absl::StrCat("release[", i, "]: "), table_.Release(request.release(i))));
  }
  for (int i = 0; i < request.add_size(); ++i) {
    const v1::AddSequence& add = request.add(i);
    absl::StatusOr<SamplingParams> params = UnvalidatedParamsFromProto(add.params());
    if (!params.ok()) return Prefixed(absl::StrCat("add[", i, "].params."), params.status());
    std::optional<BeamParams> beam;
    if (add.has_beam()) {
      absl::StatusOr<BeamParams> converted = BeamParamsFromProto(add.beam());
      if (!converted.ok()) return Prefixed(absl::StrCat("add[", i, "]."), converted.status());
      // Checked here so that the message names `beam.` or `params.` itself.
      RETURN_IF_ERROR(
          Prefixed(absl::StrCat("add[", i, "]."),
                   ValidateBeamParams(*converted, *params, env_.options->limits.max_beam_width)));
      beam = *converted;
    }
    const absl::Status added = table_.Add(
        add.sequence_id(), *std::move(params),
        std::vector<int32_t>(add.prompt_token_ids().begin(), add.prompt_token_ids().end()), beam);
    // Add's INVALID_ARGUMENT errors are parameter errors whose message starts with the field.
    RETURN_IF_ERROR(Prefixed(added.code() == absl::StatusCode::kInvalidArgument
                                 ? absl::StrCat("add[", i, "].params.")
                                 : absl::StrCat("add[", i, "]: "),
                             added));
  }
  for (int i = 0; i < request.fork_size(); ++i) {
    const v1::Fork& fork = request.fork(i);
    RETURN_IF_ERROR(Prefixed(absl::StrCat("fork[", i, "]: "),
                             table_.Fork(fork.parent_id(), SpanOf(fork.child_ids()))));
  }
  if (!request.has_step()) return absl::OkStatus();

  const v1::Step& step = request.step();
  // Bytes or a shared-memory region (sparse candidates are for Sample only).
  absl::StatusOr<RequestLogits> logits = RequestLogits::Resolve(
      step.logits(), env_.shared_memory, /*allow_sparse=*/false, env_.max_tensor_bytes);
  if (!logits.ok()) return Prefixed("step.", logits.status());
  const absl::Span<const uint64_t> ids = SpanOf(step.sequence_ids());
  if (env_.options->before_step_for_testing) env_.options->before_step_for_testing(cancelled_);
  // A region truncated during the read: the tokens came from zeros and the sequences have
  // advanced with them. Release them rather than keep a corrupt state; the error says so.
  const auto check_read = [&]() -> absl::Status {
    absl::Status read = logits->CheckAfterRead();
    if (read.ok()) return read;
    for (const uint64_t id : ids) (void)table_.Release(id);  // finished ones are gone already
    return absl::Status(
        read.code(), absl::StrCat("step.", read.message(), "; the step's sequences were released"));
  };
  absl::StatusOr<std::vector<SequenceStep>> steps;
  if (step.drafts_size() > 0) {
    absl::StatusOr<std::vector<SequenceDrafts>> drafts = StepDraftsFromProto(step);
    if (!drafts.ok()) return Prefixed("step.", drafts.status());
    steps = table_.StepWithDrafts(*env_.verifier, logits->view(), ids, *drafts, &cancelled_);
  } else {
    steps = table_.Step(*env_.sampler, logits->view(), ids, &cancelled_);
  }
  if (!steps.ok()) {
    // A region truncated during the read explains whatever the read made fail (and nothing has
    // advanced): its error first.
    if (absl::Status read = logits->CheckAfterRead(); !read.ok()) return Prefixed("step.", read);
    return Prefixed("step: ", steps.status());
  }
  RETURN_IF_ERROR(check_read());
  SessionResultsToProto(*steps, response);
  return absl::OkStatus();
}

}  // namespace tokensampler::service
