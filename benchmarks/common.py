"""What every benchmark entry point shares: interleaved timing, the table, the JSON.

A row is a dict: id (P1..P7), what, value (or None), unit, and optionally ratio, target, note.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = {"now": time.perf_counter}


def use_clock(name: str) -> None:
    """Time with the wall clock (default) or this process's CPU time ("cpu": every thread of the process,
    server and workers included; what the work costs, not how long it waited for a core on a shared
    machine — meaningless for a GPU, whose work the CPU only waits for)."""
    _clock["now"] = CLOCKS[name]


def now() -> float:
    """Seconds on the clock chosen by use_clock."""
    return _clock["now"]()


def interleaved(fns: dict[str, Callable[[], object]], repeat: int,
                sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds of each function, alternating them so drift in machine load hits all alike.
    `sync` (e.g. torch.cuda.synchronize) runs after each call, inside its timing."""
    sync = sync or (lambda: None)
    now = _clock["now"]
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()                                      # warm-up
        sync()
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = now()
            fn()
            sync()
            times[name].append(now() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    return (f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}") + (f" {unit}" if unit else "")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def table_lines(rows: list[dict]) -> list[str]:
    """The markdown table: id, measurement, value, ratio, target, note."""
    lines = ["| id | measurement | value | ratio | target | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}×" if r.get("ratio") is not None else ""
        cells = [r["id"], r["what"], fmt_value(r.get("value"), r.get("unit", "")), ratio, r.get("target", ""),
                 r.get("note", "")]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def report(header: str, rows: list[dict], json_path: str) -> None:
    """Print the header and the table; write both as JSON to `json_path` (if given)."""
    print(header)
    print("\n".join(table_lines(rows)))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
