// ReceivedSampleRequest against protobuf's own parse: for well-formed requests in every wire form
// a sender may use (one message, the logits split over several fields, oneof members replacing
// each other, unknown fields) cut into slices of every size down to one byte, and for corrupted
// and truncated bytes, the parse gives protobuf's message (with the logits bytes back in place)
// or fails where protobuf fails; and well-formed requests leave their logits bytes in the slices.
#include "service/received_request.h"

#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/stubs/logging.h"
#include "gtest/gtest.h"
#include "tests/testing/proto_testing.h"

namespace tokensampler::service {
namespace {

// `bytes` as a ByteBuffer of slices of the given sizes (the last takes the rest).
grpc::ByteBuffer Buffer(const std::string& bytes, std::mt19937_64& rng, size_t max_slice) {
  std::vector<grpc::Slice> slices;
  size_t at = 0;
  while (at < bytes.size()) {
    const size_t n =
        std::min(bytes.size() - at, std::uniform_int_distribution<size_t>(1, max_slice)(rng));
    slices.emplace_back(bytes.data() + at, n);
    at += n;
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

// The message the parse stands for: its logits bytes put back where they came from.
v1::SampleRequest Whole(const ReceivedSampleRequest& received) {
  v1::SampleRequest whole = received.message();
  if (!received.data_pieces().empty()) {
    std::string& data = *whole.mutable_logits()->mutable_data();
    EXPECT_TRUE(data.empty());
    for (const LogitsView::Piece& piece : received.data_pieces()) {
      EXPECT_EQ(piece.offset, data.size());
      data.append(reinterpret_cast<const char*>(piece.bytes.data()), piece.bytes.size());
    }
  }
  return whole;
}

std::string RandomBytes(std::mt19937_64& rng, size_t n) {
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(rng());
  return out;
}

v1::SampleRequest RandomRequest(std::mt19937_64& rng) {
  v1::SampleRequest request;
  v1::Logits& logits = *request.mutable_logits();
  logits.set_dtype(v1::DTYPE_FLOAT32);
  logits.set_rows(static_cast<uint32_t>(1 + rng() % 3));
  logits.set_vocab_size(static_cast<uint32_t>(1 + rng() % 5000));
  switch (rng() % 4) {
    case 0:
      logits.mutable_shared_memory()->set_region("r1");
      break;
    case 1:
      logits.mutable_sparse()->set_k(3);
      break;
    default:
      logits.set_data(RandomBytes(rng, rng() % 3 == 0 ? rng() % 300 : rng() % 200000));
  }
  for (uint32_t r = 0; r < logits.rows(); ++r) {
    v1::SampleRow& row = *request.add_rows();
    row.mutable_params()->set_temperature(0.5f + static_cast<float>(r));
    row.mutable_params()->set_top_k(static_cast<int32_t>(rng() % 100));
    for (int i = 0; i < static_cast<int>(rng() % 50); ++i) {
      row.add_prompt_token_ids(static_cast<int32_t>(rng() % 1000));
    }
  }
  return request;
}

void AppendVarint(uint64_t value, std::string* out) {
  uint8_t bytes[10];
  const uint8_t* end = google::protobuf::io::CodedOutputStream::WriteVarint64ToArray(value, bytes);
  out->append(reinterpret_cast<const char*>(bytes), static_cast<size_t>(end - bytes));
}

// A length-delimited field.
std::string Field(uint32_t number, const std::string& payload) {
  std::string out;
  AppendVarint((number << 3) | 2, &out);
  AppendVarint(payload.size(), &out);
  return out + payload;
}

// Wire forms of `request` that protobuf parses to the same message, and some that it parses to
// another (later fields replacing earlier ones), all well-formed.
std::vector<std::string> WireForms(const v1::SampleRequest& request, std::mt19937_64& rng) {
  std::vector<std::string> forms = {request.SerializeAsString()};
  // The C++ client's: the message without the bytes, then a second `logits` holding only them.
  if (request.logits().source_case() == v1::Logits::kData) {
    v1::SampleRequest head = request;
    head.mutable_logits()->clear_data();
    forms.push_back(head.SerializeAsString() + Field(1, Field(4, request.logits().data())));
    // Two `data` in separate `logits` fields: the later one wins.
    forms.push_back(request.SerializeAsString() + Field(1, Field(4, RandomBytes(rng, 100))));
    // `data`, then another member of its oneof: shared memory wins.
    v1::Logits other;
    other.mutable_shared_memory()->set_region("later");
    forms.push_back(request.SerializeAsString() + Field(1, other.SerializeAsString()));
  } else {
    // Another member, then `data`: the bytes win.
    forms.push_back(request.SerializeAsString() + Field(1, Field(4, RandomBytes(rng, 5000))));
  }
  // Unknown fields at the top level and inside `logits` (varint, fixed64, fixed32, bytes),
  // and `data`'s number with the wrong wire type (an unknown field to protobuf).
  std::string unknown;
  AppendVarint((99 << 3) | 0, &unknown);
  AppendVarint(123456789, &unknown);
  AppendVarint((98 << 3) | 1, &unknown);
  unknown += std::string(8, '\x07');
  AppendVarint((97 << 3) | 5, &unknown);
  unknown += std::string(4, '\x09');
  unknown += Field(96, "xyz");
  std::string wrong_type;
  AppendVarint((4 << 3) | 0, &wrong_type);
  AppendVarint(7, &wrong_type);
  forms.push_back(unknown + request.SerializeAsString() + Field(1, unknown + wrong_type) + unknown);
  // An overlong (but valid) encoding of the `logits` tag.
  forms.push_back(std::string("\x8a\x00", 2) + Field(1, "").substr(1) +
                  request.SerializeAsString());
  return forms;
}

// An unknown group (field 50) holding a varint, then a request: valid, kept as unknown fields.
std::string GoodGroup() {
  std::string out;
  AppendVarint((50 << 3) | 3, &out);
  AppendVarint((1 << 3) | 0, &out);
  AppendVarint(5, &out);
  AppendVarint((50 << 3) | 4, &out);
  v1::SampleRequest request;
  request.mutable_logits()->set_data("abcd");
  return out + request.SerializeAsString();
}

// Parses `bytes` both ways and compares; returns whether the bytes stayed in the slices.
bool ExpectAsProtobuf(const std::string& bytes, std::mt19937_64& rng, size_t max_slice,
                      const std::string& where) {
  v1::SampleRequest want;
  const bool parses = want.ParseFromString(bytes);
  const absl::StatusOr<ReceivedSampleRequest> got =
      ReceivedSampleRequest::Parse(Buffer(bytes, rng, max_slice));
  EXPECT_EQ(got.ok(), parses) << where << ": " << got.status();
  if (!got.ok() || !parses) {
    if (!got.ok()) {
      EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << where;
      EXPECT_NE(got.status().message().find("not a tokensampler.v1.SampleRequest"),
                absl::string_view::npos)
          << got.status();
    }
    return false;
  }
  EXPECT_EQ(got->wire_bytes(), bytes.size()) << where;
  const v1::SampleRequest whole = Whole(*got);
  // As deterministic bytes: maps in key order, and a NaN parameter equal to itself.
  EXPECT_EQ(testing::DeterministicBytes(whole), testing::DeterministicBytes(want))
      << where << "\n got: " << whole.ShortDebugString().substr(0, 300)
      << "\nwant: " << want.ShortDebugString().substr(0, 300);
  return !got->data_pieces().empty();
}

TEST(ReceivedSampleRequestTest, WellFormedRequestsParseAsProtobufWithoutCopyingTheirBytes) {
  std::mt19937_64 rng(42);
  int aliased = 0, forms = 0;
  for (int i = 0; i < 120; ++i) {
    const v1::SampleRequest request = RandomRequest(rng);
    std::vector<std::string> wire = WireForms(request, rng);
    for (size_t f = 0; f < wire.size(); ++f) {
      for (size_t max_slice : {size_t{1}, size_t{7}, size_t{4096}, size_t{65536}}) {
        if (max_slice == 1 && wire[f].size() > 20000) continue;  // slow, and covered by 7
        const std::string where = absl::StrCat("request ", i, " form ", f, " slices ≤ ", max_slice);
        const bool kept = ExpectAsProtobuf(wire[f], rng, max_slice, where);
        v1::SampleRequest parsed;
        ASSERT_TRUE(parsed.ParseFromString(wire[f])) << where;
        // Every well-formed form whose message holds bytes leaves them in the slices.
        EXPECT_EQ(kept, parsed.logits().source_case() == v1::Logits::kData &&
                            !parsed.logits().data().empty())
            << where;
        aliased += kept;
        ++forms;
      }
    }
  }
  EXPECT_GT(aliased, forms / 4);
}

TEST(ReceivedSampleRequestTest, CorruptedAndTruncatedBytesParseOrFailAsProtobufDoes) {
  const google::protobuf::LogSilencer quiet;  // protobuf logs each invalid UTF-8 string it meets
  std::mt19937_64 rng(7);
  int failures = 0, cases = 0;
  for (int i = 0; i < 400; ++i) {
    v1::SampleRequest request = RandomRequest(rng);
    if (request.logits().source_case() == v1::Logits::kData) {
      request.mutable_logits()->set_data(RandomBytes(rng, rng() % 2000));
    }
    std::vector<std::string> wire = WireForms(request, rng);
    std::string bytes = wire[rng() % wire.size()];
    switch (rng() % 3) {
      case 0:  // cut short
        bytes.resize(rng() % (bytes.size() + 1));
        break;
      case 1:  // a few bytes changed, where the tags and lengths are
        for (int k = 0; k < 3; ++k)
          bytes[rng() % std::min<size_t>(bytes.size(), 40)] ^= static_cast<char>(rng());
        break;
      default:  // random bytes anywhere
        for (int k = 0; k < 4; ++k) bytes[rng() % bytes.size()] = static_cast<char>(rng());
    }
    v1::SampleRequest probe;
    failures += !probe.ParseFromString(bytes);
    ++cases;
    ExpectAsProtobuf(bytes, rng, 1 + rng() % 64, absl::StrCat("case ", i));
  }
  // Both outcomes occur.
  EXPECT_GT(failures, cases / 10);
  EXPECT_LT(failures, cases);
  // Groups, which the splitter leaves to protobuf (a start group that never ends: invalid).
  std::mt19937_64 more(1);
  ExpectAsProtobuf(std::string("\x0b", 1), more, 4, "an unterminated group");
  ExpectAsProtobuf(GoodGroup(), more, 4, "a group");
}

}  // namespace
}  // namespace tokensampler::service
