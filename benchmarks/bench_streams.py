"""A shared server under the load issue 21 names: 1,000 open event streams plus 100 clients driving
sessions, while Initialize and the health check must answer in < 100 ms p99; one stream past the
ceiling must be refused at once (RESOURCE_EXHAUSTED, TOO_MANY_STREAMS).

    .venv/bin/python benchmarks/bench_streams.py [--streams 1000] [--drivers 100] [--seconds 20]

Side by side, on one server: the same Initialize/health probe on the idle server, then with the load.
Every party is its own process, as users are: the server is `tdb serve` on the bundled model (CPU,
float32; `--max-streams` = `--streams`, so the stream after them is past the ceiling); one process
holds the event streams (grpc.aio, one session each, over `--channels` connections, each stream
admitted once its headers arrive); `--driver-procs` processes run the drivers, one thread, connection
and session each: a breakpoint at blocks.0.attn.out, then Launch (stops there) and Continue (exits) on
a short prompt, over and over, with the session's own event stream open (counted in `--streams`).
This process probes: Initialize and Health/Check alternately every 20 ms on a fresh connection, and
reports p50 / p99 / max, the server's threads and RSS (from /proc), the drivers' cycles and errors,
and the events the streams received.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from tdb.v1 import debugger_pb2 as pb, debugger_pb2_grpc  # noqa: E402

PROMPT = "Mr. Darcy said to Mr."
SITE = "blocks.0.attn.out"


# -- the parties ------------------------------------------------------------------------------------

async def _hold_streams(address: str, n: int, channels: int) -> None:
    """Open `n` Events streams (one fresh session each), say "opened" once the server admitted them all,
    drain them until stdin closes, then print what happened as JSON."""
    # a connection each (channels to one address share one by default), as separate users would have
    chans = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(channels)]
    stubs = [debugger_pb2_grpc.DebuggerStub(ch) for ch in chans]
    sids: list[tuple[str, str]] = []
    for i in range(0, n, 100):
        replies = await asyncio.gather(*(stubs[j % channels].CreateSession(pb.CreateSessionRequest(name=f"s{j}"))
                                         for j in range(i, min(n, i + 100))))
        sids += [(r.session_id, r.session_secret) for r in replies]
    calls = [stubs[i % channels].Events(pb.EventsRequest(session_id=sid), metadata=(("tdb-session-secret", secret),))
             for i, (sid, secret) in enumerate(sids)]
    await asyncio.gather(*(c.initial_metadata() for c in calls))
    refused = sum(1 for c in calls if c.done())
    print(json.dumps({"opened": n - refused}), flush=True)
    events = 0
    codes: dict[str, int] = {}

    async def drain(call) -> None:
        nonlocal events
        try:
            async for _ in call:
                events += 1
        except grpc.aio.AioRpcError as e:
            codes[e.code().name] = codes.get(e.code().name, 0) + 1
        except asyncio.CancelledError:    # cancelled here, at the end
            codes["CANCELLED"] = codes.get("CANCELLED", 0) + 1

    tasks = [asyncio.ensure_future(drain(c)) for c in calls]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for c in calls:
        c.cancel()
    await asyncio.gather(*tasks)
    for ch in chans:
        await ch.close()
    print(json.dumps({"events": events, "ended": codes}), flush=True)


def _drive(address: str, n: int, seconds: float) -> None:
    """`n` driver threads: Launch to a breakpoint and Continue, for `seconds`; print the cycles as JSON. Says
    "started" once every driver's event stream delivered its first run (so every stream is admitted), then
    waits for a line on stdin to begin, so that every driver process runs in the same window."""
    from tdb_client import TdbClient
    from tdb_client.client import EventCollector

    cycles, errors, events = [], [], []
    lock = threading.Lock()
    ready, go = threading.Barrier(n + 1), threading.Event()

    def one() -> None:
        with TdbClient(address, timeout=120) as c, c.session() as s:
            s.set_breakpoints([SITE])
            collector = EventCollector(s)
            s.launch(PROMPT), s.continue_()           # a warm-up cycle, not counted
            collector.wait_for("run_exited", timeout=120)
            ready.wait()
            go.wait()
            stop_at = time.monotonic() + seconds
            mine = []
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    a, b = s.launch(PROMPT).state, s.continue_().state
                    if (a, b) != ("paused", "exited"):
                        raise RuntimeError(f"launch {a}, continue {b}")
                    mine.append(time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}"[:200])
            collector.close()
            with lock:
                cycles.extend(mine)
                events.append(len(collector.events))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    print(json.dumps({"started": n}), flush=True)
    sys.stdin.readline()
    go.set()
    for t in threads:
        t.join()
    print(json.dumps({"cycles": cycles, "errors": errors[:5], "n_errors": len(errors), "events": sum(events)}),
          flush=True)


# -- the probe --------------------------------------------------------------------------------------

def _pct(ms: list[float], q: float) -> float:
    ms = sorted(ms)
    return ms[min(len(ms) - 1, int(len(ms) * q))] if ms else float("nan")


def _probe(address: str, seconds: float) -> dict[str, list[float]]:
    """Initialize and Health/Check alternately, one every 20 ms, for `seconds`: latencies in ms."""
    out: dict[str, list[float]] = {"Initialize": [], "health": [], "failed": []}
    with grpc.insecure_channel(address) as ch:
        stub, health = debugger_pb2_grpc.DebuggerStub(ch), health_pb2_grpc.HealthStub(ch)
        calls = {"Initialize": lambda: stub.Initialize(pb.InitializeRequest(), timeout=5),
                 "health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)}
        stub.Initialize(pb.InitializeRequest(), timeout=30)   # connect first
        stop_at = time.monotonic() + seconds
        i = 0
        while time.monotonic() < stop_at:
            name = ("Initialize", "health")[i % 2]
            i += 1
            t0 = time.perf_counter()
            try:
                calls[name]()
                out[name].append((time.perf_counter() - t0) * 1e3)
            except grpc.RpcError as e:
                out["failed"].append(float(e.code().value[0]))
            time.sleep(0.02)
    return out


def _server_stats(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = re.search(r"Threads:\s+(\d+)", status).group(1)
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    return f"{threads} threads, {rss:.0f} MiB RSS"


def _row(phase: str, lat: dict[str, list[float]], stats: str) -> str:
    cells = [f"{name} p50 {_pct(lat[name], 0.5):.1f} / p99 {_pct(lat[name], 0.99):.1f} / max "
             f"{max(lat[name], default=float('nan')):.1f} ms (n={len(lat[name])})" for name in ("Initialize", "health")]
    failed = f", {len(lat['failed'])} failed" if lat["failed"] else ""
    return f"| {phase} | {cells[0]} | {cells[1]} | {stats}{failed} |"


def _read_json(proc: subprocess.Popen, key: str, timeout: float) -> dict:
    """The first JSON line of `proc` that has `key` (within `timeout` s)."""
    box: dict = {}

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("{") and key in (d := json.loads(line)):
                box.update(d)
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        raise RuntimeError(f"no {key!r} from {proc.args[-6:]} within {timeout:.0f} s")
    return box


def _refusal_ms(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        stub = debugger_pb2_grpc.DebuggerStub(ch)
        r = stub.CreateSession(pb.CreateSessionRequest(name="past the ceiling"), timeout=10)
        t0 = time.perf_counter()
        try:
            next(stub.Events(pb.EventsRequest(session_id=r.session_id),
                             metadata=(("tdb-session-secret", r.session_secret),), timeout=10))
            return "admitted: no ceiling?"
        except grpc.RpcError as e:
            ms = (time.perf_counter() - t0) * 1e3
            reason = dict(e.trailing_metadata() or ()).get("tdb-reason", "")
            return f"{e.code().name} {reason} in {ms:.1f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=1000, help="open event streams (= the server's --max-streams)")
    ap.add_argument("--drivers", type=int, default=100, help="clients driving sessions (each holds one of the streams)")
    ap.add_argument("--driver-procs", type=int, default=4)
    ap.add_argument("--channels", type=int, default=100, help="connections the idle streams are spread over")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the drivers run (and the probe under load)")
    ap.add_argument("--role", choices=["streams", "drivers"], help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "streams":
        asyncio.run(_hold_streams(args.address, args.n, args.channels))
        return 0
    if args.role == "drivers":
        _drive(args.address, args.n, args.seconds)
        return 0

    py = sys.executable
    idle = args.streams - args.drivers
    server = subprocess.Popen([py, "-m", "tdb_server", "serve", "--port", "0", "--device", "cpu", "--dtype", "float32",
                               "--max-streams", str(args.streams), "--max-sessions", str(args.streams + 16),
                               "--max-sessions-per-client", str(args.streams + 16)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    children: list[subprocess.Popen] = []
    try:
        line = server.stdout.readline()
        address = re.search(r"listening on (\S+)", line).group(1)
        print(f"server: tdb serve on the bundled model at {address}, --max-streams {args.streams}; this machine: "
              f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        print("| phase | Initialize | health | server |\n|---|---|---|---|")
        print(_row("idle server", _probe(address, 5.0), _server_stats(server.pid)), flush=True)

        me = [py, str(Path(__file__).resolve()), "--address", address, "--channels", str(args.channels)]
        holder = subprocess.Popen(me + ["--role", "streams", "--n", str(idle)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        children.append(holder)
        opened = _read_json(holder, "opened", 300)["opened"]
        print(_row(f"{opened} idle streams open", _probe(address, 5.0), _server_stats(server.pid)), flush=True)

        per = [args.drivers // args.driver_procs + (i < args.drivers % args.driver_procs)
               for i in range(args.driver_procs)]
        drivers = [subprocess.Popen(me + ["--role", "drivers", "--n", str(k), "--seconds", str(args.seconds)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k in per if k]
        children += drivers
        for d in drivers:
            _read_json(d, "started", 600)
        for d in drivers:
            d.stdin.write("go\n")
            d.stdin.flush()
        time.sleep(0.5)
        refusal = _refusal_ms(address)
        loaded = _probe(address, max(1.0, args.seconds - 2.0))
        stats = _server_stats(server.pid)
        print(_row(f"{opened} idle streams + {args.drivers} drivers (each with its stream)", loaded, stats), flush=True)
        results = [_read_json(d, "cycles", args.seconds + 300) for d in drivers]
        holder.stdin.close()
        held = _read_json(holder, "events", 60)
        cycles = sorted(c for r in results for c in r["cycles"])
        n_err = sum(r["n_errors"] for r in results)
        print(f"\nstream {args.streams + 1} (past the ceiling, under load): {refusal}")
        print(f"drivers: {len(cycles)} Launch+Continue cycles in {args.seconds:.0f} s "
              f"({len(cycles) / args.seconds:.1f}/s), cycle p50 {_pct(cycles, 0.5) * 1e3:.0f} ms, "
              f"p99 {_pct(cycles, 0.99) * 1e3:.0f} ms; {n_err} errors "
              f"{[e for r in results for e in r['errors']][:3]}; events on the drivers' streams: "
              f"{sum(r['events'] for r in results)}")
        print(f"idle streams: {held['events']} events received, ended by the client: {held['ended']}")
        ok = _pct(loaded["Initialize"], 0.99) < 100 and _pct(loaded["health"], 0.99) < 100 and not loaded["failed"]
        print(f"goal (Initialize and health p99 < 100 ms under load): {'met' if ok else 'MISSED'}")
        return 0
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
