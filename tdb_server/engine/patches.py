"""Patches: what to change at a site (op + selector + value), and applying one to a tensor.

A patch names a site or a unit. Units are turned into sites here:
- a head unit `blocks.L.attn.head.H` acts on that head's write into `blocks.L.attn.out`
  (z[:, :, H] @ W_O[H]); attn.out becomes attn.out - write + op(write), exact for every op;
- a neuron unit `blocks.L.mlp.neuron.N` acts on `blocks.L.mlp.post[..., N]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import FailedPrecondition, InvalidArgument

OPS = ("set", "add", "scale", "zero", "mean", "copy_from_run")

# Which dimension of a site's value holds positions / heads / neurons (batch is always 0).
_POS_DIM = {"attn.pattern": 2}
_HEAD_DIM = {"attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.z": 2, "attn.pattern": 1}
_NEURON_DIM = {"mlp.pre": 2, "mlp.post": 2}


def site_kind(site: str) -> str:
    """'blocks.1.attn.out' -> 'attn.out'; 'logits' -> 'logits'."""
    parts = site.split(".")
    return ".".join(parts[2:]) if parts[0] == "blocks" else site


@dataclass
class Selector:
    batch: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    neurons: list[int] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("batch", self.batch), ("pos", self.positions), ("heads", self.heads),
                                        ("neurons", self.neurons)) if v]
        return ", ".join(parts) or "all"


@dataclass
class PatchSpec:
    id: int
    name: str                    # what the user named: a site or a unit
    site: str                    # the site where it applies
    op: str
    selector: Selector
    head: int | None = None      # head unit: acts on this head's write into attn.out
    value: torch.Tensor | None = None
    scalar: float = 0.0
    source: Callable[[], torch.Tensor] | None = None   # copy_from_run: the source run's value
    mean_over: str = "positions"
    scope: str = "run"
    applied: bool = False
    tokens: tuple[int, ...] = ()   # generation steps where it applies (empty = every step)

    def describe(self) -> str:
        extra = f" {self.scalar:g}" if self.op in ("scale", "add") and self.value is None else ""
        return f"{self.op}{extra} {self.name} [{self.selector.describe()}]"


def _mask(shape: torch.Size, kind: str, sel: Selector, device: torch.device, offset: int = 0) -> torch.Tensor | None:
    """Boolean mask over `shape` selecting the batch items/positions/heads/neurons of `sel`.

    Positions are absolute: with a KV cache the value covers positions offset..offset+T-1 (negative
    positions count from the end of the sequence so far), and positions outside that window select
    nothing."""
    axes = [(0, sel.batch, "batch")]
    axes.append((_POS_DIM.get(kind, 1), sel.positions, "position"))
    if kind in _HEAD_DIM:
        axes.append((_HEAD_DIM[kind], sel.heads, "head"))
    elif sel.heads:
        raise InvalidArgument(f"{kind} has no head dimension; use a head unit (blocks.L.attn.head.H)", reason="BAD_SELECTOR")
    if kind in _NEURON_DIM:
        axes.append((_NEURON_DIM[kind], sel.neurons, "neuron"))
    elif sel.neurons:
        raise InvalidArgument(f"{kind} has no neuron dimension", reason="BAD_SELECTOR")
    mask = None
    for dim, idx, what in axes:
        if not idx:
            continue
        if dim >= len(shape):
            raise InvalidArgument(f"{kind} of shape {list(shape)} has no {what} dimension", reason="BAD_SELECTOR")
        n = shape[dim]
        total = n + offset if what == "position" else n
        bad = [i for i in idx if not -total <= i < total]
        if bad:
            raise InvalidArgument(f"{what} index {bad[0]} out of range for size {total} (shape {list(shape)})",
                                  reason="OUT_OF_RANGE")
        local = [i % total - (offset if what == "position" else 0) for i in idx]
        m = torch.zeros(n, dtype=torch.bool, device=device)
        local = [j for j in local if 0 <= j < n]
        if local:
            m[torch.tensor(local, device=device)] = True
        view = [1] * len(shape)
        view[dim] = n
        m = m.view(view)
        mask = m if mask is None else (mask & m)
    return mask


def _replacement(v: torch.Tensor, spec: PatchSpec, kind: str, lengths: torch.Tensor | None) -> torch.Tensor:
    """The full-shape new value of `v` under `spec` (before masking)."""
    if spec.op == "zero":
        return torch.zeros_like(v)
    if spec.op == "scale":
        return v * spec.scalar
    if spec.op in ("add", "set"):
        other = spec.value if spec.value is not None else torch.tensor(spec.scalar)
        other = other.to(dtype=v.dtype, device=v.device)
        try:
            other = torch.broadcast_to(other, v.shape)
        except RuntimeError:
            raise InvalidArgument(f"patch value of shape {list(spec.value.shape) if spec.value is not None else []} "
                                  f"does not broadcast to {spec.site} of shape {list(v.shape)}",
                                  reason="BAD_PATCH_VALUE") from None
        return v + other if spec.op == "add" else other.clone()
    if spec.op == "mean":
        if spec.mean_over == "batch":
            return v.mean(dim=0, keepdim=True).expand_as(v)
        dim = _POS_DIM.get(kind, 1)
        if lengths is not None and v.shape[0] == lengths.shape[0] and v.dim() > dim:
            n = v.shape[dim]
            real = (torch.arange(n, device=v.device)[None, :] < lengths.to(v.device)[:, None])  # [B, T]
            view = [v.shape[0]] + [1] * (v.dim() - 1)
            view[dim] = n
            real = real.view(view).to(v.dtype)
            return ((v * real).sum(dim, keepdim=True) / real.sum(dim, keepdim=True).clamp(min=1)).expand_as(v)
        return v.mean(dim=dim, keepdim=True).expand_as(v)
    if spec.op == "copy_from_run":
        src = spec.source() if spec.source else None
        if src is None:
            raise FailedPrecondition(f"the source run has no value for {spec.name}", reason="NO_SOURCE_VALUE")
        if src.shape != v.shape:
            raise FailedPrecondition(f"cannot copy {spec.name}: the source run's value has shape {list(src.shape)}, "
                                     f"this run's has {list(v.shape)}", reason="SHAPE_MISMATCH")
        return src.to(dtype=v.dtype, device=v.device)
    raise InvalidArgument(f"unknown patch op {spec.op!r}; ops: {OPS}", reason="BAD_PATCH_OP")


def apply(v: torch.Tensor, spec: PatchSpec, lengths: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Apply a site patch (not a head unit) to `v`; returns a new tensor. `offset`: cached positions before v."""
    kind = site_kind(spec.site)
    mask = _mask(v.shape, kind, spec.selector, v.device, offset)
    new = _replacement(v, spec, kind, lengths)
    return new if mask is None else torch.where(mask, new, v)


def apply_head(attn_out: torch.Tensor, z: torch.Tensor, W_O_h: torch.Tensor, spec: PatchSpec,
               lengths: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Apply a head-unit patch to attn.out [B, T, D] given z [B, T, H, Dh] and W_O[h] [Dh, D]."""
    write = z[:, :, spec.head, :].to(W_O_h.dtype) @ W_O_h.to(z.device)  # [B, T, D]
    mask = _mask(write.shape, "attn.out", spec.selector, write.device, offset)
    new = _replacement(write, spec, "attn.out", lengths)
    if mask is not None:
        new = torch.where(mask, new, write)
    return attn_out + (new - write).to(attn_out.dtype)
