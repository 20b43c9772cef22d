"""Expressions are sized before they allocate: one Evaluate of an outer product of the embedding with
itself used to allocate 8 GiB. Each operation's output is estimated first (the broadcast of its operands'
shapes, or the operation applied to shape-only copies); past the budget (tdb serve --max-expr-mib) it is
RESOURCE_EXHAUSTED (EXPR_TOO_LARGE) with the estimate, at once. Conditions and log points share the
budget: a condition over the weights alone is refused at SetBreakpoints; one over the run's values stops
as a condition error."""

from __future__ import annotations

import time

import grpc
import pytest

from tdb_client import Breakpoint, TdbClient, TdbError
from tdb_server.limits import Limits

from .server import hostile_server

OUTER = "(W_E.flatten()[:, None] * W_E.flatten()[None, :8192]).sum()"   # 2048*128 x 8192 floats: 8 GiB


def test_an_8_gib_evaluate_is_refused_with_its_estimate_before_allocating():
    with hostile_server(limit_gib=3.0) as srv, TdbClient(srv.address, timeout=60) as c:
        with c.session() as s:
            s.launch(token_ids=[[1, 2, 3]])
            t0 = time.monotonic()
            with pytest.raises(TdbError) as e:
                s.evaluate(OUTER)
            assert time.monotonic() - t0 < 10
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.reason == "EXPR_TOO_LARGE"
            assert "8,192.0 MiB" in e.value.message and "[262144, 8192]" in e.value.message
            assert float(s.evaluate("W_E.flatten()[:8192].sum()").text)  # the server answers on, evaluating
        print(f"\n8 GiB Evaluate refused; the server's peak RSS {srv.peak_rss_mib():.0f} MiB")
        assert srv.alive() and srv.peak_rss_mib() < 1500
        assert c.initialize().limits["max_expr_bytes"] == float(Limits().max_expr_bytes)


def test_logit_lens_is_sized_by_the_vocabulary_it_writes():
    with hostile_server(limit_gib=3.0) as srv, TdbClient(srv.address, timeout=60) as c, c.session() as s:
        s.launch(token_ids=[[1, 2, 3]])
        with pytest.raises(TdbError) as e:      # 80 MiB in, [80, 2048, 2048] floats out
            s.evaluate("logit_lens(W_E[None, :, :] + W_E[:80, None, :]).sum()")
        assert e.value.reason == "EXPR_TOO_LARGE" and "logit_lens()" in e.value.message
        assert "1,280.0 MiB" in e.value.message


# the bundled (induction) model: W_E is [127, 128], so W_E.flatten() has 16256 elements
@pytest.mark.parametrize("expression, what", [
    ("(W_E.flatten()[:, None] @ W_E.flatten()[None, :]).sum()", "'@'"),        # 1008 MiB
    ("(W_E.flatten()[:, None] > W_E.flatten()[None, :256]).sum()", "comparison"),   # 16 MiB
    ("W_E[W_E.flatten().topk(16256).indices % 127].sum()", "indexing"),          # 7.9 MiB
    ("((W_E.flatten()[:, None] * W_E[0, :50]).exp() + (W_E.flatten()[:, None] * W_E[0, :50]).exp()).abs().sum()",
     "in all"),                                                                   # 3.1 MiB each, 6 of them
])
def test_each_kind_of_operation_is_sized(make_server, bundled_adapter, expression, what):
    _, addr = make_server(bundled_adapter, limits=Limits(max_expr_bytes=4 << 20))
    with TdbClient(addr, timeout=60) as c, c.session() as s:
        s.launch(token_ids=[[1, 2, 3]])
        with pytest.raises(TdbError) as e:
            s.evaluate(expression)
        assert e.value.reason == "EXPR_TOO_LARGE" and what in e.value.message and "MiB" in e.value.message


def test_lists_are_not_operands(bundled_client):
    """`[0] * 10**9` would be a Python list of 8 GB that no tensor budget sees (kept small here)."""
    with bundled_client.session() as s:
        s.launch(token_ids=[[1, 2, 3]])
        for expression in ("[0] * 3", "W_E.shape * 2", "W_E.shape + W_E.shape"):
            with pytest.raises(TdbError) as e:
                s.evaluate(expression)
            assert e.value.reason == "BAD_EXPRESSION" and "combines tensors and numbers" in e.value.message


def test_a_condition_over_the_weights_past_the_budget_is_unverified_at_set_breakpoints(make_server, bundled_adapter):
    _, addr = make_server(bundled_adapter, limits=Limits(max_expr_bytes=4 << 20))
    with TdbClient(addr, timeout=60) as c, c.session() as s:
        bad, good = s.set_breakpoints([
            Breakpoint("blocks.0.attn.out", condition="(W_E.flatten()[:, None] * W_E.flatten()[None, :]).sum() > 0"),
            Breakpoint("blocks.0.attn.out", condition="W_E.norm() > 0 and x.norm() > 0")])
        assert not bad.verified and "1,008.1 MiB" in bad.message and good.verified


def test_a_condition_over_run_values_past_the_budget_stops_as_a_condition_error(make_server, bundled_adapter):
    _, addr = make_server(bundled_adapter, limits=Limits(max_expr_bytes=1 << 20))
    with TdbClient(addr, timeout=60) as c, c.session() as s:
        [bp] = s.set_breakpoints([Breakpoint("blocks.0.resid_post",
                                             condition="(x.flatten()[:, None] * x.flatten()[None, :]).sum() > 0")])
        assert bp.verified
        st = s.launch(token_ids=[list(range(1, 11))])    # 1280 x 1280 floats: 6.25 MiB
        assert st.state == "paused" and st.stop.reason == "condition error"
        assert "6.2 MiB" in st.stop.description and "EXPR_TOO_LARGE" not in st.stop.description
        assert s.continue_().state == "exited"


def test_a_log_point_over_the_budget_logs_the_refusal_and_the_run_goes_on(make_server, bundled_adapter):
    _, addr = make_server(bundled_adapter, limits=Limits(max_expr_bytes=1 << 20))
    with TdbClient(addr, timeout=60) as c, c.session() as s:
        s.set_breakpoints([Breakpoint("blocks.0.resid_post",
                                      log_message="outer {(x.flatten()[:, None] * x.flatten()[None, :]).sum()}")])
        st = s.launch(token_ids=[list(range(1, 11))])
        assert st.state == "exited"
        lines = [e.text for e in s.poll_events()[0] if e.kind == "output"]
        assert len(lines) == 1 and "would allocate up to" in lines[0] and "6.2 MiB" in lines[0]


def test_a_read_is_sized_in_the_dtype_asked_before_converting(make_server, bundled_adapter):
    d, v = bundled_adapter.info.d_model, bundled_adapter.info.vocab_size
    _, addr = make_server(bundled_adapter, limits=Limits(max_read_bytes=v * d * 4 + 1))   # W_E fits as float32
    with TdbClient(addr, timeout=60) as c, c.session() as s:
        s.launch(token_ids=[[1, 2, 3]])
        assert s.read("W_E").shape == (v, d)
        with pytest.raises(TdbError) as e:                   # as float64 it would not: refused unconverted
            s.read("W_E", dtype="float64")
        assert e.value.reason == "READ_TOO_LARGE" and f"{v * d * 8 / 2**20:.1f} MiB" in e.value.message
