"""The largest input each RPC takes, and what refusing it costs the server (issue 21's "largest input
tried per RPC and the server's peak RSS for it").

    .venv/bin/python benchmarks/bench_big_inputs.py [--mib 240] [--limit-gib 3]

For each request a fresh `tdb serve --model induction` (CPU, under an address-space limit of
`--limit-gib`, as the hostile tests run it) gets one request carrying `--mib` MiB in the field named,
just under the 256 MiB message limit that client and server share. Reported per request: the answer
(status and reason), the seconds until it came, the server's peak RSS (VmHWM) before and after, and
whether the server still answers a small request. Nothing here is a test: the hostile tests (tests/hostile,
tests/test_large_inputs.py) assert the refusals on smaller inputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "hostile"))

from server import hostile_server  # noqa: E402  (tests/hostile/server.py)
from tdb_client import Breakpoint, Target, TdbClient, TdbError  # noqa: E402


def _requests(mib: int) -> dict[str, Callable[[TdbClient], Any]]:
    text = "Mr Darcy " * (mib * (1 << 20) // 9)
    values = np.zeros(mib * (1 << 20) // 4, dtype=np.float32)

    def in_session(fn: Callable[[Any], Any]) -> Callable[[TdbClient], Any]:
        def call(c: TdbClient) -> Any:
            with c.session() as s:
                return fn(s)
        return call

    def patch(s: Any) -> Any:
        s.set_breakpoints([Breakpoint("blocks.0.attn.out")])
        s.launch("Mr Darcy")
        return s.patch("blocks.0.attn.out", "set", value=values)

    return {
        "Tokenize.text": lambda c: c.tokenize(text),
        "Launch.prompt": in_session(lambda s: s.launch(text)),
        "NodeTable.prompt": lambda c: c.node_table(text, Target(["Darcy"], ["Bingley"])),
        "Evaluate.expression": in_session(lambda s: s.evaluate(text)),
        "SetBreakpoints.log_message": in_session(
            lambda s: s.set_breakpoints([Breakpoint("blocks.0.attn.out", log_message=text)])),
        "SetBreakpoints.condition": in_session(
            lambda s: s.set_breakpoints([Breakpoint("blocks.0.attn.out", condition=text)])),
        "Patch.value (wrong shape)": in_session(patch),
        "Replay.recording": lambda c: c.replay('{"format": "' + text + '"}'),
    }


def _one(name: str, call: Callable[[TdbClient], Any], limit_gib: float) -> str:
    with hostile_server("--model", "induction", limit_gib=limit_gib) as served:
        with TdbClient(served.address, timeout=300) as c:
            c.tokenize("Mr Darcy")
            before = served.peak_rss_mib()
            t0 = time.perf_counter()
            try:
                call(c)
                answer = "accepted"
            except TdbError as e:
                answer = f"{e.code.name} {e.reason}"
            seconds = time.perf_counter() - t0
            peak = served.peak_rss_mib()
            try:
                alive = "yes" if c.tokenize("Mr Darcy")[0] else "no"
            except TdbError as e:
                alive = f"no ({e.code.name})"
    return f"| {name} | {answer} | {seconds:.2f} | {before:.0f} -> {peak:.0f} | {alive} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=240, help="MiB of input in the field (default 240)")
    ap.add_argument("--limit-gib", type=float, default=3.0, help="the server's address-space limit")
    ap.add_argument("--only", default="", help="run only requests whose name contains this")
    args = ap.parse_args()
    print(f"{args.mib} MiB in one field; server under {args.limit_gib} GiB of address space\n")
    print("| request | answer | seconds | server peak RSS, MiB (before -> after) | answers after |")
    print("|---|---|---|---|---|")
    for name, call in _requests(args.mib).items():
        if args.only in name:
            print(_one(name, call, args.limit_gib), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
