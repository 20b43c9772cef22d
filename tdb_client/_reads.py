"""Tensors out of a read's TensorChunks (ReadTensor, ReadTensors), checked against their CRC-32s.

Streamed: the chunks of each tensor follow one another (`index` on every chunk, `name`, dtype, shape and
size on its first, the CRC on its last) and are assembled into one buffer per tensor. Shared memory: one
chunk per tensor names the same file; it is mapped once and every tensor is a view of the mapping at its
offset (a private copy-on-write mapping: writable arrays, copied only where written). A mismatch is
TdbError DATA_LOSS (CHECKSUM), never a wrong array.
"""

from __future__ import annotations

import fnmatch
import mmap
import os
import re
import zlib
from typing import Any, Iterable

import numpy as np

from . import _wire
from .errors import TdbError

_GLOB = re.compile(r"[\w.*?\[\]!-]+")


def is_glob(entry: str) -> bool:
    """A glob over site names, as the server tells them from expressions (tdb_server/engine/reads.py):
    `*` or `?`, and nothing but the characters of names and patterns."""
    return ("*" in entry or "?" in entry) and _GLOB.fullmatch(entry) is not None


def _lost(what: str) -> TdbError:
    return TdbError.data_loss("CHECKSUM", f"checksum mismatch reading {what}")


def streamed(chunks: Iterable[Any], what: str) -> list[tuple[str, np.ndarray]]:
    """(name, array) for each tensor of a streamed read, in the order sent."""
    out: list[tuple[str, np.ndarray]] = []
    buf: bytearray | None = None
    name, shape, wdtype, crc, index = "", [0], 0, 0, -1
    for chunk in chunks:
        if buf is None:
            if chunk.index != len(out):
                raise TdbError.data_loss("CHECKSUM", f"tensor {chunk.index} arrived where "
                               f"{len(out)} was due, reading {what}")
            buf, name, shape, wdtype, crc, index = (bytearray(chunk.total_bytes), chunk.name, list(chunk.shape),
                                                    chunk.dtype, 0, chunk.index)
        elif chunk.index != index:
            raise TdbError.data_loss("CHECKSUM", f"tensor {index} ended early, reading {what}")
        data = chunk.data              # each access of a bytes field makes a new copy: once per chunk
        if chunk.offset + len(data) > len(buf):
            raise _lost(what)
        buf[chunk.offset:chunk.offset + len(data)] = data
        crc = zlib.crc32(data, crc)
        if chunk.last:
            if chunk.crc32 != crc:
                raise _lost(name or what)
            out.append((name, _wire.decode(wdtype, shape, buf)))
            buf = None
    if buf is not None:
        raise TdbError.data_loss("EMPTY_STREAM", f"tensor {index} ended early, reading {what}")
    return out


def mapped(fd: int, chunks: list[Any], what: str) -> list[tuple[str, np.ndarray]]:
    """(name, array) for each tensor of a shared-memory read, from the open file `fd` they all name."""
    size = os.fstat(fd).st_size
    if any(c.offset < 0 or c.offset + c.total_bytes > size for c in chunks):
        raise TdbError.data_loss("CHECKSUM", f"a tensor past the end of the shared-memory file "
                       f"({size} bytes), reading {what}")
    mm: Any = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) if size else b""
    view = memoryview(mm)
    out = []
    for c in chunks:
        data = view[c.offset:c.offset + c.total_bytes]
        if zlib.crc32(data) != c.crc32:      # the same check as a streamed read
            raise _lost(f"{c.name or what} through shared memory")
        out.append((c.name, _wire.decode(c.dtype, list(c.shape), data, copy=False)))
    return out


def expand(entries: list[str] | None, sites: list[str]) -> list[tuple[str, bool]]:
    """For a server without ReadTensors (protocol 1.1): the names to read one by one, each once, and whether
    it came from a glob (every site for None) — a glob's site the run did not capture is skipped, a name
    asked for itself is not."""
    names: dict[str, bool] = {}
    for entry in entries if entries is not None else ["*"]:
        entry = entry.strip()
        for name in [s for s in sites if fnmatch.fnmatchcase(s, entry)] if is_glob(entry) else [entry]:
            names.setdefault(name, is_glob(entry))
    return list(names.items())
