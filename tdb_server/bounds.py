"""Bounds of numeric request fields: every size, count, index and position a request carries is checked
against its range before any work (INVALID_ARGUMENT, OUT_OF_RANGE, naming the field and its bound), so
that a number is never an allocation or a loop of its own size. A leaf: no grpc, no torch."""

from __future__ import annotations

import math
from typing import Iterable

from .errors import InvalidArgument

MAX_EVAL_ELEMENTS = 1 << 20     # Evaluate returns the value itself up to this many elements
MAX_POLL_EVENTS = 1 << 20       # PollEvents.max_events (the event ring holds fewer anyway)
MAX_SWEEP_BATCH = 4096          # PatchSweep.max_batch: patches per forward
MAX_EDGES = 1 << 20             # Circuit.max_edges
MAX_TEMPERATURE = 1e4


def in_range(field: str, value: float, lo: float, hi: float, note: str = "") -> None:
    """INVALID_ARGUMENT unless lo <= value <= hi (NaN is never in range)."""
    if not (lo <= value <= hi):
        raise InvalidArgument(f"{field} = {value} is out of range: it must be in {_num(lo)}..{_num(hi)}"
                              + (f" ({note})" if note else ""), reason="OUT_OF_RANGE")


def all_in_range(field: str, values: Iterable[float], lo: float, hi: float, note: str = "") -> None:
    for v in values:
        in_range(field, v, lo, hi, note)


def finite(field: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"{field} = {value} must be a finite number", reason="OUT_OF_RANGE")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
