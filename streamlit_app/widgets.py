"""Pieces shared by several pages: the prompt box (its demo from the model's own ground truth, its unknown
tokens marked), targets read by the server (its notes shown as written), the tensor viewer, "not
available yet" notes."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import streamlit as st

import re

from tdb_client import TdbError, TensorSummary

from . import charts, state
from .connection import Context, show_error
from .runs import Prompt, Resolved, make_prompt, resolve_target, show_token

MAX_ROWS, MAX_COLS = 256, 512     # a heatmap bigger than this is cut (and says so)
# for a model whose server names no demo: an English prompt that should continue with " Darcy", by induction
EXAMPLE_PROMPT = ("When Mr. Darcy entered the room, Elizabeth coloured, and Mrs. Bennet was all civility. "
                  "Nobody spoke for some minutes, till at last Mr.")
EXAMPLE_IDS = "5 17 42 8 99 23 61 5 17 42 8 99 23"


def example_prompt(ctx: Context) -> str:
    """The model's own demo (its ground truth, as the server reports it), else a generic example."""
    if ctx.model.demo is not None:
        return ctx.model.demo.prompt
    return EXAMPLE_PROMPT if ctx.model.has_tokenizer else EXAMPLE_IDS


def default_tokens(ctx: Context) -> tuple[str, str]:
    """The target and distractor the pages open on: the demo's answer and distractor."""
    if ctx.model.demo is not None:
        return ctx.model.demo.answer, ctx.model.demo.distractor
    return (" Darcy", " Bingley") if ctx.model.has_tokenizer else ("17", "42")


def corrupted_example(ctx: Context) -> str:
    """A corrupted prompt to suggest: the demo with its answer swapped for the distractor."""
    demo = ctx.model.demo
    if demo is None:
        return EXAMPLE_PROMPT.replace("Darcy", "Bingley") if ctx.model.has_tokenizer else "5 42 17 8 99 23 61 5 42"
    return demo.prompt.replace(demo.answer.strip(), demo.distractor.strip())


def markdown_text(text: str) -> str:
    """`text` shown as written (a glob's `*` is not emphasis)."""
    return re.sub(r"([\\`*_\[\]<>$~|])", r"\\\1", text)


def show_notes(notes) -> None:
    """The server's notes on what it did with an input, as written."""
    for note in notes:
        st.caption(markdown_text(note))


def resolved_target(ctx: Context, prompt: Prompt, target: str, distractor: str | None = None,
                    what: str = "target") -> Resolved | None:
    """The target as the server reads it (its notes shown as written); None after showing its refusal,
    so nothing is computed for a target the model cannot have."""
    try:
        r = resolve_target(ctx, prompt, target, distractor)
    except (TdbError, ValueError) as e:
        show_error(e, what)
        return None
    show_notes(r.notes)
    return r


def prompt_input(ctx: Context, key: str = state.PROMPT, label: str = "Prompt", **kw) -> Prompt | None:
    """The prompt box (its text lives in the URL, shared by every page) and the prompt's tokens."""
    help_ = None if ctx.model.has_tokenizer else "This model has no tokenizer: type token ids separated by spaces."
    text = state.url_text_input(label, key, example_prompt(ctx), area=True, height=80, help=help_, **kw)
    try:
        return make_prompt(ctx, text)
    except ValueError as e:
        st.error(str(e), icon=":material/warning:")
        return None


def show_tokens(prompt: Prompt, label: str = "") -> None:
    """The token strip; a token the tokenizer wrote for text it cannot represent is marked, and a warning
    says how many there are."""
    unknown = set(prompt.unknown)
    st.caption((f"{label}: " if label else "") + f"{len(prompt)} tokens: " + " ".join(
        f":red-background[`{show_token(t)}`]" if i in unknown else f"`{show_token(t)}`"
        for i, t in enumerate(prompt.tokens)))
    if unknown:
        tok = prompt.tokens[min(unknown)]
        st.warning(f"{len(unknown)} of {len(prompt)} tokens are not in the model's vocabulary: the tokenizer wrote "
                   f"its unknown token `{tok}` for them (marked in red), so the model does not see those words.",
                   icon=":material/warning:")


def position_select(prompt: Prompt, label: str = "Position", **kw) -> int:
    """A position of `prompt` (shown by its labels), bound to the URL (`?pos=`, shared by the pages). A
    position past the prompt's end (chosen on a longer prompt, or a link's) becomes the last position,
    and a note under the box says so."""
    n = len(prompt)
    held = state.held_value(state.POS, int)
    moved = held is not None and not 0 <= held < n
    if moved:
        state.set_value(state.POS, n - 1)
    pos = state.url_selectbox(label, state.POS, range(n), n - 1, parse=int, format_func=lambda i: prompt.labels[i],
                              **kw)
    if moved:
        st.caption(f"Position {held} is past the end of this {n}-token prompt: showing the last position "
                   f"({markdown_text(prompt.labels[n - 1])}).")
    return pos


def not_available(ctx: Context, what: str, needs: Sequence[str], issue: str) -> bool:
    """Say so (and return True) when the server does not offer any of the analyses `needs`."""
    if any(ctx.has_analysis(n) for n in needs):
        return False
    offered = ", ".join(ctx.info.analyses) or "none"
    st.info(f"**{what}** is not available on this server yet: it needs the server analyses "
            f"{', '.join(f'`{n}`' for n in needs)} ({issue}). This server offers: {offered}.", icon=":material/construction:")
    return True


def summary_row(name: str, s: TensorSummary | None) -> dict:
    if s is None:
        return {"name": name}
    return {"name": name, "shape": "×".join(map(str, s.shape)), "dtype": s.dtype, "mean": s.mean, "std": s.std,
            "min": s.min, "max": s.max, "norm": s.norm, "nan": s.nan_count, "inf": s.inf_count}


def _default_axes(dims: Sequence[str]) -> tuple[int, int]:
    """Rows = the (query) position axis when there is one, columns = the last axis."""
    n = len(dims)
    rows = next((i for i, d in enumerate(dims) if d in ("query_pos", "pos") and i != n - 1), max(0, n - 2))
    return rows, n - 1


def tensor_view(arr: np.ndarray, dims: Sequence[str], key: str, *, tokens: Sequence[str] | None = None,
                title: str = "", max_width: int = 340, n_positions: int | None = None) -> None:
    """A tensor as a heatmap (pick the row and column axes, index the others) or a histogram. Position
    axes are labelled with `tokens` (the prompt's). `n_positions`: how many positions the forward at hand
    has seen (default len(tokens)); a shorter position axis holds the newest of them, as a generation
    step's forward with the KV cache does (its queries are the fed-back token alone)."""
    arr = np.asarray(arr)
    if arr.ndim == 0:
        st.metric(title or "value", f"{float(arr):.6g}")
        return
    dims = list(dims) if len(dims) == arr.ndim else [f"dim{i}" for i in range(arr.ndim)]
    kind = st.radio("view", ["heatmap", "histogram"], horizontal=True, key=f"{key}.kind", label_visibility="collapsed")
    if kind == "histogram":
        st.altair_chart(charts.histogram(arr, title=title), width="content")
        return
    if arr.ndim == 1:
        arr, dims = arr[None, :], ["", dims[0]]
    r0, c0 = _default_axes(dims)
    names = [f"{i}: {d} ({n})" for i, (d, n) in enumerate(zip(dims, arr.shape))]
    a, b = st.columns(2)
    rows = a.selectbox("rows", range(arr.ndim), index=r0, format_func=names.__getitem__, key=f"{key}.rows")
    cols = b.selectbox("columns", range(arr.ndim), index=c0, format_func=names.__getitem__, key=f"{key}.cols")
    if rows == cols:
        st.warning("pick two different axes")
        return
    index: list[object] = [slice(None)] * arr.ndim
    others = [i for i in range(arr.ndim) if i not in (rows, cols)]
    if others:
        boxes = st.columns(len(others))
        for box, i in zip(boxes, others):
            index[i] = int(box.number_input(f"{dims[i]} index", 0, arr.shape[i] - 1, 0, key=f"{key}.idx{i}"))
    z = arr[tuple(index)]
    if rows > cols:
        z = z.T                                   # [rows, cols]
    cut = z.shape[0] > MAX_ROWS or z.shape[1] > MAX_COLS
    z = z[:MAX_ROWS, :MAX_COLS]

    def labels(axis: int, n: int) -> list[str]:
        if tokens is None or dims[axis] not in ("pos", "query_pos", "key_pos"):
            return [str(i) for i in range(n)]
        start = max(0, (len(tokens) if n_positions is None else n_positions) - arr.shape[axis])
        return [f"{p} {show_token(tokens[p])}" if p < len(tokens) else str(p) for p in range(start, start + n)]

    st.altair_chart(charts.heatmap(z, labels(rows, z.shape[0]), labels(cols, z.shape[1]), title=title,
                                   row_title=dims[rows], col_title=dims[cols], max_width=max_width),
                    width="content")
    if cut:
        st.caption(f"showing the first {MAX_ROWS} rows × {MAX_COLS} columns")


def top_tokens_table(rows: Sequence[tuple[int, str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"token": show_token(t), "id": i, "prob": p, "logit": lg} for i, t, p, lg in rows])
