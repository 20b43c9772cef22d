"""Hooks are lazy, leak-free and session-aware: none left after runs, errors and cancels; none at
all for a run that asks for nothing; concurrent runs each see only their own sites."""

import threading

import pytest
import torch
from model_helpers import Capture

from tdb_server.model import SiteError


class Cancelled(Exception):
    pass


def all_hooks(model):
    """Every forward (pre-)hook on the model, ours and transformers'."""
    return [(name, h) for name, m in model.named_modules()
            for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]


def test_no_hooks_left_after_runs(adapter, ids):
    assert adapter.installed_hook_count() == 0
    with adapter.running(Capture(adapter.info.sites)):
        assert adapter.installed_hook_count() > 0
        adapter.model(input_ids=ids)
    assert adapter.installed_hook_count() == 0
    assert not all_hooks(adapter.model) or all(
        getattr(h, "tdb_owner", None) is None for _, h in all_hooks(adapter.model))


def test_one_dispatcher_per_hook_point(adapter):
    """Two runs wanting the same sites share dispatchers (ref-counted)."""
    sites = adapter.info.sites
    with adapter.running(Capture(sites)):
        n = adapter.installed_hook_count()
        with adapter.running(Capture(sites)):
            assert adapter.installed_hook_count() == n
        assert adapter.installed_hook_count() == n
    assert adapter.installed_hook_count() == 0


def test_exception_inside_on_site(adapter, ids):
    class Boom:
        sites = frozenset(adapter.info.sites)

        def on_site(self, site, value):
            if site == "blocks.0.attn.pattern":
                raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        adapter.forward(ids, Boom())
    assert adapter.installed_hook_count() == 0


def test_cancel_mid_run_then_clean_run(adapter, ids):
    clean = adapter.forward(ids)

    class CancelAtLayer1(Capture):
        def on_site(self, site, value):
            super().on_site(site, value)
            if site == "blocks.1.resid_pre":
                raise Cancelled

    handler = CancelAtLayer1(adapter.info.sites, {"blocks.0.attn.out": torch.zeros_like})
    with pytest.raises(Cancelled):
        adapter.forward(ids, handler)
    assert handler.order[-1] == "blocks.1.resid_pre"
    assert adapter.installed_hook_count() == 0
    assert torch.equal(adapter.forward(ids), clean)  # nothing of the cancelled run lingers


def test_unknown_site_installs_nothing(adapter):
    with pytest.raises(SiteError):
        with adapter.running(Capture(["embed", "blocks.0.attn.outt"])):
            pass
    assert adapter.installed_hook_count() == 0


def test_run_without_handler_installs_zero_hooks(adapter, ids):
    """Counted from inside the forward, by a hook of the test's own."""
    seen = []
    handle = adapter.blocks[0].register_forward_hook(
        lambda m, a, o: seen.append(adapter.installed_hook_count()))
    try:
        adapter.forward(ids)
        adapter.forward(ids, Capture([]))  # a handler with no sites is the same
        with adapter.running(None):
            adapter.model(input_ids=ids)
    finally:
        handle.remove()
    assert seen == [0, 0, 0]


def test_transformers_hooks_are_left_alone(adapter, ids):
    """transformers installs output-capturing hooks of its own: ours come and go around them."""
    with torch.no_grad():
        out = adapter.model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == adapter.info.n_layers + 1
    theirs = all_hooks(adapter.model)
    assert all(getattr(h, "tdb_owner", None) is None for _, h in theirs)
    capture = Capture(["blocks.0.resid_post"], {"blocks.0.resid_post": lambda x: x + 1.0})
    with torch.no_grad(), adapter.running(capture):
        patched = adapter.model(input_ids=ids, output_hidden_states=True)
    assert all_hooks(adapter.model) == theirs
    # our forward hooks go first, so transformers' recorder sees the patched block output
    assert torch.allclose(patched.hidden_states[1], capture.values["blocks.0.resid_post"] + 1.0)


def test_concurrent_runs_see_only_their_own_sites(adapter, ids):
    """Run A parks at blocks.0.resid_pre (a breakpoint) in a worker thread; run B, with other sites
    and a patch, completes meanwhile in another thread; then A resumes. Both equal solo runs."""
    sites_a = ["blocks.0.resid_pre", "blocks.1.attn.out", "blocks.1.resid_mid", "logits"]
    sites_b = ["blocks.0.attn.pattern", "blocks.0.mlp.out", "blocks.1.attn.z", "final_norm"]
    zero_head = {"blocks.1.attn.z": lambda z: torch.cat([torch.zeros_like(z[:, :, :1]), z[:, :, 1:]], 2)}
    solo_a = Capture(sites_a)
    logits_a_solo = adapter.forward(ids, solo_a)
    solo_b = Capture(sites_b, zero_head)
    logits_b_solo = adapter.forward(ids, solo_b)

    parked, resume = threading.Event(), threading.Event()

    class Parking(Capture):
        def on_site(self, site, value):
            if site == "blocks.0.resid_pre":
                parked.set()
                assert resume.wait(30)
            return super().on_site(site, value)

    run_a, run_b, results, errors = Parking(sites_a), Capture(sites_b, zero_head), {}, []

    def worker(key, handler):
        try:
            results[key] = adapter.forward(ids, handler)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread_a = threading.Thread(target=worker, args=("a", run_a))
    thread_a.start()
    assert parked.wait(30)
    count_a = adapter.installed_hook_count()
    thread_b = threading.Thread(target=worker, args=("b", run_b))
    thread_b.start()
    thread_b.join(30)
    assert not thread_b.is_alive() and "b" in results
    assert adapter.installed_hook_count() == count_a  # B's hooks are gone, A's remain
    resume.set()
    thread_a.join(30)
    assert not errors and not thread_a.is_alive()
    assert run_a.order == sites_a and run_b.order == sites_b
    assert torch.equal(results["a"], logits_a_solo) and torch.equal(results["b"], logits_b_solo)
    for solo, run in ((solo_a, run_a), (solo_b, run_b)):
        for site, value in solo.values.items():
            assert torch.equal(run.values[site], value), site
    assert adapter.installed_hook_count() == 0


def test_add_sites_while_paused(adapter, ids):
    """A breakpoint set while the run is parked is reached later in the same forward."""
    class AddLater(Capture):
        def on_site(self, site, value):
            super().on_site(site, value)
            if site == "blocks.0.attn.out":
                self.run.add_sites(["blocks.1.mlp.out", "blocks.0.resid_pre"])  # the latter already ran

    handler = AddLater(["blocks.0.attn.out"])
    with adapter.running(handler) as handler.run:
        adapter.model(input_ids=ids)
    assert handler.order == ["blocks.0.attn.out", "blocks.1.mlp.out"]
    assert adapter.installed_hook_count() == 0


def test_grad_flows_through_hooks(adapter, ids):
    """forward(grad=True) keeps the graph: d logits / d (captured site) via a patch that adds 0."""
    leaf = {}

    def tap(x):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]

    logits = adapter.forward(ids, Capture(["blocks.0.resid_mid"], {"blocks.0.resid_mid": tap}), grad=True)
    logits[0, -1, 0].backward()
    assert leaf["x"].grad is not None and leaf["x"].grad.abs().sum() > 0
