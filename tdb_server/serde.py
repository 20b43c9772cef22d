"""The Debugger's protobuf edge: every conversion between `tdb.v1` messages and the engine's own types.

`*_from_proto` turns a request (or part of one) into an engine type, `*_to_proto` turns an engine reply,
state or event into a message. Enum numbers come from the proto descriptors by name (RunState.PAUSED
<-> pb.PAUSED, "into" <-> pb.STEP_INTO), never from a table typed twice. Tensors cross as raw
little-endian bytes (wire.py). The servicer (servicer.py) calls these and the engine never sees a
message.
"""

from __future__ import annotations

from typing import Any

import torch

from tdb.v1 import common_pb2, debugger_pb2 as pb

from . import paths, shm, wire
from .analyses import analysis_names
from .engine import expr
from .engine.breakpoints import BreakpointSpec
from .engine.reads import Chunk, Item
from .engine.events import (Continued, Event, Invalidated, Output, RunExited, RunStarted, Terminated,
                            TokenGenerated)
from .engine.types import (BreakpointRequest, GenOptions, LaunchRequest, PatchInfo, PatchRequest, RunResult, RunState,
                           RunStatus, Scope, StackFrame, StopInfo, Variable, When)
from .errors import InvalidArgument
from .model.interventions import OPS, Selector
from .model.sites import site_dims, site_kind, site_layer

_RUN_STATE = {s: pb.RunState.Value(s.name) for s in RunState}
_WHEN = {w: pb.BreakWhen.Value(w.name) for w in When}
_WHEN_BACK = {v: w for w, v in _WHEN.items()}
_STEP_KIND = {v: pb.StepKind.Name(v).removeprefix("STEP_").lower() for v in pb.StepKind.values()}
_PATCH_OP = {v: pb.PatchOp.Name(v).lower() for v in pb.PatchOp.values()}
_EVENT_FIELD = {StopInfo: "stopped", Continued: "continued", RunStarted: "run_started", RunExited: "run_exited",
                Output: "output", Terminated: "terminated", Invalidated: "invalidated", TokenGenerated: "token"}


# -- handshake ---------------------------------------------------------------------------------------

def capabilities(analyses: list[str] | None = None, limits: dict[str, float] | None = None) -> common_pb2.Capabilities:
    flags = {
        "supportsConditionalBreakpoints": True, "supportsHitConditionalBreakpoints": True,
        "supportsLogPoints": True, "supportsBreakBefore": True, "supportsStepInto": True,
        "supportsStepOver": True, "supportsStepOut": True, "supportsPause": True, "supportsTerminate": True,
        "supportsPatching": True, "supportsPatchBeforeRun": True, "supportsCopyFromRun": True,
        "supportsEvaluate": True, "supportsReadTensor": True, "supportsEventReplay": True,
        "supportsPollEvents": True, "supportsBatchLaunch": True, "supportsUnitBreakpoints": True,
        "supportsGeneration": True, "supportsTokenStepping": True, "supportsSharedMemoryReads": shm.available(),
        "supportsBatchReads": True,
    }
    analyses = analysis_names() if analyses is None else analyses
    return common_pb2.Capabilities(flags=flags, analyses=analyses, expression_functions=expr.FUNCTION_NAMES,
                                   patch_ops=list(OPS), limits=limits or {})


def model_info_to_proto(adapter: Any) -> common_pb2.ModelInfo:
    info = adapter.info
    verified = set(adapter.verified_sites)
    sites = []
    for name in info.sites:
        kind, layer = site_kind(name), site_layer(name)
        sites.append(common_pb2.SiteInfo(name=name, dims=site_dims(kind), verified=name in verified, kind=kind,
                                         layer=-1 if layer is None else layer))
    return common_pb2.ModelInfo(
        name=info.name, architecture=info.architecture, n_layers=info.n_layers, n_heads=info.n_heads,
        n_kv_heads=info.n_kv_heads, d_model=info.d_model, d_head=info.d_head, d_mlp=info.d_mlp,
        vocab_size=info.vocab_size, dtype=info.dtype, device=info.device, sites=sites,
        parallel_blocks=info.parallel_blocks, has_tokenizer=info.has_tokenizer,
        source=str(getattr(adapter, "source", "") or ""), max_positions=adapter.max_positions,
        unk_token_id=_unk_token_id(adapter), demo=_demo(adapter))


def _unk_token_id(adapter: Any) -> int | None:
    unk = getattr(adapter.tokenizer, "unk_token_id", None) if adapter.tokenizer is not None else None
    return int(unk) if isinstance(unk, int) else None


def _demo(adapter: Any) -> common_pb2.Demo | None:
    folder = getattr(adapter, "model_dir", None)
    found = paths.demo(str(folder)) if folder is not None else None
    return common_pb2.Demo(prompt=found[0], answer=found[1], distractor=found[2]) if found else None


# -- requests ----------------------------------------------------------------------------------------

def breakpoints_from_proto(msgs: Any) -> list[BreakpointRequest]:
    out = []
    for i, bp in enumerate(msgs, start=1):
        when = _WHEN_BACK.get(bp.when)
        if when is None:
            raise InvalidArgument(f"breakpoint {i}: 'when' must be AFTER or BEFORE", reason="BAD_BREAKPOINT")
        tokens = (bp.tokens.first, bp.tokens.last) if bp.HasField("tokens") else None
        out.append(BreakpointRequest(site=bp.site, when=when, condition=bp.condition, hit_condition=bp.hit_condition,
                                     log_message=bp.log_message, tokens=tokens))
    return out


def breakpoint_status_to_proto(b: BreakpointSpec) -> pb.BreakpointStatus:
    return pb.BreakpointStatus(id=b.id, verified=b.verified, message=b.message, sites=b.sites)


def launch_from_proto(msg: pb.LaunchRequest) -> LaunchRequest:
    gen = None
    if msg.HasField("generate") and msg.generate.max_new_tokens != 0:
        g = msg.generate
        gen = GenOptions(max_new_tokens=g.max_new_tokens, sample=g.sample, temperature=g.temperature or 1.0,
                         top_k=g.top_k, seed=g.seed, stop_at_tokens=g.stop_at_tokens,
                         stop_token_ids=tuple(g.stop_token_ids))
    return LaunchRequest(prompts=list(msg.prompts), token_ids=[list(t.ids) for t in msg.token_ids],
                         prepend_bos=msg.prepend_bos, capture=list(msg.capture), stop_on_entry=msg.stop_on_entry,
                         gen=gen)


def step_kind_from_proto(kind: int) -> str:
    """'into', 'over', 'out' or 'token'."""
    name = _STEP_KIND.get(kind)
    if name is None:
        raise InvalidArgument(f"unknown step kind {kind}: STEP_INTO, STEP_OVER or STEP_OUT", reason="BAD_STEP_KIND")
    return name


def patch_from_proto(msg: pb.PatchRequest, max_value_bytes: int) -> PatchRequest:
    op = _PATCH_OP.get(msg.op)
    if op is None:
        raise InvalidArgument(f"unknown patch op {msg.op}", reason="BAD_PATCH_OP")
    sel = msg.selector
    selector = Selector(batch=list(sel.batch), positions=list(sel.positions), heads=list(sel.heads),
                        neurons=list(sel.neurons))
    if msg.HasField("value") and len(msg.value.data) > max_value_bytes:
        raise InvalidArgument(f"patch value of {len(msg.value.data)} bytes exceeds the server's limit "
                              f"({max_value_bytes})", reason="PATCH_TOO_LARGE")
    value = wire.from_wire(msg.value) if msg.HasField("value") else None
    return PatchRequest(name=msg.site, op=op, selector=selector, value=value, scalar=msg.scalar,
                        source_run_id=msg.source_run_id, mean_over=msg.mean_over, tokens=tuple(msg.tokens),
                        run_id=msg.run_id[:64])


# -- runs --------------------------------------------------------------------------------------------

def stop_to_proto(s: StopInfo) -> pb.StopInfo:
    msg = pb.StopInfo(site=s.site, when=_WHEN[s.when], reason=s.reason, hit_breakpoint_ids=s.hit_breakpoint_ids,
                      description=s.description, stop_id=s.stop_id, exception=s.exception, token=s.token)
    if s.value is not None:
        msg.value.CopyFrom(wire.summary_to_proto(s.value))
    return msg


def result_to_proto(r: RunResult) -> pb.RunResult:
    msg = pb.RunResult(run_id=r.run_id, state=_RUN_STATE[r.state], exception=r.exception, lengths=r.lengths)
    for toks in r.generated:
        msg.generated.add(ids=toks)
    msg.generated_text.extend(r.generated_text)
    for ids in r.input_ids:
        msg.input_ids.add(ids=ids)
    for top in r.top:
        tt = msg.top.add(batch_index=top.batch_index, position=top.position)
        for t in top.tokens:
            tt.tokens.add(token_id=t.token_id, text=t.text, logit=t.logit, prob=t.prob)
    if r.last_logits is not None:
        msg.last_logits.CopyFrom(wire.to_wire(r.last_logits))
    return msg


def _patch_info_to_proto(p: PatchInfo) -> pb.PatchInfo:
    return pb.PatchInfo(patch_id=p.patch_id, site=p.site, op=p.op, scope=p.scope, applied=p.applied)


def status_to_proto(s: RunStatus) -> pb.RunStatus:
    msg = pb.RunStatus(session_id=s.session_id, run_id=s.run_id, state=_RUN_STATE[s.state],
                       patches=[_patch_info_to_proto(p) for p in s.patches], warnings=s.warnings)
    if s.stop is not None:
        msg.stop.CopyFrom(stop_to_proto(s.stop))
    if s.result is not None:
        msg.result.CopyFrom(result_to_proto(s.result))
    return msg


# -- events ------------------------------------------------------------------------------------------

def event_to_proto(ev: Event) -> pb.Event:
    body = ev.body
    field = _EVENT_FIELD[type(body)]
    if isinstance(body, StopInfo):
        part: Any = stop_to_proto(body)
    elif isinstance(body, RunExited):
        part = pb.RunExited(result=result_to_proto(body.result))
    elif isinstance(body, TokenGenerated):
        part = pb.TokenGenerated(step=body.step, token_ids=body.token_ids, texts=body.texts, appended=body.appended)
    else:
        part = getattr(pb, type(body).__name__)(**vars(body))
    return pb.Event(seq=ev.seq, time=ev.time, run_id=ev.run_id, **{field: part})


# -- inspection --------------------------------------------------------------------------------------

def frame_to_proto(f: StackFrame) -> pb.StackFrame:
    return pb.StackFrame(id=f.id, name=f.name, site=f.site)


def scope_to_proto(s: Scope) -> pb.Scope:
    return pb.Scope(name=s.name, variables_reference=s.variables_reference, named_variables=s.named_variables)


def variable_to_proto(v: Variable) -> pb.Variable:
    msg = pb.Variable(name=v.name, value=v.value, type=v.type, variables_reference=v.variables_reference,
                      evaluate_name=v.evaluate_name, indexed_variables=v.indexed_variables)
    if v.summary is not None:
        msg.summary.CopyFrom(wire.summary_to_proto(v.summary))
    return msg


def read_dtype_from_proto(dtype: int) -> torch.dtype | None:
    """A read's DType: the torch dtype to convert to, or None (as stored)."""
    return wire.torch_dtype(dtype) if dtype else None


def check_read_dtypes(items: list[Item], dtype: torch.dtype | None) -> None:
    """UNSUPPORTED_DTYPE before anything is sent if a tensor's dtype has no wire form."""
    for _, t in items:
        wire.wire_dtype(dtype or t.dtype)


def chunk_to_proto(c: Chunk) -> pb.TensorChunk:
    msg = pb.TensorChunk(offset=c.offset, data=c.data, last=c.last, index=c.index, shared_memory_path=c.path)
    if c.first:
        msg.dtype, msg.total_bytes, msg.name = wire.wire_dtype(c.dtype), c.total_bytes, c.name
        msg.shape.extend(c.shape)
    if c.last:
        msg.crc32 = c.crc32
    return msg


def evaluate_to_proto(value: Any, limit: int, decode: Any, vocab_size: int) -> pb.EvaluateResponse:
    """An expression's value: its text, and a summary and the tensor itself (up to `limit` elements);
    top-k results with their tokens when they were taken over the vocabulary (over positions or heads,
    their indices are no token ids)."""
    resp = pb.EvaluateResponse(result=expr.render(value))
    if isinstance(value, expr.TopK):
        if value.over == vocab_size:
            resp.tokens.extend(decode([int(i) for i in value.indices.flatten().tolist()]))
        resp.value.CopyFrom(wire.to_wire(torch.stack([value.values.float(), value.indices.float()])))
        return resp
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        resp.tokens.extend(value)
        return resp
    if isinstance(value, (bool, int, float)):
        value = torch.tensor(value)
    if isinstance(value, torch.Tensor):
        resp.summary.CopyFrom(wire.summarize(value))
        if value.numel() <= limit:
            resp.value.CopyFrom(wire.to_wire(value))
    return resp
