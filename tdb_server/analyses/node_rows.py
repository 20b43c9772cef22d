"""The node table's rows, built from one captured forward: per node type, dense metric tensors
(`Part`), then one columnar table allocated once (`assemble`).

The formulas are in node_table.py's docstring. This module only decides which positions get rows
(every position, or the objective's only), whether the total-effect column is computed (it needs the
backward; without it the column is NaN) and how rows are laid out:

| column        | ids [R, 5] int32 (ID_COLUMNS)                  | metrics [R, 4] float32 (METRICS)            |
|---------------|------------------------------------------------|---------------------------------------------|
| per part      | node_type, layer, index, query_pos, key_pos    | activation, write_norm, direct, total       |

A part's columns are tensors that broadcast to the part's shape (e.g. neurons: [P, N]); rows are that
shape in C order. Nothing is stacked or concatenated twice: `assemble` writes each part into its slice
of the two output tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdb_server.model.interventions import Intervention

# node types (the wire enum NodeType has the same numbers)
HEAD, HEAD_PAIR, NEURON, EMBED_TOKEN, EMBED_POS, ATTN_BIAS, MLP_BIAS, CONSTANT = range(1, 9)
SAE_LATENT = 9   # latents of attached SAEs (tdb_server/sae/attribution.py); key_pos = the site's code
METRICS = ("activation", "write_norm", "direct_effect", "total_effect")  # columns of `metrics`
ID_COLUMNS = ("node_type", "layer", "index", "query_pos", "key_pos")    # columns of `ids`


def _broadcast(*shapes: torch.Size) -> torch.Size:
    """torch.broadcast_shapes for a few small shapes (that one costs ~0.1 ms a call, a table has dozens)."""
    out = [1] * max(len(s) for s in shapes)
    for s in shapes:
        for i, d in enumerate(s, len(out) - len(s)):
            if d != 1:
                if out[i] not in (1, d):
                    raise ValueError(f"shapes {list(shapes)} do not broadcast")
                out[i] = d
    return torch.Size(out)


@dataclass
class Part:
    """Rows of one node type in one layer: id columns (index, query_pos, key_pos) and metric columns
    (activation, write_norm, direct, total), all broadcastable to `shape`; `total` None = not computed."""

    node_type: int
    layer: int
    index: torch.Tensor
    qpos: torch.Tensor
    kpos: torch.Tensor
    act: torch.Tensor
    write: torch.Tensor
    direct: torch.Tensor
    total: torch.Tensor | None

    def __post_init__(self) -> None:
        self.shape = _broadcast(self.index.shape, self.qpos.shape, self.kpos.shape, self.act.shape, self.direct.shape)

    @property
    def n_rows(self) -> int:
        return self.shape.numel()

    def direct_sum(self) -> float:
        """The sum of this part's direct effects (float64), as if its rows were listed."""
        return float(self.direct.expand(self.shape).double().sum())

    def write_into(self, ids: torch.Tensor, metrics: torch.Tensor) -> None:
        """Fill ids [n, 5] and metrics [n, 4] (this part's slices of the table, CPU)."""
        shape = self.shape
        i = ids.view(*shape, 5)
        i[..., 0] = self.node_type
        i[..., 1] = self.layer
        for col, x in ((2, self.index), (3, self.qpos), (4, self.kpos)):
            i[..., col] = x.expand(shape).cpu()
        m = metrics.view(*shape, 4)
        for col, x in enumerate((self.act, self.write, self.direct)):
            m[..., col] = x.expand(shape).float().cpu()
        if self.total is None:
            m[..., 3] = float("nan")
        else:
            m[..., 3] = self.total.expand(shape).float().cpu()


def assemble(parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [R, 5] int32, metrics [R, 4] float32) of the parts, in order."""
    n = sum(p.n_rows for p in parts)
    ids = torch.empty(n, 5, dtype=torch.int32)
    metrics = torch.empty(n, 4, dtype=torch.float32)
    start = 0
    for p in parts:
        end = start + p.n_rows
        if end > start:
            p.write_into(ids[start:end], metrics[start:end])
        start = end
    return ids, metrics


def kept(ablations: list[Intervention], layer: int, n_heads: int, T: int, device) -> torch.Tensor:
    """[H, T] 1 where head h's output at query t is its own, 0 where an ablation replaced it: the token
    pairs of a replaced output contribute nothing (its write no longer comes from the keys)."""
    keep = torch.ones(n_heads, T, device=device)
    for iv in ablations:
        if iv.unit is not None and iv.unit.kind == "head" and iv.unit.layer == layer:
            keep[iv.unit.index, [p for p in iv.selector.positions if p < T] if iv.selector.positions else slice(None)] = 0.0
    return keep


def table_parts(adapter, cap, G: torch.Tensor, const: float | None, ids: torch.Tensor, pairs: bool,
                rows_at: torch.Tensor, total: bool) -> list[Part]:
    """Every node's rows, at query positions `rows_at` [P] (embeddings too; biases sum over positions).
    cap: the node table's GradCapture; G [T, D] the direct-effect direction; ids [T] the token ids;
    total: the capture holds gradients (else total effects are left out: NaN)."""
    info = adapter.info
    dev = G.device
    pos = rows_at.to(dev)                                                           # [P]
    none = torch.full((), -1, device=dev)
    Gp = G[pos]                                                                     # [P, D]
    nz = (Gp.abs().amax(-1) > 0).nonzero().flatten()        # rows of pos where direct effects can be non-zero
    heads = torch.arange(info.n_heads, device=dev)
    parts = []
    for L in range(info.n_layers):
        # heads, per query position
        z = cap.value(f"blocks.{L}.attn.z")[pos]                                    # [P, H, Dh]
        gz = cap.grad(f"blocks.{L}.attn.z")[pos] if total else None                 # [P, H, Dh]
        W_O = adapter.W_O(L).float().to(dev)                                        # [H, Dh, D]
        write = torch.einsum("thd,hdm->thm", z, W_O)                                # [P, H, D]
        WOG = torch.einsum("hdm,tm->thd", W_O, Gp[nz])                             # [p, H, Dh]
        direct = torch.zeros(len(pos), info.n_heads, device=dev)
        direct[nz] = (z[nz] * WOG).sum(-1)
        parts.append(Part(HEAD, L, heads[None, :], pos[:, None], none, z.norm(dim=-1), write.norm(dim=-1), direct,
                          None if gz is None else (z * gz).sum(-1)))
        if pairs:
            parts.append(_pair_part(adapter, cap, L, pos, nz, WOG, gz, W_O))
        b_O = adapter.b_O(L).float().to(dev)
        if b_O.abs().max() > 0:
            g = (cap.grad(f"blocks.{L}.attn.out") @ b_O).sum() if total else None
            parts.append(Part(ATTN_BIAS, L, none, none, none, torch.ones(()), b_O.norm(), (G @ b_O).sum(), g))
        # neurons, per position
        post = cap.value(f"blocks.{L}.mlp.post")[pos]                               # [P, N]
        W_out = adapter.W_out(L).float().to(dev)                                    # [N, D]
        direct = torch.zeros_like(post)
        direct[nz] = post[nz] * (Gp[nz] @ W_out.T)
        neurons = torch.arange(info.d_mlp, device=dev)
        parts.append(Part(NEURON, L, neurons[None, :], pos[:, None], none, post, post.abs() * adapter.W_out_norms(L).to(dev),
                          direct, post * cap.grad(f"blocks.{L}.mlp.post")[pos] if total else None))
        b_out = adapter.b_out(L).float().to(dev)
        if b_out.abs().max() > 0:
            g = (cap.grad(f"blocks.{L}.mlp.out") @ b_out).sum() if total else None
            parts.append(Part(MLP_BIAS, L, none, none, none, torch.ones(()), b_out.norm(), (G @ b_out).sum(), g))
    # embeddings: the token row, and the rest of `embed` (position embedding) when there is one
    embed = cap.value("embed")[pos]                                                 # [P, D]
    gembed = cap.grad("embed")[pos] if total else None
    rows = adapter.W_E.float().to(dev)[ids.to(dev)[pos]]                            # [P, D]
    parts.append(Part(EMBED_TOKEN, -1, ids.to(dev)[pos], pos, none, rows.norm(dim=-1), rows.norm(dim=-1),
                      (rows * Gp).sum(-1), None if gembed is None else (rows * gembed).sum(-1)))
    rest = embed - rows
    if rest.abs().max() > 0:
        parts.append(Part(EMBED_POS, -1, pos, pos, none, rest.norm(dim=-1), rest.norm(dim=-1), (rest * Gp).sum(-1),
                          None if gembed is None else (rest * gembed).sum(-1)))
    if const is not None:
        parts.append(Part(CONSTANT, -1, none, none, none, torch.ones(()), torch.zeros(()), torch.tensor(const),
                          torch.zeros(())))
    return parts


def _pair_part(adapter, cap, L: int, pos: torch.Tensor, nz: torch.Tensor, WOG: torch.Tensor,
               gz: torch.Tensor | None, W_O: torch.Tensor) -> Part:
    """Token pairs of layer L: the part of head h's write at query t (in pos) that comes from key k <= t."""
    info = adapter.info
    pattern = cap.value(f"blocks.{L}.attn.pattern")                                 # [H, T, Tk]
    T = pattern.shape[1]
    pattern = (pattern * kept(cap.ablations, L, info.n_heads, T, pattern.device)[..., None])[:, pos]   # [H, P, Tk]
    v = cap.value(f"blocks.{L}.attn.v")                                             # [Tk, Hkv, Dh]
    v = v.repeat_interleave(info.n_heads // v.shape[1], dim=1)                      # [Tk, H, Dh]
    vo_norm = torch.einsum("khd,hdm->khm", v, W_O).norm(dim=-1)                     # [Tk, H]
    pair_direct = torch.zeros_like(pattern)
    pair_direct[:, nz] = pattern[:, nz] * torch.einsum("khd,thd->htk", v, WOG)
    pair_total = pattern * torch.einsum("khd,thd->htk", v, gz) if gz is not None else None
    Tk = pattern.shape[-1]
    q, k = (torch.arange(Tk, device=pos.device)[None, :] <= pos[:, None]).nonzero(as_tuple=True)  # causal k <= t
    h = torch.arange(info.n_heads, device=pos.device)[:, None].expand(-1, q.numel())
    sel = (slice(None), q, k)
    return Part(HEAD_PAIR, L, h, pos[q][None], k[None], pattern[sel], pattern[sel] * vo_norm.T[:, k], pair_direct[sel],
                None if pair_total is None else pair_total[sel])
