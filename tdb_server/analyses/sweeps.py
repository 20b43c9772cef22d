"""Activation-patching sweeps at scale, exact and by attribution patching, streamed in chunks.

A sweep patches one activation at a time from a *source* run into a *base* run and reads the target:

| direction  | base run  | source run | reads as                                     |
|------------|-----------|------------|----------------------------------------------|
| denoising  | corrupted | clean      | how much of the clean behaviour a patch restores |
| noising    | clean     | corrupted  | how much a patch destroys                    |

`value` is the raw target with the patch; `normalized = (value - corrupted) / (clean - corrupted)`
(0 = the corrupted run's value, 1 = the clean run's), for both directions.

| kind           | site                       | one patch                               | grid                            |
|----------------|----------------------------|-----------------------------------------|---------------------------------|
| `resid_pre`    | `blocks.L.resid_pre`       | [pos, :]                                | layer x position                |
| `attn_out`     | `blocks.L.attn.out`        | [pos, :]                                | layer x position                |
| `mlp_out`      | `blocks.L.mlp.out`         | [pos, :]                                | layer x position                |
| `head_out`     | `blocks.L.attn.z`          | [:, head, :] or [pos, head, :]          | layer x head (x position)       |
| `head_q`       | `blocks.L.attn.q`          | [:, head, :] or [pos, head, :]          | layer x head (x position)       |
| `head_k`/`_v`  | `blocks.L.attn.k` / `.v`   | [:, kv_head, :] or [pos, kv_head, :]    | layer x kv_head (x position)    |
| `head_pattern` | `blocks.L.attn.pattern`    | [head, :, :] or [head, query_pos, :]    | layer x head (x query position) |
| `neuron`       | `blocks.L.mlp.post`        | [:, neuron] or [pos, neuron]            | layer x neuron (x position)     |

How it stays exact and fast (resume.py has the exactness argument):

* The prompts are cut after the target position (a causal model's later tokens cannot matter), each
  runs once; the base run records every block's input (the residual stream) and call arguments.
* Patches go many to a forward: batch element b carries patch b, applied by `torch.where` with a
  boolean mask built once per chunk (no host sync per patch; one device->host copy per chunk).
* A chunk's patches are sorted by layer and run as one *growing batch*: rows for layer-L patches
  join the batch at block L, starting from the cached residual stream entering block L, so blocks
  before a patch are never recomputed and each block runs once per chunk (few kernel launches).
* The last block's MLP runs on the target's row only (`_mlp_at_row`; its attention still reads every
  position), and only that row of the final residual stream is normalised and projected, onto the
  vocabulary columns the target reads.
* Chunks are sized from a memory budget (half the free device memory on CUDA, a quarter of the
  available RAM on CPU); an out-of-memory error halves the chunk and retries, never fails the sweep.

Attribution patching estimates every patch from 2 forwards + 1 backward: effect ~= (source - base)
activation . d target / d activation on the base run. `method="attribution"` streams those estimates
first, then verifies the `verify_top_k` largest |estimated effects| by batched exact patching and
reports the Pearson and Spearman correlation between estimated and exact effects on them.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from tdb_server.errors import Cancelled, InvalidArgument
from tdb_server.model.arch import get_path
from tdb_server.model.sites import site_layer

from .inputs import Target, position
from .registry import register
from .resume import BlockCalls, read_target, recording_blocks
from .stats import pearson, spearman

DIRECTIONS = ("denoising", "noising")
METHODS = ("exact", "attribution")
MAX_PATCHES = 5_000_000
MAX_BATCH = {"cpu": 64, "cuda": 1024}   # patches per forward: more gains nothing and delays progress
DEFAULT_VERIFY = 20


@dataclass(frozen=True)
class SweepKind:
    name: str
    site: str               # block-level site kind
    unit: str | None        # name of the unit axis: "head", "kv_head", "neuron"; None = whole site
    pos_dim: int            # the position (query position) dim of the site's value [B, ...]
    unit_dim: int | None    # the unit dim of the site's value
    mask_last: bool         # the mask keeps the site's last dim (neurons) or broadcasts over it (1)


KINDS: dict[str, SweepKind] = {k.name: k for k in (
    SweepKind("resid_pre", "resid_pre", None, 1, None, False),           # [B, T, D]
    SweepKind("attn_out", "attn.out", None, 1, None, False),             # [B, T, D]
    SweepKind("mlp_out", "mlp.out", None, 1, None, False),               # [B, T, D]
    SweepKind("head_out", "attn.z", "head", 1, 2, False),                # [B, T, H, Dh]
    SweepKind("head_q", "attn.q", "head", 1, 2, False),                  # [B, T, H, Dh]
    SweepKind("head_k", "attn.k", "kv_head", 1, 2, False),               # [B, T, Hkv, Dh]
    SweepKind("head_v", "attn.v", "kv_head", 1, 2, False),               # [B, T, Hkv, Dh]
    SweepKind("head_pattern", "attn.pattern", "head", 2, 1, False),      # [B, H, Tq, Tk]
    SweepKind("neuron", "mlp.post", "neuron", 1, 2, True),               # [B, T, N]
)}


@dataclass(frozen=True)
class SweepSpec:
    kind: str
    direction: str = "denoising"
    per_position: bool = False            # heads / neurons: one patch per position too
    layers: tuple[int, ...] = ()          # default: every layer
    positions: tuple[int, ...] = ()       # per-position grids: default every position up to the target
    method: str = "exact"
    verify_top_k: int = DEFAULT_VERIFY    # attribution: patches verified exactly
    max_batch: int = 0                    # 0 = from the memory budget


@dataclass(frozen=True)
class Axis:
    name: str               # "layer", "head", "kv_head", "neuron", "position"
    values: tuple[int, ...]


@dataclass
class SweepChunk:
    """Append-only partial results: `values[i]` is the patched target at flat grid index `indices[i]`."""

    indices: torch.Tensor      # [n] int64, C-order flat indices into the grid
    values: torch.Tensor       # [n] float32, raw target with the patch
    normalized: torch.Tensor   # [n] float32
    approximate: bool          # attribution estimates (else exact)
    done: int                  # patches finished in this stage
    total: int                 # patches in this stage
    stage: str                 # "exact" | "attribution" | "verify"
    elapsed_s: float
    eta_s: float


@dataclass
class SweepSummary:
    elapsed_s: float = 0.0
    exact_patches: int = 0
    chunks: int = 0
    batch_size: int = 0
    verified: int = 0
    pearson: float = float("nan")          # attribution vs exact effects on the verified patches
    spearman: float = float("nan")
    max_abs_error: float = float("nan")    # max |estimate - exact| on the verified patches


# --- memory budget --------------------------------------------------------------------------------

def memory_budget(device: torch.device) -> int:
    """Bytes a sweep may use for its batched activations: half the free memory of a CUDA device, a
    quarter of the available RAM on the CPU (at most 8 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not avail:
        avail = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) if hasattr(os, "sysconf") else 8 << 30
    return int(min(avail // 4, 8 << 30))


def bytes_per_patch(info, seq: int, dtype: torch.dtype) -> int:
    """A generous estimate of the activations one batch element keeps alive inside a block."""
    elt = torch.empty((), dtype=dtype).element_size()
    return elt * seq * (12 * info.d_model + 4 * info.d_mlp + 3 * info.n_heads * seq) + 64 * seq


# --- masks: which batch rows get which patch -------------------------------------------------------

def _mask_shape(kind: SweepKind, value_shape: tuple[int, ...]) -> tuple[int, ...]:
    return value_shape if kind.mask_last else (*value_shape[:-1], 1)


def _build_mask(kind: SweepKind, value_shape: tuple[int, ...], rows: torch.Tensor, units: torch.Tensor | None,
                positions: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Boolean mask [B, ...] (site shape, last dim 1 unless neurons): True where row r is patched.
    rows [n]; units [n] or None (whole site); positions [n] or None (every position)."""
    mask = torch.zeros(_mask_shape(kind, value_shape), dtype=torch.bool, device=device)
    idx: list = [slice(None)] * mask.dim()
    idx[0] = rows.to(device)
    if positions is not None:
        idx[kind.pos_dim] = positions.to(device)
    if units is not None:
        idx[kind.unit_dim] = units.to(device)
    # advanced indices separated by a slice would move their dims first; mask[...] = True is unaffected
    mask[tuple(idx)] = True
    return mask


def _select(x: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x[rows]


class _MaskPatch:
    """Handler: at `blocks.L.<site>`, rows where masks[L] is True take the source run's value — the
    batched special case of a copy_from_run Intervention (model/interventions.py), one cell per batch
    row; tests/test_intervention_equivalence.py checks the cells against Ablate's resample."""

    def __init__(self, kind: SweepKind, layers: list[int], source: dict[int, torch.Tensor]):
        self.kind = kind
        self.sites = frozenset(f"blocks.{layer}.{kind.site}" for layer in layers)
        self.source = source
        self.masks: dict[int, torch.Tensor] = {}

    def on_site(self, site: str, value: torch.Tensor) -> torch.Tensor | None:
        layer = site_layer(site)
        mask = self.masks.get(layer)
        if mask is None:
            return None
        return torch.where(mask, self.source[layer].to(value.dtype), value)


@contextlib.contextmanager
def _mlp_at_row(adapter, layer: int, row: int) -> Iterator[None]:
    """Inside: block `layer`'s MLP, called from this thread, runs on row `row` of its input only
    ([B, T, D] -> [B, 1, D]). The block adds that row to its residual stream by broadcasting, so only
    row `row` of the block's output is right: for the last block, when the target reads that row alone.
    The MLP is position-wise, so that row is what the full MLP computes (up to float rounding).
    The hook is removed in `finally`."""
    me = threading.get_ident()

    def pre(module, args, kwargs):
        if threading.get_ident() != me:        # another session's forward on the shared model
            return None
        if args:
            return (args[0][:, row:row + 1], *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: kwargs[key][:, row:row + 1]}

    handle = get_path(adapter.blocks[layer], adapter.spec.mlp).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# --- the sweep -------------------------------------------------------------------------------------

def _check_spec(spec: SweepSpec, clean_ids: list[int], corrupted_ids: list[int], target: Target) -> None:
    """INVALID_ARGUMENT for a sweep request that cannot run, before any work."""
    if spec.kind not in KINDS:
        raise InvalidArgument(f"unknown sweep kind {spec.kind!r}; one of {', '.join(KINDS)}", reason="BAD_SWEEP")
    if spec.direction not in DIRECTIONS:
        raise InvalidArgument(f"unknown direction {spec.direction!r}; one of {', '.join(DIRECTIONS)}",
                              reason="BAD_SWEEP")
    if spec.method not in METHODS:
        raise InvalidArgument(f"unknown method {spec.method!r}; one of {', '.join(METHODS)}", reason="BAD_SWEEP")
    if len(clean_ids) != len(corrupted_ids):
        raise InvalidArgument(f"the clean prompt has {len(clean_ids)} tokens, the corrupted one {len(corrupted_ids)}: "
                              "patching takes values at the same positions, so they must have the same length",
                              reason="LENGTH_MISMATCH")
    if target.appended_ids:
        raise InvalidArgument("sweeps take single-token targets (or targets that differ in their first token)",
                              reason="BAD_TARGET")
    if spec.max_batch < 0 or spec.verify_top_k < 0:
        raise InvalidArgument("max_batch and verify_top_k must be >= 0", reason="OUT_OF_RANGE")


class PatchSweep:
    """A prepared sweep. Construction validates the request and runs the two prompts once (and, for
    attribution, the one backward); `chunks()` then computes and yields the results, a chunk at a time
    (callers may take a device turn per chunk). After the last chunk, `summary` is filled in."""

    def __init__(self, adapter, clean_ids: list[int], corrupted_ids: list[int], target: Target, spec: SweepSpec):
        info = adapter.info
        self.adapter, self.target, self.spec = adapter, target, spec
        _check_spec(spec, clean_ids, corrupted_ids, target)
        self.kind = KINDS[spec.kind]
        self.site = f"blocks.{{L}}.{self.kind.site}"
        self.notes: list[str] = []
        self.seq = target.position + 1                     # later tokens cannot change the target
        if self.seq < len(clean_ids):
            self.notes.append(f"the prompts are cut after the target position {target.position}: later tokens "
                              "cannot change it")
        layers = [position(x, info.n_layers, "layer") for x in spec.layers] or list(range(info.n_layers))
        if len(set(layers)) != len(layers):
            raise InvalidArgument("layers are listed twice", reason="BAD_SWEEP")
        self.layers = sorted(layers)
        self.per_position = self.kind.unit is None or spec.per_position
        self.axes = self._axes(info, self._positions(len(clean_ids)))
        self.shape = tuple(len(a.values) for a in self.axes)
        self.total = math.prod(self.shape)
        if self.total > MAX_PATCHES:
            raise InvalidArgument(f"{self.total} patches is more than {MAX_PATCHES}: choose layers or positions",
                                  reason="TOO_MANY_PATCHES")
        self.summary = SweepSummary()
        self._device = adapter.model.get_input_embeddings().weight.device
        dtype = adapter.model.get_input_embeddings().weight.dtype
        per = bytes_per_patch(info, self.seq, dtype)
        self.budget = memory_budget(self._device)
        fit = max(1, self.budget // per)
        cap = MAX_BATCH.get(self._device.type, MAX_BATCH["cuda"])
        self.batch_size = int(min(fit, spec.max_batch or cap))
        self._prepare(clean_ids[:self.seq], corrupted_ids[:self.seq])

    def _positions(self, n: int) -> list[int]:
        """The positions of a per-position grid (every one up to the target by default)."""
        spec, P = self.spec, self.target.position
        if spec.positions and not self.per_position:
            raise InvalidArgument(f"positions are for per-position sweeps; set per_position for {spec.kind}",
                                  reason="BAD_SWEEP")
        positions = [position(p, n, "sweep position") for p in spec.positions] or list(range(self.seq))
        late = [p for p in positions if p > P]
        if late:
            raise InvalidArgument(f"position {late[0]} comes after the target position {P}: patching it cannot change "
                                  "the target", reason="OUT_OF_RANGE")
        if len(set(positions)) != len(positions):
            raise InvalidArgument("positions are listed twice", reason="BAD_SWEEP")
        return positions

    def _axes(self, info, positions: list[int]) -> list[Axis]:
        n_units = {"head": info.n_heads, "kv_head": info.n_kv_heads, "neuron": info.d_mlp, None: 0}[self.kind.unit]
        axes = [Axis("layer", tuple(self.layers))]
        if self.kind.unit:
            axes.append(Axis(self.kind.unit, tuple(range(n_units))))
        if self.per_position:
            axes.append(Axis("position", tuple(positions)))
        return axes

    # --- the two runs ---------------------------------------------------------------------------

    def _prepare(self, clean_ids: list[int], corrupted_ids: list[int]) -> None:
        a, t = self.adapter, self.target
        last = f"blocks.{a.info.n_layers - 1}.resid_post"
        site_names = {self.site.format(L=layer) for layer in self.layers}
        base_ids, source_ids = ((corrupted_ids, clean_ids) if self.spec.direction == "denoising"
                                else (clean_ids, corrupted_ids))
        atp = self.spec.method == "attribution"
        with torch.no_grad():
            src_logits, src = a.run_with_cache(torch.tensor([source_ids]), site_names | {last})
            source_value = float(t.read(src_logits, src[last])[0])
        with recording_blocks(a) as calls:   # atp: the sites keep the graph, to take gradients at them
            base_logits, base = a.run_with_cache(torch.tensor([base_ids]), site_names | {last},
                                                 grad_sites=site_names if atp else ())
            base_metric = t.read(base_logits, base[last])[0]
        self.base_value = float(base_metric.detach())
        self.clean_value, self.corrupted_value = ((source_value, self.base_value) if self.spec.direction == "denoising"
                                                  else (self.base_value, source_value))
        if not math.isfinite(self.clean_value - self.corrupted_value) or self.clean_value == self.corrupted_value:
            self.notes.append("the clean and corrupted values are equal: normalized values are NaN")
        self.calls: BlockCalls = calls
        self.source = {layer: src[self.site.format(L=layer)] for layer in self.layers}   # [1, ...]
        self.approx_effects: torch.Tensor | None = None
        if atp:
            at = [base[self.site.format(L=layer)] for layer in self.layers]
            grads = torch.autograd.grad(base_metric, at, allow_unused=True)
            effects = []
            for layer, g in zip(self.layers, grads):
                name = self.site.format(L=layer)
                diff = self.source[layer] - base[name].detach()          # [1, ...]
                g = torch.zeros_like(diff) if g is None else g
                effects.append(self._reduce((diff.float() * g.float())[0]))
            self.approx_effects = torch.cat(effects).cpu()               # [total]

    def _reduce(self, prod: torch.Tensor) -> torch.Tensor:
        """diff * grad of one layer, without batch dim -> that layer's block of the grid (flattened)."""
        k = self.kind
        pos_dim, unit_dim = k.pos_dim - 1, (None if k.unit_dim is None else k.unit_dim - 1)
        if not k.mask_last:
            prod = prod.sum(-1)                              # drop d_model / d_head / key positions
        # now: resid [T]; heads z/q/k/v [T, U]; pattern [U, Tq]; neurons [T, N]
        if unit_dim is None:
            return prod[list(self.axes[-1].values)]          # [P]
        if pos_dim > unit_dim:
            prod = prod.transpose(0, 1)                      # pattern: [Tq, U]
        if self.per_position:
            return prod[list(self.axes[-1].values)].transpose(0, 1).reshape(-1)  # [U, P] -> flat
        return prod.sum(0)                                   # [U]

    # --- exact patching --------------------------------------------------------------------------

    def _items(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Flat grid indices -> (layers [n], units [n] or None, positions [n] or None)."""
        rest = flat.clone()
        coords = []
        for size in reversed(self.shape):
            coords.append(rest % size)
            rest = rest // size
        coords = coords[::-1]
        layers = torch.tensor(self.layers)[coords[0]]
        units = coords[1] if self.kind.unit else None
        positions = torch.tensor(self.axes[-1].values)[coords[-1]] if self.per_position else None
        return layers, units, positions

    def _exact(self, flat: torch.Tensor, should_stop: Callable[[], bool]) -> torch.Tensor:
        """Patched target values [n] for flat grid indices (sorted by layer), as one growing batch."""
        a, k = self.adapter, self.kind
        layers, units, positions = self._items(flat)
        present = sorted(set(layers.tolist()))
        handler = None if k.site == "resid_pre" else _MaskPatch(k, present, self.source)
        last = a.info.n_layers - 1
        patched_mlp = last in present and k.site.startswith("mlp.")      # its sites need every row
        hidden = None
        with torch.no_grad(), a.running(handler), \
                (contextlib.nullcontext() if patched_mlp else _mlp_at_row(a, last, self.target.position)):
            for layer in range(present[0], a.info.n_layers):
                if should_stop():
                    raise Cancelled("the sweep was cancelled")
                fresh = (layers == layer).nonzero().flatten()            # rows joining at this layer
                if len(fresh):
                    start = 0 if hidden is None else hidden.shape[0]
                    base = self.calls.resid_pre[layer]                   # [1, T, D]
                    rows = base.expand(len(fresh), *base.shape[1:])     # [n, T, D]
                    if k.site == "resid_pre":
                        mask = _build_mask(k, tuple(rows.shape), torch.arange(len(fresh)), None,
                                           _select(positions, fresh), rows.device)
                        rows = torch.where(mask, self.source[layer].to(rows.dtype), rows)
                    else:
                        rows = rows.clone()
                    hidden = rows if hidden is None else torch.cat([hidden, rows])
                    if handler is not None:
                        shape = (hidden.shape[0], *self.source[layer].shape[1:])
                        handler.masks[layer] = _build_mask(k, shape, start + torch.arange(len(fresh)),
                                                           _select(units, fresh), _select(positions, fresh),
                                                           hidden.device)
                hidden = self.calls.block(layer, hidden)
        return read_target(a, self.target, hidden[:, self.target.position]).cpu()   # [n]

    def _normalize(self, values: torch.Tensor) -> torch.Tensor:
        denom = self.clean_value - self.corrupted_value
        if denom == 0 or not math.isfinite(denom):
            return torch.full_like(values, float("nan"))
        return (values - self.corrupted_value) / denom

    def _exact_chunks(self, flat: torch.Tensor, stage: str, should_stop: Callable[[], bool]) -> Iterator[SweepChunk]:
        """Exact values for `flat` (any order), chunk by chunk; halves the chunk on out-of-memory."""
        flat = torch.sort(flat).values              # layer is the outermost grid axis: sorted = by layer
        t0, done, batch = time.perf_counter(), 0, self.batch_size
        while done < len(flat):
            part = flat[done:done + batch]
            try:
                values = self._exact(part, should_stop)
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch = max(1, batch // 2)
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()
                self.notes.append(f"out of memory: chunks halved to {batch} patches")
                continue
            done += len(part)
            self.summary.chunks += 1
            self.summary.exact_patches += len(part)
            elapsed = time.perf_counter() - t0
            eta = elapsed / done * (len(flat) - done)
            yield SweepChunk(part, values.float(), self._normalize(values.float()), False, done, len(flat), stage,
                             elapsed, eta)

    # --- driving ---------------------------------------------------------------------------------

    def chunks(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[SweepChunk]:
        t0 = time.perf_counter()
        self.summary.batch_size = self.batch_size
        if self.approx_effects is None:
            yield from self._exact_chunks(torch.arange(self.total), "exact", should_stop)
        else:
            est = self.base_value + self.approx_effects                  # [total]
            yield SweepChunk(torch.arange(self.total), est, self._normalize(est), True, self.total, self.total,
                             "attribution", time.perf_counter() - t0, 0.0)
            k = min(self.spec.verify_top_k or DEFAULT_VERIFY, self.total)
            top = torch.topk(self.approx_effects.abs(), k).indices
            exact = torch.full((self.total,), float("nan"))
            for chunk in self._exact_chunks(top, "verify", should_stop):
                exact[chunk.indices] = chunk.values
                yield chunk
            ex, ap = exact[top] - self.base_value, self.approx_effects[top]
            self.summary.verified = k
            self.summary.pearson, self.summary.spearman = pearson(ap, ex), spearman(ap, ex)
            self.summary.max_abs_error = float((ap - ex).abs().max()) if k else float("nan")
        self.summary.elapsed_s = time.perf_counter() - t0


@dataclass
class SweepResult:
    """A whole sweep collected in memory (what `patch_sweep` returns in-process)."""

    axes: list[Axis]
    values: torch.Tensor                   # grid shape, raw target with the patch (exact; NaN = not computed)
    normalized: torch.Tensor
    approx_values: torch.Tensor | None     # attribution estimates
    clean_value: float
    corrupted_value: float
    summary: SweepSummary
    notes: list[str] = field(default_factory=list)


def collect(sweep: PatchSweep, should_stop: Callable[[], bool] = lambda: False) -> SweepResult:
    values = torch.full((sweep.total,), float("nan"))
    approx = None
    for chunk in sweep.chunks(should_stop):
        if chunk.approximate:
            approx = chunk.values.clone()
        else:
            values[chunk.indices] = chunk.values
    grid = values.reshape(sweep.shape)
    return SweepResult(sweep.axes, grid, sweep._normalize(grid), None if approx is None else approx.reshape(sweep.shape),
                       sweep.clean_value, sweep.corrupted_value, sweep.summary, sweep.notes)


@register("patch_sweep", "activation-patching sweeps (resid, attn/mlp out, heads and their q/k/v/pattern, neurons; "
                         "noising or denoising), many patches per forward resumed at the patched layer, streamed")
def patch_sweep(adapter, clean_ids: list[int], corrupted_ids: list[int], target: Target, spec: SweepSpec,
                should_stop: Callable[[], bool] = lambda: False) -> SweepResult:
    return collect(PatchSweep(adapter, clean_ids, corrupted_ids, target, spec), should_stop)


@register("attribution_patching", "attribution patching (2 forwards + 1 backward) for the same sweeps, top-k verified "
                                  "by batched exact patching, with the correlation of estimates and exact effects")
def attribution_patching(adapter, clean_ids: list[int], corrupted_ids: list[int], target: Target, spec: SweepSpec,
                         should_stop: Callable[[], bool] = lambda: False) -> SweepResult:
    spec = SweepSpec(**{**spec.__dict__, "method": "attribution"})
    return collect(PatchSweep(adapter, clean_ids, corrupted_ids, target, spec), should_stop)
