"""The Analysis gRPC servicer: one method per RPC, translating protos <-> tdb_server.analyses calls.

Errors go through the Debugger servicer's `_rpc` decorator (the one conversion point). Every request
field is validated here (shape of the request) or in the analysis (meaning), with INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Iterator

import grpc
import torch

from tdb.v1 import analysis_pb2 as pb, analysis_pb2_grpc

from . import bounds, wire
from .analyses import ablation, input_attribution, lens, node_table as nt, sweeps
from .analyses import circuits
from .analyses.inputs import Prompt, Target, TargetSpec, decode, encode, resolve_target
from .errors import Cancelled, InvalidArgument
from .files import FileAccess
from .limits import Limits
from .engine.scheduler import scheduler_for
from .sae import attach_bundled
from .sae.attribution import site_of_code
from .sae_servicer import SaeServicerMixin, explanations
from .servicer import _rpc, _rpc_stream


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
_SWEEP_KINDS = {pb.SWEEP_RESID_PRE: "resid_pre", pb.SWEEP_ATTN_OUT: "attn_out", pb.SWEEP_MLP_OUT: "mlp_out",
                pb.SWEEP_HEAD_OUT: "head_out", pb.SWEEP_HEAD_Q: "head_q", pb.SWEEP_HEAD_K: "head_k",
                pb.SWEEP_HEAD_V: "head_v", pb.SWEEP_HEAD_PATTERN: "head_pattern", pb.SWEEP_NEURON: "neuron"}
_SWEEP_DIRECTIONS = {pb.SWEEP_DIRECTION_UNSPECIFIED: "denoising", pb.SWEEP_DENOISING: "denoising",
                     pb.SWEEP_NOISING: "noising"}
_SWEEP_METHODS = {pb.SWEEP_METHOD_UNSPECIFIED: "exact", pb.SWEEP_EXACT: "exact", pb.SWEEP_ATTRIBUTION: "attribution"}
DEFAULT_TOP_K = 20
MAX_TOP_K = 100_000


def _enum(value: int, table: dict, what: str) -> Any:
    if value not in table:
        raise InvalidArgument(f"unknown {what} {value}", reason="BAD_ENUM")
    return table[value]


def _ablations(msgs: Any) -> list[ablation.AblationSpec]:
    return [ablation.AblationSpec(x.node, _enum(x.method, _ABLATIONS, "ablation method"), tuple(x.positions))
            for x in msgs]


def _prompt(msg: pb.Input) -> Prompt:
    return Prompt(msg.prompt, tuple(msg.token_ids), msg.prepend_bos)


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


def _node_names(adapter: Any, ids: torch.Tensor) -> list[str]:
    """Unit names of node-table rows ("" for rows that are not heads, neurons or latents)."""
    names = []
    for node_type, layer, index, _, key in ids.tolist():
        if node_type in (nt.HEAD, nt.HEAD_PAIR):
            names.append(f"blocks.{layer}.attn.head.{index}")
        elif node_type == nt.NEURON:
            names.append(f"blocks.{layer}.mlp.neuron.{index}")
        elif node_type == nt.SAE_LATENT:
            names.append(f"{site_of_code(layer, key)}.sae.latent.{index}")
        else:
            names.append("")
    return names


def _verification(v: nt.Verification) -> pb.NodeTableVerification:
    return pb.NodeTableVerification(ids=wire.to_wire(v.ids.contiguous()), estimate=wire.to_wire(v.estimate.contiguous()),
                                    exact=wire.to_wire(v.exact.contiguous()), value=v.value, spearman=v.spearman,
                                    pearson=v.pearson, max_abs_error=v.max_abs_error, notes=v.notes)


def _summary(adapter: Any, objective: Any, result: nt.NodeTableResult) -> pb.ResolvedTarget:
    if isinstance(objective, nt.TargetObjective):
        objective.target.value = result.value
        msg = _resolved(objective.target)
        msg.notes[:] = result.notes    # the target's notes and the table's (e.g. a prompt cut after the target)
        return msg
    return pb.ResolvedTarget(description=result.description, position=result.position, value=result.value,
                             exact=False, notes=result.notes)


class AnalysisServicer(SaeServicerMixin, analysis_pb2_grpc.AnalysisServicer):
    def __init__(self, adapter: Any, limits: Limits | None = None, files: FileAccess | None = None):
        self.adapter = adapter
        self.limits = limits or Limits()
        self.files = files or FileAccess.for_model(adapter)
        attach_bundled(adapter)   # SAEs shipped next to the model (<model>/saes/*/) are attached by default

    def _ids(self, msg: pb.Input, what: str = "input") -> list[int]:
        return encode(self.adapter, _prompt(msg), what, max_tokens=self.limits.max_prompt_tokens)

    def _rank(self, metric: int, default: str) -> str:
        return default if metric == pb.METRIC_UNSPECIFIED else _enum(metric, _METRICS, "metric")

    @_rpc
    @_on_device
    def NodeTable(self, request: pb.NodeTableRequest, context: grpc.ServicerContext) -> pb.NodeTableResponse:
        a = self.adapter
        ids = self._ids(request.input)
        k = _top_k(request.top_k)
        types = _node_types(request.node_types)
        objective, run_ids, default = _objective(a, request, ids)
        metric = self._rank(request.rank_by, default)
        result = nt.compute_node_table(a, run_ids, objective, node_types=types, ablations=_ablations(request.ablations),
                                       target_position_only=request.target_position_only,
                                       direct_only=request.direct_only, verify_top=request.verify_top)
        top, bottom = nt.rank(result.table, metric, k)
        run_ids = result.token_ids
        resp = pb.NodeTableResponse(tokens=decode(a, run_ids), token_ids=run_ids, target=_summary(a, objective, result),
                                    direct_effect_sum=result.direct_effect_sum, top=_table(top), bottom=_table(bottom),
                                    rank_by={v: k_ for k_, v in _METRICS.items()}[metric])
        for msg, t in ((resp.top, top), (resp.bottom, bottom)):   # each row's latest explanation, if any
            msg.explanations.extend(explanations(a, _node_names(a, t.ids)))
        if request.all_rows:
            resp.all.CopyFrom(_table(result.table))
        if result.verification is not None:
            resp.verification.CopyFrom(_verification(result.verification))
        return resp

    @_rpc
    @_on_device
    def CompareNodeTables(self, request: pb.CompareNodeTablesRequest,
                          context: grpc.ServicerContext) -> pb.CompareNodeTablesResponse:
        a = self.adapter
        left_ids, right_ids = self._ids(request.left, "left"), self._ids(request.right, "right")
        k = _top_k(request.top_k)
        types = _node_types(request.node_types)
        lobj, lrun, default = _objective(a, request, left_ids)
        robj, rrun, _ = _objective(a, request, right_ids)
        metric = self._rank(request.rank_by, default)
        cmp = nt.compare(a, lrun, rrun, lobj, robj, node_types=types, ablations=_ablations(request.ablations))
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
        ids = self._ids(request.input)
        if not request.HasField("target"):
            raise InvalidArgument("an ablation needs a target", reason="NO_OBJECTIVE")
        target, run_ids = _target(a, request.target, ids)
        if target.appended_ids:
            raise InvalidArgument("ablations take single-token targets (or targets that differ in their first "
                                  "token)", reason="BAD_TARGET")
        specs = _ablations(request.ablations)
        reference = [self._ids(r, f"reference {i}") for i, r in enumerate(request.reference)]
        source = self._ids(request.source, "source") if request.HasField("source") else None
        before, outcomes = ablation.ablate(a, run_ids, target, specs, separately=request.separately,
                                           reference=reference, source=source)
        target.value = before
        return pb.AblateResponse(tokens=decode(a, run_ids), target=_resolved(target), before=before, results=[
            pb.AblationEffect(node=o.node, before=o.before, after=o.after, effect=o.effect) for o in outcomes])

    @_rpc
    @_on_device
    def LogitLens(self, request: pb.LogitLensRequest, context: grpc.ServicerContext) -> pb.LogitLensResponse:
        a = self.adapter
        ids = self._ids(request.input)
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
        ids = self._ids(request.input)
        heads = list(request.heads)
        pattern = lens.attention_pattern(a, ids, request.layer, heads)
        return pb.AttentionPatternResponse(tokens=decode(a, ids), heads=heads or list(range(a.info.n_heads)),
                                           pattern=wire.to_wire(pattern))

    @_rpc
    @_on_device
    def InputAttribution(self, request: pb.InputAttributionRequest,
                         context: grpc.ServicerContext) -> pb.InputAttributionResponse:
        a = self.adapter
        ids = self._ids(request.input)
        if not request.HasField("target"):
            raise InvalidArgument("input attribution needs a target", reason="NO_OBJECTIVE")
        target, run_ids = _target(a, request.target, ids)
        methods = {_enum(m, {pb.INPUT_ATTRIBUTION_GRAD_X_INPUT: "gxi", pb.INPUT_ATTRIBUTION_INTEGRATED_GRADIENTS: "ig"},
                         "input attribution method") for m in request.methods} or {"gxi", "ig"}
        if request.steps < 0 or request.max_steps < 0:
            raise InvalidArgument("steps and max_steps must be >= 0 (0 = 32 and 1024)", reason="OUT_OF_RANGE")
        r = input_attribution.input_attribution(a, run_ids, target, grad_x_input="gxi" in methods,
                                                integrated_gradients="ig" in methods, steps=request.steps or 32,
                                                baseline_token_id=request.baseline_token_id
                                                if request.HasField("baseline_token_id") else None,
                                                tolerance=request.tolerance or input_attribution.TOLERANCE,
                                                max_steps=request.max_steps or input_attribution.MAX_STEPS)
        target.value = r.value
        resp = pb.InputAttributionResponse(tokens=decode(a, run_ids), target=_resolved(target),
                                           baseline_value=r.baseline_value, steps=r.steps,
                                           completeness_gap=r.completeness_gap, tolerance=r.tolerance,
                                           converged=r.converged)
        if r.grad_x_input is not None:
            resp.grad_x_input.CopyFrom(wire.to_wire(r.grad_x_input))
        if r.integrated_gradients is not None:
            resp.integrated_gradients.CopyFrom(wire.to_wire(r.integrated_gradients))
        return resp

    @_rpc_stream
    def PatchSweep(self, request: pb.PatchSweepRequest, context: grpc.ServicerContext) -> Iterator[pb.PatchSweepChunk]:
        """Header, then a chunk per batched forward (each computed in its own device turn, so debug
        sessions interleave), then the summary. A client that leaves stops the work within one block."""
        a = self.adapter
        should_stop = bounds.stopper(context, self.limits.max_analysis_s, "the patch sweep")

        if request.kind == pb.SWEEP_KIND_UNSPECIFIED:
            raise InvalidArgument("give a sweep kind", reason="BAD_SWEEP")
        if not request.HasField("target"):
            raise InvalidArgument("a sweep needs a target", reason="NO_OBJECTIVE")
        bounds.in_range("max_batch", request.max_batch, 0, bounds.MAX_SWEEP_BATCH, "0 = from the memory budget")
        bounds.in_range("verify_top_k", request.verify_top_k, 0, MAX_TOP_K, f"0 = {DEFAULT_TOP_K}")
        spec = sweeps.SweepSpec(_enum(request.kind, _SWEEP_KINDS, "sweep kind"),
                                _enum(request.direction, _SWEEP_DIRECTIONS, "sweep direction"),
                                request.per_position, tuple(request.layers), tuple(request.positions),
                                _enum(request.method, _SWEEP_METHODS, "sweep method"), request.verify_top_k,
                                request.max_batch)
        with scheduler_for(a).turn():
            if should_stop():
                raise Cancelled("the client cancelled the request")
            clean, corrupted = self._ids(request.clean, "clean"), self._ids(request.corrupted, "corrupted")
            target, _ = _target(a, request.target, clean)
            sweep = sweeps.PatchSweep(a, clean, corrupted, target, spec)
        target.value = sweep.clean_value
        yield pb.PatchSweepChunk(
            header=pb.PatchSweepHeader(
                tokens=decode(a, clean[:sweep.seq]), corrupted_tokens=decode(a, corrupted[:sweep.seq]),
                target=_resolved(target), clean_value=sweep.clean_value, corrupted_value=sweep.corrupted_value,
                axes=[pb.SweepAxis(name=x.name, values=x.values) for x in sweep.axes], total=sweep.total,
                site=sweep.site, kind=request.kind, direction=request.direction or pb.SWEEP_DENOISING,
                method=request.method or pb.SWEEP_EXACT, batch_size=sweep.batch_size,
                memory_budget_bytes=sweep.budget, notes=sweep.notes),
            progress=pb.SweepProgress(stage="prepare", total=sweep.total))
        chunks = sweep.chunks(should_stop)
        while True:
            with scheduler_for(a).turn():
                chunk = next(chunks, None)
            if chunk is None:
                break
            yield pb.PatchSweepChunk(
                values=pb.PatchSweepValues(indices=wire.to_wire(chunk.indices.long()), values=wire.to_wire(chunk.values),
                                           normalized=wire.to_wire(chunk.normalized), approximate=chunk.approximate),
                progress=pb.SweepProgress(stage=chunk.stage, done=chunk.done, total=chunk.total,
                                          percent=100.0 * chunk.done / max(chunk.total, 1),
                                          elapsed_s=chunk.elapsed_s, eta_s=chunk.eta_s))
        s = sweep.summary
        yield pb.PatchSweepChunk(summary=pb.PatchSweepSummary(
            elapsed_s=s.elapsed_s, exact_patches=s.exact_patches, chunks=s.chunks, batch_size=s.batch_size,
            verified=s.verified, pearson=s.pearson, spearman=s.spearman, max_abs_error=s.max_abs_error,
            notes=sweep.notes))

    @_rpc_stream
    def Circuit(self, request: pb.CircuitRequest, context: grpc.ServicerContext) -> Iterator[pb.CircuitChunk]:
        """Progress after each stage (attribution, verify, circuit), each in its own device turn, then
        the result. A client that leaves stops the work between stages and between batched forwards."""
        a = self.adapter
        should_stop = bounds.stopper(context, self.limits.max_analysis_s, "the circuit search")

        if not request.HasField("target"):
            raise InvalidArgument("a circuit needs a target", reason="NO_OBJECTIVE")
        ablation_ = _enum(request.ablation, _CIRCUIT_ABLATIONS, "circuit ablation")
        bounds.in_range("verify_top_k", request.verify_top_k, -1, MAX_TOP_K, f"0 = {DEFAULT_TOP_K}, -1 = none")
        bounds.in_range("max_edges", request.max_edges, 0, bounds.MAX_EDGES, "0 = all")
        bounds.in_range("fraction", request.fraction, 0.0, 1.0, "0 = 0.8")
        fraction = request.fraction or 0.8
        top_k = DEFAULT_TOP_K if request.verify_top_k == 0 else max(request.verify_top_k, 0)
        stages = ["attribution"] + (["verify"] if top_k else []) + ([] if request.skip_circuit else ["circuit"])

        def progress(stage: str, t0: float) -> pb.CircuitChunk:
            done = stages.index(stage) + 1
            return pb.CircuitChunk(progress=pb.SweepProgress(stage=stage, done=done, total=len(stages),
                                                             percent=100.0 * done / len(stages),
                                                             elapsed_s=time.perf_counter() - t0))
        t0 = time.perf_counter()
        with scheduler_for(a).turn():
            if should_stop():
                raise Cancelled("the client cancelled the request")
            clean = self._ids(request.clean, "clean")
            target, run_ids = _target(a, request.target, clean)
            if target.appended_ids:
                raise InvalidArgument("circuits take single-token targets (or targets that differ in their first "
                                      "token)", reason="BAD_TARGET")
            corrupted = self._ids(request.corrupted, "corrupted") if request.HasField("corrupted") else None
            scores = circuits.edge_attribution(a, run_ids, target, corrupted, ablation_)
        yield progress("attribution", t0)
        check = None
        if top_k:
            with scheduler_for(a).turn():
                check = circuits.verify(a, scores, top_k, should_stop)
            yield progress("verify", t0)
        found = None
        if not request.skip_circuit:
            with scheduler_for(a).turn():
                found = circuits.extract_circuit(a, scores, fraction, request.max_edges, should_stop)
            yield progress("circuit", t0)
        target.value = scores.clean_value
        topo = scores.topology
        result = pb.CircuitResult(
            tokens=decode(a, run_ids), corrupted_tokens=decode(a, corrupted or []), target=_resolved(target),
            clean_value=scores.clean_value, ablated_value=scores.ablated_value,
            ablation={v: k for k, v in _CIRCUIT_ABLATIONS.items() if k}[ablation_],
            senders=[x.name for x in topo.senders], receivers=[x.name for x in topo.receivers],
            scores=wire.to_wire(scores.scores.float().contiguous()), fraction=fraction)
        exact = {}
        if check is not None:
            for (s, r), ap, ex in zip(check.edges, check.approx.tolist(), check.exact.tolist()):
                sender, node, inp = scores.edge_name((s, r))
                result.verified.append(pb.CircuitEdgeCheck(sender=sender, receiver=node, input=inp, approx=ap, exact=ex))
                exact[(s, r)] = ex
            result.spearman, result.pearson, result.max_abs_error = check.spearman, check.pearson, check.max_abs_error
        if found is not None:
            result.circuit.CopyFrom(_graph(circuits.circuit_graph(scores, found.edges, exact)))
            result.faithfulness, result.circuit_value = found.faithfulness, found.circuit_value
            result.curve.extend(pb.CircuitCurvePoint(top_k=k, kept=n, faithfulness=f) for k, n, f in found.curve)
        result.elapsed_s = time.perf_counter() - t0
        yield pb.CircuitChunk(result=result)

    @_rpc
    @_on_device
    def InformationFlow(self, request: pb.InformationFlowRequest,
                        context: grpc.ServicerContext) -> pb.InformationFlowResponse:
        a = self.adapter
        ids = self._ids(request.input)
        r = circuits.information_flow(a, ids, request.position if request.HasField("position") else -1,
                                      request.threshold or 0.04)
        return pb.InformationFlowResponse(tokens=decode(a, ids), graph=_graph(r.graph), position=r.position,
                                          threshold=r.threshold, candidate_edges=r.n_edges_total,
                                          elapsed_s=r.elapsed_s)


_CIRCUIT_ABLATIONS = {pb.CIRCUIT_ABLATION_UNSPECIFIED: "corrupted", pb.CIRCUIT_ABLATION_CORRUPTED: "corrupted",
                      pb.CIRCUIT_ABLATION_MEAN: "mean"}


def _graph(g: circuits.Graph) -> pb.Graph:
    return pb.Graph(kind=g.kind, nodes=[pb.GraphNode(id=n.id, kind=n.kind, layer=n.layer, position=n.position,
                                                     index=n.index, label=n.label) for n in g.nodes],
                    edges=[pb.GraphEdge(source=e.source, target=e.target, input=e.input, effect=e.effect,
                                        exact=e.exact, component=e.component) for e in g.edges])
