"""torch <-> protocol conversions: Tensor messages (raw little-endian bytes) and summaries."""

from __future__ import annotations

import math

import torch

from tdb.v1 import common_pb2

from .errors import InvalidArgument

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


def tensor_view(t: torch.Tensor) -> memoryview:
    """A byte view of `t` on the host, without copying when it is already a contiguous CPU tensor."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.numpy()).cast("B")


def to_wire(t: torch.Tensor) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=wire_dtype(t.dtype), shape=list(t.shape), data=tensor_bytes(t))


def from_wire(msg: common_pb2.Tensor) -> torch.Tensor:
    dtype = torch_dtype(msg.dtype)
    shape = tuple(int(s) for s in msg.shape)
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


def summarize(t: torch.Tensor, dims: list[str] | None = None) -> common_pb2.TensorSummary:
    """Statistics of a tensor computed on its device (one host sync for a handful of scalars)."""
    msg = common_pb2.TensorSummary(dtype=wire_dtype(t.dtype), shape=list(t.shape), numel=t.numel(), dims=dims or [])
    if t.numel() == 0:
        return msg
    x = t.detach()
    x = x.double() if x.dtype in (torch.float64,) else x.float()
    finite = torch.isfinite(x)
    nan = torch.isnan(x).sum()
    inf = torch.isinf(x).sum()
    xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    n_finite = finite.sum()
    stats = torch.stack([
        torch.where(finite, x, torch.full((), math.inf, dtype=x.dtype, device=x.device)).min(),
        torch.where(finite, x, torch.full((), -math.inf, dtype=x.dtype, device=x.device)).max(),
        xf.sum() / n_finite.clamp(min=1),
        xf.norm(),
        nan.to(x.dtype), inf.to(x.dtype), n_finite.to(x.dtype),
    ]).cpu().tolist()
    mn, mx, mean, norm, nans, infs, nf = stats
    var = ((xf - mean) * finite).pow(2).sum().item() / max(nf - 1, 1)
    msg.min, msg.max, msg.mean, msg.norm = (float(v) if nf else float("nan") for v in (mn, mx, mean, norm))
    msg.std = math.sqrt(var) if nf > 1 else 0.0
    msg.nan_count, msg.inf_count = int(nans), int(infs)
    return msg
