"""Client: the tokensampler.v1.Sampler service for Python model workers (stateless `sample`
and `verify` for speculative decoding; `session()` opens the stateful Session stream, see tokensampler/session.py).

One Client owns one gRPC channel (TCP "host:port", plaintext or TLS / mutual TLS, or
"unix:/path") and can send a bearer token with every call. It connects lazily and reconnects by
itself; creating it does no I/O. Thread-safe, like the grpc.Channel under it.
"""

import dataclasses
import math
import operator
from collections.abc import Mapping

import grpc
import numpy as np

from tokensampler._health import health_check_pb2
from tokensampler.errors import TokenSamplerError
from tokensampler.logits import encode_logits
from tokensampler.params import make_params
from tokensampler.session import Session
from tokensampler.transport import SharedMemoryLogits, logits_message
from tokensampler.v1 import sampler_pb2, sampler_pb2_grpc

_CLIENT_DEFAULT = object()  # per-call timeout: use the Client's


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """The outcome of one `Client.sample` call, indexed [row, sample].

    Rows with fewer samples than the largest `n` are padded: token id -1, logprob NaN,
    finish reason 0. `logprobs` is 0 for rows that did not ask for logprobs.
    """

    token_ids: np.ndarray       # int32 [rows, max n]
    logprobs: np.ndarray        # float32 [rows, max n], in each row's logprobs_mode
    finish_reasons: np.ndarray  # int32 [rows, max n], sampler_pb2.FinishReason values
    top_logprobs: list          # [row][sample] → {token_id: logprob}, by descending value
    mirostat_mu: np.ndarray     # float32 [rows, max n], the updated μ; NaN for non-mirostat rows
    response: sampler_pb2.SampleResponse

    @classmethod
    def from_response(cls, response, rows):
        width = max((r.sample_index + 1 for r in response.results), default=0)
        token_ids = np.full((rows, width), -1, np.int32)
        logprobs = np.full((rows, width), np.nan, np.float32)
        finish_reasons = np.zeros((rows, width), np.int32)
        mirostat_mu = np.full((rows, width), np.nan, np.float32)
        top_logprobs = [[] for _ in range(rows)]
        for r in response.results:  # row-major, samples in order
            row, sample = r.row_index, r.sample_index
            token_ids[row, sample] = r.token_id
            logprobs[row, sample] = r.logprob
            finish_reasons[row, sample] = r.finish_reason
            if r.HasField("mirostat_mu"):
                mirostat_mu[row, sample] = r.mirostat_mu
            top_logprobs[row].append({t.token_id: t.logprob for t in r.top_logprobs})
        return cls(token_ids, logprobs, finish_reasons, top_logprobs, mirostat_mu, response)


def _rows(name, values, rows):
    """`values` (one entry per logits row) as a list; ValueError when the count differs."""
    values = list(values)
    if len(values) != rows:
        raise ValueError(f"{name} has {len(values)} entries for {rows} logits rows")
    return values


def _token_ids(name, values):
    """Token ids as a list of ints: integer numpy arrays in bulk, anything else one by one
    (operator.index refuses floats rather than truncating them)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return values.tolist()
    try:
        return [operator.index(v) for v in values]
    except TypeError as error:
        raise ValueError(f"{name}: token ids must be integers ({error})") from None


def make_request(logits, params=None, *, dtype=None, prompt_token_ids=None,
                 output_token_ids=None, mirostat_mu=None):
    """Returns the `SampleRequest` that `Client.sample` sends; see there for the arguments."""
    request = sampler_pb2.SampleRequest(logits=logits_message(logits, dtype))
    rows = request.logits.rows
    if params is None or isinstance(params, (Mapping, sampler_pb2.SamplingParams)):
        params = [make_params(params)] * rows  # one conversion, copied into every row
    else:
        params = [make_params(p) for p in _rows("params", params, rows)]
    prompts = [None] * rows if prompt_token_ids is None else _rows(
        "prompt_token_ids", prompt_token_ids, rows)
    outputs = [None] * rows if output_token_ids is None else _rows(
        "output_token_ids", output_token_ids, rows)
    if mirostat_mu is None or isinstance(mirostat_mu, (int, float, np.number)):
        mus = [mirostat_mu] * rows
    else:
        mus = _rows("mirostat_mu", mirostat_mu, rows)
    for i, (p, prompt, output, mu) in enumerate(zip(params, prompts, outputs, mus)):
        row = request.rows.add()
        row.params.CopyFrom(p)
        if prompt is not None:
            row.prompt_token_ids.extend(_token_ids(f"prompt_token_ids[{i}]", prompt))
        if output is not None:
            row.output_token_ids.extend(_token_ids(f"output_token_ids[{i}]", output))
        if mu is not None:
            row.mirostat_mu = float(mu)
    return request


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """The outcome of verifying one sequence's drafts (`Client.verify`).

    `token_ids` are the accepted drafts followed by one recovered or bonus token (fewer when an
    accepted draft finished the sequence); append them all to the sequence. `logprobs` (empty
    unless params asked for logprobs) and `top_logprobs` are per token, in the row's
    logprobs_mode at each token's own position. `accepted_draft_indices` are the accepted draft
    (tree node) indices, root first: the KV-cache entries to keep.
    """

    num_accepted: int
    token_ids: np.ndarray               # int32 [num_accepted + 1] (or fewer after a finish)
    logprobs: np.ndarray                # float32 [len(token_ids)] or [0]
    top_logprobs: list                  # per token: {token_id: logprob}
    finish_reason: int                  # sampler_pb2.FinishReason of the last token
    accepted_draft_indices: np.ndarray  # int32 [num_accepted]
    mirostat_mu: float                  # μ after the last token; NaN for non-mirostat rows

    @classmethod
    def from_proto(cls, r):
        return cls(
            num_accepted=r.num_accepted,
            token_ids=np.array(r.token_ids, np.int32),
            logprobs=np.array(r.logprobs, np.float32),
            top_logprobs=[{t.token_id: t.logprob for t in top.top_logprobs}
                          for top in r.top_logprobs],
            finish_reason=r.finish_reason,
            accepted_draft_indices=np.array(r.accepted_draft_indices, np.int32),
            mirostat_mu=r.mirostat_mu if r.HasField("mirostat_mu") else math.nan)


def make_verify_request(logits, draft_token_ids, params=None, *, draft_probs=None,
                        draft_parents=None, dtype=None, draft_dtype=None, prompt_token_ids=None,
                        output_token_ids=None, mirostat_mu=None):
    """Returns the `VerifyRequest` that `Client.verify` sends; see there for the arguments."""
    drafts = [_token_ids(f"draft_token_ids[{i}]", d) for i, d in enumerate(draft_token_ids)]
    rows = len(drafts)
    request = sampler_pb2.VerifyRequest(logits=logits_message(logits, dtype))
    needed = sum(len(d) + 1 for d in drafts)
    if request.logits.rows != needed:
        raise ValueError(f"logits has {request.logits.rows} rows but the drafts need {needed} "
                         "(len(draft_token_ids[i]) + 1 per sequence)")
    if params is None or isinstance(params, (Mapping, sampler_pb2.SamplingParams)):
        params = [make_params(params)] * rows
    else:
        params = [make_params(p) for p in _rows("params", params, rows)]

    def per_row(name, values):
        return [None] * rows if values is None else _rows(name, values, rows)

    probs = per_row("draft_probs", draft_probs)
    parents = per_row("draft_parents", draft_parents)
    prompts = per_row("prompt_token_ids", prompt_token_ids)
    outputs = per_row("output_token_ids", output_token_ids)
    if mirostat_mu is None or isinstance(mirostat_mu, (int, float, np.number)):
        mus = [mirostat_mu] * rows
    else:
        mus = _rows("mirostat_mu", mirostat_mu, rows)
    for i in range(rows):
        row = request.rows.add()
        row.params.CopyFrom(params[i])
        row.draft_token_ids.extend(drafts[i])
        if probs[i] is not None:
            row.draft_probs.CopyFrom(encode_logits(probs[i], draft_dtype))
        if parents[i] is not None:
            row.draft_parents.extend(_token_ids(f"draft_parents[{i}]", parents[i]))
        if prompts[i] is not None:
            row.prompt_token_ids.extend(_token_ids(f"prompt_token_ids[{i}]", prompts[i]))
        if outputs[i] is not None:
            row.output_token_ids.extend(_token_ids(f"output_token_ids[{i}]", outputs[i]))
        if mus[i] is not None:
            row.mirostat_mu = float(mus[i])
    return request


class Client:
    """A client for `target`: "host:port" ("127.0.0.1:50051") or "unix:/path/to.sock".

    `timeout` (seconds, None = no deadline) bounds each call unless the call gives its own.
    `max_message_bytes` caps what the client sends and receives; the server has its own
    --max_message_bytes (default 256 MiB). HTTP proxies from the environment are ignored.

    Security, for a server started with --tls_cert / --tls_client_ca / --auth_token_file:
    `tls=True` connects with TLS, verifying the server against `root_certificates` (PEM bytes;
    None = the system's roots); `certificate_chain` and `private_key` (PEM bytes) are the client's
    certificate for mutual TLS. Giving any of the three implies `tls=True`. `token` is sent with
    every call as "authorization: Bearer <token>".
    """

    def __init__(self, target, *, timeout=30.0, max_message_bytes=256 << 20, tls=False,
                 root_certificates=None, certificate_chain=None, private_key=None, token=None):
        if not target:
            raise ValueError("target must be host:port or unix:/path")
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("certificate_chain and private_key must be given together")
        if token is not None and (not token or not token.isascii() or not token.isprintable()):
            raise ValueError("token must be a non-empty printable ASCII string")
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_http_proxy", 0),
            # Large requests: large fixed HTTP/2 windows and frames (docs/performance.md).
            ("grpc.http2.lookahead_bytes", 64 << 20),
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.max_frame_size", (1 << 24) - 1),
            ("grpc.http2.write_buffer_size", 64 << 20),
        ]
        if tls or root_certificates is not None or certificate_chain is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates, private_key=private_key,
                certificate_chain=certificate_chain)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = sampler_pb2_grpc.SamplerStub(self._channel)
        self._health_check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_check_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_check_pb2.HealthCheckResponse.FromString)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _call(self, method, request, timeout, **kwargs):
        timeout = self.timeout if timeout is _CLIENT_DEFAULT else timeout
        try:
            return method(request, timeout=timeout, metadata=self._metadata, **kwargs)
        except grpc.RpcError as error:
            raise TokenSamplerError(error.code(), error.details()) from None

    def sample(self, logits, params=None, *, dtype=None, prompt_token_ids=None,
               output_token_ids=None, mirostat_mu=None, timeout=_CLIENT_DEFAULT):
        """Samples one step for every row of `logits` (Sampler.Sample) and returns a SampleResult.

        logits: [rows, vocab_size] numpy array (float32, float16; bfloat16 bit patterns as
            int16/uint16 with dtype="bfloat16") or torch tensor (float32, float16, bfloat16),
            sent as raw bytes; or a SharedMemoryLogits (sent as a reference, no copy); or a
            ready `Logits` message (e.g. sparse_logits / sparse_from_dense).
        params: one dict / SamplingParams for every row, or a sequence of them, one per row.
            Dict keys are the proto's SamplingParams field names.
        prompt_token_ids, output_token_ids: None, or one token-id sequence per row (the history;
            the length of output_token_ids is the seeded RNG's step).
        mirostat_mu: None, one μ for every row, or one per row (None = unset, i.e. 2·tau).

        Raises ValueError / TypeError for arguments that cannot be encoded (an unknown params key,
        a float64 array), TokenSamplerError with the server's code and message otherwise:
        INVALID_ARGUMENT names the row, field and value; RESOURCE_EXHAUSTED over a message-size
        limit; UNAVAILABLE when the server is unreachable or shutting down; DEADLINE_EXCEEDED.
        """
        request = make_request(logits, params, dtype=dtype, prompt_token_ids=prompt_token_ids,
                               output_token_ids=output_token_ids, mirostat_mu=mirostat_mu)
        response = self._call(self._stub.Sample, request, timeout)
        return SampleResult.from_response(response, request.logits.rows)

    def verify(self, logits, draft_token_ids, params=None, *, draft_probs=None,
               draft_parents=None, dtype=None, draft_dtype=None, prompt_token_ids=None,
               output_token_ids=None, mirostat_mu=None, timeout=_CLIENT_DEFAULT):
        """Speculative decoding (Sampler.Verify): keeps the drafts the target model would have
        sampled, exactly, and returns one VerifyResult per sequence.

        draft_token_ids: one token-id sequence per sequence (k_i ≥ 0 drafts; a tree's nodes).
        logits: the target logits, [Σ (k_i + 1), vocab_size], sequence by sequence: the row
            after the current history, then one row after each draft (after its path in a tree);
            as for `sample`, an array, a SharedMemoryLogits (a reference, no copy) or a `Logits`
            message (not sparse: Verify refuses sparse candidates).
        params, prompt_token_ids, output_token_ids, mirostat_mu: as for `sample`, per sequence.
        draft_probs: None (point masses: n-gram or greedy drafters), or one entry per sequence:
            None or the [k_i, vocab_size] probabilities each draft was drawn from (`draft_dtype`
            as `dtype` for logits; rows must sum to 1 within 1e-3, 1e-2 for 16-bit).
        draft_parents: None (chains), or one entry per sequence: None or a parent index per
            draft (-1 = a child of the current position; parents before children).

        Raises ValueError when the logits rows do not match the drafts (and as `sample`),
        TokenSamplerError with the server's code and message otherwise (INVALID_ARGUMENT names
        the row, field and value, e.g. `rows[0].draft_parents[1] = 3 is a forward reference`).
        """
        request = make_verify_request(
            logits, draft_token_ids, params, draft_probs=draft_probs, draft_parents=draft_parents,
            dtype=dtype, draft_dtype=draft_dtype, prompt_token_ids=prompt_token_ids,
            output_token_ids=output_token_ids, mirostat_mu=mirostat_mu)
        response = self._call(self._stub.Verify, request, timeout)
        return [VerifyResult.from_proto(r) for r in response.results]

    def register_shared_memory(self, name, key, offset, byte_size, *, timeout=_CLIENT_DEFAULT):
        """Maps [offset, offset + byte_size) of the shared-memory object `key` ("/name" or a path
        under /dev/shm) in the server; returns the region's handle (for SharedMemoryRef.region).
        Raises TokenSamplerError: FAILED_PRECONDITION when the server does not serve shared
        memory on this connection (by default: Unix sockets only), NOT_FOUND, OUT_OF_RANGE, ..."""
        request = sampler_pb2.RegisterSharedMemoryRequest(
            name=name, key=key, offset=offset, byte_size=byte_size)
        return self._call(self._stub.RegisterSharedMemory, request, timeout).region

    def unregister_shared_memory(self, region, *, timeout=_CLIENT_DEFAULT):
        """Unmaps the region `region` (a handle) in the server."""
        request = sampler_pb2.UnregisterSharedMemoryRequest(region=region)
        self._call(self._stub.UnregisterSharedMemory, request, timeout)

    def list_shared_memory(self, regions=(), *, timeout=_CLIENT_DEFAULT):
        """The regions of this client's token (or those named by handle in `regions`), as
        SharedMemoryRegionStatus messages."""
        request = sampler_pb2.ListSharedMemoryRequest(regions=list(regions))
        return list(self._call(self._stub.ListSharedMemory, request, timeout).regions)

    def shared_memory_logits(self, rows, vocab_size, dtype="bfloat16", *, name=None):
        """Creates a [rows, vocab_size] logits buffer in POSIX shared memory and registers it:
        a SharedMemoryLogits to fill (`.array`) and pass to `sample`. Close it when done."""
        return SharedMemoryLogits(self, rows, vocab_size, dtype, name=name)

    def session(self, *, timeout=None):
        """Opens a Session stream (tokensampler.Session): the server keeps each sequence's state,
        a step sends only its logits and sequence ids. `timeout` (seconds) is a deadline for the
        whole stream; None (the default) sets none. Use it as a context manager:
        `with client.session() as session: ...` (closed on exit, cancelled on an exception)."""
        return Session(self._stub, timeout=timeout, metadata=self._metadata)

    def health(self, service="", *, wait_for_ready=False, timeout=_CLIENT_DEFAULT):
        """Asks grpc.health.v1 Health.Check about `service` ("" = the whole server, or
        "tokensampler.v1.Sampler"). Returns True when SERVING, False otherwise (NOT_SERVING while
        draining). With wait_for_ready the call waits for the server to come up until `timeout`
        instead of failing at once. Raises TokenSamplerError: NOT_FOUND for an unknown service,
        UNAVAILABLE, DEADLINE_EXCEEDED, ..."""
        request = health_check_pb2.HealthCheckRequest(service=service)
        response = self._call(self._health_check, request, timeout, wait_for_ready=wait_for_ready)
        return response.status == health_check_pb2.HealthCheckResponse.SERVING
