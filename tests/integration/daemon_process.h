// DaemonProcess: runs the real tokensamplerd binary as a child process for integration tests.
// It learns the bound addresses from `--port_file` (gRPC, health-only and metrics listeners),
// captures stderr to a file, and stops the daemon with a signal, reporting its exit status.
// Extra environment variables may be given (TOKENSAMPLER_* configuration). Every wait is bounded.
// Thread-compatible.
#ifndef TOKENSAMPLER_TESTS_INTEGRATION_DAEMON_PROCESS_H_
#define TOKENSAMPLER_TESTS_INTEGRATION_DAEMON_PROCESS_H_

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "tests/testing/service_testing.h"

extern char** environ;

namespace tokensampler::testing {

inline std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

class DaemonProcess {
 public:
  // Starts `binary` with `args` plus `--port_file`, and waits until the daemon has written its
  // bound addresses. Returns the running daemon, or
  //   INTERNAL           spawning failed;
  //   UNAVAILABLE        the daemon exited before serving (its stderr is in the message);
  //   DEADLINE_EXCEEDED  it did not serve within `timeout` (it is killed).
  // `env` holds extra "NAME=value" entries added to this process's environment.
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Start(
      const std::string& binary, const std::vector<std::string>& args,
      absl::Duration timeout = absl::Seconds(30), const std::vector<std::string>& env = {}) {
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = Spawn(binary, args, env);
    if (!daemon.ok()) return daemon.status();
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      if (access((*daemon)->port_file_.c_str(), R_OK) == 0) {
        for (absl::string_view line :
             absl::StrSplit(ReadWholeFile((*daemon)->port_file_), '\n', absl::SkipWhitespace())) {
          if (absl::ConsumePrefix(&line, "health=")) {
            (*daemon)->health_addresses_.emplace_back(line);
          } else if (absl::ConsumePrefix(&line, "metrics=")) {
            (*daemon)->metrics_address_ = std::string(line);
          } else {
            (*daemon)->addresses_.emplace_back(line);
          }
        }
        return daemon;
      }
      if (std::optional<int> exit = (*daemon)->TryReap()) {
        return absl::UnavailableError(absl::StrCat("tokensamplerd exited with ", *exit,
                                                   " before serving; stderr:\n",
                                                   (*daemon)->Stderr()));
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    return absl::DeadlineExceededError(absl::StrCat("tokensamplerd did not serve within ",
                                                    absl::FormatDuration(timeout), "; stderr:\n",
                                                    (*daemon)->Stderr()));
  }

  // Runs `binary` with `args` until it exits by itself (≤ `timeout`, then it is killed) and
  // returns its exit status; `stderr_out` receives what it printed. For start-up failures.
  static absl::StatusOr<int> RunToExit(const std::string& binary,
                                       const std::vector<std::string>& args,
                                       std::string* stderr_out,
                                       absl::Duration timeout = absl::Seconds(30),
                                       const std::vector<std::string>& env = {}) {
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon = Spawn(binary, args, env);
    if (!daemon.ok()) return daemon.status();
    absl::StatusOr<int> exit = (*daemon)->WaitForExit(timeout);
    *stderr_out = (*daemon)->Stderr();
    return exit;
  }

  // Kills the daemon (SIGKILL) if it still runs, and removes its files.
  ~DaemonProcess() {
    if (pid_ > 0) (void)Stop(SIGKILL);
    std::remove(port_file_.c_str());
    std::remove(stderr_file_.c_str());
  }

  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;

  // The bound addresses, in --listen order, port 0 resolved ("127.0.0.1:41234", "unix:/p").
  const std::vector<std::string>& addresses() const { return addresses_; }
  // The same for --health_listen, and the --metrics_listen address ("" when off).
  const std::vector<std::string>& health_addresses() const { return health_addresses_; }
  const std::string& metrics_address() const { return metrics_address_; }

  pid_t pid() const { return pid_; }

  // Sends `signal` and waits (≤ `timeout`) for the daemon to exit. Returns its exit code, or
  // 128 + the signal number that killed it, or DEADLINE_EXCEEDED (it is then SIGKILLed).
  absl::StatusOr<int> Stop(int signal = SIGTERM, absl::Duration timeout = absl::Seconds(30)) {
    if (pid_ <= 0) return absl::FailedPreconditionError("not running");
    kill(pid_, signal);
    return WaitForExit(timeout);
  }

  // Everything the daemon wrote to stderr so far.
  std::string Stderr() const { return ReadWholeFile(stderr_file_); }

 private:
  DaemonProcess() = default;

  // Starts the child with stderr redirected to a file and an empty signal mask.
  static absl::StatusOr<std::unique_ptr<DaemonProcess>> Spawn(const std::string& binary,
                                                              const std::vector<std::string>& args,
                                                              const std::vector<std::string>& env) {
    std::unique_ptr<DaemonProcess> daemon(new DaemonProcess());
    daemon->port_file_ = UniqueTempPath("ports.txt");
    daemon->stderr_file_ = UniqueTempPath("stderr.txt");
    std::vector<std::string> argv = {binary};
    argv.insert(argv.end(), args.begin(), args.end());
    argv.push_back(absl::StrCat("--port_file=", daemon->port_file_));
    std::vector<char*> argv_ptrs;
    for (std::string& arg : argv) argv_ptrs.push_back(arg.data());
    argv_ptrs.push_back(nullptr);

    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, daemon->stderr_file_.c_str(),
                                     O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t none;
    sigemptyset(&none);
    posix_spawnattr_setsigmask(&attr, &none);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
    std::vector<std::string> envp_strings = env;
    for (char** e = environ; *e != nullptr; ++e) envp_strings.emplace_back(*e);
    std::vector<char*> envp;  // ours first: getenv() returns the first match
    for (std::string& entry : envp_strings) envp.push_back(entry.data());
    envp.push_back(nullptr);
    const int rc =
        posix_spawn(&daemon->pid_, binary.c_str(), &actions, &attr, argv_ptrs.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    if (rc != 0) {
      daemon->pid_ = -1;
      return absl::InternalError(absl::StrCat("posix_spawn ", binary, ": ", std::strerror(rc)));
    }
    return daemon;
  }

  // Waits (≤ `timeout`) for the child to exit; see Stop() for the result.
  absl::StatusOr<int> WaitForExit(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      if (std::optional<int> exit = TryReap()) return *exit;
      absl::SleepFor(absl::Milliseconds(10));
    }
    kill(pid_, SIGKILL);
    while (!TryReap().has_value()) absl::SleepFor(absl::Milliseconds(10));
    return absl::DeadlineExceededError(
        absl::StrCat("tokensamplerd did not exit within ", absl::FormatDuration(timeout)));
  }

  // The exit status if the child has exited (and reaps it), else nullopt.
  std::optional<int> TryReap() {
    int status = 0;
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r != pid_) return std::nullopt;
    pid_ = -1;
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return -1;
  }

  pid_t pid_ = -1;
  std::string port_file_;
  std::string stderr_file_;
  std::vector<std::string> addresses_;
  std::vector<std::string> health_addresses_;
  std::string metrics_address_;
};

}  // namespace tokensampler::testing

#endif  // TOKENSAMPLER_TESTS_INTEGRATION_DAEMON_PROCESS_H_
