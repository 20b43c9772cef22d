"""Sender writes: what each sender (embed, head, MLP) writes into the residual stream, read from one
ordinary forward (`run_with_cache`), and the bias terms that belong to no sender."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdb_server.model import ModelAdapter
from tdb_server.model.capture import Capture

from ..inputs import Target
from .topology import Topology


def final_site(topo: Topology) -> str:
    """The final residual stream (what the logits read, before the final norm)."""
    return f"blocks.{topo.n_layers - 1}.resid_post"


def write_sites(n_layers: int) -> set[str]:
    """The sites that hold every sender's write: embed, and each block's attn.z and mlp.out."""
    return {"embed"} | {f"blocks.{L}.{k}" for L in range(n_layers) for k in ("attn.z", "mlp.out")}


def head_writes(adapter: ModelAdapter, layer: int, z: torch.Tensor) -> torch.Tensor:
    """z [..., T, H, Dh] -> per-head writes [..., H, T, D] (float32)."""
    W_O = adapter.W_O(layer).float().to(z.device)                   # [H, Dh, D]
    return torch.einsum("...thd,hde->...hte", z.float(), W_O)


def sender_writes(adapter: ModelAdapter, topo: Topology, values: Capture) -> torch.Tensor:
    """Captured write sites (batch row 0) -> writes [S, T, D] in `topo.senders` order, float32."""
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


def run_prompt(adapter: ModelAdapter, topo: Topology, ids: list[int], target: Target) -> PromptRun:
    """One forward of `ids`: every sender's write, the target and the final residual."""
    last = final_site(topo)
    logits, cache = adapter.run_with_cache(torch.tensor([ids]), write_sites(topo.n_layers) | {last})
    final = cache[last]                                                   # [1, T, D]
    value = float(target.read(logits, final)[0])
    return PromptRun(ids, sender_writes(adapter, topo, cache), value, final[0].float())


def mean_writes(writes: torch.Tensor) -> torch.Tensor:
    """[S, T, D] -> each sender's write replaced by its mean over positions, [S, T, D]."""
    return writes.mean(1, keepdim=True).expand_as(writes).clone()


def bias_in_inputs(adapter: ModelAdapter, topo: Topology) -> torch.Tensor:
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
