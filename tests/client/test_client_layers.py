"""The client's rooms: one protobuf edge (serde), enum spellings read from the proto descriptors, result
types that never see a message, names.py for syntax only, and no import cycle or hidden import."""

import ast
from pathlib import Path

import numpy as np
import pytest

from tdb.v1 import analysis_pb2 as apb, debugger_pb2 as pb

from tdb_client import Ablation, Breakpoint, Target, Trace, _enums, _wire, names, serde
from tdb_client.results import SweepChunk, SweepStream

CLIENT = Path(__file__).resolve().parents[2] / "tdb_client"
OWN = sorted(p for p in CLIENT.glob("*.py"))               # dap/ is its own package
PROTOBUF = {"serde.py", "_enums.py", "_wire.py", "analysis.py", "client.py"}   # analysis, client: requests only
GRPC = {"errors.py", "_rpc.py", "analysis.py", "client.py"}


def _imports(path: Path) -> list[tuple[ast.AST, str]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.append((node, "." * node.level + (node.module or "")))
        elif isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names]
    return found


def test_no_import_hidden_in_a_function():
    for path in OWN:
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            hidden = [m for n, m in ((n, getattr(n, "module", None)) for n in ast.walk(fn))
                      if isinstance(n, ast.ImportFrom) and n.level > 0]
            assert not hidden, f"{path.name}:{fn.name} imports {hidden} inside a function"


def test_only_the_edges_import_protobuf_and_grpc():
    for path in OWN:
        mods = [m for _, m in _imports(path)]
        if path.name not in PROTOBUF:
            assert not any(m.startswith(("tdb.v1", "google.protobuf")) for m in mods), path.name
        if path.name not in GRPC:
            assert not any(m.split(".")[0] == "grpc" for m in mods), path.name


def test_client_modules_form_no_cycle():
    graph = {}
    for path in OWN:
        deps = set()
        for node, mod in _imports(path):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {mod[1:]} if mod[1:] else {a.name for a in node.names}
        graph[path.stem] = {d for d in deps if (CLIENT / f"{d}.py").exists()}
    done = set()

    def visit(m, stack):
        assert m not in stack, " -> ".join([*stack, m])
        if m in done:
            return
        for d in graph.get(m, ()):
            visit(d, [*stack, m])
        done.add(m)

    for m in graph:
        visit(m, [])


def test_enum_spellings_are_the_descriptors():
    assert _enums.ABLATION_METHOD == {"zero": apb.ABLATION_ZERO, "mean": apb.ABLATION_MEAN,
                                      "resample": apb.ABLATION_RESAMPLE}
    assert _enums.SWEEP_KIND["head_out"] == apb.SWEEP_HEAD_OUT and len(_enums.SWEEP_KIND) == 9
    assert _enums.METRICS == ("activation", "write_norm", "direct_effect", "total_effect")
    assert _enums.TARGET_KIND[""] == apb.TARGET_KIND_UNSPECIFIED
    assert _enums.RUN_STATE_NAMES[pb.PAUSED] == "paused" and _enums.RUN_STATE_NAMES[0] == "unknown"
    assert _enums.PATCH_OP["copy"] == _enums.PATCH_OP["copy_from_run"] == pb.COPY_FROM_RUN
    assert _enums.STEP_KIND == {"into": pb.STEP_INTO, "over": pb.STEP_OVER, "out": pb.STEP_OUT, "token": pb.STEP_TOKEN}
    for table in (_enums.NODE_TYPE, _enums.HEAD_PART, _enums.INPUT_ATTRIBUTION, _enums.CIRCUIT_ABLATION):
        assert table and all(k == k.lower() for k in table)


def test_requests_to_proto():
    msg = serde.target_to_proto(Target([" Darcy", 7], " Bingley", position=-1))
    assert (list(msg.tokens), list(msg.token_ids), list(msg.distractors), msg.position) == \
        ([" Darcy"], [7], [" Bingley"], -1)
    assert serde.target_to_proto(" Darcy").tokens == [" Darcy"]
    with pytest.raises(ValueError, match="target kind must be one of"):
        serde.target_to_proto(Target(" x", kind="nope"))
    with pytest.raises(TypeError):
        serde.target_to_proto(1.5)
    assert serde.trace_to_proto(Trace("blocks.1.attn.head.2", "qk", 3, 1)).part == apb.HEAD_PART_QK
    assert serde.ablation_to_proto(Ablation("blocks.0.mlp", "mean", (1, 2))).method == apb.ABLATION_MEAN
    assert serde.breakpoint_to_proto(Breakpoint("embed", when="before", tokens=(1, 2))).when == pb.BEFORE
    with pytest.raises(ValueError, match="when must be 'after' or 'before'"):
        serde.breakpoint_to_proto(Breakpoint("embed", when="during"))
    req = serde.patch_to_proto("s", "blocks.0.attn.out", "scale", 2, scalar=0.0, positions=[-1], heads=(), neurons=(),
                               batch=(), source_run_id="", mean_over="", tokens=())
    assert (req.op, req.scalar, list(req.selector.positions)) == (pb.SCALE, 2.0, [-1])
    with pytest.raises(ValueError, match="op must be one of"):
        serde.patch_to_proto("s", "x", "swap", None, scalar=0.0, positions=(), heads=(), neurons=(), batch=(),
                             source_run_id="", mean_over="", tokens=())


def test_sweep_stream_merges_converted_chunks():
    header = apb.PatchSweepChunk(header=apb.PatchSweepHeader(kind=apb.SWEEP_HEAD_OUT, site="blocks.*.attn.z",
                                                             axes=[apb.SweepAxis(name="layer", values=[0, 1])],
                                                             notes=["n"]))
    values = apb.PatchSweepChunk()
    values.values.indices.CopyFrom(_wire.to_wire(np.array([1], np.int32)))
    values.values.values.CopyFrom(_wire.to_wire(np.array([0.5], np.float32)))
    values.values.normalized.CopyFrom(_wire.to_wire(np.array([0.25], np.float32)))
    done = apb.PatchSweepChunk()
    done.summary.chunks = 1
    messages = [serde.sweep_message_from_proto(m) for m in (header, values, done)]
    assert isinstance(messages[1], SweepChunk) and messages[1].indices.dtype == np.int64
    stream = SweepStream(iter(messages), cancel=lambda: None)
    result = stream.wait()
    assert result.kind == "head_out" and result.complete and result.notes == ("n",)
    assert np.isnan(result.values[0]) and result.values[1] == 0.5 and result.normalized[1] == 0.25


def test_names_are_syntax_only():
    assert names.split_unit(" blocks.1.attn.head.2 ") == ("head", 1, 2)
    assert names.split_unit("blocks.0.mlp.neuron.17") == ("neuron", 0, 17)
    for bad in ("blocks.1.attn.head", "blocks.x.attn.head.2", "blocks.1.attn.z", "blocks.1.attn.head.2.3",
                "blocks.1.mlp.head.2", "blocks.1.attn.head.²"):
        assert names.split_unit(bad) is None, bad
    assert names.is_head("blocks.3.attn.head.0") and not names.is_head("blocks.3.mlp")
    head, latent = _enums.NODE_TYPE["head_pair"], _enums.NODE_TYPE["sae_latent"]
    assert names.node_name(head, 1, 2, 0) == "blocks.1.attn.head.2"
    assert names.node_name(latent, 1, 42, 11) == "blocks.1.resid_post.sae.latent.42"
    assert names.node_name(latent, 1, 42, 99) == "?"
    assert names.node_name(_enums.NODE_TYPE["attn_bias"], 3, 0) == "blocks.3.attn.bias"
    assert names.node_name(_enums.NODE_TYPE["constant"], -1, 0) == "final_norm.bias+unembed.bias"

