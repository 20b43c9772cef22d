"""The app shell: page config, the sidebar (page picker, connection status, model info) and dispatch.

Pages are picked with `?page=` rather than Streamlit's multipage navigation, because the whole view
state (server, prompt, tokens, layer, head, component...) must survive a page switch in the query
string: one URL is one view, shareable as it is.
"""

from __future__ import annotations

import streamlit as st

from tdb_client import TdbError

from . import state
from .connection import Context, connect, describe, ignore_foreign_server, server_address, show_error, signed_in
from .views import PAGES


def _sidebar_model(ctx: Context) -> None:
    m, info = ctx.model, ctx.info
    st.sidebar.success(f"connected to `{ctx.address}`", icon=":material/check_circle:")
    st.sidebar.markdown(
        f"**{m.name}** · {m.architecture}  \n"
        f"{m.n_layers} layers · {m.n_heads} heads"
        + (f" ({m.n_kv_heads} kv)" if m.n_kv_heads and m.n_kv_heads != m.n_heads else "")
        + f" · d_model {m.d_model} · d_mlp {m.d_mlp}  \n"
        f"vocab {m.vocab_size:,} · {m.dtype} on {m.device}"
        + ("" if m.has_tokenizer else "  \n_no tokenizer: prompts are token ids_"))
    with st.sidebar.expander("server"):
        st.caption(f"tdb server {info.server_version}, protocol {info.protocol_version}")
        st.caption("analyses: " + (", ".join(info.analyses) or "none yet"))


def _attach(ctx: Context) -> None:
    path = st.session_state.get("sidebar.sae_path", "").strip()
    st.session_state.pop("sidebar.sae_message", None)
    if not path:
        return
    try:
        info = ctx.client.attach_sae(path)
    except TdbError as e:
        st.session_state["sidebar.sae_message"] = ("error", describe(e, ctx.address))
        return
    st.session_state["sidebar.sae_message"] = ("success", f"attached {info.name or info.path} at {info.site} "
                                                          f"({info.d_sae} latents)")
    st.session_state["sidebar.sae_path"] = ""


def _sidebar_saes(ctx: Context) -> None:
    """The SAEs attached to the server's model, and a box to attach one from a file the server may read."""
    with st.sidebar.expander("SAEs"):
        try:
            saes = ctx.client.list_saes()
        except TdbError as e:
            st.caption(describe(e, ctx.address))
            saes = []
        for sae in saes:
            st.caption(f"`{sae.site}` · {sae.name or sae.architecture} · {sae.d_sae} latents: "
                       f"`{sae.unit_prefix}K` (node type sae_latent on Explore)")
        if not saes:
            st.caption("none attached")
        st.text_input("attach an SAE (a folder or file on the server)", key="sidebar.sae_path",
                      placeholder="/path/to/sae")
        st.button("Attach", key="sidebar.sae_attach", on_click=_attach, args=(ctx,), icon=":material/add_link:")
        said = st.session_state.get("sidebar.sae_message")
        if said:
            (st.error if said[0] == "error" else st.success)(said[1])


def main() -> None:
    st.set_page_config(page_title="tdb — transformer debugger", page_icon=":material/biotech:", layout="wide")
    if not signed_in():
        st.stop()
    ignore_foreign_server()
    st.sidebar.title(":material/biotech: tdb")
    keys = list(PAGES)
    page = state.url_selectbox("Page", state.PAGE, keys, widget=st.sidebar.radio,
                               format_func=lambda k: f"{PAGES[k].ICON} {PAGES[k].TITLE}")
    ctx = connect()
    if ctx is None:
        st.sidebar.error(f"not connected ({server_address()})", icon=":material/error:")
        st.stop()
    _sidebar_model(ctx)
    _sidebar_saes(ctx)
    try:
        PAGES[page].render(ctx)
    except TdbError as e:
        show_error(e)
    except Exception as e:  # a bug in a page: a message and the details, never a bare traceback
        show_error(e, f"the {PAGES[page].TITLE} page failed")
