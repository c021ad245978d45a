// Comparing protobuf messages in tests: as deterministic bytes.
#ifndef TOKENSAMPLER_TESTS_TESTING_PROTO_TESTING_H_
#define TOKENSAMPLER_TESTS_TESTING_PROTO_TESTING_H_

#include <string>

#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/message.h"

namespace tokensampler::testing {

// `message` serialised deterministically: equal for equal messages, maps in key order, and a
// NaN field equal to itself (which MessageDifferencer does not grant).
inline std::string DeterministicBytes(const google::protobuf::Message& message) {
  std::string out;
  {
    google::protobuf::io::StringOutputStream stream(&out);
    google::protobuf::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    message.SerializeToCodedStream(&coded);
  }
  return out;
}

}  // namespace tokensampler::testing

#endif  // TOKENSAMPLER_TESTS_TESTING_PROTO_TESTING_H_
