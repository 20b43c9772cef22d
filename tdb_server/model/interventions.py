"""One intervention model: every change to a value in the forward pass — a patch at a stop, an ablation,
a node table under ablation, an SAE latent edit — is an `Intervention` applied here, with one set of
op definitions, one selector rule and one composition rule (nnsight's single swap event; TransformerLens's
one `generic_activation_patch`).

An intervention names a *target*: a whole site, or a part of one (see `sites.py`):

| target                       | part it edits, [B, T, ...]                     | lands on                  |
|------------------------------|------------------------------------------------|---------------------------|
| a site                       | the site's value                               | the site                  |
| `blocks.L.attn.head.H`       | z[:, :, H, :] (its slice of attn.z, [B, T, Dh]) | `blocks.L.attn.z`         |
|   ... when attn.z already ran | the same slice; the change reaches attn.out as (z'_H - z_H) @ W_O[H] | `blocks.L.attn.out` |
| `blocks.L.mlp.neuron.N`      | mlp.post[..., N]                               | `blocks.L.mlp.post`       |
| `blocks.L.<site>.sae.latent.K` | a_K = encode(site)[..., K]; the site becomes x + (a_K' - a_K) W_dec[K] (error kept) | the SAE's site |

Ops, on the part p (one definition each):

| op              | new value                                                                   |
|-----------------|-----------------------------------------------------------------------------|
| `zero`          | 0                                                                           |
| `set`, `add`    | value (broadcast to p), p + value                                           |
| `scale`         | p * scalar                                                                  |
| `mean`          | mean of p over each item's real positions (or over the batch)               |
| `copy_from_run` | the same part of a source value (another run, a resample prompt): `source()` |

Selectors pick batch items, positions, and (on whole sites) heads or neurons; unselected entries keep
their value. Positions mean the same everywhere, per batch item: a negative position counts from
that item's real end (its length), never into the padding of a shorter prompt; with a KV cache the
value covers positions offset..offset+T-1 and positions outside that window select nothing.

Composition at one site: unit edits first (each a part of the site's value), then whole-site edits,
which act on the result — zeroing attn.out and a head of it leaves zero, never subtracts the head twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from tdb_server.errors import FailedPrecondition, InvalidArgument

from .sites import HEAD_AXIS, NEURON_AXIS, Unit, pos_axis, site_kind, site_layer

OPS = ("set", "add", "scale", "zero", "mean", "copy_from_run")


class LatentCodec(Protocol):
    """What a latent intervention needs of an SAE (tdb_server/sae/sae.py's Sae)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def latent_delta(self, x: torch.Tensor, index: int, change: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Selector:
    """Which entries of the part to change; an empty list selects the whole axis."""

    batch: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    neurons: list[int] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("batch", self.batch), ("pos", self.positions), ("heads", self.heads),
                                        ("neurons", self.neurons)) if v]
        return ", ".join(parts) or "all"


@dataclass
class Context:
    """What applying an intervention may need from the forward it is in."""

    lengths: torch.Tensor | None = None        # [B] real lengths (None: every item is full length)
    offset: int = 0                            # positions held in the KV cache before this forward
    z: Callable[[int], torch.Tensor | None] = lambda layer: None   # attn.z of a layer seen in this forward


@dataclass
class Intervention:
    """One change to the forward pass (see the module docstring)."""

    target: str                                # what the user named: a site or a unit
    site: str                                  # where it lands
    op: str
    selector: Selector = field(default_factory=Selector)
    unit: Unit | None = None
    value: torch.Tensor | None = None          # set / add (None: `scalar`)
    scalar: float = 0.0                        # scale / add / set without a value
    source: Callable[[], torch.Tensor] | None = None   # copy_from_run: the source's value of `source_site`
    mean_over: str = "positions"               # mean: "positions" or "batch"
    sae: LatentCodec | None = None             # latent units: the SAE attached at the site
    w_o: torch.Tensor | None = None            # head units landing on attn.out: W_O[H], [Dh, D]

    @property
    def is_unit(self) -> bool:
        return self.unit is not None

    @property
    def source_site(self) -> str:
        """The site a copy_from_run source must provide: the unit's own site (attn.z for heads)."""
        return self.unit.site if self.unit is not None else self.site

    def describe(self, name: str = "") -> str:
        """e.g. 'scale 0.5 blocks.1.attn.head.2 [pos=[-1]]' (`name`: what to call the target)."""
        extra = f" {self.scalar:g}" if self.op in ("scale", "add") and self.value is None else ""
        return f"{self.op}{extra} {name or self.target} [{self.selector.describe()}]"

    # -- the part of the site's value it edits ---------------------------------------------------

    def read(self, value: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The part of the landing site's `value` this intervention edits, [B, T, ...]."""
        unit = self.unit
        if unit is None or unit.kind != "head" or site_kind(self.site) == "attn.z":
            return self.part_of(value)
        z = ctx.z(unit.layer)             # a head landing on attn.out: its slice of this forward's attn.z
        if z is None:
            raise FailedPrecondition(f"head patch {self.target}: attn.z of layer {unit.layer} was not seen in "
                                     "this forward", reason="NO_SOURCE_VALUE")
        return z[:, :, unit.index, :]

    def _write(self, value: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The landing site's value with its part changed from `old` to `new`."""
        unit = self.unit
        if unit is None:
            return new
        if unit.kind == "latent":
            return value + self.sae.latent_delta(value, unit.index, new - old)
        if unit.kind == "head" and site_kind(self.site) == "attn.out":
            w_o = self.w_o.to(device=value.device)
            return value + ((new - old).to(w_o.dtype) @ w_o).to(value.dtype)               # [B, T, D]
        out = value.clone()
        if unit.kind == "neuron":
            out[..., unit.index] = new.to(out.dtype)
        else:
            out[:, :, unit.index, :] = new.to(out.dtype)
        return out

    def part_of(self, source_value: torch.Tensor) -> torch.Tensor:
        """The part this intervention edits, read from another value of `source_site` (a source run's,
        a resample prompt's, a reference dataset's)."""
        unit = self.unit
        if unit is None:
            return source_value
        if unit.kind == "neuron":
            return source_value[..., unit.index]
        if unit.kind == "latent":
            return self.sae.encode(source_value)[..., unit.index].to(source_value.device)
        return source_value[:, :, unit.index, :]

    # -- applying ---------------------------------------------------------------------------------

    def apply(self, value: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        """The landing site's new value (a new tensor; `value` is not edited)."""
        ctx = ctx or Context()
        part = self.read(value, ctx)
        kind = "unit" if self.unit is not None else site_kind(self.site)
        new = self._replacement(part, kind, ctx)
        mask = selection_mask(part.shape, kind, self.selector, ctx.lengths, ctx.offset, part.device)
        if mask is not None:
            new = torch.where(mask, new, part)
        return self._write(value, part, new)

    def _replacement(self, p: torch.Tensor, kind: str, ctx: Context) -> torch.Tensor:
        """The full-shape new value of the part `p` (before the selector)."""
        op = self.op
        if op == "zero":
            return torch.zeros_like(p)
        if op == "scale":
            return p * self.scalar
        if op in ("add", "set"):
            other = self._broadcast(p)
            return p + other if op == "add" else other.clone()
        if op == "mean":
            if self.mean_over == "batch":
                return p.mean(dim=0, keepdim=True).expand_as(p)
            return masked_mean(p, pos_axis(kind), ctx.lengths)
        if op == "copy_from_run":
            return self._source_part(p, ctx)
        raise InvalidArgument(f"unknown patch op {op!r}; ops: {OPS}", reason="BAD_PATCH_OP")

    def _broadcast(self, p: torch.Tensor) -> torch.Tensor:
        other = self.value if self.value is not None else torch.tensor(self.scalar)
        other = other.to(dtype=p.dtype, device=p.device)
        try:
            return torch.broadcast_to(other, p.shape)
        except RuntimeError:
            raise InvalidArgument(f"patch value of shape {list(other.shape)} does not broadcast to {self.target} of "
                                  f"shape {list(p.shape)}", reason="BAD_PATCH_VALUE") from None

    def _source_part(self, p: torch.Tensor, ctx: Context) -> torch.Tensor:
        src = self.source() if self.source is not None else None
        if src is None:
            raise FailedPrecondition(f"the source run has no value for {self.target}", reason="NO_SOURCE_VALUE")
        src_part = self.part_of(src)
        if src_part.shape != p.shape:
            raise FailedPrecondition(f"cannot copy {self.target}: the source's value has shape {list(src_part.shape)}, "
                                     f"this run's has {list(p.shape)}", reason="SHAPE_MISMATCH")
        return src_part.to(dtype=p.dtype, device=p.device)


def masked_mean(p: torch.Tensor, dim: int, lengths: torch.Tensor | None) -> torch.Tensor:
    """p's mean over axis `dim` (positions), over each batch item's real positions only; expanded to p."""
    if lengths is None or p.shape[0] != lengths.shape[0] or p.dim() <= dim:
        return p.mean(dim=dim, keepdim=True).expand_as(p)
    n = p.shape[dim]
    real = torch.arange(n, device=p.device)[None, :] < lengths.to(p.device)[:, None]        # [B, T]
    view = [p.shape[0]] + [1] * (p.dim() - 1)
    view[dim] = n
    real = real.view(view).to(p.dtype)                                                      # [B, 1.., T, 1..]
    return ((p * real).sum(dim, keepdim=True) / real.sum(dim, keepdim=True).clamp(min=1)).expand_as(p)


def _positions_mask(n: int, positions: Sequence[int], batch: int, lengths: torch.Tensor | None, offset: int,
                    device: torch.device) -> torch.Tensor:
    """[B, n] bool: the selected positions of each batch item. Non-negative positions are absolute (with
    a KV cache this forward covers offset..offset+n-1); negative ones count from each item's real end."""
    ends = [offset + n] * batch if lengths is None else [int(x) + offset for x in lengths.tolist()]
    mask = torch.zeros(batch, n, dtype=torch.bool)
    for b, end in enumerate(ends):
        for p in positions:
            absolute = p if p >= 0 else end + p
            if not (-end <= p < offset + n):
                raise InvalidArgument(f"position index {p} out of range for size {end}"
                                      + (f" (batch item {b})" if lengths is not None else ""), reason="OUT_OF_RANGE")
            local = absolute - offset
            if 0 <= local < n:
                mask[b, local] = True
    return mask.to(device)


def _index_mask(n: int, idx: Sequence[int], what: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
    bad = [i for i in idx if not -n <= i < n]
    if bad:
        raise InvalidArgument(f"{what} index {bad[0]} out of range for size {n} (shape {list(shape)})",
                              reason="OUT_OF_RANGE")
    m = torch.zeros(n, dtype=torch.bool, device=device)
    m[torch.tensor([i % n for i in idx], device=device)] = True
    return m


def _axis_view(m: torch.Tensor, dims: Sequence[int], rank: int) -> torch.Tensor:
    view = [1] * rank
    for d, size in zip(dims, m.shape):
        view[d] = size
    return m.view(view)


def selection_mask(shape: torch.Size, kind: str, sel: Selector, lengths: torch.Tensor | None = None,
                   offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Boolean mask over `shape` (a value of site kind `kind`, or "unit" for a unit's part [B, T, ...])
    selecting `sel`; None when it selects everything."""
    rank = len(shape)
    mask = None

    def both(m: torch.Tensor) -> None:
        nonlocal mask
        mask = m if mask is None else (mask & m)

    for what, axes in (("heads", HEAD_AXIS), ("neurons", NEURON_AXIS)):
        idx = getattr(sel, what)
        if idx and kind not in axes:
            hint = "; use a head unit (blocks.L.attn.head.H)" if what == "heads" else ""
            raise InvalidArgument(f"{kind} has no {what[:-1]} dimension{hint}", reason="BAD_SELECTOR")
        if idx:
            dim = axes[kind]
            both(_axis_view(_index_mask(shape[dim], idx, what[:-1], shape, device), [dim], rank))
    if sel.batch:
        both(_axis_view(_index_mask(shape[0], sel.batch, "batch", shape, device), [0], rank))
    if sel.positions:
        dim = 1 if kind == "unit" else pos_axis(kind)
        if dim >= rank:
            raise InvalidArgument(f"{kind} of shape {list(shape)} has no position dimension", reason="BAD_SELECTOR")
        pos = _positions_mask(shape[dim], sel.positions, shape[0], lengths if lengths is not None
                              and lengths.shape[0] == shape[0] else None, offset, device)
        both(_axis_view(pos, [0, dim], rank))
    return mask


def unit_edits_first(interventions: Sequence[Intervention]) -> list[Intervention]:
    """The composition rule: unit edits (parts of a site's value) before whole-site edits."""
    return sorted(interventions, key=lambda iv: not iv.is_unit)


def apply_all(interventions: Sequence[Intervention], value: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
    """`value` of one site after every intervention landing there, composed by `unit_edits_first`."""
    for iv in unit_edits_first(interventions):
        value = iv.apply(value, ctx)
    return value


def by_site(interventions: Sequence[Intervention]) -> dict[str, list[Intervention]]:
    out: dict[str, list[Intervention]] = {}
    for iv in interventions:
        out.setdefault(iv.site, []).append(iv)
    return out


class Edits:
    """An `edit(site, value)` for `Capture` / `run_with_cache`: applies interventions per site."""

    def __init__(self, interventions: Sequence[Intervention], lengths: torch.Tensor | None = None):
        self.plan = by_site(interventions)
        self.lengths = lengths
        self.z: dict[int, torch.Tensor] = {}

    @property
    def sites(self) -> frozenset[str]:
        heads = {f"blocks.{iv.unit.layer}.attn.z" for ivs in self.plan.values() for iv in ivs
                 if iv.unit is not None and iv.unit.kind == "head"}
        return frozenset(self.plan) | frozenset(heads)

    def __call__(self, site: str, value: torch.Tensor) -> torch.Tensor | None:
        ivs = self.plan.get(site)
        new = apply_all(ivs, value, Context(self.lengths, 0, self.z.get)) if ivs else None
        if site_kind(site) == "attn.z":
            self.z[site_layer(site)] = value if new is None else new
        return new
