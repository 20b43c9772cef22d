"""Breakpoints: what one is (its sites, unit, condition, hit condition, log message) and hit conditions.
Names are resolved by the grammar (model/sites.py); a unit's breakpoint stops at its `stop_site`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument
from ..model.sites import Unit

_HIT = re.compile(r"^\s*(==|>=|>|%)?\s*(\d+)\s*$")


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
