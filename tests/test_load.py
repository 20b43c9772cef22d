"""Load and failure containment on the bundled model (bounded in count and time, loopback only).

- 16 concurrent clients x 200 steps each (breakpoints, reads, patches): zero errors, every client's
  results equal its solo results, no event lost (contiguous sequence numbers), process memory growth
  under 5% between the second and the last round;
- a client process killed while its session is paused: the session is freed within its timeout and
  the other clients never stall."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tdb_client import TdbClient, TdbError
from tdb_client.client import Session

CLIENTS = 16
STEPS = 200
ROUNDS = 5
ROOT = Path(__file__).resolve().parent.parent


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Script:
    """One client's deterministic debugging script; `run_once` returns the final logits."""

    def __init__(self, i: int, info, seq_len: int = 12):
        rng = np.random.default_rng(100 + i)
        self.i = i
        self.ids = [int(x) for x in rng.integers(0, info.vocab_size, seq_len)]
        self.layer = i % info.n_layers
        self.head = i % info.n_heads
        self.scale = 1.0 + 0.25 * (i % 5)
        self.step_kind = ("into", "over", "out")[i % 3]

    def run_once(self, s: Session, budget: list[int]) -> np.ndarray:
        s.set_breakpoints(["blocks.*.attn.out", "blocks.*.mlp.out"])
        st = s.launch(token_ids=[self.ids])
        n = 0
        while st.state == "paused":
            site = st.site
            if site == f"blocks.{self.layer}.attn.out" and st.stop.when == "after":
                s.patch(f"blocks.{self.layer}.attn.head.{self.head}", "scale", scalar=self.scale)
            row = s.read(site, "[0, -1]")
            assert row.shape[-1] > 0 and np.isfinite(row).all()
            st = s.step(self.step_kind) if n % 2 else s.continue_()
            n += 1
            budget[0] -= 1
        assert st.state == "exited", st
        return s.result(include_logits=True).last_logits


@pytest.fixture(scope="module")
def server_process():
    """`tdb serve` on the circuit model in a process of its own, so its memory is measured alone."""
    from tdb_server.paths import circuit_model_path

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tdb_server", "serve", "--model", str(circuit_model_path()),
                             "--port", "0", "--device", "cpu", "--dtype", "float32"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("tdb: listening on "), line
        yield proc.pid, line.rsplit(" ", 1)[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _server_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_sixteen_clients_two_hundred_steps(server_process):
    pid, address = server_process
    with TdbClient(address) as c:
        info = c.model_info()
    scripts = [Script(i, info) for i in range(CLIENTS)]
    solo = {}
    with TdbClient(address) as c, c.session() as s:
        for sc in scripts:
            solo[sc.i] = sc.run_once(s, [0])

    errors: list[BaseException] = []
    mismatches: list[str] = []
    gaps: list[str] = []
    steps_done = [0] * CLIENTS
    rss: dict[int, int] = {}
    def measure() -> None:
        # every client is idle at the barrier: let the server's reaper hand freed memory back (it trims each
        # second), then take the lowest of a few samples so an in-flight gRPC buffer is not counted as growth
        time.sleep(1.5)
        samples = []
        for _ in range(5):
            samples.append(_server_rss(pid))
            time.sleep(0.1)
        rss[len(rss)] = min(samples)

    barrier = threading.Barrier(CLIENTS, action=measure)

    def client(sc: Script) -> None:
        try:
            with TdbClient(address) as c, c.session() as s:
                last_seq = 0
                for r in range(ROUNDS):
                    budget = [STEPS // ROUNDS]
                    while budget[0] > 0:
                        got = sc.run_once(s, budget)
                        if not np.array_equal(got, solo[sc.i]):
                            mismatches.append(f"client {sc.i} round {r}: max diff {np.abs(got - solo[sc.i]).max()}")
                    steps_done[sc.i] += STEPS // ROUNDS - budget[0]
                    events, last, truncated = s.poll_events(after_seq=last_seq)
                    seqs = [e.seq for e in events]
                    if truncated or seqs != list(range(last_seq + 1, last + 1)):
                        gaps.append(f"client {sc.i} round {r}: {seqs[:5]}... truncated={truncated}")
                    last_seq = last
                    barrier.wait(timeout=300)
        except BaseException as e:  # noqa: BLE001 - collected and reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(sc,)) for sc in scripts]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    elapsed = time.monotonic() - t0
    assert not errors, errors[:3]
    assert not mismatches, mismatches[:5]
    assert not gaps, gaps[:5]
    assert all(n >= STEPS for n in steps_done), steps_done
    growth = (rss[ROUNDS - 1] - rss[1]) / rss[1]
    print("server RSS per round (MiB):", [round(v / 2**20) for v in rss.values()])
    print(f"{CLIENTS} clients x {min(steps_done)}+ steps in {elapsed:.1f} s; server RSS after round 2 "
          f"{rss[1] / 2**20:.0f} MiB -> last {rss[ROUNDS - 1] / 2**20:.0f} MiB ({100 * growth:+.2f}%)")
    # the bound. It held only once runs stopped sitting in reference cycles (run <-> hook state, a
    # self-referencing closure) that kept each run's captures alive until the cyclic collector came by
    # (~34 MiB per round here before; tests/test_reference_cycles.py keeps them out)
    assert growth < 0.05


KILLED_CLIENT = r"""
import sys, time
from tdb_client import TdbClient
c = TdbClient(sys.argv[1])
s = c.session(idle_timeout_s=2.0)
s.set_breakpoints(["blocks.0.attn.out"])
st = s.launch(token_ids=[[1, 2, 3, 4, 5, 6]])
print(s.id, st.state, flush=True)
time.sleep(600)
"""


def test_killing_a_paused_client_process_frees_its_session(bundled_server, bundled_adapter):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, bundled_server], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        sid, state = proc.stdout.readline().split()
        assert state == "paused"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        worst = 0.0
        t_kill = time.monotonic()
        freed_after = None
        last_look = t_kill
        with TdbClient(bundled_server) as c, c.session() as s:
            s.set_breakpoints(["blocks.*.resid_post"])
            while time.monotonic() - t_kill < 20:
                st = s.launch(token_ids=[[7, 8, 9, 10]])
                while st.state == "paused":
                    t0 = time.monotonic()
                    st = s.continue_()
                    worst = max(worst, time.monotonic() - t0)
                # a status poll counts as activity and would keep the session alive: look rarely
                if time.monotonic() - last_look > 3.0:
                    last_look = time.monotonic()
                    try:
                        Session(c, sid, 0).status()
                    except TdbError as e:
                        assert e.code.name == "NOT_FOUND"
                        freed_after = time.monotonic() - t_kill
                        break
        assert freed_after is not None and freed_after < 10, freed_after
        assert worst < 2.0, f"another client stalled for {worst:.2f} s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while bundled_adapter.installed_hook_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bundled_adapter.installed_hook_count() == 0
