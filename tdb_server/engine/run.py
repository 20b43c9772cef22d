"""A run: one forward pass (or one `generate`) of a session, executing in a worker thread.

The worker executes the HF forward with the adapter's dispatcher hooks; at every hooked site the
adapter calls `DebugRun.on_site`, which applies patches, captures the value and asks stops.py whether
to stop (breakpoint, step, pause). To stop, the worker parks on the session's condition variable until
a control call (continue / step / terminate, session.py) hands it a command: the one-slot hand-off.
A parked run gives up its turn on the device (scheduler.py), so a paused session never blocks others.

An exception inside the model ends the run (state FAILED, a Stopped event with reason "exception"),
never the server.

A forward whose `logits` site is not hooked projects only the rows the result reads (each item's last
real position) onto the vocabulary: the rest of the [B, T, V] logits would be computed for nobody. A run
that hooks nothing runs with none of our hooks (the model's `logits_to_keep` takes the rows); a hooked
one has the adapter's unembedding hook take them while `logits` is not hooked (model/hooks.py).
"""

from __future__ import annotations

import inspect
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ResourceExhausted, TdbServerError
from ..limits import Limits
from ..model.interventions import Context, Intervention, apply_all
from ..model.sites import Unit, site_dims, site_kind, site_layer
from ..model.tokens import appended_text, decode_text
from ..sae.units import latent_value
from . import expr, stops
from .breakpoints import BreakpointSpec
from .env import make_env
from .events import EventLog, Output, RunExited, RunStarted, Terminated, TokenGenerated
from .patches import Patch
from .scheduler import DeviceScheduler
from .summary import summarize
from .types import GenOptions, RunResult, RunState, StopInfo, TokenProb, TopTokens, When


class RunTerminated(BaseException):
    """Raised inside the forward (from a site hook) to unwind a terminated run.

    A BaseException so that no `except Exception` inside model code swallows it."""


class RunHost(Protocol):
    """What a run needs of its session: the lock, the event log, the device and the breakpoints and
    session-scoped patches in force."""

    adapter: Any
    cv: threading.Condition
    events: EventLog
    scheduler: DeviceScheduler
    run_pool: ThreadPoolExecutor
    device: torch.device
    breakpoints: list[BreakpointSpec]
    patches: list[Patch]
    limits: Limits

    def next_stop_id(self) -> int: ...


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _shared_pool() -> ThreadPoolExecutor:
    """Workers for sessions made without a SessionManager (tests, embedding)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="tdb-run")
        return _POOL


@dataclass
class StopState:
    """The stop a run is parked at: what StopInfo reports, plus the live value and the references
    handed out at this stop (inspect.py)."""

    stop_id: int
    site: str
    when: When
    reason: str
    hit_ids: list[int]
    description: str
    value: torch.Tensor | None = None      # the site's (or unit's) value at an AFTER stop
    exception: str = ""
    token: int = 0
    refs: dict[int, Any] = field(default_factory=dict)

    def info(self) -> StopInfo:
        value = None if self.value is None else summarize(self.value, site_dims(site_kind(self.site)))
        return StopInfo(site=self.site, when=self.when, reason=self.reason, hit_breakpoint_ids=tuple(self.hit_ids),
                        description=self.description, stop_id=self.stop_id, exception=self.exception, value=value,
                        token=self.token)


def nonfinite(x: torch.Tensor) -> bool:
    """Does x hold a NaN or an Inf? Every hooked site asks, so first one reduction: NaN and Inf propagate
    through a float32 sum (+Inf and -Inf make NaN). Only when that sum is not finite, the exact test
    (finite values can overflow a sum). `isfinite(x).all()` alone writes a bool tensor the size of x:
    3 ms for a [1, 128, 3072] MLP activation on this CPU, against 0.1 ms for the sum."""
    return not math.isfinite(float(x.sum(dtype=torch.float32))) and not bool(torch.isfinite(x).all())


def _choose(gen: GenOptions, logits: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """The next token of each batch item from logits [B, V]: argmax, or a sample (temperature, top-k)."""
    if not gen.sample:
        return logits.argmax(-1)
    logits = logits / (gen.temperature or 1.0)
    if gen.top_k:
        kth = torch.topk(logits, min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=rng)[:, 0]


_STEPPED = {"into": "stepped into {site}", "over": "stepped over to {site}", "out": "stepped out to {site}",
            "token": "token step to {site}"}   # a stop's description, read after its reason ("step")


class DebugRun:
    """One forward pass of a session (the adapter's SiteHandler)."""

    def __init__(self, session: RunHost, run_id: str, input_ids: torch.Tensor, lengths: torch.Tensor,
                 capture: frozenset[str], sites: list[str], stop_on_entry: bool, gen: GenOptions | None = None,
                 fire: frozenset[str] | None = None, prepare: frozenset[str] = frozenset()):
        self.session, self.run_id = session, run_id
        self.gen = gen
        self.token = 0                                          # generation step of the current forward
        self.generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        self.input_ids, self.lengths = input_ids, lengths       # [B, T], [B]
        self.length_list: list[int] = lengths.tolist()
        self.capture = capture
        self.order = sites                                      # sites this run computes, in order
        self.sites = frozenset(sites) if fire is None else fire  # sites hooked (the adapter reads this)
        self.prepare = prepare                                  # readied for steps, not hooked (hooks.py)
        self.hook_run: Any = None                               # the adapter's Run, to hook more sites
        self.index = {s: i for i, s in enumerate(sites)}
        self.stop_on_entry = stop_on_entry
        self.state = RunState.RUNNING
        self.stop: StopState | None = None
        self.captured: dict[str, torch.Tensor] = {}
        self.z: dict[int, torch.Tensor] = {}                    # attn.z per layer (head units)
        self.last_fired = -1                                    # index in `order` of the last site run
        self.patches: list[Patch] = []                          # run-scoped (pending or applied)
        self.result: RunResult | None = None
        self.exception = ""
        self.warnings: list[str] = []                           # about the input (plan.input_warnings)
        self.logits: torch.Tensor | None = None                 # [B, V] at the last real position
        self.logits_rows: list[int] | None = None               # rows the unembedding takes (hooks.py)
        # control, guarded by session.cv
        self.command: str | None = None
        self.step: stops.Step | None = None                     # the step in progress
        self.pause_requested = False
        self.terminate_requested = False
        self.finished = threading.Event()                       # set when the worker is done with the run
        self.nonfinite_seen = False
        self.out_of_memory = False
        self.forced_stops: list[tuple[str, int]] = []           # replays: stop here as a pause did
        self._indexed: list[BreakpointSpec] | None = None       # the session's breakpoints, indexed by
        self._after: stops.BySite = {}                          # site in _after and _before
        self._before: stops.BySite = {}

    # -- the worker ------------------------------------------------------------------------------

    def start(self) -> None:
        self.session.run_pool.submit(self._work)

    def _work(self) -> None:
        s = self.session
        B, T = self.input_ids.shape
        s.events.emit(self.run_id, RunStarted(batch=B, seq_len=T))
        try:
            self._take_turn()
            if self.stop_on_entry and self.order:
                self._park(StopState(0, self.order[0], When.BEFORE, "entry", [],
                                     f"stopped on entry, before {self.order[0]}"))
            if self.gen is not None:
                self._generate()
            else:
                self._forward()
            self._finish(RunState.EXITED)
        except RunTerminated:
            self._finish(RunState.TERMINATED)
        except BaseException as e:  # an exception inside the model ends the run, not the server
            self.exception = f"{type(e).__name__}: {e}"
            if isinstance(e, (torch.OutOfMemoryError, MemoryError, ResourceExhausted)):
                self.out_of_memory = True
                self.captured.clear()            # free what this run held
                self.z.clear()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self._finish(RunState.FAILED)
        finally:
            self._give_turn()
            self.finished.set()

    def _forward(self) -> None:
        """One forward pass over the padded batch; keeps the logits at each item's last real position."""
        s, adapter = self.session, self.session.adapter
        B, T = self.input_ids.shape
        lengths = self.length_list
        mask = None
        if min(lengths) < T:
            mask = (torch.arange(T)[None, :] < self.lengths[:, None]).long().to(s.device)   # [B, T]
        last = sorted({n - 1 for n in lengths})                                             # rows the result reads
        ids = self.input_ids.to(s.device)
        # nothing hooked: the model's own logits_to_keep takes the rows the result reads and none of our hooks is
        # installed, yet the run is live (a pause hooks the rest of the forward, the sliced logits excepted);
        # hooked: our unembedding hook takes them unless the `logits` site is hooked by the time it runs
        keep = {} if self.sites else adapter.keep_logits(last)
        self.logits_rows = last if self.sites else None
        with torch.no_grad(), adapter.running(self) as hook_run:
            self.hook_run = hook_run
            hook_run.logits_sliced = bool(keep)
            out = adapter.model(input_ids=ids, attention_mask=mask, use_cache=False, **keep)
        logits = out.logits if hasattr(out, "logits") else out[0]          # [B, T, V], or [B, len(last), V]
        rows = [n - 1 for n in lengths] if logits.shape[1] == T else [last.index(n - 1) for n in lengths]
        self.logits = logits[torch.arange(B, device=logits.device), torch.tensor(rows, device=logits.device)].float()

    def _generate(self) -> None:
        """Token by token with the KV cache: each step is one forward pass over the new token only."""
        s, gen = self.session, self.gen
        adapter = s.adapter
        rng = torch.Generator(device=s.device).manual_seed(gen.seed) if gen.sample else None
        cur = self.input_ids.to(s.device)                 # [B, T] then [B, 1]
        past = None
        # transformers renamed past_key_values to cache (both exist across the 5.x versions we support)
        cache_arg = "cache" if "cache" in inspect.signature(adapter.model.forward).parameters else "past_key_values"
        done = torch.zeros(cur.shape[0], dtype=torch.bool, device=s.device)
        with torch.no_grad(), adapter.running(self) as hook_run:
            self.hook_run = hook_run
            for step in range(gen.max_new_tokens):
                self.token, self.last_fired = step, -1
                out = adapter.model(input_ids=cur, use_cache=True, **{cache_arg: past})
                past = out.get(cache_arg)
                logits = out.logits[:, -1].float()        # [B, V]
                self.logits = logits
                nxt = _choose(gen, logits, rng)           # [B]
                for b, t in enumerate(nxt.tolist()):
                    self.generated[b].append(t)
                texts = [adapter.token_texts([t])[0] for t in nxt.tolist()]
                appended = tuple(appended_text(adapter, toks) for toks in self.generated)
                s.events.emit(self.run_id, TokenGenerated(step=step, token_ids=tuple(nxt.tolist()), texts=tuple(texts),
                                                          appended=appended))
                if gen.stop_token_ids:
                    done |= torch.isin(nxt, torch.tensor(gen.stop_token_ids, device=nxt.device))
                if step == gen.max_new_tokens - 1 or bool(done.all()):
                    break
                self._maybe_stop_at_boundary(step, texts)
                cur = nxt[:, None]

    def _maybe_stop_at_boundary(self, step: int, texts: list[str]) -> None:
        """A token boundary is a step: stop here when asked (stop_at_tokens, or a step that runs to it)."""
        with self.session.cv:
            reach = stops.reaches_boundary(self.step)
            pause = self.pause_requested
            if ("", step) in self.forced_stops:
                self.forced_stops.remove(("", step))
                pause = True
        if self.gen.stop_at_tokens or reach or pause:
            reason = "pause" if pause else ("step" if reach else "token")
            self._park(StopState(0, "", When.AFTER, reason, [], f"token {step} generated: {texts[0]!r}", token=step))

    def _take_turn(self) -> None:
        self._ticket = self.session.scheduler.acquire()

    def _give_turn(self) -> None:
        ticket, self._ticket = getattr(self, "_ticket", None), None
        if ticket is not None:
            self.session.scheduler.release(ticket)

    def _finish(self, state: RunState) -> None:
        s = self.session
        self._give_turn()
        with s.cv:
            self.state = state
            self.stop = None
            if state is RunState.FAILED:
                self.stop = StopState(s.next_stop_id(), self.order[self.last_fired] if self.last_fired >= 0 else "",
                                      When.AFTER, "exception", [], f"exception: {self.exception}",
                                      exception=self.exception)
            self.result = self.build_result(top_k=10)
            if state is RunState.FAILED:
                s.events.emit(self.run_id, self.stop.info())
            if state is RunState.TERMINATED:
                s.events.emit(self.run_id, Terminated(reason="terminated"))
            s.events.emit(self.run_id, RunExited(result=self.result))
            self.patches = [p for p in self.patches if p.applied]
            s.cv.notify_all()

    def build_result(self, top_k: int = 10, include_logits: bool = False) -> RunResult:
        """Inputs, generated tokens and the top `top_k` next tokens at each item's last real position."""
        adapter = self.session.adapter
        lengths = self.length_list
        result = RunResult(run_id=self.run_id, state=self.state, exception=self.exception, lengths=list(lengths),
                           input_ids=[row[:n] for row, n in zip(self.input_ids.tolist(), lengths)])
        if self.gen is not None:
            result.generated = [list(toks) for toks in self.generated]
            result.generated_text = [decode_text(adapter, toks) for toks in self.generated]
        if self.logits is not None:
            k = min(top_k or 10, self.logits.shape[-1])
            top = torch.topk(self.logits, k, dim=-1)
            probs = torch.softmax(self.logits, dim=-1).gather(-1, top.indices).tolist()
            for b, (ids, logits) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                tokens = tuple(TokenProb(tid, text, lg, p)
                               for tid, text, lg, p in zip(ids, adapter.token_texts(ids), logits, probs[b]))
                result.top.append(TopTokens(batch_index=b, position=lengths[b] - 1, tokens=tokens))
            if include_logits:
                result.last_logits = self.logits
        return result

    # -- the site handler ------------------------------------------------------------------------

    def on_site(self, site: str, value: torch.Tensor) -> torch.Tensor | None:
        i = self.index.get(site)
        if i is None:
            return None
        if self.terminate_requested:
            raise RunTerminated()
        self.last_fired = i
        new = self._apply_patches(site, value)
        if not self.nonfinite_seen and new.is_floating_point() and nonfinite(new):
            self._report_nonfinite(site, new)
        self._keep(site, new)
        self._value = new
        stop = self._should_stop_after(site, new)
        if stop is not None:
            self._park(stop)
            new = self._value            # a patch at the stop replaces the value
            self._keep(site, new)
        if i + 1 < len(self.order):
            before = self._should_stop_before(self.order[i + 1])
            if before is not None:
                self._park(before)
        return None if new is value else new

    def _keep(self, site: str, value: torch.Tensor) -> None:
        """Capture the site's value if asked; keep attn.z of every layer (head units read it)."""
        if site.endswith(".attn.z"):
            self.z[site_layer(site)] = value
        if site in self.capture:
            self.captured[site] = value

    def _report_nonfinite(self, site: str, value: torch.Tensor) -> None:
        """Reported once per run: the first site where NaN/Inf appears."""
        self.nonfinite_seen = True
        self.session.events.emit(self.run_id, Output(
            category="warning", site=site,
            text=f"NaN/Inf first appears at {site} ({int(torch.isnan(value).sum())} NaN, "
                 f"{int(torch.isinf(value).sum())} Inf); set a breakpoint with condition 'any_nan' to stop there"))

    def _apply_patches(self, site: str, value: torch.Tensor) -> torch.Tensor:
        """The site's value after every patch in force here (model/interventions.py composes them)."""
        if not self.session.patches and not self.patches:
            return value
        patches = [p for p in (*self.session.patches, *self.patches) if p.at(site, self.token)]
        if not patches:
            return value
        for p in patches:
            p.applied = True
        return apply_all([iv for p in patches for iv in p.at(site, self.token)], value, self.context())

    def context(self) -> Context:
        """What an intervention needs of this forward: real lengths, the KV-cache offset, attn.z."""
        return Context(self.lengths, self.position_offset, self.z.get)

    def apply_now(self, interventions: list[Intervention]) -> torch.Tensor:
        """Apply interventions to the value of the site the run is stopped after (a patch at the stop)."""
        new = apply_all(interventions, self.current_value(), self.context())
        self._value = new
        if self.stop.site in self.capture:
            self.captured[self.stop.site] = new
        return new

    @property
    def position_offset(self) -> int:
        """Positions held in the KV cache before this forward's (generation steps after the first)."""
        return 0 if self.token == 0 else int(self.input_ids.shape[1]) + self.token - 1

    def _unit_value(self, unit: Unit | None, site: str, value: torch.Tensor) -> torch.Tensor:
        if unit is None:
            return value
        if unit.kind == "neuron":
            return value[..., unit.index]                # [B, T]
        if unit.kind == "latent":   # SAE latent: encode(site)[..., K] -> [B, T] (tdb_server/sae/units.py)
            return latent_value(self.session.adapter, site, unit.index, value)
        z = self.z.get(unit.layer)
        if z is None:
            return value
        # the head's write into attn.out: z [B, T, H, Dh][:, :, h] @ W_O[h] [Dh, D] -> [B, T, D]
        return z[:, :, unit.index, :].to(value.dtype) @ self.session.adapter.W_O(unit.layer)[unit.index].to(z.device)

    # -- stopping --------------------------------------------------------------------------------

    def _should_stop_after(self, site: str, value: torch.Tensor) -> StopState | None:
        s = self.session
        if s.breakpoints is not self._indexed:
            self._index_breakpoints()
        if site in self._after:
            hit, stop_value, errors = self._breakpoint_hits(site, value)
            if hit:
                return StopState(0, site, When.AFTER, "breakpoint", hit, f"breakpoint {hit} at {site}",
                                 value=stop_value)
            if errors:   # the user must see it, but never as if the condition held
                return StopState(0, site, When.AFTER, "condition error", [], errors[0], value=value,
                                 exception=errors[0])
        if self.step is None and not self.pause_requested and not self.forced_stops:
            return None     # (read without the lock: a request that lands now applies from the next site)
        with s.cv:
            step, pause = self.step, self.pause_requested
            forced = (site, self.token) in self.forced_stops
            if forced:
                self.forced_stops.remove((site, self.token))
        if pause or forced:
            return StopState(0, site, When.AFTER, "pause", [], f"paused at {site}", value=value)
        if step is not None and stops.step_done(step, site, self.order):
            return StopState(0, site, When.AFTER, "step", [], _STEPPED[step[0]].format(site=site or "the token boundary"), value=value)
        return None

    def _index_breakpoints(self) -> None:
        """Index the session's breakpoints by site (set_breakpoints replaces the list: once per list)."""
        bps = self.session.breakpoints
        self._indexed = bps
        self._after, self._before = stops.by_site(bps, When.AFTER), stops.by_site(bps, When.BEFORE)

    def _breakpoint_hits(self, site: str, value: torch.Tensor) -> tuple[list[int], torch.Tensor, list[str]]:
        """The AFTER breakpoints that stop at `site` (log points log instead), the value to show, and the
        errors of conditions that could not be evaluated here."""
        adapter = self.session.adapter
        hit: list[int] = []
        errors: list[str] = []
        stop_value = value
        for bp in stops.armed(self._after, site, self.token):
            v = self._unit_value(bp.unit, site, value)
            latent = bp.unit is not None and bp.unit.kind == "latent"
            if latent and bp.condition_ast is None and not bool((v > 0).any()):
                continue   # a latent breakpoint without a condition stops where the latent fires
            env = make_env(adapter, self, value=v, site=site)
            if bp.condition_ast is not None:
                holds = self._condition_holds(bp, env, site)
                if isinstance(holds, str):
                    errors.append(holds)
                if holds is not True:
                    continue
            if not stops.count_hit(bp) or self._logged(bp, env, site):
                continue
            hit.append(bp.id)
            if bp.unit is not None:
                stop_value = v
        return hit, stop_value, errors

    def _condition_holds(self, bp: BreakpointSpec, env: expr.Env, site: str) -> bool | str:
        """Whether the condition holds here, or the message of why it could not be evaluated."""
        try:
            return expr._truth(expr.evaluate(bp.condition_ast, env))
        except TdbServerError as e:
            if isinstance(e, ResourceExhausted) and e.reason != "EXPR_TOO_LARGE":
                raise             # out of memory: the run fails (and the request says so)
            # a condition over the expression budget was refused before allocating: a condition error
            message = f"breakpoint {bp.id} condition {bp.condition!r} could not be evaluated at {site}: {e.message}"
            self.session.events.emit(self.run_id, Output(category="stderr", site=site, text=message))
            return message

    def _logged(self, bp: BreakpointSpec, env: expr.Env, site: str) -> bool:
        """A log point logs its message (an Output event) instead of stopping."""
        if not bp.log_message:
            return False
        self.session.events.emit(self.run_id, Output(category="console", site=site,
                                                     text=expr.format_template(bp.log_message, env)))
        return True

    def _logged_before(self, bp: BreakpointSpec) -> bool:
        """A BEFORE log point logs (its site has no value yet) instead of stopping."""
        if not bp.log_message:
            return False
        return self._logged(bp, make_env(self.session.adapter, self, value=None, site=bp.sites[0]), bp.sites[0])

    def _should_stop_before(self, site: str) -> StopState | None:
        if self.session.breakpoints is not self._indexed:     # replaced while the run was parked
            self._index_breakpoints()
        if site not in self._before:
            return None
        hit = [bp.id for bp in stops.armed(self._before, site, self.token)
               if stops.count_hit(bp) and not self._logged_before(bp)]
        if hit:
            return StopState(0, site, When.BEFORE, "breakpoint", hit, f"breakpoint {hit} before {site}")
        return None

    def _park(self, stop: StopState) -> None:
        """Stop here: report Stopped and wait for continue / step / terminate."""
        s = self.session
        with s.cv:
            if self.terminate_requested:
                raise RunTerminated()
            stop.stop_id = s.next_stop_id()
            stop.token = self.token
            self.stop, self.state = stop, RunState.PAUSED
            self.step, self.pause_requested, self.command = None, False, None
            s.events.emit(self.run_id, stop.info())   # before anyone can see PAUSED and resume
            s.cv.notify_all()
        self._give_turn()                            # a paused run never blocks the others
        with s.cv:
            while self.command is None:
                s.cv.wait()
            cmd, self.command = self.command, None
            if cmd == "terminate":
                raise RunTerminated()
        self._take_turn()

    def hook_more(self, sites: set[str] | frozenset[str] | None = None) -> None:
        """Hook more sites of this live run (all it computes by default): stepping and pausing need them."""
        want = (frozenset(self.order) if sites is None else frozenset(sites) & frozenset(self.order)) - self.sites
        if want and self.hook_run is not None:
            self.hook_run.add_sites(want)
            self.sites = self.sites | want

    def current_value(self) -> torch.Tensor | None:
        return getattr(self, "_value", None)
