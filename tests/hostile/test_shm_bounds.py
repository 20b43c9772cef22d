"""Shared-memory reads under pressure: the bound on unclaimed bytes holds when reads come at once (eight
concurrent unclaimed 48 MiB reads under a 64 MiB bound used to leave 384 MiB in /dev/shm); files of a
server killed with -9 are removed when a server starts; the client checks the CRC of what it maps."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import threading

import grpc
import pytest

from tdb_client import TdbClient, TdbError
from tdb_server import shm
from tdb_server.engine import reads
from tdb_server.errors import FailedPrecondition

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm on this machine")


@pytest.fixture(autouse=True)
def every_read_through_a_file(monkeypatch):
    """The models here are tiny: every read asked through shared memory uses a file, however small
    (a real server streams reads under reads.SHM_MIN_BYTES; test_small_reads_come_streamed checks that)."""
    monkeypatch.setattr(reads, "SHM_MIN_BYTES", 0)
MiB = 1 << 20


def test_concurrent_unclaimed_reads_stay_within_the_bound():
    data = memoryview(bytes(48 * MiB))
    start = threading.Barrier(8)
    written: list[str] = []
    refused: list[FailedPrecondition] = []

    def one() -> None:
        start.wait()
        try:
            written.append(shm.write([len(data)], [data], max_unclaimed=64 * MiB)[0])
        except FailedPrecondition as e:
            refused.append(e)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        on_disk = sum(os.path.getsize(p) for p in written if os.path.exists(p))
        assert len(written) == 1 and len(refused) == 7 and on_disk == 48 * MiB
        assert all(e.reason == "SHM_UNAVAILABLE" for e in refused)
    finally:
        for p in written:
            os.unlink(p)
    assert shm.unclaimed() == 0


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_files_of_dead_servers_are_swept_when_a_server_starts(make_server, gpt2_adapter):
    dead = shm.SHM_DIR / f"tdb-{_dead_pid()}-{os.urandom(4).hex()}"
    alive = shm.SHM_DIR / f"tdb-{os.getppid()}-{os.urandom(4).hex()}"     # pytest's parent: alive
    for f in (dead, alive):
        f.write_bytes(b"x" * 1000)
    try:
        make_server(gpt2_adapter)
        assert not dead.exists() and alive.exists()
    finally:
        for f in (dead, alive):
            if f.exists():
                f.unlink()


def test_the_client_checks_the_crc_of_a_shared_memory_read(gpt2_server, monkeypatch):
    real = shm.write

    def corrupting(sizes, parts, max_unclaimed):
        path, offsets, crcs = real(sizes, parts, max_unclaimed)
        with open(path, "r+b") as f:           # a byte changed after the server computed the checksum
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 0xFF]))
        return path, offsets, crcs

    monkeypatch.setattr(shm, "write", corrupting)
    with TdbClient(gpt2_server) as c, c.session() as s:
        s.launch(token_ids=[[5, 17, 42, 8]])
        assert c._use_shared_memory()
        with pytest.raises(TdbError) as e:
            s.read("logits")
        assert e.value.code == grpc.StatusCode.DATA_LOSS and e.value.reason == "CHECKSUM"
    assert not glob.glob(str(shm.SHM_DIR / f"tdb-{os.getpid()}-*"))
