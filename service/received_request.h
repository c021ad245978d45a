// ReceivedSampleRequest: a Sample request as gRPC handed it to the server — in slices of at most
// 64 KiB — parsed without copying its logits bytes. protobuf parses everything else (a few
// hundred bytes: the shape and the rows' parameters) into a SampleRequest whose `logits.data` is
// left empty; the bytes themselves stay in the slices and reach the sampler as a LogitsView in
// pieces, which copies each row into per-thread scratch when it samples it. Parsing the whole
// message instead copies the tensor once more, serially, before any sampling starts: ≈ 1.7 ms of
// a 16 MiB request over a Unix socket.
//
// Thread-compatible; a value that owns references to the slices.
#ifndef TOKENSAMPLER_SERVICE_RECEIVED_REQUEST_H_
#define TOKENSAMPLER_SERVICE_RECEIVED_REQUEST_H_

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/tensor.h"
#include "google/protobuf/message_lite.h"
#include "tokensampler/v1/sampler.pb.h"

namespace tokensampler::service {

// The messages of the raw methods (every tokensampler.v1.Sampler method: gRPC 1.51 answers a
// typed callback method's unparsable request with UNIMPLEMENTED and no message, and ends a typed
// stream at an unparsable message as if the client had closed it).
//
// Parses `buffer` into `message` (cleared first) without copying its slices. Returns
// INVALID_ARGUMENT "<what> is not a tokensampler.v1.VerifyRequest: protobuf cannot parse its
// N bytes" when protobuf cannot.
absl::Status ParseReceived(const grpc::ByteBuffer& buffer, google::protobuf::MessageLite& message,
                           absl::string_view what = "the request");
// `message` serialised, as one slice.
grpc::ByteBuffer SerializeForWire(const google::protobuf::MessageLite& message);

class ReceivedSampleRequest {
 public:
  // Parses `buffer` with protobuf's semantics: the same message as SampleRequest's own parse,
  // except that when the message ends up holding `logits.data`, those bytes are in
  // data_pieces() and `logits.data` is empty. The wire form is taken apart field by field at
  // the top level and inside every `logits` field (a sender may split a message into several
  // occurrences of it, which protobuf merges — the C++ client does); a form it does not take
  // apart (groups, or bytes protobuf would refuse) is parsed whole by protobuf instead, giving
  // protobuf's result. INVALID_ARGUMENT when protobuf cannot parse the message. The result holds
  // its own references to the slices (a slice of up to 23 bytes keeps its bytes inline, in the
  // reference itself).
  static absl::StatusOr<ReceivedSampleRequest> Parse(const grpc::ByteBuffer& buffer);

  ReceivedSampleRequest(ReceivedSampleRequest&&) = default;
  ReceivedSampleRequest& operator=(ReceivedSampleRequest&&) = default;

  const v1::SampleRequest& message() const { return message_; }

  // The logits bytes, when the message holds `data` and they were left in the slices; empty
  // otherwise (then message().logits() is complete). Valid as long as this object.
  absl::Span<const LogitsView::Piece> data_pieces() const { return pieces_; }

  // The size of the message on the wire.
  size_t wire_bytes() const { return wire_bytes_; }

 private:
  ReceivedSampleRequest() = default;

  std::vector<grpc::Slice> slices_;  // keep the pieces' bytes alive
  v1::SampleRequest message_;
  std::vector<LogitsView::Piece> pieces_;
  size_t wire_bytes_ = 0;
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_RECEIVED_REQUEST_H_
