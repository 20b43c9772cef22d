"""A run's cache read back in one request (ReadTensors, `Session.read_cache`): the same arrays as one
`read` per site, streamed or through one shared-memory file; names, globs and expressions; bounds refused
before any work; checksums; and the per-site fallback for a server that does not offer it."""

from __future__ import annotations

import glob
import os
import time

import grpc
import numpy as np
import pytest

from tdb.v1 import debugger_pb2 as pb, debugger_pb2_grpc
from tdb_client import TdbClient, TdbError
from tdb_client import client as client_module
from tdb_server import serde, shm
from tdb_server.engine import reads
from tdb_server.engine.session import Session as ServerSession
from tdb_server.errors import FailedPrecondition
from tdb_server.limits import Limits

IDS = [[5, 17, 42, 8, 99, 5, 17, 42, 3, 61]]
HAS_SHM = shm.available()
PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_SHM, reason="no writable /dev/shm"))]


@pytest.fixture(autouse=True)
def every_read_through_a_file(monkeypatch):
    """The models here are tiny: every read asked through shared memory uses a file, however small
    (a real server streams reads under reads.SHM_MIN_BYTES; tests/test_shm_reads.py checks that)."""
    monkeypatch.setattr(reads, "SHM_MIN_BYTES", 0)


def _ours() -> set[str]:
    return set(glob.glob(str(shm.SHM_DIR / f"tdb-{os.getpid()}-*")))


def _model_order(client) -> list[str]:
    return [x.name for x in client.model_info().sites]


@pytest.mark.parametrize("shared", PATHS)
@pytest.mark.parametrize("dtype,chunk_bytes", [(None, 0), (None, 1000), ("float16", 0), ("bfloat16", 777)])
def test_the_whole_cache_equals_one_read_per_site(client, shared, dtype, chunk_bytes):
    before = _ours()
    with client.session() as s:
        s.launch(token_ids=IDS, capture=["blocks.*", "embed", "final_norm", "logits"])
        cache = s.read_cache(dtype=dtype, chunk_bytes=chunk_bytes, shared_memory=shared)
        order = _model_order(client)
        assert list(cache) == sorted(cache, key=order.index)          # the model's order
        assert {"embed", "blocks.0.resid_pre", "blocks.1.attn.pattern", "blocks.1.mlp.out", "logits"} <= set(cache)
        for name, value in cache.items():
            want = s.read(name, dtype=dtype, shared_memory=False)
            assert value.dtype == want.dtype and value.shape == want.shape, name
            np.testing.assert_array_equal(value, want, err_msg=name)
        if shared:
            cache["logits"][...] = 0                                   # a private, writable mapping
    assert _ours() == before                                           # the client unlinked the one file


@pytest.mark.parametrize("shared", PATHS)
def test_names_globs_and_expressions_each_read_once_in_the_order_asked(client, shared):
    with client.session() as s:
        s.launch(token_ids=IDS)
        cache = s.read_cache(["blocks.*.resid_post", "blocks.1.resid_post", "logits[0, -1]", "embed",
                              "blocks.0.attn.out[0, :0]", " embed "], shared_memory=shared)
        assert list(cache) == ["blocks.0.resid_post", "blocks.1.resid_post", "logits[0, -1]", "embed",
                               "blocks.0.attn.out[0, :0]"]
        for name, value in cache.items():
            np.testing.assert_array_equal(value, s.read(name, shared_memory=False), err_msg=name)
        assert cache["blocks.0.attn.out[0, :0]"].size == 0
        assert list(s.read_cache("blocks.?.mlp.out", shared_memory=shared)) == ["blocks.0.mlp.out", "blocks.1.mlp.out"]


@pytest.mark.parametrize("shared", PATHS)
def test_a_stop_reads_what_has_run_and_a_run_without_captures_reads_nothing(client, shared):
    with client.session() as s:
        s.set_breakpoints(["blocks.1.attn.out"])
        s.launch(token_ids=IDS)
        so_far = s.read_cache(shared_memory=shared)
        assert "blocks.0.resid_post" in so_far and "blocks.1.attn.out" in so_far
        assert "blocks.1.mlp.out" not in so_far and "logits" not in so_far
        s.continue_()
        assert "logits" in s.read_cache(shared_memory=shared)
        s.set_breakpoints([])
        s.launch(token_ids=IDS, capture=["none"])
        assert s.read_cache(shared_memory=shared) == {}
        assert s.read_cache([]) == {}                                   # no names: nothing (not "every site")


def _error(fn) -> TdbError:
    with pytest.raises(TdbError) as e:
        fn()
    return e.value


def test_unknown_and_uncaptured_sites_are_the_errors_a_single_read_gives(client):
    with client.session() as s:
        s.launch(token_ids=IDS, capture=["embed", "blocks.0.resid_post"])
        for name in ("blocks.1.mlp.out", "blocks.9.mlp.out", "blocks.0.mpl.out", "1 +", ""):
            one = _error(lambda: s.read(name, shared_memory=False))
            many = _error(lambda: s.read_cache(["embed", name], shared_memory=False))
            assert (many.code, many.reason, many.message) == (one.code, one.reason, one.message), name
        assert _error(lambda: s.read_cache(["blocks.1.mlp.out"])).reason == "NOT_CAPTURED"
        e = _error(lambda: s.read_cache(["blocks.*.mlp.out"]))           # matches sites, none captured
        assert (e.code, e.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_CAPTURED") and "blocks.*.mlp.out" in e.message
        e = _error(lambda: s.read_cache(["blocks.*.nothing"]))            # matches no site of the model
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "UNKNOWN_SITE"
        e = _error(lambda: s.read_cache(["embed"], run_id="r999"))
        assert e.code == grpc.StatusCode.NOT_FOUND


@pytest.fixture
def evaluations(monkeypatch):
    """How many tensors the server looked up (Session.read_value) during a test."""
    seen: list[str] = []
    real = ServerSession.read_value
    monkeypatch.setattr(ServerSession, "read_value", lambda self, e, run_id="": seen.append(e) or real(self, e, run_id))
    return seen


def test_hostile_requests_are_refused_before_any_lookup(client, evaluations):
    with client.session() as s:
        s.launch(token_ids=IDS)
        stub = debugger_pb2_grpc.DebuggerStub(client._channel)
        evaluations.clear()
        t0 = time.monotonic()
        e = _error(lambda: s.read_cache(["embed"] * 100_000))
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "OUT_OF_RANGE" and "4096" in e.message
        for bad in (-1, (16 << 20) + 1):
            with pytest.raises(grpc.RpcError) as r:
                list(stub.ReadTensors(pb.ReadTensorsRequest(session_id=s.id, chunk_bytes=bad),
                                      metadata=s.metadata, timeout=10))
            assert r.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert evaluations == []
        e = _error(lambda: s.read_cache(["x" * (1 << 20)]))             # a 1 MiB name: refused by its length
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "BAD_EXPRESSION"
        e = _error(lambda: s.read_cache(["blocks.*" + "x" * 100_000]))   # a 100 kB glob
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.reason == "UNKNOWN_SITE"
        assert time.monotonic() - t0 < 20
        # no names on the wire: every captured site
        chunks = list(stub.ReadTensors(pb.ReadTensorsRequest(session_id=s.id), metadata=s.metadata, timeout=30))
        assert [c.name for c in chunks if c.name] == list(s.read_cache())


def test_the_bound_on_tensors_holds_after_globs_expand(client, monkeypatch, evaluations):
    monkeypatch.setattr(reads, "MAX_READ_TENSORS", 3)
    with client.session() as s:
        s.launch(token_ids=IDS)
        evaluations.clear()
        e = _error(lambda: s.read_cache(["blocks.*.resid_post", "embed", "logits"]))     # 3 entries, 4 tensors
        assert e.reason == "OUT_OF_RANGE" and "globs match: 4 tensors" in e.message and evaluations == []
        assert list(s.read_cache(["blocks.*.resid_post", "embed"])) == ["blocks.0.resid_post", "blocks.1.resid_post",
                                                                        "embed"]


@pytest.mark.parametrize("shared", PATHS)
def test_a_cache_over_the_read_limit_is_refused_before_anything_is_copied(make_server, gpt2_adapter, shared,
                                                                         evaluations, monkeypatch):
    _, addr = make_server(gpt2_adapter, limits=Limits(max_read_bytes=20_000))
    converted = []
    real = reads.tensor_view
    monkeypatch.setattr(reads, "tensor_view", lambda t: converted.append(1) or real(t))
    before = _ours()
    with TdbClient(addr) as c, c.session() as s:
        s.launch(token_ids=IDS)
        logits = s.read("logits", shared_memory=shared)               # 4,000 bytes: one read fits
        evaluations.clear()
        converted.clear()
        e = _error(lambda: s.read_cache(shared_memory=shared))
        assert (e.code, e.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "READ_TOO_LARGE")
        assert converted == []                                          # nothing converted, copied or sent
        evaluations.clear()
        e = _error(lambda: s.read_cache(["logits"] + [f"logits + {i}" for i in range(1, 100)], shared_memory=shared))
        assert e.reason == "READ_TOO_LARGE" and converted == []
        assert len(evaluations) == 6          # 4,000 bytes each: evaluated only until the sum passed the limit
        np.testing.assert_array_equal(s.read_cache(["logits"], shared_memory=shared)["logits"], logits)
    assert _ours() == before


@pytest.mark.skipif(not HAS_SHM, reason="no writable /dev/shm")
def test_a_corrupted_shared_memory_file_is_data_loss(client, monkeypatch):
    real = shm.write

    def corrupting(sizes, parts, max_unclaimed):
        path, offsets, crcs = real(sizes, parts, max_unclaimed)
        with open(path, "r+b") as f:               # a byte of the second tensor changed after its checksum
            f.seek(offsets[1])
            first = f.read(1)
            f.seek(offsets[1])
            f.write(bytes([first[0] ^ 0xFF]))
        return path, offsets, crcs

    monkeypatch.setattr(shm, "write", corrupting)
    before = _ours()
    with client.session() as s:
        s.launch(token_ids=IDS)
        e = _error(lambda: s.read_cache(["embed", "blocks.0.resid_pre"], shared_memory=True))
        assert (e.code, e.reason) == (grpc.StatusCode.DATA_LOSS, "CHECKSUM") and "blocks.0.resid_pre" in e.message
    assert _ours() == before


def test_a_corrupted_streamed_chunk_is_data_loss(client, monkeypatch):
    real = serde.chunk_to_proto

    def corrupting(chunk):
        msg = real(chunk)
        if chunk.index == 1 and msg.data:
            msg.data = bytes([msg.data[0] ^ 0xFF]) + msg.data[1:]
        return msg

    monkeypatch.setattr(serde, "chunk_to_proto", corrupting)
    with client.session() as s:
        s.launch(token_ids=IDS)
        e = _error(lambda: s.read_cache(["embed", "blocks.0.resid_pre"], shared_memory=False))
        assert (e.code, e.reason) == (grpc.StatusCode.DATA_LOSS, "CHECKSUM") and "blocks.0.resid_pre" in e.message


@pytest.mark.skipif(not HAS_SHM, reason="no writable /dev/shm")
def test_a_refused_shared_memory_read_streams_instead(client, monkeypatch):
    def refused(sizes, parts, max_unclaimed):
        raise FailedPrecondition("full", reason="SHM_UNAVAILABLE")

    with client.session() as s:
        s.launch(token_ids=IDS)
        want = s.read_cache(shared_memory=False)
        monkeypatch.setattr(shm, "write", refused)
        assert client._use_shared_memory()
        got = s.read_cache()
        assert client._shm is False and list(got) == list(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_one_file_of_many_parts_is_bounded_under_concurrency():
    """Eight concurrent two-part files of 48 MiB under a 64 MiB bound: one is written, seven refused."""
    import threading

    mib = 1 << 20
    parts = [memoryview(bytes(24 * mib - 3)), memoryview(bytes(24 * mib + 3))]
    sizes = [len(p) for p in parts]
    start = threading.Barrier(8)
    written, refused = [], []

    def one() -> None:
        start.wait()
        try:
            written.append(shm.write(sizes, iter(parts), max_unclaimed=64 * mib))
        except FailedPrecondition as e:
            refused.append(e.reason)

    if not HAS_SHM:
        pytest.skip("no writable /dev/shm")
    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert len(written) == 1 and refused == ["SHM_UNAVAILABLE"] * 7
        path, offsets, crcs = written[0]
        assert offsets == [0, 24 * mib] and offsets[1] % shm.ALIGN == 0
        assert os.path.getsize(path) == 48 * mib + 3
    finally:
        for path, _, _ in written:
            os.unlink(path)
    assert shm.unclaimed() == 0


@pytest.mark.parametrize("sites", [None, ["blocks.*.attn.out", "logits[0, -1]", "embed", "embed"]])
def test_a_server_without_batch_reads_is_read_one_site_at_a_time(client, monkeypatch, sites):
    with client.session() as s:
        s.launch(token_ids=IDS, capture=["blocks.*.attn.out", "blocks.*.resid_post", "embed", "logits"])
        want = s.read_cache(sites)
        rpcs: list[str] = []
        real = client_module._rpc_of
        monkeypatch.setattr(client_module, "_rpc_of", lambda req: rpcs.append(real(req)) or real(req))
        monkeypatch.setitem(client.initialize().capabilities, "supportsBatchReads", False)   # a 1.1 server
        got = s.read_cache(sites)
        assert list(got) == list(want) and set(rpcs) == {"ReadTensor"} and len(rpcs) >= len(want)   # one per site tried
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        e = _error(lambda: s.read_cache(["blocks.0.mlp.out"]))         # named, not captured: still an error
        assert e.reason == "NOT_CAPTURED"


def test_a_recording_replays_each_tensor_of_a_cache_read(client):
    with client.session() as s:
        s.launch(token_ids=IDS, capture=["blocks.*.resid_post", "logits"])
        n = len(s.read_cache(shared_memory=False)) + len(s.read_cache(["logits[0]"], dtype="float16"))
        text = s.export_recording()
    report = client.replay(text)
    assert report.ok and report.reads_checked == n == 4, report.mismatches


def test_the_glob_rule_is_the_same_on_both_sides():
    from tdb_client._reads import is_glob

    for entry in ("blocks.*.resid_post", "blocks.?.mlp.out", "blocks.[01].attn.z", "blocks.0.mlp.out*2",
                  "blocks.0.attn.out[0, :0]", "x * 2", "logits[0, -1]", "embed", "norm(blocks.*.x)"):
        assert is_glob(entry) == reads.is_glob(entry), entry
    assert reads.is_glob("blocks.*.resid_post") and not reads.is_glob("x * 2")
    assert not reads.is_glob("blocks.[01].attn.z")          # a character class alone reads as an index


def test_the_benchmark_reads_back_exactly_what_was_captured(client, gpt2_adapter):
    from benchmarks.bench_peers import read_back_entries
    from benchmarks.measures import session_run
    from tdb_server.engine.manager import SessionManager

    mgr = SessionManager(gpt2_adapter)
    try:
        run = session_run(mgr.create(), IDS[0], [])()
        with client.session() as s:
            entries = read_back_entries(s, IDS[0], run.captured)
    finally:
        mgr.shutdown()
    assert len(entries) == 4
    assert all(e.note == f"{len(run.captured)} tensors; max |read back - in-process| 0.0e+00" for e in entries.values())


def test_a_client_that_leaves_stops_the_read(client, monkeypatch):
    """The server computes a ReadTensors answer a batch ahead of the client at most: when the client leaves,
    the read stops (here one message a batch, 64-byte chunks)."""
    from tdb_server import servicer

    monkeypatch.setattr(servicer, "READ_BATCH_BYTES", 1)
    sent: list[int] = []
    real = serde.chunk_to_proto
    monkeypatch.setattr(serde, "chunk_to_proto", lambda c: sent.append(c.index) or real(c))
    with client.session() as s:
        s.launch(token_ids=IDS)
        stub = debugger_pb2_grpc.DebuggerStub(client._channel)
        call = stub.ReadTensors(pb.ReadTensorsRequest(session_id=s.id, chunk_bytes=64), metadata=s.metadata, timeout=30)
        next(call)
        call.cancel()
        time.sleep(0.5)
        after_cancel = len(sent)
        time.sleep(0.5)
        assert len(sent) == after_cancel < 10
        total = sum(-(-x.nbytes // 64) or 1 for x in s.read_cache(shared_memory=False).values())
        assert total > 500                          # what the whole answer would have been (783 messages)
