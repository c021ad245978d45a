#include "service/shared_memory.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "prometheus/gauge.h"

namespace tokensampler::service {
namespace {

// --- The SIGBUS guard -------------------------------------------------------------------------
// A fixed table the handler scans without locks. A slot is live while `begin` is non-zero;
// writers set `end` before `begin` and clear `begin` before unmapping.
constexpr int kGuardSlots = 4096;

struct GuardSlot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<bool> faulted{false};
};

GuardSlot g_slots[kGuardSlots];
struct sigaction g_previous_action;
std::once_flag g_install_once;
absl::Mutex g_slot_mu;  // slot allocation only (never taken in the handler)
bool g_slot_used[kGuardSlots] ABSL_GUARDED_BY(g_slot_mu) = {};

void OnSigbus(int signal_number, siginfo_t* info, void* context) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(info->si_addr);
  for (GuardSlot& slot : g_slots) {
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    if (begin == 0 || address < begin) continue;
    const uintptr_t end = slot.end.load(std::memory_order_acquire);
    if (address >= end) continue;
    // Zero pages in place of the whole mapping: the read resumes and sees zeros.
    void* replaced = mmap(reinterpret_cast<void*>(begin), end - begin, PROT_READ,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (replaced != MAP_FAILED) {
      slot.faulted.store(true, std::memory_order_release);
      return;
    }
    break;
  }
  // Not one of ours: whatever would have happened without us.
  if ((g_previous_action.sa_flags & SA_SIGINFO) != 0 && g_previous_action.sa_sigaction != nullptr) {
    g_previous_action.sa_sigaction(signal_number, info, context);
    return;
  }
  if (g_previous_action.sa_handler != SIG_DFL && g_previous_action.sa_handler != SIG_IGN &&
      g_previous_action.sa_handler != nullptr) {
    g_previous_action.sa_handler(signal_number);
    return;
  }
  // Default action: returning re-executes the faulting access, which now kills the process.
  struct sigaction default_action;
  std::memset(&default_action, 0, sizeof(default_action));
  default_action.sa_handler = SIG_DFL;
  sigemptyset(&default_action.sa_mask);
  sigaction(SIGBUS, &default_action, nullptr);
}

void InstallSigbusHandler() {
  std::call_once(g_install_once, [] {
    struct sigaction action;
    std::memset(&action, 0, sizeof(action));
    action.sa_sigaction = OnSigbus;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &g_previous_action);
  });
}

int AcquireSlot(uintptr_t begin, uintptr_t end) {
  absl::MutexLock lock(&g_slot_mu);
  for (int i = 0; i < kGuardSlots; ++i) {
    if (g_slot_used[i]) continue;
    g_slot_used[i] = true;
    GuardSlot& slot = g_slots[i];
    slot.faulted.store(false, std::memory_order_relaxed);
    slot.end.store(end, std::memory_order_release);
    slot.begin.store(begin, std::memory_order_release);
    return i;
  }
  return -1;
}

void ReleaseSlot(int i) {
  absl::MutexLock lock(&g_slot_mu);
  g_slots[i].begin.store(0, std::memory_order_release);
  g_slot_used[i] = false;
}

// --- Keys and handles ---------------------------------------------------------------------------

constexpr absl::string_view kShmDir = "/dev/shm/";
constexpr size_t kMaxNameBytes = 128;

// Opens `key` read-only: "/name" through shm_open, or a path whose real location is under
// /dev/shm (symlinks resolved, so a link cannot point the server at another file).
absl::StatusOr<int> OpenKey(const std::string& key) {
  if (key.empty() || key[0] != '/') {
    return absl::InvalidArgumentError(absl::StrCat(
        "key must be a POSIX shm key \"/name\" or a path under /dev/shm, got \"", key, "\""));
  }
  if (key.find('/', 1) == std::string::npos) {
    if (key.size() < 2 || key.size() > NAME_MAX) {
      return absl::InvalidArgumentError(absl::StrCat("key \"", key, "\" is not a valid shm name"));
    }
    const int fd = shm_open(key.c_str(), O_RDONLY, 0);
    if (fd < 0) {
      return absl::NotFoundError(
          absl::StrCat("cannot open shared memory \"", key, "\": ", std::strerror(errno)));
    }
    return fd;
  }
  char resolved[PATH_MAX];
  if (realpath(key.c_str(), resolved) == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("cannot open shared memory \"", key, "\": ", std::strerror(errno)));
  }
  if (!absl::StartsWith(resolved, kShmDir)) {
    return absl::InvalidArgumentError(
        absl::StrCat("key \"", key, "\" resolves to ", resolved, ", which is not under /dev/shm"));
  }
  const int fd = open(resolved, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    return absl::NotFoundError(
        absl::StrCat("cannot open shared memory \"", key, "\": ", std::strerror(errno)));
  }
  return fd;
}

absl::StatusOr<std::string> NewHandle() {
  unsigned char bytes[16];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    const ssize_t n = getrandom(bytes + got, sizeof(bytes) - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("getrandom: ", std::strerror(errno)));
    }
    got += static_cast<size_t>(n);
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(bytes), sizeof(bytes)));
}

// Unix sockets, and in-process channels (gRPC 1.51 gives their calls the peer "unknown"; a
// network connection always has an "ipv4:" / "ipv6:" address).
bool IsLocalPeer(absl::string_view peer) {
  return absl::StartsWith(peer, "unix:") || absl::StartsWith(peer, "unix-abstract:") ||
         peer == "unknown" || peer == "inproc";
}

std::string Describe(const SharedMemoryRegionInfo& info) {
  return absl::StrCat("shared-memory region \"", info.name, "\" (key ", info.key, ", offset ",
                      info.offset, ", ", info.byte_size, " bytes)");
}

}  // namespace

absl::StatusOr<SharedMemoryMode> ParseSharedMemoryMode(absl::string_view text) {
  if (text == "off") return SharedMemoryMode::kOff;
  if (text == "unix") return SharedMemoryMode::kUnix;
  if (text == "all") return SharedMemoryMode::kAll;
  return absl::InvalidArgumentError(
      absl::StrCat("shared_memory must be off, unix or all, got \"", text, "\""));
}

absl::string_view SharedMemoryModeName(SharedMemoryMode mode) {
  switch (mode) {
    case SharedMemoryMode::kOff:
      return "off";
    case SharedMemoryMode::kUnix:
      return "unix";
    case SharedMemoryMode::kAll:
      return "all";
  }
  return "unknown";
}

// --- MappedRegion -------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<MappedRegion>> MappedRegion::Map(const std::string& key,
                                                                uint64_t offset,
                                                                uint64_t byte_size) {
  if (byte_size == 0) return absl::InvalidArgumentError("byte_size must be > 0, got 0");
  if (offset > UINT64_MAX - byte_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("offset + byte_size overflows: ", offset, " + ", byte_size));
  }
  absl::StatusOr<int> fd = OpenKey(key);
  if (!fd.ok()) return fd.status();
  std::unique_ptr<MappedRegion> region(new MappedRegion());
  region->fd_ = *fd;
  struct stat st;
  if (fstat(region->fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::NotFoundError(absl::StrCat("\"", key, "\" is not a shared-memory object"));
  }
  const uint64_t end = offset + byte_size;
  if (end > static_cast<uint64_t>(st.st_size)) {
    return absl::OutOfRangeError(absl::StrCat("offset + byte_size = ", offset, " + ", byte_size,
                                              " = ", end, " is beyond the end of \"", key, "\" (",
                                              st.st_size, " bytes)"));
  }
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t map_offset = offset - offset % page;
  region->map_size_ = static_cast<size_t>(end - map_offset);
  InstallSigbusHandler();
  void* map = mmap(nullptr, region->map_size_, PROT_READ, MAP_SHARED, region->fd_,
                   static_cast<off_t>(map_offset));
  if (map == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("mmap of \"", key, "\": ", std::strerror(errno)));
  }
  region->map_ = map;
  region->data_ = static_cast<const uint8_t*>(map) + (offset - map_offset);
  region->size_ = static_cast<size_t>(byte_size);
  region->end_ = end;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(map);
  region->slot_ = AcquireSlot(begin, begin + region->map_size_);
  if (region->slot_ < 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the process maps ", kGuardSlots, " shared-memory regions already"));
  }
  return region;
}

MappedRegion::~MappedRegion() {
  if (slot_ >= 0) ReleaseSlot(slot_);
  if (map_ != nullptr) munmap(map_, map_size_);
  if (fd_ >= 0) close(fd_);
}

bool MappedRegion::faulted() const {
  return slot_ >= 0 && g_slots[slot_].faulted.load(std::memory_order_acquire);
}

absl::Status MappedRegion::CheckReadable(absl::string_view what) const {
  if (faulted()) {
    return absl::FailedPreconditionError(
        absl::StrCat(what,
                     " could not be read: its object was truncated (or removed) under it while "
                     "mapped; unregister it and register it again"));
  }
  struct stat st;
  if (fstat(fd_, &st) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " cannot be checked: ", std::strerror(errno)));
  }
  if (static_cast<uint64_t>(st.st_size) < end_) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " ends at byte ", end_, " but its object was truncated to ", st.st_size,
                     " bytes; unregister it and register it again"));
  }
  return absl::OkStatus();
}

// --- SharedMemoryRegistry -----------------------------------------------------------------------

SharedMemoryRegistry::SharedMemoryRegistry(SharedMemoryOptions options,
                                           prometheus::Gauge* regions_gauge)
    : options_(options), regions_gauge_(regions_gauge) {}

SharedMemoryRegistry::~SharedMemoryRegistry() {
  absl::MutexLock lock(&mu_);
  if (regions_gauge_ != nullptr) {
    regions_gauge_->Decrement(static_cast<double>(regions_.size()));
  }
  regions_.clear();
}

absl::Status SharedMemoryRegistry::CheckAllowed(const SharedMemoryCaller& caller) const {
  switch (options_.mode) {
    case SharedMemoryMode::kAll:
      return absl::OkStatus();
    case SharedMemoryMode::kUnix:
      if (IsLocalPeer(caller.peer)) return absl::OkStatus();
      return absl::FailedPreconditionError(absl::StrCat(
          "shared memory is served on Unix sockets only (--shared_memory=unix); this call came "
          "from ",
          caller.peer, " (start the server with --shared_memory=all to allow TCP)"));
    case SharedMemoryMode::kOff:
      break;
  }
  return absl::FailedPreconditionError(
      "shared memory is off on this server (--shared_memory=off); send the logits as bytes");
}

absl::StatusOr<std::string> SharedMemoryRegistry::Register(const SharedMemoryCaller& caller,
                                                           const std::string& name,
                                                           const std::string& key, uint64_t offset,
                                                           uint64_t byte_size) {
  if (absl::Status allowed = CheckAllowed(caller); !allowed.ok()) return allowed;
  if (name.empty() || name.size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("name must be 1 to ", kMaxNameBytes, " bytes, got ", name.size(), " bytes"));
  }
  {
    absl::MutexLock lock(&mu_);
    if (static_cast<int>(regions_.size()) >= options_.max_regions) {
      return absl::ResourceExhaustedError(absl::StrCat(
          regions_.size(), " shared-memory regions are registered, the server's ",
          "limit (--shared_memory_max_regions=", options_.max_regions, "); unregister some first"));
    }
  }
  absl::StatusOr<std::unique_ptr<MappedRegion>> region = MappedRegion::Map(key, offset, byte_size);
  if (!region.ok()) return region.status();
  absl::StatusOr<std::string> handle = NewHandle();
  if (!handle.ok()) return handle.status();
  Entry entry{caller.token, SharedMemoryRegionInfo{*handle, name, key, offset, byte_size, false},
              std::shared_ptr<const MappedRegion>(std::move(*region))};
  absl::MutexLock lock(&mu_);
  if (static_cast<int>(regions_.size()) >= options_.max_regions) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the server's limit of ", options_.max_regions,
        " shared-memory regions was reached (--shared_memory_max_regions); unregister some"));
  }
  regions_.emplace(*handle, std::move(entry));
  if (regions_gauge_ != nullptr) regions_gauge_->Increment();
  return *handle;
}

absl::Status SharedMemoryRegistry::Unregister(const SharedMemoryCaller& caller,
                                              const std::string& handle) {
  if (absl::Status allowed = CheckAllowed(caller); !allowed.ok()) return allowed;
  std::shared_ptr<const MappedRegion> unmapped;  // released outside the lock
  absl::MutexLock lock(&mu_);
  const auto it = regions_.find(handle);
  if (it == regions_.end() || it->second.token != caller.token) {
    return absl::NotFoundError("region: no such shared-memory region (unknown handle)");
  }
  unmapped = std::move(it->second.region);
  regions_.erase(it);
  if (regions_gauge_ != nullptr) regions_gauge_->Decrement();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SharedMemoryRegionInfo>> SharedMemoryRegistry::List(
    const SharedMemoryCaller& caller, absl::Span<const std::string> handles) const {
  if (absl::Status allowed = CheckAllowed(caller); !allowed.ok()) return allowed;
  std::vector<SharedMemoryRegionInfo> out;
  {
    absl::MutexLock lock(&mu_);
    const auto add = [&](const Entry& entry) {
      if (entry.token != caller.token) return;
      SharedMemoryRegionInfo info = entry.info;
      info.faulted = entry.region->faulted();
      out.push_back(std::move(info));
    };
    if (!handles.empty()) {
      for (const std::string& handle : handles) {
        const auto it = regions_.find(handle);
        if (it != regions_.end()) add(it->second);
      }
    } else if (!caller.token.empty()) {
      for (const auto& [handle, entry] : regions_) add(entry);
    }
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return std::tie(a.name, a.handle) < std::tie(b.name, b.handle);
  });
  out.erase(std::unique(out.begin(), out.end(),
                        [](const auto& a, const auto& b) { return a.handle == b.handle; }),
            out.end());
  return out;
}

absl::StatusOr<SharedMemoryRegistry::Lease> SharedMemoryRegistry::Find(
    const SharedMemoryCaller& caller, const std::string& handle) const {
  if (absl::Status allowed = CheckAllowed(caller); !allowed.ok()) return allowed;
  absl::MutexLock lock(&mu_);
  const auto it = regions_.find(handle);
  if (it == regions_.end() || it->second.token != caller.token) {
    return absl::NotFoundError(
        "region: no such shared-memory region (unknown handle, unregistered, or registered "
        "with another bearer token)");
  }
  return Lease{it->second.region, Describe(it->second.info)};
}

int SharedMemoryRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(regions_.size());
}

}  // namespace tokensampler::service
