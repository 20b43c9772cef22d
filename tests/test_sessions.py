"""Debug sessions through the real wire: breakpoints, stepping, inspection, patching, events, errors.

Reference numbers come from plain HF forwards with plain torch hooks written here, never from tdb."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch

from tdb.v1 import debugger_pb2 as pb, debugger_pb2_grpc
from tdb_client import Breakpoint, EventCollector, Session, TdbClient, TdbError
from tdb_server.model import all_sites

IDS = [[5, 17, 42, 8, 99, 5, 17, 42, 3, 61]]


def hf_logits(adapter, ids, zero_head: tuple[int, int] | None = None, pre_hooks=()):
    """Plain HF forward (optionally with one head's input to the output projection zeroed)."""
    model = adapter.model
    handles = []
    if zero_head is not None:
        layer, head = zero_head
        dh = adapter.info.d_head

        def hook(module, args):
            x = args[0].clone()
            x[..., head * dh:(head + 1) * dh] = 0
            return (x,)

        handles.append(model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(hook))
    for module, fn in pre_hooks:
        handles.append(module.register_forward_pre_hook(fn))
    try:
        with torch.no_grad():
            return model(torch.tensor(ids)).logits[:, -1].float().numpy()
    finally:
        for h in handles:
            h.remove()


def wait_no_hooks(adapter, timeout=10.0):
    deadline = time.monotonic() + timeout
    while adapter.installed_hook_count() and time.monotonic() < deadline:
        time.sleep(0.02)
    return adapter.installed_hook_count()


# -- the transcript --------------------------------------------------------------------------------

def test_transcript_break_read_zero_head_continue(client, gpt2_adapter):
    with client.session() as s:
        [bp] = s.set_breakpoints(["blocks.1.attn.out"])
        assert bp.verified and bp.sites == ("blocks.1.attn.out",)
        stop = s.launch(token_ids=IDS, capture=["*"])              # every site, attention patterns too
        assert stop.state == "paused" and stop.site == "blocks.1.attn.out" and stop.stop.reason == "breakpoint"
        assert stop.stop.value.shape == (1, 10, gpt2_adapter.info.d_model)
        assert [f.name for f in s.stack()] == ["blocks.1.attn.out", "blocks.1.attn", "blocks.1", "model"]
        pattern = s.read("blocks.1.attn.pattern")
        assert pattern.shape == (1, 4, 10, 10)
        np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
        assert np.allclose(np.triu(pattern[0, 0], 1), 0)           # causal
        resid = s.read("blocks.1.resid_pre")
        assert resid.shape == (1, 10, gpt2_adapter.info.d_model)
        p = s.patch("blocks.1.attn.head.2", "zero")
        assert p.applied_now and p.scope == "run"
        done = s.continue_()
        assert done.state == "exited"
        got = s.result().last_logits
    want = hf_logits(gpt2_adapter, IDS, zero_head=(1, 2))
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(want - hf_logits(gpt2_adapter, IDS)).max() > 1e-4   # the patch mattered
    assert wait_no_hooks(gpt2_adapter) == 0


def test_plain_run_equals_hf_and_reports_top_tokens(client, gpt2_adapter):
    with client.session() as s:
        st = s.launch(token_ids=IDS)
        assert st.state == "exited"
        res = s.result(top_k=5)
    want = hf_logits(gpt2_adapter, IDS)
    assert np.abs(res.last_logits - want).max() <= 1e-5
    assert [t.token_id for t in res.top[0]] == list(np.argsort(-want[0])[:5])
    assert abs(sum(np.exp(want[0] - want[0].max()) / np.exp(want[0] - want[0].max()).sum()) - 1) < 1e-6


# -- stepping --------------------------------------------------------------------------------------

@pytest.mark.parametrize("capture", [["*"], []])
def test_step_into_visits_every_site_in_documented_order(client, gpt2_adapter, capture):
    """Every site the run computes: with capture ["*"] the attention patterns too, by default all but them."""
    with client.session() as s:
        st = s.launch(token_ids=IDS, stop_on_entry=True, capture=capture)
        assert st.stop.reason == "entry" and st.stop.when == "before" and st.site == "embed"
        seen = []
        while True:
            st = s.step("into")
            if st.state != "paused":
                break
            seen.append(st.site)
        assert st.state == "exited"
    want = all_sites(gpt2_adapter.info.n_layers)
    assert seen == (want if capture else [x for x in want if not x.endswith(".attn.pattern")])


@pytest.mark.parametrize("start,kind,expected", [
    ("blocks.0.attn.q", "over", "blocks.1.resid_pre"),
    ("blocks.1.mlp.pre", "over", "final_norm"),
    ("embed", "over", "blocks.0.resid_pre"),
    ("blocks.0.attn.q", "out", "blocks.0.attn.out"),
    ("blocks.0.attn.out", "out", "blocks.0.resid_post"),
    ("blocks.0.mlp.pre", "out", "blocks.0.mlp.out"),
    ("blocks.0.resid_mid", "out", "blocks.0.resid_post"),
    ("blocks.0.resid_post", "out", "logits"),
    ("blocks.1.attn.k", "into", "blocks.1.attn.v"),
])
def test_step_over_and_out(client, start, kind, expected):
    with client.session() as s:
        s.set_breakpoints([start])
        assert s.launch(token_ids=IDS).site == start
        s.set_breakpoints([])
        st = s.step(kind)
        assert (st.state, st.site) == ("paused", expected)
        assert st.stop.reason == "step"
        s.terminate()


def test_step_out_from_logits_runs_to_the_end(client):
    with client.session() as s:
        s.set_breakpoints(["logits"])
        s.launch(token_ids=IDS)
        assert s.step("out").state == "exited"


# -- breakpoints -----------------------------------------------------------------------------------

def test_conditional_breakpoint_stops_exactly_where_condition_holds(client):
    with client.session() as s:
        s.launch(token_ids=IDS)
        norms = {L: s.stats(f"blocks.{L}.resid_post").norm for L in range(2)}
        threshold = (norms[0] + norms[1]) / 2
        hi = max(norms, key=norms.get)
        [bp] = s.set_breakpoints([Breakpoint("blocks.*.resid_post", condition=f"norm > {threshold}")])
        assert bp.verified
        st = s.launch(token_ids=IDS)
        assert st.site == f"blocks.{hi}.resid_post" and st.stop.hit_breakpoint_ids == (1,)
        assert s.continue_().state == "exited"
        s.set_breakpoints([Breakpoint("blocks.*.resid_post", condition="any_nan")])
        assert s.launch(token_ids=IDS).state == "exited"


def test_hit_count_breakpoint(client):
    with client.session() as s:
        s.set_breakpoints([Breakpoint("blocks.*.attn.out", hit_condition="2")])
        st = s.launch(token_ids=IDS)
        assert st.site == "blocks.1.attn.out"
        assert s.continue_().state == "exited"
        s.set_breakpoints([Breakpoint("blocks.*.mlp.*", hit_condition="%3")])
        st = s.launch(token_ids=IDS)
        assert st.site == "blocks.0.mlp.out"      # mlp.pre, mlp.post, mlp.out: the 3rd hit
        assert s.continue_().site == "blocks.1.mlp.out"
        s.terminate()


def test_hit_counts_survive_the_set_being_sent_again(client):
    """An IDE sends every breakpoint again when one changes: the unchanged ones keep counting."""
    with client.session() as s:
        s.set_breakpoints([Breakpoint("blocks.*.mlp.*", hit_condition=">=2")])
        assert s.launch(token_ids=IDS).site == "blocks.0.mlp.post"          # the 2nd hit
        s.set_breakpoints([Breakpoint("blocks.*.mlp.*", hit_condition=">=2"), Breakpoint("blocks.1.attn.out")])
        assert s.continue_().site == "blocks.0.mlp.out"                     # the 3rd: the count went on
        s.terminate()


def test_log_point_emits_output_and_does_not_stop(client):
    with client.session() as s:
        s.set_breakpoints([Breakpoint("blocks.0.attn.out", log_message="attn0 norm={norm} at {site}")])
        st = s.launch(token_ids=IDS)
        assert st.state == "exited"
        events, _, _ = s.poll_events()
        outs = [e for e in events if e.kind == "output"]
        assert len(outs) == 1 and outs[0].text.startswith("attn0 norm=") and "blocks.0.attn.out" in outs[0].text
        norm = float(outs[0].text.split("=")[1].split()[0])
        assert abs(norm - s.stats("blocks.0.attn.out").norm) < 1e-3 * max(1.0, norm)


def test_unit_breakpoint_with_condition_on_the_neuron(client):
    with client.session() as s:
        s.launch(token_ids=IDS)
        post = s.read("blocks.0.mlp.post")
        n = int(post[0].max(0).argmax())
        [bp] = s.set_breakpoints([Breakpoint(f"blocks.0.mlp.neuron.{n}", condition=f"max >= {post[0, :, n].max()}")])
        assert bp.sites == ("blocks.0.mlp.post",)
        st = s.launch(token_ids=IDS)
        assert st.site == "blocks.0.mlp.post" and st.stop.value.shape == (1, 10)
        assert abs(st.stop.value.max - post[0, :, n].max()) < 1e-5


def test_unverified_breakpoints_say_why(client):
    with client.session() as s:
        bps = s.set_breakpoints(["blocks.7.attn.out", "blocks.0.atn.out", "blocks.0.attn.head.99", "nothing.*"])
        assert [b.verified for b in bps] == [False] * 4
        assert "0..1" in bps[0].message
        assert "blocks.0.attn.out" in bps[1].message            # the nearest valid name
        assert "head" in bps[2].message


def test_bad_condition_is_invalid_argument(client):
    with client.session() as s:
        with pytest.raises(TdbError) as e:
            s.set_breakpoints([Breakpoint("blocks.0.attn.out", condition="norm >")])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TdbError) as e:
            s.set_breakpoints([Breakpoint("blocks.0.attn.out", hit_condition="often")])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_break_before_then_patch_the_site_that_has_not_run(client, gpt2_adapter):
    with client.session() as s:
        s.set_breakpoints([Breakpoint("blocks.1.attn.out", when="before")])
        st = s.launch(token_ids=IDS)
        assert st.site == "blocks.1.attn.out" and st.stop.when == "before"
        with pytest.raises(TdbError) as e:
            s.read("blocks.1.attn.out")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.reason == "NOT_YET_RUN"
        p = s.patch("blocks.1.attn.head.2", "zero")
        assert not p.applied_now and p.scope == "run"
        assert s.continue_().state == "exited"
        got = s.result().last_logits
    assert np.abs(got - hf_logits(gpt2_adapter, IDS, zero_head=(1, 2))).max() <= 1e-5


# -- patch ops -------------------------------------------------------------------------------------

def _with_resid_pre_patch(adapter, ids, layer, fn):
    block = adapter.model.transformer.h[layer]

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0].clone()), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"].clone())
        return args, kwargs

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            return adapter.model(torch.tensor(ids)).logits[:, -1].numpy()
    finally:
        h.remove()


def test_patch_ops_match_plain_torch(client, gpt2_adapter):
    def scale(x):
        x[:, 3] *= 0.5
        return x

    def add(x):
        x[:, :] += 1.0
        return x

    def mean(x):
        return x.mean(1, keepdim=True).expand_as(x).clone()

    cases = [(dict(op="scale", scalar=0.5, positions=[3]), scale), (dict(op="add", value=1.0), add),
             (dict(op="mean"), mean)]
    for kw, fn in cases:
        with client.session() as s:
            s.patch("blocks.1.resid_pre", **kw)           # session scope: applies to the next run
            assert s.launch(token_ids=IDS).state == "exited"
            got = s.result().last_logits
        want = _with_resid_pre_patch(gpt2_adapter, IDS, 1, fn)
        assert np.abs(got - want).max() <= 1e-5, kw


def test_set_with_a_client_tensor_and_copy_from_run(client, gpt2_adapter):
    other = [[7, 7, 7, 7, 7, 1, 2, 3, 4, 5]]
    with client.session() as s:
        s.launch(token_ids=other)
        src_run = s.status().run_id
        src = s.read("blocks.1.resid_pre")
        s.patch("blocks.1.resid_pre", "copy_from_run", source_run_id=src_run, positions=[-1])
        s.launch(token_ids=IDS)
        got_copy = s.result().last_logits
        s.clear_patches()
        s.set_breakpoints(["blocks.1.resid_pre"])
        s.launch(token_ids=IDS)
        value = np.zeros(gpt2_adapter.info.d_model, dtype=np.float32) + 0.25
        assert s.patch("blocks.1.resid_pre", "set", value, positions=[2]).applied_now
        assert np.allclose(s.read("blocks.1.resid_pre")[0, 2], 0.25)   # the capture shows the patched value
        s.continue_()
        got_set = s.result().last_logits

    def copy(x):
        x[:, -1] = torch.from_numpy(src[:, -1])
        return x

    def set_(x):
        x[:, 2] = 0.25
        return x

    assert np.abs(got_copy - _with_resid_pre_patch(gpt2_adapter, IDS, 1, copy)).max() <= 1e-5
    assert np.abs(got_set - _with_resid_pre_patch(gpt2_adapter, IDS, 1, set_)).max() <= 1e-5


def test_patching_a_site_that_already_ran_is_failed_precondition(client):
    with client.session() as s:
        s.set_breakpoints(["blocks.1.attn.out"])
        s.launch(token_ids=IDS)
        with pytest.raises(TdbError) as e:
            s.patch("blocks.0.mlp.out", "zero")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.reason == "SITE_ALREADY_RAN"
        assert "already ran" in e.value.message
        p = s.patch("blocks.1.mlp.out", "zero")             # not yet run: registered
        assert not p.applied_now
        s.continue_()
        assert np.allclose(s.read("blocks.1.mlp.out"), 0)


def test_exception_inside_the_model_fails_the_run_not_the_rpc(client):
    with client.session() as s:
        d = client.model_info().d_model                                      # 99 positions, the run has 10:
        s.patch("blocks.0.resid_pre", "set", np.ones((1, 99, d), dtype=np.float32))   # fails in the forward
        st = s.launch(token_ids=IDS)
        assert st.state == "failed" and st.stop.reason == "exception"
        assert "does not broadcast" in st.stop.exception
        s.clear_patches()
        assert s.launch(token_ids=IDS).state == "exited"                     # the session lives on


# -- inspection and errors -------------------------------------------------------------------------

def test_scopes_variables_and_evaluate(client, gpt2_adapter):
    with client.session() as s:
        s.set_breakpoints(["blocks.1.attn.out"])
        s.launch(token_ids=IDS, capture=["*"])
        frames = s.stack()
        scopes = {sc.name: sc for sc in s.scopes(frames[0])}
        assert set(scopes) == {"Value", "Captured"}
        [value] = s.variables(scopes["Value"])
        assert value.type.endswith("[1, 10, 32]") and value.indexed_variables == 1
        [row] = s.variables(value)
        kids = s.variables(row, start=2, count=3)
        assert [k.name for k in kids] == ["[2]", "[3]", "[4]"]
        direct = s.read("blocks.1.attn.out")[0, 3]
        assert abs(kids[1].summary.norm - np.linalg.norm(direct)) < 1e-4
        block_vars = s.variables(s.scopes(frames[2])[-1])
        assert [v.name for v in block_vars][:2] == ["blocks.1.resid_pre", "blocks.1.attn.q"]
        model_scopes = {sc.name for sc in s.scopes(frames[3])}
        assert "Patches" in model_scopes
        r = s.evaluate("blocks.1.attn.pattern[0, 2, -1].sum()")
        assert abs(float(r.value) - 1.0) < 1e-5
        top = s.evaluate("logit_lens(blocks.1.resid_pre)[0, -1].topk(3)")
        assert top.value.shape == (2, 3) and len(top.tokens) == 3
        keys = s.evaluate("blocks.1.attn.pattern[0, 2, -1].topk(3)")      # key positions, not token ids
        assert keys.value.shape == (2, 3) and keys.tokens == () and "topk(values=" in keys.text
        kept = s.evaluate("logit_lens(blocks.1.resid_pre)[0].topk(2)[-1]")  # indexing keeps what it was over
        assert len(kept.tokens) == 2
        x = s.evaluate("x.norm()")
        assert abs(float(x.value) - np.linalg.norm(s.read("blocks.1.attn.out"))) < 1e-3
        for method_on_a_site in ("blocks.1.attn.out.norm()", "blocks.1.attn.out.norm ()"):
            assert abs(float(s.evaluate(method_on_a_site).value) - float(x.value)) < 1e-4
        assert s.evaluate("blocks.1.attn.out.abs().max(-1)").value.shape == (1, 10)
        w = s.evaluate("blocks.1.attn.z[0, -1, 2] @ blocks.1.attn.W_O[2]")
        assert w.value.shape == (gpt2_adapter.info.d_model,)
        s.terminate()


def test_stale_references_are_aborted(client):
    with client.session() as s:
        s.set_breakpoints(["blocks.*.attn.out"])
        s.launch(token_ids=IDS)
        frame = s.stack()[0]
        s.continue_()
        with pytest.raises(TdbError) as e:
            s.scopes(frame)
        assert e.value.code == grpc.StatusCode.ABORTED and e.value.reason == "STALE_REFERENCE"
        s.terminate()


def test_errors_have_the_right_codes(client):
    with client.session() as s:
        with pytest.raises(TdbError) as e:
            s.continue_()
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(TdbError) as e:
            s.launch(token_ids=[[1, 2, 100000]])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "BAD_TOKEN_ID"
        with pytest.raises(TdbError) as e:
            s.launch("text", token_ids=[[1]])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        s.set_breakpoints(["blocks.0.attn.out"])
        s.launch(token_ids=IDS)
        with pytest.raises(TdbError) as e:
            s.launch(token_ids=IDS)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and e.value.reason == "RUN_ACTIVE"
        with pytest.raises(TdbError) as e:
            s.read("blocks.0.atn.out")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "blocks.0.attn.out" in e.value.message
        with pytest.raises(TdbError) as e:
            s.read("blocks.0.attn.out", "[0, 99]")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "OUT_OF_RANGE"
        with pytest.raises(TdbError) as e:
            s.evaluate("__import__('os').system('true')")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TdbError) as e:
            s.patch("blocks.1.attn.out", "set")                              # no value
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TdbError) as e:
            s.variables(12345)
        assert e.value.code == grpc.StatusCode.ABORTED
        s.terminate()
        assert s.status().state == "terminated"


def test_terminate_while_paused_and_pause_while_running(client, gpt2_adapter):
    with client.session() as s:
        s.set_breakpoints(["blocks.0.mlp.out"])
        s.launch(token_ids=IDS)
        assert s.terminate().state == "terminated"
        assert wait_no_hooks(gpt2_adapter) == 0
        s.set_breakpoints([])
        st = s.launch(token_ids=IDS, stop_on_entry=True)
        s.continue_(wait=False)
        p = s.pause()                       # the run may already have finished on a fast machine
        assert p.state in ("paused", "exited")
        if p.state == "paused":
            assert p.stop.reason == "pause"
            assert s.continue_().state == "exited"
        assert st.state == "paused"


def test_a_pause_stops_a_run_that_hooks_nothing_in_the_middle_of_its_forward(client, gpt2_adapter):
    """A run with nothing hooked installs none of our hooks, yet it stays pausable: a Pause hooks the rest of
    the forward (on a large model a forward takes seconds). The embedding is made slow here (a hook of the
    test's own), so the Pause lands while the forward runs."""
    started = threading.Event()

    def slow(module, args):
        started.set()
        time.sleep(0.5)

    handle = gpt2_adapter.model.get_input_embeddings().register_forward_pre_hook(slow)
    try:
        with client.session() as s:
            want = s.launch(token_ids=IDS).result.top[0][0].token_id      # the same run, not paused
            started.clear()
            s.launch(token_ids=IDS, capture=["none"], wait=False)
            assert started.wait(10)
            paused = s.pause()
            assert paused.state == "paused" and paused.stop.reason == "pause", paused
            assert paused.stop.site != "logits"                            # the sliced logits never stop
            done = s.continue_()
            assert done.state == "exited" and done.result.top[0][0].token_id == want
    finally:
        handle.remove()
    assert wait_no_hooks(gpt2_adapter) == 0


# -- events ----------------------------------------------------------------------------------------

def test_event_stream_order_and_replay(client):
    with client.session() as s:
        col = EventCollector(s)
        s.set_breakpoints(["blocks.0.attn.out"])
        s.launch(token_ids=IDS)
        s.continue_()
        col.wait_for("run_exited")
        kinds = [e.kind for e in col.events]
        assert kinds[:4] == ["run_started", "stopped", "continued", "run_exited"]
        seqs = [e.seq for e in col.events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        replay, last, truncated = s.poll_events(after_seq=seqs[1])
        assert [e.seq for e in replay] == seqs[2:] and last == seqs[-1] and not truncated
        # a reconnecting stream after seq 1 gets the rest
        it = s.events(after_seq=seqs[0])
        got = [next(it).seq for _ in range(len(seqs) - 1)]
        assert got == seqs[1:]
        it.close()
        col.close()


def test_poll_events_long_poll_wakes_on_new_event(client):
    with client.session() as s:
        _, last, _ = s.poll_events()
        t = threading.Timer(0.3, lambda: s.launch(token_ids=IDS, wait=False))
        t.start()
        t0 = time.monotonic()
        events, _, _ = s.poll_events(after_seq=last, timeout=10)
        assert events and events[0].kind == "run_started" and time.monotonic() - t0 < 5
        t.join()
        s.status(wait=True)


# -- several clients -------------------------------------------------------------------------------

def test_two_clients_interleaved_get_what_each_would_get_alone(gpt2_server, gpt2_adapter):
    other = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]

    def script_a(s, step):
        if step == 0:
            s.set_breakpoints(["blocks.0.mlp.out"])
            return s.launch(token_ids=IDS)
        if step == 1:
            s.patch("blocks.1.attn.head.1", "scale", scalar=3.0)
            return s.step("over")
        return s.continue_()

    def script_b(s, step):
        if step == 0:
            s.set_breakpoints(["blocks.1.attn.out"])
            return s.launch(token_ids=other)
        if step == 1:
            s.patch("blocks.1.attn.out", "zero", positions=[-1])
            return s.step("into")
        return s.continue_()

    def alone(script):
        with TdbClient(gpt2_server) as c, c.session() as s:
            for i in range(3):
                script(s, i)
            return s.result().last_logits

    a_alone, b_alone = alone(script_a), alone(script_b)
    with TdbClient(gpt2_server) as ca, TdbClient(gpt2_server) as cb, ca.session() as sa, cb.session() as sb:
        for i in range(3):
            script_a(sa, i)
            script_b(sb, i)
        a_both, b_both = sa.result().last_logits, sb.result().last_logits
    assert np.array_equal(a_both, a_alone) and np.array_equal(b_both, b_alone)
    assert not np.allclose(a_alone, hf_logits(gpt2_adapter, IDS))


def test_a_client_that_disappears_while_paused_does_not_block_others(gpt2_server, gpt2_adapter):
    gone = TdbClient(gpt2_server)
    s_gone = gone.session(idle_timeout_s=1.0)
    s_gone.set_breakpoints(["blocks.0.attn.out"])
    assert s_gone.launch(token_ids=IDS).state == "paused"
    gone.close()                                    # no CloseSession: the client just went away
    with TdbClient(gpt2_server) as c, c.session() as s:
        s.set_breakpoints(["blocks.1.attn.out"])
        assert s.launch(token_ids=IDS).site == "blocks.1.attn.out"
        assert s.continue_().state == "exited"
        time.sleep(3.0)                             # idle timeout 1 s + reaper interval (any request would touch it)
        with pytest.raises(TdbError) as e:
            Session(c, s_gone.id, 0).status()
        assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert wait_no_hooks(gpt2_adapter) == 0


# -- big reads -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shared_memory", [False, True], ids=["streamed", "shared-memory"])
def test_256_mib_read_arrives_intact(make_server, shared_memory):
    """Streamed in 1 MiB chunks (and in 3 MiB ones: a ragged last chunk), or through shared memory."""
    from tdb_server import shm
    from tdb_server.model import build_random_model

    if shared_memory and not shm.available():
        pytest.skip("no writable /dev/shm")
    big = build_random_model("gpt2", seed=3, vocab_size=65536, n_embd=16, n_layer=1, n_head=2, n_positions=256)
    _, addr = make_server(big)
    ids = torch.randint(0, 65536, (4, 256), generator=torch.Generator().manual_seed(0)).tolist()
    with TdbClient(addr, timeout=300) as c, c.session() as s:
        s.launch(token_ids=ids, capture=["logits"])
        arr = s.read("logits", shared_memory=shared_memory)
        assert arr.nbytes == 256 << 20 and arr.shape == (4, 256, 65536)
        with torch.no_grad():
            want = big.model(torch.tensor(ids)).logits.numpy()
        assert np.array_equal(arr, want)
        if not shared_memory:
            del arr
            assert np.array_equal(s.read("logits", "[0]", chunk_bytes=3 << 20, shared_memory=False), want[0])
        half = s.read("logits", "[1, 10:20]", dtype="float16", shared_memory=shared_memory)
        assert half.dtype == np.float16 and np.array_equal(half, want[1, 10:20].astype(np.float16))


def test_nan_is_reported_once_as_an_event_and_a_watch_stops_on_it(client):
    with client.session() as s:
        s.patch("blocks.0.mlp.out", "scale", scalar=float("nan"), positions=[3])
        assert s.launch(token_ids=IDS).state == "exited"
        events, _, _ = s.poll_events()
        warnings = [e for e in events if e.kind == "output" and e.data["category"] == "warning"]
        assert len(warnings) == 1 and warnings[0].data["site"] == "blocks.0.mlp.out" and "NaN" in warnings[0].text
        s.set_breakpoints([Breakpoint("blocks.*.resid_post", condition="any_nan")])
        st = s.launch(token_ids=IDS)
        assert st.site == "blocks.0.resid_post" and st.stop.value.nan_count > 0


def test_out_of_memory_in_a_run_is_resource_exhausted_and_the_session_survives(client, monkeypatch):
    with client.session() as s:
        import tdb_server.engine.expr as expr_mod

        def boom(x):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

        monkeypatch.setitem(expr_mod._VALUE_STATS, "oom_probe", boom)
        s.set_breakpoints([Breakpoint("blocks.0.attn.out", condition="oom_probe > 0")])
        with pytest.raises(TdbError) as e:
            s.launch(token_ids=IDS)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "OUT_OF_MEMORY"
        monkeypatch.undo()
        s.set_breakpoints([])
        assert s.launch(token_ids=IDS).state == "exited"


def test_hooks_only_where_something_is_asked(gpt2_adapter):
    """Engine level: a launch that captures nothing and has no breakpoints hooks nothing; breakpoints and
    patches hook just their sites; a step hooks the rest of the run on demand."""
    from tdb_server.engine.manager import SessionManager
    from tdb_server.model.interventions import Selector
    from tdb_server.engine.types import BreakpointRequest, RunState

    mgr = SessionManager(gpt2_adapter)
    try:
        s = mgr.create()
        run = s.launch([], IDS, False, ["none"], False)
        s.wait(run, 30)
        assert run.state is RunState.EXITED and run.sites == frozenset()
        s.set_breakpoints([BreakpointRequest(site="blocks.1.attn.out")])
        s.patch("blocks.0.attn.head.1", "zero", Selector(), None, 0.0, "", "")
        run = s.launch([], IDS, False, ["logits"], False)
        s.wait(run, 30)
        assert run.state is RunState.PAUSED and run.stop.site == "blocks.1.attn.out"
        # the head patch lands on its slice of blocks.0.attn.z (model/interventions.py): that one hook only;
        # resid_mid is readied for a step (each block's input recorded), not hooked
        assert run.sites == {"logits", "blocks.1.attn.out", "blocks.0.attn.z"}
        assert run.prepare == {"blocks.0.resid_mid", "blocks.1.resid_mid"}
        s.resume("step", "into")
        s.wait(run, 30)
        assert run.stop.site == "blocks.1.resid_mid" and len(run.sites) > 20
        s.terminate()
    finally:
        mgr.shutdown()
    assert wait_no_hooks(gpt2_adapter) == 0


def test_long_waits_answer_before_the_client_deadline(client):
    """A long poll (or a wait for a run) longer than the RPC's deadline answers with what there is just
    before the deadline: no DEADLINE_EXCEEDED, and no server thread left waiting for nobody."""
    with client.session() as s:
        s.launch(token_ids=IDS)
        _, last, _ = s.poll_events()
        stub = debugger_pb2_grpc.DebuggerStub(client._channel)
        t0 = time.monotonic()
        r = stub.PollEvents(pb.PollEventsRequest(session_id=s.id, after_seq=last, timeout_ms=20_000), timeout=1.0,
                            metadata=s.metadata)
        assert not r.events and r.last_seq == last and time.monotonic() - t0 < 2.0


def test_a_head_patch_and_a_whole_site_patch_compose_in_either_order(client):
    """Head patches act on the head's part of attn.out, whole-site patches on the result: zeroing
    blocks.0.attn.out and a head of it leaves attn.out zero, whichever was registered first."""
    def logits(*patches):
        with client.session() as s:
            for name in patches:
                s.patch(name, "zero")
            assert s.launch(token_ids=IDS).state == "exited"
            return s.result(include_logits=True).last_logits
    layer_only = logits("blocks.0.attn.out")
    np.testing.assert_array_equal(logits("blocks.0.attn.out", "blocks.0.attn.head.2"), layer_only)
    np.testing.assert_array_equal(logits("blocks.0.attn.head.2", "blocks.0.attn.out"), layer_only)
    assert not np.array_equal(logits("blocks.0.attn.head.2"), layer_only)


def test_a_streamed_read_with_a_wrong_checksum_is_data_loss(client, monkeypatch):
    import types

    import tdb_server.engine.reads as reads_module      # where reads are chunked and checksummed

    monkeypatch.setattr(reads_module, "zlib", types.SimpleNamespace(crc32=lambda data, crc=0: 12345))
    with client.session() as s:
        s.launch(token_ids=IDS)
        with pytest.raises(TdbError) as e:
            s.read("logits", shared_memory=False)
        assert e.value.code == grpc.StatusCode.DATA_LOSS and e.value.reason == "CHECKSUM"


def test_a_condition_that_could_never_evaluate_is_unverified_with_the_nearest_names(client):
    with client.session() as s:
        bps = s.set_breakpoints([Breakpoint("blocks.1.attn.out", condition="nrom > 3"),
                                 Breakpoint("blocks.1.attn.out", condition="norm >> 3"),
                                 Breakpoint("blocks.1.attn.out", condition="blocks.1.atn.out.norm() > 0"),
                                 Breakpoint("blocks.1.attn.out", condition="x.nrom() > 0"),
                                 Breakpoint("blocks.1.attn.out", condition="norm >= 0 and blocks.0.mlp.out.max() > -1e9")])
        assert [b.verified for b in bps] == [False, False, False, False, True]
        assert "did you mean norm" in bps[0].message
        assert "operator not allowed" in bps[1].message
        assert "blocks.1.attn.out" in bps[2].message
        assert "norm" in bps[3].message
        st = s.launch(token_ids=IDS)                        # only the valid one stops
        assert st.stop.reason == "breakpoint" and list(st.stop.hit_breakpoint_ids) == [5]


def test_a_condition_that_fails_at_run_time_stops_as_a_condition_error_never_as_a_hit(client):
    with client.session() as s:
        [bp] = s.set_breakpoints([Breakpoint("blocks.1.attn.out", condition="x[0, 99].norm() > 0")])
        assert bp.verified                                  # it could evaluate, on a longer prompt
        st = s.launch(token_ids=IDS)
        assert st.state == "paused" and st.stop.reason == "condition error" and not st.stop.hit_breakpoint_ids
        assert "could not be evaluated" in st.stop.description and "99" in st.stop.description
        assert s.continue_().state == "exited"


def test_a_patch_value_that_cannot_broadcast_is_refused_at_patch(client):
    d = client.model_info().d_model
    with client.session() as s:
        for site, value in [("blocks.0.attn.out", np.zeros(d + 1, np.float32)),
                            ("blocks.0.attn.out", np.zeros((2, 3, 4, d), np.float32)),
                            ("blocks.1.attn.head.2", np.zeros(d, np.float32))]:      # a head's value is [.., d_head]
            with pytest.raises(TdbError) as e:
                s.patch(site, "set", value)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "BAD_PATCH_VALUE"
        s.patch("blocks.0.attn.out", "add", np.ones(d, np.float32))
        s.patch("blocks.1.attn.head.2", "set", np.zeros(client.model_info().d_head, np.float32))
        assert s.launch(token_ids=IDS).state == "exited"


def test_a_patch_pattern_names_at_most_so_many_targets(client, monkeypatch):
    import tdb_server.engine.patching as patching

    monkeypatch.setattr(patching, "MAX_TARGETS", 8)
    with client.session() as s:
        p = s.patch("blocks.*.attn.head.*", "zero")           # 2 layers x 4 heads: within the limit
        assert p.patch_id > 0 and p.scope == "session"
        with pytest.raises(TdbError) as e:
            s.patch("blocks.*.mlp.neuron.*", "zero")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "TOO_MANY_TARGETS"
