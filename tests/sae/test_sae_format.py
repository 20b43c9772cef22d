"""SAEs written in the SAELens layout by this test (plain safetensors + json, no tdb code) load and
give the latents computed here by hand, for standard, TopK and JumpReLU SAEs and their options."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tdb_server.errors import InvalidArgument, NotFound
from tdb_server.sae import load_sae, site_from_hook

D, K = 32, 48


def _weights(seed: int, jump: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D, K, generator=g) * 0.4, "b_enc": torch.randn(K, generator=g) * 0.2 - 0.1,
         "W_dec": torch.randn(K, D, generator=g) * 0.3, "b_dec": torch.randn(D, generator=g) * 0.1}
    if jump:
        w["threshold"] = torch.rand(K, generator=g) * 0.5
    return w


def _write(folder, weights, cfg):
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _x(seed: int = 7) -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed)) * 2   # [B, T, D]


def test_standard_sae_with_the_old_top_level_hook_name(tmp_path):
    w = _weights(0)
    sae = load_sae(_write(tmp_path / "s", w, {"architecture": "standard", "d_in": D, "d_sae": K,
                                             "hook_name": "blocks.1.hook_resid_post", "apply_b_dec_to_input": True,
                                             "normalize_activations": "none", "dtype": "float32"}))
    x = _x()
    want = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert sae.site == "blocks.1.resid_post"
    torch.testing.assert_close(sae.encode(x), want, rtol=0, atol=1e-6)
    a, recon = sae.reconstruct(x)
    torch.testing.assert_close(recon, want @ w["W_dec"] + w["b_dec"], rtol=0, atol=1e-5)
    assert (want > 0).any() and (want == 0).any()


def test_jumprelu_sae_with_saelens6_metadata_and_no_b_dec_on_input(tmp_path):
    w = _weights(1, jump=True)
    sae = load_sae(_write(tmp_path / "j", w, {"architecture": "jumprelu", "d_in": D, "d_sae": K,
                                             "apply_b_dec_to_input": False, "normalize_activations": "none",
                                             "metadata": {"hook_name": "blocks.0.hook_mlp_out",
                                                          "sae_lens_version": "6.0.0"}}))
    x = _x(8)
    pre = x @ w["W_enc"] + w["b_enc"]
    want = torch.where(pre > w["threshold"], pre.relu(), torch.zeros_like(pre))
    assert sae.site == "blocks.0.mlp.out"
    torch.testing.assert_close(sae.encode(x), want, rtol=0, atol=1e-6)
    assert 0 < int((want > 0).sum()) < int((pre > 0).sum())   # the threshold matters here


def test_jumprelu_log_threshold_from_older_files(tmp_path):
    w = _weights(2, jump=True)
    w["log_threshold"] = torch.log(w.pop("threshold"))
    sae = load_sae(_write(tmp_path / "lj", w, {"architecture": "jumprelu", "d_in": D, "d_sae": K,
                                              "hook_name": "blocks.0.resid_pre"}))
    x = _x(9)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    want = torch.where(pre > w["log_threshold"].exp(), pre.relu(), torch.zeros_like(pre))
    torch.testing.assert_close(sae.encode(x), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rescale", [False, True])
def test_topk_sae(tmp_path, rescale):
    w = _weights(3)
    sae = load_sae(_write(tmp_path / f"t{rescale}", w, {
        "architecture": "topk", "d_in": D, "d_sae": K, "k": 5, "rescale_acts_by_decoder_norm": rescale,
        "metadata": {"hook_name": "blocks.1.attn.hook_z"}, "reshape_activations": "hook_z"}))
    x = _x(10).view(2, 5, 4, 8)                                               # attn.z [B, T, H, Dh]
    flat = x.flatten(-2)
    pre = (flat - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=-1)
    if rescale:
        pre = pre * norms
    top = torch.topk(pre, 5, dim=-1)
    want = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    assert sae.site == "blocks.1.attn.z"
    a = sae.encode(x)
    torch.testing.assert_close(a, want, rtol=0, atol=1e-6)
    assert int((a > 0).sum(-1).max()) <= 5
    dec = (want / norms if rescale else want) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(sae.reconstruct(x)[1], dec.view_as(x), rtol=0, atol=1e-5)


def test_layer_norm_normalization_and_the_latent_delta_is_exact(tmp_path):
    w = _weights(4)
    sae = load_sae(_write(tmp_path / "ln", w, {"architecture": "standard", "d_in": D, "d_sae": K,
                                              "hook_name": "blocks.0.resid_post", "normalize_activations": "layer_norm"}))
    x = _x(11)
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (std + 1e-5)
    want = torch.relu((xn - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(x), want, rtol=0, atol=1e-5)
    recon = (want @ w["W_dec"] + w["b_dec"]) * std + mu
    torch.testing.assert_close(sae.reconstruct(x)[1], recon, rtol=0, atol=1e-5)
    # zeroing latent k with the error kept == decode(a with a_k = 0) + (x - decode(a))
    k = int(want[0, 0].argmax())
    a2 = want.clone()
    a2[..., k] = 0
    by_hand = (a2 @ w["W_dec"] + w["b_dec"]) * std + mu + (x - recon)
    got = x + sae.latent_delta(x, k, -want[..., k])
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-5)


def test_round_trip_through_save_and_clear_errors(tmp_path):
    w = _weights(5)
    folder = _write(tmp_path / "rt", w, {"architecture": "standard", "d_in": D, "d_sae": K,
                                         "hook_name": "blocks.0.hook_resid_mid"})
    sae = load_sae(folder)
    again = load_sae(sae.save(tmp_path / "saved"))
    x = _x(12)
    assert torch.equal(sae.encode(x), again.encode(x)) and again.site == "blocks.0.resid_mid"
    cfg = json.loads((tmp_path / "saved" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_mid" and cfg["architecture"] == "standard"
    assert site_from_hook("blocks.3.hook_mlp_out") == "blocks.3.mlp.out"
    with pytest.raises(NotFound):
        load_sae(tmp_path / "nowhere")
    bad = _write(tmp_path / "bad", w, {"architecture": "gated", "d_in": D, "d_sae": K, "hook_name": "blocks.0.hook_resid_pre"})
    with pytest.raises(InvalidArgument, match="not supported"):
        load_sae(bad)
    wrong = _write(tmp_path / "wrong", w, {"architecture": "standard", "d_in": D + 1, "d_sae": K,
                                           "hook_name": "blocks.0.hook_resid_pre"})
    with pytest.raises(InvalidArgument, match="W_enc has shape"):
        load_sae(wrong)
