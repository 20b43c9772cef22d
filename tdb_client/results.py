"""Results of the Analysis service's calls: dataclasses and numpy arrays whose tables become DataFrames
(`to_pandas()`), never protobuf messages (`serde` converts them at the edge).

    t = tdb.node_table(prompt, Target(" Darcy", distractors=" Bingley"))   # NodeTableResult
    t.target.value; t.top.to_pandas(); t.to_pandas("bottom")
    sweep = tdb.patch_sweep(clean, corrupted, why)                         # PatchSweepResult
    sweep.normalized; sweep.to_csv("heads.csv")

`ResolvedTarget` is what the server made of a Target (also in circuits: `tdb_client.graph`).
`SweepStream` is a sweep in progress, filled chunk by chunk.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ._enums import METRICS, NODE_TYPE, NODE_TYPES
from .errors import TdbError
from .names import node_name

_SAE_LATENT = NODE_TYPE["sae_latent"]


def _pandas() -> Any:
    import pandas as pd

    return pd


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


def _id_frame(ids: np.ndarray, tokens: Sequence[str]) -> Any:
    pd = _pandas()

    def tok(p: int) -> str:
        return tokens[p] if 0 <= p < len(tokens) else ""

    return pd.DataFrame({
        "node": [node_name(t, layer, i, k) for t, layer, i, _, k in ids[:, :5].tolist()],
        "node_type": [NODE_TYPES.get(int(t), "?") for t in ids[:, 0]],
        "layer": ids[:, 1], "index": ids[:, 2], "query_pos": ids[:, 3], "key_pos": ids[:, 4],
        "token": [tok(p) for p in ids[:, 3].tolist()], "key_token": [tok(p) if t != _SAE_LATENT else "" for t, p in ids[:, [0, 4]].tolist()],
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


def _table(result: Any, which: str) -> Any:
    """A result's "top", "bottom" or "all" table (the last only when asked for with all_rows=True)."""
    table = getattr(result, which)
    if table is None:
        how = "verify_top=k" if which == "verification" else "all_rows=True"
        raise ValueError(f"this result has no `{which}` table: ask with {how}")
    return table


@dataclass(frozen=True)
class Verification:
    """`node_table(..., verify_top=k)`: the k heads / neurons with the largest |total effect|, the
    estimate beside the exact effect. Columns: `total_effect_estimate` (activation x gradient, first
    order) and `exact_zero_ablation` (target - target with that node zeroed at query_pos)."""

    ids: np.ndarray          # [k, 5], as NodeTable.ids; largest |estimate| first
    estimate: np.ndarray     # [k]
    exact: np.ndarray        # [k]
    value: float             # the target the exact column is measured from
    spearman: float          # rank agreement over the k rows
    pearson: float
    max_abs_error: float
    notes: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def to_pandas(self) -> Any:
        df = _id_frame(self.ids, self.tokens)
        df["total_effect_estimate"] = self.estimate
        df["exact_zero_ablation"] = self.exact
        df["error"] = self.estimate - self.exact
        return df


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
    verification: Verification | None = None   # when asked with verify_top=k

    def to_pandas(self, which: str = "top") -> Any:
        """which: "top", "bottom", "all" (needs all_rows=True) or "verification" (needs verify_top=k)."""
        return _table(self, which).to_pandas()


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
    steps: int                               # integrated gradients: the steps used, after refinement
    completeness_gap: float = float("nan")   # sum(integrated_gradients) - (target.value - baseline_value)
    tolerance: float = 0.0                   # the relative tolerance the steps were refined towards
    converged: bool = False                  # |completeness_gap| <= tolerance * |target.value - baseline_value|

    @property
    def completeness(self) -> float:
        """sum(integrated_gradients) / (target.value - baseline_value): 1.0 when they add up exactly."""
        change = self.target.value - self.baseline_value
        return float("nan") if change == 0 else (change + self.completeness_gap) / change

    def to_pandas(self) -> Any:
        pd = _pandas()
        df = pd.DataFrame({"position": np.arange(len(self.tokens)), "token": list(self.tokens)})
        if self.grad_x_input is not None:
            df["grad_x_input"] = self.grad_x_input
        if self.integrated_gradients is not None:
            df["integrated_gradients"] = self.integrated_gradients
        return df


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


@dataclass(frozen=True)
class SweepChunk:
    """One streamed piece of a sweep: exact or approximate cell values (at flat indices into the grid),
    progress, or the summary with the sweep's final notes."""

    indices: np.ndarray | None = None      # [cells] int64
    values: np.ndarray | None = None       # [cells]
    normalized: np.ndarray | None = None   # [cells]
    approximate: bool = False
    progress: SweepProgress | None = None
    summary: SweepSummary | None = None
    notes: tuple[str, ...] = ()


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

    def add(self, chunk: SweepChunk) -> None:
        """Merge one streamed chunk (values and progress, or the summary)."""
        if chunk.indices is not None:
            values, normalized = self.values, self.normalized
            if chunk.approximate:
                if self.approx_values is None:
                    self.approx_values = np.full(self.shape, np.nan, dtype=np.float32)
                    self.approx_normalized = self.approx_values.copy()
                values, normalized = self.approx_values, self.approx_normalized
            values.reshape(-1)[chunk.indices] = chunk.values
            normalized.reshape(-1)[chunk.indices] = chunk.normalized
        if chunk.progress is not None:
            self.progress = chunk.progress
        if chunk.summary is not None:
            self.summary = chunk.summary
            self.notes = chunk.notes or self.notes

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
    the server's work from any thread and keeps what arrived; `wait()` consumes the rest.

    It reads a stream of the sweep's header (a fresh PatchSweepResult) and then its chunks, already
    converted by the serde edge; `cancel` cancels that stream."""

    def __init__(self, messages: Iterable[PatchSweepResult | SweepChunk], cancel: Callable[[], Any]):
        self._messages = messages
        self._cancel = cancel
        self.result: PatchSweepResult | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[PatchSweepResult]:
        try:
            for m in self._messages:
                if isinstance(m, PatchSweepResult):
                    self.result = m
                else:
                    self.result.add(m)
                yield self.result
        except TdbError as err:
            if self.result is not None:
                self.result.error = err
            raise

    def cancel(self) -> None:
        self.cancelled = True
        self._cancel()

    def wait(self) -> PatchSweepResult:
        for _ in self:
            pass
        return self.result
