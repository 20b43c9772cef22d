"""The Analysis gRPC servicer: one method per RPC, translating protos <-> tdb_server.analyses calls.

Errors go through the Debugger servicer's `_rpc` decorator (the one conversion point). Every request
field is validated here (shape of the request) or in the analysis (meaning), with INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
from typing import Any

import grpc
import torch

from tdb.v1 import analysis_pb2 as pb, analysis_pb2_grpc

from . import wire
from .analyses import ablation, input_attribution, lens, node_table as nt
from .analyses.inputs import Prompt, Target, TargetSpec, decode, encode, resolve_target
from .errors import Cancelled, InvalidArgument
from .engine.scheduler import scheduler_for
from .servicer import _rpc


def _on_device(fn: Any) -> Any:
    """Run an analysis in its turn on the device (fair with debug runs and other analyses)."""
    @functools.wraps(fn)
    def wrapped(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        with scheduler_for(self.adapter).turn():
            if not context.is_active():   # the client left while we waited
                raise Cancelled("the client cancelled the request")
            return fn(self, request, context)
    return wrapped

_KINDS = {pb.TARGET_KIND_UNSPECIFIED: "", pb.TARGET_LOGIT_DIFF: "logit_diff", pb.TARGET_LOGIT: "logit",
          pb.TARGET_LOGPROB: "logprob", pb.TARGET_DIRECTION: "direction"}
_KIND_ENUM = {v: k for k, v in _KINDS.items() if v}
_METRICS = {pb.METRIC_ACTIVATION: "activation", pb.METRIC_WRITE_NORM: "write_norm",
            pb.METRIC_DIRECT_EFFECT: "direct_effect", pb.METRIC_TOTAL_EFFECT: "total_effect"}
_PARTS = {pb.HEAD_PART_UNSPECIFIED: "output", pb.HEAD_PART_OUTPUT: "output", pb.HEAD_PART_Q: "q",
          pb.HEAD_PART_K: "k", pb.HEAD_PART_QK: "qk", pb.HEAD_PART_V: "v"}
_ABLATIONS = {pb.ABLATION_METHOD_UNSPECIFIED: "zero", pb.ABLATION_ZERO: "zero", pb.ABLATION_MEAN: "mean",
              pb.ABLATION_RESAMPLE: "resample"}
DEFAULT_TOP_K = 20
MAX_TOP_K = 100_000


def _enum(value: int, table: dict, what: str) -> Any:
    if value not in table:
        raise InvalidArgument(f"unknown {what} {value}", reason="BAD_ENUM")
    return table[value]


def _prompt(msg: pb.Input) -> Prompt:
    return Prompt(msg.prompt, tuple(msg.token_ids), msg.prepend_bos)


def _ids(adapter: Any, msg: pb.Input, what: str = "input") -> list[int]:
    return encode(adapter, _prompt(msg), what)


def _target_spec(msg: pb.Target) -> TargetSpec:
    direction = wire.from_wire(msg.direction).float() if msg.HasField("direction") else None
    return TargetSpec(_enum(msg.kind, _KINDS, "target kind"), tuple(msg.tokens), tuple(msg.token_ids),
                      tuple(msg.distractors), tuple(msg.distractor_ids),
                      msg.position if msg.HasField("position") else -1, direction)


def _target(adapter: Any, msg: pb.Target, ids: list[int]) -> tuple[Target, list[int]]:
    return resolve_target(adapter, _target_spec(msg), ids)


def _resolved(t: Target) -> pb.ResolvedTarget:
    return pb.ResolvedTarget(description=t.description, kind=_KIND_ENUM[t.kind], token_ids=t.token_ids,
                             distractor_ids=t.distractor_ids, position=t.position, value=t.value, exact=t.exact,
                             notes=t.notes, appended_ids=t.appended_ids)


def _top_k(k: int) -> int:
    if k < 0 or k > MAX_TOP_K:
        raise InvalidArgument(f"top_k must be in 0..{MAX_TOP_K} (0 = {DEFAULT_TOP_K})", reason="OUT_OF_RANGE")
    return k or DEFAULT_TOP_K


def _node_types(values: Any) -> set[int] | None:
    valid = set(nt.NODE_TYPES.values())
    bad = [v for v in values if v not in valid]
    if bad:
        raise InvalidArgument(f"unknown node type {bad[0]}", reason="BAD_ENUM")
    return set(values) or None


def _objective(adapter: Any, request: Any, ids: list[int], side: str = "") -> tuple[Any, list[int], str]:
    """(objective, ids to run, default rank metric) from a request's `objective` oneof."""
    which = request.WhichOneof("objective")
    if which == "target":
        target, run_ids = _target(adapter, request.target, ids)
        return nt.TargetObjective(target), run_ids, "direct_effect"
    if which == "trace":
        tr = request.trace
        obj = nt.trace_objective(adapter, tr.node, _enum(tr.part, _PARTS, "head part"),
                                 tr.position if tr.HasField("position") else -1,
                                 tr.key_position if tr.HasField("key_position") else None, len(ids))
        return obj, ids, "total_effect"
    raise InvalidArgument(f"give a target or a node to trace{side}", reason="NO_OBJECTIVE")


def _table(t: nt.NodeTable) -> pb.NodeTable:
    return pb.NodeTable(ids=wire.to_wire(t.ids.contiguous()), metrics=wire.to_wire(t.metrics.contiguous()))


def _paired(ids: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> pb.PairedNodeTable:
    return pb.PairedNodeTable(ids=wire.to_wire(ids.contiguous()), left=wire.to_wire(left.contiguous()),
                              right=wire.to_wire(right.contiguous()))


def _summary(adapter: Any, objective: Any, result: nt.NodeTableResult) -> pb.ResolvedTarget:
    if isinstance(objective, nt.TargetObjective):
        objective.target.value = result.value
        return _resolved(objective.target)
    return pb.ResolvedTarget(description=result.description, position=result.position, value=result.value,
                             exact=False, notes=result.notes)


class AnalysisServicer(analysis_pb2_grpc.AnalysisServicer):
    def __init__(self, adapter: Any):
        self.adapter = adapter

    def _rank(self, metric: int, default: str) -> str:
        return default if metric == pb.METRIC_UNSPECIFIED else _enum(metric, _METRICS, "metric")

    @_rpc
    @_on_device
    def NodeTable(self, request: pb.NodeTableRequest, context: grpc.ServicerContext) -> pb.NodeTableResponse:
        a = self.adapter
        ids = _ids(a, request.input)
        k = _top_k(request.top_k)
        types = _node_types(request.node_types)
        objective, run_ids, default = _objective(a, request, ids)
        metric = self._rank(request.rank_by, default)
        result = nt.compute_node_table(a, run_ids, objective, node_types=types)
        top, bottom = nt.rank(result.table, metric, k)
        resp = pb.NodeTableResponse(tokens=decode(a, run_ids), token_ids=run_ids, target=_summary(a, objective, result),
                                    direct_effect_sum=result.direct_effect_sum, top=_table(top), bottom=_table(bottom),
                                    rank_by={v: k_ for k_, v in _METRICS.items()}[metric])
        if request.all_rows:
            resp.all.CopyFrom(_table(result.table))
        return resp

    @_rpc
    @_on_device
    def CompareNodeTables(self, request: pb.CompareNodeTablesRequest,
                          context: grpc.ServicerContext) -> pb.CompareNodeTablesResponse:
        a = self.adapter
        left_ids, right_ids = _ids(a, request.left, "left"), _ids(a, request.right, "right")
        k = _top_k(request.top_k)
        types = _node_types(request.node_types)
        lobj, lrun, default = _objective(a, request, left_ids)
        robj, rrun, _ = _objective(a, request, right_ids)
        metric = self._rank(request.rank_by, default)
        cmp = nt.compare(a, lrun, rrun, lobj, robj, node_types=types)
        ids, left, right = cmp.left.table.ids, cmp.left.table.metrics, cmp.right.table.metrics
        col = nt.METRICS.index(metric)
        diff = left[:, col] - right[:, col]
        kk = min(k, diff.numel())
        top, bottom = torch.topk(diff, kk).indices, torch.topk(-diff, kk).indices
        resp = pb.CompareNodeTablesResponse(
            left_tokens=decode(a, lrun), right_tokens=decode(a, rrun),
            left_target=_summary(a, lobj, cmp.left), right_target=_summary(a, robj, cmp.right),
            top=_paired(ids[top], left[top], right[top]), bottom=_paired(ids[bottom], left[bottom], right[bottom]),
            rank_by={v: k_ for k_, v in _METRICS.items()}[metric])
        if request.all_rows:
            resp.all.CopyFrom(_paired(ids, left, right))
        return resp

    @_rpc
    @_on_device
    def Ablate(self, request: pb.AblateRequest, context: grpc.ServicerContext) -> pb.AblateResponse:
        a = self.adapter
        ids = _ids(a, request.input)
        if not request.HasField("target"):
            raise InvalidArgument("an ablation needs a target", reason="NO_OBJECTIVE")
        target, run_ids = _target(a, request.target, ids)
        if target.appended_ids:
            raise InvalidArgument("ablations take single-token targets (or targets that differ in their first "
                                  "token)", reason="BAD_TARGET")
        specs = [ablation.AblationSpec(x.node, _enum(x.method, _ABLATIONS, "ablation method"), tuple(x.positions))
                 for x in request.ablations]
        reference = [_ids(a, r, f"reference {i}") for i, r in enumerate(request.reference)]
        source = _ids(a, request.source, "source") if request.HasField("source") else None
        before, outcomes = ablation.ablate(a, run_ids, target, specs, separately=request.separately,
                                           reference=reference, source=source)
        target.value = before
        return pb.AblateResponse(tokens=decode(a, run_ids), target=_resolved(target), before=before, results=[
            pb.AblationEffect(node=o.node, before=o.before, after=o.after, effect=o.effect) for o in outcomes])

    @_rpc
    @_on_device
    def LogitLens(self, request: pb.LogitLensRequest, context: grpc.ServicerContext) -> pb.LogitLensResponse:
        a = self.adapter
        ids = _ids(a, request.input)
        target = None
        if request.HasField("target"):
            target, ids2 = _target(a, request.target, ids)
            if ids2 != ids:
                raise InvalidArgument("the logit lens takes targets that differ in their first token",
                                      reason="BAD_TARGET")
        top_k = request.top_k or 5
        r = lens.logit_lens(a, ids, list(request.sites), list(request.positions), top_k, target)
        resp = pb.LogitLensResponse(tokens=decode(a, ids), sites=r.sites, positions=r.positions,
                                    top_ids=wire.to_wire(r.top_ids), top_logits=wire.to_wire(r.top_logits),
                                    top_probs=wire.to_wire(r.top_probs),
                                    top_tokens=decode(a, [int(i) for i in r.top_ids.flatten().tolist()]))
        if target is not None:
            resp.target_values.CopyFrom(wire.to_wire(r.target_values))
            pos = r.positions.index(target.position) if target.position in r.positions else None
            if pos is not None:
                target.value = float(r.target_values[-1, pos]) if r.sites[-1] == "final_norm" else target.value
            resp.target.CopyFrom(_resolved(target))
        return resp

    @_rpc
    @_on_device
    def AttentionPattern(self, request: pb.AttentionPatternRequest,
                         context: grpc.ServicerContext) -> pb.AttentionPatternResponse:
        a = self.adapter
        ids = _ids(a, request.input)
        heads = list(request.heads)
        pattern = lens.attention_pattern(a, ids, request.layer, heads)
        return pb.AttentionPatternResponse(tokens=decode(a, ids), heads=heads or list(range(a.info.n_heads)),
                                           pattern=wire.to_wire(pattern))

    @_rpc
    @_on_device
    def InputAttribution(self, request: pb.InputAttributionRequest,
                         context: grpc.ServicerContext) -> pb.InputAttributionResponse:
        a = self.adapter
        ids = _ids(a, request.input)
        if not request.HasField("target"):
            raise InvalidArgument("input attribution needs a target", reason="NO_OBJECTIVE")
        target, run_ids = _target(a, request.target, ids)
        methods = {_enum(m, {pb.INPUT_ATTRIBUTION_GRAD_X_INPUT: "gxi", pb.INPUT_ATTRIBUTION_INTEGRATED_GRADIENTS: "ig"},
                         "input attribution method") for m in request.methods} or {"gxi", "ig"}
        if request.steps < 0:
            raise InvalidArgument("steps must be >= 0 (0 = 32)", reason="OUT_OF_RANGE")
        r = input_attribution.input_attribution(a, run_ids, target, grad_x_input="gxi" in methods,
                                                integrated_gradients="ig" in methods, steps=request.steps or 32,
                                                baseline_token_id=request.baseline_token_id
                                                if request.HasField("baseline_token_id") else None)
        target.value = r.value
        resp = pb.InputAttributionResponse(tokens=decode(a, run_ids), target=_resolved(target),
                                           baseline_value=r.baseline_value, steps=r.steps)
        if r.grad_x_input is not None:
            resp.grad_x_input.CopyFrom(wire.to_wire(r.grad_x_input))
        if r.integrated_gradients is not None:
            resp.integrated_gradients.CopyFrom(wire.to_wire(r.integrated_gradients))
        return resp
