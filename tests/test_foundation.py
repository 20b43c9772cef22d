"""The foundation: Initialize over the wire, health, reflection, `tdb serve`, generated-code drift."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from tdb_client import TdbClient, TdbError
from tdb_client import _wire

ROOT = Path(__file__).resolve().parent.parent


def test_initialize_reports_protocol_capabilities_and_model(client, gpt2_adapter):
    info = client.initialize()
    assert info.protocol_version == "1.2"
    assert info.capabilities["supportsConditionalBreakpoints"] is True
    assert "zero" in info.patch_ops and "topk" in info.expression_functions
    m = info.model
    assert (m.architecture, m.n_layers, m.n_heads) == ("gpt2", gpt2_adapter.info.n_layers, gpt2_adapter.info.n_heads)
    assert m.d_model == gpt2_adapter.info.d_model and m.vocab_size == gpt2_adapter.info.vocab_size
    assert m.dtype == "float32" and m.device == "cpu"
    names = m.site_names
    assert names[0] == "embed" and names[-1] == "logits" and "blocks.1.attn.pattern" in names
    assert all(s.verified for s in m.sites)
    pattern = next(s for s in m.sites if s.name == "blocks.0.attn.pattern")
    assert pattern.dims == ("batch", "head", "query_pos", "key_pos") and pattern.layer == 0


def test_protocol_major_mismatch_is_invalid_argument(gpt2_server):
    from tdb.v1 import debugger_pb2 as pb, debugger_pb2_grpc

    with grpc.insecure_channel(gpt2_server) as ch:
        stub = debugger_pb2_grpc.DebuggerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Initialize(pb.InitializeRequest(protocol_version="2.0"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(e.value.trailing_metadata())["tdb-reason"] == "PROTOCOL_MISMATCH"


def test_health_serving_and_reflection_lists_services(gpt2_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(gpt2_server) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="tdb.v1.Debugger"))
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"tdb.v1.Debugger", "grpc.health.v1.Health"} <= names


def test_unknown_session_is_not_found_with_reason(client):
    from tdb_client.client import Session

    s = Session(client, "nope", 0)
    with pytest.raises(TdbError) as e:
        s.status()
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.reason == "UNKNOWN_SESSION"
    assert "nope" in e.value.message


def test_unreachable_server_is_a_tdb_error():
    with TdbClient("127.0.0.1:1", timeout=2) as c:
        with pytest.raises(TdbError) as e:
            c.initialize()
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"])
def test_tensor_wire_roundtrip_numpy_torch(dtype):
    import torch

    from tdb_server import wire

    a = (np.arange(24).reshape(2, 3, 4) % 5).astype(dtype)
    t = wire.from_wire(_wire.to_wire(a))
    assert t.shape == (2, 3, 4) and np.array_equal(t.numpy(), a)
    back = _wire.from_wire(wire.to_wire(torch.from_numpy(a)))
    assert back.dtype == a.dtype and np.array_equal(back, a)


def test_bfloat16_arrives_exactly_as_float32():
    import torch

    from tdb_server import wire

    t = torch.randn(3, 5).to(torch.bfloat16)
    got = _wire.from_wire(wire.to_wire(t))
    assert got.dtype == np.float32 and np.array_equal(got, t.float().numpy())


def test_drift_check_passes_and_fails_on_stale_code(tmp_path):
    py = sys.executable
    ok = subprocess.run([py, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for d in ("proto", "scripts", "tdb"):
        shutil.copytree(ROOT / d, tmp_path / d, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "tdb" / "v1" / "debugger_pb2.py"
    target.write_text(target.read_text() + "\n# hand edit\n")
    bad = subprocess.run([py, "scripts/gen_proto.py", "--check"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 1 and "debugger_pb2.py" in bad.stderr
    # a changed .proto without regeneration is stale too
    shutil.copyfile(ROOT / "tdb" / "v1" / "debugger_pb2.py", target)
    proto = tmp_path / "proto" / "tdb" / "v1" / "common.proto"
    proto.write_text(proto.read_text() + "\nmessage Extra { int32 x = 1; }\n")
    bad = subprocess.run([py, "scripts/gen_proto.py", "--check"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 1 and "common_pb2.py" in bad.stderr


def test_generated_code_is_marked_do_not_edit():
    for f in (ROOT / "tdb" / "v1").glob("*.py"):
        assert "DO NOT EDIT" in f.read_text().splitlines()[0], f


def test_tdb_serve_prints_listening_line_and_stops_on_sigterm(tmp_path, gpt2_adapter):
    model_dir = tmp_path / "tiny-gpt2"
    gpt2_adapter.model.save_pretrained(model_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tdb_server", "serve", "--model", str(model_dir), "--port", "0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("tdb: listening on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.rsplit(":", 1)[1])
        assert port > 0
        with TdbClient(f"127.0.0.1:{port}", timeout=30) as c:
            assert c.model_info().name == "tiny-gpt2"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
