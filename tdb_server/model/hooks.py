"""Session-aware, lazy, leak-free hooks: how a run sees and replaces site values.

Several sessions share one model, and PyTorch hooks are global state on shared modules. So:

* A *run* is one forward pass in one thread. `HookManager.running(handler)` binds the handler to the
  current thread through a ContextVar and installs, ref-counted, the dispatchers its sites need; the
  `finally` of that context manager releases them. A dispatcher stays on the model while at least one
  run needs it and is removed when none does; there is at most one of ours per (module, hook kind).
* A dispatcher looks up the current run in the ContextVar: no run, or a run that did not ask for the
  site, means return at once, unchanged. So concurrent runs (one parked at a breakpoint in its worker
  thread while another runs) each see exactly their own sites.
* A run that asks for nothing installs nothing: its forward executes with none of our hooks.
* Only our own handles are removed; hooks that transformers installs (output capturing) are left alone.

`attn.q/k/v/pattern` are not module hooks: they come from `attention_wrapper`, an attention function
registered in transformers' AttentionInterface and set as the model's implementation on load. That
wrapper is the one piece that stays in place permanently; when the current run does not want any of
its sites for that layer it calls the original implementation (sdpa, eager, ...) untouched. Its name
is `tdb_<original>` and its mask function is the original's, so masks are built as before. One
consequence: code in transformers that tests `config._attn_implementation == "eager"` no longer
matches (GPT-2's `reorder_and_upcast_attn`, an fp16 upcast used only under eager, is skipped; the
load-time parity check would catch a real difference).

Hook points (per block L; paths from `arch.ArchSpec`):

| hook point                     | kind | sites                                            |
|--------------------------------|------|--------------------------------------------------|
| embed module                   | out  | embed                                            |
| block                          | pre  | resid_pre (hidden_states arg); remembers it for resid_mid |
| attention function (wrapper)   | -    | attn.q, attn.k, attn.v, attn.pattern             |
| attn output projection         | pre  | attn.z (input viewed [B, T, H, Dh])              |
| attention module               | out  | attn.out (output[0]), then resid_mid             |
| mlp_in projection              | out  | mlp.pre                                          |
| mlp output projection          | pre  | mlp.post                                         |
| mlp module                     | out  | mlp.out                                          |
| block                          | out  | resid_post                                       |
| final norm / unembedding       | out  | final_norm / logits                              |
| unembedding                    | pre  | none: takes the rows the handler reads (below)   |

A handler with `logits_rows` (positions) reads only those rows of the logits: while the `logits` site is
not hooked, the unembedding's pre-hook hands it those rows of the final residual stream ([B, T, D] ->
[B, len(rows), D]), so the [B, T, V] logits are not computed for nobody. A run that asks for no site
installs nothing, this hook included (project its rows with the model's `logits_to_keep` instead).

resid_mid: blocks add the residual from a local variable, so no module sees resid_mid as an input
or output that can be replaced. It is derived as resid_pre + attn.out right after attn.out, and a
patch of it is applied by replacing attn.out with new_resid_mid - resid_pre (exact up to float
rounding). On parallel blocks (GPT-NeoX `use_parallel_residual`) the MLP reads resid_pre, not
resid_mid: resid_mid is still resid_pre + attn.out (= resid_post - mlp.out), and patching it changes
resid_post but not what the MLP reads.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .arch import ArchSpec, get_path
from .sites import ATTN_FN_KINDS, SiteError, parse_site

class SiteHandler(Protocol):
    """One per run. `on_site` is called in the forward's thread, in execution order, only for names
    in `sites`; it may block (the debugger parks there). Returning a new tensor of the same shape
    replaces the site's value (patch); None (or `value` itself) leaves it unchanged. `value` may be
    a view of the model's own tensor: clone before keeping it across a patch, and never edit it in
    place (an in-place edit is not a supported patch). `sites` is read once, when the run starts;
    `Run.add_sites` asks for more while it is live. An optional `prepare` (sites) names sites the run
    does not hook now but may hook later in the forward (steps after a stop): the adapter readies what
    they need in advance (for resid_mid, the block's input, recorded before the block starts); they
    fire only once hooked. An optional `logits_rows` (positions, sorted) says
    which rows of the logits the handler reads when the `logits` site is not hooked (see the module doc);
    the `logits` site never fires with those rows only."""

    sites: frozenset[str]

    def on_site(self, site: str, value: torch.Tensor) -> torch.Tensor | None: ...


@dataclass
class Run:
    """The state of one run, bound to its thread by `_CURRENT_RUN`."""

    owner: HookManager
    handler: SiteHandler | None                      # None once the run has ended
    sites: frozenset[str]
    attn_layers: frozenset[int]                      # layers where the attention wrapper must act
    prepare: frozenset[str] = frozenset()            # sites readied, not fired (SiteHandler.prepare)
    resid_pre: dict[int, torch.Tensor] = field(default_factory=dict)  # for resid_mid
    keys: Counter = field(default_factory=Counter)   # hook points this run holds
    ended: bool = False
    logits_rows: tuple[int, ...] | None = None       # the rows the unembedding takes when logits is not hooked
    logits_sliced: bool = False                      # it took them: the logits site cannot fire

    def fire(self, site: str, value: torch.Tensor) -> torch.Tensor:
        """Hand `value` to the handler; return what the forward should continue with."""
        new = self.handler.on_site(site, value)
        if new is None or new is value:
            return value
        if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(value.shape):
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise SiteError(f"patch for site {site!r} has shape {got}, expected {tuple(value.shape)}")
        return new.to(dtype=value.dtype, device=value.device)

    def add_sites(self, sites: Iterable[str]) -> None:
        """Ask for more sites while the run is live (e.g. a breakpoint set while paused). Sites whose
        hook point already ran in this forward are simply not reached. Released with the run."""
        self.owner._add_sites(self, frozenset(sites))


_CURRENT_RUN: ContextVar[Run | None] = ContextVar("tdb_current_run", default=None)


# --- the attention-function wrapper -----------------------------------------------------------

def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, Dh] -> [B, Hkv * n_rep, T, Dh] (each KV head repeated for its query group)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def eager_pattern(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None,
                  is_causal: bool | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention probabilities as eager attention computes them.

    query [B, H, Tq, Dh], key [B, Hkv, Tk, Dh] (after RoPE) -> pattern [B, H, Tq, Tk] in query's dtype.
    Mask conventions of transformers' mask functions: None (sdpa: causal iff is_causal and Tq > 1,
    aligned top-left as sdpa does), bool 4D (True = attend), float 4D (added to scores), or a 2D
    padding mask [B, Tk] (flash-style; causal aligned bottom-right). Masked scores use the dtype
    minimum rather than -inf so fully masked rows stay finite, as eager masks do.
    """
    b, h, tq, dh = query.shape
    tk = key.shape[2]
    scale = dh ** -0.5 if scaling is None else scaling
    k = _repeat_kv(key, h // key.shape[1])
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    neg = torch.finfo(scores.dtype).min
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if attention_mask is None:
        if is_causal and tq > 1:
            keep = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril()  # top-left
            scores = scores.masked_fill(~keep, neg)
    elif attention_mask.dim() == 2:  # [B, Tk] padding mask (1/True = keep)
        keep = attention_mask.bool()[:, None, None, :]
        if is_causal:
            causal = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq)
            keep = keep & causal
        scores = scores.masked_fill(~keep, neg)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :tk], neg)
    else:
        scores = (scores + attention_mask[..., :tk].float()).clamp_min(neg)
    return torch.softmax(scores, dim=-1).to(query.dtype)


def _original_attention(original: str) -> Callable:
    """Resolve the wrapped implementation at call time ('eager' is each model's own function)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original == "eager":
        def eager(module, *args, **kwargs):
            return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)
        return eager
    return lambda *args, **kwargs: ALL_ATTENTION_FUNCTIONS[original](*args, **kwargs)


def attention_wrapper(original: str) -> Callable:
    """An attention function for transformers' AttentionInterface that fires attn.q/k/v/pattern.

    Receives (module, query [B,H,T,Dh], key/value [B,Hkv,Tk,Dh] after RoPE and cache, mask, ...).
    Pass-through (one ContextVar read) unless the current run wants an attention site of this layer.
    attn.pattern is computed here, eagerly, only for the layers where it is wanted; the output still
    comes from the original implementation unless the pattern was patched (then pattern @ v).
    """
    call_original = _original_attention(original)

    def tdb_attention(module, query, key, value, attention_mask, *args, **kwargs):
        run = _CURRENT_RUN.get()
        if run is None:
            return call_original(module, query, key, value, attention_mask, *args, **kwargs)
        layer = run.owner.attn_layer.get(id(module))
        if layer is None or layer not in run.attn_layers:
            return call_original(module, query, key, value, attention_mask, *args, **kwargs)
        prefix = f"blocks.{layer}.attn."
        for kind in ("q", "k", "v"):
            if prefix + kind in run.sites:
                t = {"q": query, "k": key, "v": value}[kind]
                new = run.fire(prefix + kind, t.transpose(1, 2))  # [B, H, T, Dh] -> [B, T, H, Dh]
                if kind == "q":
                    query = new.transpose(1, 2)
                elif kind == "k":
                    key = new.transpose(1, 2)
                else:
                    value = new.transpose(1, 2)
        if prefix + "pattern" not in run.sites:
            return call_original(module, query, key, value, attention_mask, *args, **kwargs)
        if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
            raise SiteError(f"site {prefix}pattern: attention sinks / position bias are not supported")
        pattern = eager_pattern(module, query, key, attention_mask, kwargs.get("scaling"),
                                kwargs.get("is_causal"), kwargs.get("softcap"))  # [B, H, Tq, Tk]
        new = run.fire(prefix + "pattern", pattern)
        if new is pattern:
            return call_original(module, query, key, value, attention_mask, *args, **kwargs)
        v = _repeat_kv(value, new.shape[1] // value.shape[1])            # [B, H, Tk, Dh]
        out = torch.matmul(new, v).transpose(1, 2).contiguous()           # [B, Tq, H, Dh]
        return out, new

    tdb_attention.tdb_original = original
    return tdb_attention


def install_attention_wrapper(model: nn.Module) -> str:
    """Register `tdb_<impl>` (attention + mask function) and switch the model to it; return <impl>.
    Idempotent. The mask function is the original's, so masks are built exactly as before."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    current = model.config._attn_implementation
    if current.startswith("tdb_"):
        return current.removeprefix("tdb_")
    name = f"tdb_{current}"
    AttentionInterface.register(name, attention_wrapper(current))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} refused attention implementation {name!r}; "
                           "it does not use transformers' AttentionInterface")
    return current


# --- module-hook dispatchers --------------------------------------------------------------------

def _first(output):
    """Module output -> (main tensor, rebuild(new_main) -> output). Tuples (transformers 4.x blocks,
    attention modules) carry the main tensor first; 5.x blocks return a plain tensor."""
    if isinstance(output, tuple):
        return output[0], lambda new: (new, *output[1:])
    return output, lambda new: new


def _hidden_arg(args: tuple, kwargs: dict):
    """The first tensor input of a call (positional, or `hidden_states=`) and a rebuild function."""
    if args:
        return args[0], lambda new: ((new, *args[1:]), kwargs)
    return kwargs["hidden_states"], lambda new: (args, {**kwargs, "hidden_states": new})


@dataclass(frozen=True)
class HookPoint:
    path: str       # module path from the model root
    kind: str       # "pre" | "out"
    layer: int | None
    role: str       # which dispatcher: see HookManager._make_hook


_LOGITS_ROWS = HookPoint("<unembed>", "pre", None, "logits_rows")


class HookManager:
    """Owns our hooks on one model: ref-counted install/remove, dispatch through `_CURRENT_RUN`."""

    def __init__(self, model: nn.Module, spec: ArchSpec, n_layers: int, n_heads: int):
        self.model = model
        self.spec = spec
        self.n_layers = n_layers
        self.n_heads = n_heads
        self._lock = threading.Lock()
        self._refs: Counter = Counter()
        self._handles: dict[HookPoint, torch.utils.hooks.RemovableHandle] = {}
        blocks = get_path(model, spec.blocks)
        self.attn_layer: dict[int, int] = {
            id(get_path(block, spec.attn)): layer for layer, block in enumerate(blocks)}
        self._unembed = model.get_output_embeddings()
        self._points_of: dict[str, list[HookPoint]] = {}   # site -> its hook points (valid names only)
        self._dispatch: dict[HookPoint, tuple[nn.Module, Callable]] = {}   # point -> (module, its dispatcher)

    # which hook points a site needs
    def points_for(self, site: str) -> list[HookPoint]:
        """The hook points of a site (parsed once per name: a run asks for every site it hooks)."""
        points = self._points_of.get(site)
        if points is None:
            points = self._points_of[site] = self._parse_points(site)
        return points

    def _parse_points(self, site: str) -> list[HookPoint]:
        s = parse_site(site, self.n_layers)
        if s.layer is None:
            path = {"embed": self.spec.embed, "final_norm": self.spec.final_norm}.get(s.kind)
            return [HookPoint(path or "<unembed>", "out", None, s.kind)]
        block = f"{self.spec.blocks}.{s.layer}"
        sp = self.spec
        table = {
            "resid_pre": [HookPoint(block, "pre", s.layer, "block_pre")],
            "attn.z": [HookPoint(f"{block}.{sp.attn_out_proj}", "pre", s.layer, "z")],
            "attn.out": [HookPoint(f"{block}.{sp.attn}", "out", s.layer, "attn_out")],
            "resid_mid": [HookPoint(block, "pre", s.layer, "block_pre"),
                          HookPoint(f"{block}.{sp.attn}", "out", s.layer, "attn_out")],
            "mlp.pre": [HookPoint(f"{block}.{sp.mlp_in}", "out", s.layer, "mlp.pre")],
            "mlp.post": [HookPoint(f"{block}.{sp.mlp_out_proj}", "pre", s.layer, "mlp.post")],
            "mlp.out": [HookPoint(f"{block}.{sp.mlp}", "out", s.layer, "mlp.out")],
            "resid_post": [HookPoint(block, "out", s.layer, "resid_post")],
        }
        return table.get(s.kind, [])  # attention-function sites need no hook

    def _module(self, point: HookPoint) -> nn.Module:
        return self._unembed if point.path == "<unembed>" else get_path(self.model, point.path)

    def _dispatcher(self, point: HookPoint) -> tuple[nn.Module, Callable]:
        """The module of a hook point and its dispatcher, made once (runs install and remove them often:
        every launch that hooks anything)."""
        made = self._dispatch.get(point)
        if made is None:
            made = self._dispatch[point] = (self._module(point), self._make_hook(point))
        return made

    def _make_hook(self, point: HookPoint) -> Callable:
        owner, layer = self, point.layer
        if point.role == "block_pre":
            name, mid = f"blocks.{layer}.resid_pre", f"blocks.{layer}.resid_mid"

            def hook(module, args, kwargs):
                run = _CURRENT_RUN.get()
                if run is None or run.owner is not owner:
                    return None
                keep = mid in run.sites or mid in run.prepare
                if name not in run.sites and not keep:
                    return None
                x, rebuild = _hidden_arg(args, kwargs)          # [B, T, D]
                new = run.fire(name, x) if name in run.sites else x
                if keep:
                    run.resid_pre[layer] = new
                return None if new is x else rebuild(new)
        elif point.role == "logits_rows":

            def hook(module, args, kwargs):
                run = _CURRENT_RUN.get()
                if run is None or run.owner is not owner or run.logits_rows is None or "logits" in run.sites:
                    return None
                x, rebuild = _hidden_arg(args, kwargs)          # [B, T, D]
                rows = run.logits_rows
                lo, hi = rows[0], rows[-1] + 1
                run.logits_sliced = True
                return rebuild(x[:, slice(lo, hi) if hi - lo == len(rows) else list(rows)])   # [B, len(rows), D]
        elif point.role == "attn_out":
            name, mid = f"blocks.{layer}.attn.out", f"blocks.{layer}.resid_mid"

            def hook(module, args, output):
                run = _CURRENT_RUN.get()
                if run is None or run.owner is not owner:
                    return None
                if name not in run.sites and mid not in run.sites:
                    run.resid_pre.pop(layer, None)               # recorded for a resid_mid nobody hooked
                    return None
                out, rebuild = _first(output)                    # [B, T, D]
                new = run.fire(name, out) if name in run.sites else out
                resid_pre = run.resid_pre.pop(layer, None)
                if mid in run.sites and resid_pre is not None:
                    resid_mid = resid_pre + new                  # [B, T, D]
                    new_mid = run.fire(mid, resid_mid)
                    if new_mid is not resid_mid:
                        new = new_mid - resid_pre
                return None if new is out else rebuild(new)
        elif point.kind == "pre":  # attn.z / mlp.post: the projection's input
            name = f"blocks.{layer}.{'attn.z' if point.role == 'z' else 'mlp.post'}"
            n_heads = self.n_heads if point.role == "z" else None

            def hook(module, args, kwargs):
                run = _CURRENT_RUN.get()
                if run is None or run.owner is not owner or name not in run.sites:
                    return None
                x, rebuild = _hidden_arg(args, kwargs)          # [B, T, H*Dh] or [B, T, N]
                view = x.view(*x.shape[:-1], n_heads, -1) if n_heads else x  # [B, T, H, Dh]
                new = run.fire(name, view)
                return None if new is view else rebuild(new.reshape(x.shape))
        else:  # an output: embed, mlp.pre, mlp.out, resid_post, final_norm, logits
            name = point.role if layer is None else f"blocks.{layer}.{point.role}"
            sliced = name == "logits"

            def hook(module, args, output):
                run = _CURRENT_RUN.get()
                if run is None or run.owner is not owner or name not in run.sites or (sliced and run.logits_sliced):
                    return None     # logits hooked (by a pause) after the unembedding took some rows only
                out, rebuild = _first(output)
                new = run.fire(name, out)
                return None if new is out else rebuild(new)
        hook.tdb_owner = self
        return hook

    def _acquire(self, points: Iterable[HookPoint]) -> None:
        """Take one ref on each point, installing its dispatcher on 0 -> 1; all or nothing.
        Called with the lock held."""
        done = []
        try:
            for point in points:
                if self._refs[point] == 0:
                    module, hook = self._dispatcher(point)
                    if point.kind == "pre":
                        handle = module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
                    else:  # prepend: later hooks (transformers' output recorders) see patched outputs
                        handle = module.register_forward_hook(hook, prepend=True)
                    self._handles[point] = handle
                self._refs[point] += 1
                done.append(point)
        except BaseException:
            self._release(done)
            raise

    def _release(self, points: Iterable[HookPoint]) -> None:
        for point in points:
            self._refs[point] -= 1
            if self._refs[point] <= 0:
                del self._refs[point]
                handle = self._handles.pop(point, None)
                if handle is not None:
                    handle.remove()

    def _points(self, sites: frozenset[str]) -> Counter:
        points: Counter = Counter()
        for site in sites:
            for point in self.points_for(site):
                points[point] = 1  # one ref per hook point per run
        return points

    def _add_sites(self, run: Run, sites: frozenset[str]) -> None:
        new = self._points(sites | run.sites) - run.keys
        with self._lock:
            if run.ended:             # too late: nothing would ever release these hooks
                return
            self._acquire(new)
            run.keys.update(new)
        run.attn_layers = run.attn_layers | _attn_layers(sites, self.n_layers)
        run.sites = run.sites | sites

    @contextmanager
    def running(self, handler: SiteHandler | None) -> Iterator[Run | None]:
        """Bind `handler` to this thread for the forwards run inside the block; install (ref-counted)
        the dispatchers its sites need; remove them in `finally` (after errors and cancels too). A handler
        with no sites gets a live Run that installs nothing (a forward with none of our hooks) until
        `Run.add_sites` asks for some (a pause); None binds no run at all."""
        if handler is None:
            token = _CURRENT_RUN.set(None)
            try:
                yield None
            finally:
                _CURRENT_RUN.reset(token)
            return
        sites = frozenset(handler.sites)    # none: a live Run that installs nothing until `add_sites`
        rows = getattr(handler, "logits_rows", None)
        prepare = frozenset(getattr(handler, "prepare", ())) - sites
        run = Run(self, handler, sites, _attn_layers(sites, self.n_layers), prepare,
                  logits_rows=None if rows is None else tuple(rows))
        points = self._points(sites | prepare)  # validates the names before anything is installed
        if run.logits_rows is not None:
            points[_LOGITS_ROWS] = 1
        with self._lock:
            self._acquire(points)
            run.keys.update(points)
        try:
            token = _CURRENT_RUN.set(run)
            try:
                yield run
            finally:
                _CURRENT_RUN.reset(token)
        finally:
            with self._lock:
                self._release(list(run.keys))
                run.keys.clear()
                run.ended = True
            run.resid_pre.clear()
            # the handler usually keeps this Run (to hook more sites while paused): dropping the reference
            # breaks that cycle, so the handler and the activations it holds are freed at once by reference
            # counting instead of whenever the cyclic garbage collector next runs
            run.handler = None

    def installed_hook_count(self) -> int:
        """Our hook handles actually present on the model's modules (read from the modules)."""
        count = 0
        for module in self.model.modules():
            for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()):
                count += getattr(hook, "tdb_owner", None) is self
        return count


def _attn_layers(sites: Iterable[str], n_layers: int) -> frozenset[int]:
    """The layers whose attention function must act for `sites` (attn.q/k/v/pattern)."""
    layers = {_attn_fn_layer(site, n_layers) for site in sites}
    layers.discard(None)
    return frozenset(layers)


@functools.lru_cache(maxsize=4096)
def _attn_fn_layer(site: str, n_layers: int) -> int | None:
    """The layer of an attention-function site; None for any other site (parsed once per name)."""
    s = parse_site(site, n_layers)
    return s.layer if s.kind in ATTN_FN_KINDS else None
