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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import grpc
import numpy as np

from tdb.v1 import analysis_pb2 as apb, analysis_pb2_grpc

from . import _wire
from ._rpc import _Stub
from .errors import TdbError
from .sae import SaeMixin

NODE_TYPES = {apb.NODE_HEAD: "head", apb.NODE_HEAD_PAIR: "head_pair", apb.NODE_NEURON: "neuron",
              apb.NODE_EMBED_TOKEN: "embed_token", apb.NODE_EMBED_POS: "embed_pos", apb.NODE_ATTN_BIAS: "attn_bias",
              apb.NODE_MLP_BIAS: "mlp_bias", apb.NODE_CONSTANT: "constant", apb.NODE_SAE_LATENT: "sae_latent"}
_NODE_TYPE_ENUM = {v: k for k, v in NODE_TYPES.items()}
METRICS = ("activation", "write_norm", "direct_effect", "total_effect")
_METRIC_ENUM = {"activation": apb.METRIC_ACTIVATION, "write_norm": apb.METRIC_WRITE_NORM,
                "direct_effect": apb.METRIC_DIRECT_EFFECT, "total_effect": apb.METRIC_TOTAL_EFFECT}
_METRIC_NAME = {v: k for k, v in _METRIC_ENUM.items()}
_KIND_ENUM = {"": apb.TARGET_KIND_UNSPECIFIED, "logit_diff": apb.TARGET_LOGIT_DIFF, "logit": apb.TARGET_LOGIT,
              "logprob": apb.TARGET_LOGPROB, "direction": apb.TARGET_DIRECTION}
_KIND_NAME = {v: k for k, v in _KIND_ENUM.items()}
_PART_ENUM = {"output": apb.HEAD_PART_OUTPUT, "q": apb.HEAD_PART_Q, "k": apb.HEAD_PART_K, "qk": apb.HEAD_PART_QK,
              "v": apb.HEAD_PART_V}
_ABLATION_ENUM = {"zero": apb.ABLATION_ZERO, "mean": apb.ABLATION_MEAN, "resample": apb.ABLATION_RESAMPLE}
_SWEEP_KIND_ENUM = {"resid_pre": apb.SWEEP_RESID_PRE, "attn_out": apb.SWEEP_ATTN_OUT, "mlp_out": apb.SWEEP_MLP_OUT,
                    "head_out": apb.SWEEP_HEAD_OUT, "head_q": apb.SWEEP_HEAD_Q, "head_k": apb.SWEEP_HEAD_K,
                    "head_v": apb.SWEEP_HEAD_V, "head_pattern": apb.SWEEP_HEAD_PATTERN, "neuron": apb.SWEEP_NEURON}
_SWEEP_KIND_NAME = {v: k for k, v in _SWEEP_KIND_ENUM.items()}
_SWEEP_DIRECTION_ENUM = {"denoising": apb.SWEEP_DENOISING, "noising": apb.SWEEP_NOISING}
_SWEEP_DIRECTION_NAME = {v: k for k, v in _SWEEP_DIRECTION_ENUM.items()}
_SWEEP_METHOD_ENUM = {"exact": apb.SWEEP_EXACT, "attribution": apb.SWEEP_ATTRIBUTION}
_SWEEP_METHOD_NAME = {v: k for k, v in _SWEEP_METHOD_ENUM.items()}
_INPUT_ATTR_ENUM = {"grad_x_input": apb.INPUT_ATTRIBUTION_GRAD_X_INPUT,
                    "integrated_gradients": apb.INPUT_ATTRIBUTION_INTEGRATED_GRADIENTS}

def _pandas() -> Any:
    import pandas as pd

    return pd


def _choice(value: str, table: dict, what: str) -> Any:
    if value not in table:
        raise ValueError(f"{what} must be one of {sorted(k for k in table if k)}, not {value!r}")
    return table[value]


def _input(prompt: Any, prepend_bos: bool = False) -> apb.Input:
    if isinstance(prompt, str):
        return apb.Input(prompt=prompt, prepend_bos=prepend_bos)
    return apb.Input(token_ids=[int(i) for i in prompt], prepend_bos=prepend_bos)


def _split(items: Any) -> tuple[list[str], list[int]]:
    items = [items] if isinstance(items, (str, int, np.integer)) else list(items or [])
    return [x for x in items if isinstance(x, str)], [int(x) for x in items if not isinstance(x, str)]


# --- requests -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What to explain: mean logit of `tokens` - mean logit of `distractors` (strings or token ids)
    at `position` (default last); kind "logit", "logprob" or "direction" (final residual . direction)."""

    tokens: Any = ()
    distractors: Any = ()
    kind: str = ""
    position: int | None = None
    direction: Any = None

    def to_proto(self) -> apb.Target:
        toks, tok_ids = _split(self.tokens)
        dist, dist_ids = _split(self.distractors)
        msg = apb.Target(kind=_choice(self.kind, _KIND_ENUM, "target kind"), tokens=toks, token_ids=tok_ids,
                         distractors=dist, distractor_ids=dist_ids)
        if self.position is not None:
            msg.position = int(self.position)
        if self.direction is not None:
            msg.direction.CopyFrom(_wire.to_wire(np.asarray(self.direction, dtype=np.float32)))
        return msg


def _target(t: Any) -> apb.Target:
    if isinstance(t, Target):
        return t.to_proto()
    if isinstance(t, (str, int, np.integer)):
        return Target(t).to_proto()
    raise TypeError(f"target must be a Target, a token string or a token id, not {type(t).__name__}")


@dataclass(frozen=True)
class Trace:
    """Upstream tracing: a neuron (its pre-activation) or a head (part: output | q | k | qk | v)."""

    node: str
    part: str = "output"
    position: int | None = None
    key_position: int | None = None

    def to_proto(self) -> apb.TraceNode:
        msg = apb.TraceNode(node=self.node, part=_choice(self.part, _PART_ENUM, "head part"))
        if self.position is not None:
            msg.position = int(self.position)
        if self.key_position is not None:
            msg.key_position = int(self.key_position)
        return msg


@dataclass(frozen=True)
class Ablation:
    """Ablate a node (head, neuron, blocks.L.attn, blocks.L.mlp, blocks.L; fnmatch patterns allowed)."""

    node: str
    method: str = "zero"
    positions: Sequence[int] = ()

    def to_proto(self) -> apb.Ablation:
        return apb.Ablation(node=self.node, method=_choice(self.method, _ABLATION_ENUM, "ablation method"),
                            positions=[int(p) for p in self.positions])


# --- results ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResolvedTarget:
    description: str
    kind: str
    token_ids: tuple[int, ...]
    distractor_ids: tuple[int, ...]
    position: int
    value: float
    exact: bool
    notes: tuple[str, ...]
    appended_ids: tuple[int, ...]

    @classmethod
    def from_proto(cls, m: apb.ResolvedTarget) -> "ResolvedTarget":
        return cls(m.description, _KIND_NAME.get(m.kind, ""), tuple(m.token_ids), tuple(m.distractor_ids),
                   m.position, m.value, m.exact, tuple(m.notes), tuple(m.appended_ids))


_BLOCK_KINDS = ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.out", "resid_mid",
                "mlp.pre", "mlp.post", "mlp.out", "resid_post")   # site codes of NODE_SAE_LATENT rows


def node_name(node_type: int, layer: int, index: int, key_pos: int = -1) -> str:
    """The node's name: blocks.L.attn.head.H, blocks.L.mlp.neuron.N, embed, ..."""
    kind = NODE_TYPES.get(int(node_type), "?")
    if kind in ("head", "head_pair"):
        return f"blocks.{layer}.attn.head.{index}"
    if kind == "neuron":
        return f"blocks.{layer}.mlp.neuron.{index}"
    if kind == "sae_latent":   # key_pos holds the site's code (its index in the site table)
        return f"blocks.{layer}.{_BLOCK_KINDS[key_pos]}.sae.latent.{index}" if 0 <= key_pos < len(_BLOCK_KINDS) else "?"
    return {"embed_token": "embed.token", "embed_pos": "embed.pos", "attn_bias": f"blocks.{layer}.attn.bias",
            "mlp_bias": f"blocks.{layer}.mlp.bias", "constant": "final_norm.bias+unembed.bias"}.get(kind, kind)


def _id_frame(ids: np.ndarray, tokens: Sequence[str]) -> Any:
    pd = _pandas()

    def tok(p: int) -> str:
        return tokens[p] if 0 <= p < len(tokens) else ""

    return pd.DataFrame({
        "node": [node_name(t, layer, i, k) for t, layer, i, _, k in ids[:, :5].tolist()],
        "node_type": [NODE_TYPES.get(int(t), "?") for t in ids[:, 0]],
        "layer": ids[:, 1], "index": ids[:, 2], "query_pos": ids[:, 3], "key_pos": ids[:, 4],
        "token": [tok(p) for p in ids[:, 3].tolist()], "key_token": [tok(p) if t != apb.NODE_SAE_LATENT else "" for t, p in ids[:, [0, 4]].tolist()],
    })


@dataclass(frozen=True)
class NodeTable:
    """Rows of nodes: ids [rows, 5] (node_type, layer, index, query_pos, key_pos; -1 = n/a) and
    metrics [rows, 4] (activation, write_norm, direct_effect, total_effect)."""

    ids: np.ndarray
    metrics: np.ndarray
    tokens: tuple[str, ...] = ()
    explanations: tuple[str, ...] = ()   # top / bottom: each row's latest explanation ("" = none yet)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nodes(self) -> list[str]:
        return [node_name(t, layer, i, k) for t, layer, i, _, k in self.ids[:, :5].tolist()]

    def column(self, metric: str) -> np.ndarray:
        return self.metrics[:, METRICS.index(metric)]

    def to_pandas(self) -> Any:
        df = _id_frame(self.ids, self.tokens)
        for j, name in enumerate(METRICS):
            df[name] = self.metrics[:, j]
        if len(self.explanations) == len(df):
            df["explanation"] = list(self.explanations)
        return df

    @classmethod
    def from_proto(cls, m: apb.NodeTable, tokens: Sequence[str]) -> "NodeTable":
        ids = _wire.from_wire(m.ids) if m.HasField("ids") else np.zeros((0, 5), np.int32)
        metrics = _wire.from_wire(m.metrics) if m.HasField("metrics") else np.zeros((0, 4), np.float32)
        return cls(ids.reshape(-1, 5), metrics.reshape(-1, 4), tuple(tokens), tuple(m.explanations))


def _table(result: Any, which: str) -> Any:
    """A result's "top", "bottom" or "all" table (the last only when asked for with all_rows=True)."""
    table = getattr(result, which)
    if table is None:
        raise ValueError("this result has no `all` table: ask with all_rows=True")
    return table


@dataclass(frozen=True)
class NodeTableResult:
    tokens: tuple[str, ...]
    token_ids: tuple[int, ...]
    target: ResolvedTarget        # the target, or the traced node
    direct_effect_sum: float      # equals target.value when target.exact
    top: NodeTable
    bottom: NodeTable
    all: NodeTable | None
    rank_by: str

    def to_pandas(self, which: str = "top") -> Any:
        """which: "top", "bottom" or "all" (needs all_rows=True)."""
        return _table(self, which).to_pandas()

    @classmethod
    def from_proto(cls, m: apb.NodeTableResponse) -> "NodeTableResult":
        toks = tuple(m.tokens)
        return cls(toks, tuple(m.token_ids), ResolvedTarget.from_proto(m.target), m.direct_effect_sum,
                   NodeTable.from_proto(m.top, toks), NodeTable.from_proto(m.bottom, toks),
                   NodeTable.from_proto(m.all, toks) if m.HasField("all") else None, _METRIC_NAME.get(m.rank_by, ""))


@dataclass(frozen=True)
class PairedNodeTable:
    """Aligned rows of two prompts: ids [rows, 5], left / right [rows, 4]; diff = left - right."""

    ids: np.ndarray
    left: np.ndarray
    right: np.ndarray
    left_tokens: tuple[str, ...] = ()
    right_tokens: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def diff(self) -> np.ndarray:
        return self.left - self.right

    def to_pandas(self) -> Any:
        df = _id_frame(self.ids, self.left_tokens)
        df = df.rename(columns={"token": "left_token"})
        df.insert(df.columns.get_loc("left_token") + 1, "right_token",
                  [self.right_tokens[p] if 0 <= p < len(self.right_tokens) else "" for p in self.ids[:, 3].tolist()])
        for j, name in enumerate(METRICS):
            df[f"left_{name}"] = self.left[:, j]
            df[f"diff_{name}"] = self.left[:, j] - self.right[:, j]
            df[f"right_{name}"] = self.right[:, j]
        return df

    @classmethod
    def from_proto(cls, m: apb.PairedNodeTable, left_tokens: Sequence[str], right_tokens: Sequence[str]) -> "PairedNodeTable":
        def arr(t: Any, n: int, dtype: Any) -> np.ndarray:
            return _wire.from_wire(t).reshape(-1, n) if t.shape else np.zeros((0, n), dtype)
        return cls(arr(m.ids, 5, np.int32), arr(m.left, 4, np.float32), arr(m.right, 4, np.float32),
                   tuple(left_tokens), tuple(right_tokens))


@dataclass(frozen=True)
class Comparison:
    left_tokens: tuple[str, ...]
    right_tokens: tuple[str, ...]
    left_target: ResolvedTarget
    right_target: ResolvedTarget
    top: PairedNodeTable      # largest left - right of rank_by first
    bottom: PairedNodeTable
    all: PairedNodeTable | None
    rank_by: str

    def to_pandas(self, which: str = "top") -> Any:
        """which: "top", "bottom" or "all" (needs all_rows=True)."""
        return _table(self, which).to_pandas()

    @classmethod
    def from_proto(cls, m: apb.CompareNodeTablesResponse) -> "Comparison":
        lt, rt = tuple(m.left_tokens), tuple(m.right_tokens)
        return cls(lt, rt, ResolvedTarget.from_proto(m.left_target), ResolvedTarget.from_proto(m.right_target),
                   PairedNodeTable.from_proto(m.top, lt, rt), PairedNodeTable.from_proto(m.bottom, lt, rt),
                   PairedNodeTable.from_proto(m.all, lt, rt) if m.HasField("all") else None,
                   _METRIC_NAME.get(m.rank_by, ""))


@dataclass(frozen=True)
class AblationEffect:
    node: str
    before: float
    after: float
    effect: float   # after - before


@dataclass(frozen=True)
class AblationResult:
    tokens: tuple[str, ...]
    target: ResolvedTarget
    before: float
    results: tuple[AblationEffect, ...]

    @property
    def after(self) -> float:
        """The target after the joint ablation (the first result)."""
        return self.results[0].after

    def to_pandas(self) -> Any:
        pd = _pandas()
        return pd.DataFrame([{"node": r.node, "before": r.before, "after": r.after, "effect": r.effect}
                             for r in self.results], columns=["node", "before", "after", "effect"])

    @classmethod
    def from_proto(cls, m: apb.AblateResponse) -> "AblationResult":
        return cls(tuple(m.tokens), ResolvedTarget.from_proto(m.target), m.before,
                   tuple(AblationEffect(r.node, r.before, r.after, r.effect) for r in m.results))


@dataclass(frozen=True)
class LogitLensResult:
    tokens: tuple[str, ...]
    sites: tuple[str, ...]
    positions: tuple[int, ...]
    top_ids: np.ndarray          # [sites, positions, k]
    top_logits: np.ndarray
    top_probs: np.ndarray
    top_tokens: np.ndarray       # [sites, positions, k] of str
    target_values: np.ndarray | None  # [sites, positions]
    target: ResolvedTarget | None

    def to_pandas(self) -> Any:
        """One row per (site, position, rank)."""
        pd = _pandas()
        rows = []
        for s, site in enumerate(self.sites):
            for p, pos in enumerate(self.positions):
                for r in range(self.top_ids.shape[2]):
                    row = {"site": site, "position": pos, "token": self.tokens[pos], "rank": r,
                           "top_id": int(self.top_ids[s, p, r]), "top_token": self.top_tokens[s, p, r],
                           "logit": float(self.top_logits[s, p, r]), "prob": float(self.top_probs[s, p, r])}
                    if self.target_values is not None:
                        row["target_value"] = float(self.target_values[s, p])
                    rows.append(row)
        return pd.DataFrame(rows)

    @classmethod
    def from_proto(cls, m: apb.LogitLensResponse) -> "LogitLensResult":
        ids = _wire.from_wire(m.top_ids)
        return cls(tuple(m.tokens), tuple(m.sites), tuple(m.positions), ids, _wire.from_wire(m.top_logits),
                   _wire.from_wire(m.top_probs), np.array(list(m.top_tokens), dtype=object).reshape(ids.shape),
                   _wire.from_wire(m.target_values) if m.HasField("target_values") else None,
                   ResolvedTarget.from_proto(m.target) if m.HasField("target") else None)


@dataclass(frozen=True)
class AttentionResult:
    tokens: tuple[str, ...]
    heads: tuple[int, ...]
    pattern: np.ndarray          # [heads, query_pos, key_pos]

    def to_pandas(self) -> Any:
        """One row per (head, query_pos, key_pos) with key_pos <= query_pos."""
        pd = _pandas()
        h, q, k = np.nonzero(np.tril(np.ones(self.pattern.shape[1:], dtype=bool))[None].repeat(len(self.heads), 0))
        return pd.DataFrame({"head": np.asarray(self.heads)[h], "query_pos": q, "key_pos": k,
                             "query_token": np.asarray(self.tokens, dtype=object)[q],
                             "key_token": np.asarray(self.tokens, dtype=object)[k], "prob": self.pattern[h, q, k]})


@dataclass(frozen=True)
class InputAttributionResult:
    tokens: tuple[str, ...]
    target: ResolvedTarget
    grad_x_input: np.ndarray | None          # [positions]
    integrated_gradients: np.ndarray | None  # [positions]
    baseline_value: float                    # the target at the baseline
    steps: int

    def to_pandas(self) -> Any:
        pd = _pandas()
        df = pd.DataFrame({"position": np.arange(len(self.tokens)), "token": list(self.tokens)})
        if self.grad_x_input is not None:
            df["grad_x_input"] = self.grad_x_input
        if self.integrated_gradients is not None:
            df["integrated_gradients"] = self.integrated_gradients
        return df

    @classmethod
    def from_proto(cls, m: apb.InputAttributionResponse) -> "InputAttributionResult":
        return cls(tuple(m.tokens), ResolvedTarget.from_proto(m.target),
                   _wire.from_wire(m.grad_x_input) if m.HasField("grad_x_input") else None,
                   _wire.from_wire(m.integrated_gradients) if m.HasField("integrated_gradients") else None,
                   m.baseline_value, m.steps)


@dataclass(frozen=True)
class SweepAxis:
    name: str              # "layer", "head", "kv_head", "neuron" or "position"
    values: np.ndarray     # the layer / head / neuron number or token position of each row


@dataclass(frozen=True)
class SweepProgress:
    stage: str             # "prepare", "exact", "attribution" or "verify"
    done: int
    total: int
    percent: float
    elapsed_s: float
    eta_s: float


@dataclass(frozen=True)
class SweepSummary:
    elapsed_s: float
    exact_patches: int
    chunks: int
    batch_size: int
    verified: int          # attribution: cells verified exactly
    pearson: float         # estimated vs exact effects on the verified cells
    spearman: float
    max_abs_error: float


@dataclass
class PatchSweepResult:
    """A patching sweep as a labelled grid (axes, e.g. layer x head), filled as chunks arrive.

    `values` is the raw target with each patch (exact; NaN = not computed: cancelled, or not verified
    under attribution patching); `normalized` = (value - corrupted) / (clean - corrupted), so 0 = the
    corrupted run's value and 1 = the clean run's. Attribution sweeps also carry `approx_values`
    (every cell). `complete` is False for a sweep that was cancelled or failed part-way."""

    kind: str
    direction: str
    method: str
    site: str
    tokens: tuple[str, ...]
    corrupted_tokens: tuple[str, ...]
    target: ResolvedTarget
    clean_value: float
    corrupted_value: float
    axes: tuple[SweepAxis, ...]
    values: np.ndarray
    normalized: np.ndarray
    approx_values: np.ndarray | None = None
    approx_normalized: np.ndarray | None = None
    batch_size: int = 0
    memory_budget_bytes: int = 0
    notes: tuple[str, ...] = ()
    progress: SweepProgress | None = None
    summary: SweepSummary | None = None
    error: Exception | None = None     # what ended the stream early, if anything

    @property
    def complete(self) -> bool:
        return self.summary is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def computed(self) -> int:
        """Cells with an exact value so far."""
        return int(np.count_nonzero(~np.isnan(self.values)))

    @classmethod
    def from_header(cls, h: apb.PatchSweepHeader) -> "PatchSweepResult":
        axes = tuple(SweepAxis(a.name, np.asarray(a.values, dtype=np.int64)) for a in h.axes)
        shape = tuple(len(a.values) for a in axes)
        nan = np.full(shape, np.nan, dtype=np.float32)
        return cls(_SWEEP_KIND_NAME.get(h.kind, ""), _SWEEP_DIRECTION_NAME.get(h.direction, ""),
                   _SWEEP_METHOD_NAME.get(h.method, ""), h.site, tuple(h.tokens), tuple(h.corrupted_tokens),
                   ResolvedTarget.from_proto(h.target), h.clean_value, h.corrupted_value, axes, nan, nan.copy(),
                   batch_size=h.batch_size, memory_budget_bytes=h.memory_budget_bytes, notes=tuple(h.notes))

    def add(self, m: apb.PatchSweepChunk) -> None:
        """Merge one streamed chunk (values and progress, or the summary)."""
        if m.HasField("values"):
            idx = _wire.from_wire(m.values.indices).astype(np.int64)
            vals, norm = _wire.from_wire(m.values.values), _wire.from_wire(m.values.normalized)
            if m.values.approximate:
                if self.approx_values is None:
                    self.approx_values = np.full(self.shape, np.nan, dtype=np.float32)
                    self.approx_normalized = self.approx_values.copy()
                self.approx_values.reshape(-1)[idx] = vals
                self.approx_normalized.reshape(-1)[idx] = norm
            else:
                self.values.reshape(-1)[idx] = vals
                self.normalized.reshape(-1)[idx] = norm
        if m.HasField("progress"):
            p = m.progress
            self.progress = SweepProgress(p.stage, p.done, p.total, p.percent, p.elapsed_s, p.eta_s)
        if m.HasField("summary"):
            s = m.summary
            self.summary = SweepSummary(s.elapsed_s, s.exact_patches, s.chunks, s.batch_size, s.verified, s.pearson,
                                        s.spearman, s.max_abs_error)
            self.notes = tuple(s.notes) or self.notes

    def to_pandas(self) -> Any:
        """One row per cell: the axes (plus the clean token at `position`), value, normalized,
        and for attribution sweeps approx_value, approx_normalized and verified."""
        pd = _pandas()
        grids = np.meshgrid(*[a.values for a in self.axes], indexing="ij")
        df = pd.DataFrame({a.name: g.reshape(-1) for a, g in zip(self.axes, grids)})
        if "position" in df:
            df["token"] = [self.tokens[p] if 0 <= p < len(self.tokens) else "" for p in df["position"].tolist()]
        df["value"] = self.values.reshape(-1)
        df["normalized"] = self.normalized.reshape(-1)
        if self.approx_values is not None:
            df["approx_value"] = self.approx_values.reshape(-1)
            df["approx_normalized"] = self.approx_normalized.reshape(-1)
            df["verified"] = ~np.isnan(df["value"].to_numpy())
        return df

    def to_csv(self, path: Any = None) -> str | None:
        """The to_pandas() table as CSV (to `path`, or returned as a string)."""
        return self.to_pandas().to_csv(path, index=False)

    def to_json(self) -> str:
        """Grid, axes and metadata as JSON (NaN -> null)."""
        def clean(a: np.ndarray | None) -> Any:
            if a is None:
                return None
            return [None if math.isnan(x) else x for x in a.reshape(-1).tolist()]
        doc = {"kind": self.kind, "direction": self.direction, "method": self.method, "site": self.site,
               "tokens": list(self.tokens), "corrupted_tokens": list(self.corrupted_tokens),
               "target": self.target.description, "clean_value": self.clean_value,
               "corrupted_value": self.corrupted_value,
               "axes": [{"name": a.name, "values": a.values.tolist()} for a in self.axes], "shape": list(self.shape),
               "values": clean(self.values), "normalized": clean(self.normalized),
               "approx_values": clean(self.approx_values), "approx_normalized": clean(self.approx_normalized),
               "complete": self.complete, "notes": list(self.notes),
               "summary": None if self.summary is None else {
                   k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                   for k, v in self.summary.__dict__.items()}}
        return json.dumps(doc, allow_nan=False)


class SweepStream:
    """A running sweep: iterate for progress (each step yields the partial `result`); `cancel()` stops
    the server's work from any thread and keeps what arrived; `wait()` consumes the rest."""

    def __init__(self, call: Any):
        self._call = call
        self.result: PatchSweepResult | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[PatchSweepResult]:
        try:
            for m in self._call:
                if m.HasField("header"):
                    self.result = PatchSweepResult.from_header(m.header)
                    if m.HasField("progress"):
                        self.result.progress = SweepProgress(m.progress.stage, 0, m.progress.total, 0.0, 0.0, 0.0)
                else:
                    self.result.add(m)
                yield self.result
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and self.cancelled:
                return
            err = TdbError.from_rpc(e)
            if self.result is None:
                raise err from None
            self.result.error = err
            raise err from None

    def cancel(self) -> None:
        self.cancelled = True
        self._call.cancel()

    def wait(self) -> PatchSweepResult:
        for _ in self:
            pass
        return self.result


# --- the mixin ----------------------------------------------------------------------------------

def _ablation_list(ablations: Any, method: str = "zero", positions: Sequence[int] = ()) -> list[Ablation]:
    """Names, patterns or Ablation objects (one or a sequence) -> Ablations (names take `method`, `positions`)."""
    items = [ablations] if isinstance(ablations, (str, Ablation)) else list(ablations or ())
    return [a if isinstance(a, Ablation) else Ablation(a, method, tuple(positions)) for a in items]


class _AnalysisStub(_Stub):
    """The Analysis service's stub; its streams are the raw calls (the result streams map their errors)."""

    def __init__(self, channel: grpc.Channel, timeout: float | None):
        super().__init__(channel, timeout, analysis_pb2_grpc.AnalysisStub)

    def stream(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return getattr(self._stub, method)(request, timeout=timeout)


class AnalysisMixin(SaeMixin):
    """The Analysis service's calls on TdbClient (needs `self._channel` and `self._rpc._timeout`)."""

    _channel: grpc.Channel

    @property
    def _analysis(self) -> _AnalysisStub:
        stub = self.__dict__.get("_analysis_stub")
        if stub is None:
            stub = self.__dict__["_analysis_stub"] = _AnalysisStub(self._channel, getattr(self._rpc, "_timeout", None))
        return stub

    @staticmethod
    def _table_options(top_k: int, rank_by: str | None, node_types: Sequence[str] | None) -> dict:
        if top_k < 0:
            raise ValueError("top_k must be >= 0")
        opts: dict[str, Any] = {"top_k": top_k, "node_types": [_choice(t, _NODE_TYPE_ENUM, "node type")
                                                               for t in (node_types or ())]}
        if rank_by is not None:
            opts["rank_by"] = _choice(rank_by, _METRIC_ENUM, "rank_by")
        return opts

    @staticmethod
    def _objective(target: Any, trace: Trace | None) -> dict:
        if (target is None) == (trace is None):
            raise ValueError("give a target or trace=Trace(...), not both")
        return {"target": _target(target)} if trace is None else {"trace": trace.to_proto()}

    def node_table(self, prompt: Any, target: Any = None, *, trace: Trace | None = None, top_k: int = 20,
                   rank_by: str | None = None, all_rows: bool = False, node_types: Sequence[str] | None = None,
                   ablations: Any = (), prepend_bos: bool = False) -> NodeTableResult:
        """Every head (per query position and per attended-to token), neuron, embedding row and bias
        with activation, write norm, direct effect and estimated total effect on `target` (or on the
        traced node); top_k / bottom_k by `rank_by` (default direct_effect; total_effect for tracing).
        `ablations` (heads, neurons, SAE latents: names, patterns or Ablation objects, zero or mean):
        the table of the forward with those ablated."""
        req = apb.NodeTableRequest(input=_input(prompt, prepend_bos), all_rows=all_rows,
                                   ablations=[a.to_proto() for a in _ablation_list(ablations)],
                                   **self._objective(target, trace), **self._table_options(top_k, rank_by, node_types))
        return NodeTableResult.from_proto(self._analysis("NodeTable", req))

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
        req = apb.CompareNodeTablesRequest(left=_input(left, prepend_bos), right=_input(right, prepend_bos),
                                           all_rows=all_rows, **self._objective(target, trace),
                                           ablations=[a.to_proto() for a in _ablation_list(ablations)],
                                           **self._table_options(top_k, rank_by, node_types))
        return Comparison.from_proto(self._analysis("CompareNodeTables", req))

    def ablate(self, prompt: Any, target: Any, ablations: Any, *, method: str = "zero", positions: Sequence[int] = (),
               separately: bool = False, reference: Sequence[Any] = (), source: Any = None,
               prepend_bos: bool = False) -> AblationResult:
        """Ablate nodes (names, patterns or Ablation objects; strings use `method` and `positions`)
        together, or each separately; returns the target before and after."""
        req = apb.AblateRequest(input=_input(prompt, prepend_bos), target=_target(target),
                                ablations=[a.to_proto() for a in _ablation_list(ablations, method, positions)],
                                separately=separately,
                                reference=[_input(r, prepend_bos) for r in reference])
        if source is not None:
            req.source.CopyFrom(_input(source, prepend_bos))
        return AblationResult.from_proto(self._analysis("Ablate", req))

    def logit_lens(self, prompt: Any, sites: Sequence[str] = (), *, positions: Sequence[int] = (), top_k: int = 5,
                   target: Any = None, prepend_bos: bool = False) -> LogitLensResult:
        """Final norm + unembedding of residual sites (default: embed and every resid_post)."""
        req = apb.LogitLensRequest(input=_input(prompt, prepend_bos), sites=list(sites),
                                   positions=[int(p) for p in positions], top_k=top_k)
        if target is not None:
            req.target.CopyFrom(_target(target))
        return LogitLensResult.from_proto(self._analysis("LogitLens", req))

    def attention_pattern(self, prompt: Any, layer: int, heads: Sequence[int] = (),
                          prepend_bos: bool = False) -> AttentionResult:
        r = self._analysis("AttentionPattern", apb.AttentionPatternRequest(
            input=_input(prompt, prepend_bos), layer=layer, heads=[int(h) for h in heads]))
        return AttentionResult(tuple(r.tokens), tuple(r.heads), _wire.from_wire(r.pattern))

    def input_attribution(self, prompt: Any, target: Any, *, methods: Sequence[str] = ("grad_x_input",
                          "integrated_gradients"), steps: int = 32, baseline_token_id: int | None = None,
                          prepend_bos: bool = False) -> InputAttributionResult:
        """Per-token gradient x input and integrated gradients (baseline: zero at `embed`, or the
        embedding of `baseline_token_id` at every position; sum(ig) ~= target.value - baseline_value)."""
        req = apb.InputAttributionRequest(input=_input(prompt, prepend_bos), target=_target(target), steps=steps,
                                          methods=[_choice(m, _INPUT_ATTR_ENUM, "method") for m in methods])
        if baseline_token_id is not None:
            req.baseline_token_id = int(baseline_token_id)
        return InputAttributionResult.from_proto(self._analysis("InputAttribution", req))

    def patch_sweep_stream(self, clean: Any, corrupted: Any, target: Any, *, kind: str = "head_out",
                           direction: str = "denoising", method: str = "exact", per_position: bool = False,
                           layers: Sequence[int] = (), positions: Sequence[int] = (), verify_top_k: int = 0,
                           max_batch: int = 0, prepend_bos: bool = False, timeout: float | None = None) -> SweepStream:
        """Start a patching sweep and return its stream (see patch_sweep for the arguments)."""
        req = apb.PatchSweepRequest(clean=_input(clean, prepend_bos), corrupted=_input(corrupted, prepend_bos),
                                    target=_target(target), kind=_choice(kind, _SWEEP_KIND_ENUM, "sweep kind"),
                                    direction=_choice(direction, _SWEEP_DIRECTION_ENUM, "direction"),
                                    method=_choice(method, _SWEEP_METHOD_ENUM, "method"), per_position=per_position,
                                    layers=[int(x) for x in layers], positions=[int(p) for p in positions],
                                    verify_top_k=int(verify_top_k), max_batch=int(max_batch))
        return SweepStream(self._analysis.stream("PatchSweep", req, timeout=timeout))

    def patch_sweep(self, clean: Any, corrupted: Any, target: Any, *, kind: str = "head_out",
                    direction: str = "denoising", method: str = "exact", per_position: bool = False,
                    layers: Sequence[int] = (), positions: Sequence[int] = (), verify_top_k: int = 0,
                    max_batch: int = 0, prepend_bos: bool = False, timeout: float | None = None,
                    on_progress: Callable[[PatchSweepResult], Any] | None = None) -> PatchSweepResult:
        """Activation patching between two prompts of the same token length, one patch per cell of a
        grid: kind resid_pre | attn_out | mlp_out (layer x position), head_out | head_q | head_k |
        head_v | head_pattern (layer x head, x position with per_position), neuron (layer x neuron).
        direction "denoising" patches clean activations into the corrupted run, "noising" the reverse.
        method "attribution" estimates every cell from 2 forwards + 1 backward and verifies the
        `verify_top_k` (default 20) largest estimated effects exactly. `on_progress(result)` is called
        after every chunk; returning False cancels the sweep (the partial result is returned)."""
        stream = self.patch_sweep_stream(clean, corrupted, target, kind=kind, direction=direction, method=method,
                                         per_position=per_position, layers=layers, positions=positions,
                                         verify_top_k=verify_top_k, max_batch=max_batch, prepend_bos=prepend_bos,
                                         timeout=timeout)
        for partial in stream:
            if on_progress is not None and on_progress(partial) is False:
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
        from .graph import CircuitStream

        req = apb.CircuitRequest(clean=_input(clean, prepend_bos), target=_target(target),
                                 ablation=_choice(ablation, {"corrupted": apb.CIRCUIT_ABLATION_CORRUPTED,
                                                             "mean": apb.CIRCUIT_ABLATION_MEAN}, "ablation"),
                                 verify_top_k=int(verify_top_k) if verify_top_k else -1, fraction=float(fraction),
                                 max_edges=int(max_edges), skip_circuit=skip_circuit)
        if corrupted is not None:
            req.corrupted.CopyFrom(_input(corrupted, prepend_bos))
        return CircuitStream(self._analysis.stream("Circuit", req, timeout=timeout))

    def circuit(self, clean: Any, corrupted: Any, target: Any, *, ablation: str = "corrupted",
                verify_top_k: int = 20, fraction: float = 0.8, max_edges: int = 0, skip_circuit: bool = False,
                prepend_bos: bool = False, timeout: float | None = None,
                on_progress: Callable[[Any], Any] | None = None) -> Any:
        """Edge attribution patching (EAP) over every edge upstream write -> head q / k / v, MLP, logits
        input between a clean and a corrupted prompt of the same token length (ablation "mean": each write
        replaced by its mean over positions, corrupted may be None); the `verify_top_k` strongest edges
        path-patched exactly (rank correlation reported); the smallest top-EAP circuit whose faithfulness
        reaches `fraction`. -> tdb_client.graph.CircuitResult (`.circuit` is a Graph)."""
        return self.circuit_stream(clean, corrupted, target, ablation=ablation, verify_top_k=verify_top_k,
                                   fraction=fraction, max_edges=max_edges, skip_circuit=skip_circuit,
                                   prepend_bos=prepend_bos, timeout=timeout).wait(on_progress)

    def information_flow(self, prompt: Any, *, position: int = -1, threshold: float = 0.04,
                         prepend_bos: bool = False) -> Any:
        """Information-flow routes to `position` from one forward (no corrupted prompt):
        -> tdb_client.graph.FlowResult (`.graph` is a Graph over residual states per layer and position)."""
        from .graph import FlowResult

        req = apb.InformationFlowRequest(input=_input(prompt, prepend_bos), position=int(position),
                                         threshold=float(threshold))
        return FlowResult.from_proto(self._analysis("InformationFlow", req))
