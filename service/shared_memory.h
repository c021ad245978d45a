// Shared-memory logits: SharedMemoryRegistry, the regions clients registered (RegisterSharedMemory)
// mapped read-only into the server, and MappedRegion, one such mapping guarded against SIGBUS.
//
// Zero copy: a request's SharedMemoryRef becomes a LogitsView straight over the mapping; the
// sampler reads the client's bytes where they are.
//
// SIGBUS safety (Wayland's wl_shm design). A client may shrink its object (ftruncate) while the
// server reads it; reading a mapped page past the new end raises SIGBUS. A process-wide SIGBUS
// handler, installed when the first region is mapped, looks the faulting address up in a
// lock-free table of the live mappings; when it lies in one, the handler replaces that whole
// mapping with anonymous zero pages (mmap MAP_FIXED, a plain system call, safe in a handler),
// marks the region faulted and returns, so the read goes on over zeros. The request checks the
// flag after the read and answers FAILED_PRECONDITION naming the region; the region stays
// faulted (every later use says so) until it is unregistered. A SIGBUS elsewhere goes to the
// previous handler (or the default action: the process dies as it would have). Each use also
// checks the object's size first (fstat), so the common case — truncated between requests —
// never faults at all. The table must be a global: a signal handler can reach nothing else.
// Sealed memfds (F_SEAL_SHRINK) would avoid the handler, but a memfd cannot be named across
// processes through gRPC (it needs SCM_RIGHTS on the socket), and POSIX shm keys / /dev/shm
// paths are what model workers (Python multiprocessing.shared_memory, torch) create.
//
// Scoping: every region belongs to the namespace of the caller that registered it (its bearer
// token; callers without a token share the anonymous namespace) and is named by an unguessable
// 128-bit handle from getrandom(2): a capability. Using, unregistering or listing a region
// needs its namespace; anonymous callers can list only handles they present. Error messages
// and logs name a region by its name and key, never by its handle.
//
// Thread-safe.
#ifndef TOKENSAMPLER_SERVICE_SHARED_MEMORY_H_
#define TOKENSAMPLER_SERVICE_SHARED_MEMORY_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace prometheus {
class Gauge;
}  // namespace prometheus

namespace tokensampler::service {

// Where shared memory is served (--shared_memory).
enum class SharedMemoryMode {
  kOff,   // nowhere
  kUnix,  // Unix-socket listeners and in-process channels (the default)
  kAll,   // every listener, TCP included (the client must be on the same host)
};

// Parses "off", "unix" or "all"; INVALID_ARGUMENT otherwise.
absl::StatusOr<SharedMemoryMode> ParseSharedMemoryMode(absl::string_view text);
absl::string_view SharedMemoryModeName(SharedMemoryMode mode);

// A read-only mapping of [offset, offset + byte_size) of a shared-memory object.
class MappedRegion {
 public:
  // Opens `key` ("/name" for shm_open, or an absolute path that resolves under /dev/shm)
  // read-only and maps the range. Returns INVALID_ARGUMENT (a bad key, byte_size 0, an
  // overflowing range), NOT_FOUND (no such object, or not readable), OUT_OF_RANGE (the range
  // goes beyond the object's size), RESOURCE_EXHAUSTED (the process-wide table of guarded
  // mappings is full), INTERNAL (mmap failed).
  static absl::StatusOr<std::unique_ptr<MappedRegion>> Map(const std::string& key, uint64_t offset,
                                                           uint64_t byte_size);

  // Unmaps and closes.
  ~MappedRegion();
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;

  // The region's bytes. Reading them never crashes the process (see the file comment).
  absl::Span<const uint8_t> bytes() const { return {data_, size_}; }

  // True once a read faulted (the mapping then holds zeros).
  bool faulted() const;

  // OK, or FAILED_PRECONDITION when a read faulted or the object is now shorter than the
  // region's end. `what` names the region in the message.
  absl::Status CheckReadable(absl::string_view what) const;

 private:
  MappedRegion() = default;

  int fd_ = -1;
  void* map_ = nullptr;  // page-aligned start of the mapping
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  uint64_t end_ = 0;  // offset + byte_size in the object
  int slot_ = -1;     // index in the SIGBUS table
};

// What the registry needs to know about a caller.
struct SharedMemoryCaller {
  std::string peer;   // grpc peer string: "unix:...", "ipv4:...", "inproc", ...
  std::string token;  // the bearer token it sent ("" = anonymous namespace)
};

struct SharedMemoryRegionInfo {
  std::string handle;
  std::string name;
  std::string key;
  uint64_t offset = 0;
  uint64_t byte_size = 0;
  bool faulted = false;
};

struct SharedMemoryOptions {
  SharedMemoryMode mode = SharedMemoryMode::kUnix;
  // Regions registered at a time over all callers; RESOURCE_EXHAUSTED beyond. Each holds one
  // file descriptor and one mapping.
  int max_regions = 256;
};

class SharedMemoryRegistry {
 public:
  // `regions_gauge` (nullable) follows the number of registered regions.
  SharedMemoryRegistry(SharedMemoryOptions options, prometheus::Gauge* regions_gauge);
  // Unmaps every region (once the requests holding one are done with it).
  ~SharedMemoryRegistry();
  SharedMemoryRegistry(const SharedMemoryRegistry&) = delete;
  SharedMemoryRegistry& operator=(const SharedMemoryRegistry&) = delete;

  SharedMemoryMode mode() const { return options_.mode; }

  // OK when shared memory is served to `caller`'s transport, else FAILED_PRECONDITION naming
  // the mode and the peer.
  absl::Status CheckAllowed(const SharedMemoryCaller& caller) const;

  // Maps a region (MappedRegion::Map) and returns its new handle. Also INVALID_ARGUMENT for a
  // name that is empty or longer than 128 bytes, RESOURCE_EXHAUSTED at max_regions, and
  // CheckAllowed's error.
  absl::StatusOr<std::string> Register(const SharedMemoryCaller& caller, const std::string& name,
                                       const std::string& key, uint64_t offset, uint64_t byte_size);

  // Forgets a region; it is unmapped once no request reads it. NOT_FOUND for a handle unknown
  // in the caller's namespace.
  absl::Status Unregister(const SharedMemoryCaller& caller, const std::string& handle);

  // The caller's regions (see the file comment for who sees what), sorted by name then handle.
  absl::StatusOr<std::vector<SharedMemoryRegionInfo>> List(
      const SharedMemoryCaller& caller, absl::Span<const std::string> handles) const;

  // A region the caller may read, with its description for messages ("region \"name\" (key
  // /k)"). The region stays mapped while the returned pointer lives. NOT_FOUND for an unknown
  // handle (or another namespace's), and CheckAllowed's error.
  struct Lease {
    std::shared_ptr<const MappedRegion> region;
    std::string description;
  };
  absl::StatusOr<Lease> Find(const SharedMemoryCaller& caller, const std::string& handle) const;

  int size() const;

 private:
  struct Entry {
    std::string token;
    SharedMemoryRegionInfo info;
    std::shared_ptr<const MappedRegion> region;
  };

  const SharedMemoryOptions options_;
  prometheus::Gauge* const regions_gauge_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, Entry> regions_ ABSL_GUARDED_BY(mu_);  // by handle
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_SHARED_MEMORY_H_
