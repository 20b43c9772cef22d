"""Ablations and patches as analyses: replace the value of heads, neurons, attention or MLP layers or
whole blocks, and read the target before and after.

Every ablation is an `Intervention` of `tdb_server/model/interventions.py` (the same one a session
patch is); a node names a unit, or a whole layer whose writes are replaced:

| node                    | what is replaced                                   |
|-------------------------|----------------------------------------------------|
| `blocks.L.attn.head.H`  | the head's slice of `blocks.L.attn.z`              |
| `blocks.L.mlp.neuron.N` | `blocks.L.mlp.post[..., N]`                        |
| `blocks.L.attn`         | `blocks.L.attn.out`                                |
| `blocks.L.mlp`          | `blocks.L.mlp.out`                                 |
| `blocks.L`              | both of the above                                  |
| `blocks.L.<site>.sae.latent.K` | latent K of the SAE attached at the site (error kept) |

Methods: `zero` (op zero); `mean` (op set to the node's mean activation over the prompt's positions
in the unablated forward, or over every token of a reference dataset: a fixed value, whatever else is
ablated with it); `resample` (op copy_from_run: the value the same node had at the same position on a
source prompt of the same token length). A session patch's op `mean` is another thing: the mean of
the value as it is at that point of that run. Node names may be fnmatch patterns (`blocks.*.attn.head.*`). Applied together (one forward)
or each separately (batched forwards: one batch element per ablation).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch

from tdb_server.errors import InvalidArgument
from tdb_server.model.interventions import Edits, Intervention, Selector
from tdb_server.model.sites import SiteError, Unit, is_glob, node_names, parse_layer_node, parse_unit
from tdb_server.sae.attach import attached, sae_at
from tdb_server.sae.units import check_latent

from .inputs import Target, position
from .registry import register

METHODS = ("zero", "mean", "resample")
MAX_NODES = 100_000
BATCH = 16  # ablations per batched forward
_OP = {"zero": "zero", "mean": "set", "resample": "copy_from_run"}


@dataclass(frozen=True)
class AblationSpec:
    node: str
    method: str = "zero"
    positions: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Ablation:
    node: str
    method: str
    positions: tuple[int, ...]         # non-negative, sorted (empty: every position)
    targets: tuple[Unit | str, ...]    # units, or whole sites (a layer's writes)


@dataclass
class AblationOutcome:
    node: str
    before: float
    after: float

    @property
    def effect(self) -> float:
        return self.after - self.before


def _bad_node(node: str, e: SiteError, hint: str = "") -> InvalidArgument:
    return InvalidArgument(f"ablation node {node!r}: {e.message}{hint}", reason="BAD_NODE", suggestions=e.suggestions)


def _targets(adapter, node: str) -> tuple[Unit | str, ...]:
    """What ablating `node` replaces: its unit, or the whole sites a layer node writes."""
    info = adapter.info
    try:
        layer = parse_layer_node(node, info.n_layers)
        if layer is not None:
            return layer.sites
        unit = parse_unit(node, info.n_layers, info.n_heads, info.d_mlp)
        if unit.kind == "latent":
            check_latent(adapter, unit.site, unit.index)
    except SiteError as e:
        raise _bad_node(node, e, "; or a layer: blocks.L, blocks.L.attn, blocks.L.mlp") from None
    return (unit,)


def _candidates(adapter, pattern: str) -> list[str]:
    latents = {site: entry.sae.d_sae for site, entry in attached(adapter).items()} if "latent" in pattern else {}
    return node_names(adapter.info, latents, neurons="neuron" in pattern)


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
        if is_glob(spec.node):
            nodes = [n for n in _candidates(adapter, spec.node) if fnmatch.fnmatchcase(n, spec.node)]
            if not nodes:
                raise InvalidArgument(f"ablation pattern {spec.node!r} matches no head, neuron or layer",
                                      reason="BAD_NODE")
        else:
            nodes = [spec.node]
        out += [_Ablation(n, method, positions, _targets(adapter, n)) for n in nodes]
        if len(out) > MAX_NODES:
            raise InvalidArgument(f"more than {MAX_NODES} ablations", reason="BAD_ABLATION")
    return out


def _target_sites(ablations: list[_Ablation]) -> set[str]:
    return {t.site if isinstance(t, Unit) else t for a in ablations for t in a.targets}


def interventions(adapter, ablation: _Ablation, batch_item: int | None = None,
                  source: Callable[[], torch.Tensor] | None = None,
                  reference: dict[str, torch.Tensor] | None = None) -> list[Intervention]:
    """The interventions of one ablation (in batch item `batch_item`, or every item). `source` gives a
    resample prompt's values (site -> [B, T, ...]); `reference` a mean ablation's values (site -> [1, N
    tokens, ...]: the prompt's unablated forward, or a reference dataset): the node is set to its mean
    over those tokens."""
    out = []
    for t in ablation.targets:
        unit = t if isinstance(t, Unit) else None
        site = unit.site if unit else t
        iv = Intervention(ablation.node, site, _OP[ablation.method],
                          Selector(batch=[] if batch_item is None else [batch_item],
                                   positions=list(ablation.positions)),
                          unit=unit, sae=sae_at(adapter, site) if unit and unit.kind == "latent" else None)
        if iv.op == "copy_from_run":
            iv.source = (lambda s=site: source(s)) if source is not None else None
        elif ablation.method == "mean":
            iv.value = iv.part_of(reference[site]).float().mean(dim=(0, 1))                # [1, N, ...] -> [...]
        out.append(iv)
    return out


def unit_ablations(adapter, token_ids: list[int], specs: list[AblationSpec]) -> list[Intervention]:
    """The interventions that ablate heads, neurons or SAE latents in another analysis's forward, e.g.
    the node table's: zero, or mean over this prompt's positions (unablated). Whole layers are refused there: their
    rows (heads, neurons) would no longer add up to what the layer wrote."""
    ablations = expand(adapter, specs, len(token_ids))
    whole = [a.node for a in ablations if any(not isinstance(t, Unit) for t in a.targets)]
    if whole:
        raise InvalidArgument(f"{whole[0]} is a whole layer: here ablate its units instead (blocks.L.attn.head.*, "
                              "blocks.L.mlp.neuron.*), so that the rows still add up to what the forward computed",
                              reason="BAD_ABLATION")
    if any(a.method == "resample" for a in ablations):
        raise InvalidArgument("resample ablations need a source prompt: use the Ablate analysis for those",
                              reason="BAD_ABLATION")
    clean = None
    if any(a.method == "mean" for a in ablations):
        with torch.no_grad():
            clean = adapter.run_with_cache(torch.tensor([token_ids]), _target_sites(ablations))[1].values
    return [iv for a in ablations for iv in interventions(adapter, a, reference=clean)]


def _reference_values(adapter, reference: list[list[int]], sites: set[str]) -> dict[str, torch.Tensor]:
    """Each site's values over every token of the reference prompts, [1, N, ...]."""
    values: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    for ids in reference:
        _, cache = adapter.run_with_cache(torch.tensor([ids]), sites)
        for site in sites:
            values[site].append(cache[site])
    return {site: torch.cat(v, dim=1) for site, v in values.items()}


@register("ablation", "zero / mean / resample ablation of heads, neurons, attention or MLP layers and whole blocks, "
                      "together or each separately (batched); the target before and after")
def ablate(adapter, token_ids: list[int], target: Target, specs: list[AblationSpec], *, separately: bool = False,
           reference: list[list[int]] | None = None, source: list[int] | None = None) -> tuple[float, list[AblationOutcome]]:
    """Returns (target before, outcomes): one outcome per expanded node when `separately`, else one ("all")."""
    T = len(token_ids)
    ablations = expand(adapter, specs, T)
    _check_sources(ablations, T, reference, source)
    last = f"blocks.{adapter.info.n_layers - 1}.resid_post"
    sites = _target_sites(ablations)
    with torch.no_grad():
        logits, clean = adapter.run_with_cache(torch.tensor([token_ids]), sites | {last})
        before = float(target.read(logits, clean[last])[0])
        ref = _reference_values(adapter, reference, sites) if reference else clean.values
        src = adapter.run_with_cache(torch.tensor([source]), sites)[1] if source is not None else None
        groups = [[a] for a in ablations] if separately else [ablations]
        chunk = 1 if not separately else BATCH
        afters: list[float] = []
        for start in range(0, len(groups), chunk):
            batch = groups[start:start + chunk]
            resample = (lambda site, n=len(batch): src[site].expand(n, *src[site].shape[1:])) if src else None
            ivs = [iv for b, group in enumerate(batch) for a in group
                   for iv in interventions(adapter, a, b if len(batch) > 1 else None, resample, ref)]
            edits = Edits(ivs)
            out, cache = adapter.run_with_cache(torch.tensor([token_ids] * len(batch)), {last}, edit=edits,
                                                edit_sites=edits.sites)
            afters += [float(v) for v in target.read(out, cache[last])]
    if separately:
        return before, [AblationOutcome(a.node, before, after) for a, after in zip(ablations, afters)]
    return before, [AblationOutcome("all", before, afters[0])]


def _check_sources(ablations: list[_Ablation], T: int, reference: list[list[int]] | None,
                   source: list[int] | None) -> None:
    methods = {a.method for a in ablations}
    if "resample" in methods and source is None:
        raise InvalidArgument("resample ablation needs a source prompt", reason="BAD_ABLATION")
    if source is not None and len(source) != T:
        raise InvalidArgument(f"the resample source has {len(source)} tokens, the prompt {T}: resampling takes the "
                              "value at the same positions, so they must have the same length", reason="LENGTH_MISMATCH")
    if reference and "mean" not in methods:
        raise InvalidArgument("a reference dataset is used only by mean ablations", reason="BAD_ABLATION")
