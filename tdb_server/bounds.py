"""Bounds of requests: every size, count, index and position a request carries is checked against its
range before any work (INVALID_ARGUMENT, OUT_OF_RANGE, naming the field and its bound), so that a number
is never an allocation or a loop of its own size; and a long analysis stops at the server's time limit
(`stopper`). A leaf: no grpc, no torch."""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, Iterable

from .errors import DeadlineExceeded, InvalidArgument

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


def stopper(context: Any, limit_s: float, what: str) -> Callable[[], bool]:
    """The `should_stop` of a long analysis (checked between its batches): True once the client has left;
    DEADLINE_EXCEEDED (ANALYSIS_TOO_LONG) once it has run `limit_s` seconds (tdb serve --max-analysis-s)."""
    left = threading.Event()
    context.add_callback(left.set)
    deadline = time.monotonic() + limit_s

    def should_stop() -> bool:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{what} ran past {limit_s:g} s, the longest this server lets one analysis run "
                                   "(tdb serve --max-analysis-s): ask for less (fewer layers, positions or windows)",
                                   reason="ANALYSIS_TOO_LONG")
        return left.is_set() or not context.is_active()
    return should_stop


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
