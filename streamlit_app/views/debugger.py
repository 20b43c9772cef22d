"""Debugger: breakpoints on sites, launch (one forward pass, or generation of N new tokens), continue /
step into / over / out / to the next token, the stack, variables (tensor summaries, expandable to a
heatmap or a histogram), a patch at the stop, the text generated so far, and the event log.

With generation, breakpoints and patches can be limited to some generation steps (step 0 is the
prompt's forward pass; step i the forward pass that produces new token i).

The run lives on the server in this user's "debugger" session, so it stays paused between reruns of
the page; every rerun asks the server where it stands (`status()`), and polls new events.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from streamlit.errors import StreamlitAPIException

from tdb_client import Breakpoint, Generate, RunStatus, Session, TdbError

from .. import charts, state
from ..connection import Context, attempt, show_error, shown_errors
from ..runs import Prompt
from ..widgets import prompt_input, show_tokens, summary_row, tensor_view

TITLE, ICON = "Debugger", ":material/bug_report:"
EVENT_LOG_SIZE = 200
K_EVENTS, K_SEQ, K_BPS, K_TOKENS = "dbg.events", "dbg.seq", "dbg.bps_set", "dbg.tokens"
K_GENERATING = "dbg.generating"
K_ACTION_ERROR = "dbg.action_error"   # (action, error) of a step that failed, shown on the next run
MAX_NEW_TOKENS = 64


def steps_range(text: str) -> tuple[int, int] | None:
    """"2" -> (2, 2), "1-3" -> (1, 3), "" -> None (every step); ValueError otherwise."""
    text = text.strip()
    if not text:
        return None
    first, _, last = text.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"generation steps: expected N or FIRST-LAST, got {text!r}") from None
    if a < 0 or b < a:
        raise ValueError(f"generation steps: expected 0 <= FIRST <= LAST, got {text!r}")
    return a, b


def _breakpoints(ctx: Context, s: Session) -> None:
    """The breakpoints editor: sites from the model, plus units / globs; sent when they change. A link's
    `?bp=` name that is not one of the sites (a unit, a glob, a typo) goes to the units-or-globs box, where
    the server judges it (its refusal shown below), instead of being dropped by the site picker."""
    sites = ctx.model.site_names
    unlisted = state.url_unlisted(state.BREAKPOINTS, sites)
    if unlisted:
        state.set_value("bpx", ", ".join([e for e in [state.url_get("bpx")] if e.strip()] + unlisted))
        st.caption(f"From the link's breakpoints, {', '.join(f'`{n}`' for n in unlisted)} "
                   f"{'is' if len(unlisted) == 1 else 'are'} not among the model's sites: moved to "
                   "“…and units or globs”, where the server checks them.")
    picked = state.url_multiselect("Break at sites", state.BREAKPOINTS, sites, placeholder="pick sites…")
    extra = state.url_text_input("…and units or globs", "bpx", "",
                                 placeholder="blocks.1.attn.head.2, blocks.*.mlp.out",
                                 help="A unit (blocks.L.attn.head.H, blocks.L.mlp.neuron.N) or a glob over sites.")
    c, g = st.columns([3, 2])
    with c:
        cond = state.url_text_input("Condition (optional)", "cond", "", placeholder="norm > 40, any_nan",
                                    help="Stop only when this holds for the value at the site.")
    with g:
        steps_text = state.url_text_input("In generation steps", "bpsteps", "", placeholder="every step",
                                          help="Generation only: N or FIRST-LAST (0 = the prompt's forward pass, "
                                               "i = the pass that produces new token i).")
    try:
        steps = steps_range(steps_text)
    except ValueError as e:
        st.error(str(e), icon=":material/warning:")
        return
    names = picked + [e.strip() for e in extra.split(",") if e.strip()]
    want = (tuple(names), cond, steps)
    if st.session_state.get(K_BPS) != (s.id, want):
        statuses = attempt(lambda: s.set_breakpoints([Breakpoint(n, condition=cond, tokens=steps) for n in names]),
                           "breakpoints")
        if statuses is None:
            return
        st.session_state[K_BPS] = (s.id, want)
        st.session_state["dbg.bp_status"] = statuses
    for b in st.session_state.get("dbg.bp_status", []):
        if not b.verified:
            st.warning(f"breakpoint {b.id} not verified: {b.message}", icon=":material/warning:")


def _generation_options() -> Generate | None:
    """New tokens to generate (0: one forward pass) and whether to stop at every token."""
    a, b = st.columns(2)
    n = a.number_input("New tokens to generate", 0, MAX_NEW_TOKENS, 0, key="dbg.new_tokens",
                       help="0: one forward pass of the prompt; N: generate N tokens (greedy), step by token")
    every = b.checkbox("stop at every token", value=True, key="dbg.stop_tokens", disabled=n == 0)
    return Generate(int(n), stop_at_tokens=every) if n else None


def _step(s: Session, action: str) -> None:
    """A step button's callback: it runs before the page does, so the toolbar is drawn once, for the new
    state (an error is kept to be shown)."""
    st.session_state.pop(K_ACTION_ERROR, None)
    try:
        if action == "continue":
            s.continue_()
        elif action == "terminate":
            s.terminate()
        else:
            s.step(action)
    except (TdbError, ValueError) as e:
        st.session_state[K_ACTION_ERROR] = (action, e)


def _controls(s: Session, status: RunStatus, prompt: Prompt | None, generate: Generate | None) -> None:
    paused = status.state == "paused"
    live = status.state in ("paused", "running")
    generating = bool(st.session_state.get(K_GENERATING)) and live
    cols = st.columns([1.1, 1.35, 1, 1, 1, 1.1, 1, 1.6], vertical_alignment="center")   # labels fit at 1280 px
    stop_on_entry = cols[7].checkbox("stop on entry", key="dbg.entry", help="Pause before the first site runs.")
    launch = cols[0].button("Launch", icon=":material/play_arrow:", type="primary", disabled=prompt is None,
                            key="dbg.launch")
    steps = {
        "continue": (cols[1], "Continue", ":material/fast_forward:", not paused, None),
        "into": (cols[2], "Into", ":material/subdirectory_arrow_right:", not paused, "step into: the next site"),
        "over": (cols[3], "Over", ":material/redo:", not paused, "step over: past the current block"),
        "out": (cols[4], "Out", ":material/north_east:", not paused, "step out: end of the enclosing module"),
        "token": (cols[5], "Token", ":material/skip_next:", not (paused and generating),
                  "generation: run to the next token"),
        "terminate": (cols[6], "Stop", ":material/stop:", not live, None),
    }
    for action, (col, label, icon, disabled, help_) in steps.items():
        col.button(label, icon=icon, disabled=disabled, key=f"dbg.{action}", help=help_, on_click=_step,
                   args=(s, action))
    failed = st.session_state.pop(K_ACTION_ERROR, None)
    if failed:
        show_error(failed[1], failed[0])
    if not launch:
        return
    with shown_errors("launch"):
        if live:
            s.terminate()
        assert prompt is not None
        st.session_state[K_TOKENS] = prompt.tokens
        st.session_state[K_GENERATING] = generate is not None
        s.launch(token_ids=[list(prompt.ids)], stop_on_entry=stop_on_entry, generate=generate)
        _rerun_panel()  # redraw the toolbar for the new state (the launch reads this run's prompt)


def _rerun_panel() -> None:
    """Rerun the run panel (the fragment) only; the whole page when it is running as part of the page."""
    try:
        st.rerun(scope="fragment")
    except StreamlitAPIException:
        st.rerun()


def _status_line(status: RunStatus) -> None:
    generating = bool(st.session_state.get(K_GENERATING))
    if status.state == "paused" and status.stop:
        where = f"`{status.stop.site}` ({status.stop.when})" if status.stop.site else "a token boundary"
        step = f" in generation step {status.stop.token}" if generating else ""
        st.success(f"**paused** at {where}{step} — {status.stop.reason}"
                   + (f": {status.stop.description}" if status.stop.description else ""), icon=":material/pause_circle:")
    elif status.state == "exited":
        st.info("the run finished", icon=":material/flag:")
    elif status.state == "failed":
        msg = status.result.exception if status.result else ""
        st.error(f"the run failed: {msg}", icon=":material/error:")
    elif status.state == "idle":
        st.caption("no run yet: pick breakpoints and press Launch")
    else:
        st.caption(f"run state: {status.state}")


def _stack_and_variables(ctx: Context, s: Session, status: RunStatus, inspector) -> None:
    """Stack and variables table here; the selected variable's tensor in `inspector` (a column)."""
    frames = s.stack()
    if not frames:
        return
    st.markdown("**Stack**")
    names = [f.name for f in frames]
    pick = st.radio("stack", range(len(frames)), format_func=names.__getitem__, key=f"dbg.frame.{status.stop.stop_id}",
                    label_visibility="collapsed")
    frame = frames[pick]
    rows, variables = [], {}
    for scope in s.scopes(frame):
        for v in s.variables(scope):
            label = f"{scope.name}: {v.name}"
            variables[label] = v
            rows.append({"scope": scope.name, **summary_row(v.name, v.summary)})
    st.markdown("**Variables**")
    if not rows:
        st.caption("nothing captured in this frame")
        return
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.4g")
                                for c in ("mean", "std", "min", "max", "norm")})
    with inspector:
        label = st.selectbox("Inspect", list(variables), key="dbg.inspect")
        v = variables[label]
        if v.summary is None:
            st.code(v.value)
            return
        st.caption(f"`{v.name}` — {v.type}")
        arr = attempt(lambda: s.read(v.evaluate_name), f"read {v.name}")
        if arr is not None:
            site = v.name if v.name in ctx.model.site_names else (status.site or "")
            dims = next((x.dims for x in ctx.model.sites if x.name == site), ())
            tokens = st.session_state.get(K_TOKENS)
            fed = len(tokens) + status.stop.token if tokens is not None and status.stop else None  # + tokens fed back
            tensor_view(arr, dims, key=f"dbg.view.{label}", tokens=tokens, title=v.name, n_positions=fed)


def _patch_form(ctx: Context, s: Session, status: RunStatus) -> None:
    with st.expander("Patch at this stop"):
        with st.form("dbg.patch"):
            site = st.text_input("site or unit", value=status.site or "", key="dbg.patch.site",
                                 help="e.g. blocks.1.attn.out, blocks.1.attn.head.2, blocks.0.mlp.neuron.7")
            ops = [o for o in ctx.info.patch_ops if o != "copy_from_run"] or ["zero", "scale", "add", "set", "mean"]
            a, b = st.columns(2)
            op = a.selectbox("op", ops, key="dbg.patch.op")
            scalar = b.number_input("value (set / add / scale)", value=0.0, key="dbg.patch.scalar")
            c, d, e, f = st.columns(4)
            positions = c.text_input("positions", placeholder="all", key="dbg.patch.pos")
            heads = d.text_input("heads", placeholder="all", key="dbg.patch.heads")
            neurons = e.text_input("neurons", placeholder="all", key="dbg.patch.neurons")
            steps = f.text_input("generation steps", placeholder="all", key="dbg.patch.steps",
                                 help="generation only: apply in these steps (e.g. 2 3)")
            if st.form_submit_button("Apply patch"):
                with shown_errors("patch"):
                    ints = [_ints(x) for x in (positions, heads, neurons, steps)]
                    value = scalar if op == "set" else None
                    r = s.patch(site.strip(), op, value, scalar=scalar, positions=ints[0], heads=ints[1],
                                neurons=ints[2], tokens=ints[3])
                    st.success(f"patch {r.patch_id}: {'applied now' if r.applied_now else 'pending'} "
                               f"(scope: {r.scope}) {r.message}")


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"expected integers separated by commas, got {text!r}") from None


def _events(s: Session) -> None:
    log: list[dict] = st.session_state.setdefault(f"{K_EVENTS}.{s.id}", [])
    seq = st.session_state.get(f"{K_SEQ}.{s.id}", 0)
    events, last, _ = s.poll_events(after_seq=seq, timeout=0.0)
    for e in events:
        what = e.stop.site if e.stop else (e.text or "")
        if e.kind == "stopped" and e.stop:
            what = f"{e.stop.site} ({e.stop.reason})"
        if e.kind == "run_exited" and e.result and e.result.top and e.result.top[0]:
            t = e.result.top[0][0]
            what = f"top token {t.text!r} p={t.prob:.3f}"
        log.append({"seq": e.seq, "run": e.run_id, "event": e.kind, "detail": what})
    st.session_state[f"{K_SEQ}.{s.id}"] = max(seq, last)
    del log[:-EVENT_LOG_SIZE]
    with st.expander(f"Event log ({len(log)})", expanded=False):
        if log:
            st.dataframe(pd.DataFrame(log[::-1]), hide_index=True, width="stretch", height=240)


def _generated(s: Session, status: RunStatus, prompt: Prompt | None) -> None:
    """The text so far: the prompt, then the tokens generated up to this stop (the server's result)."""
    if not st.session_state.get(K_GENERATING) or status.state not in ("paused", "exited", "terminated"):
        return
    r = attempt(lambda: s.result(top_k=1, include_logits=False), "the generated text")
    if r is None or not r.generated:
        return
    text = r.generated_text[0] if r.generated_text else ""
    st.markdown(f"**Generated so far** ({len(r.generated[0])} tokens)")
    st.code((prompt.text if prompt is not None else "") + "⟦" + text + "⟧", language=None, wrap_lines=True)


def _result(s: Session, status: RunStatus) -> None:
    if status.state != "exited":
        return
    r = attempt(lambda: s.result(top_k=10, include_logits=False), "result")
    if r and r.top:
        top = r.top[0]
        st.markdown("**Next-token candidates**")
        st.altair_chart(charts.prob_bars([t.text for t in top], [t.prob for t in top]), width="content")


def render(ctx: Context) -> None:
    st.header(f"{ICON} Debugger")
    s = ctx.session("debugger")
    a, b = st.columns([3, 2], gap="large")
    with a:
        prompt = prompt_input(ctx)
        if prompt is not None:
            show_tokens(prompt)
    with b:
        _breakpoints(ctx, s)
        generate = _generation_options()
    _run_panel(ctx, prompt, generate)


@st.fragment
def _run_panel(ctx: Context, prompt: Prompt | None, generate: Generate | None) -> None:
    """The toolbar and what the run shows: a fragment, so a step reruns this part of the page only."""
    s = ctx.session("debugger")
    status = s.status()
    _controls(s, status, prompt, generate)
    _status_line(status)
    _generated(s, status, prompt)
    if status.state == "paused":
        left, right = st.columns([1, 1], gap="large")
        with left:
            with shown_errors("inspect"):
                _stack_and_variables(ctx, s, status, right)
            _patch_form(ctx, s, status)
    _result(s, status)
    _events(s)
    _recording(ctx, s)


def _recording(ctx: Context, s: Session) -> None:
    """Download this session as a recording (a good bug report), or replay one on this server."""
    with st.expander("Record and replay", expanded=False):
        # exported when clicked (on its own thread), not at every step: a long session's recording is large
        st.download_button("Download this session's recording", s.export_recording, file_name="tdb-session.tdbrec.json",
                           mime="application/json", icon=":material/download:", key="debugger.rec.download",
                           on_click="ignore")
        up = st.file_uploader("Replay a recording on this server", type=["json"], key="debugger.rec.upload")
        if up is not None and st.button("Replay", key="debugger.rec.replay", icon=":material/replay:"):
            report = attempt(lambda: ctx.client.replay(up.getvalue().decode("utf-8")), "replaying")
            if report is not None:
                line = (f"{report.actions} actions, {report.stops_checked} stops and {report.reads_checked} reads "
                        "checked")
                if report.ok:
                    st.success(f"Replayed bit for bit: {line}.", icon=":material/check_circle:")
                else:
                    st.error(f"{len(report.mismatches)} mismatches ({line}):\n\n"
                             + "\n".join(f"- {m}" for m in report.mismatches[:20]), icon=":material/warning:")
