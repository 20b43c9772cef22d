"""Debug sessions: a small state machine per session, and a forward pass per run in a worker thread.

States of a run: RUNNING -> PAUSED -> RUNNING ... -> EXITED | TERMINATED | FAILED.
The worker thread executes the HF forward with the adapter's dispatcher hooks; at every site it
calls `DebugRun.on_site`, which applies patches, captures the value, and decides whether to stop
(breakpoint, step, pause). To stop, the worker parks on the session's condition variable until a
control call (continue / step / terminate) hands it a command — the one-slot hand-off.

All state of a session is guarded by one lock (`Session.cv`). References handed to clients (frame
ids, variables references) carry the stop id, so a reference from before a resume is rejected with
ABORTED instead of silently pointing at a different value.
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tdb.v1 import debugger_pb2 as pb

from .. import wire
from ..analyses.inputs import Prompt, encode
from ..errors import Aborted, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, TdbServerError
from ..limits import Limits
from ..model.sites import SiteError, enclosing, expand_glob, parse_site, site_shape
from . import expr, weights
from .breakpoints import BreakpointSpec, Unit, hit_matches, parse_hit_condition, parse_unit, unit_site
from .events import EventLog
from .patches import PatchSpec, Selector, apply, apply_head, site_kind
from .scheduler import scheduler_for

BOUNDARY = -2          # step start index meaning "from a token boundary"
REF_SHIFT = 20          # references = stop_id << REF_SHIFT | index
KEEP_RUNS = 8           # finished runs kept per session (for reads and copy_from_run)
DEFAULT_WAIT_S = 60.0


class RunTerminated(BaseException):
    """Raised inside the forward (from a site hook) to unwind a terminated run.

    A BaseException so that no `except Exception` inside model code swallows it."""


_STATE_NAMES = {pb.IDLE: "idle", pb.RUNNING: "running", pb.PAUSED: "paused", pb.EXITED: "exited",
                pb.TERMINATED: "terminated", pb.FAILED: "failed"}
_DONE = (pb.EXITED, pb.TERMINATED, pb.FAILED)


def site_dims(kind: str) -> list[str]:
    return {
        "attn.q": ["batch", "pos", "head", "d_head"], "attn.k": ["batch", "pos", "kv_head", "d_head"],
        "attn.v": ["batch", "pos", "kv_head", "d_head"], "attn.z": ["batch", "pos", "head", "d_head"],
        "attn.pattern": ["batch", "head", "query_pos", "key_pos"], "mlp.pre": ["batch", "pos", "neuron"],
        "mlp.post": ["batch", "pos", "neuron"], "logits": ["batch", "pos", "vocab"],
    }.get(kind, ["batch", "pos", "d_model"])


@dataclass
class GenOptions:
    """Generation settings of a run (max_new_tokens > 0)."""

    max_new_tokens: int
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_at_tokens: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class StopState:
    stop_id: int
    site: str
    when: int
    reason: str
    hit_ids: list[int]
    description: str
    value: torch.Tensor | None = None      # the site's (or unit's) value at an AFTER stop
    exception: str = ""
    token: int = 0
    refs: dict[int, Any] = field(default_factory=dict)

    def to_proto(self) -> pb.StopInfo:
        msg = pb.StopInfo(site=self.site, when=self.when, reason=self.reason, hit_breakpoint_ids=self.hit_ids,
                          description=self.description, stop_id=self.stop_id, exception=self.exception,
                          token=self.token)
        if self.value is not None:
            msg.value.CopyFrom(wire.summarize(self.value, site_dims(site_kind(self.site))))
        return msg


class DebugRun:
    """One forward pass of a session (the adapter's SiteHandler)."""

    def __init__(self, session: "Session", run_id: str, input_ids: torch.Tensor, lengths: torch.Tensor,
                 capture: frozenset[str], sites: list[str], stop_on_entry: bool, gen: GenOptions | None = None,
                 fire: frozenset[str] | None = None):
        self.session, self.run_id = session, run_id
        self.gen = gen
        self.token = 0                                          # generation step of the current forward
        self.generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        self.input_ids, self.lengths = input_ids, lengths       # [B, T], [B]
        self.capture = capture
        self.order = sites                                      # sites this run computes, in order
        self.sites = frozenset(sites) if fire is None else fire  # sites hooked (the adapter reads this)
        self.hook_run: Any = None                               # the adapter's Run, to hook more sites
        self.index = {s: i for i, s in enumerate(sites)}
        self.stop_on_entry = stop_on_entry
        self.state = pb.RUNNING
        self.stop: StopState | None = None
        self.captured: dict[str, torch.Tensor] = {}
        self.z: dict[int, torch.Tensor] = {}                    # attn.z per layer (head units)
        self.last_fired = -1                                    # index in `order` of the last site run
        self.patches: list[PatchSpec] = []                      # run-scoped (pending or applied)
        self.result: pb.RunResult | None = None
        self.exception = ""
        self.logits: torch.Tensor | None = None                 # [B, V] at the last real position
        # control, guarded by session.cv
        self.command: str | None = None
        self.step: tuple[str, int] | None = None                # (kind, index of the stop it started from)
        self.pause_requested = False
        self.terminate_requested = False
        self.finished = threading.Event()                       # set when the worker is done with the run
        self.nonfinite_seen = False
        self.out_of_memory = False
        self.forced_stops: list[tuple[str, int]] = []           # replays: stop here as a pause did

    # -- the worker ------------------------------------------------------------------------------

    def start(self) -> None:
        self.session.run_pool.submit(self._work)

    def _work(self) -> None:
        s = self.session
        adapter = s.adapter
        B, T = self.input_ids.shape
        s.events.emit(self.run_id, run_started=pb.RunStarted(batch=B, seq_len=T))
        try:
            self._take_turn()
            if self.stop_on_entry and self.order:
                self._park(StopState(0, self.order[0], pb.BEFORE, "entry", [], f"stopped on entry, before {self.order[0]}"))
            if self.gen is not None:
                self._generate()
            else:
                mask = None
                if bool((self.lengths < T).any()):
                    mask = (torch.arange(T)[None, :] < self.lengths[:, None]).long().to(s.device)
                with torch.no_grad(), adapter.running(self) as hook_run:
                    self.hook_run = hook_run
                    out = adapter.model(input_ids=self.input_ids.to(s.device), attention_mask=mask, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                idx = (self.lengths - 1).to(logits.device)
                self.logits = logits[torch.arange(B, device=logits.device), idx].float()   # [B, V]
            self._finish(pb.EXITED)
        except RunTerminated:
            self._finish(pb.TERMINATED)
        except BaseException as e:  # an exception inside the model ends the run, not the server
            self.exception = f"{type(e).__name__}: {e}"
            if isinstance(e, (torch.OutOfMemoryError, MemoryError, ResourceExhausted)):
                self.out_of_memory = True
                self.captured.clear()            # free what this run held
                self.z.clear()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self._finish(pb.FAILED)
        finally:
            self._give_turn()
            self.finished.set()

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
                nxt = self._choose(logits, rng)           # [B]
                for b, t in enumerate(nxt.tolist()):
                    self.generated[b].append(t)
                texts = [self.session.decode([t])[0] for t in nxt.tolist()]
                s.events.emit(self.run_id, token=pb.TokenGenerated(step=step, token_ids=nxt.tolist(), texts=texts))
                if gen.stop_token_ids:
                    done |= torch.isin(nxt, torch.tensor(gen.stop_token_ids, device=nxt.device))
                last = step == gen.max_new_tokens - 1 or bool(done.all())
                if not last:
                    self._maybe_stop_at_boundary(step, texts)
                if last:
                    break
                cur = nxt[:, None]

    def _choose(self, logits: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        gen = self.gen
        if not gen.sample:
            return logits.argmax(-1)
        logits = logits / (gen.temperature or 1.0)
        if gen.top_k:
            kth = torch.topk(logits, min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=rng)[:, 0]

    def _maybe_stop_at_boundary(self, step: int, texts: list[str]) -> None:
        """A token boundary is a step: stop here when asked (stop_at_tokens, or a step that runs to it)."""
        with self.session.cv:
            pending = self.step
            pause = self.pause_requested
            if ("", step) in self.forced_stops:
                self.forced_stops.remove(("", step))
                pause = True
        reach = pending is not None and pending[0] in ("token", "over", "out")
        if self.gen.stop_at_tokens or reach or pause:
            reason = "pause" if pause else ("step" if reach else "token")
            self._park(StopState(0, "", pb.AFTER, reason, [], f"token {step} generated: {texts[0]!r}",
                                 token=step))

    def _take_turn(self) -> None:
        self._ticket = self.session.scheduler.acquire()

    def _give_turn(self) -> None:
        ticket, self._ticket = getattr(self, "_ticket", None), None
        if ticket is not None:
            self.session.scheduler.release(ticket)

    def _finish(self, state: int) -> None:
        s = self.session
        self._give_turn()
        with s.cv:
            self.state = state
            if state == pb.FAILED:
                self.stop = StopState(s.next_stop_id(), self.order[self.last_fired] if self.last_fired >= 0 else "",
                                      pb.AFTER, "exception", [], f"exception: {self.exception}", exception=self.exception)
            else:
                self.stop = None
            self.result = s.build_result(self, top_k=10)
            if state == pb.FAILED:
                s.events.emit(self.run_id, stopped=self.stop.to_proto())
            if state == pb.TERMINATED:
                s.events.emit(self.run_id, terminated=pb.Terminated(reason="terminated"))
            s.events.emit(self.run_id, run_exited=pb.RunExited(result=self.result))
            self.patches = [p for p in self.patches if p.applied]
            s.cv.notify_all()

    # -- the site handler ------------------------------------------------------------------------

    def on_site(self, site: str, value: torch.Tensor) -> torch.Tensor | None:
        s = self.session
        i = self.index.get(site)
        if i is None:
            return None
        if self.terminate_requested:
            raise RunTerminated()
        self.last_fired = i
        new = self._apply_patches(site, value)
        if not self.nonfinite_seen and new.is_floating_point() and not bool(torch.isfinite(new).all()):
            self.nonfinite_seen = True   # reported once per run: the first site where NaN/Inf appears
            s.events.emit(self.run_id, output=pb.Output(
                category="warning", site=site,
                text=f"NaN/Inf first appears at {site} ({int(torch.isnan(new).sum())} NaN, "
                     f"{int(torch.isinf(new).sum())} Inf); set a breakpoint with condition 'any_nan' to stop there"))
        kind = site_kind(site)
        if kind == "attn.z":
            self.z[int(site.split(".")[1])] = new
        if site in self.capture:
            self.captured[site] = new
        self._value = new
        stop = self._should_stop_after(site, new)
        if stop is not None:
            self._park(stop)
            new = self._value            # a patch at the stop replaces the value
            if site in self.capture:
                self.captured[site] = new
            if kind == "attn.z":
                self.z[int(site.split(".")[1])] = new
        if i + 1 < len(self.order):
            nxt = self.order[i + 1]
            before = self._should_stop_before(nxt)
            if before is not None:
                self._park(before)
        return None if new is value else new

    def _apply_patches(self, site: str, value: torch.Tensor) -> torch.Tensor:
        specs = [p for p in (*self.session.patches, *self.patches)
                 if p.site == site and (not p.tokens or self.token in p.tokens)]
        # units first (a head's write, an SAE latent: parts of the site's value), then whole-site patches,
        # which act on the result: zeroing attn.out and a head of it leaves zero, as in the Ablate analysis
        specs.sort(key=lambda p: p.head is None and getattr(p, "latent", None) is None)
        for p in specs:
            value = _apply_spec(self.session.adapter, p, value, self.z, self.lengths, self.position_offset)
            p.applied = True
        return value

    @property
    def position_offset(self) -> int:
        """Positions held in the KV cache before this forward's (generation steps after the first)."""
        return 0 if self.token == 0 else int(self.input_ids.shape[1]) + self.token - 1

    def _unit_value(self, unit: Unit | None, site: str, value: torch.Tensor) -> torch.Tensor:
        if unit is None:
            return value
        if unit.kind == "neuron":
            return value[..., unit.index]
        if unit.kind == "latent":   # SAE latent: encode(site)[..., K] -> [B, T] (tdb_server/sae/units.py)
            from ..sae.units import latent_value
            return latent_value(self.session.adapter, site, unit.index, value)
        z = self.z.get(unit.layer)
        if z is None:
            return value
        return z[:, :, unit.index, :].to(value.dtype) @ self.session.adapter.W_O(unit.layer)[unit.index].to(z.device)

    def _should_stop_after(self, site: str, value: torch.Tensor) -> StopState | None:
        s = self.session
        hit: list[int] = []
        stop_value = value
        for bp in s.breakpoints:
            if bp.when != pb.AFTER or site not in bp.sites or not bp.verified or not bp.in_tokens(self.token):
                continue
            v = self._unit_value(bp.unit, site, value)
            if bp.unit is not None and bp.unit.kind == "latent" and bp.condition_ast is None and not bool((v > 0).any()):
                continue   # a latent breakpoint without a condition stops where the latent fires
            env = s.make_env(self, value=v, site=site)
            if bp.condition_ast is not None:
                try:
                    ok = expr._truth(expr.evaluate(bp.condition_ast, env))
                except ResourceExhausted:
                    raise                 # out of memory: the run fails (and the request says so)
                except TdbServerError as e:
                    s.events.emit(self.run_id, output=pb.Output(category="stderr", site=site,
                                                                text=f"breakpoint {bp.id} condition error: {e.message}"))
                    ok = True  # stop so the user sees the problem
                if not ok:
                    continue
            bp.hits += 1
            if not hit_matches(bp.hit_condition, bp.hits):
                continue
            if bp.log_message:
                text = expr.format_template(bp.log_message, env)
                s.events.emit(self.run_id, output=pb.Output(category="console", site=site, text=text))
                continue
            hit.append(bp.id)
            if bp.unit is not None:
                stop_value = v
        if hit:
            return StopState(0, site, pb.AFTER, "breakpoint", hit, f"breakpoint {hit} at {site}", value=stop_value)
        with s.cv:
            step, pause = self.step, self.pause_requested
            forced = (site, self.token) in self.forced_stops
            if forced:
                self.forced_stops.remove((site, self.token))
        if pause or forced:
            return StopState(0, site, pb.AFTER, "pause", [], f"paused at {site}", value=value)
        if step is not None and self._step_done(step, site):
            return StopState(0, site, pb.AFTER, "step", [], f"step {step[0]} to {site}", value=value)
        return None

    def _should_stop_before(self, site: str) -> StopState | None:
        hit = [bp.id for bp in self.session.breakpoints
               if bp.when == pb.BEFORE and bp.verified and site in bp.sites and bp.in_tokens(self.token)
               and self._count_hit(bp)]
        if hit:
            return StopState(0, site, pb.BEFORE, "breakpoint", hit, f"breakpoint {hit} before {site}")
        return None

    def _count_hit(self, bp: BreakpointSpec) -> bool:
        bp.hits += 1
        if not hit_matches(bp.hit_condition, bp.hits):
            return False
        if bp.log_message:
            env = self.session.make_env(self, value=None, site=bp.sites[0])
            self.session.events.emit(self.run_id, output=pb.Output(
                category="console", site=bp.sites[0], text=expr.format_template(bp.log_message, env)))
            return False
        return True

    def _step_done(self, step: tuple[str, int], site: str) -> bool:
        kind, start = step
        if kind == "token" or start == BOUNDARY:
            return kind == "into"   # from a token boundary, into = the first site of the next forward
        start_site = self.order[start] if 0 <= start < len(self.order) else ""
        if kind == "into":
            return True
        start_scopes = enclosing(start_site) if start_site else ()
        if kind == "over":
            # past the current block: the first site outside the block the step started in
            block = start_scopes[0] if start_scopes else None
            return block is None or not site.startswith(block + ".")
        # out: the end of the enclosing module (attn -> attn.out, mlp -> mlp.out, block -> resid_post,
        # model -> logits); from a module's last site, one level up.
        return site == self._step_out_target(start_site)

    def _step_out_target(self, start_site: str) -> str:
        scopes = list(enclosing(start_site)) if start_site else []
        while True:
            scope = scopes[-1] if scopes else ""
            end = self._scope_end(scope)
            if end != start_site or not scopes:
                return end
            scopes.pop()

    def _scope_end(self, scope: str) -> str:
        inside = [x for x in self.order if x.startswith(scope + ".")] if scope else self.order
        return inside[-1] if inside else self.order[-1]

    def _park(self, stop: StopState) -> None:
        """Stop here: report Stopped and wait for continue / step / terminate."""
        s = self.session
        with s.cv:
            if self.terminate_requested:
                raise RunTerminated()
            stop.stop_id = s.next_stop_id()
            stop.token = self.token
            self.stop, self.state = stop, pb.PAUSED
            self.step, self.pause_requested, self.command = None, False, None
            s.events.emit(self.run_id, stopped=stop.to_proto())   # before anyone can see PAUSED and resume
            s.cv.notify_all()
        self._give_turn()                                           # a paused run never blocks the others
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


class Session:
    """A client's debugging context: breakpoints, session-scoped patches, runs and events."""

    def __init__(self, adapter: Any, session_id: str, name: str, idle_timeout_s: float, event_capacity: int = 4096,
                 limits: Limits | None = None, total_captured: Callable[[], int] | None = None,
                 run_pool: ThreadPoolExecutor | None = None):
        self.adapter, self.id, self.name = adapter, session_id, name
        # Runs execute on long-lived pool threads: a new OS thread per run would leave per-thread native
        # buffers (BLAS/OpenMP) behind at every run.
        self.run_pool = run_pool or _shared_pool()
        self.limits = limits or Limits()
        self._total_captured = total_captured or (lambda: self.captured_bytes())
        self.idle_timeout_s = idle_timeout_s
        self.cv = threading.Condition()
        self.events = EventLog(event_capacity)
        self.breakpoints: list[BreakpointSpec] = []
        self.patches: list[PatchSpec] = []                   # session-scoped
        self.runs: OrderedDict[str, DebugRun] = OrderedDict()
        self.current: DebugRun | None = None
        self.last_activity = time.monotonic()
        self.streams = 0
        self.closed = False
        self.recording: list[dict[str, Any]] = []             # actions, for ExportRecording
        self._forced: list[tuple[str, int]] = []
        self.device = weights.device(adapter)
        self.scheduler = scheduler_for(adapter)
        self._stop_ids = itertools.count(1)
        self._patch_ids = itertools.count(1)
        self._run_ids = itertools.count(1)
        self._ref_ids = itertools.count(1)

    # -- helpers ---------------------------------------------------------------------------------

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def next_stop_id(self) -> int:
        return next(self._stop_ids)

    @property
    def all_sites(self) -> list[str]:
        return list(self.adapter.info.sites)

    def _parse_site(self, name: str) -> str:
        return parse_site(name, self.adapter.info.n_layers).name

    def _check_unit(self, unit: Unit) -> None:
        info = self.adapter.info
        if not 0 <= unit.layer < info.n_layers:
            raise SiteError(f"layer {unit.layer} out of range: the model has {info.n_layers} layers")
        if unit.kind == "latent":   # an SAE must be attached at the site (tdb_server/sae/units.py)
            from ..sae.units import check_latent
            self._parse_site(unit.site)
            check_latent(self.adapter, unit.site, unit.index)
            return
        limit = info.n_heads if unit.kind == "head" else info.d_mlp
        if not 0 <= unit.index < limit:
            raise SiteError(f"{unit.kind} {unit.index} out of range: layer {unit.layer} has {limit} {unit.kind}s")

    def captured_bytes(self) -> int:
        """Bytes of activations this session holds (its current and retained runs)."""
        with self.cv:
            return self._captured_bytes_unlocked()

    def _captured_bytes_unlocked(self) -> int:
        return sum(t.numel() * t.element_size() for run in self.runs.values() for t in run.captured.values())

    def _estimate_capture(self, sites: frozenset[str], batch: int, seq: int) -> int:
        info = self.adapter.info
        itemsize = torch.empty((), dtype=getattr(torch, info.dtype, torch.float32)).element_size()
        total = 0
        for site in sites:
            try:
                shape = site_shape(site, info, batch, seq)
            except Exception:  # noqa: BLE001 - an unknown shape counts as a residual stream
                shape = (batch, seq, info.d_model)
            n = 1
            for d in shape:
                n *= int(d)
            total += n * itemsize
        return total

    def _reserve_capture(self, sites: frozenset[str], batch: int, seq: int) -> None:
        """Refuse a launch whose captures would not fit the memory budgets (after dropping old runs)."""
        need = self._estimate_capture(sites, batch, seq)
        lim = self.limits
        if need > lim.session_capture_bytes:
            raise ResourceExhausted(
                f"capturing {len(sites)} sites for batch {batch} x {seq} tokens needs {need / 2**20:.1f} MiB; this "
                f"session may hold {lim.session_capture_bytes / 2**20:.1f} MiB: capture fewer sites (launch "
                "capture=[...]) or send fewer tokens", reason="CAPTURE_BUDGET")
        with self.cv:   # drop the oldest finished runs until the new one fits
            while self.runs and self._captured_bytes_unlocked() + need > lim.session_capture_bytes:
                oldest = next(iter(self.runs))
                if self.runs[oldest] is self.current and self.current.state not in _DONE:
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

    # -- breakpoints -----------------------------------------------------------------------------

    def set_breakpoints(self, requested: list[pb.Breakpoint]) -> list[BreakpointSpec]:
        specs = []
        verified_sites = set(self.adapter.verified_sites)
        for i, bp in enumerate(requested, start=1):
            name = bp.site.strip()
            if bp.when not in (pb.AFTER, pb.BEFORE):
                raise InvalidArgument(f"breakpoint {i}: 'when' must be AFTER or BEFORE", reason="BAD_BREAKPOINT")
            spec = BreakpointSpec(id=i, name=name, when=bp.when, sites=[], condition=bp.condition,
                                  hit_condition=parse_hit_condition(bp.hit_condition), log_message=bp.log_message)
            if bp.HasField("tokens"):
                if not 0 <= bp.tokens.first <= bp.tokens.last:
                    raise InvalidArgument(f"breakpoint {i}: token range {bp.tokens.first}..{bp.tokens.last} is empty or "
                                          "negative", reason="BAD_BREAKPOINT")
                spec.tokens = (bp.tokens.first, bp.tokens.last)
            if bp.condition:
                if bp.when == pb.BEFORE:
                    raise InvalidArgument(f"breakpoint {i} ({name}): a condition needs the value, which does not "
                                          "exist before the site runs; use when=AFTER", reason="BAD_CONDITION")
                spec.condition_ast = expr.parse(bp.condition)
            try:
                if any(c in name for c in "*?["):
                    spec.sites = expand_glob(name, self.all_sites)
                    if not spec.sites:
                        raise SiteError(f"no site matches {name!r}")
                elif (unit := parse_unit(name)) is not None:
                    self._check_unit(unit)
                    spec.unit, spec.sites = unit, [unit_site(unit)]
                else:
                    spec.sites = [self._parse_site(name)]
            except SiteError as e:
                spec.verified, spec.message = False, e.message
            else:
                missing = [x for x in spec.sites if x not in verified_sites]
                if missing and len(missing) == len(spec.sites):
                    spec.verified = False
                    spec.message = f"{missing[0]} is never reached by a forward pass of this model"
                spec.sites = [x for x in spec.sites if x in verified_sites]
            specs.append(spec)
        with self.cv:
            # an IDE sends the whole set again whenever one breakpoint changes: the others keep their hit
            # counts in the current run (a hit condition like ">= 3" must not start over)
            old = {_bp_key(bp): bp.hits for bp in self.breakpoints}
            for bp in specs:
                bp.hits = old.get(_bp_key(bp), 0)
            self.breakpoints = specs
        run = self.current
        if run is not None and run.state in (pb.RUNNING, pb.PAUSED):
            run.hook_more({x for bp in specs for x in bp.sites}
                          | {f"blocks.{bp.unit.layer}.attn.z" for bp in specs if bp.unit is not None and bp.unit.kind == "head"})
            for bp in specs:   # a breakpoint may ask for a site the run does not fire (attn.pattern)
                extra = [x for x in bp.sites if x not in run.sites]
                if extra:
                    bp.message = (f"{extra[0]} is not computed in the current run; the breakpoint applies from the "
                                  "next launch")
        return specs

    # -- runs ------------------------------------------------------------------------------------

    def _encode(self, prompts: list[str], token_ids: list[list[int]], prepend_bos: bool) -> list[list[int]]:
        if prompts and token_ids:
            raise InvalidArgument("give prompts or token_ids, not both", reason="BAD_INPUT")
        if not prompts and not token_ids:
            raise InvalidArgument("nothing to run: give a prompt or token ids", reason="BAD_INPUT")
        items = [Prompt(p, (), prepend_bos) for p in prompts] or [Prompt("", tuple(ids), prepend_bos) for ids in token_ids]
        if len(items) > self.limits.max_batch:
            raise InvalidArgument(f"batch of {len(items)} sequences; this server takes at most {self.limits.max_batch}",
                                  reason="BATCH_TOO_LARGE")
        return [encode(self.adapter, p, f"sequence {b}", self.limits.max_prompt_tokens) for b, p in enumerate(items)]

    def launch(self, prompts: list[str], token_ids: list[list[int]], prepend_bos: bool, capture: list[str],
               stop_on_entry: bool, gen: GenOptions | None = None) -> DebugRun:
        seqs = self._encode(prompts, token_ids, prepend_bos)
        if gen is not None:
            self._check_generation(gen, seqs)
        with self.cv:
            if self.current is not None and self.current.state in (pb.RUNNING, pb.PAUSED):
                raise FailedPrecondition(f"run {self.current.run_id} is still {_STATE_NAMES[self.current.state]}: "
                                         "continue or terminate it first", reason="RUN_ACTIVE")
        verified = self.adapter.verified_order
        capture_all = not capture
        if capture == ["none"]:
            capture_set: frozenset[str] = frozenset()
        elif capture:
            cap: set[str] = set()
            for c in capture:
                cap.update(expand_glob(c, verified) if any(ch in c for ch in "*?[") else [self._parse_site(c)])
            capture_set = frozenset(cap)
        else:
            capture_set = frozenset(verified)
        bp_sites = {x for bp in self.breakpoints for x in bp.sites}
        pending_sites = {p.site for p in self.patches}
        asked = capture_set | bp_sites | pending_sites   # attention patterns are computed only when asked for
        sites = [x for x in verified if x in asked or not x.endswith(".attn.pattern")]
        # Hooks only where something is asked: captures, breakpoints (and the site before a BEFORE one),
        # patches (and attn.z for head units). Stepping or pausing hooks the rest of the run on demand.
        if capture_all or stop_on_entry:
            fire = set(sites)
        else:
            fire = set(capture_set) | bp_sites | pending_sites
            fire |= {f"blocks.{p.site.split('.')[1]}.attn.z" for p in self.patches if p.head is not None}
            fire |= {f"blocks.{bp.unit.layer}.attn.z" for bp in self.breakpoints
                     if bp.unit is not None and bp.unit.kind == "head"}
            if any(bp.verified for bp in self.breakpoints):
                # a stop may be followed by steps, which need resid_mid: the adapter derives it from the
                # block's input, which it only records when resid_mid is hooked before the block starts
                fire |= {x for x in sites if site_kind(x) == "resid_mid"}
            for bp in self.breakpoints:
                if bp.when == pb.BEFORE:
                    fire |= {sites[sites.index(x) - 1] for x in bp.sites if x in sites and sites.index(x) > 0}
            fire &= set(sites)
        T = max(len(x) for x in seqs)
        self._reserve_capture(capture_set, len(seqs), T)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, x in enumerate(seqs):
            ids[b, :len(x)] = torch.tensor(x)
        lengths = torch.tensor([len(x) for x in seqs])
        run = DebugRun(self, f"r{next(self._run_ids)}", ids, lengths, capture_set, sites, stop_on_entry, gen,
                       fire=frozenset(fire))
        run.forced_stops, self._forced = self._forced, []
        for bp in self.breakpoints:
            bp.hits = 0
        for p in self.patches:
            p.applied = False
        with self.cv:
            self.current = run
            self.runs[run.run_id] = run
            while len(self.runs) > KEEP_RUNS:
                old_id, old = next(iter(self.runs.items()))
                if old is self.current:
                    break
                del self.runs[old_id]
        run.start()
        return run

    def _check_generation(self, gen: GenOptions, seqs: list[list[int]]) -> None:
        if not 0 < gen.max_new_tokens <= self.limits.max_prompt_tokens:
            raise InvalidArgument(f"max_new_tokens must be in 1..{self.limits.max_prompt_tokens}", reason="BAD_GENERATE")
        if len({len(x) for x in seqs}) > 1:
            raise InvalidArgument("generation needs sequences of equal length (no padding)", reason="BAD_GENERATE")
        max_pos = weights.max_positions(self.adapter)
        if max_pos and len(seqs[0]) + gen.max_new_tokens > max_pos:
            raise InvalidArgument(f"{len(seqs[0])} prompt tokens + {gen.max_new_tokens} new tokens exceed the model's "
                                  f"{max_pos} positions", reason="TOO_LONG")
        if gen.sample and not (gen.temperature >= 0 and math.isfinite(gen.temperature)):
            raise InvalidArgument("temperature must be a finite number >= 0", reason="BAD_GENERATE")
        if gen.top_k < 0:
            raise InvalidArgument("top_k must be >= 0", reason="BAD_GENERATE")
        vocab = self.adapter.info.vocab_size
        if any(not 0 <= t < vocab for t in gen.stop_token_ids):
            raise InvalidArgument(f"stop_token_ids must be in [0, {vocab})", reason="BAD_GENERATE")

    def build_result(self, run: DebugRun, top_k: int = 10, include_logits: bool = False) -> pb.RunResult:
        msg = pb.RunResult(run_id=run.run_id, state=run.state, exception=run.exception,
                           lengths=[int(x) for x in run.lengths])
        if run.gen is not None:
            for toks in run.generated:
                msg.generated.add(ids=toks)
                msg.generated_text.append(self.adapter.tokenizer.decode(toks) if self.adapter.tokenizer is not None
                                          else " ".join(f"<{t}>" for t in toks))
        for row, n in zip(run.input_ids.tolist(), run.lengths.tolist()):
            msg.input_ids.add(ids=row[:n])
        if run.logits is not None:
            k = min(top_k or 10, run.logits.shape[-1])
            top = torch.topk(run.logits, k, dim=-1)
            probs = torch.softmax(run.logits, dim=-1).gather(-1, top.indices).tolist()
            for b, (ids, logits) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                tt = msg.top.add(batch_index=b, position=int(run.lengths[b]) - 1)
                for tid, text, lg, p in zip(ids, self.decode(ids), logits, probs[b]):
                    tt.tokens.add(token_id=tid, text=text, logit=lg, prob=p)
            if include_logits:
                msg.last_logits.CopyFrom(wire.to_wire(run.logits))
        return msg

    def decode(self, ids: list[int]) -> list[str]:
        return self.adapter.token_texts(ids)

    # -- control ---------------------------------------------------------------------------------

    def _active(self, what: str) -> DebugRun:
        run = self.current
        if run is None:
            raise FailedPrecondition(f"cannot {what}: no run in this session; launch one first", reason="NO_RUN")
        return run

    def resume(self, command: str, step_kind: str | None = None) -> DebugRun:
        run = self._active(command)
        with self.cv:
            if run.state != pb.PAUSED:
                raise FailedPrecondition(f"cannot {command}: run {run.run_id} is {_STATE_NAMES[run.state]}, not paused",
                                         reason="NOT_PAUSED")
            if step_kind is not None:
                if step_kind == "token" and run.gen is None:
                    raise FailedPrecondition("a token step needs a generating run (launch with generate)",
                                             reason="NOT_GENERATING")
                start = run.index.get(run.stop.site, -1) if run.stop else -1
                if run.stop is not None and run.stop.when == pb.BEFORE:
                    start -= 1   # from "before S", stepping into runs S
                if run.stop is not None and run.stop.site == "" and run.stop.reason != "entry":
                    start = BOUNDARY
                run.step = (step_kind, start)
                run.hook_more()
            run.command = "go"
            run.state, run.stop = pb.RUNNING, None   # the hand-off: the worker owns the run from here
            self.events.emit(run.run_id, continued=pb.Continued())
            self.cv.notify_all()
        return run

    def force_stop(self, site: str, token: int = 0) -> None:
        """Stop (as a pause) when the run reaches `site` in generation step `token` ("" = the token boundary).
        Used by replays to land where a recorded pause landed; applies to the current or the next run."""
        with self.cv:
            run = self.current
            if run is not None and run.state in (pb.RUNNING, pb.PAUSED):
                run.forced_stops.append((site, token))
            else:
                self._forced.append((site, token))

    def pause(self) -> DebugRun:
        run = self._active("pause")
        with self.cv:
            if run.state == pb.RUNNING:
                run.pause_requested = True
                run.hook_more()
        return run

    def terminate(self) -> DebugRun:
        run = self._active("terminate")
        with self.cv:
            if run.state in (pb.RUNNING, pb.PAUSED):
                run.terminate_requested = True
                run.command = "terminate"
                self.cv.notify_all()
        return run

    def wait(self, run: DebugRun, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while run.state == pb.RUNNING and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cv.wait(left)

    def status(self, run: DebugRun | None = None) -> pb.RunStatus:
        run = run or self.current
        msg = pb.RunStatus(session_id=self.id)
        for p in self.patches:
            msg.patches.add(patch_id=p.id, site=p.name, op=p.describe(), scope="session", applied=p.applied)
        if run is None:
            msg.state = pb.IDLE
            return msg
        with self.cv:
            msg.run_id, msg.state = run.run_id, run.state
            if run.stop is not None:
                msg.stop.CopyFrom(run.stop.to_proto())
            if run.result is not None:
                msg.result.CopyFrom(run.result)
            for p in run.patches:
                msg.patches.add(patch_id=p.id, site=p.name, op=p.describe(), scope="run", applied=p.applied)
        return msg

    # -- inspection ------------------------------------------------------------------------------

    def _paused(self, what: str) -> tuple[DebugRun, StopState]:
        run = self.current
        if run is None or run.state != pb.PAUSED or run.stop is None:
            state = _STATE_NAMES[run.state] if run else "idle"
            raise FailedPrecondition(f"{what} needs a paused run (the session is {state})", reason="NOT_PAUSED")
        return run, run.stop

    def _new_ref(self, stop: StopState, payload: Any) -> int:
        idx = len(stop.refs) + 1
        ref = (stop.stop_id << REF_SHIFT) | idx
        stop.refs[ref] = payload
        return ref

    def _resolve_ref(self, ref: int, what: str) -> tuple[DebugRun, StopState, Any]:
        stop_id = ref >> REF_SHIFT
        run = self.current
        cur = run.stop if run is not None and run.state == pb.PAUSED else None
        if cur is None or stop_id != cur.stop_id:
            now = f"now at stop {cur.stop_id}" if cur else "the run is not paused now"
            raise Aborted(f"{what} {ref} belongs to stop {stop_id}; the run has resumed since ({now}): "
                          "get a fresh stack", reason="STALE_REFERENCE")
        if ref not in cur.refs:
            raise NotFound(f"{what} {ref} does not exist at this stop", reason="UNKNOWN_REFERENCE")
        return run, cur, cur.refs[ref]

    def stack(self) -> tuple[list[pb.StackFrame], int]:
        run, stop = self._paused("the stack")
        names = [stop.site, *reversed(enclosing(stop.site)), "model"] if stop.site else ["model"]
        frames = []
        for name in names:
            prefix = "" if name == "model" else name
            label = name if name != stop.site else (f"{name} (before)" if stop.when == pb.BEFORE else name)
            frames.append(pb.StackFrame(id=self._new_ref(stop, ("frame", prefix)), name=label, site=prefix))
        return frames, stop.stop_id

    def scopes(self, frame_id: int) -> list[pb.Scope]:
        run, stop, payload = self._resolve_ref(frame_id, "frame")
        if payload[0] != "frame":
            raise InvalidArgument(f"{frame_id} is not a frame id", reason="BAD_REFERENCE")
        prefix = payload[1]
        scopes = []
        if prefix == stop.site and stop.value is not None:
            scopes.append(pb.Scope(name="Value", variables_reference=self._new_ref(stop, ("value", prefix)), named_variables=1))
        names = [x for x in run.order if x in run.captured and (not prefix or x == prefix or x.startswith(prefix + "."))]
        scopes.append(pb.Scope(name="Captured", variables_reference=self._new_ref(stop, ("sites", tuple(names))),
                               named_variables=len(names)))
        if prefix == "":
            n = len(self.patches) + len(run.patches)
            scopes.append(pb.Scope(name="Patches", variables_reference=self._new_ref(stop, ("patches",)), named_variables=n))
        return scopes

    def _variable(self, stop: StopState, name: str, value: torch.Tensor, evaluate_name: str) -> pb.Variable:
        shape = list(value.shape)
        var = pb.Variable(name=name, evaluate_name=evaluate_name,
                          type=f"tensor {str(value.dtype).replace('torch.', '')} {shape}")
        if value.numel() == 1 and value.dim() == 0:
            var.value = expr.render(value)
            return var
        summ = wire.summarize(value)
        var.summary.CopyFrom(summ)
        var.value = f"{shape} mean={summ.mean:.4g} norm={summ.norm:.4g} min={summ.min:.4g} max={summ.max:.4g}"
        if summ.nan_count:
            var.value += f" nan={summ.nan_count}"
        var.variables_reference = self._new_ref(stop, ("expr", evaluate_name))
        var.indexed_variables = shape[0] if shape else 0
        return var

    def variables(self, ref: int, start: int, count: int) -> list[pb.Variable]:
        run, stop, payload = self._resolve_ref(ref, "variables reference")
        kind = payload[0]
        out: list[pb.Variable] = []
        if kind == "value":
            out.append(self._variable(stop, stop.site, stop.value, "x"))
        elif kind == "sites":
            names = list(payload[1])
            names = names[start:start + count] if count else names[start:]
            out = [self._variable(stop, n, run.captured[n], n) for n in names]
        elif kind == "patches":
            for p in (*self.patches, *run.patches):
                out.append(pb.Variable(name=f"patch {p.id}", value=f"{p.describe()} ({p.scope}{', applied' if p.applied else ''})",
                                       type="patch"))
        elif kind == "expr":
            base = payload[1]
            value = self.evaluate_value(base, run)
            n = value.shape[0] if value.dim() else 0
            end = n if not count else min(n, start + count)
            for i in range(max(start, 0), end):
                out.append(self._variable(stop, f"[{i}]", value[i], f"{base}[{i}]"))
        return out

    def make_env(self, run: DebugRun, value: torch.Tensor | None, site: str = "") -> expr.Env:
        adapter = self.adapter

        # two closures, neither referring to itself: a self-referencing closure is a reference cycle that would
        # keep the run (and every activation it captured) alive until the cyclic garbage collector comes by
        def read_site(name: str) -> torch.Tensor:
            canon = self._parse_site(name)
            if canon in run.captured:
                return run.captured[canon]
            if canon not in run.index:
                raise NotFound(f"{canon} is not computed in run {run.run_id} (attention patterns only when captured "
                               "or a breakpoint asks)", reason="NOT_CAPTURED")
            if run.state in (pb.RUNNING, pb.PAUSED) and run.index[canon] > run.last_fired:
                raise FailedPrecondition(f"{canon} has not run yet in run {run.run_id}: step or continue until it does",
                                         reason="NOT_YET_RUN")
            raise NotFound(f"{canon} was not captured in run {run.run_id} (see the launch's capture list)",
                           reason="NOT_CAPTURED")

        def get_site(name: str) -> torch.Tensor:
            unit = parse_unit(name)
            if unit is not None and unit.kind == "latent":   # SAE latent: read through its site -> [B, T]
                from ..sae.units import latent_value
                self._check_unit(unit)
                return latent_value(adapter, unit.site, unit.index, read_site(unit.site))
            return read_site(name)

        return expr.Env(site=get_site, weight=lambda n: weights.weight(adapter, n), value=value,
                        logit_lens=lambda x: weights.logit_lens(adapter, x), unembed=lambda x: weights.unembed(adapter, x),
                        decode=self.decode, extra={"site": site})

    def evaluate_value(self, expression: str, run: DebugRun | None = None, value: Any = None) -> Any:
        run = run or self.run_for("")
        if value is None and run.state == pb.PAUSED and run.stop is not None:
            value = run.stop.value
        return expr.evaluate(expression, self.make_env(run, value=value, site=run.stop.site if run.stop else ""))

    # -- patching --------------------------------------------------------------------------------

    def patch(self, name: str, op: str, selector: Selector, value: torch.Tensor | None, scalar: float,
              source_run_id: str, mean_over: str, tokens: tuple[int, ...] = ()) -> tuple[PatchSpec, bool]:
        name = name.strip()
        unit = parse_unit(name)
        if unit is not None:
            self._check_unit(unit)
            site = unit_site(unit)
            if unit.kind == "neuron":
                selector.neurons = [unit.index]
        else:
            site = self._parse_site(name)
        if site not in self.adapter.verified_sites:
            raise FailedPrecondition(f"{site} is never reached by this model's forward pass", reason="UNVERIFIED_SITE")
        if mean_over not in ("", "positions", "batch"):
            raise InvalidArgument(f"mean_over must be 'positions' or 'batch', not {mean_over!r}", reason="BAD_PATCH")
        if op in ("set",) and value is None:
            raise InvalidArgument("op 'set' needs a value", reason="BAD_PATCH")
        spec = PatchSpec(id=next(self._patch_ids), name=name, site=site, op=op, selector=selector,
                         head=unit.index if unit is not None and unit.kind == "head" else None,
                         value=value, scalar=scalar, mean_over=mean_over or "positions", tokens=tuple(tokens))
        if unit is not None and unit.kind == "latent":   # SAE latent patch (tdb_server/sae/units.py)
            from ..sae.units import LatentPatchSpec
            spec = LatentPatchSpec(**spec.__dict__, latent=unit.index)
        if any(t < 0 for t in spec.tokens):
            raise InvalidArgument("generation steps in `tokens` must be >= 0", reason="BAD_PATCH")
        if op == "copy_from_run":
            src = self.run_for(source_run_id) if source_run_id else None
            if src is None:
                raise InvalidArgument("copy_from_run needs source_run_id", reason="BAD_PATCH")
            if src.state not in _DONE:
                raise FailedPrecondition(f"source run {src.run_id} has not finished", reason="SOURCE_RUNNING")
            spec.source = self._source(src, site, unit)
            spec.source()  # fails now, with a clear message, if the source lacks the value
        run = self.current
        with self.cv:
            active = run is not None and run.state in (pb.RUNNING, pb.PAUSED)
            if not active:
                spec.scope = "session"
                self.patches.append(spec)
                return spec, False
            if run.state == pb.RUNNING:
                raise FailedPrecondition("the run is running: pause it (or set a breakpoint) before patching it",
                                         reason="RUNNING")
            stop = run.stop
            later_token = bool(spec.tokens) and min(spec.tokens) > run.token
            if later_token or stop.site == "":      # a later token's forward, or at a token boundary
                spec.scope = "run"
                run.hook_more({site} | ({f"blocks.{site.split('.')[1]}.attn.z"} if spec.head is not None else set()))
                run.patches.append(spec)
                return spec, False
            if spec.tokens and run.token not in spec.tokens:
                raise FailedPrecondition(f"generation step(s) {list(spec.tokens)} already ran (now at step {run.token})",
                                         reason="SITE_ALREADY_RAN")
            if site not in run.index:
                raise FailedPrecondition(f"{site} is not computed in run {run.run_id}", reason="NOT_IN_RUN")
            here = run.index.get(stop.site, -1)
            there = run.index[site]
            at_value = stop.when == pb.AFTER and there == here
            if there < here or (there == here and stop.when == pb.AFTER and stop.value is None):
                raise FailedPrecondition(
                    f"{site} already ran in run {run.run_id} (the run is stopped at {stop.site}): a patch must be "
                    "registered before its site runs — set a BEFORE breakpoint on it, or patch before launching",
                    reason="SITE_ALREADY_RAN")
            spec.scope = "run"
            run.hook_more({site} | ({f"blocks.{site.split('.')[1]}.attn.z"} if spec.head is not None else set()))
            if at_value:
                new = _apply_spec(self.adapter, spec, run.current_value(), run.z, run.lengths, run.position_offset)
                run._value = new
                if site in run.capture:
                    run.captured[site] = new
                if stop.value is not None and stop.value.shape == new.shape:
                    stop.value = new   # the stop showed the site itself (not a unit's slice of it)
                spec.applied = True
                run.patches.append(spec)
                return spec, True
            run.patches.append(spec)
            return spec, False

    def _source(self, src: DebugRun, site: str, unit: Unit | None) -> Callable[[], torch.Tensor]:
        def get() -> torch.Tensor:
            if unit is not None and unit.kind == "head":
                z = src.z.get(unit.layer)
                if z is None:
                    raise FailedPrecondition(f"run {src.run_id} has no attn.z for layer {unit.layer}", reason="NO_SOURCE_VALUE")
                return z[:, :, unit.index, :] @ self.adapter.W_O(unit.layer)[unit.index].to(z.device)
            if site not in src.captured:
                raise FailedPrecondition(f"run {src.run_id} did not capture {site}", reason="NO_SOURCE_VALUE")
            if unit is not None and unit.kind == "latent":
                from ..sae.units import latent_value
                return latent_value(self.adapter, site, unit.index, src.captured[site])
            return src.captured[site]
        return get

    def clear_patches(self) -> int:
        with self.cv:
            n = len(self.patches)
            self.patches = []
            run = self.current
            if run is not None and run.state not in (pb.RUNNING, pb.PAUSED):
                n += len(run.patches)
            return n

    # -- closing ---------------------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        with self.cv:
            if self.closed:
                return
            self.closed = True
            run = self.current
            if run is not None and run.state in (pb.RUNNING, pb.PAUSED):
                run.terminate_requested = True
                run.command = "terminate"
            self.cv.notify_all()
        if run is not None:
            run.finished.wait(timeout=30)
        self.events.emit("", terminated=pb.Terminated(reason=reason))
        self.events.close()
        with self.cv:
            self.runs.clear()
            self.current = None
            self.patches = []


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _shared_pool() -> ThreadPoolExecutor:
    """Workers for sessions made without a SessionManager (tests, embedding)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="tdb-run")
        return _POOL


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


_LIBC: Any = None


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it per thread arena otherwise), so a long-lived
    server's resident size follows what it really holds."""
    libc = _libc()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _apply_spec(adapter: Any, spec: PatchSpec, value: torch.Tensor, z: dict[int, torch.Tensor],
                lengths: torch.Tensor, offset: int) -> torch.Tensor:
    """One patch applied to its site's value: an SAE latent's, a head's (through attn.z of its layer) or
    the site's own."""
    if getattr(spec, "latent", None) is not None:   # SAE latent patch (tdb_server/sae/units.py)
        from ..sae.units import apply_latent_patch
        return apply_latent_patch(adapter, value, spec, lengths, offset)
    if spec.head is not None:
        layer = int(spec.site.split(".")[1])
        if layer not in z:
            raise FailedPrecondition(f"head patch {spec.name}: attn.z of layer {layer} was not seen in this run")
        return apply_head(value, z[layer], adapter.W_O(layer)[spec.head], spec, lengths, offset)
    return apply(value, spec, lengths, offset)


def _bp_key(bp: BreakpointSpec) -> tuple:
    return bp.name, bp.when, bp.condition, bp.hit_condition, bp.log_message, bp.tokens


class SessionManager:
    """All sessions of one server over one model; closes abandoned ones."""

    def __init__(self, adapter: Any, limits: Limits | None = None, reap_interval_s: float = 0.5):
        self.adapter = adapter
        self.limits = limits or Limits()
        self.default_idle_timeout_s = self.limits.idle_timeout_s
        self.max_sessions = self.limits.max_sessions
        # one worker per possible session: a paused run holds its thread while it waits
        self.run_pool = ThreadPoolExecutor(max_workers=self.max_sessions + 2, thread_name_prefix="tdb-run")
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, args=(reap_interval_s,), name="tdb-reaper", daemon=True)
        self._reaper.start()

    def create(self, name: str = "", idle_timeout_s: float = 0.0) -> Session:
        if not (0 <= idle_timeout_s <= 7 * 86400):   # also rejects NaN
            raise InvalidArgument("idle_timeout_s must be between 0 (the server's default) and 7 days",
                                  reason="BAD_TIMEOUT")
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(f"the server holds {self.max_sessions} sessions already; close one",
                                        reason="TOO_MANY_SESSIONS")
            sid = uuid.uuid4().hex[:16]
            s = Session(self.adapter, sid, name, idle_timeout_s or self.default_idle_timeout_s, limits=self.limits,
                        total_captured=self.total_captured_bytes, run_pool=self.run_pool)
            self._sessions[sid] = s
            return s

    def get(self, session_id: str) -> Session:
        if not session_id:
            raise InvalidArgument("session_id is required", reason="NO_SESSION_ID")
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise NotFound(f"session {session_id!r} does not exist (closed, timed out, or never created)",
                           reason="UNKNOWN_SESSION")
        s.touch()
        return s

    def close(self, session_id: str, reason: str = "closed") -> None:
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            raise NotFound(f"session {session_id!r} does not exist", reason="UNKNOWN_SESSION")
        s.close(reason)

    def total_captured_bytes(self) -> int:
        return sum(s.captured_bytes() for s in self.sessions())

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def _reap(self, interval: float) -> None:
        last_trim = time.monotonic()
        while not self._stop.wait(interval):
            now = time.monotonic()
            if now - last_trim > 5.0:
                last_trim = now
                _release_free_memory()
            for s in self.sessions():
                if s.streams == 0 and now - s.last_activity > s.idle_timeout_s:
                    try:
                        self.close(s.id, reason="idle timeout")
                    except NotFound:
                        pass

    def shutdown(self) -> None:
        self._stop.set()
        for s in self.sessions():
            try:
                self.close(s.id, reason="server shutting down")
            except NotFound:
                pass
        self.run_pool.shutdown(wait=False)
