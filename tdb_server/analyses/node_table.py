"""The node table: every head, token pair, neuron, embedding row and bias, with activation, write
norm, direct effect and estimated total effect on one objective, from one forward + one backward
(direct effects at the objective's position alone: one forward, no backward; see compute_node_table).

Objective = a target (inputs.Target; the table explains its value) or an upstream node
(`TraceObjective`: a neuron's pre-activation, a head's output / q / k / q.k / v; the table explains
that scalar). Per node:

| column        | head (query pos t)   | head pair (t, key pos k)         | neuron (pos t)        | embedding row      |
|---------------|----------------------|----------------------------------|-----------------------|--------------------|
| activation    | |z[t, h]|            | pattern[h, t, k]                 | post[t, n]            | |row|              |
| write_norm    | |z[t, h] W_O[h]|     | pattern[h, t, k] |v[k] W_O[h]|   | |post[t, n]| |W_out[n]| | |row|            |
| direct_effect | z[t, h] W_O[h] . G[t]| pattern[h, t, k] v[k] W_O[h] . G[t] | post[t, n] W_out[n] . G[t] | row . G[t] |
| total_effect  | z[t, h] . dO/dz[t, h]| pattern[h, t, k] v[k] . dO/dz[t, h] | post[t, n] dO/dpost[t, n] | row . dO/dembed[t] |

G [T, D] is the direct-effect direction. For a target: zero except at the target position, where it
is the gradient of the target w.r.t. the final residual with the final norm's scale frozen (see
adapter.py), so for linear targets heads + neurons + embeddings + biases + the constant term sum
exactly to the target. For tracing: the gradient of the traced scalar w.r.t. the residual stream the
node reads (resid_pre of its layer; resid_mid for a neuron of a sequential block) — first order.
Pairs decompose their head exactly (z = pattern @ v), so they are left out of `direct_effect_sum`.

The total effect is an estimate (first order); `verify_top=k` puts the exact zero-ablation effect of
the k largest estimates beside them (verify.py). Rows are built in node_rows.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from tdb_server.errors import InvalidArgument, ResourceExhausted
from tdb_server.model.arch import get_path
from tdb_server.model.capture import Capture
from tdb_server.model.interventions import Edits, Intervention
from tdb_server.model.sites import SiteError, parse_unit

from tdb_server.sae import attribution as sae_attribution

from .ablation import AblationSpec, unit_ablations
from .inputs import Target, position
from .node_rows import (ATTN_BIAS, CONSTANT, EMBED_POS, EMBED_TOKEN, HEAD, HEAD_PAIR, ID_COLUMNS, METRICS, MLP_BIAS,
                        NEURON, SAE_LATENT, Part, assemble, table_parts)
from .registry import register
from .verify import MAX_VERIFY, Verification, verify_estimates

__all__ = ["ATTN_BIAS", "CONSTANT", "EMBED_POS", "EMBED_TOKEN", "HEAD", "HEAD_PAIR", "ID_COLUMNS", "METRICS",
           "MLP_BIAS", "NEURON", "NODE_TYPES", "SAE_LATENT", "NodeTable", "NodeTableResult", "TargetObjective",
           "TraceObjective", "Verification", "compute_node_table", "rank", "trace_objective"]

NODE_TYPES = {"head": HEAD, "head_pair": HEAD_PAIR, "neuron": NEURON, "embed_token": EMBED_TOKEN,
              "embed_pos": EMBED_POS, "attn_bias": ATTN_BIAS, "mlp_bias": MLP_BIAS, "constant": CONSTANT,
              "sae_latent": SAE_LATENT}
HEAD_PARTS = ("output", "q", "k", "qk", "v")
MAX_ROWS = 50_000_000


# --- capture: one forward that keeps the graph --------------------------------------------------

class GradCapture(Capture):
    """The one capture (model/capture.py) for the node table's forward, read as batch element 0.
    With `grad`, `embed` becomes a leaf that requires grad (so every activation downstream is in the
    graph; parameters stay frozen), `grad_sites` keep their `.grad` and `value_sites` are kept as they are
    (still in the graph); without, every site is a plain detached value. `ablations` (interventions)
    are applied first."""

    def __init__(self, grad_sites: set[str], value_sites: set[str], ablations: list[Intervention] | None = None,
                 grad: bool = True):
        self.ablations = list(ablations or [])
        edits = Edits(self.ablations)
        keep, grads = (value_sites, grad_sites | {"embed"}) if grad else (value_sites | grad_sites | {"embed"}, set())
        super().__init__(keep, grad_sites=grads, edit=edits if self.ablations else None, edit_sites=edits.sites)

    def value(self, site: str) -> torch.Tensor:
        """[T, ...] of batch element 0, detached, float32."""
        return self.values[site][0].detach().float()

    def grad(self, site: str) -> torch.Tensor:
        """d objective / d site, [T, ...], float32 (zeros where the objective does not depend on it)."""
        x = self.values[site]
        g = x.grad if x.requires_grad else None
        return torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device) if g is None else g[0].float()


# --- objectives -------------------------------------------------------------------------------

@dataclass
class TargetObjective:
    """Explain a target's value (see inputs.Target)."""

    target: Target
    needs_backward = False     # its direct-effect direction comes from the unembedding, not a gradient

    @property
    def position(self) -> int:
        return self.target.position

    def value_sites(self, adapter) -> set[str]:
        return set()

    def grad_sites(self, adapter) -> set[str]:
        return set()

    def scalar(self, adapter, cap: GradCapture, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V]: the row at the target position."""
        resid = cap.values[f"blocks.{adapter.info.n_layers - 1}.resid_post"]
        return self.target.read_rows(logits, resid[:, self.target.position])[0]

    def direction(self, adapter, cap: GradCapture, logits: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """(G [T, D], constant term or None); logits [1, V] at the target position."""
        p = self.target.position
        resid = cap.value(f"blocks.{adapter.info.n_layers - 1}.resid_post")       # [T, D]
        d, const, normed = self.target.final_direction(adapter, logits[0].detach())
        G = torch.zeros_like(resid)
        if normed:
            scale = adapter.final_norm_scale(resid[p])                            # [1]
            x = torch.zeros_like(resid[p], requires_grad=True)
            with torch.enable_grad():
                (adapter.final_norm_linear(x, scale).float() @ d.to(x.device)).backward()
            G[p] = x.grad
        else:
            G[p] = d.to(G.device)
        return G, const

    def upstream(self, layer: int, node_type: int) -> bool:
        return True


@dataclass
class TraceObjective:
    """Explain one upstream node's scalar: a neuron's pre-activation at `position`, or a head's
    output (|write|, direction frozen), v (the same with the pattern frozen), q / k / qk (the
    attention score q.k * scaling at (position, key_position), gradient through q, k or both)."""

    node: str
    kind: str              # "neuron" | "head"
    layer: int
    index: int
    part: str
    position: int
    key_position: int
    parallel: bool
    description: str = ""
    needs_backward = True      # its direction is the gradient at the residual stream the node reads

    def _read_site(self) -> str:
        if self.kind == "neuron" and not self.parallel:
            return f"blocks.{self.layer}.attn.out"   # d/d attn.out == d/d resid_mid for the MLP's reader
        return f"blocks.{self.layer}.resid_pre"

    def grad_sites(self, adapter) -> set[str]:
        return {self._read_site()}

    def value_sites(self, adapter) -> set[str]:
        L = self.layer
        if self.kind == "neuron":
            return {f"blocks.{L}.mlp.pre"}
        if self.part in ("q", "k", "qk"):
            return {f"blocks.{L}.attn.q", f"blocks.{L}.attn.k"}
        return set()

    def scalar(self, adapter, cap: GradCapture, logits: torch.Tensor) -> torch.Tensor:
        L, i, t = self.layer, self.index, self.position
        if self.kind == "neuron":
            return cap.values[f"blocks.{L}.mlp.pre"][0, t, i].float()
        W_O = adapter.W_O(L)[i].float()                                      # [Dh, D]
        if self.part in ("output", "v"):
            z = cap.values[f"blocks.{L}.attn.z"][0, t, i].float()              # [Dh]
            write = z @ W_O                                                    # [D]
            unit = (write / write.norm().clamp_min(1e-12)).detach()
            if self.part == "output":
                return write @ unit
            pattern = cap.values[f"blocks.{L}.attn.pattern"][0, i, t].detach().float()  # [Tk]
            v = cap.values[f"blocks.{L}.attn.v"][0].float()                    # [Tk, Hkv, Dh]
            kv = i // (adapter.info.n_heads // v.shape[1])
            return (pattern @ v[:, kv]) @ W_O @ unit
        q = cap.values[f"blocks.{L}.attn.q"][0, t, i].float()                  # [Dh]
        kv = i // (adapter.info.n_heads // adapter.info.n_kv_heads)
        k = cap.values[f"blocks.{L}.attn.k"][0, self.key_position, kv].float()  # [Dh]
        if self.part == "q":
            k = k.detach()
        elif self.part == "k":
            q = q.detach()
        module = get_path(adapter.blocks[L], adapter.spec.attn)
        scaling = getattr(module, "scaling", None) or adapter.info.d_head ** -0.5
        return (q @ k) * scaling

    def direction(self, adapter, cap: GradCapture, logits: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        return cap.grad(self._read_site()), None

    def upstream(self, layer: int, node_type: int) -> bool:
        if layer < 0:
            return node_type != CONSTANT
        if layer < self.layer:
            return True
        return (layer == self.layer and self.kind == "neuron" and not self.parallel
                and node_type in (HEAD, HEAD_PAIR, ATTN_BIAS))


def trace_objective(adapter, node: str, part: str, pos: int, key_pos: int | None, n_tokens: int) -> TraceObjective:
    """Validate a node to trace from (InvalidArgument with the reason on anything wrong)."""
    info = adapter.info
    try:
        unit = parse_unit(node, info.n_layers, info.n_heads, info.d_mlp)
    except SiteError as e:
        raise InvalidArgument(f"trace node: {e.message}", reason="BAD_NODE", suggestions=e.suggestions) from None
    if unit.kind not in ("neuron", "head"):
        raise InvalidArgument(f"trace node {node!r}: only heads and neurons can be traced", reason="BAD_NODE")
    part = part or "output"
    if part not in HEAD_PARTS:
        raise InvalidArgument(f"unknown head part {part!r}; one of {', '.join(HEAD_PARTS)}", reason="BAD_NODE")
    if unit.kind == "neuron" and part != "output":
        raise InvalidArgument(f"trace node {node!r}: a neuron is traced from its pre-activation; "
                              f"head parts ({part}) apply to heads only", reason="BAD_NODE")
    t = position(pos, n_tokens, "trace position")
    k = t if key_pos is None else position(key_pos, n_tokens, "trace key position")
    if part in ("q", "k", "qk") and k > t:
        raise InvalidArgument(f"key position {k} comes after query position {t}: a causal head cannot attend "
                              "there", reason="OUT_OF_RANGE")
    if unit.kind == "neuron":
        desc = f"{node} pre-activation at position {t}"
    elif part in ("q", "k", "qk"):
        desc = f"{node} attention score (q.k) from position {t} to {k}, gradient through {part}"
    else:
        desc = f"{node} |write| at position {t}" + (" through values only (pattern frozen)" if part == "v" else "")
    return TraceObjective(node, unit.kind, unit.layer, unit.index, part, t, k, info.parallel_blocks, desc)


# --- the table --------------------------------------------------------------------------------

@dataclass
class NodeTable:
    """Rows of nodes: ids [R, 5] int32 (ID_COLUMNS) and metrics [R, 4] float32 (METRICS), on the CPU."""

    ids: torch.Tensor
    metrics: torch.Tensor

    def select(self, rows: torch.Tensor) -> "NodeTable":
        return NodeTable(self.ids[rows], self.metrics[rows])


@dataclass
class NodeTableResult:
    token_ids: list[int]
    table: NodeTable
    value: float                    # the objective's value
    direct_effect_sum: float        # over the rows computed (every position, or the objective's)
    description: str
    exact: bool
    position: int
    notes: list[str] = field(default_factory=list)
    target_position_only: bool = False   # rows only at `position` (else at every position)
    total_effects: bool = True           # the total_effect column was computed (else NaN)
    verification: Verification | None = None   # verify_top: estimates beside exact zero-ablation effects


def _sites(adapter, objective, pairs: bool, grad: bool) -> tuple[set[str], set[str]]:
    """(grad sites, value sites) of the table's forward (no grad sites when no gradient is taken)."""
    n = adapter.info.n_layers
    grad_sites = set(objective.grad_sites(adapter))
    value_sites = {f"blocks.{n - 1}.resid_post"} | set(objective.value_sites(adapter))
    for layer in range(n):
        sites = {f"blocks.{layer}.attn.z", f"blocks.{layer}.mlp.post"}
        if grad:
            grad_sites |= sites | {f"blocks.{layer}.attn.out", f"blocks.{layer}.mlp.out"}
        else:
            value_sites |= sites
        if pairs:
            value_sites |= {f"blocks.{layer}.attn.v", f"blocks.{layer}.attn.pattern"}
    if isinstance(objective, TraceObjective) and objective.part == "v":
        value_sites |= {f"blocks.{objective.layer}.attn.v", f"blocks.{objective.layer}.attn.pattern"}
    return grad_sites, value_sites - grad_sites


def _check_size(info, T: int, pairs: bool, one_position: bool) -> None:
    queries = 1 if one_position else T
    pair_rows = info.n_layers * info.n_heads * (T if one_position else T * (T + 1) // 2)
    if pairs and pair_rows + info.n_layers * info.d_mlp * queries > MAX_ROWS:
        raise ResourceExhausted(f"a node table with token pairs for {T} tokens has more than {MAX_ROWS} rows; "
                                "leave out HEAD_PAIR rows or shorten the prompt", reason="TOO_MANY_ROWS")


def _assemble(parts: list[Part], wanted: set[int], objective) -> tuple[NodeTable, float]:
    """The table of the wanted rows upstream of the objective, and the sum of the direct effects of the
    rows that partition the residual stream (not token pairs or latents, which split other rows)."""
    upstream = [p for p in parts if objective.upstream(p.layer, p.node_type)]
    ids, metrics = assemble([p for p in upstream if p.node_type in wanted])
    summed = sum(p.direct_sum() for p in upstream if p.node_type not in (HEAD_PAIR, SAE_LATENT))
    return NodeTable(ids, metrics), float(summed)


def compute_node_table(adapter, token_ids: list[int], objective, *, node_types: set[int] | None = None,
                       notes: list[str] | None = None, ablations: list[AblationSpec] | None = None,
                       target_position_only: bool = False, direct_only: bool = False,
                       verify_top: int = 0) -> NodeTableResult:
    """The node table for one prompt (token ids) and objective. With `ablations` (heads, neurons, SAE
    latents), the table explains the forward with those ablated.

    What it costs is what is asked: every position's rows and total effects (the default, what TDB shows)
    take one forward and one backward; `target_position_only` gives rows only at the objective's position
    (the prompt is cut after it: later tokens cannot change it); `direct_only` leaves the total effects
    out (NaN) and, for a target, takes no backward at all. Logits are projected at that position only.
    `verify_top` = k: the exact zero-ablation effect of the k heads and neurons with the largest
    |total effect| beside their estimate (targets only; see verify.py)."""
    wanted = set(node_types or NODE_TYPES.values())
    pairs = HEAD_PAIR in wanted
    p = objective.position
    T = p + 1 if target_position_only else len(token_ids)
    _check_verify(objective, verify_top)
    total = not direct_only or verify_top > 0
    _check_size(adapter.info, T, pairs, target_position_only)
    grad = total or objective.needs_backward
    grad_sites, value_sites = _sites(adapter, objective, pairs, grad)
    latents = SAE_LATENT in wanted and bool(sae_attribution.sites(adapter))
    if latents:
        (grad_sites if grad else value_sites).update(sae_attribution.sites(adapter))
        value_sites -= grad_sites
    interventions = _before(unit_ablations(adapter, token_ids, ablations), T) if ablations else None
    cap = GradCapture(grad_sites, value_sites, interventions, grad=grad)
    ids = torch.tensor([token_ids[:T]])
    logits = adapter.forward(ids, cap, grad=grad, logits_at=[p])[:, 0]         # [1, V] at the objective's position
    scalar = objective.scalar(adapter, cap, logits)
    if grad and scalar.requires_grad:
        scalar.backward()
    value = float(scalar.detach())
    rows_at = torch.tensor([p]) if target_position_only else torch.arange(T)
    with torch.no_grad():
        G, const = objective.direction(adapter, cap, logits)       # [T, D]
        parts = table_parts(adapter, cap, G, const, ids[0], pairs, rows_at, total)
        if latents:
            for layer, index, qpos, code, *metrics in sae_attribution.latent_parts(adapter, cap, G):
                keep = rows_at.to(qpos.device)
                *metrics, tot = [m[keep] for m in metrics]
                parts.append(Part(SAE_LATENT, layer, index, qpos[keep], code, *metrics, tot if total else None))
    table, de_sum = _assemble(parts, wanted, objective)
    del cap, parts
    result = _result(objective, token_ids[:T] if target_position_only else token_ids, table, value, de_sum, notes)
    result.target_position_only, result.total_effects = target_position_only, total
    if target_position_only and T < len(token_ids):
        result.notes.append(f"rows at position {p} only; the prompt was cut after it (later tokens cannot change "
                            "the objective)")
    if direct_only and total:
        result.notes.append("total effects were computed: verify_top compares them with exact effects")
    if verify_top:
        result.verification = verify_estimates(adapter, token_ids[:T], objective.target, table, verify_top,
                                               interventions or [], value)
    return result


def _before(interventions: list[Intervention], T: int) -> list[Intervention]:
    """The ablations of a prompt cut to T tokens: positions from T on are gone (and so are ablations that
    named only those); the rest are unchanged (a mean ablation keeps the mean over the whole prompt)."""
    out = []
    for iv in interventions:
        kept = [p for p in iv.selector.positions if p < T]
        if not iv.selector.positions or kept:
            out.append(iv if kept == iv.selector.positions else
                       dataclasses.replace(iv, selector=dataclasses.replace(iv.selector, positions=kept)))
    return out


def _check_verify(objective, k: int) -> None:
    if k < 0 or k > MAX_VERIFY:
        raise InvalidArgument(f"verify_top must be in 0..{MAX_VERIFY}", reason="OUT_OF_RANGE")
    if k and not isinstance(objective, TargetObjective):
        raise InvalidArgument("verify_top compares estimated effects on a target with exact ablations; a traced "
                              "node has no target to ablate against", reason="BAD_TARGET")


def _result(objective, token_ids: list[int], table: NodeTable, value: float, de_sum: float,
            notes: list[str] | None) -> NodeTableResult:
    if isinstance(objective, TargetObjective):
        t = objective.target
        return NodeTableResult(token_ids, table, value, de_sum, t.description, t.exact, t.position,
                               list(notes or []) + list(t.notes))
    return NodeTableResult(token_ids, table, value, de_sum, objective.description, False, objective.position,
                           list(notes or []) + ["tracing: direct effects are first order (gradient at the residual "
                                                "stream the node reads); they do not sum to the value"])


def rank(table: NodeTable, metric: str, k: int) -> tuple[NodeTable, NodeTable]:
    """(top k by `metric`, largest first; bottom k, smallest first)."""
    col = table.metrics[:, METRICS.index(metric)]
    k = min(k, col.numel())
    top = torch.topk(col, k).indices
    bottom = torch.topk(-col, k).indices
    return table.select(top), table.select(bottom)


@register("node_table", "heads (per query position), neurons, embedding rows and biases with activation, write "
                        "norm, direct effect (exact DLA with the final norm's scale frozen) and estimated total "
                        "effect (activation x gradient) on a target; one forward + one backward")
def node_table(adapter, token_ids: list[int], target: Target, node_types: set[int] | None = None) -> NodeTableResult:
    return compute_node_table(adapter, token_ids, TargetObjective(target), node_types=node_types)


@register("token_pair_attribution", "per head, query position and attended-to position: the part of the head's "
                                    "write (and effects) that comes from that position's value")
def token_pair_attribution(adapter, token_ids: list[int], target: Target) -> NodeTableResult:
    return compute_node_table(adapter, token_ids, TargetObjective(target), node_types={HEAD_PAIR})


@register("trace_upstream", "the node table against an upstream node: a neuron's pre-activation, or a head's "
                            "output / q / k / q.k / v")
def trace_upstream(adapter, token_ids: list[int], objective: TraceObjective,
                   node_types: set[int] | None = None) -> NodeTableResult:
    return compute_node_table(adapter, token_ids, objective, node_types=node_types)


register("direct_logit_attribution", "direct effects of every component that sum to the target "
                                     "(the node table's direct_effect column)")(node_table)


@dataclass
class Comparison:
    left: NodeTableResult
    right: NodeTableResult


@register("compare_prompts", "two prompts of the same token length side by side: the node table's rows aligned, "
                             "left / right / diff")
def compare(adapter, left_ids: list[int], right_ids: list[int], left_objective, right_objective,
            node_types: set[int] | None = None, ablations: list[AblationSpec] | None = None) -> Comparison:
    if len(left_ids) != len(right_ids):
        raise InvalidArgument(f"the prompts have different token lengths ({len(left_ids)} vs {len(right_ids)}): "
                              "node tables can be aligned only position by position; give prompts of the same "
                              "length (e.g. pad the shorter one) ", reason="LENGTH_MISMATCH")
    left = compute_node_table(adapter, left_ids, left_objective, node_types=node_types, ablations=ablations)
    right = compute_node_table(adapter, right_ids, right_objective, node_types=node_types, ablations=ablations)
    li, ri = left.table.ids, right.table.ids
    # same lengths, same model -> the same rows, except embedding token rows (index = token id) and
    # biases present on one side only: align on everything but the token id of EMBED_TOKEN rows
    key = lambda x: torch.where((x[:, :1] == EMBED_TOKEN), x * torch.tensor([1, 1, 0, 1, 1], dtype=x.dtype), x)  # noqa: E731
    if li.shape != ri.shape or not torch.equal(key(li), key(ri)):
        raise InvalidArgument("the two node tables do not align row by row", reason="LENGTH_MISMATCH")
    return Comparison(left, right)
