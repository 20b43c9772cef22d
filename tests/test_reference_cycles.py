"""The server frees what a run held by reference counting alone.

A reference cycle through a run (a closure referring to itself, a run and its hook state referring to
each other) keeps every activation the run captured alive until Python's cyclic collector happens to
come by: under load that showed as the server's memory climbing ~34 MiB per round of the load test and
dropping now and then. Here the collector is switched off while a representative mix of requests runs
(debugging with breakpoints, steps, patches, reads, expressions and errors; analyses), then asked what
it would have had to collect: nothing of the server's may be among it."""

from __future__ import annotations

import collections
import gc

import pytest

from tdb_client import Ablation, Target, TdbError

PROMPT = "the young lady saw Mr Darcy at the ball and her sister told Miss Bennet that Mr"


def _work(c) -> None:
    target = Target(tokens=["Darcy"], distractors=["Bennet"])
    c.node_table(PROMPT, target, top_k=5)
    c.ablate(PROMPT, target, [Ablation("blocks.1.attn.head.1")])
    c.logit_lens(PROMPT)
    c.attention_pattern(PROMPT, layer=1)
    corrupted = PROMPT.replace("Darcy", "Bennet")
    c.patch_sweep(PROMPT, corrupted, target, kind="head_out")
    c.attribution_patching(PROMPT, corrupted, target, kind="head_out", verify_top_k=3)
    c.information_flow(PROMPT)
    with pytest.raises(TdbError):
        c.node_table(PROMPT, Target(tokens=["not-a-word-of-this-vocabulary"]))
    with c.session() as s:
        s.set_breakpoints(["blocks.*.attn.out", "blocks.1.mlp.out"])
        st = s.launch(PROMPT)
        s.patch("blocks.1.attn.head.2", "scale", scalar=0.5)
        with pytest.raises(TdbError):
            s.read("blocks.1.mlp.out")                 # has not run yet
        s.evaluate("norm(blocks.0.attn.out)")
        s.read("blocks.0.attn.out", "[0, -1]")
        st = s.step("into")
        while st.state == "paused":
            st = s.continue_()
        s.set_breakpoints([])
        for _ in range(10):                           # more runs than a session keeps: old ones are evicted
            assert s.launch(token_ids=[[1, 2, 3, 4]]).state == "exited"


def _server_garbage(objs: list) -> collections.Counter:
    import torch

    def ours(o) -> bool:
        mod = getattr(type(o), "__module__", "") or ""
        return mod.startswith("tdb_server") or isinstance(o, torch.Tensor)

    return collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objs if ours(o))


def test_requests_leave_no_cyclic_garbage(bundled_client):
    _work(bundled_client)                              # warm-up: lazy imports, caches
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        _work(bundled_client)
        gc.collect()
        found = _server_garbage(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
    assert not found, f"reference cycles through server objects: {found.most_common(10)}"
