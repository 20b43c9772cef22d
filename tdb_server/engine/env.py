"""What the expression language sees in a run: its sites and units, the model's weights, the value at
the stop. Breakpoint conditions and log messages (run.py), Evaluate, reads and expandable variables
(inspect.py, session.py) all evaluate through `make_env`.

Also the checks of a site or unit name against this model (`parse_site`, `parse_unit`, `check_unit`:
the grammar of model/sites.py with the SAEs attached now), which patches and breakpoints share.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import FailedPrecondition, NotFound
from ..model import sites
from ..model.sites import Unit
from ..sae.units import latent_sizes, latent_value
from . import expr, weights
from .types import ACTIVE, RunState


def parse_site(adapter: Any, name: str) -> str:
    """The canonical name of a site of this model (SiteError, with suggestions, if there is none)."""
    return sites.parse_site(name, adapter.info.n_layers).name


def parse_unit(adapter: Any, name: str) -> Unit | None:
    """The unit `name` names, if it is shaped like one (SiteError when this model has no such unit)."""
    if not sites.is_unit_name(name):
        return None
    return check_unit(adapter, sites.parse_unit(name, adapter.info.n_layers))


def check_unit(adapter: Any, unit: Unit) -> Unit:
    """A head, neuron or SAE latent that exists in this model (SiteError otherwise)."""
    return sites.check_unit(unit, adapter.info, latent_sizes(adapter))


def check_name(adapter: Any, name: str) -> None:
    """A dotted name an expression may read: a per-layer weight, an SAE latent or a site (SiteError if not)."""
    if weights.layer_weight(name) is not None:
        return
    unit = parse_unit(adapter, name)
    if unit is None or unit.kind != "latent":
        parse_site(adapter, name)


def make_env(adapter: Any, run: Any, value: torch.Tensor | None, site: str = "") -> expr.Env:
    """The environment of an expression evaluated in `run` (a DebugRun), `value` being `x`."""

    # two closures, neither referring to itself: a self-referencing closure is a reference cycle that would
    # keep the run (and every activation it captured) alive until the cyclic garbage collector comes by
    def read_site(name: str) -> torch.Tensor:
        canon = parse_site(adapter, name)
        if canon in run.captured:
            return run.captured[canon]
        if canon not in run.index:
            raise NotFound(f"{canon} is not computed in run {run.run_id}: attention patterns are computed only when "
                           "the launch's capture names them (capture=['blocks.*.attn.pattern'], or ['*'] for every "
                           "site) or a breakpoint asks", reason="NOT_CAPTURED")
        if run.state in ACTIVE and run.index[canon] > run.last_fired:
            raise FailedPrecondition(f"{canon} has not run yet in run {run.run_id}: step or continue until it does",
                                     reason="NOT_YET_RUN")
        raise NotFound(f"{canon} was not captured in run {run.run_id} (see the launch's capture list)",
                       reason="NOT_CAPTURED")

    def get_site(name: str) -> torch.Tensor:
        unit = parse_unit(adapter, name)
        if unit is not None and unit.kind == "latent":   # SAE latent: read through its site -> [B, T]
            return latent_value(adapter, unit.site, unit.index, read_site(unit.site))
        return read_site(name)

    return expr.Env(site=get_site, weight=lambda n: weights.weight(adapter, n), value=value,
                    logit_lens=lambda x: weights.logit_lens(adapter, x), unembed=lambda x: weights.unembed(adapter, x),
                    decode=adapter.token_texts, extra={"site": site}, budget_bytes=run.session.limits.max_expr_bytes)


def evaluate(adapter: Any, expression: str, run: Any, value: Any = None) -> Any:
    """Evaluate `expression` in `run`; at a stop, `x` is the stop's value unless `value` is given."""
    if value is None and run.state is RunState.PAUSED and run.stop is not None:
        value = run.stop.value
    return expr.evaluate(expression, make_env(adapter, run, value=value, site=run.stop.site if run.stop else ""))
