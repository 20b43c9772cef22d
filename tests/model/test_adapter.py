"""The adapter against plain HF: parity, verified sites and shapes, weights, final norm, errors."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tdb_server.model import (
    ModelAdapter, UnsupportedArchitecture, all_sites, arch_for, build_random_model, load_model,
    site_shape,
)
from tdb_server.model.loading import _SMALL

from model_helpers import FAMILIES, INIT, Capture, get_adapter


def plain_hf(model_type, attn_implementation=None):
    """The same random model as build_random_model(..., seed=0), untouched by tdb."""
    cfg = AutoConfig.for_model(model_type, **{**_SMALL[model_type], "initializer_range": INIT})
    torch.manual_seed(0)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_config(cfg, **kwargs).eval()


def test_parity_every_site_hooked(adapter, family, ids):
    reference = plain_hf(FAMILIES[family]["model_type"])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in row 0: masks reach the pattern computation
    for attention_mask in (None, mask):
        with torch.no_grad():
            want = reference(input_ids=ids, attention_mask=attention_mask).logits
        capture = Capture(adapter.info.sites)
        got = adapter.forward(ids, capture, attention_mask=attention_mask)
        assert (got - want).abs().max() <= 1e-5
        assert set(capture.values) == set(adapter.info.sites)
        assert capture.order == adapter.info.sites  # fired in the documented execution order
        assert (adapter.forward(ids, attention_mask=attention_mask) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ["mistral", "qwen3"])
def test_other_llama_like_families(model_type, ids):
    a = build_random_model(model_type, initializer_range=INIT)
    assert a.verified_sites == set(a.info.sites)
    want = plain_hf(model_type)(input_ids=ids).logits
    assert (a.forward(ids, Capture(a.info.sites)) - want).abs().max() <= 1e-5


def test_verified_sites_and_shapes(adapter, ids):
    info = adapter.info
    assert adapter.verified_sites == frozenset(all_sites(info.n_layers)) and not adapter.unverified
    capture = Capture(info.sites)
    adapter.forward(ids, capture)
    for site, value in capture.values.items():
        assert tuple(value.shape) == site_shape(site, info, *ids.shape), site


def test_info(family):
    info = get_adapter(family).info
    assert (info.n_layers, info.n_heads, info.d_model, info.d_head, info.vocab_size) == (2, 4, 32, 8, 100)
    assert info.n_kv_heads == (2 if family in ("llama", "qwen2") else 4)
    assert info.d_mlp == (128 if family == "gpt2" else 64)
    assert info.parallel_blocks == (family == "gpt_neox")
    assert (info.dtype, info.device, info.has_tokenizer) == ("float32", "cpu", False)
    assert info.attn_implementation == "sdpa"


def test_direct_effect_weights(adapter, family, ids):
    """attn.out = sum_h z_h W_O[h] + b_O; mlp.out = sum_n post_n W_out[n] + b_out;
    mlp.pre = (MLP input) W_in^T + b; the residual stream adds up."""
    info = adapter.info
    capture = Capture(info.sites)
    mlp_inputs = []
    mlp_in = adapter.blocks[1].get_submodule(adapter.spec.mlp_in)
    handle = mlp_in.register_forward_hook(lambda m, args, out: mlp_inputs.append(args[0]))
    try:
        logits = adapter.forward(ids, capture)
    finally:
        handle.remove()
    v = capture.values
    for layer in range(info.n_layers):
        p = f"blocks.{layer}."
        attn_out = torch.einsum("bthd,hdm->btm", v[p + "attn.z"], adapter.W_O(layer)) + adapter.b_O(layer)
        assert (attn_out - v[p + "attn.out"]).abs().max() <= 1e-5
        mlp_out = v[p + "mlp.post"] @ adapter.W_out(layer) + adapter.b_out(layer)
        assert (mlp_out - v[p + "mlp.out"]).abs().max() <= 1e-5
        assert (v[p + "resid_pre"] + v[p + "attn.out"] - v[p + "resid_mid"]).abs().max() <= 1e-5
        assert (v[p + "resid_mid"] + v[p + "mlp.out"] - v[p + "resid_post"]).abs().max() <= 1e-5
        # z = pattern @ v, per head (GQA: query head h reads KV head h // group)
        vv = v[p + "attn.v"].repeat_interleave(info.n_heads // info.n_kv_heads, dim=2)
        z = torch.einsum("bhqk,bkhd->bqhd", v[p + "attn.pattern"], vv)
        assert (z - v[p + "attn.z"]).abs().max() <= 1e-5
    bias = getattr(mlp_in, "bias", None)
    pre = mlp_inputs[0] @ adapter.W_in(1).T + (0 if bias is None else bias)
    assert (pre - v["blocks.1.mlp.pre"]).abs().max() <= 1e-5
    assert (v["blocks.0.resid_pre"] - v["embed"]).abs().max() == 0
    if family != "gpt2":  # GPT-2's embed adds position embeddings
        assert (adapter.W_E[ids] - v["embed"]).abs().max() == 0
    assert (v["final_norm"] @ adapter.W_U + adapter.b_U - logits).abs().max() <= 1e-5


def test_final_norm_linearisation(adapter, ids):
    """final_norm(resid) == sum over components of final_norm_linear(c, s) + final_norm_bias."""
    capture = Capture(adapter.info.sites)
    adapter.forward(ids, capture)
    v, last = capture.values, adapter.info.n_layers - 1
    resid = v[f"blocks.{last}.resid_post"]
    scale = adapter.final_norm_scale(resid)
    assert scale.shape == (*ids.shape, 1)
    components = [v["embed"]] + [v[f"blocks.{layer}.{k}"] for layer in range(last + 1)
                                 for k in ("attn.out", "mlp.out")]
    assert (sum(components) - resid).abs().max() <= 1e-5
    total = sum(adapter.final_norm_linear(c, scale) for c in components) + adapter.final_norm_bias
    assert (total - v["final_norm"]).abs().max() <= 1e-5
    assert (adapter.final_norm(resid) - v["final_norm"]).abs().max() <= 1e-6


def test_pattern_matches_hf_eager_attentions(ids):
    """With an eager model, HF returns its own attention weights: ours must equal them."""
    a = build_random_model("llama", initializer_range=INIT, attn_implementation="eager")
    assert a.info.attn_implementation == "eager"
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    capture = Capture([f"blocks.{layer}.attn.pattern" for layer in range(2)])
    with torch.no_grad(), a.running(capture):
        out = a.model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for layer in range(2):
        assert (capture.values[f"blocks.{layer}.attn.pattern"] - out.attentions[layer]).abs().max() <= 1e-6


def test_close_restores_attention_implementation():
    a = build_random_model("gpt2")
    assert a.model.config._attn_implementation == "tdb_sdpa"
    a.close()
    assert a.model.config._attn_implementation == "sdpa"


def test_unsupported_architecture():
    with pytest.raises(UnsupportedArchitecture) as e:
        arch_for("bert")
    assert "'bert'" in str(e.value) and "gpt2" in str(e.value) and "llama" in str(e.value)
    with pytest.raises(UnsupportedArchitecture, match="opt"):
        build_random_model("opt")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gptj", n_layer=1, n_embd=16, n_head=2, vocab_size=20, rotary_dim=4))
    with pytest.raises(UnsupportedArchitecture, match="gptj"):
        ModelAdapter(model)


def test_load_model_from_directory(tmp_path, ids):
    source = build_random_model("llama", initializer_range=INIT, self_check=False)
    source.close()
    source.model.save_pretrained(tmp_path / "m")
    a = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")
    assert not a.info.has_tokenizer and a.info.name == "m"
    assert a.verified_sites == set(a.info.sites)
    assert (a.forward(ids) - source.model(input_ids=ids).logits).abs().max() <= 1e-6
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training


def test_load_model_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "Mr.", "Darcy", "said", "Elizabeth"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path / "m")
    source = build_random_model("gpt2", self_check=False)
    source.close()
    source.model.save_pretrained(tmp_path / "m")
    a = load_model(str(tmp_path / "m"), device="cpu")
    assert a.info.has_tokenizer and a.tokenizer("Mr. Darcy")["input_ids"] == [1, 2]


def test_load_model_missing(tmp_path):
    from tdb_server.errors import NotFound
    with pytest.raises(NotFound):
        load_model(str(tmp_path / "nothing"))


def test_gpt2_layer_scaled_attention_pattern(ids):
    """GPT-2's scale_attn_by_inverse_layer_idx reaches the pattern through `scaling`."""
    a = build_random_model("gpt2", initializer_range=INIT, attn_implementation="eager",
                           scale_attn_by_inverse_layer_idx=True)
    capture = Capture(["blocks.1.attn.pattern"])
    with torch.no_grad(), a.running(capture):
        out = a.model(input_ids=ids, output_attentions=True)
    assert (capture.values["blocks.1.attn.pattern"] - out.attentions[1]).abs().max() <= 1e-6


def test_generate_with_kv_cache(ids):
    """Sites fire on every generation step; with a KV cache k/v/pattern cover all key positions."""
    a = get_adapter("llama")
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = a.model.generate(ids, **kwargs)
    shapes = []

    class Shapes(Capture):
        def on_site(self, site, value):
            shapes.append((site, tuple(value.shape)))

    with torch.no_grad(), a.running(Shapes(["blocks.1.attn.k", "blocks.1.attn.pattern", "blocks.1.resid_mid"])):
        hooked = a.model.generate(ids, **kwargs)
    assert torch.equal(plain, hooked) and a.installed_hook_count() == 0
    b, t = ids.shape
    assert shapes[:3] == [("blocks.1.attn.k", (b, t, 2, 8)), ("blocks.1.attn.pattern", (b, 4, t, t)),
                          ("blocks.1.resid_mid", (b, t, 32))]
    assert shapes[-3:] == [("blocks.1.attn.k", (b, t + 2, 2, 8)), ("blocks.1.attn.pattern", (b, 4, 1, t + 2)),
                           ("blocks.1.resid_mid", (b, 1, 32))]


def test_a_folder_without_tokenizer_files_loads_without_a_tokenizer(tmp_path):
    from tdb_server.model import build_random_model, load_model

    build_random_model("gpt2").model.save_pretrained(tmp_path)
    adapter = load_model(str(tmp_path), device="cpu")
    assert adapter.tokenizer is None and adapter.info.has_tokenizer is False
