"""Fuzzing every RPC of both services (Debugger and Analysis) with generated malformed and hostile
requests (hypothesis, bounded, loopback): ~2,200 requests over 39 RPCs.

Each answer must be a deliberate status — never INTERNAL or UNKNOWN, never a hang — and afterwards a
normal session must still get exactly the right logits."""

from __future__ import annotations

import collections

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings, strategies as st

from tdb.v1 import analysis_pb2, analysis_pb2_grpc, debugger_pb2 as pb, debugger_pb2_grpc
from tdb_client import TdbClient
from tdb_server.limits import Limits

DELIBERATE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
EXAMPLES_PER_RPC = 60
IDS = [[5, 17, 42, 8, 99, 5, 17, 42, 3, 61]]

SITE_WORDS = ["embed", "logits", "final_norm", "blocks.0.attn.out", "blocks.1.attn.pattern", "blocks.1.attn.head.2",
              "blocks.0.mlp.neuron.5", "blocks.*.mlp.out", "blocks.9.attn.out", "blocks.-1.resid_pre", "x", "norm > 1",
              "logits[0, -1].topk(3)", "blocks.0.attn.z[0, :, 99]", "W_U @ W_E", "9**9**9", "((((((1))))))",
              "__import__('os')", "x.__class__", "blocks.0.resid_post[", "\x00", "tokens(logits[0,-1].topk(2))",
              "blocks.0.attn.W_O[1]", "softmax(logits, dim=7)"]


class State:
    session_id = ""
    metadata: tuple = ()      # the session's secret: fuzzed requests naming it reach past the ownership check


def _text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(SITE_WORDS), st.text(max_size=40), st.just(State.session_id or "x"))


def _value(field, depth: int) -> st.SearchStrategy:
    t = field.type
    if t == F.TYPE_STRING:
        if field.name == "session_id":
            return st.one_of(st.builds(lambda: State.session_id), st.text(max_size=20))
        return _text()
    if t == F.TYPE_BYTES:
        return st.binary(max_size=256)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -1.0, 1e9]))
    if t == F.TYPE_ENUM:
        return st.integers(-3, 12)
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-3, 20))
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-3, 120))
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t == F.TYPE_MESSAGE:
        return _message(field.message_type, depth + 1)
    raise AssertionError(t)


def _repeated(field) -> bool:
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == F.LABEL_REPEATED


def _message(desc, depth: int = 0) -> st.SearchStrategy[dict]:
    if depth > 3:
        return st.just({})
    fields = {}
    for f in desc.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            continue
        v = _value(f, depth)
        fields[f.name] = st.lists(v, max_size=3) if _repeated(f) else v
    return st.fixed_dictionaries({}, optional=fields)


def _build(cls, data: dict):
    msg = cls()
    for name, value in data.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        if field.type == F.TYPE_MESSAGE:
            sub = field.message_type._concrete_class
            if _repeated(field):
                getattr(msg, name).extend(_build(sub, v) for v in value)
            else:
                getattr(msg, name).CopyFrom(_build(sub, value))
        elif _repeated(field):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


SERVICES = [(pb.DESCRIPTOR.services_by_name["Debugger"], debugger_pb2_grpc.DebuggerStub),
            (analysis_pb2.DESCRIPTOR.services_by_name["Analysis"], analysis_pb2_grpc.AnalysisStub)]
METHODS = [(m, stub) for service, stub in SERVICES for m in service.methods]


@pytest.fixture(scope="module")
def fuzz_adapter():
    from tdb_server.model import build_random_model

    return build_random_model("gpt2", seed=0)     # its own object: the hook check below sees only this server


@pytest.fixture(scope="module")
def fuzz_server(fuzz_adapter):
    from tdb_server.server import create_server

    handle, port = create_server("127.0.0.1:0", fuzz_adapter,
                                 limits=Limits(max_sessions=100_000, max_batch=8, max_prompt_tokens=64))
    yield f"127.0.0.1:{port}", handle
    handle.stop(grace=None)


@pytest.mark.parametrize("method,stub_class", METHODS, ids=[f"{m.containing_service.name}.{m.name}" for m, _ in METHODS])
def test_fuzz_rpc(method, stub_class, fuzz_server, fuzz_counter):
    addr, _ = fuzz_server
    channel = grpc.insecure_channel(addr)
    stub = stub_class(channel)
    with TdbClient(addr) as c:
        s = c.session()                       # a real session, so fuzzed requests reach deep code
        State.session_id, State.metadata = s.id, s.metadata
        s.set_breakpoints(["blocks.1.attn.out"])
        s.launch(token_ids=IDS)               # paused: stop-dependent RPCs have something to chew on
    req_cls = method.input_type._concrete_class
    call = getattr(stub, method.name)

    @settings(max_examples=EXAMPLES_PER_RPC, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(_message(method.input_type))
    def one(data):
        req = _build(req_cls, data)
        try:
            if method.server_streaming:
                for _ in zip(range(5), call(req, timeout=2.0, metadata=State.metadata)):
                    pass
            else:
                call(req, timeout=20.0, metadata=State.metadata)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
                code = grpc.StatusCode.OK     # an open event stream simply waits for events
            assert code in DELIBERATE, f"{method.name}({req}) -> {code}: {e.details()}"
        fuzz_counter[code.name] += 1

    try:
        one()
    finally:
        channel.close()


@pytest.fixture(scope="module")
def fuzz_counter():
    return collections.Counter()


def test_after_fuzzing_a_normal_session_gets_exact_logits(fuzz_server, fuzz_adapter, fuzz_counter):
    addr, handle = fuzz_server
    assert sum(fuzz_counter.values()) >= 1000, fuzz_counter
    print(f"fuzzed {sum(fuzz_counter.values())} requests: {dict(fuzz_counter)}")
    with TdbClient(addr) as c, c.session() as s:
        assert s.launch(token_ids=IDS).state == "exited"
        got = s.result().last_logits
    with torch.no_grad():
        want = fuzz_adapter.model(torch.tensor(IDS)).logits[:, -1].numpy()
    assert np.abs(got - want).max() <= 1e-5
    for sess in handle.sessions.sessions():
        sess_id = sess.id
        handle.sessions.close(sess_id)
    import time

    deadline = time.monotonic() + 10
    while fuzz_adapter.installed_hook_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fuzz_adapter.installed_hook_count() == 0
