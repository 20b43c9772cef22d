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

from tdb_client import TdbError

from .connection import Context, get_client

CACHE = dict(show_spinner=False, ttl=3600, max_entries=128)


@dataclass(frozen=True)
class Prompt:
    """A prompt as the model sees it: token ids and their text, one per position."""

    text: str
    ids: tuple[int, ...]
    tokens: tuple[str, ...]

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
    return Prompt(text, tuple(ids), tuple(tokens))


def token_id(ctx: Context, text: str) -> tuple[int, str]:
    """The id of a target token typed by a person (" Darcy", or "42" without a tokenizer), and a note
    when the text is several tokens (the first one is used)."""
    if not text:
        raise ValueError("no token given")
    if not ctx.model.has_tokenizer or (_IDS.match(text) and " " not in text.strip()):
        if _IDS.match(text):
            return parse_ids(text, ctx.model.vocab_size)[0], ""
        raise ValueError(f"{text!r} is not a token id (this model has no tokenizer)")
    ids, tokens = _tokenize(ctx.address, text)
    if not ids:
        raise ValueError(f"{text!r} has no tokens")
    note = (f"{text!r} is {len(ids)} tokens ({' | '.join(tokens)}): using the first, {tokens[0]!r}"
            if len(ids) > 1 else "")
    return ids[0], note


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
