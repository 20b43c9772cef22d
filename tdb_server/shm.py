"""Same-host tensor reads through shared memory (ReadTensorRequest.shared_memory).

gRPC moves ~0.7 GiB/s on a small machine however the chunks are encoded (benchmarks P3); a client on the
server's own host can skip the transport: the server writes the tensor's bytes once into a new file
under /dev/shm (mode 0600, so only its user can open it) and names it; the client maps the file and
unlinks it. A file a client never picked up is removed by the next shared-memory read after a minute,
or when the server's process exits."""

from __future__ import annotations

import atexit
import os
import threading
import time
import uuid
import zlib
from pathlib import Path

from .errors import FailedPrecondition

SHM_DIR = Path("/dev/shm")
LEFTOVER_S = 60.0
PIECE = 1 << 20

_created: dict[str, tuple[float, int]] = {}   # path -> (when written, bytes)
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


def write(data: memoryview, max_unclaimed: int) -> tuple[str, int]:
    """The bytes in a new 0600 file under /dev/shm -> (its path, their CRC-32), written and checksummed
    a piece at a time (each piece is checksummed while it is still in cache). Files no client has
    picked up yet may hold at most `max_unclaimed` bytes (they are memory): beyond, SHM_UNAVAILABLE, and
    the client streams instead."""
    sweep()
    if unclaimed() + len(data) > max_unclaimed:
        raise FailedPrecondition("too many shared-memory reads were not picked up: read without shared_memory",
                                 reason="SHM_UNAVAILABLE")
    path = str(SHM_DIR / f"tdb-{os.getpid()}-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    crc = 0
    try:   # write(2) into tmpfs: about twice as fast as copying into a fresh mapping (no page faults)
        for off in range(0, len(data), PIECE):
            piece = data[off:off + PIECE]
            crc = zlib.crc32(piece, crc)
            while piece:
                piece = piece[os.write(fd, piece):]
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    os.close(fd)
    with _lock:
        if not _atexit[0]:
            atexit.register(sweep, 0.0)      # whatever no client picked up goes with the process
            _atexit[0] = True
        _created[path] = (time.monotonic(), len(data))
    return path, crc


def unclaimed() -> int:
    """Bytes in the files this process wrote that are still there (a client unlinks what it reads)."""
    with _lock:
        paths = list(_created.items())
    return sum(size for p, (_, size) in paths if os.path.exists(p))


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
