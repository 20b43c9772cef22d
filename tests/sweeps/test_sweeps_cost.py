"""A sweep computes only what its target reads: the last block's MLP runs on the target's row alone.

Its values are checked against a serial reference in test_sweeps_exact.py; here, what it computes:
the rows each block's MLP computes during the patched forwards (its output's position dim), recorded
by forward hooks of this test's own (removed in `finally`).
"""

from __future__ import annotations

import pytest
import torch

from tdb_server.analyses import TargetSpec, resolve_target
from tdb_server.analyses.sweeps import SweepSpec, patch_sweep
from tdb_server.model import build_random_model
from tdb_server.model.arch import get_path

CLEAN = [3, 14, 15, 92, 65, 35, 89, 79]
CORRUPTED = [3, 14, 15, 92, 11, 35, 27, 79]


def _mlp_rows(adapter, spec: SweepSpec, position: int = -1) -> dict[int, set[int]]:
    """layer -> the numbers of rows (positions) its MLP was called on during the sweep's forwards."""
    seen: dict[int, set[int]] = {}
    handles = []
    for layer, block in enumerate(adapter.blocks):
        def hook(module, args, output, layer=layer):
            seen.setdefault(layer, set()).add(output.shape[1])          # [B, rows, D]
        handles.append(get_path(block, adapter.spec.mlp).register_forward_hook(hook))
    try:
        target, _ = resolve_target(adapter, TargetSpec(token_ids=(5,), distractor_ids=(7,), position=position), CLEAN)
        patch_sweep(adapter, CLEAN, CORRUPTED, target, spec)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def adapter(request):
    a = build_random_model(request.param, seed=1)
    yield a
    assert a.installed_hook_count() == 0


def test_the_last_block_mlp_runs_on_the_target_row_only(adapter):
    last = adapter.info.n_layers - 1
    rows = _mlp_rows(adapter, SweepSpec("head_out", max_batch=5))
    assert rows[last] == {1, len(CLEAN)}             # 1 row in the patched forwards; the two prompt runs: all
    assert all(rows[layer] == {len(CLEAN)} for layer in range(last))
    cut = _mlp_rows(adapter, SweepSpec("resid_pre"), position=5)
    assert cut[last] == {1, 6}                        # prompts cut after the target position 5


def test_a_patch_in_the_last_block_mlp_keeps_every_row(adapter):
    """Sites inside the last MLP are patched at every position: that MLP runs on all of them."""
    last = adapter.info.n_layers - 1
    rows = _mlp_rows(adapter, SweepSpec("neuron", layers=(last,)))
    assert rows[last] == {len(CLEAN)}


def test_other_threads_forwards_are_untouched(adapter):
    """The shared model serves other sessions while a sweep runs: their MLPs see every row."""
    import threading

    last = adapter.info.n_layers - 1
    block_mlp = get_path(adapter.blocks[last], adapter.spec.mlp)
    other: list[int] = []
    mine: list[int] = []
    started, go_on = threading.Event(), threading.Event()

    def record(module, args, output):
        (other if threading.current_thread().name == "other" else mine).append(output.shape[1])

    def pause(module, args, kwargs):
        if threading.current_thread().name != "other" and len(mine) == 2:   # the patched forward, hook in place
            started.set()
            go_on.wait(10)
    ids = torch.tensor([CLEAN])
    t = threading.Thread(target=lambda: (started.wait(10), adapter.forward(ids), go_on.set()), name="other")
    handles = [block_mlp.register_forward_pre_hook(pause, with_kwargs=True), block_mlp.register_forward_hook(record)]
    try:
        t.start()
        target, _ = resolve_target(adapter, TargetSpec(token_ids=(5,), distractor_ids=(7,)), CLEAN)
        patch_sweep(adapter, CLEAN, CORRUPTED, target, SweepSpec("resid_pre", layers=(last,)))
        t.join(10)
    finally:
        for h in handles:
            h.remove()
    assert started.is_set() and mine == [len(CLEAN), len(CLEAN), 1]    # two prompt runs, one patched forward
    assert other == [len(CLEAN)]
