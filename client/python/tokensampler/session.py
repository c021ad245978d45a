"""Session: the Sampler.Session stream for Python model workers.

The server keeps each sequence's parameters, prompt, output so far, mirostat μ and seeded RNG
position for as long as the stream lives, so a step sends only this step's logits and the ids of
the sequences they belong to:

    with client.session() as session:
        session.add([7, 9], {"temperature": 0.7, "seed": 1}, prompt_token_ids=[p7, p9])
        result = session.step(logits, [7, 9])       # logits: [2, vocab] numpy / torch
        result.token_ids, result.finished            # numpy arrays, one entry per row
        session.fork(7, [8]); session.release([9])

Beam search keeps the beams in the server; the worker sends one row per live beam and reorders
its KV cache by each new beam's parent:

        session.add_beam_search(3, {"eos_token_ids": [2], "max_tokens": 64}, beam_width=4,
                                prompt_token_ids=prompt)
        rows = 1                                        # the prompt row at the first step
        while True:
            result = session.step(logits_for_live_beams, [3])
            beam = result.beams[0]                      # BeamResult of sequence 3
            kv_cache = kv_cache[beam.parent_beams]      # reorder, then append beam.token_ids
            if beam.finished:
                best = beam.hypotheses[0]               # Hypothesis(token_ids, score, ...)
                break

Each call sends one request and waits for its answer. A request's own error (NOT_FOUND for an
unknown or finished id, ALREADY_EXISTS, INVALID_ARGUMENT, RESOURCE_EXHAUSTED over a session
limit) raises TokenSamplerError and the stream goes on. When the stream itself ends (the server's
idle timeout, its shutdown, a network failure) the call raises TokenSamplerError with the
stream's status and the session is closed: open a new one.

Thread-compatible: use a Session from one thread at a time.
"""

import dataclasses
import operator
import queue
from collections.abc import Mapping

import grpc
import numpy as np

from tokensampler.errors import TokenSamplerError
from tokensampler.logits import encode_logits
from tokensampler.transport import logits_message
from tokensampler.params import make_params
from tokensampler.v1 import sampler_pb2

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_END = object()  # ends the request iterator: the client half-closes the stream


def _ids(name, values):
    """One id or an iterable of ids → a list of non-negative ints (numpy integers accepted,
    floats refused rather than truncated)."""
    if isinstance(values, (int, np.integer)):
        values = [values]
    try:
        ids = [operator.index(v) for v in values]
    except TypeError as error:
        raise ValueError(f"{name}: sequence ids must be integers ({error})") from None
    if any(i < 0 for i in ids):
        raise ValueError(f"{name}: sequence ids are unsigned, got {ids}")
    return ids


_EARLY_STOPPING = {
    "true": sampler_pb2.EARLY_STOPPING_TRUE,
    "heuristic": sampler_pb2.EARLY_STOPPING_HEURISTIC,
    "never": sampler_pb2.EARLY_STOPPING_NEVER,
}


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """A finished hypothesis of a beam search."""

    token_ids: list       # the generated tokens, the final EOS / stop token included
    score: float          # sum_logprobs / length^length_penalty
    sum_logprobs: float
    finish_reason: int    # sampler_pb2.FinishReason value


@dataclasses.dataclass(frozen=True)
class BeamResult:
    """One step of a beam search: the live beams after it, in slot order (the rows of the next
    step), and, once the search is over, its hypotheses, best first."""

    parent_beams: np.ndarray  # uint32 [beams]: the input row (of this sequence) each continues
    token_ids: np.ndarray     # int32 [beams]: each beam's new token
    logprobs: np.ndarray      # float32 [beams]: that token's score
    scores: np.ndarray        # float64 [beams]: cumulative scores
    hypotheses: list          # [Hypothesis], empty until the search is over
    finish_reason: int        # set (the best hypothesis's) when the search is over

    @property
    def finished(self):
        return self.finish_reason != 0

    @classmethod
    def from_result(cls, r):
        n = len(r.beams)
        return cls(
            parent_beams=np.fromiter((b.parent_beam for b in r.beams), np.uint32, n),
            token_ids=np.fromiter((b.token_id for b in r.beams), np.int32, n),
            logprobs=np.fromiter((b.logprob for b in r.beams), np.float32, n),
            scores=np.fromiter((b.cumulative_score for b in r.beams), np.float64, n),
            hypotheses=[Hypothesis(list(h.token_ids), h.score, h.sum_logprobs, h.finish_reason)
                        for h in r.hypotheses],
            finish_reason=r.finish_reason)


def _is_beam(result):
    """Whether a SequenceResult is a beam search's."""
    return bool(result.beams or result.hypotheses)


@dataclasses.dataclass(frozen=True)
class StepResult:
    """The outcome of one `Session.step`, one entry per stepped sequence (in the order of the
    ids). For a beam search, `beams[i]` is its BeamResult (token_ids[i] and logprobs[i] are 0,
    emitted[i] is empty); for a plain sequence `beams[i]` is None.

    An entry whose finish reason is set ended its sequence; the server has released it.
    """

    sequence_ids: np.ndarray    # uint64 [rows]
    token_ids: np.ndarray       # int32 [rows]
    logprobs: np.ndarray        # float32 [rows], in each sequence's logprobs_mode
    finish_reasons: np.ndarray  # int32 [rows], sampler_pb2.FinishReason values (0 = going on)
    top_logprobs: list          # [row] → {token_id: logprob}, by descending value
    response: sampler_pb2.SessionResponse
    # Every token each plain sequence emitted this step: [token_id] without drafts; with drafts
    # the accepted drafts then the recovered / bonus token (token_ids[i] is the last of them).
    # The server has appended all of them. Empty for a beam search.
    emitted: list = dataclasses.field(default_factory=list)  # [row] → int32 array
    num_accepted: np.ndarray = None                          # int32 [rows]; 0 without drafts
    beams: list = dataclasses.field(default_factory=list)    # [row] → BeamResult or None

    @property
    def finished(self):
        """bool [rows]: the sequences this step ended."""
        return self.finish_reasons != 0

    @classmethod
    def from_response(cls, response):
        results = response.results
        return cls(
            sequence_ids=np.fromiter((r.sequence_id for r in results), np.uint64, len(results)),
            token_ids=np.fromiter((r.token_id for r in results), np.int32, len(results)),
            logprobs=np.fromiter((r.logprob for r in results), np.float32, len(results)),
            finish_reasons=np.fromiter((r.finish_reason for r in results), np.int32,
                                       len(results)),
            top_logprobs=[{t.token_id: t.logprob for t in r.top_logprobs} for r in results],
            response=response,
            emitted=[np.array(r.verify.token_ids if r.HasField("verify")
                              else [] if _is_beam(r) else [r.token_id], np.int32)
                     for r in results],
            num_accepted=np.fromiter((r.verify.num_accepted for r in results), np.int32,
                                     len(results)),
            beams=[BeamResult.from_result(r) if _is_beam(r) else None for r in results])


class Session:
    """One Session stream on `stub` (see `Client.session`). `timeout` (seconds, None = none) is
    the deadline of the whole stream; `metadata` goes with the stream's headers (the client's
    bearer token)."""

    def __init__(self, stub, timeout=None, metadata=None):
        self._requests = queue.Queue()
        self._next_id = 1
        self._closed = False
        self._responses = stub.Session(iter(self._requests.get, _END), timeout=timeout,
                                       metadata=metadata)

    # --- the four operations ---

    def add(self, sequence_ids, params=None, *, prompt_token_ids=None):
        """Starts sequences. `sequence_ids`: one id or a list. `params`: one dict /
        SamplingParams for all, or one per id (keys are SamplingParams field names; `n` must stay
        unset: fork instead). `prompt_token_ids`: None, or one token-id sequence per id."""
        ids = _ids("sequence_ids", sequence_ids)
        if params is None or isinstance(params, (Mapping, sampler_pb2.SamplingParams)):
            params = [make_params(params)] * len(ids)
        else:
            params = [make_params(p) for p in params]
        prompts = [None] * len(ids) if prompt_token_ids is None else list(prompt_token_ids)
        if len(params) != len(ids) or len(prompts) != len(ids):
            raise ValueError(f"{len(ids)} sequence ids but {len(params)} params and "
                             f"{len(prompts)} prompts")
        request = sampler_pb2.SessionRequest()
        for sequence_id, p, prompt in zip(ids, params, prompts):
            add = request.add.add(sequence_id=sequence_id)
            add.params.CopyFrom(p)
            if prompt is not None:
                add.prompt_token_ids.extend(int(t) for t in np.asarray(prompt).ravel())
        self.send(request)

    def add_beam_search(self, sequence_id, params=None, *, beam_width, length_penalty=None,
                        early_stopping=None, num_return_sequences=None, num_beam_groups=None,
                        diversity_penalty=None, do_sample=False, prompt_token_ids=None):
        """Starts a beam search (BeamSearchParams in the proto; HF semantics). `early_stopping`:
        None (= "heuristic"), "true", "heuristic", "never" or a sampler_pb2.EarlyStopping value.
        Each step then takes one logits row per live beam (1 at the first step)."""
        beam = sampler_pb2.BeamSearchParams(beam_width=operator.index(beam_width),
                                            do_sample=bool(do_sample))
        if length_penalty is not None:
            beam.length_penalty = float(length_penalty)
        if early_stopping is not None:
            if isinstance(early_stopping, str):
                if early_stopping.lower() not in _EARLY_STOPPING:
                    raise ValueError(f"early_stopping must be one of {sorted(_EARLY_STOPPING)}, "
                                     f"got {early_stopping!r}")
                early_stopping = _EARLY_STOPPING[early_stopping.lower()]
            beam.early_stopping = early_stopping
        if num_return_sequences is not None:
            beam.num_return_sequences = operator.index(num_return_sequences)
        if num_beam_groups is not None:
            beam.num_beam_groups = operator.index(num_beam_groups)
        if diversity_penalty is not None:
            beam.diversity_penalty = float(diversity_penalty)
        request = sampler_pb2.SessionRequest()
        add = request.add.add(sequence_id=_ids("sequence_id", sequence_id)[0])
        add.params.CopyFrom(make_params(params))
        add.beam.CopyFrom(beam)
        if prompt_token_ids is not None:
            add.prompt_token_ids.extend(int(t) for t in np.asarray(prompt_token_ids).ravel())
        self.send(request)

    def step(self, logits, sequence_ids, *, dtype=None, drafts=None, draft_probs=None,
             draft_parents=None, draft_dtype=None):
        """One step for each of `sequence_ids`. The rows of `logits` ([rows, vocab] numpy array
        or torch tensor, sent as raw bytes as in Client.sample, or a SharedMemoryLogits) are
        consumed in the order of the ids: one per plain sequence, one per live beam of a beam
        search. Returns a StepResult (one entry per id).

        Speculative decoding: `drafts` maps sequence ids of plain sequences to their draft token
        ids (k ≥ 1); such a sequence takes k + 1 consecutive logits rows (the current position,
        then one after each draft) instead of one, and is verified as by Client.verify
        (StepResult.emitted has every token it emitted). `draft_probs` / `draft_parents` map the
        same ids to the [k, vocab] draft probabilities (absent = point masses) and the tree's
        parent indices."""
        request = sampler_pb2.SessionRequest()
        request.step.logits.CopyFrom(logits_message(logits, dtype))
        request.step.sequence_ids.extend(_ids("sequence_ids", sequence_ids))
        for sequence_id, tokens in (drafts or {}).items():
            entry = request.step.drafts.add(sequence_id=int(sequence_id))
            entry.draft_token_ids.extend(operator.index(t) for t in tokens)
            if draft_probs and sequence_id in draft_probs:
                entry.draft_probs.CopyFrom(encode_logits(draft_probs[sequence_id], draft_dtype))
            if draft_parents and sequence_id in draft_parents:
                entry.draft_parents.extend(int(p) for p in draft_parents[sequence_id])
        return StepResult.from_response(self.send(request))

    def fork(self, parent_id, child_ids):
        """Copies sequence `parent_id` into new sequences `child_ids`; each child draws from its
        own random stream (forking into k children = Sample with n = k + 1)."""
        request = sampler_pb2.SessionRequest()
        request.fork.add(parent_id=int(parent_id), child_ids=_ids("child_ids", child_ids))
        self.send(request)

    def release(self, sequence_ids):
        """Drops sequences (finished ones are released by the server already)."""
        request = sampler_pb2.SessionRequest(release=_ids("sequence_ids", sequence_ids))
        self.send(request)

    def send(self, request):
        """Sends any SessionRequest (release, add, fork and step together are applied in that
        order) and returns its SessionResponse. Sets `request.request_id`."""
        if self._closed:
            raise TokenSamplerError(grpc.StatusCode.FAILED_PRECONDITION, "the session is closed")
        request.request_id = self._next_id
        self._next_id += 1
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as error:
            self._end()
            raise TokenSamplerError(error.code(), error.details()) from None
        except StopIteration:
            self._end()
            raise TokenSamplerError(grpc.StatusCode.INTERNAL,
                                    "the server ended the session without answering") from None
        if response.request_id != request.request_id:
            raise TokenSamplerError(grpc.StatusCode.INTERNAL,
                                    f"answer to request {response.request_id}, expected "
                                    f"{request.request_id}")
        if response.error.code:
            raise TokenSamplerError(_CODES.get(response.error.code, grpc.StatusCode.UNKNOWN),
                                    response.error.message)
        return response

    # --- lifetime ---

    def close(self):
        """Half-closes the stream and waits for the server to end it (its sequences are
        released). Raises TokenSamplerError when it ended with an error before."""
        if self._closed:
            return
        self._end()
        try:
            for extra in self._responses:
                raise TokenSamplerError(grpc.StatusCode.INTERNAL,
                                        f"unexpected answer {extra.request_id} after close")
        except grpc.RpcError as error:
            raise TokenSamplerError(error.code(), error.details()) from None

    def cancel(self):
        """Cancels the stream at once (the server drops its sequences)."""
        self._responses.cancel()
        self._end()

    def _end(self):
        """No more requests: ends the request iterator gRPC consumes (once)."""
        if not self._closed:
            self._closed = True
            self._requests.put(_END)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc_info):
        if exc_type is None:
            self.close()
        else:
            self.cancel()
