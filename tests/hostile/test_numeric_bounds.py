"""Every numeric field of every request is bounded before work: sent its type's extreme values (int32
±2^31, int64 ±2^63, NaN / ±inf / 1e308 for doubles) through raw protobuf, each RPC answers at once with a
deliberate status — INVALID_ARGUMENT naming the field (and its bound) for a size, a count or a position;
NOT_FOUND / ABORTED for a reference that names nothing — never INTERNAL, never a hang, never an
allocation the size of the number. `ActivationRecords` with batch=2^31-1 used to allocate 2.38 GB.

The server runs in its own process under a 3 GiB address-space limit; it must be alive and answering
after the whole table."""

from __future__ import annotations

import math
import time

import grpc
import pytest

from tdb.v1 import analysis_pb2 as apb, analysis_pb2_grpc, common_pb2, debugger_pb2 as pb, debugger_pb2_grpc

from .server import hostile_server

IDS = [1, 2, 3, 4, 5, 6]
INT32, INT64 = (-2**31, 2**31 - 1), (-2**63, 2**63 - 1)
DOUBLES = (math.nan, math.inf, -math.inf, 1e308)
SIZE = "size"      # INVALID_ARGUMENT naming the field (or the words of its meaning: WORDS)
REF = "ref"        # a reference (id, sequence number): NOT_FOUND / ABORTED / INVALID_ARGUMENT, or nothing found
FREE = "free"      # any value is meaningful (a seed, a timeout clamped to the deadline): answered, no error needed


def _input(**kw):
    return apb.Input(token_ids=IDS, **kw)


def _other():
    return apb.Input(token_ids=[9, 10, 11, 12, 13, 14])


def _target(**kw):
    return apb.Target(token_ids=[7], distractor_ids=[8], **kw)


# (rpc, request builder given the session id, field path, kind)
TABLE = [
    ("Launch", lambda s: pb.LaunchRequest(session_id=s, token_ids=[pb.TokenIds(ids=IDS)], wait=True), "wait_timeout_ms", FREE),
    ("Launch", lambda s: pb.LaunchRequest(session_id=s, token_ids=[pb.TokenIds(ids=IDS)],
                                          generate=pb.GenerateOptions(max_new_tokens=2)), "generate.max_new_tokens", SIZE),
    ("Launch", lambda s: pb.LaunchRequest(session_id=s, token_ids=[pb.TokenIds(ids=IDS)],
                                          generate=pb.GenerateOptions(max_new_tokens=2, sample=True)), "generate.top_k", SIZE),
    ("Launch", lambda s: pb.LaunchRequest(session_id=s, token_ids=[pb.TokenIds(ids=IDS)],
                                          generate=pb.GenerateOptions(max_new_tokens=2, sample=True)), "generate.temperature", SIZE),
    ("Launch", lambda s: pb.LaunchRequest(session_id=s, token_ids=[pb.TokenIds(ids=IDS)],
                                          generate=pb.GenerateOptions(max_new_tokens=2, sample=True)), "generate.seed", FREE),
    ("Launch", lambda s: pb.LaunchRequest(session_id=s, token_ids=[pb.TokenIds(ids=IDS)],
                                          generate=pb.GenerateOptions(max_new_tokens=2)), "generate.stop_token_ids", SIZE),
    ("Launch", lambda s: pb.LaunchRequest(session_id=s, token_ids=[pb.TokenIds(ids=IDS)]), "token_ids.0.ids", SIZE),
    ("CreateSession", lambda s: pb.CreateSessionRequest(), "idle_timeout_s", SIZE),
    ("SetBreakpoints", lambda s: pb.SetBreakpointsRequest(session_id=s, breakpoints=[
        pb.Breakpoint(site="blocks.0.attn.out", tokens=pb.TokenRange(first=0, last=1))]), "breakpoints.0.tokens.first", SIZE),
    ("SetBreakpoints", lambda s: pb.SetBreakpointsRequest(session_id=s, breakpoints=[
        pb.Breakpoint(site="blocks.0.attn.out", tokens=pb.TokenRange(first=0, last=1))]), "breakpoints.0.tokens.last", SIZE),
    ("GetResult", lambda s: pb.GetResultRequest(session_id=s), "top_k", SIZE),
    ("GetRunStatus", lambda s: pb.GetRunStatusRequest(session_id=s, wait=True), "wait_timeout_ms", FREE),
    ("PollEvents", lambda s: pb.PollEventsRequest(session_id=s), "after_seq", REF),
    ("PollEvents", lambda s: pb.PollEventsRequest(session_id=s), "max_events", SIZE),
    ("PollEvents", lambda s: pb.PollEventsRequest(session_id=s), "timeout_ms", FREE),
    ("GetScopes", lambda s: pb.GetScopesRequest(session_id=s), "frame_id", REF),
    ("GetVariables", lambda s: pb.GetVariablesRequest(session_id=s), "variables_reference", REF),
    ("GetVariables", lambda s: pb.GetVariablesRequest(session_id=s, variables_reference=1), "start", REF),
    ("GetVariables", lambda s: pb.GetVariablesRequest(session_id=s, variables_reference=1), "count", REF),
    ("ReadTensor", lambda s: pb.ReadTensorRequest(session_id=s, expression="logits"), "chunk_bytes", SIZE),
    ("Evaluate", lambda s: pb.EvaluateRequest(session_id=s, expression="logits"), "frame_id", REF),
    ("Evaluate", lambda s: pb.EvaluateRequest(session_id=s, expression="logits"), "max_elements", SIZE),
    ("Patch", lambda s: pb.PatchRequest(session_id=s, site="blocks.0.attn.out", op=pb.SCALE), "scalar", FREE),      # NaN and inf are values one patches in on purpose
    ("Patch", lambda s: pb.PatchRequest(session_id=s, site="blocks.0.attn.out", op=pb.ZERO), "selector.batch", SIZE),
    ("Patch", lambda s: pb.PatchRequest(session_id=s, site="blocks.0.attn.out", op=pb.ZERO), "selector.positions", SIZE),
    ("Patch", lambda s: pb.PatchRequest(session_id=s, site="blocks.0.attn.z", op=pb.ZERO), "selector.heads", SIZE),
    ("Patch", lambda s: pb.PatchRequest(session_id=s, site="blocks.0.mlp.post", op=pb.ZERO), "selector.neurons", SIZE),
    ("Patch", lambda s: pb.PatchRequest(session_id=s, site="blocks.0.attn.out", op=pb.ZERO), "tokens", SIZE),
    ("Patch", lambda s: pb.PatchRequest(session_id=s, site="blocks.0.attn.out", op=pb.SET,
                                        value=common_pb2.Tensor(dtype=1, shape=[1], data=b"\0\0\0\0")), "value.shape", SIZE),
    ("Tokenize", lambda s: pb.TokenizeRequest(text="Mr Darcy"), None, None),
    # analyses
    ("NodeTable", lambda s: apb.NodeTableRequest(input=_input(), target=_target()), "top_k", SIZE),
    ("NodeTable", lambda s: apb.NodeTableRequest(input=_input(), target=_target()), "input.token_ids", SIZE),
    ("NodeTable", lambda s: apb.NodeTableRequest(input=_input(), target=_target()), "target.position", SIZE),
    ("NodeTable", lambda s: apb.NodeTableRequest(input=_input(), target=_target()), "target.token_ids", SIZE),
    ("NodeTable", lambda s: apb.NodeTableRequest(input=_input(), target=_target()), "target.distractor_ids", SIZE),
    ("NodeTable", lambda s: apb.NodeTableRequest(input=_input(), trace=apb.TraceNode(node="blocks.1.attn.head.0")),
     "trace.position", SIZE),
    ("NodeTable", lambda s: apb.NodeTableRequest(input=_input(), trace=apb.TraceNode(node="blocks.1.attn.head.0",
                                                                                     part=apb.HEAD_PART_QK)),
     "trace.key_position", SIZE),
    ("CompareNodeTables", lambda s: apb.CompareNodeTablesRequest(left=_input(), right=_input(), target=_target()), "top_k", SIZE),
    ("Ablate", lambda s: apb.AblateRequest(input=_input(), target=_target(), ablations=[
        apb.Ablation(node="blocks.0.attn.head.0")]), "ablations.0.positions", SIZE),
    ("LogitLens", lambda s: apb.LogitLensRequest(input=_input()), "positions", SIZE),
    ("LogitLens", lambda s: apb.LogitLensRequest(input=_input()), "top_k", SIZE),
    ("AttentionPattern", lambda s: apb.AttentionPatternRequest(input=_input()), "layer", SIZE),
    ("AttentionPattern", lambda s: apb.AttentionPatternRequest(input=_input()), "heads", SIZE),
    ("InputAttribution", lambda s: apb.InputAttributionRequest(input=_input(), target=_target()), "steps", SIZE),
    ("InputAttribution", lambda s: apb.InputAttributionRequest(input=_input(), target=_target()), "max_steps", SIZE),
    ("InputAttribution", lambda s: apb.InputAttributionRequest(input=_input(), target=_target()), "tolerance", SIZE),
    ("InputAttribution", lambda s: apb.InputAttributionRequest(input=_input(), target=_target()), "baseline_token_id", SIZE),
    ("PatchSweep", lambda s: apb.PatchSweepRequest(clean=_input(), corrupted=_input(), target=_target(),
                                                   kind=apb.SWEEP_RESID_PRE), "layers", SIZE),
    ("PatchSweep", lambda s: apb.PatchSweepRequest(clean=_input(), corrupted=_input(), target=_target(),
                                                   kind=apb.SWEEP_RESID_PRE, per_position=True), "positions", SIZE),
    ("PatchSweep", lambda s: apb.PatchSweepRequest(clean=_input(), corrupted=_input(), target=_target(),
                                                   kind=apb.SWEEP_RESID_PRE), "max_batch", SIZE),
    ("PatchSweep", lambda s: apb.PatchSweepRequest(clean=_input(), corrupted=_input(), target=_target(),
                                                   kind=apb.SWEEP_HEAD_OUT, method=apb.SWEEP_ATTRIBUTION), "verify_top_k", SIZE),
    ("ActivationRecords", lambda s: apb.ActivationRecordsRequest(unit="blocks.1.attn.head.0"), "n_top", SIZE),
    ("ActivationRecords", lambda s: apb.ActivationRecordsRequest(unit="blocks.1.attn.head.0"), "n_random", SIZE),
    ("ActivationRecords", lambda s: apb.ActivationRecordsRequest(unit="blocks.1.attn.head.0"), "window", SIZE),
    ("ActivationRecords", lambda s: apb.ActivationRecordsRequest(unit="blocks.1.attn.head.0"), "batch", SIZE),
    ("Explain", lambda s: apb.ExplainRequest(unit="blocks.1.attn.head.0"), "n_top", SIZE),
    ("Explain", lambda s: apb.ExplainRequest(unit="blocks.1.attn.head.0"), "window", SIZE),
    ("Circuit", lambda s: apb.CircuitRequest(clean=_input(), corrupted=_other(), target=_target()), "verify_top_k", SIZE),
    ("Circuit", lambda s: apb.CircuitRequest(clean=_input(), corrupted=_other(), target=_target()), "fraction", SIZE),
    ("Circuit", lambda s: apb.CircuitRequest(clean=_input(), corrupted=_other(), target=_target()), "max_edges", SIZE),
    ("InformationFlow", lambda s: apb.InformationFlowRequest(input=_input()), "position", SIZE),
    ("InformationFlow", lambda s: apb.InformationFlowRequest(input=_input()), "threshold", SIZE),
]
TABLE = [row for row in TABLE if row[2] is not None]
# where the message names the field by its meaning ("token id 9223372036854775807 is outside the vocabulary")
WORDS = {"ids": "token id", "token_ids": "token id", "distractor_ids": "token id", "baseline_token_id": "token id",
         "stop_token_ids": "stop_token_ids", "positions": "position", "key_position": "position", "heads": "head",
         "layers": "layer", "first": "token range"}
STREAMS = {"ReadTensor", "PatchSweep", "ActivationRecords", "Circuit", "Events"}
ANALYSES = {m.name for m in apb.DESCRIPTOR.services_by_name["Analysis"].methods}


def _field(msg, path: str):
    """The message holding the last part of `path`, and that part's descriptor."""
    *parents, last = path.split(".")
    for p in parents:
        msg = msg[int(p)] if p.isdigit() else getattr(msg, p)
    return msg, msg.DESCRIPTOR.fields_by_name[last]


def _extremes(fd) -> tuple:
    t = fd.type
    if t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        return DOUBLES
    if t in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
        return INT64
    return INT32


def _set(msg, fd, value) -> None:
    if getattr(fd, "is_repeated", False) or getattr(fd, "label", 0) == 3:
        del getattr(msg, fd.name)[:]
        getattr(msg, fd.name).append(value)
    else:
        setattr(msg, fd.name, value)


@pytest.fixture(scope="module")
def hostile():
    with hostile_server("--model", "induction", "--max-sessions", "1000", limit_gib=3.0) as srv:
        channel = grpc.insecure_channel(srv.address)
        yield srv, debugger_pb2_grpc.DebuggerStub(channel), analysis_pb2_grpc.AnalysisStub(channel)
        channel.close()


def _call(stub, rpc: str, request, metadata, timeout: float = 30.0):
    fn = getattr(stub, rpc)
    if rpc in STREAMS:
        return list(fn(request, timeout=timeout, metadata=metadata))
    return fn(request, timeout=timeout, metadata=metadata)


def _session(dbg) -> tuple[str, tuple]:
    """A fresh session with a finished run, and the metadata that names its owner."""
    r = dbg.CreateSession(pb.CreateSessionRequest(), timeout=30)
    md = (("tdb-session-secret", r.session_secret),)
    dbg.Launch(pb.LaunchRequest(session_id=r.session_id, token_ids=[pb.TokenIds(ids=IDS)], wait=True), timeout=30,
               metadata=md)
    return r.session_id, md


CASES = [(rpc, build, path, kind, v) for rpc, build, path, kind in TABLE
         for v in _extremes(_field(build(""), path)[1])]


@pytest.mark.parametrize("rpc, build, path, kind, value", CASES,
                         ids=[f"{c[0]}.{c[2]}={c[4]}" for c in CASES])
def test_an_extreme_number_is_answered_at_once_never_internal(hostile, rpc, build, path, kind, value):
    srv, dbg, ana = hostile
    sid, md = _session(dbg)
    request = build(sid)
    msg, fd = _field(request, path)
    _set(msg, fd, value)
    t0 = time.monotonic()
    try:
        _call(ana if rpc in ANALYSES else dbg, rpc, request, md)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
    took = time.monotonic() - t0
    dbg.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=30, metadata=md)
    assert srv.alive(), f"{rpc}.{path}={value} killed the server"
    assert took < 20, f"{rpc}.{path}={value} took {took:.1f}s"
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED), details
    if kind == SIZE:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert fd.name in details or WORDS.get(fd.name, fd.name) in details, details
    elif kind == REF:
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED,
                        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), (code, details)


def test_the_server_stays_small_after_the_table(hostile):
    srv, dbg, _ = hostile
    print(f"\nnumeric bounds: {len(CASES)} cases; the server's peak RSS {srv.peak_rss_mib():.0f} MiB")
    assert srv.alive() and srv.peak_rss_mib() < 2000
    dbg.Initialize(pb.InitializeRequest(), timeout=10)
