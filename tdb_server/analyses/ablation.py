"""Ablations and patches as analyses: replace the value of heads, neurons, attention or MLP layers or
whole blocks, and read the target before and after.

| node                    | site replaced        | part                    |
|-------------------------|----------------------|-------------------------|
| `blocks.L.attn.head.H`  | `blocks.L.attn.z`    | [:, pos, H, :]          |
| `blocks.L.mlp.neuron.N` | `blocks.L.mlp.post`  | [:, pos, N]             |
| `blocks.L.attn`         | `blocks.L.attn.out`  | [:, pos, :]             |
| `blocks.L.mlp`          | `blocks.L.mlp.out`   | [:, pos, :]             |
| `blocks.L`              | both of the above    |                         |
| `blocks.L.<site>.sae.latent.K` | `blocks.L.<site>` | latent K of the attached SAE: the site + (a_K' - a_K) W_dec[K] (error kept) |

Methods: `zero`; `mean` (over the prompt's positions, or over every token of a reference dataset);
`resample` (the value the same node had at the same position on a source prompt of the same token
length). Node names may be fnmatch patterns (`blocks.*.attn.head.*`). Applied together (one forward)
or each separately (batched forwards: one batch element per ablation).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch

from tdb_server.errors import InvalidArgument
from tdb_server.model.sites import SiteError, parse_unit

from .inputs import Target, position
from .registry import register

METHODS = ("zero", "mean", "resample")
MAX_NODES = 100_000
BATCH = 16  # ablations per batched forward
_LAYER_RE = re.compile(r"^blocks\.(\d+)(?:\.(attn|mlp))?$")


@dataclass(frozen=True)
class AblationSpec:
    node: str
    method: str = "zero"
    positions: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Part:
    site: str
    index: int | None          # head / neuron index along the unit axis; None = the whole site
    latent: bool = False       # index is an SAE latent of the SAE attached at `site`


@dataclass(frozen=True)
class _Ablation:
    node: str
    method: str
    positions: tuple[int, ...]  # non-negative, sorted
    parts: tuple[_Part, ...]


@dataclass
class AblationOutcome:
    node: str
    before: float
    after: float

    @property
    def effect(self) -> float:
        return self.after - self.before


def _parts(adapter, node: str) -> tuple[_Part, ...]:
    info = adapter.info
    if m := _LAYER_RE.match(node):
        layer = int(m.group(1))
        if layer >= info.n_layers:
            raise InvalidArgument(f"ablation node {node!r}: layer {layer} out of range (0..{info.n_layers - 1})",
                                  reason="BAD_NODE")
        kinds = [m.group(2)] if m.group(2) else ["attn", "mlp"]
        return tuple(_Part(f"blocks.{layer}.{k}.out", None) for k in kinds)
    try:
        unit = parse_unit(node, info.n_layers, info.n_heads, info.d_mlp)
    except SiteError as e:
        raise InvalidArgument(f"ablation node: {e.message}; or a layer: blocks.L, blocks.L.attn, blocks.L.mlp",
                              reason="BAD_NODE", suggestions=e.suggestions) from None
    if unit.kind == "latent":
        from tdb_server.sae.units import check_latent
        try:
            check_latent(adapter, unit.site, unit.index)
        except SiteError as e:
            raise InvalidArgument(f"ablation node {node!r}: {e.message}", reason="BAD_NODE") from None
        return (_Part(unit.site, unit.index, latent=True),)
    return (_Part(unit.site, unit.index),)


def _candidates(adapter, pattern: str) -> list[str]:
    info = adapter.info
    names = []
    for layer in range(info.n_layers):
        names += [f"blocks.{layer}", f"blocks.{layer}.attn", f"blocks.{layer}.mlp"]
        names += [f"blocks.{layer}.attn.head.{h}" for h in range(info.n_heads)]
        if "neuron" in pattern:
            names += [f"blocks.{layer}.mlp.neuron.{n}" for n in range(info.d_mlp)]
    if "latent" in pattern:
        from tdb_server.sae.attach import attached
        for site, entry in attached(adapter).items():
            names += [f"{site}.sae.latent.{k}" for k in range(entry.sae.d_sae)]
    return names


def expand(adapter, specs: list[AblationSpec], n_tokens: int) -> list[_Ablation]:
    """Validate specs and expand patterns into single-node ablations."""
    if not specs:
        raise InvalidArgument("no ablations given", reason="BAD_ABLATION")
    out = []
    for spec in specs:
        method = spec.method or "zero"
        if method not in METHODS:
            raise InvalidArgument(f"unknown ablation method {method!r}; one of {', '.join(METHODS)}",
                                  reason="BAD_ABLATION")
        positions = tuple(sorted({position(p, n_tokens, "ablation position") for p in spec.positions}))
        if any(c in spec.node for c in "*?["):
            nodes = [n for n in _candidates(adapter, spec.node) if fnmatch.fnmatchcase(n, spec.node)]
            if not nodes:
                raise InvalidArgument(f"ablation pattern {spec.node!r} matches no head, neuron or layer",
                                      reason="BAD_NODE")
        else:
            nodes = [spec.node]
        out += [_Ablation(n, method, positions, _parts(adapter, n)) for n in nodes]
        if len(out) > MAX_NODES:
            raise InvalidArgument(f"more than {MAX_NODES} ablations", reason="BAD_ABLATION")
    return out


class _Capture:
    def __init__(self, sites: set[str]):
        self.sites = frozenset(sites)
        self.values: dict[str, torch.Tensor] = {}

    def on_site(self, site, value):
        self.values[site] = value.detach()
        return None


def apply_plan(entries: list, value: torch.Tensor) -> torch.Tensor:
    """A copy of a site's `value` with `entries` = [(b, index, positions, replacement [T, ...])] applied
    (index None: the whole site; "delta": add the replacement, an SAE latent's change; else one unit)."""
    new = value.clone()
    for b, index, pos, repl in entries:
        repl = repl.to(new.dtype)
        if index == "delta":
            new[b, pos] += repl[pos]
        elif index is None:
            new[b, pos] = repl[pos]
        else:
            new[b, pos, index] = repl[pos, index]
    return new


class _Patcher:
    """Applies per-batch-element replacements: plan[site] = [(b, index, positions, replacement [T, ...])]."""

    def __init__(self, plan: dict[str, list], extra: set[str]):
        self.plan = plan
        self.sites = frozenset(plan) | frozenset(extra)
        self.values: dict[str, torch.Tensor] = {}

    def on_site(self, site, value):
        if site not in self.plan:
            self.values[site] = value.detach()
            return None
        return apply_plan(self.plan[site], value)


def _latent_delta(adapter, part: _Part, method: str, x: torch.Tensor, reference: torch.Tensor | None,
                  source: torch.Tensor | None) -> torch.Tensor:
    """x [T, ...] (the clean site) -> the change [T, ...] that sets SAE latent `part.index` to its
    ablated value: zero, its mean (over the prompt, or the reference tokens) or the source's value."""
    from tdb_server.sae.attach import sae_at

    sae, k = sae_at(adapter, part.site), part.index
    a_k = sae.encode(x[None])[0, :, k]                                   # [T]
    if method == "zero":
        new = torch.zeros_like(a_k)
    elif method == "mean":
        pool = a_k if reference is None else sae.encode(reference[None])[0, :, k]
        new = pool.mean().expand_as(a_k)
    else:
        new = sae.encode(source[None])[0, :, k]
    return sae.latent_delta(x[None], k, (new - a_k)[None])[0]


def _replacements(adapter, ablations: list[_Ablation], clean: dict[str, torch.Tensor],
                  reference: list[list[int]] | None, source: list[int] | None) -> dict[tuple, torch.Tensor]:
    """What each (method, site[, latent]) is replaced with, [T, ...], from the clean values of the sites."""
    methods = {a.method for a in ablations}
    sites = {p.site for a in ablations for p in a.parts}
    repl: dict[tuple, torch.Tensor] = {}
    ref_vals: dict[str, torch.Tensor] = {}
    for site in sites:
        x = clean[site][0]                                                # [T, ...]
        if "zero" in methods:
            repl["zero", site] = torch.zeros_like(x)
        if "mean" in methods:
            if reference:
                vals = []
                for ref in reference:
                    cap = _Capture({site})
                    _forward(adapter, ref, cap)
                    vals.append(cap.values[site][0])
                ref_vals[site] = torch.cat(vals)
                mean = ref_vals[site].float().mean(0)
            else:
                mean = x.float().mean(0)
            repl["mean", site] = mean.to(x.dtype).expand_as(x)
    if source is not None:
        cap = _Capture(sites)
        _forward(adapter, source, cap)
        for site in sites:
            repl["resample", site] = cap.values[site][0]
    for a in ablations:   # SAE latents: the change of the site when latent K takes the ablated value
        for p in a.parts:
            if p.latent and (a.method, p.site, p.index) not in repl:
                repl[a.method, p.site, p.index] = _latent_delta(adapter, p, a.method, clean[p.site][0],
                                                                ref_vals.get(p.site), repl.get(("resample", p.site)))
    return repl


def _plan(batch: list[list[_Ablation]], repl: dict[tuple, torch.Tensor], T: int) -> dict[str, list]:
    """Batch element b applies the ablations of batch[b]: plan[site] = [(b, index, positions, replacement)]."""
    plan: dict[str, list] = {}
    for b, group in enumerate(batch):
        for a in group:
            pos = torch.tensor(list(a.positions) or list(range(T)))
            for p in a.parts:
                if p.latent:
                    plan.setdefault(p.site, []).append((b, "delta", pos, repl[a.method, p.site, p.index]))
                else:
                    plan.setdefault(p.site, []).append((b, p.index, pos, repl[a.method, p.site]))
    return plan


def unit_ablation_plan(adapter, token_ids: list[int], specs: list[AblationSpec]) -> dict[str, list]:
    """The patch plan (for `apply_plan`, batch element 0) that ablates heads, neurons or SAE latents in
    another analysis's forward, e.g. the node table's: zero, or mean over this prompt's positions. Whole
    layers are refused there: their rows (heads, neurons) would no longer add up to what the layer wrote."""
    ablations = expand(adapter, specs, len(token_ids))
    whole = [a.node for a in ablations if any(p.index is None for p in a.parts)]
    if whole:
        raise InvalidArgument(f"{whole[0]} is a whole layer: here ablate its units instead (blocks.L.attn.head.*, "
                              "blocks.L.mlp.neuron.*), so that the rows still add up to what the forward computed",
                              reason="BAD_ABLATION")
    if any(a.method == "resample" for a in ablations):
        raise InvalidArgument("resample ablations need a source prompt: use the Ablate analysis for those",
                              reason="BAD_ABLATION")
    sites = {p.site for a in ablations for p in a.parts}
    with torch.no_grad():
        clean = _Capture(sites)
        _forward(adapter, token_ids, clean)
        return _plan([ablations], _replacements(adapter, ablations, clean.values, None, None), len(token_ids))


def _forward(adapter, ids: list[int], handler) -> torch.Tensor:
    return adapter.forward(torch.tensor([ids]), handler)


@register("ablation", "zero / mean / resample ablation of heads, neurons, attention or MLP layers and whole blocks, "
                      "together or each separately (batched); the target before and after")
def ablate(adapter, token_ids: list[int], target: Target, specs: list[AblationSpec], *, separately: bool = False,
           reference: list[list[int]] | None = None, source: list[int] | None = None) -> tuple[float, list[AblationOutcome]]:
    """Returns (target before, outcomes): one outcome per expanded node when `separately`, else one ("all")."""
    T = len(token_ids)
    ablations = expand(adapter, specs, T)
    methods = {a.method for a in ablations}
    if "resample" in methods and source is None:
        raise InvalidArgument("resample ablation needs a source prompt", reason="BAD_ABLATION")
    if source is not None and len(source) != T:
        raise InvalidArgument(f"the resample source has {len(source)} tokens, the prompt {T}: resampling takes the "
                              "value at the same positions, so they must have the same length", reason="LENGTH_MISMATCH")
    if reference and "mean" not in methods:
        raise InvalidArgument("a reference dataset is used only by mean ablations", reason="BAD_ABLATION")
    last = f"blocks.{adapter.info.n_layers - 1}.resid_post"
    sites = {p.site for a in ablations for p in a.parts}
    with torch.no_grad():
        clean = _Capture(sites | {last})
        logits = _forward(adapter, token_ids, clean)
        before = float(target.read(logits, clean.values[last])[0])
        repl = _replacements(adapter, ablations, clean.values, reference, source)
        groups = [[a] for a in ablations] if separately else [ablations]
        afters: list[float] = []
        chunk = 1 if not separately else BATCH
        for start in range(0, len(groups), chunk):
            batch = groups[start:start + chunk]
            patcher = _Patcher(_plan(batch, repl, T), {last})
            out = adapter.forward(torch.tensor([token_ids] * len(batch)), patcher)
            afters += [float(v) for v in target.read(out, patcher.values.get(last))]
    if separately:
        return before, [AblationOutcome(a.node, before, after) for a, after in zip(ablations, afters)]
    return before, [AblationOutcome("all", before, afters[0])]
