"""Patches: replacing a site's value changes the forward exactly as a hand computation says."""

import pytest
import torch
from model_helpers import NORM2, Capture

from tdb_server.model import SiteError


def run(adapter, ids, sites, patches=None):
    capture = Capture(sites, patches)
    return adapter.forward(ids, capture), capture.values


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol


def test_zero_head_via_attn_z(adapter, ids):
    """Zeroing head h in attn.z == removing z_h @ W_O[h] from attn.out."""
    layer, h = 0, 1
    p = f"blocks.{layer}."
    clean, v = run(adapter, ids, [p + "attn.z"])
    contribution = v[p + "attn.z"][:, :, h] @ adapter.W_O(layer)[h]             # [B, T, D]

    def zero_head(z):  # z [B, T, H, Dh]
        z = z.clone()
        z[:, :, h] = 0
        return z

    patched, pv = run(adapter, ids, [p + "attn.z", p + "attn.out"], {p + "attn.z": zero_head})
    manual, _ = run(adapter, ids, [p + "attn.out"], {p + "attn.out": lambda out: out - contribution})
    assert close(patched, manual) and not close(patched, clean, 1e-3)
    assert pv[p + "attn.z"][:, :, h].abs().max() > 0  # the capture saw the value before the patch


def test_resid_pre_patch_equals_previous_resid_post_patch(adapter, ids):
    delta = torch.randn(adapter.info.d_model, generator=torch.Generator().manual_seed(2))
    clean, _ = run(adapter, ids, [])
    a, _ = run(adapter, ids, ["blocks.1.resid_pre"], {"blocks.1.resid_pre": lambda x: x + delta})
    b, _ = run(adapter, ids, ["blocks.0.resid_post"], {"blocks.0.resid_post": lambda x: x + delta})
    c, _ = run(adapter, ids, ["blocks.0.resid_pre"], {"blocks.0.resid_pre": lambda x: x + delta})
    d, _ = run(adapter, ids, ["embed"], {"embed": lambda x: x + delta})
    assert close(a, b) and close(c, d) and not close(a, clean, 1e-3)


def test_resid_mid_patch_by_hand(adapter, family, ids):
    """Last block: logits == unembed(final_norm(new_mid + MLP(norm2(MLP input)))), where the MLP
    reads new_mid on sequential blocks and resid_pre on parallel (NeoX) blocks."""
    last = adapter.info.n_layers - 1
    p = f"blocks.{last}."
    delta = torch.randn(adapter.info.d_model, generator=torch.Generator().manual_seed(3))
    patched, v = run(adapter, ids, [p + "resid_pre", p + "resid_mid", p + "mlp.out"],
                     {p + "resid_mid": lambda x: x + delta})
    new_mid = v[p + "resid_mid"] + delta
    block = adapter.blocks[last]
    mlp_input = v[p + "resid_pre"] if adapter.info.parallel_blocks else new_mid
    with torch.no_grad():
        mlp_out = block.get_submodule(adapter.spec.mlp)(block.get_submodule(NORM2[family])(mlp_input))
        logits = adapter.model.get_output_embeddings()(adapter.final_norm(new_mid + mlp_out))
    assert close(mlp_out, v[p + "mlp.out"])
    assert close(patched, logits)


def test_pattern_patch_by_hand(adapter, ids):
    """Uniform causal attention in block 0: z == uniform @ v (GQA groups), and logits follow."""
    info = adapter.info
    p = "blocks.0."
    b, t = ids.shape
    uniform = torch.ones(t, t).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(b, info.n_heads, t, t)  # [B, H, T, T]
    clean, _ = run(adapter, ids, [])
    patched, v = run(adapter, ids, [p + "attn.v", p + "attn.pattern", p + "attn.z"],
                     {p + "attn.pattern": lambda x: uniform})
    vv = v[p + "attn.v"].repeat_interleave(info.n_heads // info.n_kv_heads, dim=2)   # [B, T, H, Dh]
    assert close(v[p + "attn.z"], torch.einsum("bhqk,bkhd->bqhd", uniform, vv))
    assert not close(patched, clean, 1e-3)


def test_value_patch(adapter, ids):
    """v = 0 in block 1: every head's z is 0, so attn.out == b_O."""
    p = "blocks.1."
    _, v = run(adapter, ids, [p + "attn.v", p + "attn.z", p + "attn.out"],
               {p + "attn.v": torch.zeros_like})
    assert v[p + "attn.z"].abs().max() == 0
    assert close(v[p + "attn.out"], adapter.b_O(1).expand_as(v[p + "attn.out"]))


def test_query_key_patch_reaches_pattern(adapter, ids):
    """q = 0 makes every causal row uniform."""
    p = "blocks.0."
    _, v = run(adapter, ids, [p + "attn.q", p + "attn.pattern"], {p + "attn.q": torch.zeros_like})
    t = ids.shape[1]
    uniform = torch.ones(t, t).tril()
    assert close(v[p + "attn.pattern"][0, 0], uniform / uniform.sum(-1, keepdim=True))


def test_mlp_post_patch(adapter, ids):
    """Zeroing every neuron: mlp.out == b_out."""
    p = "blocks.0."
    _, v = run(adapter, ids, [p + "mlp.post", p + "mlp.out"], {p + "mlp.post": torch.zeros_like})
    assert close(v[p + "mlp.out"], adapter.b_out(0).expand_as(v[p + "mlp.out"]))


def test_wrong_shape_patch_is_loud(adapter, ids):
    with pytest.raises(SiteError, match="shape"):
        run(adapter, ids, ["blocks.0.attn.out"], {"blocks.0.attn.out": lambda x: x[:, :1]})
    assert adapter.installed_hook_count() == 0


def test_logits_patch(adapter, ids):
    out, _ = run(adapter, ids, ["logits"], {"logits": torch.zeros_like})
    assert out.abs().max() == 0
