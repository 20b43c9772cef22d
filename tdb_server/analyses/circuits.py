"""Circuits: edge attribution (EAP), exact path patching of edges, circuit extraction, faithfulness.

The graph is the model's residual-stream graph. *Senders* write into the residual stream; *receivers*
read from it; an edge is one sender's write as seen by one receiver's input:

| sender                    | writes (per position)      | receiver                               | input                     |
|---------------------------|----------------------------|----------------------------------------|---------------------------|
| `embed`                   | the embed site             | `blocks.L.attn.head.H` via q           | resid_pre L -> q of H     |
| `blocks.L.attn.head.H`    | z[:, H] @ W_O[H]           | `blocks.L.attn.head.H` via k, v        | resid_pre L -> k / v of H |
| `blocks.L.mlp`            | blocks.L.mlp.out           | `blocks.L.mlp` via mlp                 | resid_mid L (parallel blocks: resid_pre L) |
|                           |                            | `logits` via logits                    | the final residual        |

Under GQA the k / v receivers are KV heads, `blocks.L.attn.kv_head.G` (a key is shared by its query
group, so it cannot be patched for one query head alone). Biases (b_O) are nobody's: they are the
same in every run. Sender s can reach receiver r when s is `embed`, or s's layer is below r's, or s
is a head and r the MLP of the same (sequential) block.

**Edge attribution (EAP)**: with Delta_s = write_s(corrupted) - write_s(clean) ([T, D]) and
G_r = d target / d input_r on the clean run ([T, D]), the edge score is
    eap(s -> r) = sum_t Delta_s[t] . G_r[t]   ~   target(edge s -> r corrupted) - target(clean).
G_r is the gradient through receiver r alone (its input is split from everybody else's), the
*total* derivative: everything downstream of r recomputes. All G_r come from one forward + one
backward (see the split forward below).

**Exact path patching** (what EAP approximates, and the definition tested): run the clean prompt;
receiver r alone reads input_r = clean input_r + Delta_s; every other receiver reads its own input as
computed in this run; everything downstream of r recomputes (other receivers see r's changed output).
    exact(s -> r) = target(that run) - target(clean).

**Circuit faithfulness** (edge ablation): every receiver r reads
    input_r = ablated_base_r + sum over circuit edges s -> r of (write_s(this run) - write_s(ablated))
where ablated_base_r is the residual stream that r reads in the ablated run (the corrupted prompt,
or every write replaced by its mean over positions on the clean prompt); so an edge outside the circuit carries the
ablated write and an edge inside it carries what the sender writes in this run. With every edge in,
this is the clean run; with none, the ablated one.
    faithfulness = (target(circuit) - target(ablated)) / (target(clean) - target(ablated)).

**The split forward** (`SplitRun`): one batched forward of the real HF model in which row `real`
is the run and each receiver r of it that needs its own input gets an *aux row*: at r's block the
aux row's stream is overwritten with input_r, and the real row takes r's value from the aux row at
r's own site (q / k / v of head H: `attn.q/k/v[:, :, H]`; the MLP: `mlp.out`; logits: the final
residual is set directly). Aux rows' other values are never read. The HF modules do the work (norms,
RoPE, GQA, gated MLPs), so nothing is re-implemented. With input_r = own input + eps_r (a zero leaf)
one backward gives every G_r; with input_r = own input + Delta_s it is exact path patching; with
the faithfulness inputs above it is a circuit run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from tdb_server.errors import Cancelled, InvalidArgument

from .inputs import Target
from .registry import register
from .stats import pearson, spearman

ABLATIONS = ("corrupted", "mean")
INPUTS = ("q", "k", "v", "mlp", "logits")
DEFAULT_VERIFY = 20
MAX_ROWS = {"cpu": 256, "cuda": 2048}   # rows per split forward


# --- the graph's vertices ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Sender:
    name: str       # "embed" | "blocks.L.attn.head.H" | "blocks.L.mlp"
    kind: str       # "embed" | "head" | "mlp"
    layer: int      # -1 for embed
    index: int = 0  # head index


@dataclass(frozen=True)
class Receiver:
    node: str       # "blocks.L.attn.head.H" (GQA k/v: "blocks.L.attn.kv_head.G") | "blocks.L.mlp" | "logits"
    input: str      # "q" | "k" | "v" | "mlp" | "logits"
    layer: int      # n_layers for logits
    index: int = 0  # head (q), KV head (k, v)

    @property
    def name(self) -> str:
        return self.node if self.input in ("mlp", "logits") else f"{self.node}.{self.input}"


@dataclass(frozen=True)
class Topology:
    senders: list[Sender]
    receivers: list[Receiver]
    reach: torch.Tensor          # [S, R] bool: sender s can reach receiver r
    n_layers: int
    parallel: bool

    def sender_index(self, name: str) -> int:
        return next(i for i, s in enumerate(self.senders) if s.name == name)

    def receiver_index(self, name: str) -> int:
        return next(i for i, r in enumerate(self.receivers) if r.name == name)


def topology(info) -> Topology:
    n, H, Hkv = info.n_layers, info.n_heads, info.n_kv_heads
    kv = "kv_head" if Hkv != H else "head"
    senders = [Sender("embed", "embed", -1)]
    receivers: list[Receiver] = []
    for L in range(n):
        senders += [Sender(f"blocks.{L}.attn.head.{h}", "head", L, h) for h in range(H)]
        senders.append(Sender(f"blocks.{L}.mlp", "mlp", L))
        receivers += [Receiver(f"blocks.{L}.attn.head.{h}", "q", L, h) for h in range(H)]
        for part in ("k", "v"):
            receivers += [Receiver(f"blocks.{L}.attn.{kv}.{g}", part, L, g) for g in range(Hkv)]
        receivers.append(Receiver(f"blocks.{L}.mlp", "mlp", L))
    receivers.append(Receiver("logits", "logits", n))
    reach = torch.zeros(len(senders), len(receivers), dtype=torch.bool)
    for i, s in enumerate(senders):
        for j, r in enumerate(receivers):
            same_block = s.kind == "head" and r.input == "mlp" and not info.parallel_blocks
            reach[i, j] = s.kind == "embed" or s.layer < r.layer or (s.layer == r.layer and same_block)
    return Topology(senders, receivers, reach, n, info.parallel_blocks)


# --- one ordinary forward: every sender's write -----------------------------------------------------

class _WriteCapture:
    """Captures embed, attn.z and mlp.out of a forward (row 0), and the final residual."""

    def __init__(self, n_layers: int):
        self.last = f"blocks.{n_layers - 1}.resid_post"
        self.sites = frozenset({"embed", self.last} | {f"blocks.{L}.{k}" for L in range(n_layers)
                                                       for k in ("attn.z", "mlp.out")})
        self.values: dict[str, torch.Tensor] = {}

    def on_site(self, site: str, value: torch.Tensor) -> None:
        self.values[site] = value.detach()


def head_writes(adapter, layer: int, z: torch.Tensor) -> torch.Tensor:
    """z [..., T, H, Dh] -> per-head writes [..., H, T, D] (float32)."""
    W_O = adapter.W_O(layer).float().to(z.device)                   # [H, Dh, D]
    return torch.einsum("...thd,hde->...hte", z.float(), W_O)


def sender_writes(adapter, topo: Topology, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Captured sites (batch row 0) -> writes [S, T, D] in `topo.senders` order, float32."""
    rows = [values["embed"][0].float()[None]]
    for L in range(topo.n_layers):
        rows.append(head_writes(adapter, L, values[f"blocks.{L}.attn.z"][0]))    # [H, T, D]
        rows.append(values[f"blocks.{L}.mlp.out"][0].float()[None])
    return torch.cat(rows)


@dataclass
class PromptRun:
    ids: list[int]
    writes: torch.Tensor        # [S, T, D]
    value: float                # the target
    final: torch.Tensor         # [T, D] final residual


def run_prompt(adapter, topo: Topology, ids: list[int], target: Target) -> PromptRun:
    cap = _WriteCapture(topo.n_layers)
    logits = adapter.forward(torch.tensor([ids]), handler=cap)
    final = cap.values[cap.last]
    value = float(target.read(logits, final)[0])
    return PromptRun(ids, sender_writes(adapter, topo, cap.values), value, final[0].float())


def mean_writes(writes: torch.Tensor) -> torch.Tensor:
    """[S, T, D] -> each sender's write replaced by its mean over positions, [S, T, D]."""
    return writes.mean(1, keepdim=True).expand_as(writes).clone()


# --- the split forward ------------------------------------------------------------------------------

# (run, plan index, receiver index, the real row's own input at r's block [T, D]) -> input_r [T, D]
InputFn = Callable[["SplitRun", int, int, torch.Tensor], torch.Tensor]


@dataclass
class RowPlan:
    """One real row: groups of receivers that read an input of their own (each group shares one aux
    row, so its receivers must read the same input at the same block; `input_fn` is called with the
    group's first receiver), and how that input is made."""

    groups: list[list[int]]              # receiver indices (into Topology.receivers)
    input_fn: InputFn
    record: bool = False                 # keep this row's sender writes (faithfulness needs them)

    def rows(self, topo: Topology) -> int:
        """Batch rows this plan takes: the real row and one per group (none for the logits)."""
        return 1 + sum(1 for g in self.groups if topo.receivers[g[0]].input != "logits")


def _block_input(topo: Topology, r: Receiver) -> str:
    if r.input == "logits":
        return f"blocks.{topo.n_layers - 1}.resid_post"
    return f"blocks.{r.layer}.{'resid_mid' if r.input == 'mlp' and not topo.parallel else 'resid_pre'}"


class SplitRun:
    """Site handler of the split forward (see the module docstring). Rows: for each plan, the real row
    then its aux rows, in plan order. The logits receiver needs no aux row: the real row's final
    residual is set directly. `final` holds the real rows' final residuals after the forward."""

    def __init__(self, adapter, topo: Topology, plans: list[RowPlan]):
        self.adapter, self.topo, self.plans = adapter, topo, plans
        self.real: list[int] = []
        self.inputs: dict[str, list[tuple[int, int, int]]] = {}    # site -> [(plan, receiver, row to set)]
        self.takes: dict[str, list[tuple[int, int, int]]] = {}     # site -> [(plan, receiver, aux row)]
        logits = len(topo.receivers) - 1
        row = 0
        for i, plan in enumerate(plans):
            self.real.append(row)
            real = row
            row += 1
            for group in plan.groups:
                first = topo.receivers[group[0]]
                if first.input == "logits":
                    self.inputs.setdefault(_block_input(topo, first), []).append((i, logits, real))
                    continue
                site = _block_input(topo, first)
                for r in group:
                    if _block_input(topo, topo.receivers[r]) != site:
                        raise ValueError("a receiver group must read one block input")
                    take = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "mlp": "mlp.out"}[topo.receivers[r].input]
                    self.takes.setdefault(f"blocks.{first.layer}.{take}", []).append((i, r, row))
                self.inputs.setdefault(site, []).append((i, group[0], row))
                row += 1
        self.batch = row
        n = topo.n_layers
        self.last = f"blocks.{n - 1}.resid_post"
        self.writes: dict[int, list[torch.Tensor]] = {i: [] for i, p in enumerate(plans) if p.record}
        record = {f"blocks.{L}.{k}" for L in range(n) for k in ("attn.z", "mlp.out")} | {"embed"}
        self.sites = frozenset(set(self.inputs) | set(self.takes) | {self.last} | (record if self.writes else set()))
        self.final: torch.Tensor | None = None                # [n_plans, T, D]

    def on_site(self, site: str, value: torch.Tensor) -> torch.Tensor | None:
        new = value
        if site in self.inputs:   # aux rows (logits: the real row itself) get their receiver's input
            new = value.clone()
            for i, r, dest in self.inputs[site]:
                new[dest] = self.plans[i].input_fn(self, i, r, value[self.real[i]])
        if site in self.takes:    # real rows take the receiver's value from its aux row
            new = value.clone()
            for i, r, a in self.takes[site]:
                rec = self.topo.receivers[r]
                if rec.input == "mlp":
                    new[self.real[i]] = value[a]
                else:
                    new[self.real[i], :, rec.index] = value[a, :, rec.index]   # [T, Dh]
        self._record(site, new)
        if site == self.last:
            self.final = new[self.real]
        return None if new is value else new

    def _record(self, site: str, value: torch.Tensor) -> None:
        """Sender writes of recorded real rows, in Topology.senders order (sites fire in that order)."""
        if not self.writes:
            return
        if site == "embed":
            for i in self.writes:
                self.writes[i].append(value[self.real[i]].float()[None])
        elif site.endswith(".attn.z"):
            L = int(site.split(".")[1])
            for i in self.writes:
                self.writes[i].append(head_writes(self.adapter, L, value[self.real[i]]))
        elif site.endswith(".mlp.out"):
            for i in self.writes:
                self.writes[i].append(value[self.real[i]].float()[None])

    def written(self, plan: int) -> torch.Tensor:
        """[S_so_far, T, D]: the sender writes of a recorded real row, up to the current site."""
        return torch.cat(self.writes[plan])


def split_forward(adapter, topo: Topology, ids: list[int], plans: list[RowPlan], target: Target,
                  grad: bool = False) -> torch.Tensor:
    """Run the split forward; -> the target of each real row, [n_plans]."""
    run = SplitRun(adapter, topo, plans)
    x = torch.tensor([ids]).expand(run.batch, -1)                           # [B, T]
    logits = adapter.forward(x, handler=run, grad=grad)                      # [B, T, V]
    return target.read(logits[run.real], run.final)


def _chunks(topo: Topology, plans: list[RowPlan], device: torch.device) -> Iterator[list[RowPlan]]:
    """Plans grouped so that one split forward has at most MAX_ROWS rows."""
    cap = MAX_ROWS.get(device.type, MAX_ROWS["cpu"])
    chunk, rows = [], 0
    for p in plans:
        need = p.rows(topo)
        if chunk and rows + need > cap:
            yield chunk
            chunk, rows = [], 0
        chunk.append(p)
        rows += need
    if chunk:
        yield chunk


def _device(adapter) -> torch.device:
    return adapter.model.get_input_embeddings().weight.device


def _dtype(adapter) -> torch.dtype:
    return next(adapter.model.parameters()).dtype


def _check_stop(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("the client cancelled the request")


# --- edge attribution -------------------------------------------------------------------------------

def receiver_grads(adapter, topo: Topology, ids: list[int], target: Target) -> tuple[torch.Tensor, float]:
    """G [R, T, D]: d target / d input_r for every receiver on the run of `ids` (split forward with a zero
    leaf per receiver, one backward), and the target's value."""
    T, D = len(ids), adapter.info.d_model
    eps = torch.zeros(len(topo.receivers), T, D, dtype=_dtype(adapter), device=_device(adapter),
                      requires_grad=True)                                        # [R, T, D]

    def plus_eps(run: SplitRun, i: int, r: int, own: torch.Tensor) -> torch.Tensor:
        return own + eps[r]

    plan = RowPlan([[r] for r in range(len(topo.receivers))], plus_eps)
    with torch.enable_grad():
        value = split_forward(adapter, topo, ids, [plan], target, grad=True)
        value[0].backward()
    return eps.grad.float(), float(value[0].detach())


@dataclass
class EdgeScores:
    topology: Topology
    scores: torch.Tensor          # [S, R] float32: eap(s -> r); 0 where s cannot reach r
    target: Target
    clean_value: float
    ablated_value: float          # the target with every edge ablated (corrupted: the corrupted prompt)
    clean: PromptRun
    ablated_writes: torch.Tensor  # [S, T, D]
    ablation: str
    ids: list[int]
    corrupted_ids: list[int]
    elapsed_s: float = 0.0

    def edges(self) -> list[tuple[int, int]]:
        """Every reachable edge (s, r), largest |score| first."""
        s_idx, r_idx = torch.nonzero(self.topology.reach, as_tuple=True)
        order = torch.argsort(self.scores[s_idx, r_idx].abs(), descending=True, stable=True)
        return [(int(s_idx[k]), int(r_idx[k])) for k in order]

    def edge_name(self, edge: tuple[int, int]) -> tuple[str, str, str]:
        """(sender, receiver node, input)."""
        s, r = self.topology.senders[edge[0]], self.topology.receivers[edge[1]]
        return s.name, r.node, r.input


def _check_pair(ids: list[int], corrupted: list[int] | None, ablation: str) -> None:
    if ablation not in ABLATIONS:
        raise InvalidArgument(f"unknown ablation {ablation!r}; one of {', '.join(ABLATIONS)}", reason="BAD_ABLATION")
    if ablation == "corrupted":
        if not corrupted:
            raise InvalidArgument("corrupted ablation needs a corrupted prompt", reason="BAD_INPUT")
        if len(corrupted) != len(ids):
            raise InvalidArgument(f"the corrupted prompt has {len(corrupted)} tokens, the clean one {len(ids)}: "
                                  "they must have the same length", reason="LENGTH_MISMATCH")


def edge_attribution(adapter, ids: list[int], target: Target, corrupted: list[int] | None = None,
                     ablation: str = "corrupted") -> EdgeScores:
    """EAP scores of every edge: 2 forwards (clean, corrupted) + 1 split forward + 1 backward."""
    _check_pair(ids, corrupted, ablation)
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


# --- exact path patching ----------------------------------------------------------------------------

def path_patch(adapter, scores: EdgeScores, edges: list[tuple[int, int]],
               should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Exact effect of each edge (s, r): target(clean run, input_r += Delta_s) - target(clean), [n] float32."""
    topo = scores.topology
    device, dtype = _device(adapter), _dtype(adapter)
    delta = (scores.ablated_writes - scores.clean.writes)                     # [S, T, D]
    deltas = {s: delta[s].to(device=device, dtype=dtype) for s in {s for s, _ in edges}}
    plans = []
    for s, r in edges:
        def add(run: SplitRun, i: int, rr: int, own: torch.Tensor, d: torch.Tensor = deltas[s]) -> torch.Tensor:
            return own + d
        plans.append(RowPlan([[r]], add))
    out = []
    with torch.no_grad():
        for chunk in _chunks(topo, plans, device):
            _check_stop(should_stop)
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


def verify(adapter, scores: EdgeScores, top_k: int = DEFAULT_VERIFY,
           should_stop: Callable[[], bool] | None = None) -> Verification:
    """Path-patch the top_k edges by |EAP score|; rank correlation of the approximation with exact."""
    edges = scores.edges()[:top_k]
    approx = torch.tensor([float(scores.scores[s, r]) for s, r in edges])
    exact = path_patch(adapter, scores, edges, should_stop)
    err = float((approx - exact).abs().max()) if edges else float("nan")
    return Verification(edges, approx, exact, spearman(approx, exact), pearson(approx, exact), err)


# --- circuits ---------------------------------------------------------------------------------------

Circuit = set[tuple[int, int]]   # edges (sender index, receiver index)


def _inputs_of(topo: Topology) -> dict[int, list[int]]:
    """sender index -> indices of the receivers that are inputs of the same node (a head's q, k, v;
    an MLP's input). Under GQA a head's k / v come from its KV head."""
    H, Hkv = 0, 0
    heads = [s for s in topo.senders if s.kind == "head"]
    if heads:
        H = max(s.index for s in heads) + 1
        Hkv = max((r.index for r in topo.receivers if r.input == "k"), default=-1) + 1
    out: dict[int, list[int]] = {}
    for i, s in enumerate(topo.senders):
        if s.kind == "head":
            g = s.index // (H // Hkv)
            out[i] = [j for j, r in enumerate(topo.receivers) if r.layer == s.layer and (
                (r.input == "q" and r.index == s.index) or (r.input in ("k", "v") and r.index == g))]
        elif s.kind == "mlp":
            out[i] = [j for j, r in enumerate(topo.receivers) if r.layer == s.layer and r.input == "mlp"]
        else:
            out[i] = []
    return out


def prune(topo: Topology, circuit: Circuit, ablation: str = "corrupted") -> Circuit:
    """Drop edges that cannot change the circuit's target, to a fixed point:
    * into a receiver whose node sends nothing in the circuit (its output then reaches every receiver
      as the ablated write), unless the receiver is the logits;
    * (corrupted ablation only) from a head / MLP none of whose inputs is in the circuit: it then reads
      exactly the corrupted run's inputs, so it writes its corrupted write and the edge carries zero."""
    inputs_of = _inputs_of(topo)
    nodes_of: dict[int, set[int]] = {}                 # receiver -> the senders it is an input of
    for s, rs in inputs_of.items():
        for r in rs:
            nodes_of.setdefault(r, set()).add(s)
    circuit = set(circuit)
    while True:
        fed = {r for _, r in circuit}
        sending = {s for s, _ in circuit}
        keep = set()
        for s, r in circuit:
            alive_in = (ablation != "corrupted" or topo.senders[s].kind == "embed"
                        or any(x in fed for x in inputs_of[s]))
            alive_out = topo.receivers[r].input == "logits" or bool(nodes_of.get(r, set()) & sending)
            if alive_in and alive_out:
                keep.add((s, r))
        if keep == circuit:
            return circuit
        circuit = keep


def faithfulness_values(adapter, scores: EdgeScores, circuits: list[Circuit],
                        should_stop: Callable[[], bool] | None = None) -> list[float]:
    """The target of each circuit run (edge ablation, see the module docstring), batched."""
    topo = scores.topology
    device, dtype = _device(adapter), _dtype(adapter)
    abl = scores.ablated_writes.to(device)                                  # [S, T, D]
    # ablated_base_r = the ablated writes that reach r + the biases r's input holds, [R, T, D]
    base = torch.einsum("sr,std->rtd", topo.reach.float().to(device), abl) + _bias_in_inputs(adapter, topo).to(device)
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
                shared.setdefault(_block_input(topo, rec), []).append(r)
        plans.append(RowPlan(groups + list(shared.values()), make, record=True))
    out: list[float] = []
    with torch.no_grad():
        for chunk in _chunks(topo, plans, device):
            _check_stop(should_stop)
            out += [float(v) for v in split_forward(adapter, topo, scores.ids, chunk, scores.target)]
    return out


def _bias_in_inputs(adapter, topo: Topology) -> torch.Tensor:
    """[R, 1, D]: what each receiver's input holds besides sender writes, the same in every run: the
    attention output biases b_O of the blocks before it (and of its own block, for a sequential MLP)."""
    n = topo.n_layers
    b = [adapter.b_O(L).float().cpu() for L in range(n)]
    out = torch.zeros(len(topo.receivers), 1, adapter.info.d_model)
    for j, r in enumerate(topo.receivers):
        for L in range(n):
            if L < r.layer or (L == r.layer and r.input == "mlp" and not topo.parallel):
                out[j, 0] += b[L]
    return out


@dataclass
class CircuitResult:
    edges: list[tuple[int, int]]      # the circuit, largest |score| first
    faithfulness: float               # (circuit - ablated) / (clean - ablated)
    circuit_value: float
    fraction: float                   # asked for
    curve: list[tuple[int, int, float]] = field(default_factory=list)  # (top-k edges tried, kept after pruning, faithfulness)


def extract_circuit(adapter, scores: EdgeScores, fraction: float = 0.8, max_edges: int = 0,
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
    curve: dict[int, tuple[int, float, float, Circuit]] = {}

    def measure(ks: list[int]) -> None:
        ks = [k for k in dict.fromkeys(ks) if k not in curve]
        circuits = [prune(topo, set(ranked[:k]), scores.ablation) for k in ks]
        values = faithfulness_values(adapter, scores, circuits, should_stop)
        for k, c, v in zip(ks, circuits, values):
            curve[k] = (len(c), (v - scores.ablated_value) / denom, v, c)

    ks, k = [], 1
    while k < len(ranked):
        ks.append(k)
        k *= 2
    ks.append(len(ranked))
    measure(ks)
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
    n_kept, faith, value, circuit = curve[best]
    order = {e: i for i, e in enumerate(ranked)}
    edges = sorted(circuit, key=order.__getitem__)
    return CircuitResult(edges, faith, value, fraction, [(k, curve[k][0], curve[k][1]) for k in sorted(curve)])


# --- graphs (what the wire and the dashboard draw) --------------------------------------------------

@dataclass
class GraphNode:
    id: str
    kind: str          # circuit: "embed" | "head" | "kv_head" | "mlp" | "logits"; flow: "resid_pre" | "resid_mid" | "resid_post"
    layer: int         # embed -1, logits n_layers; flow: the block (resid_post: the last block)
    position: int = -1  # token position (flow graphs); -1 = all positions
    index: int = 0     # head / KV head
    label: str = ""


@dataclass
class GraphEdge:
    source: str
    target: str
    input: str         # circuit: "q" | "k" | "v" | "mlp" | "logits"; flow: "head" | "mlp" | "resid"
    effect: float      # circuit: EAP score; flow: importance (proximity share of the update, 0..1)
    exact: float | None = None   # circuit: exact path-patching effect, where verified
    component: str = ""          # flow: the head / MLP that carries the edge


@dataclass
class Graph:
    kind: str                     # "circuit" | "information_flow"
    nodes: list[GraphNode]
    edges: list[GraphEdge]


def _circuit_node(name: str, topo: Topology) -> GraphNode:
    if name == "embed":
        return GraphNode(name, "embed", -1, label="embed")
    if name == "logits":
        return GraphNode(name, "logits", topo.n_layers, label="logits")
    parts = name.split(".")                       # blocks.L.attn.head.H | blocks.L.attn.kv_head.G | blocks.L.mlp
    L = int(parts[1])
    if parts[2] == "mlp":
        return GraphNode(name, "mlp", L, label=f"MLP{L}")
    kind, h = parts[3], int(parts[4])
    return GraphNode(name, kind, L, index=h, label=f"{'KV' if kind == 'kv_head' else ''}L{L}H{h}")


def circuit_graph(scores: EdgeScores, edges: list[tuple[int, int]], exact: dict | None = None) -> Graph:
    """The circuit as a graph: nodes are the senders and receiver nodes the edges touch."""
    topo, exact = scores.topology, exact or {}
    nodes: dict[str, GraphNode] = {}
    out = []
    for s, r in edges:
        sn, rn = topo.senders[s].name, topo.receivers[r].node
        for n in (sn, rn):
            nodes.setdefault(n, _circuit_node(n, topo))
        out.append(GraphEdge(sn, rn, topo.receivers[r].input, float(scores.scores[s, r]), exact.get((s, r))))
    order = sorted(nodes.values(), key=lambda n: (n.layer, n.kind == "mlp", n.index))
    return Graph("circuit", order, out)


# --- the information-flow graph ---------------------------------------------------------------------

class _FlowCapture:
    def __init__(self, n_layers: int):
        self.sites = frozenset(f"blocks.{L}.{k}" for L in range(n_layers)
                               for k in ("resid_pre", "attn.v", "attn.pattern", "resid_mid", "mlp.out"))
        self.values: dict[str, torch.Tensor] = {}

    def on_site(self, site: str, value: torch.Tensor) -> None:
        self.values[site] = value[0].detach().float()


def _proximity(y: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """y [..., D] (the sum), parts [K, ..., D] (its terms) -> max(|y|_1 - |y - part|_1, 0), [K, ...]."""
    return (y.abs().sum(-1) - (y - parts).abs().sum(-1)).clamp_min(0)


@dataclass
class FlowResult:
    graph: Graph
    position: int
    threshold: float
    elapsed_s: float
    n_edges_total: int   # edges above threshold anywhere (before keeping those that reach the position)


def information_flow(adapter, ids: list[int], position: int = -1, threshold: float = 0.04) -> FlowResult:
    """Information-flow routes (one forward, no corrupted prompt).

    At each block and position i the residual update is decomposed exactly into its terms:
    resid_mid[i] = resid_pre[i] + sum_{h, j <= i} A_h[i, j] v_h[j] W_O[h] + b_O, and
    resid_post[i] = resid_mid[i] + mlp.out[i]. A term c of a sum y gets the importance
    prox(c, y) / sum over the terms of prox, prox(c, y) = max(|y|_1 - |y - c|_1, 0) (the L1 proximity
    of Ferrando & Voita's information-flow routes). Edges with importance >= threshold are kept if they
    lie on a path to (final layer, position): head h moves resid_pre(L, j) -> resid_mid(L, i); the MLP
    and the residual connection move along a position. (Parallel blocks: resid_mid is resid_pre +
    attn.out as the sites define it; the MLP edge then leaves resid_mid as well — an approximation.)"""
    t0 = time.perf_counter()
    info = adapter.info
    n, H, Hkv, T = info.n_layers, info.n_heads, info.n_kv_heads, len(ids)
    if not -T <= position < T:
        raise InvalidArgument(f"position {position} is out of range for {T} tokens", reason="OUT_OF_RANGE")
    if not 0.0 <= threshold < 1.0:
        raise InvalidArgument(f"threshold must be in [0, 1); got {threshold}", reason="OUT_OF_RANGE")
    position %= T
    cap = _FlowCapture(n)
    adapter.forward(torch.tensor([ids]), handler=cap)

    def nid(kind: str, L: int, p: int) -> str:
        if kind == "resid_pre" and L == n:
            return f"blocks.{n - 1}.resid_post@{p}"
        return f"blocks.{L}.{kind}@{p}"

    cand: list[tuple[str, str, str, float, str]] = []   # (source, target, input, importance, component)
    for L in range(n):
        v = cap.values[f"blocks.{L}.attn.v"]                                 # [T, Hkv, Dh]
        A = cap.values[f"blocks.{L}.attn.pattern"]                           # [H, T, T]
        pre, mid = cap.values[f"blocks.{L}.resid_pre"], cap.values[f"blocks.{L}.resid_mid"]   # [T, D]
        mlp = cap.values[f"blocks.{L}.mlp.out"]
        vo = head_writes(adapter, L, v.repeat_interleave(H // Hkv, dim=1))  # [H, T, D]: v_h[j] W_O[h]
        b = adapter.b_O(L).float()
        prox_heads = torch.stack([_proximity(mid[:, None], A[h][..., None] * vo[h][None])  # [T(i), T(j)]
                                  for h in range(H)])                        # [H, T, T]
        prox_skip = _proximity(mid, pre[None])[0]                            # [T]
        prox_bias = _proximity(mid, b.expand_as(mid)[None])[0]
        total = prox_heads.sum((0, 2)) + prox_skip + prox_bias               # [T]
        imp_heads = prox_heads / total[None, :, None].clamp_min(1e-12)
        imp_skip = prox_skip / total.clamp_min(1e-12)
        post = mid + mlp
        p_mlp, p_res = _proximity(post, mlp[None])[0], _proximity(post, mid[None])[0]
        t2 = (p_mlp + p_res).clamp_min(1e-12)
        for h, i, j in torch.nonzero(imp_heads >= threshold).tolist():    # (causal: j <= i)
            cand.append((nid("resid_pre", L, j), nid("resid_mid", L, i), "head", float(imp_heads[h, i, j]),
                         f"blocks.{L}.attn.head.{h}"))
        for i in range(T):
            if imp_skip[i] >= threshold:
                cand.append((nid("resid_pre", L, i), nid("resid_mid", L, i), "resid", float(imp_skip[i]), ""))
            if p_mlp[i] / t2[i] >= threshold:
                cand.append((nid("resid_mid", L, i), nid("resid_pre", L + 1, i), "mlp", float(p_mlp[i] / t2[i]),
                             f"blocks.{L}.mlp"))
            if p_res[i] / t2[i] >= threshold:
                cand.append((nid("resid_mid", L, i), nid("resid_pre", L + 1, i), "resid", float(p_res[i] / t2[i]), ""))
    # keep what reaches the final position, walking back from it
    reached = {nid("resid_pre", n, position)}
    kept: list[GraphEdge] = []
    for src, dst, inp, imp, comp in sorted(cand, key=lambda e: _flow_order(e[1], n), reverse=True):
        if dst in reached:
            reached.add(src)
            kept.append(GraphEdge(src, dst, inp, imp, None, comp))
    nodes = [_flow_node(x, n) for x in reached]
    nodes.sort(key=lambda x: (x.layer, x.kind != "resid_pre", x.position))
    return FlowResult(Graph("information_flow", nodes, kept[::-1]), position, threshold,
                      time.perf_counter() - t0, len(cand))


def _flow_order(node: str, n: int) -> float:
    """Depth of a flow node: resid_pre L -> L, resid_mid L -> L + 0.5, resid_post (final) -> n."""
    site = node.split("@")[0].split(".")
    L = int(site[1])
    return {"resid_pre": L, "resid_mid": L + 0.5, "resid_post": L + 1}[site[2]]


def _flow_node(node: str, n: int) -> GraphNode:
    site, pos = node.split("@")
    parts = site.split(".")
    return GraphNode(node, parts[2], int(parts[1]), int(pos), label=f"{parts[2]} {parts[1]} @{pos}")


# --- registered analyses ----------------------------------------------------------------------------

@register("edge_attribution", "EAP scores of every edge (upstream write -> head q/k/v, MLP, logits input)")
def _edge_attribution(adapter, ids, target, corrupted=None, ablation="corrupted"):
    return edge_attribution(adapter, ids, target, corrupted, ablation)


@register("path_patching", "exact path patching of edges, and rank correlation with EAP on the top edges")
def _verify(adapter, scores, top_k=DEFAULT_VERIFY):
    return verify(adapter, scores, top_k)


@register("circuit", "smallest top-EAP edge set reaching a faithfulness fraction (edge ablation, measured exactly)")
def _extract(adapter, scores, fraction=0.8, max_edges=0):
    return extract_circuit(adapter, scores, fraction, max_edges)


@register("information_flow", "information-flow routes from one forward (heads, MLPs, per position)")
def _information_flow(adapter, ids, position=-1, threshold=0.04):
    return information_flow(adapter, ids, position, threshold)
