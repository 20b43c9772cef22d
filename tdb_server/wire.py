"""torch <-> protocol conversions: Tensor messages (raw little-endian bytes) and tensor summaries.

Part of the protobuf edge: serde.py and the servicers use it; the engine never does."""

from __future__ import annotations

import math

import torch

from tdb.v1 import common_pb2

from .engine import summary
from .engine.types import TensorSummary
from .errors import InvalidArgument
from .model.fingerprint import tensor_view  # a byte view of a tensor on the host (no copy when it can)

_TORCH_TO_WIRE = {
    torch.float32: common_pb2.F32, torch.float16: common_pb2.F16, torch.bfloat16: common_pb2.BF16,
    torch.float64: common_pb2.F64, torch.int64: common_pb2.I64, torch.int32: common_pb2.I32,
    torch.int16: common_pb2.I16, torch.int8: common_pb2.I8, torch.uint8: common_pb2.U8,
    torch.bool: common_pb2.BOOL,
}
_WIRE_TO_TORCH = {v: k for k, v in _TORCH_TO_WIRE.items()}


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return _TORCH_TO_WIRE[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} cannot be sent on the wire", reason="UNSUPPORTED_DTYPE") from None


def torch_dtype(wire: int) -> torch.dtype:
    try:
        return _WIRE_TO_TORCH[wire]
    except KeyError:
        raise InvalidArgument(f"unknown wire dtype {wire}", reason="UNSUPPORTED_DTYPE") from None


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian, C-order bytes of `t` (moved to the host)."""
    return tensor_view(t).tobytes()


def to_wire(t: torch.Tensor) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=wire_dtype(t.dtype), shape=list(t.shape), data=tensor_bytes(t))


MAX_DIMS = 16


def from_wire(msg: common_pb2.Tensor) -> torch.Tensor:
    dtype = torch_dtype(msg.dtype)
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape) or len(shape) > MAX_DIMS:
        raise InvalidArgument(f"tensor shape {list(shape)[:MAX_DIMS + 1]}: sizes must be >= 0, at most {MAX_DIMS} "
                              "dimensions", reason="BAD_TENSOR")
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise InvalidArgument(
            f"tensor data has {len(msg.data)} bytes but shape {list(shape)} of {dtype} needs {numel * itemsize}",
            reason="BAD_TENSOR")
    buf = bytearray(msg.data)  # writable copy so torch owns its memory
    if dtype == torch.bfloat16:
        return torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def summary_to_proto(s: TensorSummary) -> common_pb2.TensorSummary:
    return common_pb2.TensorSummary(dtype=wire_dtype(s.dtype), shape=list(s.shape), numel=s.numel, dims=s.dims,
                                    min=s.min, max=s.max, mean=s.mean, std=s.std, norm=s.norm,
                                    nan_count=s.nan_count, inf_count=s.inf_count)


def summarize(t: torch.Tensor, dims: list[str] | None = None) -> common_pb2.TensorSummary:
    """Statistics of a tensor computed on its device (engine/summary.py), as a message."""
    return summary_to_proto(summary.summarize(t, dims))
