"""The client's protobuf boundary: every conversion between the protocol's messages and the client's
own types, in one place (the way Flower's `common/serde.py` is its protobuf edge).

`*_to_proto` builds request messages from requests (Target, Trace, Ablation, Breakpoint, Generate, a
prompt, a patch); `*_from_proto` turns replies into the dataclasses of `types`, `results`, `sae` and
`graph`, which never see a message. Enum spellings come from the proto descriptors (`_enums`).
A wrong spelling raises ValueError before anything is sent.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tdb.v1 import analysis_pb2 as apb, common_pb2, debugger_pb2 as pb

from . import _enums as enums
from . import _wire
from .graph import CircuitProgress, CircuitResult, Edge, EdgeCheck, FlowResult, Graph, Node
from .results import (AblationEffect, AblationResult, AttentionResult, Comparison, InputAttributionResult,
                      LogitLensResult, NodeTable, NodeTableResult, PairedNodeTable, PatchSweepResult, ResolvedTarget,
                      SweepAxis, SweepChunk, SweepProgress, SweepSummary, Verification)
from .sae import ActivationRecords, ActivationWindow, Explanation, SaeInfo, SaeQuality, TokenShare
from .types import (Ablation, Breakpoint, BreakpointStatus, Demo, EvalResult, Event, Frame, Generate, ModelInfo,
                    PatchInfo, PatchResult, ReplayReport, RunResult, RunStatus, Scope, ServerInfo, SiteInfo, StopInfo,
                    Target, TensorSummary, TokenProb, Trace, Variable)


def choice(value: str, table: dict, what: str) -> Any:
    """The enum number of a spelling, or ValueError listing the spellings."""
    if value not in table:
        raise ValueError(f"{what} must be one of {sorted(k for k in table if k)}, not {value!r}")
    return table[value]


def _optional(m: Any, name: str, convert: Any) -> Any:
    return convert(getattr(m, name)) if m.HasField(name) else None


def _array(t: common_pb2.Tensor, columns: int, dtype: Any) -> np.ndarray:
    """A [rows, columns] table; an empty (shapeless) tensor is zero rows."""
    return _wire.from_wire(t).reshape(-1, columns) if t.shape else np.zeros((0, columns), dtype)


# -- requests ------------------------------------------------------------------------------------

def input_to_proto(prompt: Any, prepend_bos: bool = False) -> apb.Input:
    """Text or a sequence of token ids."""
    if isinstance(prompt, str):
        return apb.Input(prompt=prompt, prepend_bos=prepend_bos)
    return apb.Input(token_ids=[int(i) for i in prompt], prepend_bos=prepend_bos)


def _split(items: Any) -> tuple[list[str], list[int]]:
    items = [items] if isinstance(items, (str, int, np.integer)) else list(items or [])
    return [x for x in items if isinstance(x, str)], [int(x) for x in items if not isinstance(x, str)]


def target_to_proto(t: Target | str | int) -> apb.Target:
    """A Target, or a token (string or id) for Target(token)."""
    if isinstance(t, (str, int, np.integer)):
        t = Target(t)
    elif not isinstance(t, Target):
        raise TypeError(f"target must be a Target, a token string or a token id, not {type(t).__name__}")
    toks, tok_ids = _split(t.tokens)
    dist, dist_ids = _split(t.distractors)
    msg = apb.Target(kind=choice(t.kind, enums.TARGET_KIND, "target kind"), tokens=toks, token_ids=tok_ids,
                     distractors=dist, distractor_ids=dist_ids)
    if t.position is not None:
        msg.position = int(t.position)
    if t.direction is not None:
        msg.direction.CopyFrom(_wire.to_wire(np.asarray(t.direction, dtype=np.float32)))
    return msg


def trace_to_proto(t: Trace) -> apb.TraceNode:
    msg = apb.TraceNode(node=t.node, part=choice(t.part, enums.HEAD_PART, "head part"))
    if t.position is not None:
        msg.position = int(t.position)
    if t.key_position is not None:
        msg.key_position = int(t.key_position)
    return msg


def ablation_to_proto(a: Ablation) -> apb.Ablation:
    return apb.Ablation(node=a.node, method=choice(a.method, enums.ABLATION_METHOD, "ablation method"),
                        positions=[int(p) for p in a.positions])


def breakpoint_to_proto(b: Breakpoint) -> pb.Breakpoint:
    if b.when not in enums.BREAK_WHEN:
        raise ValueError(f"when must be 'after' or 'before', not {b.when!r}")
    msg = pb.Breakpoint(site=b.site, when=enums.BREAK_WHEN[b.when], condition=b.condition,
                        hit_condition=b.hit_condition, log_message=b.log_message)
    if b.tokens is not None:
        msg.tokens.first, msg.tokens.last = b.tokens
    return msg


def generate_to_proto(g: Generate) -> pb.GenerateOptions:
    return pb.GenerateOptions(max_new_tokens=g.max_new_tokens, sample=g.sample, temperature=g.temperature,
                              top_k=g.top_k, seed=g.seed, stop_at_tokens=g.stop_at_tokens,
                              stop_token_ids=list(g.stop_token_ids))


def patch_to_proto(session_id: str, site: str, op: str, value: Any, *, scalar: float, positions: Sequence[int],
                   heads: Sequence[int], neurons: Sequence[int], batch: Sequence[int], source_run_id: str,
                   mean_over: str, tokens: Sequence[int], run_id: str = "") -> pb.PatchRequest:
    """A Patch request; a scalar `value` of add / scale travels as `scalar`, any other as a tensor."""
    req = pb.PatchRequest(session_id=session_id, site=site, op=choice(op, enums.PATCH_OP, "op"), scalar=float(scalar),
                          source_run_id=source_run_id, mean_over=mean_over, tokens=list(tokens), run_id=run_id,
                          selector=pb.Selector(batch=list(batch), positions=list(positions), heads=list(heads),
                                               neurons=list(neurons)))
    if value is not None:
        if np.isscalar(value) and op in ("add", "scale"):
            req.scalar = float(value)
        else:
            req.value.CopyFrom(_wire.to_wire(np.asarray(value)))
    return req


# -- the Debugger service's replies ----------------------------------------------------------------

def model_info_from_proto(m: common_pb2.ModelInfo) -> ModelInfo:
    sites = tuple(SiteInfo(s.name, tuple(s.dims), s.verified, s.kind, None if s.layer < 0 else s.layer)
                  for s in m.sites)
    return ModelInfo(m.name, m.architecture, m.n_layers, m.n_heads, m.n_kv_heads, m.d_model, m.d_head, m.d_mlp,
                     m.vocab_size, m.dtype, m.device, sites, m.parallel_blocks, m.has_tokenizer, m.source,
                     m.max_positions, m.unk_token_id if m.HasField("unk_token_id") else None,
                     Demo(m.demo.prompt, m.demo.answer, m.demo.distractor) if m.demo.prompt else None)


def server_info_from_proto(r: pb.InitializeResponse) -> ServerInfo:
    c = r.capabilities
    return ServerInfo(r.protocol_version, r.server_version, dict(c.flags), tuple(c.analyses),
                      tuple(c.expression_functions), tuple(c.patch_ops), model_info_from_proto(r.model),
                      dict(c.limits))


def tensor_summary_from_proto(m: common_pb2.TensorSummary) -> TensorSummary:
    return TensorSummary(_wire.DTYPE_NAMES.get(m.dtype, "?"), tuple(m.shape), m.min, m.max, m.mean, m.std, m.norm,
                         m.nan_count, m.inf_count, m.numel, tuple(m.dims))


def breakpoint_statuses_from_proto(r: pb.SetBreakpointsResponse) -> list[BreakpointStatus]:
    return [BreakpointStatus(b.id, b.verified, b.message, tuple(b.sites)) for b in r.breakpoints]


def stop_info_from_proto(m: pb.StopInfo) -> StopInfo:
    return StopInfo(m.site, enums.BREAK_WHEN_NAMES.get(m.when, "after"), m.reason, tuple(m.hit_breakpoint_ids),
                    m.description, m.stop_id, m.exception, _optional(m, "value", tensor_summary_from_proto), m.token)


def run_result_from_proto(m: pb.RunResult) -> RunResult:
    top = tuple(tuple(TokenProb(t.token_id, t.text, t.logit, t.prob) for t in tt.tokens) for tt in m.top)
    return RunResult(m.run_id, enums.RUN_STATE_NAMES.get(m.state, "unknown"), top,
                     _optional(m, "last_logits", _wire.from_wire), m.exception,
                     tuple(tuple(t.ids) for t in m.input_ids), tuple(m.lengths),
                     tuple(tuple(t.ids) for t in m.generated), tuple(m.generated_text))


def run_status_from_proto(m: pb.RunStatus) -> RunStatus:
    return RunStatus(m.run_id, enums.RUN_STATE_NAMES.get(m.state, "unknown"),
                     _optional(m, "stop", stop_info_from_proto), _optional(m, "result", run_result_from_proto),
                     tuple(PatchInfo(p.patch_id, p.site, p.op, p.scope, p.applied) for p in m.patches),
                     tuple(m.warnings))


def _event_body(kind: str, m: pb.Event) -> dict[str, Any]:
    """The Event fields of one kind of event body (stop, result, text, data)."""
    if kind == "stopped":
        return {"stop": stop_info_from_proto(m.stopped)}
    if kind == "run_exited":
        return {"result": run_result_from_proto(m.run_exited.result)}
    if kind == "output":
        return {"text": m.output.text, "data": {"category": m.output.category, "site": m.output.site}}
    if kind == "progress":
        p = m.progress
        return {"text": p.message, "data": {"id": p.id, "title": p.title, "fraction": p.fraction, "eta_s": p.eta_s}}
    if kind == "token":
        return {"text": m.token.texts[0] if m.token.texts else "",
                "data": {"step": m.token.step, "token_ids": list(m.token.token_ids), "texts": list(m.token.texts),
                         "appended": list(m.token.appended)}}
    if kind == "run_started":
        return {"data": {"batch": m.run_started.batch, "seq_len": m.run_started.seq_len}}
    if kind == "terminated":
        return {"text": m.terminated.reason}
    if kind == "invalidated":
        return {"text": m.invalidated.what}
    return {}


def event_from_proto(m: pb.Event) -> Event:
    kind = m.WhichOneof("body") or "unknown"
    return Event(seq=m.seq, time=m.time, run_id=m.run_id, kind=kind, **_event_body(kind, m))


def frames_from_proto(r: pb.GetStackResponse) -> list[Frame]:
    return [Frame(f.id, f.name, f.site) for f in r.frames]


def scopes_from_proto(r: pb.GetScopesResponse) -> list[Scope]:
    return [Scope(s.name, s.variables_reference, s.named_variables) for s in r.scopes]


def variables_from_proto(r: pb.GetVariablesResponse) -> list[Variable]:
    return [Variable(v.name, v.value, v.type, _optional(v, "summary", tensor_summary_from_proto),
                     v.variables_reference, v.evaluate_name, v.indexed_variables) for v in r.variables]


def eval_result_from_proto(r: pb.EvaluateResponse) -> EvalResult:
    return EvalResult(r.result, _optional(r, "value", _wire.from_wire),
                      _optional(r, "summary", tensor_summary_from_proto), tuple(r.tokens))


def patch_result_from_proto(r: pb.PatchResponse) -> PatchResult:
    return PatchResult(r.patch_id, r.applied_now, r.scope, r.message)


def replay_report_from_proto(r: pb.ReplayReport) -> ReplayReport:
    return ReplayReport(r.ok, r.actions, r.stops_checked, r.reads_checked, tuple(r.mismatches), r.session_id,
                        r.session_secret)


# -- the Analysis service's replies ----------------------------------------------------------------

def resolved_target_from_proto(m: apb.ResolvedTarget) -> ResolvedTarget:
    return ResolvedTarget(m.description, enums.TARGET_KIND_NAMES.get(m.kind, ""), tuple(m.token_ids),
                          tuple(m.distractor_ids), m.position, m.value, m.exact, tuple(m.notes), tuple(m.appended_ids))


def node_table_from_proto(m: apb.NodeTable, tokens: Sequence[str]) -> NodeTable:
    ids = _wire.from_wire(m.ids) if m.HasField("ids") else np.zeros((0, 5), np.int32)
    metrics = _wire.from_wire(m.metrics) if m.HasField("metrics") else np.zeros((0, 4), np.float32)
    return NodeTable(ids.reshape(-1, 5), metrics.reshape(-1, 4), tuple(tokens), tuple(m.explanations))


def verification_from_proto(m: apb.NodeTableVerification, tokens: Sequence[str]) -> Verification:
    def column(t: common_pb2.Tensor) -> np.ndarray:
        return _wire.from_wire(t).reshape(-1) if t.shape else np.zeros(0, np.float32)
    return Verification(_array(m.ids, 5, np.int32), column(m.estimate), column(m.exact), m.value, m.spearman,
                        m.pearson, m.max_abs_error, tuple(m.notes), tuple(tokens))


def node_table_result_from_proto(m: apb.NodeTableResponse) -> NodeTableResult:
    toks = tuple(m.tokens)
    return NodeTableResult(toks, tuple(m.token_ids), resolved_target_from_proto(m.target), m.direct_effect_sum,
                           node_table_from_proto(m.top, toks), node_table_from_proto(m.bottom, toks),
                           node_table_from_proto(m.all, toks) if m.HasField("all") else None,
                           enums.METRIC_NAMES.get(m.rank_by, ""),
                           verification_from_proto(m.verification, toks) if m.HasField("verification") else None)


def paired_node_table_from_proto(m: apb.PairedNodeTable, left_tokens: Sequence[str],
                                 right_tokens: Sequence[str]) -> PairedNodeTable:
    return PairedNodeTable(_array(m.ids, 5, np.int32), _array(m.left, 4, np.float32), _array(m.right, 4, np.float32),
                           tuple(left_tokens), tuple(right_tokens))


def comparison_from_proto(m: apb.CompareNodeTablesResponse) -> Comparison:
    lt, rt = tuple(m.left_tokens), tuple(m.right_tokens)
    return Comparison(lt, rt, resolved_target_from_proto(m.left_target), resolved_target_from_proto(m.right_target),
                      paired_node_table_from_proto(m.top, lt, rt), paired_node_table_from_proto(m.bottom, lt, rt),
                      paired_node_table_from_proto(m.all, lt, rt) if m.HasField("all") else None,
                      enums.METRIC_NAMES.get(m.rank_by, ""))


def ablation_result_from_proto(m: apb.AblateResponse) -> AblationResult:
    return AblationResult(tuple(m.tokens), resolved_target_from_proto(m.target), m.before,
                          tuple(AblationEffect(r.node, r.before, r.after, r.effect) for r in m.results))


def logit_lens_from_proto(m: apb.LogitLensResponse) -> LogitLensResult:
    ids = _wire.from_wire(m.top_ids)
    return LogitLensResult(tuple(m.tokens), tuple(m.sites), tuple(m.positions), ids, _wire.from_wire(m.top_logits),
                           _wire.from_wire(m.top_probs), np.array(list(m.top_tokens), dtype=object).reshape(ids.shape),
                           _optional(m, "target_values", _wire.from_wire),
                           _optional(m, "target", resolved_target_from_proto))


def attention_from_proto(r: apb.AttentionPatternResponse) -> AttentionResult:
    return AttentionResult(tuple(r.tokens), tuple(r.heads), _wire.from_wire(r.pattern))


def input_attribution_from_proto(m: apb.InputAttributionResponse) -> InputAttributionResult:
    return InputAttributionResult(tuple(m.tokens), resolved_target_from_proto(m.target),
                                  _optional(m, "grad_x_input", _wire.from_wire),
                                  _optional(m, "integrated_gradients", _wire.from_wire), m.baseline_value, m.steps,
                                  m.completeness_gap, m.tolerance, m.converged)


def _sweep_header_from_proto(h: apb.PatchSweepHeader) -> PatchSweepResult:
    axes = tuple(SweepAxis(a.name, np.asarray(a.values, dtype=np.int64)) for a in h.axes)
    nan = np.full(tuple(len(a.values) for a in axes), np.nan, dtype=np.float32)
    return PatchSweepResult(enums.SWEEP_KIND_NAMES.get(h.kind, ""), enums.SWEEP_DIRECTION_NAMES.get(h.direction, ""),
                            enums.SWEEP_METHOD_NAMES.get(h.method, ""), h.site, tuple(h.tokens),
                            tuple(h.corrupted_tokens), resolved_target_from_proto(h.target), h.clean_value,
                            h.corrupted_value, axes, nan, nan.copy(), batch_size=h.batch_size,
                            memory_budget_bytes=h.memory_budget_bytes, notes=tuple(h.notes))


def _sweep_progress_from_proto(p: apb.SweepProgress) -> SweepProgress:
    return SweepProgress(p.stage, p.done, p.total, p.percent, p.elapsed_s, p.eta_s)


def _sweep_chunk_from_proto(m: apb.PatchSweepChunk) -> SweepChunk:
    chunk = SweepChunk(progress=_optional(m, "progress", _sweep_progress_from_proto))
    if m.HasField("values"):
        v = m.values
        chunk = SweepChunk(_wire.from_wire(v.indices).astype(np.int64), _wire.from_wire(v.values),
                           _wire.from_wire(v.normalized), v.approximate, chunk.progress)
    if m.HasField("summary"):
        s = m.summary
        summary = SweepSummary(s.elapsed_s, s.exact_patches, s.chunks, s.batch_size, s.verified, s.pearson,
                               s.spearman, s.max_abs_error)
        chunk = SweepChunk(chunk.indices, chunk.values, chunk.normalized, chunk.approximate, chunk.progress, summary,
                           tuple(s.notes))
    return chunk


def sweep_message_from_proto(m: apb.PatchSweepChunk) -> PatchSweepResult | SweepChunk:
    """The stream's first message (the header: a fresh result, with the preparation's progress) or a chunk."""
    if not m.HasField("header"):
        return _sweep_chunk_from_proto(m)
    result = _sweep_header_from_proto(m.header)
    if m.HasField("progress"):
        result.progress = SweepProgress(m.progress.stage, 0, m.progress.total, 0.0, 0.0, 0.0)
    return result


def graph_from_proto(m: apb.Graph) -> Graph:
    return Graph(m.kind, [Node(n.id, n.kind, n.layer, n.position, n.index, n.label) for n in m.nodes],
                 [Edge(e.source, e.target, e.input, e.effect, e.exact if e.HasField("exact") else None, e.component)
                  for e in m.edges])


def circuit_result_from_proto(m: apb.CircuitResult) -> CircuitResult:
    return CircuitResult(list(m.tokens), list(m.corrupted_tokens), resolved_target_from_proto(m.target),
                         m.clean_value, m.ablated_value, enums.CIRCUIT_ABLATION_NAMES.get(m.ablation, "corrupted"),
                         list(m.senders), list(m.receivers), _wire.from_wire(m.scores),
                         [EdgeCheck(v.sender, v.receiver, v.input, v.approx, v.exact) for v in m.verified],
                         m.spearman, m.pearson, m.max_abs_error, graph_from_proto(m.circuit), m.faithfulness,
                         m.circuit_value, m.fraction, [(c.top_k, c.kept, c.faithfulness) for c in m.curve],
                         m.elapsed_s, list(m.notes))


def circuit_message_from_proto(m: apb.CircuitChunk) -> CircuitProgress | CircuitResult:
    if m.HasField("result"):
        return circuit_result_from_proto(m.result)
    p = m.progress
    return CircuitProgress(p.stage, p.done, p.total, p.elapsed_s)


def flow_from_proto(m: apb.InformationFlowResponse) -> FlowResult:
    return FlowResult(list(m.tokens), graph_from_proto(m.graph), m.position, m.threshold, m.candidate_edges,
                      m.elapsed_s)


# -- SAEs, activation records, explanations -------------------------------------------------------

def sae_info_from_proto(m: apb.SaeInfo) -> SaeInfo:
    q = m.quality
    quality = SaeQuality(q.explained_variance, q.l0, q.dead_latents, q.dead_fraction, q.tokens, q.loss_clean,
                         q.loss_spliced, q.loss_zero, q.loss_recovered, q.corpus) if m.HasField("quality") else None
    return SaeInfo(m.site, m.name, m.path, m.architecture, m.d_in, m.d_sae, m.unit_prefix, quality)


def _window_from_proto(w: apb.ActivationWindow) -> ActivationWindow:
    return ActivationWindow(w.window, tuple(w.token_ids), tuple(w.tokens), _wire.from_wire(w.acts), w.max_act,
                            w.max_pos)


def activation_records_from_proto(m: apb.ActivationRecordsResult) -> ActivationRecords:
    return ActivationRecords(m.unit, m.kind, m.site, m.corpus, m.corpus_sha256, m.window, m.n_windows,
                             tuple(_window_from_proto(w) for w in m.top),
                             tuple(_window_from_proto(w) for w in m.random), m.max_act, m.mean_max, m.frac_windows_active, m.cached)


def _shares(xs: Any) -> tuple[TokenShare, ...]:
    return tuple(TokenShare(t.text, t.share, t.lift, t.count, t.token_id) for t in xs)


def explanation_from_proto(m: apb.ExplainResponse) -> Explanation:
    return Explanation(m.unit, m.text, m.method, m.label, _shares(m.top_tokens), _shares(m.top_ngrams),
                       tuple((t.text, t.logit) for t in m.promoted), tuple((t.text, t.logit) for t in m.suppressed),
                       dict(m.attention), dict(m.corpus_attention), m.score if m.HasField("score") else None,
                       tuple(m.notes), _optional(m, "records", activation_records_from_proto), m.llm_configured)
