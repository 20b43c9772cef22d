"""Looking at a paused run: stack frames, scopes and variables, and the references that name them.

A frame is a site path (`blocks.1.attn.out` inside `blocks.1.attn`, `blocks.1`, the model); its scopes
are the value at the stop, the sites captured inside it and (for the model) the patches; a variable
is a tensor summary that expands into slices along its first dimension.

References handed to clients (frame ids, variables references) carry the stop id
(`stop_id << REF_SHIFT | index`), so a reference from before a resume is rejected with ABORTED instead
of silently pointing at a different value.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from ..model.sites import enclosing
from . import expr
from .env import evaluate
from .patches import Patch
from .run import DebugRun, StopState
from .summary import summarize
from .types import RunState, Scope, StackFrame, Variable, When

REF_SHIFT = 20          # references = stop_id << REF_SHIFT | index


def paused(run: DebugRun | None, what: str) -> tuple[DebugRun, StopState]:
    """The run and its stop, or FAILED_PRECONDITION naming `what` needed a paused run."""
    if run is None or run.state is not RunState.PAUSED or run.stop is None:
        state = run.state.value if run else "idle"
        raise FailedPrecondition(f"{what} needs a paused run (the session is {state})", reason="NOT_PAUSED")
    return run, run.stop


def new_ref(stop: StopState, payload: Any) -> int:
    idx = len(stop.refs) + 1
    ref = (stop.stop_id << REF_SHIFT) | idx
    stop.refs[ref] = payload
    return ref


def resolve_ref(run: DebugRun | None, ref: int, what: str) -> tuple[DebugRun, StopState, Any]:
    """What `ref` names at the current stop; ABORTED if it belongs to an earlier one."""
    stop_id = ref >> REF_SHIFT
    cur = run.stop if run is not None and run.state is RunState.PAUSED else None
    if cur is None or stop_id != cur.stop_id:
        now = f"now at stop {cur.stop_id}" if cur else "the run is not paused now"
        raise Aborted(f"{what} {ref} belongs to stop {stop_id}; the run has resumed since ({now}): "
                      "get a fresh stack", reason="STALE_REFERENCE")
    if ref not in cur.refs:
        raise NotFound(f"{what} {ref} does not exist at this stop", reason="UNKNOWN_REFERENCE")
    return run, cur, cur.refs[ref]


def stack(stop: StopState) -> list[StackFrame]:
    """Frames at the stop, innermost first: the site, its enclosing modules, the model."""
    names = [stop.site, *reversed(enclosing(stop.site)), "model"] if stop.site else ["model"]
    frames = []
    for name in names:
        prefix = "" if name == "model" else name
        label = name if name != stop.site else (f"{name} (before)" if stop.when is When.BEFORE else name)
        frames.append(StackFrame(id=new_ref(stop, ("frame", prefix)), name=label, site=prefix))
    return frames


def scopes(run: DebugRun, stop: StopState, payload: Any, patches: list[Patch], frame_id: int) -> list[Scope]:
    """The scopes of a frame: Value (the stop's own site), Captured, and Patches (the model frame)."""
    if payload[0] != "frame":
        raise InvalidArgument(f"{frame_id} is not a frame id", reason="BAD_REFERENCE")
    prefix = payload[1]
    out = []
    if prefix == stop.site and stop.value is not None:
        out.append(Scope(name="Value", variables_reference=new_ref(stop, ("value", prefix)), named_variables=1))
    names = [x for x in run.order if x in run.captured and (not prefix or x == prefix or x.startswith(prefix + "."))]
    out.append(Scope(name="Captured", variables_reference=new_ref(stop, ("sites", tuple(names))),
                     named_variables=len(names)))
    if prefix == "":
        out.append(Scope(name="Patches", variables_reference=new_ref(stop, ("patches",)),
                         named_variables=len(patches) + len(run.patches)))
    return out


def variable(stop: StopState, name: str, value: torch.Tensor, evaluate_name: str) -> Variable:
    """A tensor as a variable: a scalar's number, or a summary that expands along the first dimension."""
    shape = list(value.shape)
    dtype = str(value.dtype).replace("torch.", "")
    var = Variable(name=name, evaluate_name=evaluate_name, type=f"tensor {dtype} {shape}")
    if value.numel() == 1 and value.dim() == 0:
        var.value = expr.render(value)
        return var
    summ = summarize(value)
    var.summary = summ
    var.value = f"{shape} mean={summ.mean:.4g} norm={summ.norm:.4g} min={summ.min:.4g} max={summ.max:.4g}"
    if summ.nan_count:
        var.value += f" nan={summ.nan_count}"
    var.variables_reference = new_ref(stop, ("expr", evaluate_name))
    var.indexed_variables = shape[0] if shape else 0
    return var


def variables(adapter: Any, run: DebugRun, stop: StopState, payload: Any, start: int, count: int,
              patches: list[Patch]) -> list[Variable]:
    """The variables a reference names: the stop's value, captured sites, patches, or an expression's slices."""
    kind = payload[0]
    if kind == "value":
        return [variable(stop, stop.site, stop.value, "x")]
    if kind == "sites":
        names = list(payload[1])
        names = names[start:start + count] if count else names[start:]
        return [variable(stop, n, run.captured[n], n) for n in names]
    if kind == "patches":
        return [Variable(name=f"patch {p.id}", value=f"{p.describe()} ({p.scope}{', applied' if p.applied else ''})",
                         type="patch") for p in (*patches, *run.patches)]
    if kind == "expr":
        base = payload[1]
        value = evaluate(adapter, base, run)
        n = value.shape[0] if value.dim() else 0
        end = n if not count else min(n, start + count)
        return [variable(stop, f"[{i}]", value[i], f"{base}[{i}]") for i in range(max(start, 0), end)]
    return []
