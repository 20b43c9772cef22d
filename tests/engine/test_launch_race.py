"""One run at a time per session, decided under one lock: concurrent launches on one session admit one
run, the others are refused with RUN_ACTIVE, and closing the session ends the run it admitted (no run
is left paused holding a worker thread)."""

from __future__ import annotations

import threading

from tdb_server.engine.manager import SessionManager
from tdb_server.engine.types import BreakpointRequest, RunState
from tdb_server.errors import FailedPrecondition

IDS = [3, 14, 15, 92, 65]
THREADS, ROUNDS = 6, 15


def _launch_all(session) -> tuple[list, list]:
    barrier = threading.Barrier(THREADS)
    runs, refused, lock = [], [], threading.Lock()

    def go() -> None:
        barrier.wait()
        try:
            run = session.launch([], [IDS], False, ["none"], False)
            with lock:
                runs.append(run)
        except FailedPrecondition as e:
            with lock:
                refused.append(e.reason)

    threads = [threading.Thread(target=go) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return runs, refused


def test_concurrent_launches_admit_one_run_and_closing_ends_it(gpt2_adapter):
    mgr = SessionManager(gpt2_adapter)
    try:
        for _ in range(ROUNDS):
            s = mgr.create()
            s.set_breakpoints([BreakpointRequest(site="blocks.1.attn.out")])   # every run parks there
            runs, refused = _launch_all(s)
            assert len(runs) == 1 and refused == ["RUN_ACTIVE"] * (THREADS - 1)
            s.wait(runs[0], 30)
            assert runs[0].state is RunState.PAUSED
            mgr.close(s.id)
            assert runs[0].finished.wait(30) and runs[0].state is RunState.TERMINATED
        fresh = mgr.create()
        run = fresh.launch([], [IDS], False, ["none"], False)
        fresh.wait(run, 30)
        assert run.state is RunState.EXITED, "the run pool is starved by orphaned runs"
    finally:
        mgr.shutdown()
    assert gpt2_adapter.installed_hook_count() == 0


def test_a_closed_session_launches_nothing(gpt2_adapter):
    mgr = SessionManager(gpt2_adapter)
    try:
        s = mgr.create()
        s.close()
        try:
            s.launch([], [IDS], False, ["none"], False)
        except FailedPrecondition as e:
            assert e.reason == "SESSION_CLOSED"
        else:
            raise AssertionError("a closed session started a run")
    finally:
        mgr.shutdown()
