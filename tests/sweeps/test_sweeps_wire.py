"""Patching sweeps over the wire: streamed chunks, progress, cancellation that keeps what arrived and
stops the server's work, exports, errors, and the in-process numbers reproduced by the client."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest
import torch

from tdb_client import Target, TdbError
from tdb_server.analyses import TargetSpec, analysis_names, resolve_target
from tdb_server.analyses.sweeps import SweepSpec, patch_sweep
from tdb_server.engine.scheduler import scheduler_for

CLEAN = [3, 14, 15, 92, 65, 35, 89, 79]
CORRUPTED = [3, 14, 15, 92, 11, 35, 27, 79]
WHY = Target([5], [7])


def test_capabilities_advertise_the_sweeps(client):
    names = client.initialize().analyses
    assert {"patch_sweep", "attribution_patching"} <= set(names) and set(analysis_names()) == set(names)


def test_head_sweep_over_the_wire_equals_in_process(client, gpt2_adapter):
    seen = []
    r = client.patch_sweep(CLEAN, CORRUPTED, WHY, kind="head_out", max_batch=3,
                           on_progress=lambda partial: partial.complete or seen.append(
                               (partial.progress.stage, partial.progress.percent, partial.computed)))
    target, _ = resolve_target(gpt2_adapter, TargetSpec(token_ids=(5,), distractor_ids=(7,)), CLEAN)
    local = patch_sweep(gpt2_adapter, CLEAN, CORRUPTED, target, SweepSpec("head_out"))
    assert r.complete and r.kind == "head_out" and r.direction == "denoising" and r.method == "exact"
    assert [a.name for a in r.axes] == ["layer", "head"] and r.shape == (2, 4)
    assert r.site == "blocks.{L}.attn.z" and r.batch_size == 3
    np.testing.assert_allclose(r.values, local.values.numpy(), atol=1e-6)
    np.testing.assert_allclose(r.normalized, (r.values - r.corrupted_value) / (r.clean_value - r.corrupted_value),
                               atol=1e-5)
    # append-only chunks of at most 3 patches, progress rising to 100 %
    stages = [s for s in seen if s[0] == "exact"]
    assert [c for _, _, c in stages] == [3, 6, 8]
    assert [p for _, p, _ in stages] == sorted(p for _, p, _ in stages) and stages[-1][1] == 100.0
    assert r.summary.exact_patches == 8 and r.summary.chunks == 3


def test_exports(client):
    r = client.patch_sweep(CLEAN, CORRUPTED, WHY, kind="resid_pre", direction="noising")
    df = r.to_pandas()
    assert list(df.columns[:3]) == ["layer", "position", "token"] and len(df) == 2 * len(CLEAN)
    assert df.loc[(df.layer == 1) & (df.position == 4), "value"].item() == pytest.approx(float(r.values[1, 4]))
    csv = r.to_csv()
    assert csv.splitlines()[0].startswith("layer,position,token,value,normalized")
    doc = json.loads(r.to_json())
    assert doc["shape"] == [2, len(CLEAN)] and doc["axes"][1]["name"] == "position" and doc["complete"]
    assert doc["direction"] == "noising"


def test_attribution_over_the_wire(client):
    r = client.attribution_patching(CLEAN, CORRUPTED, WHY, kind="neuron", verify_top_k=6)
    assert r.method == "attribution" and r.approx_values is not None
    assert not np.isnan(r.approx_values).any() and r.computed == 6 and r.summary.verified == 6
    df = r.to_pandas()
    assert df.verified.sum() == 6
    top = np.argsort(-np.abs(r.approx_values.reshape(-1) - r.corrupted_value))[:6]
    assert not np.isnan(r.values.reshape(-1)[top]).any()     # the verified cells are the top estimates
    assert np.isfinite(r.summary.spearman) and np.isfinite(r.summary.pearson)


def test_cancel_keeps_partial_chunks_and_stops_the_work(client, gpt2_adapter):
    """A 2048-chunk sweep cancelled after three chunks: the three stay, the server stops taking turns."""
    stream = client.patch_sweep_stream(CLEAN, CORRUPTED, WHY, kind="neuron", per_position=True, max_batch=1)
    chunks = 0
    for partial in stream:
        if partial.progress.stage == "exact":
            chunks += 1
        if chunks == 3:
            stream.cancel()
    r = stream.result
    assert stream.cancelled and not r.complete
    assert r.computed == 3 and r.shape == (2, gpt2_adapter.info.d_mlp, len(CLEAN))
    assert np.flatnonzero(~np.isnan(r.values.reshape(-1))).tolist() == [0, 1, 2]   # the first three cells, kept
    _assert_the_server_stops_working(client, gpt2_adapter)
    assert r.computed < 50


def _assert_the_server_stops_working(client, adapter) -> None:
    sched = scheduler_for(adapter)
    deadline = time.time() + 10
    while True:   # the server notices within one block, then takes no more device turns
        before = sched.turns
        time.sleep(0.3)
        if sched.turns == before and sched.waiting == 0:
            break
        assert time.time() < deadline, "the abandoned sweep kept running on the server"
    again = client.patch_sweep(CLEAN, CORRUPTED, WHY, kind="attn_out")     # the server is free again
    assert again.complete
    assert adapter.installed_hook_count() == 0


def test_a_deadline_stops_the_sweep_on_the_server(client, gpt2_adapter):
    """The same 2048-chunk sweep under a 0.5 s deadline: DEADLINE_EXCEEDED, and the server's work stops too."""
    t0 = time.monotonic()
    with pytest.raises(TdbError) as e:
        client.patch_sweep(CLEAN, CORRUPTED, WHY, kind="neuron", per_position=True, max_batch=1, timeout=0.5)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, e.value
    assert time.monotonic() - t0 < 5
    _assert_the_server_stops_working(client, gpt2_adapter)


@pytest.mark.parametrize("kw,reason", [
    (dict(corrupted=CORRUPTED[:-1]), "LENGTH_MISMATCH"),
    (dict(layers=[5]), "OUT_OF_RANGE"),
    (dict(positions=[1], kind="head_out"), "BAD_SWEEP"),
    (dict(target=Target([5], [7], position=3), positions=[5], kind="resid_pre"), "OUT_OF_RANGE"),
])
def test_bad_requests_are_invalid_argument(client, kw, reason):
    args = dict(clean=CLEAN, corrupted=CORRUPTED, target=WHY, kind="resid_pre")
    args.update(kw)
    with pytest.raises(TdbError) as e:
        client.patch_sweep(args.pop("clean"), args.pop("corrupted"), args.pop("target"), **args)
    assert e.value.reason == reason, e.value


def test_a_sweep_larger_than_the_budget_is_split(gpt2_adapter, monkeypatch):
    """The chunk size follows the memory budget (here: room for 5 patches)."""
    from tdb_server.analyses import sweeps

    target, _ = resolve_target(gpt2_adapter, TargetSpec(token_ids=(5,), distractor_ids=(7,)), CLEAN)
    per = sweeps.bytes_per_patch(gpt2_adapter.info, len(CLEAN), torch.float32)
    monkeypatch.setattr(sweeps, "memory_budget", lambda device: 5 * per + 1)
    sweep = sweeps.PatchSweep(gpt2_adapter, CLEAN, CORRUPTED, target, SweepSpec("head_out", per_position=True))
    sizes = [len(c.indices) for c in sweep.chunks()]
    assert sweep.batch_size == 5 and max(sizes) == 5 and sum(sizes) == sweep.total
