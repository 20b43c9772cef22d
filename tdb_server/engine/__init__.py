"""The debugging engine: sessions, runs, stops, inspection. No protobuf and no gRPC here; serde.py
converts at the edge.

    types.py      the engine's own request, reply and state types (RunState, When, StopInfo, RunResult ...)
    events.py     event types and a session's event log (sequence numbers, bounded replay ring)
    run.py        a run: the forward pass in a worker thread, `on_site` at every hooked site, parking
    stops.py      the pure stop decisions: armed breakpoints, hit counts, where steps end
    env.py        what expressions see in a run (sites, units, weights); site and unit checks
    inspect.py    a paused run's frames, scopes, variables and the references naming them
    plan.py       planning a launch: tokens, generation settings, sites computed and hooked, capture cost
    session.py    a session: breakpoints, launch, control (continue/step/pause/terminate), patches
    manager.py    all sessions of a server; idle timeouts
    patching.py   a Patch call's name and op -> checked Interventions (model/interventions.py); where
                  a patch on the live run lands
    expr_check.py the static check of a breakpoint condition (unknown names, operators) at SetBreakpoints
    expr_budget.py sizing an expression's operations before they allocate (--max-expr-mib)
    summary.py    tensor summaries; patches.py, breakpoints.py, expr.py, scheduler.py, weights.py: the
                  session's patch records, breakpoint parts, expression language, device turns and
                  named weights
"""
