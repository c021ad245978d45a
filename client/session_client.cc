#include "client/session_client.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace tokensampler {
namespace {

// The status of a response: OK, or its `error` as an absl::Status.
absl::Status ResponseStatus(const v1::SessionResponse& response) {
  if (response.error().code() == 0) return absl::OkStatus();
  return FromGrpcStatus(grpc::Status(static_cast<grpc::StatusCode>(response.error().code()),
                                     response.error().message()));
}

}  // namespace

std::unique_ptr<SessionClient> SessionClient::Open(const Client& client) {
  return std::unique_ptr<SessionClient>(new SessionClient(client.channel(), client.options()));
}

SessionClient::SessionClient(std::shared_ptr<grpc::Channel> channel, const ClientOptions& options)
    : stub_(v1::Sampler::NewStub(std::move(channel))), ended_future_(ended_.get_future()) {
  context_.set_wait_for_ready(options.wait_for_ready);
  // Client::Create checked that the token can be sent as metadata.
  if (!options.bearer_token.empty()) {
    context_.AddMetadata("authorization", absl::StrCat("Bearer ", options.bearer_token));
  }
  // The call's headers go out with the first request: opening never blocks, even while
  // waiting for the server to be ready.
  context_.set_initial_metadata_corked(true);
  stream_ = stub_->Session(&context_);
  reader_ = std::thread([this] { ReadLoop(); });
}

SessionClient::~SessionClient() {
  if (ended_future_.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
    context_.TryCancel();
  }
  reader_.join();
}

void SessionClient::Enqueue(v1::SessionRequest request, Deliver deliver) {
  std::optional<absl::Status> refused;
  {
    absl::MutexLock write_lock(&write_mu_);
    {
      absl::MutexLock lock(&mu_);
      if (final_status_.has_value()) {
        refused = *final_status_;
      } else if (writes_done_) {
        refused = absl::FailedPreconditionError("the session is closing (Close() was called)");
      } else {
        request.set_request_id(next_request_id_++);
        pending_.emplace_back(request.request_id(), std::move(deliver));
      }
    }
    // A failed write means the stream is over: ReadLoop then answers the request with the
    // stream's final status.
    if (!refused.has_value()) stream_->Write(request);
  }
  if (refused.has_value()) deliver(*std::move(refused));
}

void SessionClient::ReadLoop() {
  v1::SessionResponse response;
  std::optional<absl::Status> broken;
  while (stream_->Read(&response)) {
    std::pair<uint64_t, Deliver> next;
    {
      absl::MutexLock lock(&mu_);
      if (pending_.empty()) {
        broken = absl::InternalError(absl::StrCat("the server answered request ",
                                                  response.request_id(), ", which was not sent"));
        break;
      }
      next = std::move(pending_.front());
      pending_.pop_front();
    }
    if (response.request_id() != next.first) {
      next.second(absl::InternalError(absl::StrCat(
          "the server answered request ", response.request_id(), " instead of ", next.first)));
    } else if (absl::Status status = ResponseStatus(response); !status.ok()) {
      next.second(std::move(status));
    } else {
      next.second(std::move(response));
    }
    response.Clear();
  }
  if (broken.has_value()) context_.TryCancel();

  absl::Status final_status;
  std::deque<std::pair<uint64_t, Deliver>> unanswered;
  {
    absl::MutexLock write_lock(&write_mu_);  // no Write runs during Finish
    const grpc::Status status = stream_->Finish();
    final_status = broken.value_or(FromGrpcStatus(status));
    absl::MutexLock lock(&mu_);
    final_status_ = final_status.ok()
                        ? absl::FailedPreconditionError("the session stream is closed")
                        : final_status;
    unanswered = std::move(pending_);
    pending_.clear();
  }
  for (auto& [id, deliver] : unanswered) {
    deliver(final_status.ok() ? absl::InternalError(absl::StrCat(
                                    "the session stream ended without answering request ", id))
                              : final_status);
  }
  ended_.set_value(final_status);
}

absl::Status SessionClient::Close() {
  {
    absl::MutexLock write_lock(&write_mu_);
    if (!writes_done_) {
      writes_done_ = true;
      stream_->WritesDone();
    }
  }
  return ended_future_.get();
}

std::future<absl::StatusOr<v1::SessionResponse>> SessionClient::Send(v1::SessionRequest request) {
  auto promise = std::make_shared<std::promise<absl::StatusOr<v1::SessionResponse>>>();
  std::future<absl::StatusOr<v1::SessionResponse>> future = promise->get_future();
  Enqueue(std::move(request), [promise](absl::StatusOr<v1::SessionResponse> response) {
    promise->set_value(std::move(response));
  });
  return future;
}

namespace {

// A future of the request's status only.
std::pair<std::function<void(absl::StatusOr<v1::SessionResponse>)>, std::future<absl::Status>>
StatusOnly() {
  auto promise = std::make_shared<std::promise<absl::Status>>();
  std::future<absl::Status> future = promise->get_future();
  return {[promise](absl::StatusOr<v1::SessionResponse> response) {
            promise->set_value(response.status());
          },
          std::move(future)};
}

}  // namespace

std::future<absl::Status> SessionClient::Add(uint64_t sequence_id, const v1::SamplingParams& params,
                                             absl::Span<const int32_t> prompt_token_ids) {
  return AddSequence(sequence_id, params, nullptr, prompt_token_ids);
}

std::future<absl::Status> SessionClient::AddSequence(uint64_t sequence_id,
                                                     const v1::SamplingParams& params,
                                                     const v1::BeamSearchParams* beam,
                                                     absl::Span<const int32_t> prompt_token_ids) {
  v1::SessionRequest request;
  v1::AddSequence& add = *request.add_add();
  add.set_sequence_id(sequence_id);
  *add.mutable_params() = params;
  if (beam != nullptr) *add.mutable_beam() = *beam;
  add.mutable_prompt_token_ids()->Add(prompt_token_ids.begin(), prompt_token_ids.end());
  auto [deliver, future] = StatusOnly();
  Enqueue(std::move(request), std::move(deliver));
  return std::move(future);
}

std::future<absl::Status> SessionClient::AddBeamSearch(uint64_t sequence_id,
                                                       const v1::SamplingParams& params,
                                                       const v1::BeamSearchParams& beam,
                                                       absl::Span<const int32_t> prompt_token_ids) {
  return AddSequence(sequence_id, params, &beam, prompt_token_ids);
}

std::future<absl::StatusOr<std::vector<v1::SequenceResult>>> SessionClient::Step(
    v1::Logits logits, absl::Span<const uint64_t> sequence_ids) {
  v1::SessionRequest request;
  v1::Step& step = *request.mutable_step();
  *step.mutable_logits() = std::move(logits);
  step.mutable_sequence_ids()->Add(sequence_ids.begin(), sequence_ids.end());
  auto promise = std::make_shared<std::promise<absl::StatusOr<std::vector<v1::SequenceResult>>>>();
  std::future<absl::StatusOr<std::vector<v1::SequenceResult>>> future = promise->get_future();
  Enqueue(std::move(request), [promise](absl::StatusOr<v1::SessionResponse> response) {
    if (!response.ok()) {
      promise->set_value(response.status());
      return;
    }
    promise->set_value(std::vector<v1::SequenceResult>(
        std::make_move_iterator(response->mutable_results()->begin()),
        std::make_move_iterator(response->mutable_results()->end())));
  });
  return future;
}

std::future<absl::Status> SessionClient::Release(absl::Span<const uint64_t> sequence_ids) {
  v1::SessionRequest request;
  request.mutable_release()->Add(sequence_ids.begin(), sequence_ids.end());
  auto [deliver, future] = StatusOnly();
  Enqueue(std::move(request), std::move(deliver));
  return std::move(future);
}

std::future<absl::Status> SessionClient::Fork(uint64_t parent_id,
                                              absl::Span<const uint64_t> child_ids) {
  v1::SessionRequest request;
  v1::Fork& fork = *request.add_fork();
  fork.set_parent_id(parent_id);
  fork.mutable_child_ids()->Add(child_ids.begin(), child_ids.end());
  auto [deliver, future] = StatusOnly();
  Enqueue(std::move(request), std::move(deliver));
  return std::move(future);
}

}  // namespace tokensampler
