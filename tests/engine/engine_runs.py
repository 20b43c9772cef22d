"""A helper of the engine's tests: launch on a session (engine level, no wire), continue through every stop,
and return the run once it has exited."""

from __future__ import annotations

from tdb_server.engine.types import BreakpointRequest, RunState


def run_to_end(session, seqs: list[list[int]], capture: list[str], breakpoints=()):
    session.set_breakpoints([BreakpointRequest(site=b) for b in breakpoints])
    run = session.launch([], seqs, False, capture, False)
    session.wait(run, 60)
    while run.state is RunState.PAUSED:
        session.resume("continue")
        session.wait(run, 60)
    assert run.state is RunState.EXITED, run.exception
    return run
