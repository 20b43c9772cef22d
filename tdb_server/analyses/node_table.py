"""The node table: every head, token pair, neuron, embedding row and bias, with activation, write
norm, direct effect and estimated total effect on one objective, from one forward + one backward.

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
"""

from __future__ import annotations

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
from .registry import register

# node types (the wire enum NodeType has the same numbers)
HEAD, HEAD_PAIR, NEURON, EMBED_TOKEN, EMBED_POS, ATTN_BIAS, MLP_BIAS, CONSTANT = range(1, 9)
SAE_LATENT = 9   # latents of attached SAEs (tdb_server/sae/attribution.py); key_pos = the site's code
NODE_TYPES = {"head": HEAD, "head_pair": HEAD_PAIR, "neuron": NEURON, "embed_token": EMBED_TOKEN,
              "embed_pos": EMBED_POS, "attn_bias": ATTN_BIAS, "mlp_bias": MLP_BIAS, "constant": CONSTANT,
              "sae_latent": SAE_LATENT}
METRICS = ("activation", "write_norm", "direct_effect", "total_effect")  # columns of `metrics`
ID_COLUMNS = ("node_type", "layer", "index", "query_pos", "key_pos")    # columns of `ids`
HEAD_PARTS = ("output", "q", "k", "qk", "v")
MAX_ROWS = 50_000_000


# --- capture: one forward that keeps the graph --------------------------------------------------

class GradCapture(Capture):
    """The one capture (model/capture.py) for a forward with gradients, read as batch element 0.
    `embed` becomes a leaf that requires grad (so every activation downstream is in the graph;
    parameters stay frozen); `grad_sites` keep their `.grad`; `value_sites` are kept as they are (still
    in the graph); `ablations` (interventions) are applied first."""

    def __init__(self, grad_sites: set[str], value_sites: set[str], ablations: list[Intervention] | None = None):
        self.ablations = list(ablations or [])
        edits = Edits(self.ablations)
        super().__init__(value_sites, grad_sites=grad_sites | {"embed"}, edit=edits if self.ablations else None,
                         edit_sites=edits.sites)

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

    def value_sites(self, adapter) -> set[str]:
        return set()

    def grad_sites(self, adapter) -> set[str]:
        return set()

    def scalar(self, adapter, cap: GradCapture, logits: torch.Tensor) -> torch.Tensor:
        resid = cap.values[f"blocks.{adapter.info.n_layers - 1}.resid_post"]
        return self.target.read(logits, resid)[0]

    def direction(self, adapter, cap: GradCapture, logits: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """(G [T, D], constant term or None)."""
        p = self.target.position
        resid = cap.value(f"blocks.{adapter.info.n_layers - 1}.resid_post")       # [T, D]
        d, const, normed = self.target.final_direction(adapter, logits[0, p].detach())
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
    direct_effect_sum: float
    description: str
    exact: bool
    position: int
    notes: list[str] = field(default_factory=list)


def _rows(node_type: int, layer: int, index: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
          act: torch.Tensor, write: torch.Tensor, direct: torch.Tensor, total: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast same-shaped id/metric tensors to rows: ([r, 5] int32, [r, 4] float32)."""
    shape = torch.broadcast_shapes(index.shape, qpos.shape, kpos.shape, act.shape, direct.shape)
    cols = [torch.full(shape, node_type), torch.full(shape, layer), index.expand(shape).cpu(),
            qpos.expand(shape).cpu(), kpos.expand(shape).cpu()]
    ids = torch.stack([c.reshape(-1).to(torch.int32) for c in cols], dim=1)
    mets = torch.stack([m.expand(shape).reshape(-1).float().cpu() for m in (act, write, direct, total)], dim=1)
    return ids, mets


def _sites(adapter, objective, pairs: bool) -> tuple[set[str], set[str]]:
    n = adapter.info.n_layers
    grad_sites = set(objective.grad_sites(adapter))
    value_sites = {f"blocks.{n - 1}.resid_post"} | set(objective.value_sites(adapter))
    for layer in range(n):
        grad_sites |= {f"blocks.{layer}.attn.z", f"blocks.{layer}.attn.out", f"blocks.{layer}.mlp.post",
                       f"blocks.{layer}.mlp.out"}
        if pairs:
            value_sites |= {f"blocks.{layer}.attn.v", f"blocks.{layer}.attn.pattern"}
    if isinstance(objective, TraceObjective) and objective.part == "v":
        value_sites |= {f"blocks.{objective.layer}.attn.v", f"blocks.{objective.layer}.attn.pattern"}
    return grad_sites, value_sites - grad_sites


def _check_size(info, T: int, pairs: bool) -> None:
    if pairs and info.n_layers * info.n_heads * T * (T + 1) // 2 + info.n_layers * info.d_mlp * T > MAX_ROWS:
        raise ResourceExhausted(f"a node table with token pairs for {T} tokens has more than {MAX_ROWS} rows; "
                                "leave out HEAD_PAIR rows or shorten the prompt", reason="TOO_MANY_ROWS")


def _assemble(parts: list, wanted: set[int], objective) -> tuple[NodeTable, float]:
    """The table of the wanted rows upstream of the objective, and the sum of the direct effects of the
    rows that partition the residual stream (not token pairs or latents, which split other rows)."""
    keep = [(i, m) for (nt, layer, i, m) in parts if nt in wanted and objective.upstream(layer, nt)]
    table = NodeTable(torch.cat([i for i, _ in keep]) if keep else torch.zeros(0, 5, dtype=torch.int32),
                      torch.cat([m for _, m in keep]) if keep else torch.zeros(0, 4))
    summed = [m for (nt, layer, i, m) in parts if nt not in (HEAD_PAIR, SAE_LATENT) and objective.upstream(layer, nt)]
    return table, float(torch.cat(summed)[:, 2].double().sum()) if summed else 0.0


def compute_node_table(adapter, token_ids: list[int], objective, *, node_types: set[int] | None = None,
                       notes: list[str] | None = None, ablations: list[AblationSpec] | None = None) -> NodeTableResult:
    """The node table for one prompt (token ids) and objective: one forward, one backward. With
    `ablations` (heads, neurons, SAE latents), the table explains the forward with those ablated."""
    wanted = set(node_types or NODE_TYPES.values())
    pairs = HEAD_PAIR in wanted
    _check_size(adapter.info, len(token_ids), pairs)
    grad_sites, value_sites = _sites(adapter, objective, pairs)
    latents = SAE_LATENT in wanted and bool(sae_attribution.sites(adapter))
    if latents:
        grad_sites |= sae_attribution.sites(adapter)
        value_sites -= grad_sites
    cap = GradCapture(grad_sites, value_sites, unit_ablations(adapter, token_ids, ablations) if ablations else None)
    ids = torch.tensor([token_ids])
    logits = adapter.forward(ids, cap, grad=True)
    scalar = objective.scalar(adapter, cap, logits)
    if scalar.requires_grad:
        scalar.backward()
    value = float(scalar.detach())
    with torch.no_grad():
        G, const = objective.direction(adapter, cap, logits)       # [T, D]
        parts = _table_rows(adapter, cap, G, const, ids[0], pairs)
        if latents:
            for layer, *cols in sae_attribution.latent_parts(adapter, cap, G):
                parts.append((SAE_LATENT, layer, *_rows(SAE_LATENT, layer, *cols)))
    table, de_sum = _assemble(parts, wanted, objective)
    if isinstance(objective, TargetObjective):
        t = objective.target
        return NodeTableResult(token_ids, table, value, de_sum, t.description, t.exact, t.position,
                               list(notes or []) + list(t.notes))
    return NodeTableResult(token_ids, table, value, de_sum, objective.description, False, objective.position,
                           list(notes or []) + ["tracing: direct effects are first order (gradient at the residual "
                                                "stream the node reads); they do not sum to the value"])


def _table_rows(adapter, cap: GradCapture, G: torch.Tensor, const: float | None, ids: torch.Tensor,
                pairs: bool) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """All rows as (node_type, layer, ids [r, 5], metrics [r, 4]) parts."""
    info = adapter.info
    T = G.shape[0]
    dev = G.device
    pos = torch.arange(T, device=dev)
    none = torch.full((), -1, device=dev)
    nz = (G.abs().amax(-1) > 0).nonzero().flatten()     # positions where direct effects can be non-zero
    parts = []

    def add(node_type, layer, *cols):
        parts.append((node_type, layer, *_rows(node_type, layer, *cols)))

    for L in range(info.n_layers):
        # heads, per query position
        z, gz = cap.value(f"blocks.{L}.attn.z"), cap.grad(f"blocks.{L}.attn.z")   # [T, H, Dh]
        W_O = adapter.W_O(L).float().to(dev)                                        # [H, Dh, D]
        write = torch.einsum("thd,hdm->thm", z, W_O)                                # [T, H, D]
        WOG = torch.einsum("hdm,tm->thd", W_O, G[nz])                              # [t, H, Dh]
        direct = torch.zeros(T, info.n_heads, device=dev)
        direct[nz] = (z[nz] * WOG).sum(-1)
        heads = torch.arange(info.n_heads, device=dev)
        add(HEAD, L, heads[None, :], pos[:, None], none, z.norm(dim=-1), write.norm(dim=-1), direct,
            (z * gz).sum(-1))
        # token pairs: the part of head h's write at t that comes from key position k
        if pairs:
            pattern = cap.value(f"blocks.{L}.attn.pattern")                         # [H, T, Tk]
            pattern = pattern * _kept(cap.ablations, L, pattern)[..., None]
            v = cap.value(f"blocks.{L}.attn.v")                                     # [Tk, Hkv, Dh]
            v = v.repeat_interleave(info.n_heads // v.shape[1], dim=1)              # [Tk, H, Dh]
            vo_norm = torch.einsum("khd,hdm->khm", v, W_O).norm(dim=-1)             # [Tk, H]
            pair_direct = torch.zeros_like(pattern)
            pair_direct[:, nz] = pattern[:, nz] * torch.einsum("khd,thd->htk", v, WOG)
            pair_total = pattern * torch.einsum("khd,thd->htk", v, gz)
            q, k = torch.tril_indices(T, T, device=dev)                             # causal pairs k <= t
            h = heads[:, None].expand(-1, q.numel())
            sel = (slice(None), q, k)
            add(HEAD_PAIR, L, h, q[None], k[None], pattern[sel], pattern[sel] * vo_norm.T[:, k], pair_direct[sel],
                pair_total[sel])
        b_O = adapter.b_O(L).float().to(dev)
        if b_O.abs().max() > 0:
            g = cap.grad(f"blocks.{L}.attn.out")
            add(ATTN_BIAS, L, none, none, none, torch.ones(()), b_O.norm(), (G @ b_O).sum(), (g @ b_O).sum())
        # neurons, per position
        post, gpost = cap.value(f"blocks.{L}.mlp.post"), cap.grad(f"blocks.{L}.mlp.post")   # [T, N]
        W_out = adapter.W_out(L).float().to(dev)                                    # [N, D]
        direct = torch.zeros_like(post)
        direct[nz] = post[nz] * (G[nz] @ W_out.T)
        neurons = torch.arange(info.d_mlp, device=dev)
        add(NEURON, L, neurons[None, :], pos[:, None], none, post, post.abs() * W_out.norm(dim=-1), direct,
            post * gpost)
        b_out = adapter.b_out(L).float().to(dev)
        if b_out.abs().max() > 0:
            g = cap.grad(f"blocks.{L}.mlp.out")
            add(MLP_BIAS, L, none, none, none, torch.ones(()), b_out.norm(), (G @ b_out).sum(), (g @ b_out).sum())
    # embeddings: the token row, and the rest of `embed` (position embedding) when there is one
    embed, gembed = cap.value("embed"), cap.grad("embed")                           # [T, D]
    rows = adapter.W_E.float().to(dev)[ids.to(dev)]                                 # [T, D]
    add(EMBED_TOKEN, -1, ids.to(dev), pos, none, rows.norm(dim=-1), rows.norm(dim=-1), (rows * G).sum(-1),
        (rows * gembed).sum(-1))
    rest = embed - rows
    if rest.abs().max() > 0:
        add(EMBED_POS, -1, pos, pos, none, rest.norm(dim=-1), rest.norm(dim=-1), (rest * G).sum(-1),
            (rest * gembed).sum(-1))
    if const is not None:
        add(CONSTANT, -1, none, none, none, torch.ones(()), torch.zeros(()), torch.tensor(const), torch.zeros(()))
    return parts


def _kept(ablations: list[Intervention], layer: int, pattern: torch.Tensor) -> torch.Tensor:
    """[H, T] 1 where head h's output at query t is its own, 0 where an ablation replaced it: the token
    pairs of a replaced output contribute nothing (its write no longer comes from the keys)."""
    keep = torch.ones(pattern.shape[:2], dtype=pattern.dtype, device=pattern.device)
    for iv in ablations:
        if iv.unit is not None and iv.unit.kind == "head" and iv.unit.layer == layer:
            keep[iv.unit.index, iv.selector.positions or slice(None)] = 0.0
    return keep


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
