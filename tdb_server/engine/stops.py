"""When a run stops: the pure decisions behind breakpoints, hit counts, pauses and steps.

No threads, no tensors, no session: each function looks at a run's site order (the sites it computes,
in execution order), the breakpoints and the step in progress, so the rules can be tested on their
own. `DebugRun.on_site` (run.py) asks them at every site it hands control to.

Steps follow the execution order of sites: into = the next site; over = the first site outside the
block the step started in; out = the end of the enclosing module (attn -> attn.out, mlp -> mlp.out,
block -> resid_post, model -> logits), one level up from a module's last site. With generation a
token boundary is a step too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model.sites import enclosing
from .breakpoints import BreakpointSpec, hit_matches
from .types import When

BOUNDARY = -2          # step start index meaning "from a token boundary"

Step = tuple[str, int]  # (kind: "into" | "over" | "out" | "token", index in the order of the stop it started from)


BySite = dict[str, list[BreakpointSpec]]


def by_site(breakpoints: Sequence[BreakpointSpec], when: When) -> BySite:
    """The verified breakpoints that stop `when` at each site, in the order given (a run looks them up
    at every site it hands control to)."""
    index: BySite = {}
    for bp in breakpoints:
        if bp.verified and bp.when is when:
            for site in dict.fromkeys(bp.sites):
                index.setdefault(site, []).append(bp)
    return index


def armed(index: BySite, site: str, token: int) -> list[BreakpointSpec]:
    """The breakpoints of `index` that may stop at `site` in generation step `token`."""
    return [bp for bp in index.get(site, ()) if bp.in_tokens(token)]


def count_hit(bp: BreakpointSpec) -> bool:
    """Count a hit of `bp`; whether its hit condition ('3', '>=3', '%2') lets this hit through."""
    bp.hits += 1
    return hit_matches(bp.hit_condition, bp.hits)


def step_start(index: int, stop: Any) -> int:
    """Where a step starts from `stop` (at index `index` of the order; -1 when its site is not there)."""
    if stop.when is When.BEFORE:
        index -= 1          # from "before S", stepping into runs S
    if stop.site == "" and stop.reason != "entry":
        return BOUNDARY     # a token boundary
    return index


def scope_end(scope: str, order: Sequence[str]) -> str:
    """The last site of `order` inside `scope` ("" = the whole model)."""
    inside = [x for x in order if x.startswith(scope + ".")] if scope else order
    return inside[-1] if inside else order[-1]


def step_out_target(start_site: str, order: Sequence[str]) -> str:
    """Where a step out from `start_site` ends: its enclosing module's end, or one level up from it."""
    scopes = list(enclosing(start_site)) if start_site else []
    while True:
        scope = scopes[-1] if scopes else ""
        end = scope_end(scope, order)
        if end != start_site or not scopes:
            return end
        scopes.pop()


def step_done(step: Step, site: str, order: Sequence[str]) -> bool:
    """Whether the step in progress ends at `site`."""
    kind, start = step
    if kind == "token" or start == BOUNDARY:
        return kind == "into"   # from a token boundary, into = the first site of the next forward
    if kind == "into":
        return True
    start_site = order[start] if 0 <= start < len(order) else ""
    if kind == "over":
        # past the current block: the first site outside the block the step started in
        start_scopes = enclosing(start_site) if start_site else ()
        block = start_scopes[0] if start_scopes else None
        return block is None or not site.startswith(block + ".")
    return site == step_out_target(start_site, order)


def reaches_boundary(step: Step | None) -> bool:
    """Whether the step in progress ends at the next token boundary (token, over and out steps do)."""
    return step is not None and step[0] in ("token", "over", "out")
