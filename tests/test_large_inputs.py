"""Hostile sizes are refused before the work they would cause: a prompt far longer than the token limit
is refused by its length in characters, before any tokenizer sees it (tokenizing costs ~100 bytes of
memory per byte of text: a 100 MiB prompt used to take the server down), and the server answers on."""

from __future__ import annotations

import grpc
import pytest

from tdb_client import Target, TdbError

BIG = "Mr Darcy " * (3 << 20)          # 27 MiB of text


def _launch(client, prompt=None, **kw):
    with client.session() as s:
        return s.launch(prompt, **kw)


@pytest.mark.parametrize("call", [
    lambda c: c.tokenize(BIG),
    lambda c: c.node_table(BIG, Target(["Darcy"], ["Bingley"])),
    lambda c: _launch(c, BIG),
])
def test_a_huge_prompt_is_refused_before_tokenizing(bundled_client, call):
    with pytest.raises(TdbError) as e:
        call(bundled_client)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "TOO_LONG"
    assert "characters" in e.value.message            # refused by its length, not after tokenizing it
    assert bundled_client.tokenize("Mr Darcy")[0]     # and the server answers on


def test_too_many_token_ids_are_refused_before_conversion(bundled_client):
    with pytest.raises(TdbError) as e:
        _launch(bundled_client, token_ids=[[1] * 100_000])
    assert e.value.reason == "TOO_LONG"


def test_a_huge_log_message_is_refused_at_set_breakpoints(bundled_client):
    from tdb_client import Breakpoint

    with bundled_client.session() as s:
        with pytest.raises(TdbError) as e:
            s.set_breakpoints([Breakpoint("blocks.0.attn.out", log_message="{norm}" * 1_000_000)])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "BAD_LOG_MESSAGE"


@pytest.mark.parametrize("kw", [{"batch": 2**31 - 1}, {"window": 2**31 - 1}, {"batch": 257}, {"window": 0, "batch": -1}])
def test_activation_records_sizes_are_bounded_before_any_forward(bundled_client, kw):
    with pytest.raises(TdbError) as e:
        bundled_client.activation_records("blocks.1.attn.head.1", **kw)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.reason == "OUT_OF_RANGE"
