"""A model dispatched across devices with accelerate's device_map (here: CPU + disk offload) gives the
same logits, debugging results and analyses as the single-device model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdb_client import Target, TdbClient
from tdb_server.model import build_random_model, load_model

pytest.importorskip("accelerate")

IDS = [[5, 17, 42, 8, 99, 5, 17, 42, 3, 61]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    single = build_random_model("gpt2", seed=5, n_layer=3)
    d = tmp_path_factory.mktemp("gpt2-3l")
    single.model.save_pretrained(d)
    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                  "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.h.2": "disk",
                  "transformer.ln_f": "cpu", "lm_head": "cpu"}
    spread = load_model(str(d), device_map=device_map, offload_folder=str(tmp_path_factory.mktemp("offload")))
    assert spread.model.transformer.h[1].attn.c_proj.weight.device.type == "meta"   # really offloaded
    return single, spread


def test_weights_and_logits_match(pair):
    single, spread = pair
    ids = torch.tensor(IDS)
    assert torch.equal(single.forward(ids), spread.forward(ids))
    for layer in range(3):
        assert torch.equal(single.W_O(layer), spread.W_O(layer))
        assert torch.equal(single.W_out(layer), spread.W_out(layer))
    assert len(spread.verified_sites) == len(single.verified_sites)


def test_debugging_and_analyses_across_devices(pair, make_server):
    results = []
    for adapter in pair:
        _, addr = make_server(adapter)
        with TdbClient(addr) as c, c.session() as s:
            s.set_breakpoints(["blocks.2.attn.out"])
            s.launch(token_ids=IDS, capture=["*"])
            pattern = s.read("blocks.2.attn.pattern")
            s.patch("blocks.2.attn.head.1", "zero")
            s.patch("blocks.2.mlp.neuron.3", "scale", scalar=2.0)
            s.continue_()
            logits = s.result().last_logits
            lens = s.evaluate("logit_lens(blocks.1.resid_post)[0, -1]").value
            table = c.node_table(IDS[0], Target(tokens=[7], distractors=[9]), all_rows=True)
            results.append((pattern, logits, lens, table))
    (p1, l1, e1, t1), (p2, l2, e2, t2) = results
    assert np.array_equal(p1, p2) and np.array_equal(l1, l2) and np.array_equal(e1, e2)
    d1, d2 = t1.all.to_pandas(), t2.all.to_pandas()
    assert len(d1) == len(d2) > 0
    assert np.allclose(d1["direct_effect"].to_numpy(), d2["direct_effect"].to_numpy(), atol=1e-6)
    assert np.allclose(d1["total_effect"].to_numpy(), d2["total_effect"].to_numpy(), atol=1e-6)
    assert abs(t1.target.value - t2.target.value) < 1e-6
