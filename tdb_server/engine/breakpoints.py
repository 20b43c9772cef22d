"""Breakpoints: resolution of a site/unit/glob to sites, conditions, hit conditions, log points."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument

_HIT = re.compile(r"^\s*(==|>=|>|%)?\s*(\d+)\s*$")
_HEAD_UNIT = re.compile(r"^blocks\.(\d+)\.attn\.head\.(\d+)$")
_NEURON_UNIT = re.compile(r"^blocks\.(\d+)\.mlp\.neuron\.(\d+)$")
_LATENT_UNIT = re.compile(r"^blocks\.(\d+)\.(.+)\.sae\.latent\.(\d+)$")   # SAE latent (tdb_server/sae)


def parse_hit_condition(text: str) -> tuple[str, int] | None:
    """'3' / '==3' -> stop on the 3rd hit only; '>=3', '>3'; '%2' -> every 2nd hit."""
    if not text or not text.strip():
        return None
    m = _HIT.match(text)
    if not m or int(m.group(2)) < 1 and m.group(1) == "%":
        raise InvalidArgument(f"bad hit condition {text!r}: use N, ==N, >=N, >N or %N", reason="BAD_HIT_CONDITION")
    return (m.group(1) or "==", int(m.group(2)))


def hit_matches(cond: tuple[str, int] | None, hits: int) -> bool:
    if cond is None:
        return True
    op, n = cond
    return {"==": hits == n, ">=": hits >= n, ">": hits > n, "%": n > 0 and hits % n == 0}[op]


@dataclass
class Unit:
    kind: str   # "head", "neuron" or "latent"
    layer: int
    index: int
    site: str = ""   # latent: the site its SAE reads (blocks.L.<kind>)


def parse_unit(name: str) -> Unit | None:
    if m := _HEAD_UNIT.match(name):
        return Unit("head", int(m.group(1)), int(m.group(2)))
    if m := _NEURON_UNIT.match(name):
        return Unit("neuron", int(m.group(1)), int(m.group(2)))
    if m := _LATENT_UNIT.match(name):
        return Unit("latent", int(m.group(1)), int(m.group(3)), f"blocks.{m.group(1)}.{m.group(2)}")
    return None


def unit_site(unit: Unit) -> str:
    if unit.kind == "latent":
        return unit.site
    return f"blocks.{unit.layer}.attn.out" if unit.kind == "head" else f"blocks.{unit.layer}.mlp.post"


@dataclass
class BreakpointSpec:
    id: int
    name: str
    when: int                    # 0 = after, 1 = before (protocol BreakWhen)
    sites: list[str]
    unit: Unit | None = None
    condition: str = ""
    condition_ast: Any = None
    hit_condition: tuple[str, int] | None = None
    log_message: str = ""
    verified: bool = True
    message: str = ""
    hits: int = field(default=0)   # reset at every launch
    tokens: tuple[int, int] | None = None   # generation steps first..last (None = every step)

    def in_tokens(self, step: int) -> bool:
        return self.tokens is None or self.tokens[0] <= step <= self.tokens[1]
