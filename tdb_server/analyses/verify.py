"""Estimates beside exact effects: the node table's total effect of a head or neuron at a position is
activation x gradient, a first-order estimate of what zeroing it there would take from the target.
It can be far off (on the `induction` model, head 1.3 at the last position is estimated 1.70 where
zeroing it drops the target by 5.45). `verify_estimates` puts the exact drop beside the estimate for
the k heads / neurons with the largest |estimate|, and says how well the two agree:

| column     | meaning                                                                          |
|------------|----------------------------------------------------------------------------------|
| `estimate` | the table's total_effect: activation . d target / d activation (first order)     |
| `exact`    | target - target with that node zeroed at that query position, everything else as in the table's forward (its ablations too) |

Batched the way sweeps verify attribution patching (sweeps.py, resume.py): one recorded forward, then
the zero ablations many to a forward, one per batch row, sorted by layer so that a row joins the batch
at its node's block, starting from the recorded residual stream (blocks before it are never re-run);
only the target's row of the final residual stream is read. Each ablation is an `Intervention`
(op zero, selector = its batch row and position), the same one the Ablate analysis applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tdb_server.model.capture import Capture
from tdb_server.model.interventions import Edits, Intervention, Selector
from tdb_server.model.sites import parse_unit

from .inputs import Target
from .node_rows import HEAD, NEURON
from .resume import read_target, recording_blocks
from .stats import pearson, spearman
from .sweeps import MAX_BATCH, bytes_per_patch, memory_budget

MAX_VERIFY = 1000   # rows verified in one request


@dataclass
class Verification:
    """The k verified rows, largest |estimate| first."""

    ids: torch.Tensor          # [k, 5] int32, the node table's ID_COLUMNS
    estimate: torch.Tensor     # [k] float32, total_effect (activation x gradient)
    exact: torch.Tensor        # [k] float32, target - target with the node zeroed at query_pos
    value: float               # the target as the exact column measures it (ablations of the table applied)
    spearman: float            # rank agreement of estimate and exact over the k rows
    pearson: float
    max_abs_error: float       # max |estimate - exact|
    notes: list[str] = field(default_factory=list)


def candidates(ids: torch.Tensor, metrics: torch.Tensor, k: int) -> torch.Tensor:
    """Row indices of the k heads / neurons with the largest |total_effect| (finite), largest first."""
    kind = ids[:, 0]
    est = metrics[:, 3]
    ok = ((kind == HEAD) | (kind == NEURON)) & torch.isfinite(est)
    rows = ok.nonzero().flatten()
    order = torch.argsort(est[rows].abs(), descending=True, stable=True)
    return rows[order[:k]]


def _batch_size(adapter, T: int) -> int:
    device = adapter.model.get_input_embeddings().weight.device
    dtype = adapter.model.get_input_embeddings().weight.dtype
    fit = max(1, memory_budget(device) // bytes_per_patch(adapter.info, T, dtype))
    return int(min(fit, MAX_BATCH.get(device.type, MAX_BATCH["cuda"])))


def _zero(adapter, row: int, node_type: int, layer: int, index: int, pos: int) -> Intervention:
    info = adapter.info
    name = f"blocks.{layer}.attn.head.{index}" if node_type == HEAD else f"blocks.{layer}.mlp.neuron.{index}"
    unit = parse_unit(name, info.n_layers, info.n_heads, info.d_mlp)
    return Intervention(name, unit.site, "zero", Selector(batch=[row], positions=[pos]), unit=unit)


def zero_ablated_values(adapter, token_ids: list[int], target: Target, nodes: torch.Tensor,
                        ablations: list[Intervention]) -> tuple[float, torch.Tensor]:
    """(target, target with each node zeroed [n]) for nodes [n, 5] (heads / neurons, ID_COLUMNS), the
    prompt's forward carrying `ablations` in every row."""
    n_layers, p = adapter.info.n_layers, target.position
    last = f"blocks.{n_layers - 1}.resid_post"
    base = Edits(ablations)
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        with recording_blocks(adapter) as calls:
            cap = Capture({last}, edit=base if ablations else None, edit_sites=base.sites)
            adapter.forward(ids, cap, logits_at=[p])
        before = float(read_target(adapter, target, cap[last][:, p])[0])
        after = torch.empty(len(nodes))
        order = torch.argsort(nodes[:, 1], stable=True)          # by layer: rows join the batch at their block
        size = _batch_size(adapter, len(token_ids))
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            after[chunk] = _resumed(adapter, calls, target, nodes[chunk].tolist(), ablations)
    return before, after


def _resumed(adapter, calls, target: Target, nodes: list[list[int]], ablations: list[Intervention]) -> torch.Tensor:
    """One growing batch (nodes sorted by layer): row b zeroes node b; the target of each row [n]."""
    zeros = [_zero(adapter, b, t, layer, index, pos) for b, (t, layer, index, pos, _) in enumerate(nodes)]
    edits = Edits(list(ablations) + zeros)
    handler = Capture((), edit=edits, edit_sites=edits.sites)
    layers = torch.tensor([n[1] for n in nodes])
    hidden = None
    with adapter.running(handler):
        for layer in range(int(layers[0]), adapter.info.n_layers):
            fresh = int((layers == layer).sum())
            if fresh:
                base = calls.resid_pre[layer]                                     # [1, T, D]
                rows = base.expand(fresh, *base.shape[1:])                       # [fresh, T, D]
                hidden = rows.clone() if hidden is None else torch.cat([hidden, rows])
            hidden = calls.block(layer, hidden)
    return read_target(adapter, target, hidden[:, target.position]).cpu()        # [n]


def verify_estimates(adapter, token_ids: list[int], target: Target, table, k: int,
                     ablations: list[Intervention], value: float) -> Verification:
    """The exact zero-ablation effect of the k heads / neurons of `table` (a NodeTable) with the largest
    |total_effect|, beside that estimate. `value`: the table's target value (a note says if the exact
    forward's differs by more than float rounding)."""
    rows = candidates(table.ids, table.metrics, k)
    ids, estimate = table.ids[rows], table.metrics[rows, 3]
    notes = []
    if len(rows) == 0:
        return Verification(ids, estimate, estimate.clone(), value, float("nan"), float("nan"), float("nan"),
                            ["no head or neuron rows with a total effect to verify"])
    before, after = zero_ablated_values(adapter, token_ids, target, ids, ablations)
    if abs(before - value) > 1e-3 * max(1.0, abs(value)):
        notes.append(f"the exact forward reads the target as {before:.6g}, the table {value:.6g}")
    exact = (before - after).float()
    return Verification(ids, estimate, exact, before, spearman(estimate, exact), pearson(estimate, exact),
                        float((estimate - exact).abs().max()), notes)
