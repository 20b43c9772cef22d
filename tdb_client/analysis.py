"""Analyses from the client: "why A and not B?" as typed results whose tables become DataFrames.

    from tdb_client import TdbClient, Target

    with TdbClient("127.0.0.1:50051") as tdb:
        why = Target(" Darcy", distractors=" Bingley")            # logit(' Darcy') - logit(' Bingley'), last position
        t = tdb.node_table("... Mr. Darcy ... Mr.", why)           # one forward + one backward on the server
        print(t.target.value, t.direct_effect_sum)                  # equal for logit targets
        t.top.to_pandas()                                           # heads, token pairs, neurons, embeddings...
        tdb.ablate("... Mr. Darcy ... Mr.", why, "blocks.*.attn.head.*", separately=True).to_pandas()
        tdb.trace_upstream("... Mr. Darcy ... Mr.", "blocks.1.attn.head.2", part="k", key_position=5)
        tdb.logit_lens("... Mr. Darcy ... Mr.", target=why).to_pandas()
        tdb.input_attribution("... Mr. Darcy ... Mr.", why, steps=64).to_pandas()
        sweep = tdb.patch_sweep(clean, corrupted, why, kind="head_out")   # layer x head, batched, streamed
        sweep.normalized; sweep.to_pandas(); sweep.to_csv("heads.csv")

Prompts are text or a sequence of token ids. Every failed call raises TdbError.

This module holds the calls only (the `AnalysisMixin` of TdbClient, SAEs and explanations included):
requests are in `types`, results in `results`, `graph` and `sae`, and `serde` converts both ways.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import grpc

from tdb.v1 import analysis_pb2 as apb, analysis_pb2_grpc

from . import _enums as enums
from . import serde
from ._rpc import _Stub
from .errors import TdbError
from .graph import CircuitStream
from .progress import circuit_stage, records_stage, reporting, sweep_stage
from .results import (AblationResult, AttentionResult, Comparison, InputAttributionResult, LogitLensResult,
                      NodeTableResult, PatchSweepResult, SweepStream)
from .sae import ActivationRecords, Explanation, SaeInfo
from .types import Ablation, Trace


def _ablation_list(ablations: Any, method: str = "zero", positions: Sequence[int] = ()) -> list[apb.Ablation]:
    """Names, patterns or Ablation objects (one or a sequence) -> Ablations (names take `method`, `positions`)."""
    items = [ablations] if isinstance(ablations, (str, Ablation)) else list(ablations or ())
    return [serde.ablation_to_proto(a if isinstance(a, Ablation) else Ablation(a, method, tuple(positions)))
            for a in items]


class AnalysisMixin:
    """The Analysis service's calls on TdbClient (needs `self._channel` and `self._rpc._timeout`)."""

    _channel: grpc.Channel

    @property
    def _analysis(self) -> _Stub:
        stub = self.__dict__.get("_analysis_stub")
        if stub is None:
            stub = self.__dict__["_analysis_stub"] = _Stub(self._channel, getattr(self._rpc, "_timeout", None),
                                                           analysis_pb2_grpc.AnalysisStub)
        return stub

    @staticmethod
    def _table_options(top_k: int, rank_by: str | None, node_types: Sequence[str] | None) -> dict:
        if top_k < 0:
            raise ValueError("top_k must be >= 0")
        opts: dict[str, Any] = {"top_k": top_k, "node_types": [serde.choice(t, enums.NODE_TYPE, "node type")
                                                               for t in (node_types or ())]}
        if rank_by is not None:
            opts["rank_by"] = serde.choice(rank_by, enums.METRIC, "rank_by")
        return opts

    @staticmethod
    def _objective(target: Any, trace: Trace | None) -> dict:
        if (target is None) == (trace is None):
            raise ValueError("give a target or trace=Trace(...), not both")
        return {"target": serde.target_to_proto(target)} if trace is None else {"trace": serde.trace_to_proto(trace)}

    def node_table(self, prompt: Any, target: Any = None, *, trace: Trace | None = None, top_k: int = 20,
                   rank_by: str | None = None, all_rows: bool = False, node_types: Sequence[str] | None = None,
                   ablations: Any = (), prepend_bos: bool = False, target_position_only: bool = False,
                   direct_only: bool = False, verify_top: int = 0) -> NodeTableResult:
        """Every head (per query position and per attended-to token), neuron, embedding row and bias
        with activation, write norm, direct effect and estimated total effect on `target` (or on the
        traced node); top_k / bottom_k by `rank_by` (default direct_effect; total_effect for tracing).
        `ablations` (heads, neurons, SAE latents: names, patterns or Ablation objects, zero or mean):
        the table of the forward with those ablated. Cheaper tables: `target_position_only` (rows at
        the target's position only), `direct_only` (no total effects, NaN: for a target, one forward
        and no backward). `verify_top=k`: `result.verification` holds the k heads / neurons with the
        largest |total effect|, that estimate beside the exact zero-ablation effect, and their rank
        agreement (Spearman)."""
        if verify_top < 0:
            raise ValueError("verify_top must be >= 0")
        req = apb.NodeTableRequest(input=serde.input_to_proto(prompt, prepend_bos), all_rows=all_rows,
                                   ablations=_ablation_list(ablations), target_position_only=target_position_only,
                                   direct_only=direct_only, verify_top=verify_top,
                                   **self._objective(target, trace), **self._table_options(top_k, rank_by, node_types))
        return serde.node_table_result_from_proto(self._analysis("NodeTable", req))

    def trace_upstream(self, prompt: Any, node: str, *, part: str = "output", position: int | None = None,
                       key_position: int | None = None, **kw: Any) -> NodeTableResult:
        """The node table against an upstream node: a neuron's pre-activation, or a head's
        output / q / k / qk / v (q, k, qk: the attention score from position to key_position)."""
        return self.node_table(prompt, trace=Trace(node, part, position, key_position), **kw)

    def compare(self, left: Any, right: Any, target: Any = None, *, trace: Trace | None = None, top_k: int = 20,
                rank_by: str | None = None, all_rows: bool = False, node_types: Sequence[str] | None = None,
                ablations: Any = (), prepend_bos: bool = False) -> Comparison:
        """Two prompts of the same token length side by side (rows aligned; ranked by left - right);
        `ablations` as in node_table, applied to both."""
        req = apb.CompareNodeTablesRequest(left=serde.input_to_proto(left, prepend_bos),
                                           right=serde.input_to_proto(right, prepend_bos),
                                           all_rows=all_rows, **self._objective(target, trace),
                                           ablations=_ablation_list(ablations),
                                           **self._table_options(top_k, rank_by, node_types))
        return serde.comparison_from_proto(self._analysis("CompareNodeTables", req))

    def ablate(self, prompt: Any, target: Any, ablations: Any, *, method: str = "zero", positions: Sequence[int] = (),
               separately: bool = False, reference: Sequence[Any] = (), source: Any = None,
               prepend_bos: bool = False) -> AblationResult:
        """Ablate nodes (names, patterns or Ablation objects; strings use `method` and `positions`)
        together, or each separately; returns the target before and after."""
        req = apb.AblateRequest(input=serde.input_to_proto(prompt, prepend_bos), target=serde.target_to_proto(target),
                                ablations=_ablation_list(ablations, method, positions),
                                separately=separately,
                                reference=[serde.input_to_proto(r, prepend_bos) for r in reference])
        if source is not None:
            req.source.CopyFrom(serde.input_to_proto(source, prepend_bos))
        return serde.ablation_result_from_proto(self._analysis("Ablate", req))

    def logit_lens(self, prompt: Any, sites: Sequence[str] = (), *, positions: Sequence[int] = (), top_k: int = 5,
                   target: Any = None, prepend_bos: bool = False) -> LogitLensResult:
        """Final norm + unembedding of residual sites (default: embed and every resid_post)."""
        req = apb.LogitLensRequest(input=serde.input_to_proto(prompt, prepend_bos), sites=list(sites),
                                   positions=[int(p) for p in positions], top_k=top_k)
        if target is not None:
            req.target.CopyFrom(serde.target_to_proto(target))
        return serde.logit_lens_from_proto(self._analysis("LogitLens", req))

    def attention_pattern(self, prompt: Any, layer: int, heads: Sequence[int] = (),
                          prepend_bos: bool = False) -> AttentionResult:
        return serde.attention_from_proto(self._analysis("AttentionPattern", apb.AttentionPatternRequest(
            input=serde.input_to_proto(prompt, prepend_bos), layer=layer, heads=[int(h) for h in heads])))

    def input_attribution(self, prompt: Any, target: Any, *, methods: Sequence[str] = ("grad_x_input",
                          "integrated_gradients"), steps: int = 32, baseline_token_id: int | None = None,
                          tolerance: float = 0.01, max_steps: int = 1024,
                          prepend_bos: bool = False) -> InputAttributionResult:
        """Per-token gradient x input and integrated gradients (baseline: zero at `embed`, or the
        embedding of `baseline_token_id` at every position; sum(ig) ~= target.value - baseline_value).
        Integrated gradients start at `steps` and triple them until the completeness gap is within
        `tolerance` of target.value - baseline_value or `max_steps` is reached; the result says which
        (`completeness_gap`, `converged`, `steps`)."""
        req = apb.InputAttributionRequest(input=serde.input_to_proto(prompt, prepend_bos),
                                          target=serde.target_to_proto(target), steps=steps,
                                          tolerance=tolerance, max_steps=max_steps,
                                          methods=[serde.choice(m, enums.INPUT_ATTRIBUTION, "method") for m in methods])
        if baseline_token_id is not None:
            req.baseline_token_id = int(baseline_token_id)
        return serde.input_attribution_from_proto(self._analysis("InputAttribution", req))

    def patch_sweep_stream(self, clean: Any, corrupted: Any, target: Any, *, kind: str = "head_out",
                           direction: str = "denoising", method: str = "exact", per_position: bool = False,
                           layers: Sequence[int] = (), positions: Sequence[int] = (), verify_top_k: int = 0,
                           max_batch: int = 0, prepend_bos: bool = False, timeout: float | None = None) -> SweepStream:
        """Start a patching sweep and return its stream (see patch_sweep for the arguments)."""
        req = apb.PatchSweepRequest(clean=serde.input_to_proto(clean, prepend_bos),
                                    corrupted=serde.input_to_proto(corrupted, prepend_bos),
                                    target=serde.target_to_proto(target),
                                    kind=serde.choice(kind, enums.SWEEP_KIND, "sweep kind"),
                                    direction=serde.choice(direction, enums.SWEEP_DIRECTION, "direction"),
                                    method=serde.choice(method, enums.SWEEP_METHOD, "method"), per_position=per_position,
                                    layers=[int(x) for x in layers], positions=[int(p) for p in positions],
                                    verify_top_k=int(verify_top_k), max_batch=int(max_batch))
        stream = self._analysis.stream("PatchSweep", req, timeout=timeout)
        return SweepStream(map(serde.sweep_message_from_proto, stream), stream.close)

    def patch_sweep(self, clean: Any, corrupted: Any, target: Any, *, kind: str = "head_out",
                    direction: str = "denoising", method: str = "exact", per_position: bool = False,
                    layers: Sequence[int] = (), positions: Sequence[int] = (), verify_top_k: int = 0,
                    max_batch: int = 0, prepend_bos: bool = False, timeout: float | None = None,
                    on_progress: Callable[[PatchSweepResult], Any] | None = None,
                    progress: bool = False) -> PatchSweepResult:
        """Activation patching between two prompts of the same token length, one patch per cell of a
        grid: kind resid_pre | attn_out | mlp_out (layer x position), head_out | head_q | head_k |
        head_v | head_pattern (layer x head, x position with per_position), neuron (layer x neuron).
        direction "denoising" patches clean activations into the corrupted run, "noising" the reverse.
        method "attribution" estimates every cell from 2 forwards + 1 backward and verifies the
        `verify_top_k` (default 20) largest estimated effects exactly. `on_progress(result)` is called
        after every chunk; returning False cancels the sweep (the partial result is returned).
        `progress=True` shows a progress bar (tqdm) moved by the server's progress messages."""
        stream = self.patch_sweep_stream(clean, corrupted, target, kind=kind, direction=direction, method=method,
                                         per_position=per_position, layers=layers, positions=positions,
                                         verify_top_k=verify_top_k, max_batch=max_batch, prepend_bos=prepend_bos,
                                         timeout=timeout)
        with reporting(progress, "patch sweep", sweep_stage, on_progress) as report:
            for partial in stream:
                if report is not None and report(partial) is False:
                    stream.cancel()
        return stream.result

    def attribution_patching(self, clean: Any, corrupted: Any, target: Any, *, kind: str = "head_out",
                             verify_top_k: int = 20, **kw: Any) -> PatchSweepResult:
        """patch_sweep(method="attribution"): estimates for every cell, the top `verify_top_k` exact."""
        return self.patch_sweep(clean, corrupted, target, kind=kind, method="attribution",
                                verify_top_k=verify_top_k, **kw)

    def circuit_stream(self, clean: Any, corrupted: Any, target: Any, *, ablation: str = "corrupted",
                       verify_top_k: int = 20, fraction: float = 0.8, max_edges: int = 0, skip_circuit: bool = False,
                       prepend_bos: bool = False, timeout: float | None = None) -> Any:
        """Start a circuit request and return its stream (tdb_client.graph.CircuitStream)."""
        req = apb.CircuitRequest(clean=serde.input_to_proto(clean, prepend_bos), target=serde.target_to_proto(target),
                                 ablation=serde.choice(ablation, enums.CIRCUIT_ABLATION, "ablation"),
                                 verify_top_k=int(verify_top_k) if verify_top_k else -1, fraction=float(fraction),
                                 max_edges=int(max_edges), skip_circuit=skip_circuit)
        if corrupted is not None:
            req.corrupted.CopyFrom(serde.input_to_proto(corrupted, prepend_bos))
        stream = self._analysis.stream("Circuit", req, timeout=timeout)
        return CircuitStream(map(serde.circuit_message_from_proto, stream), stream.close)

    def circuit(self, clean: Any, corrupted: Any, target: Any, *, ablation: str = "corrupted",
                verify_top_k: int = 20, fraction: float = 0.8, max_edges: int = 0, skip_circuit: bool = False,
                prepend_bos: bool = False, timeout: float | None = None,
                on_progress: Callable[[Any], Any] | None = None, progress: bool = False) -> Any:
        """Edge attribution patching (EAP) over every edge upstream write -> head q / k / v, MLP, logits
        input between a clean and a corrupted prompt of the same token length (ablation "mean": each write
        replaced by its mean over positions, corrupted may be None); the `verify_top_k` strongest edges
        path-patched exactly (rank correlation reported); the smallest top-EAP circuit whose faithfulness
        reaches `fraction`. -> tdb_client.graph.CircuitResult (`.circuit` is a Graph). `progress=True`
        shows a progress bar (tqdm) through the server's stages."""
        stream = self.circuit_stream(clean, corrupted, target, ablation=ablation, verify_top_k=verify_top_k,
                                     fraction=fraction, max_edges=max_edges, skip_circuit=skip_circuit,
                                     prepend_bos=prepend_bos, timeout=timeout)
        with reporting(progress, "circuit", circuit_stage, on_progress) as report:
            return stream.wait(report)

    def information_flow(self, prompt: Any, *, position: int = -1, threshold: float = 0.04,
                         prepend_bos: bool = False) -> Any:
        """Information-flow routes to `position` from one forward (no corrupted prompt):
        -> tdb_client.graph.FlowResult (`.graph` is a Graph over residual states per layer and position)."""
        req = apb.InformationFlowRequest(input=serde.input_to_proto(prompt, prepend_bos), position=int(position),
                                         threshold=float(threshold))
        return serde.flow_from_proto(self._analysis("InformationFlow", req))

    def attach_sae(self, path: str, *, name: str = "", quality: bool = True) -> SaeInfo:
        """Attach the SAE in a folder on the server (SAELens layout); replaces one at the same site."""
        return serde.sae_info_from_proto(self._analysis("AttachSae", apb.AttachSaeRequest(
            path=path, name=name, skip_quality=not quality)))

    def list_saes(self) -> list[SaeInfo]:
        return [serde.sae_info_from_proto(m) for m in self._analysis("ListSaes", apb.ListSaesRequest()).saes]

    def detach_sae(self, site: str) -> None:
        self._analysis("DetachSae", apb.DetachSaeRequest(site=site))

    def activation_records(self, unit: str, *, corpus_path: str = "", n_top: int = 20, n_random: int = 20,
                           window: int = 64, batch: int = 32, timeout: float | None = None,
                           on_progress: Callable[[int, int], Any] | None = None,
                           progress: bool = False) -> ActivationRecords:
        """Top-activating and random windows of the corpus (default: the server's held-out slice)
        for a neuron, head or SAE latent; `on_progress(done, total)` while the server reads the corpus
        (`progress=True`: a progress bar, tqdm)."""
        req = apb.ActivationRecordsRequest(unit=unit, corpus_path=corpus_path, n_top=n_top, n_random=n_random,
                                           window=window, batch=batch)
        with reporting(progress, "activation records", records_stage, on_progress) as report:
            for chunk in self._analysis.stream("ActivationRecords", req, timeout=timeout):   # raises TdbError
                if chunk.HasField("progress") and report is not None:
                    report(chunk.progress.done, chunk.progress.total)
                if chunk.HasField("records"):
                    return serde.activation_records_from_proto(chunk.records)
        raise TdbError(grpc.StatusCode.UNKNOWN, "NO_RECORDS", "the server ended the stream without records")

    def explain(self, unit: str, *, corpus_path: str = "", use_llm: bool = False, n_top: int = 20, window: int = 64,
                include_records: bool = False) -> Explanation:
        """What a neuron, head or SAE latent responds to (local explainer; use_llm asks the endpoint the
        server's operator configured, falling back politely to the local explanation)."""
        return serde.explanation_from_proto(self._analysis("Explain", apb.ExplainRequest(
            unit=unit, corpus_path=corpus_path, use_llm=use_llm, n_top=n_top, window=window,
            include_records=include_records)))
