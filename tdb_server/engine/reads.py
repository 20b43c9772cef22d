"""Reads of tensors (ReadTensor, ReadTensors): what a request names, its size checked against the
server's read limit before anything is converted or copied, and its bytes as chunks — streamed one
tensor after another, or all of them in one shared-memory file (shm.py) for a client on this host.

ReadTensor is the one-tensor case of the same path: `one()` names its tensor, `resolve()` the tensors
of a ReadTensors (site names, expressions, globs over the captured sites; none = every captured site);
both end in `chunks()`. The servicer converts each `Chunk` to a TensorChunk (serde.py).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .. import shm
from ..errors import InvalidArgument, NotFound, ResourceExhausted
from ..model import sites
from ..model.fingerprint import tensor_view   # a byte view of a tensor on the host (no copy when it can)

CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 16 << 20
MAX_READ_TENSORS = 4096          # tensors in one ReadTensors (a 1.1B Llama's every site is ~300)
# Below this, a read asked through shared memory is streamed instead: creating, mapping and unlinking a
# file costs more than sending the bytes (measured on loopback: 1.9 vs 1.4 ms at 4 KiB, 3.1 vs 2.8 ms at
# 488 KiB, 5.3 vs 7.1 ms at 1.9 MiB)
SHM_MIN_BYTES = 512 << 10
_GLOB = re.compile(r"[\w.*?\[\]!-]+")

Item = tuple[str, torch.Tensor]  # (its name in the answer, the tensor as stored)


@dataclass(frozen=True)
class Chunk:
    """A piece of a read as TensorChunk carries it: `index` and `name` say which tensor; `first` chunks
    carry dtype, shape and size, `last` ones the CRC-32 of the whole tensor. In shared memory, one chunk
    per tensor: `path` names the file and `offset` is where the tensor starts in it."""
    index: int
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    total_bytes: int
    offset: int = 0
    data: bytes = b""
    first: bool = True
    last: bool = True
    crc32: int = 0
    path: str = ""


def check_chunk_bytes(chunk_bytes: int) -> None:
    if chunk_bytes < 0 or chunk_bytes > MAX_CHUNK_BYTES:
        raise InvalidArgument(f"chunk_bytes must be in [0, {MAX_CHUNK_BYTES}]", reason="BAD_CHUNK_SIZE")


def _check_count(n: int, what: str) -> None:
    if n > MAX_READ_TENSORS:
        raise InvalidArgument(f"{what}: {n} tensors; one ReadTensors reads at most {MAX_READ_TENSORS} (split the "
                              "request)", reason="OUT_OF_RANGE")


def check_request(n_expressions: int, chunk_bytes: int) -> None:
    """The bounds a ReadTensors request shows before anything is looked up."""
    check_chunk_bytes(chunk_bytes)
    _check_count(n_expressions, "the request names")


def nbytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    """The bytes of `t` once converted to `dtype` (sized before any conversion)."""
    return t.numel() * (dtype or t.dtype).itemsize


def _too_large(what: str, size: int, limit: int, advice: str) -> ResourceExhausted:
    return ResourceExhausted(f"{what} {size / 2**20:.1f} MiB; reads are limited to {limit / 2**20:.1f} MiB: {advice}",
                             reason="READ_TOO_LARGE")


def one(session: Any, expression: str, run_id: str, dtype: torch.dtype | None, limit: int) -> list[Item]:
    """ReadTensor's tensor: a site or an expression (`Session.read_value`), within the read limit."""
    t = session.read_value(expression, run_id)
    if nbytes(t, dtype) > limit:
        raise _too_large(f"{expression!r} is", nbytes(t, dtype), limit, "read a slice")
    return [(expression, t)]


def is_glob(entry: str) -> bool:
    """A glob over site names ("blocks.*.resid_post"), not an expression: `*` or `?`, and nothing but the
    characters of names and patterns (so "blocks.0.attn.out[0, 2]" and "x * 2" are expressions)."""
    return ("*" in entry or "?" in entry) and _GLOB.fullmatch(entry) is not None


def _captured(run: Any) -> list[str]:
    """The sites captured in `run` so far, in the model's order."""
    names = list(run.captured)       # one step: the worker may add a site while a running run is read
    return sorted(names, key=lambda s: run.index.get(s, len(run.index)))


def _expand(session: Any, run: Any, pattern: str) -> list[str]:
    matched = sites.expand_glob(pattern, list(session.adapter.info.sites))   # SiteError: no site of the model
    captured = set(run.captured)
    kept = [s for s in matched if s in captured]
    if not kept:
        raise NotFound(f"no site matching {pattern!r} was captured in run {run.run_id} (see the launch's "
                       "capture list)", reason="NOT_CAPTURED")
    return kept


def resolve(session: Any, expressions: Sequence[str], run_id: str, dtype: torch.dtype | None,
            limit: int) -> list[Item]:
    """ReadTensors' tensors, in order: each entry a site, an expression or a glob over the run's captured
    sites; none = every captured site. A name given (or matched) twice is read once, at its first place.
    At most MAX_READ_TENSORS; their sizes summed as they are found, so that the request is refused
    (READ_TOO_LARGE) before any is converted or copied, and before more expressions are evaluated than
    the limit holds."""
    _check_count(len(expressions), "the request names")
    run = session.run_for(run_id)
    found = dict.fromkeys([] if expressions else _captured(run))     # ordered, each name once
    for entry in dict.fromkeys(e.strip() for e in expressions):
        found.update(dict.fromkeys(_expand(session, run, entry) if is_glob(entry) else [entry]))
        _check_count(len(found), "the request's globs match")           # checked as it grows
    names = list(found)
    items: list[Item] = []
    total = 0
    for name in names:
        t = session.read_value(name, run.run_id)       # the error ReadTensor gives (NOT_CAPTURED, UNKNOWN_SITE, ...)
        items.append((name, t))
        total += nbytes(t, dtype)
        if total > limit:
            some = "" if len(items) == len(names) else f"the first {len(items)} of "
            raise _too_large(f"{some}the {len(names)} tensors asked (from {names[0]!r}) are", total, limit,
                             "read fewer sites, or slices")
    return items


def _streamed(index: int, name: str, t: torch.Tensor, size: int, is_active: Callable[[], bool]) -> Iterator[Chunk]:
    data = tensor_view(t)   # no copy for a contiguous CPU tensor; each chunk copies its slice once
    total, shape = len(data), tuple(t.shape)
    crc = 0
    offset = 0
    while True:
        piece = data[offset:offset + size]
        crc = zlib.crc32(piece, crc)
        last = offset + len(piece) >= total
        yield Chunk(index, name, t.dtype, shape, total, offset=offset, data=bytes(piece), first=offset == 0,
                    last=last, crc32=crc if last else 0)
        offset += len(piece)
        if last or not is_active():
            return


def chunks(items: list[Item], dtype: torch.dtype | None, *, chunk_bytes: int, shared: bool, max_unclaimed: int,
           is_active: Callable[[], bool]) -> Iterator[Chunk]:
    """The tensors' bytes, each converted to `dtype` only when its turn comes (one conversion held at a
    time): streamed in chunks of `chunk_bytes` (0 = 1 MiB), stopping when the client has left, or written
    to one shared-memory file (one chunk per tensor naming it) when they hold SHM_MIN_BYTES or more."""
    if shared and sum(nbytes(t, dtype) for _, t in items) >= SHM_MIN_BYTES:
        yield from _shared(items, dtype, max_unclaimed)
        return
    for i, (name, t) in enumerate(items):
        if not is_active():
            return
        yield from _streamed(i, name, t.to(dtype) if dtype else t, chunk_bytes or CHUNK_BYTES, is_active)


def _shared(items: list[Item], dtype: torch.dtype | None, max_unclaimed: int) -> Iterator[Chunk]:
    if not items:
        return
    sizes = [nbytes(t, dtype) for _, t in items]
    parts = (tensor_view(t.to(dtype) if dtype else t) for _, t in items)
    path, offsets, crcs = shm.write(sizes, parts, max_unclaimed=max_unclaimed)
    for i, ((name, t), offset, size, crc) in enumerate(zip(items, offsets, sizes, crcs)):
        yield Chunk(i, name, dtype or t.dtype, tuple(t.shape), size, offset=offset, crc32=crc, path=path)
