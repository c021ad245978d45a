#include "service/received_request.h"

#include <grpcpp/support/proto_buffer_reader.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "google/protobuf/io/coded_stream.h"

namespace tokensampler::service {
namespace {

using Piece = LogitsView::Piece;

// The fields the splitter takes apart: SampleRequest.logits (1) and, inside it, Logits.data (4).
constexpr uint64_t kLogitsField = 1;
constexpr uint64_t kDataField = 4;
constexpr uint64_t kLengthDelimited = 2;

// Reads the concatenation of slices; every byte read while an echo string is set is appended
// to it.
class WireReader {
 public:
  explicit WireReader(const std::vector<grpc::Slice>& slices) : slices_(slices) {
    for (const grpc::Slice& slice : slices_) total_ += slice.size();
    Settle();
  }

  size_t position() const { return position_; }
  size_t remaining() const { return total_ - position_; }
  void set_echo(std::string* echo) { echo_ = echo; }

  // A varint of at most 10 bytes (within `limit`, an absolute position).
  bool ReadVarint(uint64_t* value, size_t limit) {
    uint64_t result = 0;
    for (int i = 0; i < 10 && position_ < limit; ++i) {
      const uint8_t byte = slices_[slice_].begin()[offset_];
      Advance(1, &byte);
      result |= static_cast<uint64_t>(byte & 0x7f) << (7 * i);
      if ((byte & 0x80) == 0) {
        *value = result;
        return true;
      }
    }
    return false;
  }

  // Passes n bytes (echoing them); false when fewer than n lie before `limit`.
  bool Skip(uint64_t n, size_t limit) {
    if (n > limit - position_) return false;
    while (n > 0) {
      const size_t take = std::min<uint64_t>(n, slices_[slice_].size() - offset_);
      Advance(take, slices_[slice_].begin() + offset_);
      n -= take;
    }
    return true;
  }

  // Passes n bytes without echoing them, recording where they lie as pieces (offsets from the
  // first of them).
  bool Take(uint64_t n, size_t limit, std::vector<Piece>* pieces) {
    if (n > limit - position_) return false;
    pieces->clear();
    size_t at = 0;
    std::string* const echo = echo_;
    echo_ = nullptr;
    while (n > 0) {
      const size_t take = std::min<uint64_t>(n, slices_[slice_].size() - offset_);
      pieces->push_back({at, absl::MakeConstSpan(slices_[slice_].begin() + offset_, take)});
      Advance(take, nullptr);
      at += take;
      n -= take;
    }
    echo_ = echo;
    return true;
  }

  // Passes one field's payload of wire type `type` (echoing it); false for groups, invalid
  // types and payloads that run past `limit`.
  bool SkipPayload(uint64_t type, size_t limit) {
    uint64_t ignored = 0;
    switch (type) {
      case 0:
        return ReadVarint(&ignored, limit);
      case 1:
        return Skip(8, limit);
      case 2: {
        uint64_t length = 0;
        return ReadVarint(&length, limit) && Skip(length, limit);
      }
      case 5:
        return Skip(4, limit);
      default:
        return false;  // groups (3, 4) and the invalid types 6, 7: protobuf decides
    }
  }

 private:
  void Advance(size_t n, const uint8_t* bytes) {
    if (echo_ != nullptr && bytes != nullptr)
      echo_->append(reinterpret_cast<const char*>(bytes), n);
    position_ += n;
    offset_ += n;
    Settle();
  }
  // Moves past exhausted (and empty) slices.
  void Settle() {
    while (slice_ < slices_.size() && offset_ == slices_[slice_].size()) {
      ++slice_;
      offset_ = 0;
    }
  }

  const std::vector<grpc::Slice>& slices_;
  size_t total_ = 0;
  size_t position_ = 0;
  size_t slice_ = 0;   // the slice holding position_
  size_t offset_ = 0;  // position_ within it
  std::string* echo_ = nullptr;
};

// A tag (field number ≥ 1, 32 bits as protobuf reads them).
bool ReadTag(WireReader& reader, size_t limit, uint64_t* field, uint64_t* type) {
  uint64_t tag = 0;
  if (!reader.ReadVarint(&tag, limit) || tag > std::numeric_limits<uint32_t>::max()) return false;
  *field = tag >> 3;
  *type = tag & 7;
  return *field != 0;
}

void AppendVarint(uint64_t value, std::string* out) {
  uint8_t bytes[10];
  const uint8_t* end = google::protobuf::io::CodedOutputStream::WriteVarint64ToArray(value, bytes);
  out->append(reinterpret_cast<const char*>(bytes), static_cast<size_t>(end - bytes));
}

// The message without the payload of any Logits.data (each left as an empty `data`, so that the
// oneof still ends where protobuf's parse of the whole message would), and the pieces of the
// last such payload. False when the wire form is one the splitter does not take apart.
bool Split(const std::vector<grpc::Slice>& slices, std::string* rest, std::vector<Piece>* data) {
  WireReader reader(slices);
  const size_t total = reader.remaining();
  std::string inner;
  std::vector<Piece> pieces;
  reader.set_echo(rest);
  while (reader.remaining() > 0) {
    uint64_t field = 0, type = 0;
    if (!ReadTag(reader, total, &field, &type)) return false;
    if (field != kLogitsField || type != kLengthDelimited) {
      if (!reader.SkipPayload(type, total)) return false;
      continue;
    }
    // A `logits` field: rebuilt (its length changes) with its `data` payloads taken out.
    reader.set_echo(nullptr);
    uint64_t length = 0;
    if (!reader.ReadVarint(&length, total) || length > reader.remaining()) return false;
    const size_t end = reader.position() + length;
    inner.clear();
    reader.set_echo(&inner);
    while (reader.position() < end) {
      uint64_t inner_field = 0, inner_type = 0;
      if (!ReadTag(reader, end, &inner_field, &inner_type)) return false;
      if (inner_field != kDataField || inner_type != kLengthDelimited) {
        if (!reader.SkipPayload(inner_type, end)) return false;
        continue;
      }
      reader.set_echo(nullptr);
      uint64_t size = 0;
      if (!reader.ReadVarint(&size, end) || !reader.Take(size, end, &pieces)) return false;
      inner.push_back('\0');  // an empty `data`
      data->swap(pieces);     // a later `data` replaces an earlier one
      reader.set_echo(&inner);
    }
    AppendVarint(inner.size(), rest);
    rest->append(inner);
    reader.set_echo(rest);
  }
  return true;
}

}  // namespace

absl::StatusOr<ReceivedSampleRequest> ReceivedSampleRequest::Parse(const grpc::ByteBuffer& buffer) {
  ReceivedSampleRequest out;
  out.wire_bytes_ = buffer.Length();
  if (const grpc::Status dumped = buffer.Dump(&out.slices_); !dumped.ok()) {
    return absl::InternalError(
        absl::StrCat("could not read the request's bytes: ", dumped.error_message()));
  }
  std::string rest;
  rest.reserve(4096);
  std::vector<Piece> data;
  if (Split(out.slices_, &rest, &data) && out.message_.ParseFromString(rest)) {
    if (out.message_.logits().source_case() == v1::Logits::kData && !data.empty()) {
      out.pieces_ = std::move(data);
    }
    return out;
  }
  // Whole, by protobuf itself.
  RETURN_IF_ERROR(ParseReceived(buffer, out.message_));
  out.slices_.clear();
  return out;
}

absl::Status ParseReceived(const grpc::ByteBuffer& buffer, google::protobuf::MessageLite& message,
                           absl::string_view what) {
  grpc::ByteBuffer shared(buffer);  // the same slices, one more reference
  grpc::ProtoBufferReader reader(&shared);
  if (!reader.status().ok() || !message.ParseFromZeroCopyStream(&reader)) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is not a ", message.GetTypeName(),
                                                   ": protobuf cannot parse its ", buffer.Length(),
                                                   " bytes"));
  }
  return absl::OkStatus();
}

grpc::ByteBuffer SerializeForWire(const google::protobuf::MessageLite& message) {
  grpc::Slice bytes(message.SerializeAsString());
  return grpc::ByteBuffer(&bytes, 1);
}

}  // namespace tokensampler::service
