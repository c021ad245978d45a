// Test helpers for the operational side of the server: fetch and parse the Prometheus metrics
// (libcurl over loopback, or the in-process text), generate a throw-away PKI with the openssl
// CLI (a CA, server and client certificates, and a second, unrelated CA with its own client),
// and wait for a condition with a bound. Thread-compatible.
#ifndef TOKENSAMPLER_TESTS_TESTING_OPERATIONS_TESTING_H_
#define TOKENSAMPLER_TESTS_TESTING_OPERATIONS_TESTING_H_

#include <curl/curl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace tokensampler::testing {

// --- Prometheus -----------------------------------------------------------------------------

// GET http://`host_port``path` over loopback; returns the body of a 200 answer.
inline absl::StatusOr<std::string> HttpGet(const std::string& host_port,
                                           const std::string& path = "/metrics") {
  CURL* curl = curl_easy_init();
  if (curl == nullptr) return absl::InternalError("curl_easy_init failed");
  std::string body;
  const std::string url = absl::StrCat("http://", host_port, path);
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_NOPROXY, "*");
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 20L);
  curl_easy_setopt(
      curl, CURLOPT_WRITEFUNCTION, +[](char* data, size_t size, size_t n, void* out) -> size_t {
        static_cast<std::string*>(out)->append(data, size * n);
        return size * n;
      });
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body);
  const CURLcode rc = curl_easy_perform(curl);
  long http_code = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &http_code);
  curl_easy_cleanup(curl);
  if (rc != CURLE_OK) {
    return absl::UnavailableError(absl::StrCat("GET ", url, ": ", curl_easy_strerror(rc)));
  }
  if (http_code != 200) {
    return absl::UnavailableError(absl::StrCat("GET ", url, ": HTTP ", http_code));
  }
  return body;
}

using Labels = std::vector<std::pair<std::string, std::string>>;

// "name{a="x",b="y"}" with the labels sorted by name: the key of one sample.
inline std::string MetricKey(absl::string_view name, Labels labels = {}) {
  if (labels.empty()) return std::string(name);
  std::sort(labels.begin(), labels.end());
  std::vector<std::string> parts;
  for (const auto& [k, v] : labels) parts.push_back(absl::StrCat(k, "=\"", v, "\""));
  return absl::StrCat(name, "{", absl::StrJoin(parts, ","), "}");
}

// Every sample of a text exposition, by MetricKey. Comment lines are skipped; label values may
// hold escaped quotes. A malformed line is an error.
inline absl::StatusOr<std::map<std::string, double>> ParsePrometheusText(absl::string_view text) {
  std::map<std::string, double> samples;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipWhitespace())) {
    if (line.front() == '#') continue;
    const size_t name_end = line.find_first_of("{ ");
    if (name_end == absl::string_view::npos) {
      return absl::InvalidArgumentError(absl::StrCat("no value: ", line));
    }
    const absl::string_view name = line.substr(0, name_end);
    Labels labels;
    size_t pos = name_end;
    if (line[pos] == '{') {
      ++pos;
      while (pos < line.size() && line[pos] != '}') {
        const size_t eq = line.find('=', pos);
        if (eq == absl::string_view::npos || eq + 1 >= line.size() || line[eq + 1] != '"') {
          return absl::InvalidArgumentError(absl::StrCat("bad labels: ", line));
        }
        std::string value;
        size_t i = eq + 2;
        for (; i < line.size() && line[i] != '"'; ++i) {
          if (line[i] == '\\' && i + 1 < line.size()) ++i;
          value += line[i];
        }
        labels.emplace_back(std::string(line.substr(pos, eq - pos)), value);
        pos = i + 1;
        if (pos < line.size() && line[pos] == ',') ++pos;
      }
      ++pos;  // '}'
    }
    double value = 0;
    const absl::string_view number = absl::StripAsciiWhitespace(line.substr(pos));
    if (number == "Nan" || number == "NaN") {
      value = std::numeric_limits<double>::quiet_NaN();
    } else if (!absl::SimpleAtod(number, &value)) {
      return absl::InvalidArgumentError(absl::StrCat("bad value: ", line));
    }
    samples[MetricKey(name, std::move(labels))] = value;
  }
  return samples;
}

// The value of one sample, or nullopt when it is absent.
inline std::optional<double> MetricSample(const std::map<std::string, double>& samples,
                                          absl::string_view name, Labels labels = {}) {
  const auto it = samples.find(MetricKey(name, std::move(labels)));
  if (it == samples.end()) return std::nullopt;
  return it->second;
}

// Calls `condition` every 5 ms until it is true or `timeout` passes; returns its last answer.
// For states reached asynchronously (a call counted as queued), never for timing assertions.
inline bool WaitFor(const std::function<bool()>& condition,
                    absl::Duration timeout = absl::Seconds(20)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return true;
}

// --- TLS ------------------------------------------------------------------------------------

inline std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// Certificates made with the openssl CLI for this test run (EC P-256, valid for 2 days).
// Paths; Pem() reads one.
struct TestPki {
  std::string dir;
  std::string ca_cert;
  std::string server_cert;  // CN localhost, SAN IP:127.0.0.1 and DNS:localhost; signed by ca
  std::string server_key;
  std::string client_cert;  // signed by ca
  std::string client_key;
  std::string other_ca_cert;      // an unrelated CA
  std::string other_client_cert;  // signed by other_ca
  std::string other_client_key;

  static std::string Pem(const std::string& path) { return ReadFileOrEmpty(path); }

  // Generates everything in `dir` (created). Returns INTERNAL with openssl's output when a
  // command fails (openssl missing: install the Debian package `openssl`).
  static absl::StatusOr<TestPki> Generate(const std::string& dir) {
    if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
      return absl::InternalError(absl::StrCat("mkdir ", dir));
    }
    const std::string log = absl::StrCat(dir, "/openssl.log");
    const auto run = [&](const std::string& command) -> absl::Status {
      const std::string full = absl::StrCat("cd '", dir, "' && ", command, " >>'", log, "' 2>&1");
      if (std::system(full.c_str()) != 0) {
        return absl::InternalError(
            absl::StrCat("openssl failed: ", command, "\n", ReadFileOrEmpty(log)));
      }
      return absl::OkStatus();
    };
    const std::string new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    const auto make_ca = [&](const std::string& name) {
      return run(absl::StrCat(
          "openssl req -x509 ", new_key, " -keyout ", name, ".key -out ", name,
          ".pem -days 2 -subj '/CN=tokensampler test ", name,
          "' -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"));
    };
    const auto make_leaf = [&](const std::string& name, const std::string& ca,
                               const std::string& cn, const std::string& extensions) {
      std::ofstream(absl::StrCat(dir, "/", name, ".ext")) << extensions;
      if (absl::Status s = run(absl::StrCat("openssl req ", new_key, " -keyout ", name,
                                            ".key -out ", name, ".csr -subj '/CN=", cn, "'"));
          !s.ok()) {
        return s;
      }
      return run(absl::StrCat("openssl x509 -req -in ", name, ".csr -CA ", ca, ".pem -CAkey ", ca,
                              ".key -CAcreateserial -out ", name, ".pem -days 2 -extfile ", name,
                              ".ext"));
    };
    const std::string server_ext =
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n";
    const std::string client_ext = "extendedKeyUsage=clientAuth\n";
    for (absl::Status s :
         {make_ca("ca"), make_ca("other_ca"), make_leaf("server", "ca", "localhost", server_ext),
          make_leaf("client", "ca", "worker", client_ext),
          make_leaf("other_client", "other_ca", "intruder", client_ext)}) {
      if (!s.ok()) return s;
    }
    TestPki pki;
    pki.dir = dir;
    const auto path = [&dir](absl::string_view file) { return absl::StrCat(dir, "/", file); };
    pki.ca_cert = path("ca.pem");
    pki.server_cert = path("server.pem");
    pki.server_key = path("server.key");
    pki.client_cert = path("client.pem");
    pki.client_key = path("client.key");
    pki.other_ca_cert = path("other_ca.pem");
    pki.other_client_cert = path("other_client.pem");
    pki.other_client_key = path("other_client.key");
    return pki;
  }

  // Removes the directory.
  void Remove() const {
    if (!dir.empty()) (void)std::system(absl::StrCat("rm -rf '", dir, "'").c_str());
  }
};

}  // namespace tokensampler::testing

#endif  // TOKENSAMPLER_TESTS_TESTING_OPERATIONS_TESTING_H_
