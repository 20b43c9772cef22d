"""Concurrent control of one session, as a hypothesis state machine: each step is a burst of calls —
Launch, Continue, Step, Pause, Patch, Terminate, Close, status — fired together from several threads (a
barrier lines them up) through a real in-process server on the bundled model, with a breakpoint so that
runs park. After every burst, the invariants:

- every run ends: the session's runs all reach a final state once terminated, and closing a session
  ends its runs (no run is left parked, holding a worker thread: a fresh run still completes);
- a patch applies to exactly the run it was sent for: a Patch sent for run r (the run the client last
  saw live) is on r or refused (RUN_ENDED), never a session patch that would change every later run (a
  Patch racing a Continue used to become session-wide in 3 of 60 rounds);
- no hook of ours is left on the model once nothing runs.

Bounded to run in well under a minute on two cores (`ROUNDS` examples of at most `STEPS` bursts)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tdb_client import Breakpoint, TdbClient, TdbError
from tdb_server.engine.types import DONE

IDS = [[1, 2, 3, 4, 5, 6]]
OPS = ["launch", "continue", "continue", "step", "pause", "terminate", "patch", "patch", "patch", "status", "close"]
ROUNDS, STEPS, THREADS = 20, 8, 4
DELIBERATE = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED}
REPORT = {"bursts": 0, "calls": 0, "patches_on_run": 0, "patches_on_session": 0, "patches_refused": 0}


def _machine(address: str, handle, adapter):
    class SessionRaces(RuleBasedStateMachine):
        @initialize()
        def open(self) -> None:
            self.client = TdbClient(address, timeout=30)
            self.sessions = []           # server-side sessions opened (to check their runs end)
            self._new_session()

        def _new_session(self) -> None:
            self.s = self.client.session()
            self.s.set_breakpoints([Breakpoint("blocks.0.attn.out"), Breakpoint("blocks.1.attn.out")])
            self.server_side = handle.sessions.get(self.s.id, dict(self.s.metadata)["tdb-session-secret"])
            self.sessions.append(self.server_side)
            self.sent: list[tuple[int, str]] = []     # (patch id, the run it was sent for)

        def _one(self, op: str, sent_for: str) -> None:
            s = self.s
            try:
                if op == "launch":
                    s.launch(token_ids=IDS, capture=["none"], timeout=20)
                elif op == "continue":
                    s.continue_(timeout=20)
                elif op == "step":
                    s.step("over", timeout=20)
                elif op == "pause":
                    s.pause(timeout=5)
                elif op == "terminate":
                    s.terminate(timeout=20)
                elif op == "status":
                    s.status()
                elif op == "close":
                    s.close()
                else:
                    r = s.patch("blocks.1.attn.out", "add", np.full(adapter.info.d_model, 1.0, np.float32),
                                run_id=sent_for)
                    with self.lock:
                        self.sent.append((r.patch_id, sent_for))
                        REPORT["patches_on_run" if r.scope == "run" else "patches_on_session"] += 1
                    if sent_for:
                        assert r.scope == "run", f"a patch sent for {sent_for} became {r.scope}-wide"
            except TdbError as e:
                assert e.code in DELIBERATE, e
                if e.reason == "RUN_ENDED":
                    with self.lock:
                        REPORT["patches_refused"] += 1

        @rule()
        def park(self) -> None:
            """A run stopped at its breakpoint: what most bursts race over."""
            if self.s.closed:
                self._new_session()
            try:
                if self.s.status().state not in ("running", "paused"):
                    self.s.launch(token_ids=IDS, capture=["none"], timeout=20)
            except TdbError as e:
                assert e.code in DELIBERATE, e

        @rule(ops=st.lists(st.sampled_from(OPS), min_size=2, max_size=THREADS))
        def burst(self, ops: list[str]) -> None:
            if self.s.closed:
                self._new_session()
            st_ = self.s.status()
            sent_for = st_.run_id if st_.state in ("running", "paused") else ""
            self.lock = threading.Lock()
            barrier = threading.Barrier(len(ops))

            def go(op: str) -> None:
                barrier.wait()
                self._one(op, sent_for)

            threads = [threading.Thread(target=go, args=(op,)) for op in ops]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
                assert not t.is_alive(), "a call hung"
            REPORT["bursts"] += 1
            REPORT["calls"] += len(ops)

        @invariant()
        def patches_land_on_the_run_they_were_sent_for(self) -> None:
            sess = self.server_side
            with sess.cv:
                session_ids = {p.id for p in sess.patches}
                on_run = {p.id: run.run_id for run in sess.runs.values() for p in run.patches}
            for pid, sent_for in getattr(self, "sent", []):
                if sent_for:
                    assert pid not in session_ids, f"patch {pid} sent for {sent_for} is session-wide"
                    assert on_run.get(pid, sent_for) == sent_for, f"patch {pid} landed on {on_run[pid]}"

        @invariant()
        def closed_sessions_end_their_runs(self) -> None:
            for sess in self.sessions:
                if sess.closed:
                    for run in list(sess.runs.values()):
                        assert run.finished.wait(20), f"run {run.run_id} of a closed session never ended"

        def teardown(self) -> None:
            if not self.s.closed:
                try:
                    self.s.terminate(timeout=20)
                except TdbError:
                    pass
                for run in list(self.server_side.runs.values()):
                    assert run.finished.wait(20) or run.state in DONE, f"run {run.run_id} never ended"
                self.s.close()
            for sess in self.sessions:
                for run in list(sess.runs.values()):
                    assert run.finished.wait(20), f"run {run.run_id} never ended"
            with self.client.session() as fresh:           # the run pool is not starved by orphans
                assert fresh.launch(token_ids=IDS, capture=["none"], timeout=20).state == "exited"
            self.client.close()
    return SessionRaces


def test_concurrent_control_of_one_session_keeps_its_invariants(make_server, bundled_adapter):
    handle, address = make_server(bundled_adapter)
    machine = _machine(address, handle, bundled_adapter)
    run_state_machine_as_test(machine, settings=settings(max_examples=ROUNDS, stateful_step_count=STEPS,
                                                         deadline=None, derandomize=True,
                                                         suppress_health_check=list(HealthCheck)))
    assert bundled_adapter.installed_hook_count() == 0
    print(f"\nstate machine: {ROUNDS} examples, {REPORT}")
    assert REPORT["bursts"] >= ROUNDS
