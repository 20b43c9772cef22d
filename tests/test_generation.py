"""Stepping through generation: token boundaries are steps, patches at chosen tokens, KV cache."""

from __future__ import annotations

import grpc
import pytest
import torch

from tdb_client import Breakpoint, Generate, TdbError

PROMPT = [[5, 17, 42, 8, 99, 5, 17, 42]]


def hf_generate(adapter, ids, n, patch_step=None, layer=1, head=2):
    """Plain HF generate (greedy); on forward call `patch_step` zero one head's input to c_proj."""
    model = adapter.model
    calls = {"n": -1}
    dh = adapter.info.d_head

    def count(module, args, kwargs):
        calls["n"] += 1

    def zero(module, args):
        if calls["n"] != patch_step:
            return None
        x = args[0].clone()
        x[..., head * dh:(head + 1) * dh] = 0
        return (x,)

    hs = [model.register_forward_pre_hook(count, with_kwargs=True)]
    if patch_step is not None:
        hs.append(model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        for h in hs:
            h.remove()
    return out[0, len(ids[0]):].tolist()


def test_generation_equals_hf_generate(client, gpt2_adapter):
    with client.session() as s:
        st = s.launch(token_ids=PROMPT, generate=5)
        assert st.state == "exited"
        assert list(st.result.generated[0]) == hf_generate(gpt2_adapter, PROMPT, 5)


def test_step_through_five_tokens_patching_at_token_three(client, gpt2_adapter):
    with client.session() as s:
        st = s.launch(token_ids=PROMPT, generate=Generate(5, stop_at_tokens=True))
        tokens = []
        while st.state == "paused":
            assert st.stop.reason in ("token", "step") and st.site == ""
            tokens.append(st.stop.token)
            if st.stop.token == 2:
                p = s.patch("blocks.0.attn.head.2", "zero", tokens=[3])    # the next forward: token 3
                assert not p.applied_now
            st = s.step("over")
        assert tokens == [0, 1, 2, 3] and st.state == "exited"
        got = list(st.result.generated[0])
        patched_logits = s.result().last_logits
        s.clear_patches()
        s.launch(token_ids=[PROMPT[0] + got[:4]])                       # the same tokens, no patch
        assert abs(s.result().last_logits - patched_logits).max() > 1e-4   # the patch reached the cache
        events, _, _ = s.poll_events()
        assert [e.data["step"] for e in events if e.kind == "token"] == [0, 1, 2, 3, 4]
    want = hf_generate(gpt2_adapter, PROMPT, 5, patch_step=3, layer=0)
    assert got == want


def test_breakpoints_limited_to_a_token_range_and_step_into_a_token(client):
    with client.session() as s:
        s.set_breakpoints([Breakpoint("blocks.1.attn.out", tokens=(2, 3))])
        st = s.launch(token_ids=PROMPT, generate=5)
        assert (st.site, st.stop.token) == ("blocks.1.attn.out", 2)
        assert s.read("blocks.1.attn.out").shape[1] == 1               # KV cache: one new position
        assert s.read("blocks.1.attn.k").shape[1] == len(PROMPT[0]) + 2  # keys cover the cache
        st = s.step("token")
        assert st.stop.reason == "step" and st.site == "" and st.stop.token == 2
        st = s.step("into")
        assert (st.site, st.stop.token) == ("embed", 3)
        st = s.continue_()
        assert (st.site, st.stop.token) == ("blocks.1.attn.out", 3)
        assert s.continue_().state == "exited"


def test_sampling_is_reproducible_with_a_seed_and_bad_options_are_rejected(client):
    with client.session() as s:
        a = s.launch(token_ids=PROMPT, generate=Generate(6, sample=True, seed=7, top_k=20)).result.generated
        b = s.launch(token_ids=PROMPT, generate=Generate(6, sample=True, seed=7, top_k=20)).result.generated
        assert a == b
        for bad in (Generate(0 - 1), Generate(5, sample=True, temperature=-1.0)):
            with pytest.raises(TdbError) as e:
                s.launch(token_ids=PROMPT, generate=bad)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TdbError) as e:
            s.launch(token_ids=[[1, 2, 3], [4, 5]], generate=3)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "equal length" in e.value.message
        s.set_breakpoints(["blocks.0.attn.out"])
        s.launch(token_ids=PROMPT)
        with pytest.raises(TdbError) as e:
            s.step("token")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        s.terminate()


def test_five_tokens_of_the_bundled_model_with_a_patch_at_token_three(bundled_client, bundled_adapter):
    """The issue's check on the bundled circuit model: step through 5 generated tokens, patching one
    induction head at token 3; the text equals HF generate with the same patch applied by hand."""
    import json

    from tdb_server.paths import circuit_model_path

    truth = json.loads((circuit_model_path() / "ground_truth.json").read_text())
    layer, head = truth["induction_heads"][0]
    ids = bundled_client.tokenize(truth["demo"]["prompt"])[0]
    with bundled_client.session() as s:
        st = s.launch(token_ids=[ids], generate=Generate(5, stop_at_tokens=True))
        seen = []
        while st.state == "paused":
            seen.append(st.stop.token)
            if st.stop.token == 2:
                s.patch(f"blocks.{layer}.attn.head.{head}", "zero", tokens=[3])
            st = s.step("token")
        assert seen == [0, 1, 2, 3] and st.state == "exited"
        got = list(st.result.generated[0])
        text = st.result.generated_text[0]
    model = bundled_adapter.model
    calls = {"n": -1}
    dh = bundled_adapter.info.d_head

    def count(module, args, kwargs):
        calls["n"] += 1

    def zero(module, args):
        if calls["n"] != 3:
            return None
        x = args[0].clone()
        x[..., head * dh:(head + 1) * dh] = 0
        return (x,)

    hs = [model.register_forward_pre_hook(count, with_kwargs=True),
          model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero)]
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                 pad_token_id=bundled_adapter.tokenizer.eos_token_id)
    finally:
        for h in hs:
            h.remove()
    want = out[0, len(ids):].tolist()
    assert got == want
    assert text == bundled_adapter.tokenizer.decode(want)


@pytest.mark.parametrize("which", ["bundled", "gpt2"])
def test_token_events_append_up_to_the_generated_text(which, bundled_client, client):
    """What each token event says it appends joins, token by token, into the run's generated text: on the
    word-level bundled model the words keep their spaces (the tokens alone have none)."""
    c = bundled_client if which == "bundled" else client
    prompt = "Mr Darcy said to Miss Bennet that Mr" if which == "bundled" else None
    with c.session() as s:
        st = s.launch(prompt, token_ids=None if prompt else PROMPT, generate=Generate(6))
        events, _, _ = s.poll_events()
    steps = [e.data for e in events if e.kind == "token"]
    assert len(steps) == 6
    assert "".join(d["appended"][0] for d in steps) == st.result.generated_text[0]
    if which == "bundled":
        assert " " in st.result.generated_text[0] and all(" " not in d["texts"][0] for d in steps)
