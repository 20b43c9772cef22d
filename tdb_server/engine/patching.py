"""Patch planning: what a Patch call asks for, turned into checked `Intervention`s of this model
(model/interventions.py), a copy_from_run source bound to a finished run, and where a patch on the live
run lands.

A patch may name a site, a unit (head, neuron, SAE latent), a layer node (`blocks.L`, `blocks.L.attn`,
`blocks.L.mlp`: their writes into the residual stream) or a pattern over those or over sites
(`blocks.*.attn.head.*`, `blocks.*.mlp.out`) — the names an ablation takes, read by the same grammar
(model/sites.py). A head's edit lands on its slice of attn.z; on a run stopped after attn.z (at
attn.out, say) it lands on attn.out instead, as (z'_H - z_H) @ W_O[H]: the same edit, reached late.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import FailedPrecondition, InvalidArgument
from ..model import sites
from ..model.interventions import HEAD_AXIS, NEURON_AXIS, OPS, Intervention, Selector
from ..model.sites import SiteError, Unit
from ..sae.units import check_latent, latent_sizes
from .run import DebugRun, StopState
from .types import When


def targets(adapter: Any, name: str) -> list[Unit | str]:
    """The units and whole sites `name` stands for (SiteError, with suggestions, when none)."""
    info = adapter.info
    if sites.is_glob(name):
        try:
            nodes = sites.expand_nodes(name, info, latent_sizes(adapter))
        except SiteError:
            return list(sites.expand_glob(name, list(adapter.verified_order)))
        return [t for node in nodes for t in targets(adapter, node)]
    if sites.is_unit_name(name):
        return [sites.check_unit(sites.parse_unit(name, info.n_layers), info, latent_sizes(adapter))]
    layer = sites.parse_layer_node(name, info.n_layers)
    if layer is not None:
        return list(layer.sites)
    try:
        return [sites.parse_site(name, info.n_layers).name]
    except SiteError:   # say what it may have meant among everything a patch can name, not sites only
        raise sites.unknown_name(name, info, latent_sizes(adapter)) from None


def _check_request(op: str, selector: Selector, value: torch.Tensor | None, mean_over: str,
                   tokens: tuple[int, ...]) -> None:
    if op not in OPS:
        raise InvalidArgument(f"unknown patch op {op!r}; ops: {OPS}", reason="BAD_PATCH_OP")
    if mean_over not in ("", "positions", "batch"):
        raise InvalidArgument(f"mean_over must be 'positions' or 'batch', not {mean_over!r}", reason="BAD_PATCH")
    if op == "set" and value is None:
        raise InvalidArgument("op 'set' needs a value", reason="BAD_PATCH")
    if any(t < 0 for t in tokens):
        raise InvalidArgument("generation steps in `tokens` must be >= 0", reason="BAD_PATCH")


def _check_selector(target: Unit | str, selector: Selector) -> None:
    """Heads and neurons select along a whole site's axes; a unit's part has batch and positions only."""
    for what, axes in (("heads", HEAD_AXIS), ("neurons", NEURON_AXIS)):
        if not getattr(selector, what):
            continue
        if isinstance(target, Unit):
            raise InvalidArgument(f"{target.name} is one {target.kind}: its selector takes batch and positions, "
                                  f"not {what}", reason="BAD_SELECTOR")
        kind = sites.site_kind(target)
        if kind not in axes:
            hint = "; use a head unit (blocks.L.attn.head.H)" if what == "heads" else ""
            raise InvalidArgument(f"{kind} has no {what[:-1]} dimension{hint}", reason="BAD_SELECTOR")


def _value_template(target: Unit | str, info: Any) -> list[int | None]:
    """The shape a patch value must broadcast to, None where it depends on the run (batch, positions)."""
    if isinstance(target, Unit):
        return [None, None, info.d_head] if target.kind == "head" else [None, None]
    sizes = {"head": info.n_heads, "kv_head": info.n_kv_heads, "d_head": info.d_head, "neuron": info.d_mlp,
             "d_model": info.d_model, "vocab": info.vocab_size}
    return [sizes.get(d) for d in sites.site_dims(sites.site_kind(target))]


def _check_value(target: Unit | str, value: torch.Tensor, info: Any) -> None:
    """INVALID_ARGUMENT now, not when a run reaches the site, for a value that cannot broadcast to the target."""
    want = _value_template(target, info)
    fits = value.dim() <= len(want) and all(
        got == 1 or size is None or got == size for got, size in zip(reversed(value.shape), reversed(want)))
    if not fits:
        name = target.name if isinstance(target, Unit) else target
        shown = ["*" if size is None else size for size in want]
        raise InvalidArgument(f"a patch value of shape {list(value.shape)} does not broadcast to {name}, shape "
                              f"{shown} (* = depends on the run)", reason="BAD_PATCH_VALUE")


MAX_TARGETS = 4096   # units and sites one Patch may name (each is its own edit of the forward)


def interventions(adapter: Any, name: str, op: str, selector: Selector, value: torch.Tensor | None, scalar: float,
                  mean_over: str, tokens: tuple[int, ...] = ()) -> list[Intervention]:
    """The checked interventions of a Patch call on this model (not yet registered)."""
    _check_request(op, selector, value, mean_over, tokens)
    named = targets(adapter, name)
    if len(named) > MAX_TARGETS:
        raise InvalidArgument(f"{name!r} names {len(named)} units or sites; a patch takes at most {MAX_TARGETS}: patch "
                              "their whole site with a heads or neurons selector instead", reason="TOO_MANY_TARGETS")
    out = []
    for target in named:
        unit = target if isinstance(target, Unit) else None
        site = unit.site if unit is not None else target
        if site not in adapter.verified_sites:
            raise FailedPrecondition(f"{site} is never reached by this model's forward pass", reason="UNVERIFIED_SITE")
        _check_selector(target, selector)
        if value is not None:
            _check_value(target, value, adapter.info)
        sae = check_latent(adapter, unit.site, unit.index) if unit is not None and unit.kind == "latent" else None
        out.append(Intervention(unit.name if unit else site, site, op, dataclasses.replace(selector), unit=unit,
                                value=value, scalar=scalar, mean_over=mean_over or "positions", sae=sae))
    return out


def bind_source(iv: Intervention, src: DebugRun) -> None:
    """copy_from_run: take the value of `iv`'s source site from the finished run `src` (checked now)."""
    site, unit = iv.source_site, iv.unit

    def get() -> torch.Tensor:
        value = src.z.get(unit.layer) if unit is not None and unit.kind == "head" else None
        value = src.captured.get(site) if value is None else value
        if value is None:
            raise FailedPrecondition(f"run {src.run_id} did not capture {site}", reason="NO_SOURCE_VALUE")
        return value

    iv.source = get
    get()   # fails now, with a clear message, if the source lacks the value


def _ran(run: DebugRun, stop: StopState, site: str) -> bool:
    """Whether `site` already ran in the stopped run, so that editing it now is no longer possible."""
    here, there = run.index.get(stop.site, -1), run.index[site]
    return there < here or (there == here and stop.when is When.AFTER and stop.value is None)


def land(adapter: Any, run: DebugRun, stop: StopState, iv: Intervention) -> bool:
    """Place `iv` in the stopped run: FAILED_PRECONDITION if its site already ran; a head whose attn.z ran
    lands on attn.out. Returns whether it applies now (the run is stopped after its site)."""
    unit = iv.unit
    if unit is not None and unit.kind == "head" and iv.site in run.index and _ran(run, stop, iv.site):
        iv.site, iv.w_o = unit.stop_site, adapter.W_O(unit.layer)[unit.index]    # [Dh, D]
    if iv.site not in run.index:
        raise FailedPrecondition(f"{iv.site} is not computed in run {run.run_id}", reason="NOT_IN_RUN")
    if _ran(run, stop, iv.site):
        raise FailedPrecondition(
            f"{iv.site} already ran in run {run.run_id} (the run is stopped at {stop.site}): a patch must be "
            "registered before its site runs — set a BEFORE breakpoint on it, or patch before launching",
            reason="SITE_ALREADY_RAN")
    return stop.when is When.AFTER and run.index[iv.site] == run.index.get(stop.site, -1)


