"""Planning a launch: the checked token ids of the batch, the generation settings, which sites a run
computes, which it hooks, and what its captures will cost. Plain functions of the model, the server's
limits and the session's breakpoints and patches; `Session.launch` (session.py) puts them together.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import InvalidArgument
from ..bounds import MAX_TEMPERATURE
from ..limits import Limits
from ..model.sites import expand_glob, site_shape
from ..model.tokens import Prompt, encode as encode_prompt, unknown_note, unknown_words
from .breakpoints import BreakpointSpec
from .patches import Patch
from .types import GenOptions, When


def encode(adapter: Any, limits: Limits, prompts: list[str], token_ids: list[list[int]],
           prepend_bos: bool) -> list[list[int]]:
    """The token ids of each sequence of the batch (prompts or token ids, within the server's limits)."""
    if prompts and token_ids:
        raise InvalidArgument("give prompts or token_ids, not both", reason="BAD_INPUT")
    if not prompts and not token_ids:
        raise InvalidArgument("nothing to run: give a prompt or token ids", reason="BAD_INPUT")
    items = [Prompt(p, (), prepend_bos) for p in prompts] or [Prompt("", tuple(ids), prepend_bos) for ids in token_ids]
    if len(items) > limits.max_batch:
        raise InvalidArgument(f"batch of {len(items)} sequences; this server takes at most {limits.max_batch}",
                              reason="BATCH_TOO_LARGE")
    return [encode_prompt(adapter, p, f"sequence {b}", limits.max_prompt_tokens) for b, p in enumerate(items)]


def input_warnings(adapter: Any, prompts: list[str], seqs: list[list[int]]) -> list[str]:
    """What a run's input hides: each prompt's words the tokenizer could only write as its unknown token."""
    notes = [unknown_note(adapter, f"sequence {b}" if len(prompts) > 1 else "the prompt",
                          unknown_words(adapter, text, ids), len(ids))
             for b, (text, ids) in enumerate(zip(prompts, seqs))]
    return [n for n in notes if n]


def check_generation(adapter: Any, limits: Limits, gen: GenOptions, seqs: list[list[int]]) -> None:
    """INVALID_ARGUMENT unless the batch can generate `gen.max_new_tokens` tokens with these settings."""
    if not 0 < gen.max_new_tokens <= limits.max_prompt_tokens:
        raise InvalidArgument(f"max_new_tokens must be in 1..{limits.max_prompt_tokens}", reason="BAD_GENERATE")
    if len({len(x) for x in seqs}) > 1:
        raise InvalidArgument("generation needs sequences of equal length (no padding)", reason="BAD_GENERATE")
    max_pos = adapter.max_positions
    if max_pos and len(seqs[0]) + gen.max_new_tokens > max_pos:
        raise InvalidArgument(f"{len(seqs[0])} prompt tokens + {gen.max_new_tokens} new tokens exceed the model's "
                              f"{max_pos} positions", reason="TOO_LONG")
    if gen.sample and not (gen.temperature >= 0 and math.isfinite(gen.temperature)):
        raise InvalidArgument("temperature must be a finite number >= 0", reason="BAD_GENERATE")
    vocab = adapter.info.vocab_size
    if not 0 <= gen.top_k <= vocab:
        raise InvalidArgument(f"top_k = {gen.top_k} is out of range: it must be in 0..{vocab} (0 = the whole "
                              "vocabulary)", reason="BAD_GENERATE")
    if gen.sample and gen.temperature > MAX_TEMPERATURE:
        raise InvalidArgument(f"temperature = {gen.temperature} is out of range: it must be in 0..{MAX_TEMPERATURE:g}",
                              reason="BAD_GENERATE")
    if any(not 0 <= t < vocab for t in gen.stop_token_ids):
        raise InvalidArgument(f"stop_token_ids must be in [0, {vocab})", reason="BAD_GENERATE")


def _is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def is_pattern(site: str) -> bool:
    """An attention pattern site (`blocks.L.attn.pattern`): computed only when asked for by name or glob."""
    return site.endswith(".attn.pattern")


def capture_set(capture: Sequence[str], verified: Sequence[str], parse_site: Callable[[str], str]) -> frozenset[str]:
    """The sites a launch keeps.

    [] = every verified site except the attention patterns ([B, H, T, T] per layer, which a forward does
    not compute otherwise: capturing them would make "keep everything" cost more than the forward);
    ["none"] = nothing; else the names and globs given. A pattern site is kept (and so computed) when it
    is named or matched by a glob the caller wrote: `blocks.*.attn.pattern`, `*pattern*`, and `*`
    (every verified site, patterns included)."""
    if list(capture) == ["none"]:
        return frozenset()
    if not capture:
        return frozenset(x for x in verified if not is_pattern(x))
    sites: set[str] = set()
    for c in capture:
        sites.update(expand_glob(c, verified) if _is_glob(c) else [parse_site(c)])
    return frozenset(sites)


def run_sites(verified: Sequence[str], asked: set[str] | frozenset[str]) -> list[str]:
    """The sites a run computes, in order: attention patterns only where asked for."""
    return list(_run_sites(tuple(verified), frozenset(asked)))


@functools.lru_cache(maxsize=256)
def _run_sites(verified: tuple[str, ...], asked: frozenset[str]) -> tuple[str, ...]:
    """(Every launch asks with the same few sets: its captures, breakpoints and patches change seldom.)"""
    return tuple(x for x in verified if x in asked or not is_pattern(x))


def hooked_sites(sites: list[str], captured: frozenset[str], breakpoints: Sequence[BreakpointSpec],
                 patches: Sequence[Patch]) -> set[str]:
    """Hooks only where something is asked: captures, breakpoints (and the site before a BEFORE one),
    patches (and attn.z for heads landing on attn.out). Stepping or pausing hooks the rest of the run on demand."""
    fire = set(captured) | {x for bp in breakpoints for x in bp.sites} | {x for p in patches for x in p.hooks}
    fire |= {f"blocks.{bp.unit.layer}.attn.z" for bp in breakpoints if bp.unit is not None and bp.unit.kind == "head"}
    for bp in breakpoints:
        if bp.when is When.BEFORE:
            fire |= {sites[sites.index(x) - 1] for x in bp.sites if x in sites and sites.index(x) > 0}
    return fire & set(sites)


def prepared_sites(sites: list[str], fire: set[str] | frozenset[str],
                   breakpoints: Sequence[BreakpointSpec]) -> frozenset[str]:
    """Sites a run readies without hooking them (hooks.py `prepare`): with a breakpoint, a stop may be
    followed by steps, which need resid_mid; the adapter derives it from the block's input, which must be
    recorded before the block starts. Recorded, not fired: a run that never steps pays no resid_mid."""
    if not any(bp.verified for bp in breakpoints):
        return frozenset()
    return frozenset(x for x in sites if x.endswith(".resid_mid") and x not in fire)


def estimate_capture(info: Any, sites: frozenset[str], batch: int, seq: int) -> int:
    """Bytes the captures of `sites` take for a batch of `batch` x `seq` tokens."""
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


def pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] (T = the longest) and the real lengths [B]."""
    lengths = [len(x) for x in seqs]
    T = max(lengths)
    ids = torch.tensor([list(x) + [0] * (T - len(x)) for x in seqs], dtype=torch.long)   # [B, T], one tensor
    return ids, torch.tensor(lengths)
