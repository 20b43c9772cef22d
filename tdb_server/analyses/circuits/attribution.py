"""Edge attribution (EAP: two forwards, one split forward, one backward for every edge's score) and
exact path patching of chosen edges, the definition EAP approximates (`verify` compares the two)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tdb_server.model import ModelAdapter

from ..inputs import Target
from ..stats import pearson, spearman
from .faithfulness import faithfulness_values
from .scores import EdgeScores, check_pair
from .split import RowPlan, SplitRun, check_stop, chunks, model_device, model_dtype, split_forward
from .topology import Topology, topology
from .writes import mean_writes, run_prompt

DEFAULT_VERIFY = 20


def receiver_grads(adapter: ModelAdapter, topo: Topology, ids: list[int], target: Target) -> tuple[torch.Tensor, float]:
    """G [R, T, D]: d target / d input_r for every receiver on the run of `ids` (split forward with a zero
    leaf per receiver, one backward), and the target's value."""
    T, D = len(ids), adapter.info.d_model
    eps = torch.zeros(len(topo.receivers), T, D, dtype=model_dtype(adapter), device=model_device(adapter),
                      requires_grad=True)                                        # [R, T, D]

    def plus_eps(run: SplitRun, i: int, r: int, own: torch.Tensor) -> torch.Tensor:
        return own + eps[r]

    plan = RowPlan([[r] for r in range(len(topo.receivers))], plus_eps)
    with torch.enable_grad():
        value = split_forward(adapter, topo, ids, [plan], target, grad=True)
        value[0].backward()
    return eps.grad.float(), float(value[0].detach())


def edge_attribution(adapter: ModelAdapter, ids: list[int], target: Target, corrupted: list[int] | None = None,
                     ablation: str = "corrupted") -> EdgeScores:
    """EAP scores of every edge: 2 forwards (clean, corrupted) + 1 split forward + 1 backward."""
    check_pair(ids, corrupted, ablation)
    t0 = time.perf_counter()
    topo = topology(adapter.info)
    clean = run_prompt(adapter, topo, ids, target)
    if ablation == "corrupted":
        bad = run_prompt(adapter, topo, corrupted, target)
        ablated, ablated_value = bad.writes, bad.value
    else:
        ablated, ablated_value = mean_writes(clean.writes), float("nan")
    G, _ = receiver_grads(adapter, topo, ids, target)                      # [R, T, D]
    delta = (ablated - clean.writes).to(G.device)                           # [S, T, D]
    scores = torch.einsum("std,rtd->sr", delta, G).cpu() * topo.reach
    e = EdgeScores(topo, scores, target, clean.value, ablated_value, clean, ablated.cpu(), ablation, ids,
                   list(corrupted or []))
    if ablation == "mean":   # the reference for faithfulness: the circuit with no edge at all
        e.ablated_value = faithfulness_values(adapter, e, [set()])[0]
    e.elapsed_s = time.perf_counter() - t0
    return e


def path_patch(adapter: ModelAdapter, scores: EdgeScores, edges: list[tuple[int, int]],
               should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Exact effect of each edge (s, r): target(clean run, input_r += Delta_s) - target(clean), [n] float32."""
    topo = scores.topology
    device, dtype = model_device(adapter), model_dtype(adapter)
    delta = (scores.ablated_writes - scores.clean.writes)                     # [S, T, D]
    deltas = {s: delta[s].to(device=device, dtype=dtype) for s in {s for s, _ in edges}}
    plans = []
    for s, r in edges:
        def add(run: SplitRun, i: int, rr: int, own: torch.Tensor, d: torch.Tensor = deltas[s]) -> torch.Tensor:
            return own + d
        plans.append(RowPlan([[r]], add))
    out = []
    with torch.no_grad():
        for chunk in chunks(topo, plans, device):
            check_stop(should_stop)
            out.append(split_forward(adapter, topo, scores.ids, chunk, scores.target).float().cpu())
    return (torch.cat(out) - scores.clean_value) if out else torch.zeros(0)


@dataclass
class Verification:
    edges: list[tuple[int, int]]
    approx: torch.Tensor          # [n] EAP scores
    exact: torch.Tensor           # [n] path-patching effects
    spearman: float
    pearson: float
    max_abs_error: float


def verify(adapter: ModelAdapter, scores: EdgeScores, top_k: int = DEFAULT_VERIFY,
           should_stop: Callable[[], bool] | None = None) -> Verification:
    """Path-patch the top_k edges by |EAP score|; rank correlation of the approximation with exact."""
    edges = scores.edges()[:top_k]
    approx = torch.tensor([float(scores.scores[s, r]) for s, r in edges])
    exact = path_patch(adapter, scores, edges, should_stop)
    err = float((approx - exact).abs().max()) if edges else float("nan")
    return Verification(edges, approx, exact, spearman(approx, exact), pearson(approx, exact), err)
