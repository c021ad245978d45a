"""Logits arrays → the `Logits` message, without per-element conversion.

A 2-D numpy array (float32, float16, or bfloat16 bits in a 16-bit integer array with
dtype="bfloat16") or a torch tensor (float32, float16, bfloat16) becomes one `bytes` copy of its
little-endian contents. torch is imported only when a tensor is passed.
"""

import sys

import numpy as np

from tokensampler.v1 import sampler_pb2

_DTYPES = {
    "float32": sampler_pb2.DTYPE_FLOAT32,
    "float16": sampler_pb2.DTYPE_FLOAT16,
    "bfloat16": sampler_pb2.DTYPE_BFLOAT16,
}


def _is_torch_tensor(value):
    torch = sys.modules.get("torch")  # a tensor exists only if torch is already imported
    return torch is not None and isinstance(value, torch.Tensor)


def _torch_to_numpy(tensor):
    """Returns (numpy array of the tensor's bits, dtype name). Copies only off-CPU or
    non-contiguous tensors."""
    import torch  # noqa: PLC0415 (optional dependency)

    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    if tensor.dtype not in names:
        raise ValueError(f"logits: torch dtype {tensor.dtype} is not float32, float16 or bfloat16")
    name = names[tensor.dtype]
    tensor = tensor.detach().cpu().contiguous()
    if name == "bfloat16":  # numpy has no bfloat16: ship the raw 16-bit patterns
        tensor = tensor.view(torch.int16)
    return tensor.numpy(), name


def encode_logits(logits, dtype=None):
    """Returns a `sampler_pb2.Logits` holding `logits`, a [rows, vocab_size] array or tensor.

    `dtype` (None, "float32", "float16" or "bfloat16") says what the elements are. None infers it
    from the array; "bfloat16" with a numpy array REQUIRES 16-bit integer (or ml_dtypes bfloat16)
    elements holding the bfloat16 bit patterns, e.g. `(f32.view(np.uint32) >> 16).astype(
    np.uint16)` (truncation; round to nearest in the model when it matters).
    Raises ValueError for another shape or dtype (float64 is not converted: pass
    `x.astype(np.float32)`), TypeError for something that is not an array.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if _is_torch_tensor(logits):
        array, inferred = _torch_to_numpy(logits)
    elif isinstance(logits, np.ndarray):
        array = logits
        if array.dtype.name in ("float32", "float16", "bfloat16"):
            inferred = array.dtype.name
        elif array.dtype.kind in "iu" and array.dtype.itemsize == 2 and dtype == "bfloat16":
            inferred = "bfloat16"
        else:
            raise ValueError(
                f"logits: numpy dtype {array.dtype} is not float32 or float16 (bfloat16 bit "
                "patterns need a 16-bit integer array and dtype='bfloat16')")
    else:
        raise TypeError(f"logits must be a numpy array or a torch tensor, got {type(logits)!r}")
    if dtype is not None and dtype != inferred:
        raise ValueError(f"logits hold {inferred} elements but dtype={dtype!r} was given")
    if array.ndim != 2:
        raise ValueError(f"logits must be 2-D [rows, vocab_size], got shape {array.shape}")
    if array.dtype.byteorder == ">":
        array = array.byteswap().view(array.dtype.newbyteorder("<"))
    array = np.ascontiguousarray(array)
    return sampler_pb2.Logits(
        dtype=_DTYPES[inferred], rows=array.shape[0], vocab_size=array.shape[1],
        data=array.tobytes())
