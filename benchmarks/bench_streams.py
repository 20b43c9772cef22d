"""Calls that wait (event streams, long polls) must not starve the others: latency of Initialize while
the server holds its ceiling of open event streams, and how fast the stream past the ceiling is refused.

    .venv/bin/python benchmarks/bench_streams.py [--streams 48] [--calls 200]

A server on 127.0.0.1 over a tiny random GPT-2 (`--streams` is its `max_streams`); one session per
stream, each stream drained in a thread; then `--calls` raw Initialize calls from a fresh client
(p50, p99, max) and one stream past the ceiling (RESOURCE_EXHAUSTED TOO_MANY_STREAMS, and how long
that took). Issue 21's goal: Initialize and health < 100 ms p99 with the streams open.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdb.v1 import debugger_pb2 as pb  # noqa: E402
from tdb_client import TdbClient, TdbError  # noqa: E402
from tdb_server.limits import Limits  # noqa: E402
from tdb_server.model import build_random_model  # noqa: E402
from tdb_server.server import create_server  # noqa: E402


def _drain(stream) -> None:
    try:
        for _ in stream:
            pass
    except TdbError:
        pass          # closed at the end


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=Limits().max_streams)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    handle, port = create_server("127.0.0.1:0", build_random_model("gpt2", seed=0),
                                 limits=Limits(max_streams=args.streams))
    address = f"127.0.0.1:{port}"
    client = TdbClient(address, timeout=30)
    sessions = [client.session() for _ in range(args.streams + 1)]
    streams = [s.events() for s in sessions[:-1]]
    for st in streams:
        threading.Thread(target=_drain, args=(st,), daemon=True).start()
    time.sleep(2.0)                                   # every stream reaches the server
    start = time.perf_counter()
    try:
        next(iter(sessions[-1].events(timeout=10)))
        refused = "admitted (no ceiling?)"
    except TdbError as e:
        refused = f"{e.reason} in {(time.perf_counter() - start) * 1e3:.1f} ms"
    with TdbClient(address, timeout=10) as other:
        ms = []
        for _ in range(args.calls):
            t = time.perf_counter()
            other._rpc("Initialize", pb.InitializeRequest())
            ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    print(f"{args.streams} open event streams; stream {args.streams + 1}: {refused}")
    print(f"Initialize x{args.calls}: p50 {ms[len(ms) // 2]:.2f} ms, p99 {ms[max(0, int(len(ms) * 0.99) - 1)]:.2f} ms, "
          f"max {ms[-1]:.2f} ms")
    for st in streams:
        st.close()
    client.close()
    handle.stop(grace=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
