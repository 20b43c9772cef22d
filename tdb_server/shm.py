"""Same-host tensor reads through shared memory (ReadTensorRequest / ReadTensorsRequest.shared_memory).

gRPC moves ~0.7 GiB/s on a small machine however the chunks are encoded (benchmarks P3); a client on the
server's own host can skip the transport: the server writes the tensors' bytes once into a new file
under /dev/shm (mode 0600, so only its user can open it) and names it; the client maps the file and
unlinks it. One read of many tensors is one file: each tensor at a 64-byte aligned offset (`layout`). A file a client never picked up is removed by the next shared-memory read after a minute,
or when the server's process exits; files of a server that died without exiting (kill -9) carry its
process id in their name and are removed when a server starts (`sweep_dead`).

The bound on unclaimed bytes holds under concurrency: a read reserves its bytes under the lock before it
writes, so eight concurrent 48 MiB reads under a 64 MiB bound write one file, not eight. The CRC-32 sent
with the path lets the client check the bytes it maps."""

from __future__ import annotations

import atexit
import os
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Iterable, Sequence

from .errors import FailedPrecondition

SHM_DIR = Path("/dev/shm")
LEFTOVER_S = 60.0
PIECE = 1 << 20
ALIGN = 64           # each tensor of a file starts at a multiple of this (numpy views of any dtype are aligned)

_created: dict[str, tuple[float, int]] = {}   # path -> (when written, bytes)
_reserved: dict[str, int] = {}                # path -> bytes, for the files being written now
_lock = threading.Lock()
_atexit = [False]


def available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def local_peer(peer: str) -> bool:
    """Whether a gRPC peer string ("ipv4:127.0.0.1:5123", "ipv6:[::1]:5123", "unix:...") is this host."""
    return peer.startswith(("ipv4:127.", "ipv6:[::1]", "unix:"))


def check_peer(peer: str) -> None:
    if not local_peer(peer):
        raise FailedPrecondition("shared-memory reads are for clients on the server's own host: read without "
                                 "shared_memory", reason="SHM_UNAVAILABLE")
    if not available():
        raise FailedPrecondition(f"this server has no writable {SHM_DIR}: read without shared_memory",
                                 reason="SHM_UNAVAILABLE")


def layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where tensors of these byte sizes go in one file -> (their offsets, the file's size)."""
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += n + (-n % ALIGN)
    return offsets, (offsets[-1] + sizes[-1]) if sizes else 0


def write(sizes: Sequence[int], parts: Iterable[memoryview], max_unclaimed: int) -> tuple[str, list[int], list[int]]:
    """The parts (their byte sizes given first; the parts themselves may be made one at a time, as they are
    written) in a new 0600 file under /dev/shm, each at its offset of `layout(sizes)` -> (the path, the
    offsets, each part's CRC-32), written and checksummed a piece at a time (each piece is checksummed while
    it is still in cache). Files no client has picked up yet may hold at most `max_unclaimed` bytes (they
    are memory): the whole file is reserved before anything is written; beyond, SHM_UNAVAILABLE, and the
    client streams instead."""
    sweep()
    offsets, total = layout(sizes)
    path = str(SHM_DIR / f"tdb-{os.getpid()}-{uuid.uuid4().hex}")
    with _lock:              # the check and the reservation are one step: concurrent reads cannot both pass
        if _unclaimed_locked() + total > max_unclaimed:
            raise FailedPrecondition("too many shared-memory reads were not picked up: read without shared_memory",
                                     reason="SHM_UNAVAILABLE")
        _reserved[path] = total
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except BaseException:
        with _lock:
            _reserved.pop(path, None)
        raise
    crcs: list[int] = []
    try:   # write(2) into tmpfs: about twice as fast as copying into a fresh mapping (no page faults)
        for offset, size, data in zip(offsets, sizes, parts, strict=True):
            if len(data) != size:
                raise ValueError(f"a part of {len(data)} bytes where {size} were reserved")
            os.lseek(fd, offset, os.SEEK_SET)       # the alignment gap is a hole: it reads as zeros
            crc = 0
            for off in range(0, size, PIECE):
                piece = data[off:off + PIECE]
                crc = zlib.crc32(piece, crc)
                while piece:
                    piece = piece[os.write(fd, piece):]
            crcs.append(crc)
        os.ftruncate(fd, total)
    except BaseException:
        os.close(fd)
        _unlink(path)
        with _lock:
            _reserved.pop(path, None)
        raise
    os.close(fd)
    with _lock:
        _reserved.pop(path, None)
        if not _atexit[0]:
            atexit.register(sweep, 0.0)      # whatever no client picked up goes with the process
            _atexit[0] = True
        _created[path] = (time.monotonic(), total)
    return path, offsets, crcs


def _unclaimed_locked() -> int:
    """Bytes being written and written but not picked up yet (a client unlinks what it reads). Called with
    `_lock` held."""
    return sum(_reserved.values()) + sum(size for p, (_, size) in _created.items() if os.path.exists(p))


def unclaimed() -> int:
    """Bytes in the files this process wrote (or is writing) that are still there."""
    with _lock:
        return _unclaimed_locked()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True          # someone else's process: alive (and its files are not ours to remove)
    return True


def sweep_dead() -> int:
    """Remove the `tdb-PID-*` files of server processes that no longer exist (a server killed with -9 never
    ran its exit sweep). Called when a server starts. Returns how many were removed."""
    if not available():
        return 0
    removed = 0
    for entry in SHM_DIR.glob("tdb-*-*"):
        pid = entry.name.split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and not entry.is_symlink():
            try:
                if entry.stat().st_uid == os.getuid():
                    removed += _unlink(str(entry))
            except OSError:
                pass
    return removed


def sweep(older_than: float = LEFTOVER_S) -> int:
    """Remove the files this process made more than `older_than` seconds ago (clients unlink the files
    they read; a missing one is simply forgotten). Returns how many were still there."""
    now = time.monotonic()
    with _lock:
        old = [p for p, (t, _) in _created.items() if now - t >= older_than]
        for p in old:
            del _created[p]
    return sum(_unlink(p) for p in old)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
