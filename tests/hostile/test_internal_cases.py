"""What the docs say never happens, does not: no INTERNAL for bytes that are not protobuf, for negative
tensor shapes, for a hostile recording, or for a failed allocation (RESOURCE_EXHAUSTED, naming host
memory); a refused path is told back as the client wrote it, without the server's folders; a corpus
file is sized before it is read. Patch values are not kept twice: ClearPatches frees them, and the
recording keeps at most a bounded copy (and says what it dropped), so it still exports."""

from __future__ import annotations

import json
import os
import tempfile

import grpc
import numpy as np
import pytest

from tdb.v1 import analysis_pb2 as apb, analysis_pb2_grpc, common_pb2, debugger_pb2 as pb, debugger_pb2_grpc
from tdb_client import TdbClient, TdbError
from tdb_server import recording
from tdb_server.paths import BUNDLED_DIR

from .server import hostile_server

GARBAGE = b"\xff\xff\xff\xff\x0f"


@pytest.fixture
def raw(bundled_server):
    channel = grpc.insecure_channel(bundled_server)
    yield channel, debugger_pb2_grpc.DebuggerStub(channel), analysis_pb2_grpc.AnalysisStub(channel)
    channel.close()


@pytest.mark.parametrize("method, streaming", [("/tdb.v1.Debugger/Tokenize", False), ("/tdb.v1.Debugger/Launch", False),
                                               ("/tdb.v1.Debugger/Events", True), ("/tdb.v1.Debugger/ReadTensor", True),
                                               ("/tdb.v1.Analysis/NodeTable", False), ("/tdb.v1.Analysis/Circuit", True)])
def test_bytes_that_are_not_protobuf_are_invalid_argument(raw, method, streaming):
    channel = raw[0]
    call = (channel.unary_stream if streaming else channel.unary_unary)(method)
    with pytest.raises(grpc.RpcError) as e:
        result = call(GARBAGE, timeout=10)
        if streaming:
            list(result)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert ("tdb-reason", "BAD_REQUEST") in tuple(e.value.trailing_metadata() or ())
    assert "not a valid protobuf message" in e.value.details()


def _tensor(shape, n=16):
    return common_pb2.Tensor(dtype=common_pb2.F32, shape=shape, data=b"\0" * n)


@pytest.mark.parametrize("shape", [[-4, -1], [-1, 4], [-8], [1] * 40])
def test_negative_tensor_shapes_are_invalid_argument(raw, shape):
    _, dbg, ana = raw
    r = dbg.CreateSession(pb.CreateSessionRequest(), timeout=10)
    sid, md = r.session_id, (("tdb-session-secret", r.session_secret),)
    try:
        with pytest.raises(grpc.RpcError) as e:
            dbg.Patch(pb.PatchRequest(session_id=sid, site="blocks.0.attn.out", op=pb.SET, value=_tensor(shape)),
                      timeout=10, metadata=md)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            ana.NodeTable(apb.NodeTableRequest(input=apb.Input(token_ids=[1, 2, 3]), target=apb.Target(
                kind=apb.TARGET_DIRECTION, direction=_tensor(shape))), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    finally:
        dbg.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10, metadata=md)


def _hostile_recordings(model: dict) -> list[str]:
    head = {"format": recording.FORMAT, "model": model}
    docs = [{**head, "actions": a} for a in (
        [5], ["Launch"], [{"rpc": ["Launch"]}], [{"rpc": "Launch", "request": {"bogus": 1}}],
        [{"rpc": "Launch", "request": [1]}], [{"rpc": "Launch", "request": {"token_ids": [{"ids": ["x"]}]}}],
        [{"rpc": "Launch", "request": {"token_ids": [{"ids": [1]}]}, "outcome": 7}],
        [{"rpc": "Launch"}, {"rpc": "Pause", "outcome": {"stop": {"reason": "pause", "token": "x"}}}],
        [{"rpc": "Launch"}, {"rpc": "Pause", "outcome": {"stop": {"reason": "pause"}}}])]
    docs.append({**head, "model": 5, "actions": []})
    return ["[" * 100_000, '{"format": "tdb-recording/1", "actions": ' + "[" * 50_000] + [json.dumps(d) for d in docs]


def test_a_hostile_recording_is_bad_recording_never_internal(bundled_client, raw):
    dbg = raw[1]
    with bundled_client.session() as s:
        model = json.loads(s.export_recording())["model"]
    for text in _hostile_recordings(model):
        with pytest.raises(grpc.RpcError) as e:
            dbg.ReplayRecording(pb.ReplayRecordingRequest(json=text), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (text[:80], e.value.details()[:200])
        assert ("tdb-reason", "BAD_RECORDING") in tuple(e.value.trailing_metadata() or ()), text[:80]


def test_a_failed_allocation_is_resource_exhausted_naming_host_memory():
    # the expression budget off (1 TiB): the 8 GiB outer product meets the 3 GiB address-space limit itself
    with hostile_server("--max-expr-mib", str(1 << 20), limit_gib=3.0) as srv, TdbClient(srv.address, timeout=60) as c:
        with c.session() as s:
            s.launch(token_ids=[[1, 2, 3]])
            with pytest.raises(TdbError) as e:
                s.evaluate("(W_E.flatten()[:, None] * W_E.flatten()[None, :8192]).sum()")
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "OUT_OF_MEMORY"
            assert "host memory" in e.value.message
            assert s.evaluate("W_E.sum()").text                          # and the server answers on
        assert srv.alive()


def test_memory_error_anywhere_is_resource_exhausted():
    from tdb_server.servicer import _convert

    class Context:
        def set_trailing_metadata(self, md):
            self.md = md

        def abort(self, code, details):
            raise RuntimeError((code, details))

    ctx = Context()
    with pytest.raises(RuntimeError) as e:
        _convert(ctx, MemoryError())
    assert e.value.args[0][0] == grpc.StatusCode.RESOURCE_EXHAUSTED and ("tdb-reason", "OUT_OF_MEMORY") in ctx.md


def test_a_refused_path_is_told_as_the_client_wrote_it(bundled_client):
    for path in ("/etc/passwd", "../../../../etc", "~"):
        for call in (lambda: bundled_client.attach_sae(path), lambda: bundled_client.activation_records(
                "blocks.1.attn.head.0", corpus_path=path)):
            with pytest.raises(TdbError) as e:
                call()
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert repr(path) in e.value.message
            for secret in (str(BUNDLED_DIR), tempfile.gettempdir(), os.path.expanduser("~")):
                if secret != path:
                    assert secret not in e.value.message


def test_a_huge_corpus_file_is_refused_by_its_size_without_reading_it(tmp_path):
    big = tmp_path / "big.txt"
    with big.open("wb") as f:            # sparse: 4 GiB on paper, nothing on disk
        f.truncate(4 << 30)
    with hostile_server("--model", "induction", "--data-dir", str(tmp_path), limit_gib=3.0) as srv, \
            TdbClient(srv.address, timeout=60) as c:
        with pytest.raises(TdbError) as e:
            c.activation_records("blocks.1.attn.head.0", corpus_path=str(big))
        assert e.value.reason == "CORPUS_TOO_LARGE", e.value
        with pytest.raises(TdbError) as e:
            c.activation_records("blocks.1.attn.head.0", corpus_path=str(tmp_path / "missing.txt"))
        assert e.value.reason == "CORPUS_NOT_FOUND" and str(tmp_path) not in e.value.message
        assert srv.alive() and srv.peak_rss_mib() < 1500


def test_patch_values_are_freed_on_clear_and_the_recording_keeps_a_bounded_copy(make_server, bundled_adapter):
    handle, addr = make_server(bundled_adapter)
    d = bundled_adapter.info.d_model
    big = np.ones((64, 128, d), np.float32)             # 4 MiB each: over the recording's 1 MiB per value
    with TdbClient(addr, timeout=60) as c, c.session() as s:
        ids = [[1 + (i % 100) for i in range(128)]] * 64
        s.launch(token_ids=ids, capture=["none"])
        for _ in range(8):
            s.patch("blocks.0.attn.out", "set", big)     # session patches: every following run
        s.patch("blocks.0.attn.out", "add", np.full(d, 0.5, np.float32))   # small: kept whole
        session = handle.sessions.get(s.id, dict(s.metadata)["tdb-session-secret"])
        kept = sum(len(raw) for _, raw, _ in session.recording)
        assert kept < 1 << 20, kept                      # not 32 MiB of values again
        assert s.clear_patches() == 9
        assert session.patches == [] and all(not r.patches for r in session.runs.values())
        doc = json.loads(s.export_recording())
        dropped = [a["outcome"]["value_dropped"] for a in doc["actions"] if "value_dropped" in a["outcome"]]
        assert len(dropped) == 8 and dropped[0]["bytes"] == big.nbytes
        report = c.replay(json.dumps(doc))
        assert not report.ok and sum("was not kept in the recording" in m for m in report.mismatches) == 8
