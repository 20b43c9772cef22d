"""Patching: activation-patching sweeps (clean vs corrupted prompts) as layer × head / layer × position
heatmaps, attribution vs exact, CSV download.

Needs the server's sweep analyses (the patching-at-scale issue); until the server advertises them the
page says so, with the prompts already in place, and shows no made-up result.
"""

from __future__ import annotations

import streamlit as st

from .. import state
from ..connection import Context
from ..runs import make_prompt
from ..widgets import example_prompt, not_available

TITLE, ICON = "Patching", ":material/healing:"
SWEEPS = ("patch_sweep", "activation_patching", "attribution_patching")
CORRUPTED_EXAMPLE = ("When Mr. Bingley entered the room, Elizabeth coloured, and Mrs. Bennet was all civility. "
                     "Nobody spoke for some minutes, till at last Mr.")


def render(ctx: Context) -> None:
    st.header(f"{ICON} Patching")
    a, b = st.columns(2)
    with a:
        clean = state.url_text_input("Clean prompt", state.PROMPT, example_prompt(ctx), area=True, height=80)
    with b:
        corrupted = state.url_text_input("Corrupted prompt", state.PROMPT2, "", area=True, height=80,
                                         placeholder=CORRUPTED_EXAMPLE)
    for label, text in (("clean", clean), ("corrupted", corrupted)):
        try:
            p = make_prompt(ctx, text)
            if p is not None:
                st.caption(f"{label}: {len(p)} tokens")
        except ValueError as e:
            st.error(f"{label} prompt: {e}", icon=":material/warning:")
    if not_available(ctx, "Activation-patching sweeps", SWEEPS, "the patching-at-scale issue"):
        return
    st.info("This server offers patching sweeps, but this dashboard does not show them yet.", icon=":material/construction:")
