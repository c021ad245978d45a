"""tokensampler: Python client of the tokensampler sampling service.

    import tokensampler
    client = tokensampler.Client("unix:/run/tokensampler/ts.sock")
    result = client.sample(logits, {"temperature": 0.7, "top_p": 0.9})  # result.token_ids[row, 0]

    with client.session() as session:          # stateful: the server keeps the histories
        session.add([0, 1], {"temperature": 0.7, "seed": 1}, prompt_token_ids=[p0, p1])
        step = session.step(logits, [0, 1])     # step.token_ids[row], step.finished[row]

    # speculative decoding: k drafts per sequence, k + 1 target rows each
    results = client.verify(target_logits, [drafts0, drafts1], {"temperature": 0.7, "seed": 1},
                            draft_probs=[q0, q1], output_token_ids=[out0, out1])

The gRPC stubs (tokensampler.v1.sampler_pb2, sampler_pb2_grpc) are generated from proto/ by the
CMake target `tokensampler_python`, which assembles this package in <build>/python.
"""

try:
    from tokensampler.v1 import sampler_pb2
except ImportError as error:
    if not (error.name or "").startswith("tokensampler"):
        raise  # e.g. no protobuf runtime
    raise ImportError(  # the package's sources without the generated stubs (e.g. the source tree)
        "tokensampler: the generated gRPC stubs are missing; build the CMake target "
        "`tokensampler_python` and put <build>/python on PYTHONPATH (or pip install it)"
    ) from error

from tokensampler.client import (Client, SampleResult, VerifyResult, make_request,
                                 make_verify_request)
from tokensampler.errors import TokenSamplerError
from tokensampler.daemon import Daemon
from tokensampler.logits import encode_logits
from tokensampler.params import make_params
from tokensampler.session import BeamResult, Hypothesis, Session, StepResult
from tokensampler.transport import SharedMemoryLogits, sparse_from_dense, sparse_logits

SamplingParams = sampler_pb2.SamplingParams
FinishReason = sampler_pb2.FinishReason
LogprobsMode = sampler_pb2.LogprobsMode
SamplerStage = sampler_pb2.SamplerStage

__all__ = [
    "BeamResult", "Client", "Daemon", "FinishReason", "Hypothesis", "LogprobsMode",
    "SampleResult", "SamplerStage", "SamplingParams", "Session", "SharedMemoryLogits",
    "StepResult", "TokenSamplerError", "VerifyResult", "encode_logits", "make_params",
    "make_request", "make_verify_request", "sampler_pb2", "sparse_from_dense", "sparse_logits",
]
__version__ = "0.1.0"
