"""Prompts and one-shot runs, cached: what the Explore, Attention, Logit lens and Component pages show.

A one-shot run opens a short-lived session, applies the ablations, launches the prompt with the sites
it needs captured, reads tensors and evaluates expressions, and closes the session. Results depend only
on (server, token ids, ablations, what was asked), so they are cached across reruns and users
(`st.cache_data`); the debugger's paused runs are never cached (they live in `connection.Context`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import streamlit as st

from tdb_client import Target, TdbError

from .connection import Context, get_client

CACHE = dict(show_spinner=False, ttl=3600, max_entries=128)


@dataclass(frozen=True)
class Prompt:
    """A prompt as the model sees it: token ids and their text, one per position; `unknown`: the
    positions where the tokenizer wrote its unknown token (the server names that id) for text it cannot
    represent."""

    text: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    unknown: tuple[int, ...] = ()

    @property
    def labels(self) -> list[str]:
        """Unique, readable axis labels ("3 ␣Darcy"): a chart axis merges repeated tokens otherwise."""
        return token_labels(self.tokens)

    def __len__(self) -> int:
        return len(self.ids)


def show_token(tok: str) -> str:
    """A token as a person can see it: leading spaces as '␣', newlines as '⏎'."""
    return tok.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def token_labels(tokens: Any) -> list[str]:
    return [f"{i} {show_token(t)}" for i, t in enumerate(tokens)]


@st.cache_data(**CACHE)
def _tokenize(address: str, text: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    ids, tokens = get_client(address).tokenize(text)
    return tuple(ids), tuple(tokens)


_IDS = re.compile(r"^\s*\d+(?:[\s,]+\d+)*\s*$")


def parse_ids(text: str, vocab_size: int) -> tuple[int, ...]:
    if not _IDS.match(text):
        raise ValueError("this model has no tokenizer: type token ids, e.g. `5 17 42 8 5 17`")
    ids = tuple(int(t) for t in re.split(r"[\s,]+", text.strip()))
    bad = [i for i in ids if i >= vocab_size]
    if bad:
        raise ValueError(f"token ids must be below the vocabulary size {vocab_size}; got {bad[:5]}")
    return ids


def make_prompt(ctx: Context, text: str) -> Prompt | None:
    """Tokenize `text` (or parse token ids when the model has no tokenizer). None for an empty prompt."""
    if not text.strip():
        return None
    if ctx.model.has_tokenizer and not _IDS.match(text):
        ids, tokens = _tokenize(ctx.address, text)
    else:
        ids = parse_ids(text, ctx.model.vocab_size)
        tokens = tuple(f"<{i}>" for i in ids)
    if not ids:
        raise ValueError("the prompt has no tokens")
    if ctx.model.max_positions and len(ids) > ctx.model.max_positions:
        raise ValueError(f"the prompt has {len(ids)} tokens; the model takes at most {ctx.model.max_positions}")
    unk = ctx.model.unk_token_id
    unknown = tuple(i for i, t in enumerate(ids) if unk is not None and t == unk and ctx.model.has_tokenizer)
    return Prompt(text, tuple(ids), tuple(tokens), unknown)


# -- targets: read by the server, never by the page -------------------------------------------------------

@dataclass(frozen=True)
class Resolved:
    """A target as the server read it: the token ids it explains, its description and its notes (a
    multi-token text reduced to its first token, "did you mean ' Darcy'?"), shown as written."""

    token: int
    distractor: int | None
    description: str
    notes: tuple[str, ...]


def _token(ctx: Context, text: str) -> str | int:
    """What a typed token is on the wire: the text itself, or an id for a model without a tokenizer."""
    if ctx.model.has_tokenizer:
        return text
    if not _IDS.match(text) or len(text.split()) != 1:
        raise ValueError(f"{text!r} is not a token id (this model has no tokenizer)")
    return int(text)


@st.cache_data(**CACHE)
def _resolve(address: str, ids: tuple[int, ...], target: str | int, distractor: str | int | None) -> Resolved:
    """The server's reading of the target (a one-site logit lens: the cheapest analysis that resolves one)."""
    r = get_client(address).logit_lens(list(ids), ["embed"], positions=[len(ids) - 1], top_k=1,
                                       target=Target(target, distractors=() if distractor is None else distractor))
    t = r.target
    return Resolved(int(t.token_ids[0]), int(t.distractor_ids[0]) if len(t.distractor_ids) else None,
                    t.description, tuple(t.notes))


def resolve_target(ctx: Context, prompt: Prompt, target: str, distractor: str | None = None) -> Resolved:
    """The target (and distractor) as the server reads them for this prompt; raises the server's TdbError
    (e.g. BAD_TARGET for a word the vocabulary lacks) or ValueError for an empty box."""
    if not target or (distractor is not None and not distractor):
        raise ValueError("give a target" + (" and a distractor" if distractor is not None else "") + " token")
    return _resolve(ctx.address, prompt.ids, _token(ctx, target),
                    None if distractor is None else _token(ctx, distractor))


@st.cache_data(**CACHE)
def check_patch_name(address: str, name: str) -> None:
    """Raises the server's TdbError when it cannot patch `name` (a unit, site, layer node or pattern): a
    session patch reads it with the grammar every patch and ablation goes through. With no run started
    the patch is only recorded, and leaving the short session drops it."""
    with get_client(address).session(name="dashboard-check") as s:
        s.patch(name, "zero")


@dataclass(frozen=True)
class Evaluated:
    text: str
    value: np.ndarray | None
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class RunOutput:
    top: tuple[tuple[int, str, float, float], ...]      # (id, text, prob, logit) at the last position
    last_logits: np.ndarray                            # [vocab]
    reads: dict[str, np.ndarray]
    evals: dict[str, Evaluated]


@st.cache_data(**CACHE)
def run(address: str, ids: tuple[int, ...], *, capture: tuple[str, ...] = (), reads: tuple[str, ...] = (),
        evals: tuple[str, ...] = (), ablations: tuple[str, ...] = (), top_k: int = 10) -> RunOutput:
    """One forward pass of `ids` with every node in `ablations` zeroed (units, layers such as `blocks.1.attn`,
    patterns such as `blocks.*.attn.head.*`: the server reads the names, as its Ablate analysis does);
    read and evaluate after it."""
    client = get_client(address)
    with client.session(name="dashboard-run") as s:
        for node in ablations:
            s.patch(node, "zero")
        status = s.launch(token_ids=[list(ids)], capture=list(capture))
        if status.state != "exited":
            raise TdbError(grpc.StatusCode.FAILED_PRECONDITION, "RUN_NOT_FINISHED",
                           f"the run ended as {status.state!r}"
                           + (f": {status.result.exception}" if status.result and status.result.exception else ""))
        result = s.result(top_k=top_k)
        top = tuple((t.token_id, t.text, t.prob, t.logit) for t in result.top[0])
        out_reads = {r: s.read(r) for r in reads}
        out_evals = {}
        for e in evals:
            v = s.evaluate(e, max_elements=1 << 16)
            out_evals[e] = Evaluated(v.text, v.value, v.tokens)
    return RunOutput(top, np.asarray(result.last_logits[0]), out_reads, out_evals)
