"""numpy <-> protocol Tensor messages (raw little-endian bytes). bfloat16 arrives as float32."""

from __future__ import annotations

import mmap

import numpy as np

from tdb.v1 import common_pb2

_NP = {common_pb2.F32: np.float32, common_pb2.F16: np.float16, common_pb2.F64: np.float64,
       common_pb2.I64: np.int64, common_pb2.I32: np.int32, common_pb2.I16: np.int16, common_pb2.I8: np.int8,
       common_pb2.U8: np.uint8, common_pb2.BOOL: np.bool_}
_WIRE = {np.dtype(v): k for k, v in _NP.items()}
DTYPE_NAMES = {**{k: np.dtype(v).name for k, v in _NP.items()}, common_pb2.BF16: "bfloat16"}   # "float32", ...
WIRE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def decode(dtype: int, shape: list[int] | tuple[int, ...], data: bytes | bytearray | memoryview | mmap.mmap,
           copy: bool | None = None) -> np.ndarray:
    """Raw bytes -> numpy array (bfloat16 is widened to float32, exactly). copy: None = copy unless the
    buffer is already ours (a bytearray or a mapping); False = a view of `data` (a slice of our mapping)."""
    shape = tuple(int(s) for s in shape)
    if dtype == common_pb2.BF16:
        raw = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    if dtype not in _NP:
        raise ValueError(f"unknown wire dtype {dtype}")
    arr = np.frombuffer(data, dtype=np.dtype(_NP[dtype]).newbyteorder("<")).reshape(shape)
    if copy is None:
        copy = not isinstance(data, (bytearray, mmap.mmap))   # ours already: no second copy
    return arr.copy() if copy else arr


def from_wire(msg: common_pb2.Tensor) -> np.ndarray:
    return decode(msg.dtype, list(msg.shape), msg.data)


def to_wire(array: "np.ndarray | list | float") -> common_pb2.Tensor:
    a = np.asarray(array)
    if a.dtype not in _WIRE:
        raise TypeError(f"cannot send dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return common_pb2.Tensor(dtype=_WIRE[np.dtype(a.dtype.newbyteorder("="))], shape=list(a.shape), data=a.tobytes())
