"""A session run pays only for what is asked: with the `logits` site not hooked, only the rows the
result reads (each item's last real position) are projected onto the vocabulary; the result equals
a plain HF forward's. With `logits` captured or under a breakpoint, every row is projected."""

from __future__ import annotations

import pytest
import torch

from engine_runs import run_to_end
from tdb_server.engine.types import BreakpointRequest, RunState

SEQS = [[5, 9, 2, 7, 11, 3], [4, 8, 1], [6, 6, 2, 9, 1, 3]]       # padded to 6; last rows 5, 2, 5


def _plain_last_logits(adapter, seqs) -> torch.Tensor:
    """[B, V]: a plain HF forward of each prompt alone, its last position."""
    with torch.no_grad():
        return torch.stack([adapter.model(input_ids=torch.tensor([s]), use_cache=False).logits[0, -1] for s in seqs])


def _unembedded_rows(adapter):
    """(a list that gets the position dim of every unembedding output from now on, the hook handle)."""
    seen: list[int] = []
    handle = adapter.model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
    return seen, handle


def _run(session, capture, breakpoints=()):
    return run_to_end(session, SEQS, capture, breakpoints)


def _top(run):
    return [[(t.token_id, round(t.logit, 4)) for t in top.tokens] for top in run.result.top]


def test_nothing_hooked_projects_the_last_rows_only(gpt2_adapter, session):
    want = _plain_last_logits(gpt2_adapter, SEQS)
    seen, handle = _unembedded_rows(gpt2_adapter)
    try:
        run = _run(session, ["none"])
    finally:
        handle.remove()
    assert seen == [2]                                   # rows 2 and 5, not all 6
    assert (run.logits - want).abs().max() < 1e-4
    assert [top.position for top in run.result.top] == [5, 2, 5]
    assert [t.token_id for t in run.result.top[1].tokens] == torch.topk(want[1], 10).indices.tolist()


@pytest.mark.parametrize("capture,breakpoints", [(["logits"], ()), (["none"], ("logits",))])
def test_a_hooked_logits_site_gets_every_row(gpt2_adapter, session, capture, breakpoints):
    cheap = _run(session, ["none"])
    seen, handle = _unembedded_rows(gpt2_adapter)
    try:
        run = _run(session, capture, breakpoints)
    finally:
        handle.remove()
    assert seen == [6]
    if capture == ["logits"]:
        assert tuple(run.captured["logits"].shape) == (3, 6, gpt2_adapter.info.vocab_size)
    assert _top(run) == _top(cheap)


def _hooks_on(model) -> int:
    """Forward hooks and pre-hooks on every module of the model, whoever installed them."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_run_with_nothing_hooked_runs_with_none_of_our_hooks(gpt2_adapter, session):
    """The rule: a forward pass with no breakpoints and no captures runs with none of our hooks (the
    unembedding takes the rows the result reads through the model's logits_to_keep instead)."""
    model = gpt2_adapter.model
    during: list[int] = []
    probe = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: during.append(_hooks_on(model)))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([SEQS[0]]), use_cache=False)            # a plain HF forward
        run = _run(session, ["none"])
    finally:
        probe.remove()
    plain, in_run = during
    assert in_run == plain                        # the same hooks as a plain forward: ours add none
    assert [t.token_id for t in run.result.top[0].tokens] == torch.topk(_plain_last_logits(gpt2_adapter, SEQS)[0],
                                                                         10).indices.tolist()


def test_a_hooked_run_projects_the_last_rows_through_our_own_hook(gpt2_adapter, session):
    """Hooked elsewhere (a capture), the run's unembedding still takes the last rows only, through a hook of
    the adapter's (counted, removed with the run's others)."""
    want = _plain_last_logits(gpt2_adapter, SEQS)
    counted: list[int] = []
    probe = gpt2_adapter.model.get_input_embeddings().register_forward_pre_hook(
        lambda m, a: counted.append(gpt2_adapter.installed_hook_count()))
    seen, handle = _unembedded_rows(gpt2_adapter)
    try:
        run = _run(session, ["blocks.0.mlp.out"])
    finally:
        handle.remove()
        probe.remove()
    assert seen == [2] and counted == [2]         # mlp.out's hook and the unembedding's rows
    assert (run.logits - want).abs().max() < 1e-4
    assert gpt2_adapter.installed_hook_count() == 0


def test_a_step_onto_logits_gets_every_row(gpt2_adapter, session):
    """Stepping from final_norm hooks `logits` before the unembedding runs: it computes every row."""
    session.set_breakpoints([BreakpointRequest(site="final_norm")])
    run = session.launch([], SEQS, False, ["none"], False)
    session.wait(run, 60)
    assert run.state is RunState.PAUSED and run.stop.site == "final_norm"
    session.resume("step", "into")
    session.wait(run, 60)
    assert run.state is RunState.PAUSED and run.stop.site == "logits"
    assert tuple(run.stop.value.shape) == (3, 6, gpt2_adapter.info.vocab_size)
    session.resume("continue")
    session.wait(run, 60)
    assert run.state is RunState.EXITED
    assert (run.logits - _plain_last_logits(gpt2_adapter, SEQS)).abs().max() < 1e-4


def test_a_breakpoint_readies_resid_mid_for_steps_without_firing_it(gpt2_adapter, session, monkeypatch):
    """With a breakpoint, each block's input is recorded so that a step after the stop can reach resid_mid;
    resid_mid itself fires only once a step hooks it, so a run that just continues never pays for it."""
    from tdb_server.engine.run import DebugRun

    fired: list[str] = []
    real = DebugRun.on_site
    monkeypatch.setattr(DebugRun, "on_site", lambda self, site, value: fired.append(site) or real(self, site, value))
    run = _run(session, ["none"], breakpoints=("blocks.0.attn.out",))
    assert fired == ["blocks.0.attn.out"]
    assert run.prepare == {"blocks.0.resid_mid", "blocks.1.resid_mid"} and not run.prepare & run.sites

    session.set_breakpoints([BreakpointRequest(site="blocks.0.attn.out")])
    run = session.launch([], SEQS, False, ["none"], False)
    session.wait(run, 60)
    session.resume("step", "into")
    session.wait(run, 60)
    assert run.state is RunState.PAUSED and run.stop.site == "blocks.0.resid_mid"
    ids = torch.tensor([s + [0] * (6 - len(s)) for s in SEQS])
    mask = (torch.arange(6)[None, :] < torch.tensor([len(s) for s in SEQS])[:, None]).long()
    _, cache = gpt2_adapter.run_with_cache(ids, ["blocks.0.resid_mid"], attention_mask=mask)
    assert (run.stop.value - cache["blocks.0.resid_mid"]).abs().max() < 1e-6
    session.resume("continue")
    session.wait(run, 60)
    assert run.state is RunState.EXITED
