"""Fast inputs: shared-memory logits and sparse candidates.

Shared memory (a sidecar on the same host, Unix socket; the server serves it there by default):

    with client.shared_memory_logits(rows=64, vocab_size=128256, dtype="bfloat16") as shm:
        for step in range(steps):
            shm.array[:] = next_logits_bits        # numpy view [rows, vocab] of the region
            result = client.sample(shm, params)    # sends a reference; the server reads in place

Sparse candidates (per row the top-k logits and the log-sum-exp of the rest; exact only for the
parameters the proto's SparseCandidates lists — the server rejects the others):

    logits = tokensampler.sparse_from_dense(dense, k=1024)   # or sparse_logits(ids, values, rest)
    result = client.sample(logits, {"top_k": 50, "temperature": 0.8})

With torch on the GPU: `values, ids = torch.topk(x, k)`; `rest = torch.logsumexp(x.scatter(1,
ids, -inf), 1)`; then sparse_logits(ids.cpu().numpy(), values.cpu().numpy(), rest.cpu().numpy()).
"""

import secrets
from multiprocessing import shared_memory

import numpy as np

from tokensampler.logits import encode_logits
from tokensampler.v1 import sampler_pb2

_DTYPES = {
    "float32": (sampler_pb2.DTYPE_FLOAT32, np.float32),
    "float16": (sampler_pb2.DTYPE_FLOAT16, np.float16),
    "bfloat16": (sampler_pb2.DTYPE_BFLOAT16, np.uint16),  # bit patterns
}


def logits_message(logits, dtype=None):
    """The `Logits` message for any accepted form: a ready `Logits` message (e.g. sparse_logits),
    a SharedMemoryLogits (a reference), or an array / tensor (encoded as raw bytes)."""
    if isinstance(logits, sampler_pb2.Logits):
        return logits
    if isinstance(logits, SharedMemoryLogits):
        return logits.message()
    return encode_logits(logits, dtype)


class SharedMemoryLogits:
    """A [rows, vocab_size] logits buffer in POSIX shared memory, registered with a server.

    `array` is a numpy view of the region (float32 / float16, or uint16 bfloat16 bit patterns).
    Pass the object itself as `logits` to Client.sample (or `message()` into any Logits field).
    `close()` (or leaving the `with` block) unregisters the region and unlinks the object.
    Create it with Client.shared_memory_logits. Thread-compatible.
    """

    def __init__(self, client, rows, vocab_size, dtype="bfloat16", *, name=None):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if rows <= 0 or vocab_size <= 0:
            raise ValueError(f"rows and vocab_size must be > 0, got {rows}, {vocab_size}")
        self._client = client
        self.rows, self.vocab_size, self.dtype = rows, vocab_size, dtype
        self._proto_dtype, numpy_dtype = _DTYPES[dtype]
        size = rows * vocab_size * np.dtype(numpy_dtype).itemsize
        self._shm = shared_memory.SharedMemory(
            name=name or f"tokensampler-{secrets.token_hex(8)}", create=True, size=size)
        self.key = "/" + self._shm.name  # /dev/shm/<name>
        self.array = np.ndarray((rows, vocab_size), dtype=numpy_dtype, buffer=self._shm.buf)
        try:
            self.region = client.register_shared_memory("logits", self.key, 0, size)
        except BaseException:
            self._release_memory()
            raise

    def message(self, rows=None):
        """The `Logits` message referring to the first `rows` rows (default: all)."""
        rows = self.rows if rows is None else rows
        if not 0 < rows <= self.rows:
            raise ValueError(f"rows must be in [1, {self.rows}], got {rows}")
        itemsize = self.array.itemsize
        return sampler_pb2.Logits(
            dtype=self._proto_dtype, rows=rows, vocab_size=self.vocab_size,
            shared_memory=sampler_pb2.SharedMemoryRef(
                region=self.region, offset=0, byte_size=rows * self.vocab_size * itemsize))

    def _release_memory(self):
        if self._shm is None:
            return
        self.array = None
        self._shm.close()
        self._shm.unlink()
        self._shm = None

    def close(self):
        if self._shm is None:
            return
        try:
            self._client.unregister_shared_memory(self.region)
        finally:
            self._release_memory()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def sparse_logits(token_ids, values, rest_logsumexp, vocab_size, dtype=None):
    """Returns a `Logits` message of sparse candidates: token_ids [rows, k] (integers), values
    [rows, k] (float32 / float16, or bfloat16 bits as uint16 with dtype="bfloat16"),
    rest_logsumexp [rows] (log Σ exp over the other tokens; -inf when none)."""
    ids = np.ascontiguousarray(np.asarray(token_ids), dtype="<i4")
    values = np.asarray(values)
    rest = np.asarray(rest_logsumexp, dtype=np.float32)
    if ids.ndim != 2 or values.shape != ids.shape or rest.shape != (ids.shape[0],):
        raise ValueError(f"token_ids {ids.shape} and values {values.shape} must be [rows, k] and "
                         f"rest_logsumexp {rest.shape} [rows]")
    if dtype is None:
        dtype = {"float32": "float32", "float16": "float16"}.get(values.dtype.name)
        if dtype is None:
            raise ValueError(f"values dtype {values.dtype}: give dtype= (bfloat16 bits as uint16)")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    proto_dtype, numpy_dtype = _DTYPES[dtype]
    values = np.ascontiguousarray(values, dtype=np.dtype(numpy_dtype).newbyteorder("<"))
    return sampler_pb2.Logits(
        dtype=proto_dtype, rows=ids.shape[0], vocab_size=int(vocab_size),
        sparse=sampler_pb2.SparseCandidates(
            k=ids.shape[1], token_ids=ids.tobytes(), values=values.tobytes(),
            rest_logsumexp=rest.tolist()))


def sparse_from_dense(logits, k):
    """Sparse candidates of a dense float32 / float16 [rows, vocab] array, on the CPU: per row the
    k largest logits and the log-sum-exp of the others (a worker does this on its GPU)."""
    x = np.asarray(logits)
    if x.ndim != 2 or x.dtype not in (np.float32, np.float16):
        raise ValueError(f"logits must be a 2-D float32 / float16 array, got {x.dtype} {x.shape}")
    if not 0 < k <= x.shape[1]:
        raise ValueError(f"k must be in [1, {x.shape[1]}], got {k}")
    ids = np.argpartition(-x.astype(np.float32), k - 1, axis=1)[:, :k]
    values = np.take_along_axis(x, ids, axis=1)
    rest = np.full(x.shape[0], -np.inf, dtype=np.float32)
    if k < x.shape[1]:
        masked = x.astype(np.float64)
        np.put_along_axis(masked, ids, -np.inf, axis=1)
        peak = masked.max(axis=1)
        finite = np.isfinite(peak)
        sums = np.exp(masked[finite] - peak[finite, None]).sum(axis=1)
        rest[finite] = (peak[finite] + np.log(sums)).astype(np.float32)
    return sparse_logits(ids, values, rest, x.shape[1])
