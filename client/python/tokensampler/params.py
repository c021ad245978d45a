"""Keyword dicts → `SamplingParams`, by the proto's field names.

    make_params({"temperature": 0.7, "top_p": 0.9, "logit_bias": {5: -100},
                 "stop_token_sequences": [[13, 13]], "sampler_order": ["top_k", "temperature"],
                 "logprobs": 5, "logprobs_mode": "processed_logprobs"})

Values are checked for type only; ranges are the server's job (its INVALID_ARGUMENT names the
field and value). A value of None leaves the field unset (= the default).
"""

import operator
from collections.abc import Mapping

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from tokensampler.v1 import sampler_pb2

_FIELDS = sampler_pb2.SamplingParams.DESCRIPTOR.fields_by_name
_FLOATS = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)
_INTS = (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64,
         FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64)


def _ints(values):
    # operator.index accepts Python and numpy integers and rejects floats (no silent truncation).
    return [operator.index(v) for v in values]


def _enum_value(field, value):
    """An enum value from its number or (case-insensitive) name; a unique suffix suffices:
    "top_p" → SAMPLER_STAGE_TOP_P."""
    if not isinstance(value, str):
        return operator.index(value)
    name = value.upper()
    names = field.enum_type.values_by_name
    if name in names:
        return names[name].number
    matches = [n for n in names if n.endswith("_" + name)]
    if len(matches) != 1:
        raise ValueError(f"{value!r} is not one of {list(names)}")
    return names[matches[0]].number


def _scalar(field, value):
    cpp = field.cpp_type
    if cpp in _FLOATS:
        return float(value)
    if cpp in _INTS:
        return operator.index(value)
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return _enum_value(field, value)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"expected a bool, got {type(value).__name__}")
        return bool(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return memoryview(value).tobytes()  # bytes, bytearray or a contiguous numpy array
    if not isinstance(value, str):
        raise TypeError(f"expected a str, got {type(value).__name__}")
    return value


def _set(params, field, value):
    target = getattr(params, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():  # logit_bias: {token_id: bias}
            target[operator.index(key)] = _scalar(value_field, item)
    elif field.label != FieldDescriptor.LABEL_REPEATED:
        setattr(params, field.name, _scalar(field, value))
    elif field.message_type is not None:  # TokenSequence lists: [[1, 2], [3]]
        for sequence in value:
            if isinstance(sequence, sampler_pb2.TokenSequence):
                target.add().CopyFrom(sequence)
            else:
                target.add().token_ids.extend(_ints(sequence))
    else:
        target.extend(_scalar(field, v) for v in value)


def make_params(spec=None):
    """Returns a `sampler_pb2.SamplingParams` from `spec`: None (all defaults), a SamplingParams
    (returned as is) or a mapping from proto field names to values. Raises ValueError naming the
    key for an unknown field or a value of the wrong type."""
    if spec is None:
        return sampler_pb2.SamplingParams()
    if isinstance(spec, sampler_pb2.SamplingParams):
        return spec
    if not isinstance(spec, Mapping):
        raise TypeError(f"sampling params must be a dict or SamplingParams, got {type(spec)!r}")
    params = sampler_pb2.SamplingParams()
    for key, value in spec.items():
        field = _FIELDS.get(key)
        if field is None:
            raise ValueError(f"unknown SamplingParams field {key!r}")
        if value is None:
            continue
        try:
            _set(params, field, value)
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"SamplingParams.{key}: {error}") from None
    return params
