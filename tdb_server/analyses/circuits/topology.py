"""The residual-stream graph of a model: its senders (embed, heads, MLPs), its receivers (head q / k / v,
KV head k / v under GQA, MLP input, logits), which sender can reach which receiver, and the residual
stream each receiver reads. Facts about the model only: no forward pass here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdb_server.model import ModelInfo

INPUTS = ("q", "k", "v", "mlp", "logits")


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
    kind: str = ""  # of the node: "head" | "kv_head" | "mlp" | "logits"

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


def _block_receivers(L: int, H: int, Hkv: int) -> list[Receiver]:
    """Block L's receivers: q of every head, k and v of every (KV) head, the MLP input."""
    kv = "kv_head" if Hkv != H else "head"
    out = [Receiver(f"blocks.{L}.attn.head.{h}", "q", L, h, "head") for h in range(H)]
    for part in ("k", "v"):
        out += [Receiver(f"blocks.{L}.attn.{kv}.{g}", part, L, g, kv) for g in range(Hkv)]
    return out + [Receiver(f"blocks.{L}.mlp", "mlp", L, 0, "mlp")]


def topology(info: ModelInfo) -> Topology:
    """The graph of a model: senders and receivers in execution order, and `reach`."""
    n, H, Hkv = info.n_layers, info.n_heads, info.n_kv_heads
    senders = [Sender("embed", "embed", -1)]
    receivers: list[Receiver] = []
    for L in range(n):
        senders += [Sender(f"blocks.{L}.attn.head.{h}", "head", L, h) for h in range(H)]
        senders.append(Sender(f"blocks.{L}.mlp", "mlp", L))
        receivers += _block_receivers(L, H, Hkv)
    receivers.append(Receiver("logits", "logits", n, 0, "logits"))
    reach = torch.zeros(len(senders), len(receivers), dtype=torch.bool)
    for i, s in enumerate(senders):
        for j, r in enumerate(receivers):
            same_block = s.kind == "head" and r.input == "mlp" and not info.parallel_blocks
            reach[i, j] = s.kind == "embed" or s.layer < r.layer or (s.layer == r.layer and same_block)
    return Topology(senders, receivers, reach, n, info.parallel_blocks)


def block_input(topo: Topology, r: Receiver) -> str:
    """The residual-stream site receiver r reads (its block's input to attention or to the MLP)."""
    if r.input == "logits":
        return f"blocks.{topo.n_layers - 1}.resid_post"
    return f"blocks.{r.layer}.{'resid_mid' if r.input == 'mlp' and not topo.parallel else 'resid_pre'}"


def _is_input_of(s: Sender, r: Receiver, group: int) -> bool:
    """Is receiver r an input of sender s's own node (a head's q, its KV head's k / v; an MLP's input)?"""
    if r.layer != s.layer:
        return False
    if s.kind == "mlp":
        return r.input == "mlp"
    return (r.input == "q" and r.index == s.index) or (r.input in ("k", "v") and r.index == s.index // group)


def inputs_of(topo: Topology) -> dict[int, list[int]]:
    """sender index -> indices of the receivers that are inputs of the same node (a head's q, k, v;
    an MLP's input). Under GQA a head's k / v come from its KV head."""
    H = max((s.index for s in topo.senders if s.kind == "head"), default=-1) + 1
    Hkv = max((r.index for r in topo.receivers if r.input == "k"), default=-1) + 1
    group = H // Hkv if Hkv else 1          # query heads per KV head
    return {i: [j for j, r in enumerate(topo.receivers) if s.kind != "embed" and _is_input_of(s, r, group)]
            for i, s in enumerate(topo.senders)}
