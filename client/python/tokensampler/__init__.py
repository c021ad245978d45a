"""tokensampler: Python client of the tokensampler sampling service.

    import tokensampler
    client = tokensampler.Client("unix:/run/tokensampler/ts.sock")
    result = client.sample(logits, {"temperature": 0.7, "top_p": 0.9})  # result.token_ids[row, 0]

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

from tokensampler.client import Client, SampleResult, TokenSamplerError, make_request
from tokensampler.daemon import Daemon
from tokensampler.logits import encode_logits
from tokensampler.params import make_params

SamplingParams = sampler_pb2.SamplingParams
FinishReason = sampler_pb2.FinishReason
LogprobsMode = sampler_pb2.LogprobsMode
SamplerStage = sampler_pb2.SamplerStage

__all__ = [
    "Client", "Daemon", "FinishReason", "LogprobsMode", "SampleResult", "SamplerStage",
    "SamplingParams", "TokenSamplerError", "encode_logits", "make_params", "make_request",
    "sampler_pb2",
]
__version__ = "0.1.0"
