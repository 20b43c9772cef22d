"""Same-host reads through shared memory: the same arrays as streaming, nothing left in /dev/shm, a
fallback to streaming when the file cannot be used, and refusal for clients on other hosts."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from tdb_client import TdbClient
from tdb_client.client import Session
from tdb_server import shm
from tdb_server.engine import reads
from tdb_server.errors import FailedPrecondition

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm on this machine")


@pytest.fixture(autouse=True)
def every_read_through_a_file(monkeypatch):
    """The models here are tiny: every read asked through shared memory uses a file, however small
    (a real server streams reads under reads.SHM_MIN_BYTES; test_small_reads_come_streamed checks that)."""
    monkeypatch.setattr(reads, "SHM_MIN_BYTES", 0)

IDS = [[5, 17, 42, 8, 99, 5, 17, 42, 3, 61]]


def _ours() -> set[str]:
    return set(glob.glob(str(shm.SHM_DIR / f"tdb-{os.getpid()}-*")))


@pytest.mark.parametrize("site,dtype", [("logits", None), ("blocks.1.attn.pattern", None),
                                        ("blocks.0.resid_post", "bfloat16"), ("blocks.0.mlp.post", "float16"),
                                        ("blocks.0.attn.out[0, :0]", None), ("norm(blocks.0.attn.out)", None)])
def test_shared_memory_reads_equal_streamed_ones_and_leave_nothing(client, site, dtype):
    before = _ours()
    with client.session() as s:
        s.launch(token_ids=IDS, capture=["*"])          # every site, attention patterns too
        streamed = s.read(site, dtype=dtype, shared_memory=False)
        shared = s.read(site, dtype=dtype, shared_memory=True)
    assert shared.dtype == streamed.dtype and shared.shape == streamed.shape
    np.testing.assert_array_equal(shared, streamed)
    if shared.size:
        shared[...] = 0                            # a private, writable copy-on-write mapping
    assert _ours() == before                       # the client unlinked the file it read


def test_a_client_on_this_host_uses_shared_memory_by_default(gpt2_server, monkeypatch):
    calls = []
    real = Session._read_shared
    monkeypatch.setattr(Session, "_read_shared", lambda self, req: calls.append(1) or real(self, req))
    with TdbClient(gpt2_server) as c, c.session() as s:
        assert c.capabilities()["supportsSharedMemoryReads"]
        s.launch(token_ids=IDS)
        assert s.read("logits").shape == (1, 10, 100) and calls == [1]


def test_a_file_the_client_cannot_open_falls_back_to_streaming(gpt2_server, monkeypatch):
    import tdb_client.client as client_module

    def cannot(path):
        raise PermissionError(path)                # another user, another /dev/shm (a container)

    monkeypatch.setattr(client_module, "_open_shared", cannot)
    with TdbClient(gpt2_server) as c, c.session() as s:
        s.launch(token_ids=IDS)
        want = s.read("logits", shared_memory=False)
        np.testing.assert_array_equal(s.read("logits"), want)
        assert c._shm is False                     # streams from now on
        np.testing.assert_array_equal(s.read("logits"), want)
    assert shm.sweep(older_than=0.0) >= 1           # the file nobody picked up is removed by the server


def test_only_clients_on_this_host_may_ask():
    assert shm.local_peer("ipv4:127.0.0.1:50123") and shm.local_peer("ipv6:[::1]:50123")
    assert shm.local_peer("unix:/tmp/tdb.sock")
    assert not shm.local_peer("ipv4:10.1.2.3:50123") and not shm.local_peer("ipv6:[2001:db8::1]:443")
    with pytest.raises(FailedPrecondition) as e:
        shm.check_peer("ipv4:192.168.1.7:40000")
    assert e.value.reason == "SHM_UNAVAILABLE" and e.value.code.name == "FAILED_PRECONDITION"


def test_a_recording_with_shared_memory_reads_replays(client):
    with client.session() as s:
        s.set_breakpoints(["blocks.1.attn.out"])
        s.launch(token_ids=IDS)
        s.read("blocks.1.attn.out", shared_memory=True)
        s.continue_()
        s.read("logits", shared_memory=True)
        text = s.export_recording()
    report = client.replay(text)
    assert report.ok and report.reads_checked == 2, report.mismatches


def test_unclaimed_files_are_bounded():
    """Files no client picked up are memory: at most max_unclaimed bytes of them, then SHM_UNAVAILABLE."""
    data = memoryview(bytes(1000))
    path, _, _ = shm.write([len(data)], [data], max_unclaimed=2500)
    path2, _, _ = shm.write([len(data)], [data], max_unclaimed=2500)
    with pytest.raises(FailedPrecondition) as e:
        shm.write([len(data)], [data], max_unclaimed=2500)
    assert e.value.reason == "SHM_UNAVAILABLE"
    os.unlink(path)                                 # a client picks one up: room again
    path3, _, _ = shm.write([len(data)], [data], max_unclaimed=2500)
    for p in (path2, path3):
        os.unlink(p)


def test_the_client_opens_and_unlinks_only_tdb_files_in_dev_shm(tmp_path):
    """The client unlinks the file a server names: it must refuse any other path (or a link)."""
    from tdb_client.client import _open_shared

    victim = tmp_path / "notes.txt"
    victim.write_text("keep me")
    link = shm.SHM_DIR / f"tdb-{os.getpid()}-link-test"
    link.symlink_to(victim)
    try:
        for path in (str(victim), "/dev/shm/../tmp/x", "/dev/shm/other-file", str(link)):
            with pytest.raises(OSError):
                _open_shared(path)
    finally:
        link.unlink()
    assert victim.read_text() == "keep me"



def test_small_reads_come_streamed_and_large_ones_through_one_file(client, monkeypatch):
    """A file costs more than the bytes of a small read: under SHM_MIN_BYTES the server streams even when
    shared memory is asked, and the client takes the streamed answer without giving up shared memory."""
    monkeypatch.setattr(reads, "SHM_MIN_BYTES", 4000)        # logits here: 10 x 100 float32 = 4,000 bytes
    files = []
    real = shm.write
    monkeypatch.setattr(shm, "write", lambda *a, **k: files.append(1) or real(*a, **k))
    with client.session() as s:
        s.launch(token_ids=IDS)
        want = s.read("logits", shared_memory=False)
        np.testing.assert_array_equal(s.read("logits[0, :5]", shared_memory=True), want[0, :5])   # 2,000 bytes
        assert files == [] and client._use_shared_memory()
        np.testing.assert_array_equal(s.read("logits", shared_memory=True), want)                # 4,000 bytes
        assert files == [1]
        cache = s.read_cache(["logits[0, :5]", "logits[0, 5:]"], shared_memory=True)             # 4,000 in all
        assert files == [1, 1] and set(cache) == {"logits[0, :5]", "logits[0, 5:]"}
