"""A debug session: a client's breakpoints, session-scoped patches, runs and events, and the control
calls that drive its run (launch, continue, step, pause, terminate, patch).

A session is a small state machine guarded by one lock (`Session.cv`): a run is RUNNING, PAUSED, or
done (EXITED / TERMINATED / FAILED); the run itself executes in a worker thread (run.py) and hands
control back at a stop. The decisions of when to stop are in stops.py, looking at a stop in inspect.py,
planning a launch in plan.py. Everything here speaks the engine's own types (types.py); serde.py
converts at the protobuf edge.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from .. import bounds
from ..errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ..limits import Limits
from ..model.interventions import Intervention, Selector
from ..model.sites import SiteError, Unit, expand_glob
from . import env, expr, expr_check, inspect, patching, plan, stops, weights
from .breakpoints import BreakpointSpec, parse_hit_condition
from .events import Continued, EventLog, Output, Terminated
from .patches import Patch
from .run import DebugRun, _shared_pool
from .scheduler import scheduler_for
from .types import (ACTIVE, DONE, BreakpointRequest, GenOptions, PatchInfo, RunState, RunStatus, Scope, StackFrame,
                    Variable, When)

KEEP_RUNS = 8           # finished runs kept per session (for reads and copy_from_run)
DEFAULT_WAIT_S = 60.0


def _bp_key(bp: BreakpointSpec) -> tuple:
    return bp.name, bp.when, bp.condition, bp.hit_condition, bp.log_message, bp.tokens


class Session:
    """A client's debugging context: breakpoints, session-scoped patches, runs and events."""

    def __init__(self, adapter: Any, session_id: str, name: str, idle_timeout_s: float, event_capacity: int = 4096,
                 limits: Limits | None = None, total_captured: Callable[[], int] | None = None,
                 run_pool: ThreadPoolExecutor | None = None):
        self.adapter, self.id, self.name = adapter, session_id, name
        self.secret = ""            # the creator's proof of ownership (SessionManager.create sets it)
        self.owner = ""             # who it counts against in the per-client quota
        # Runs execute on long-lived pool threads: a new OS thread per run would leave per-thread native
        # buffers (BLAS/OpenMP) behind at every run.
        self.run_pool = run_pool or _shared_pool()
        self.limits = limits or Limits()
        self._total_captured = total_captured or (lambda: self.captured_bytes())
        self.idle_timeout_s = idle_timeout_s
        self.cv = threading.Condition()
        self.events = EventLog(event_capacity)
        self.breakpoints: list[BreakpointSpec] = []
        self.patches: list[Patch] = []                   # session-scoped
        self.runs: OrderedDict[str, DebugRun] = OrderedDict()
        self.current: DebugRun | None = None
        self.last_activity = time.monotonic()
        self.streams = 0
        self.closed = False
        self.recording: list[Any] = []                       # actions, for ExportRecording (recording.py)
        self._forced: list[tuple[str, int]] = []
        self.device = weights.device(adapter)
        self.scheduler = scheduler_for(adapter)
        self._stop_ids = itertools.count(1)
        self._patch_ids = itertools.count(1)
        self._run_ids = itertools.count(1)

    # -- helpers ---------------------------------------------------------------------------------

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def next_stop_id(self) -> int:
        return next(self._stop_ids)

    @property
    def all_sites(self) -> list[str]:
        return list(self.adapter.info.sites)

    def decode(self, ids: list[int]) -> list[str]:
        return self.adapter.token_texts(ids)

    def captured_bytes(self) -> int:
        """Bytes of activations this session holds (its current and retained runs)."""
        with self.cv:
            return self._captured_bytes_unlocked()

    def _captured_bytes_unlocked(self) -> int:
        return sum(t.numel() * t.element_size() for run in self.runs.values() for t in run.captured.values())

    def _reserve_capture(self, sites: frozenset[str], batch: int, seq: int) -> None:
        """Refuse a launch whose captures would not fit the memory budgets (after dropping old runs)."""
        if not sites:
            return          # nothing to hold: nothing to refuse, no run to drop
        need = plan.estimate_capture(self.adapter.info, sites, batch, seq)
        lim = self.limits
        if need > lim.session_capture_bytes:
            raise ResourceExhausted(
                f"capturing {len(sites)} sites for batch {batch} x {seq} tokens needs {need / 2**20:.1f} MiB; this "
                f"session may hold {lim.session_capture_bytes / 2**20:.1f} MiB: capture fewer sites (launch "
                "capture=[...]) or send fewer tokens", reason="CAPTURE_BUDGET")
        with self.cv:   # drop the oldest finished runs until the new one fits
            while self.runs and self._captured_bytes_unlocked() + need > lim.session_capture_bytes:
                oldest = next(iter(self.runs))
                if self.runs[oldest] is self.current and self.current.state not in DONE:
                    break
                del self.runs[oldest]
        if self._total_captured() + need > lim.total_capture_bytes:
            raise ResourceExhausted(
                f"the server holds {self._total_captured() / 2**20:.1f} MiB of captured activations across sessions; "
                f"this launch needs {need / 2**20:.1f} MiB more (limit {lim.total_capture_bytes / 2**20:.1f} MiB): "
                "close idle sessions or capture fewer sites", reason="CAPTURE_BUDGET")

    def run_for(self, run_id: str = "") -> DebugRun:
        if not run_id:
            if self.current is not None:
                return self.current
            if self.runs:
                return next(reversed(self.runs.values()))
            raise FailedPrecondition("no run yet in this session: launch one first", reason="NO_RUN")
        run = self.runs.get(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} is not in this session (the last {KEEP_RUNS} runs are kept)",
                           reason="UNKNOWN_RUN")
        return run

    def _live(self) -> DebugRun | None:
        """The current run if it is running or paused."""
        run = self.current
        return run if run is not None and run.state in ACTIVE else None

    # -- breakpoints -----------------------------------------------------------------------------

    def set_breakpoints(self, requested: list[BreakpointRequest]) -> list[BreakpointSpec]:
        """Replace the set; each breakpoint comes back verified or with the reason it is not."""
        verified = set(self.adapter.verified_sites)
        specs = [self._breakpoint(i, bp, verified) for i, bp in enumerate(requested, start=1)]
        with self.cv:
            # an IDE sends the whole set again whenever one breakpoint changes: the others keep their hit
            # counts in the current run (a hit condition like ">= 3" must not start over)
            old = {_bp_key(bp): bp.hits for bp in self.breakpoints}
            for bp in specs:
                bp.hits = old.get(_bp_key(bp), 0)
            self.breakpoints = specs
        run = self._live()
        if run is not None:
            self._arm_live(run, specs)
        return specs

    def _breakpoint(self, i: int, bp: BreakpointRequest, verified: set[str]) -> BreakpointSpec:
        name = bp.site.strip()
        spec = BreakpointSpec(id=i, name=name, when=bp.when, sites=[], condition=bp.condition,
                              hit_condition=parse_hit_condition(bp.hit_condition), log_message=bp.log_message)
        if bp.tokens is not None:
            first, last = bp.tokens
            bounds.in_range("tokens.last", last, 0, self.limits.max_prompt_tokens, "generation steps")
            if not 0 <= first <= last:
                raise InvalidArgument(f"breakpoint {i}: token range {first}..{last} is empty or negative",
                                      reason="BAD_BREAKPOINT")
            spec.tokens = (first, last)
        if bp.log_message:
            expr.check_template(bp.log_message)
        if bp.condition:
            if bp.when is When.BEFORE:
                raise InvalidArgument(f"breakpoint {i} ({name}): a condition needs the value, which does not "
                                      "exist before the site runs; use when=AFTER", reason="BAD_CONDITION")
            spec.condition_ast = expr.parse(bp.condition)
            try:
                expr_check.check(spec.condition_ast, lambda n: env.check_name(self.adapter, n))
                expr_check.check_size(spec.condition_ast, lambda n: weights.weight(self.adapter, n),
                                      self.limits.max_expr_bytes)
            except (InvalidArgument, ResourceExhausted) as e:   # it could never evaluate: say so now, never stop as if it held
                spec.verified, spec.message = False, f"condition {bp.condition!r}: {e.message}"
                return spec
        try:
            spec.unit, spec.sites = self._breakpoint_sites(name)
        except SiteError as e:
            spec.verified, spec.message = False, e.message
            return spec
        missing = [x for x in spec.sites if x not in verified]
        if missing and len(missing) == len(spec.sites):
            spec.verified = False
            spec.message = f"{missing[0]} is never reached by a forward pass of this model"
        spec.sites = [x for x in spec.sites if x in verified]
        return spec

    def _breakpoint_sites(self, name: str) -> tuple[Unit | None, list[str]]:
        """The unit (if any) and the sites a breakpoint name resolves to (SiteError if none)."""
        if any(c in name for c in "*?["):
            sites = expand_glob(name, self.all_sites)
            if not sites:
                raise SiteError(f"no site matches {name!r}")
            return None, sites
        unit = env.parse_unit(self.adapter, name)
        if unit is not None:
            return unit, [unit.stop_site]
        return None, [env.parse_site(self.adapter, name)]

    @staticmethod
    def _arm_live(run: DebugRun, specs: list[BreakpointSpec]) -> None:
        """Hook the new breakpoints' sites in the live run; say which apply only from the next launch."""
        heads = [bp.unit for bp in specs if bp.unit is not None and bp.unit.kind == "head"]
        run.hook_more({x for bp in specs for x in bp.sites} | {f"blocks.{unit.layer}.attn.z" for unit in heads})
        for bp in specs:   # a breakpoint may ask for a site the run does not fire (attn.pattern)
            extra = [x for x in bp.sites if x not in run.sites]
            if extra:
                bp.message = (f"{extra[0]} is not computed in the current run; the breakpoint applies from the "
                              "next launch")

    # -- runs ------------------------------------------------------------------------------------

    def launch(self, prompts: list[str], token_ids: list[list[int]], prepend_bos: bool, capture: list[str],
               stop_on_entry: bool, gen: GenOptions | None = None) -> DebugRun:
        """Start a run (in a worker thread) and return it; it is RUNNING until it stops or ends."""
        seqs = plan.encode(self.adapter, self.limits, prompts, token_ids, prepend_bos)
        if gen is not None:
            plan.check_generation(self.adapter, self.limits, gen, seqs)
        self._check_can_launch()     # early, before planning; decided again under the lock that admits the run
        verified = self.adapter.verified_order
        captured = plan.capture_set(capture, verified, lambda c: env.parse_site(self.adapter, c))
        asked = captured | {x for bp in self.breakpoints for x in bp.sites} | {x for p in self.patches for x in p.sites}
        sites = plan.run_sites(verified, asked)
        fire = set(sites) if not capture or stop_on_entry else plan.hooked_sites(sites, captured, self.breakpoints,
                                                                                  self.patches)
        self._reserve_capture(captured, len(seqs), max(len(x) for x in seqs))
        ids, lengths = plan.pad(seqs)
        run = DebugRun(self, f"r{next(self._run_ids)}", ids, lengths, captured, sites, stop_on_entry, gen,
                       fire=frozenset(fire), prepare=plan.prepared_sites(sites, fire, self.breakpoints))
        run.warnings = plan.input_warnings(self.adapter, prompts, seqs)
        self._make_current(run)
        for text in run.warnings:
            self.events.emit(run.run_id, Output(category="warning", text=text))
        run.start()
        return run

    def _check_can_launch(self) -> None:
        """FAILED_PRECONDITION unless a new run may start: the session is open and has no live run."""
        if self.closed:
            raise FailedPrecondition(f"session {self.id} is closed", reason="SESSION_CLOSED")
        live = self._live()
        if live is not None:
            raise FailedPrecondition(f"run {live.run_id} is still {live.state.value}: continue or terminate it first",
                                     reason="RUN_ACTIVE")

    def _make_current(self, run: DebugRun) -> None:
        """The new run becomes current (pending forced stops go with it); keep the last KEEP_RUNS runs.
        One run at a time: of concurrent launches, the lock admits one; the others get RUN_ACTIVE."""
        with self.cv:
            self._check_can_launch()
            run.forced_stops, self._forced = self._forced, []
            for bp in self.breakpoints:
                bp.hits = 0
            for p in self.patches:
                p.applied = False
            self.current = run
            self.runs[run.run_id] = run
            while len(self.runs) > KEEP_RUNS:
                old_id, old = next(iter(self.runs.items()))
                if old is self.current:
                    break
                del self.runs[old_id]

    # -- control ---------------------------------------------------------------------------------

    def _active(self, what: str) -> DebugRun:
        run = self.current
        if run is None:
            raise FailedPrecondition(f"cannot {what}: no run in this session; launch one first", reason="NO_RUN")
        return run

    def resume(self, command: str, step_kind: str | None = None) -> DebugRun:
        """Continue (step_kind None) or step ("into", "over", "out", "token") the paused run."""
        run = self._active(command)
        with self.cv:
            if run.state is not RunState.PAUSED:
                raise FailedPrecondition(f"cannot {command}: run {run.run_id} is {run.state.value}, not paused",
                                         reason="NOT_PAUSED")
            if step_kind is not None:
                if step_kind == "token" and run.gen is None:
                    raise FailedPrecondition("a token step needs a generating run (launch with generate)",
                                             reason="NOT_GENERATING")
                stop = run.stop
                start = -1 if stop is None else stops.step_start(run.index.get(stop.site, -1), stop)
                run.step = (step_kind, start)
                run.hook_more()
            run.command = "go"
            run.state, run.stop = RunState.RUNNING, None   # the hand-off: the worker owns the run from here
            self.events.emit(run.run_id, Continued())
            self.cv.notify_all()
        return run

    def force_stop(self, site: str, token: int = 0) -> None:
        """Stop (as a pause) when the run reaches `site` in generation step `token` ("" = the token boundary).
        Used by replays to land where a recorded pause landed; applies to the current or the next run."""
        with self.cv:
            run = self._live()
            if run is not None:
                run.forced_stops.append((site, token))
            else:
                self._forced.append((site, token))

    def pause(self) -> DebugRun:
        run = self._active("pause")
        with self.cv:
            if run.state is RunState.RUNNING:
                run.pause_requested = True
                run.hook_more()
        return run

    def terminate(self) -> DebugRun:
        run = self._active("terminate")
        with self.cv:
            if run.state in ACTIVE:
                run.terminate_requested = True
                run.command = "terminate"
                self.cv.notify_all()
        return run

    def wait(self, run: DebugRun, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while run.state is RunState.RUNNING and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cv.wait(left)

    def status(self, run: DebugRun | None = None) -> RunStatus:
        run = run or self.current
        msg = RunStatus(session_id=self.id, patches=[_patch_info(p, "session") for p in self.patches])
        if run is None:
            return msg
        with self.cv:
            msg.run_id, msg.state, msg.warnings = run.run_id, run.state, list(run.warnings)
            msg.stop = run.stop.info() if run.stop is not None else None
            msg.result = run.result
            msg.patches += [_patch_info(p, "run") for p in run.patches]
        return msg

    def checked_status(self, run: DebugRun) -> RunStatus:
        """The run's status; a run that died of out-of-memory fails the waiting request with RESOURCE_EXHAUSTED."""
        if run.state is RunState.FAILED and run.out_of_memory:
            raise ResourceExhausted(f"the run ran out of memory on the model's device ({run.exception}); its captures "
                                    "were freed and the session is usable: capture fewer sites or send fewer tokens",
                                    reason="OUT_OF_MEMORY")
        return self.status(run)

    # -- inspection (inspect.py) -----------------------------------------------------------------

    def stack(self) -> tuple[list[StackFrame], int]:
        _, stop = inspect.paused(self.current, "the stack")
        return inspect.stack(stop), stop.stop_id

    def scopes(self, frame_id: int) -> list[Scope]:
        run, stop, payload = inspect.resolve_ref(self.current, frame_id, "frame")
        return inspect.scopes(run, stop, payload, self.patches, frame_id)

    def variables(self, ref: int, start: int, count: int) -> list[Variable]:
        run, stop, payload = inspect.resolve_ref(self.current, ref, "variables reference")
        return inspect.variables(self.adapter, run, stop, payload, start, count, self.patches)

    def check_frame(self, frame_id: int) -> None:
        """ABORTED if the frame belongs to an earlier stop."""
        inspect.resolve_ref(self.current, frame_id, "frame")

    def evaluate_value(self, expression: str, run: DebugRun | None = None, value: Any = None) -> Any:
        return env.evaluate(self.adapter, expression, run or self.run_for(""), value)

    def read_value(self, expression: str, run_id: str = "") -> torch.Tensor:
        """What a read (ReadTensor, TensorStats) of `expression` returns: a tensor (INVALID_ARGUMENT if not)."""
        value = self.evaluate_value(expression, self.run_for(run_id))
        if isinstance(value, expr.TopK):
            value = value.values
        if isinstance(value, (int, float, bool)):
            value = torch.tensor(value)
        if not isinstance(value, torch.Tensor):
            raise InvalidArgument(f"{expression!r} is not a tensor", reason="NOT_A_TENSOR")
        return value

    # -- patching --------------------------------------------------------------------------------

    def patch(self, name: str, op: str, selector: Selector, value: torch.Tensor | None, scalar: float,
              source_run_id: str, mean_over: str, tokens: tuple[int, ...] = (), run_id: str = "") -> tuple[Patch, bool]:
        """Register a patch: on the session (no live run), on the live run, or applied now at its stop.
        With `run_id`, for that run only: once it has ended, RUN_ENDED (a patch meant for a run never becomes
        a session patch because a Continue won the race). Returns the patch and whether it was applied now."""
        name = name.strip()
        self._check_selector(selector, tokens)
        ivs = patching.interventions(self.adapter, name, op, selector, value, scalar, mean_over, tuple(tokens))
        if op == "copy_from_run":
            src = self._source_run(source_run_id)
            for iv in ivs:
                patching.bind_source(iv, src)
        patch = Patch(next(self._patch_ids), name, ivs, tokens=tuple(tokens))
        with self.cv:          # which run is live, and its state, are read under the lock that changes them
            run = self.current
            if run_id and (run is None or run.run_id != run_id or run.state not in ACTIVE):
                state = self.runs[run_id].state.value if run_id in self.runs else "not in this session"
                raise FailedPrecondition(f"run {run_id} is {state}, not live: the patch was not applied (patch "
                                         "without a run to patch the session's next runs)", reason="RUN_ENDED")
            if run is None or run.state not in ACTIVE:
                patch.scope = "session"
                self.patches.append(patch)
                return patch, False
            return self._patch_run(run, patch)

    def _check_selector(self, selector: Selector, tokens: tuple[int, ...]) -> None:
        """Every index of a patch within what a run of this server can have (INVALID_ARGUMENT otherwise)."""
        lim, info = self.limits, self.adapter.info
        positions = 2 * lim.max_prompt_tokens     # a prompt and at most as many generated tokens
        bounds.all_in_range("selector.batch", selector.batch, -lim.max_batch, lim.max_batch - 1)
        bounds.all_in_range("selector.positions", selector.positions, -positions, positions - 1,
                            "negatives count from each batch item's end")
        bounds.all_in_range("selector.heads", selector.heads, -info.n_heads, info.n_heads - 1)
        bounds.all_in_range("selector.neurons", selector.neurons, -info.d_mlp, info.d_mlp - 1)
        bounds.all_in_range("tokens", tokens, 0, lim.max_prompt_tokens, "generation steps")

    def _patch_run(self, run: DebugRun, patch: Patch) -> tuple[Patch, bool]:
        """A patch on the live run (under the lock): for sites still to come, or applied now when the run is
        stopped after a patched site."""
        if run.state is RunState.RUNNING:
            raise FailedPrecondition("the run is running: pause it (or set a breakpoint) before patching it",
                                     reason="RUNNING")
        stop = run.stop
        patch.scope = "run"
        now: list[Intervention] = []
        later_token = bool(patch.tokens) and min(patch.tokens) > run.token
        if not later_token and stop.site != "":      # not a later token's forward, not at a token boundary
            if patch.tokens and run.token not in patch.tokens:
                raise FailedPrecondition(f"generation step(s) {list(patch.tokens)} already ran (now at step "
                                         f"{run.token})", reason="SITE_ALREADY_RAN")
            now = [iv for iv in patch.interventions if patching.land(self.adapter, run, stop, iv)]
        run.hook_more(patch.hooks)
        if now:
            new = run.apply_now(now)
            if stop.value is not None and stop.value.shape == new.shape:
                stop.value = new   # the stop showed the site itself (not a unit's slice of it)
            patch.applied = True
        run.patches.append(patch)
        return patch, bool(now)

    def _source_run(self, source_run_id: str) -> DebugRun:
        src = self.run_for(source_run_id) if source_run_id else None
        if src is None:
            raise InvalidArgument("copy_from_run needs source_run_id", reason="BAD_PATCH")
        if src.state not in DONE:
            raise FailedPrecondition(f"source run {src.run_id} has not finished", reason="SOURCE_RUNNING")
        return src

    def clear_patches(self) -> int:
        """Drop the session's patches and those of its finished runs (their values are freed; the recording
        keeps at most a bounded copy, recording.py). A live run keeps its own until it ends."""
        with self.cv:
            n = len(self.patches)
            self.patches = []
            for run in self.runs.values():
                if run.state not in ACTIVE:
                    n += len(run.patches) if run is self.current else 0
                    run.patches = []
            return n

    # -- closing ---------------------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        with self.cv:
            if self.closed:
                return
            self.closed = True
            run = self.current
            if run is not None and run.state in ACTIVE:
                run.terminate_requested = True
                run.command = "terminate"
            self.cv.notify_all()
        if run is not None:
            run.finished.wait(timeout=30)
        self.events.emit("", Terminated(reason=reason))
        self.events.close()
        with self.cv:
            self.runs.clear()
            self.current = None
            self.patches = []


def _patch_info(p: Patch, scope: str) -> PatchInfo:
    return PatchInfo(patch_id=p.id, site=p.name, op=p.describe(), scope=scope, applied=p.applied)
