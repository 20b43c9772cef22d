"""Circuits as edge sets: pruning edges that cannot matter, faithfulness by edge ablation (measured
exactly with the split forward, batched), and extraction of the smallest top-EAP circuit reaching a
faithfulness fraction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tdb_server.errors import InvalidArgument
from tdb_server.model import ModelAdapter

from .scores import EdgeScores
from .split import RowPlan, SplitRun, check_stop, chunks, model_device, model_dtype, split_forward
from .topology import Topology, block_input, inputs_of
from .writes import bias_in_inputs

Circuit = set[tuple[int, int]]   # edges (sender index, receiver index)


def prune(topo: Topology, circuit: Circuit, ablation: str = "corrupted") -> Circuit:
    """Drop edges that cannot change the circuit's target, to a fixed point:
    * into a receiver whose node sends nothing in the circuit (its output then reaches every receiver
      as the ablated write), unless the receiver is the logits;
    * (corrupted ablation only) from a head / MLP none of whose inputs is in the circuit: it then reads
      exactly the corrupted run's inputs, so it writes its corrupted write and the edge carries zero."""
    inputs = inputs_of(topo)
    nodes_of: dict[int, set[int]] = {}                 # receiver -> the senders it is an input of
    for s, rs in inputs.items():
        for r in rs:
            nodes_of.setdefault(r, set()).add(s)
    circuit = set(circuit)
    while True:
        fed = {r for _, r in circuit}
        sending = {s for s, _ in circuit}
        keep = set()
        for s, r in circuit:
            alive_in = (ablation != "corrupted" or topo.senders[s].kind == "embed"
                        or any(x in fed for x in inputs[s]))
            alive_out = topo.receivers[r].input == "logits" or bool(nodes_of.get(r, set()) & sending)
            if alive_in and alive_out:
                keep.add((s, r))
        if keep == circuit:
            return circuit
        circuit = keep


def faithfulness_values(adapter: ModelAdapter, scores: EdgeScores, circuits: list[Circuit],
                        should_stop: Callable[[], bool] | None = None) -> list[float]:
    """The target of each circuit run (edge ablation, see the package docstring), batched."""
    topo = scores.topology
    device, dtype = model_device(adapter), model_dtype(adapter)
    abl = scores.ablated_writes.to(device)                                  # [S, T, D]
    # ablated_base_r = the ablated writes that reach r + the biases r's input holds, [R, T, D]
    base = torch.einsum("sr,std->rtd", topo.reach.float().to(device), abl) + bias_in_inputs(adapter, topo).to(device)
    plans: list[RowPlan] = []
    for c in circuits:
        into: dict[int, list[int]] = {}
        for s, r in c:
            into.setdefault(r, []).append(s)

        def make(run: SplitRun, i: int, r: int, own: torch.Tensor, into=into) -> torch.Tensor:
            x = base[r]
            if r in into:
                now = run.written(i)                                         # [S so far, T, D]
                x = x + sum(now[s] - abl[s] for s in into[r])
            return x.to(dtype)

        # receivers fed by the circuit read inputs of their own; the others share one per block input
        shared: dict[str, list[int]] = {}
        groups = [[r] for r in sorted(into)]
        for r, rec in enumerate(topo.receivers):
            if r not in into:
                shared.setdefault(block_input(topo, rec), []).append(r)
        plans.append(RowPlan(groups + list(shared.values()), make, record=True))
    out: list[float] = []
    with torch.no_grad():
        for chunk in chunks(topo, plans, device):
            check_stop(should_stop)
            out += [float(v) for v in split_forward(adapter, topo, scores.ids, chunk, scores.target)]
    return out


@dataclass
class CircuitResult:
    edges: list[tuple[int, int]]      # the circuit, largest |score| first
    faithfulness: float               # (circuit - ablated) / (clean - ablated)
    circuit_value: float
    fraction: float                   # asked for
    curve: list[tuple[int, int, float]] = field(default_factory=list)  # (top-k edges tried, kept after pruning, faithfulness)


def _doubling(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def extract_circuit(adapter: ModelAdapter, scores: EdgeScores, fraction: float = 0.8, max_edges: int = 0,
                    should_stop: Callable[[], bool] | None = None) -> CircuitResult:
    """Smallest top-k (by |EAP score|, pruned) whose faithfulness reaches `fraction`: a doubling search
    over k, then bisection; every candidate is measured exactly (edge-ablated forwards, batched)."""
    if not 0.0 < fraction <= 1.0:
        raise InvalidArgument(f"fraction must be in (0, 1]; got {fraction}", reason="OUT_OF_RANGE")
    topo = scores.topology
    ranked = scores.edges()
    if max_edges > 0:
        ranked = ranked[:max_edges]
    denom = scores.clean_value - scores.ablated_value
    if abs(denom) < 1e-9:
        raise InvalidArgument("the clean and ablated runs give the same target: nothing to explain",
                              reason="NO_EFFECT")
    curve: dict[int, tuple[int, float, float, Circuit]] = {}   # k -> (edges kept, faithfulness, value, circuit)

    def measure(ks: list[int]) -> None:
        ks = [k for k in dict.fromkeys(ks) if k not in curve]
        circuits = [prune(topo, set(ranked[:k]), scores.ablation) for k in ks]
        values = faithfulness_values(adapter, scores, circuits, should_stop)
        for k, c, v in zip(ks, circuits, values):
            curve[k] = (len(c), (v - scores.ablated_value) / denom, v, c)

    measure(_doubling(len(ranked)))
    hit = [k for k in sorted(curve) if curve[k][1] >= fraction]
    best = hit[0] if hit else len(ranked)
    if hit:   # bisection between the last miss and the first hit
        lo = max([k for k in curve if k < best], default=0)
        while best - lo > 1:
            mid = (lo + best) // 2
            measure([mid])
            if curve[mid][1] >= fraction:
                best = mid
            else:
                lo = mid
    _, faith, value, circuit = curve[best]
    order = {e: i for i, e in enumerate(ranked)}
    edges = sorted(circuit, key=order.__getitem__)
    return CircuitResult(edges, faith, value, fraction, [(k, curve[k][0], curve[k][1]) for k in sorted(curve)])
