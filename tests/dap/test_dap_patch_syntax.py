"""The setVariable / setExpression mini-syntax of the DAP adapter (pure parsing, no server)."""

from __future__ import annotations

import pytest

from tdb_client.dap.patching import (UNIT_SELECTION, PatchSyntaxError, PatchTarget, PatchValue, parse_assignment,
                                     parse_target, parse_value)

DIMS = {"blocks.1.attn.out": ("batch", "pos", "d_model"), "blocks.1.attn.pattern": ("batch", "head", "query_pos", "key_pos"),
        "blocks.0.mlp.post": ("batch", "pos", "neuron"), "blocks.0.attn.k": ("batch", "pos", "kv_head", "d_head")}

UNITS = {"blocks.1.attn.head.2", "blocks.0.mlp.neuron.7"}       # names the server would take as units


def dims_of(name):
    """As the adapter answers: a site's dims from the model info; a unit selects batch and pos."""
    return DIMS.get(name) or (UNIT_SELECTION if name in UNITS else None)


@pytest.mark.parametrize("text, want", [
    ("x", PatchTarget("blocks.1.attn.out")),
    ("x[0][3]", PatchTarget("blocks.1.attn.out", batch=(0,), positions=(3,))),
    ("blocks.1.attn.out[0, -1]", PatchTarget("blocks.1.attn.out", batch=(0,), positions=(-1,))),
    ("blocks.1.attn.pattern[0][2][5]", PatchTarget("blocks.1.attn.pattern", batch=(0,), heads=(2,), positions=(5,))),
    ("blocks.0.mlp.post[0][1][7]", PatchTarget("blocks.0.mlp.post", batch=(0,), positions=(1,), neurons=(7,))),
    ("blocks.0.attn.k[0, 1, 0]", PatchTarget("blocks.0.attn.k", batch=(0,), positions=(1,), heads=(0,))),
    ("blocks.1.attn.head.2[0]", PatchTarget("blocks.1.attn.head.2", batch=(0,))),
    ("blocks.0.mlp.neuron.7[0][4]", PatchTarget("blocks.0.mlp.neuron.7", batch=(0,), positions=(4,))),
])
def test_targets(text, want):
    assert parse_target(text, dims_of, "blocks.1.attn.out") == want


@pytest.mark.parametrize("text, words", [
    ("x[0][3][5]", "d_model"), ("blocks.1.attn.head.2[0][1][2]", "dims"), ("blocks.1.attn.pattern[0][0][0][1]", "key_pos"), ("x[0:2]", "integer"),
    ("blocks.9.nope", "not a site"), ("x[0][1][2][3]", "dims"), ("norm(x)", "cannot patch"),
])
def test_bad_targets(text, words):
    with pytest.raises(PatchSyntaxError, match=words):
        parse_target(text, dims_of, "blocks.1.attn.out")


def test_x_needs_a_stop():
    with pytest.raises(PatchSyntaxError, match="not stopped"):
        parse_target("x[0]", dims_of, None)


@pytest.mark.parametrize("text, want", [
    ("0", PatchValue("zero")), ("zero", PatchValue("zero")), ("mean", PatchValue("mean")),
    ("3.5", PatchValue("set", 3.5)), ("=-2", PatchValue("set", -2.0)), ("-2", PatchValue("set", -2.0)),
    ("*2", PatchValue("scale", 2.0)), ("*=0.5", PatchValue("scale", 0.5)), ("/4", PatchValue("scale", 0.25)),
    ("+=1", PatchValue("add", 1.0)), ("-=1.5", PatchValue("add", -1.5)), ("[1, 2]", PatchValue("set", [1, 2])),
])
def test_values(text, want):
    assert parse_value(text) == want


@pytest.mark.parametrize("text", ["sideways", "", "*", "/0", "nan", "inf", "[1,"])
def test_bad_values(text):
    with pytest.raises(PatchSyntaxError):
        parse_value(text)


@pytest.mark.parametrize("text, want", [
    ("x[0][3] *= 2", ("x[0][3]", "*=2")), ("blocks.1.attn.head.2 = 0", ("blocks.1.attn.head.2", "0")),
    ("x = mean", ("x", "mean")), ("x -= 1", ("x", "-=1")),
    ("x == 3", None), ("norm > 40", None), ("logits[0, -1].topk(5)", None), ("x <= 2", None),
])
def test_assignments(text, want):
    assert parse_assignment(text) == want
