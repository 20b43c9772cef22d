"""Shared helpers for the model-layer tests: tiny random models of every family, a capture handler."""

from __future__ import annotations

import torch

from tdb_server.model import build_random_model


# family name -> build_random_model arguments (tiny: 2 blocks, d=32, 4 heads, vocab 100)
FAMILIES = {
    "gpt2": dict(model_type="gpt2"),
    "llama": dict(model_type="llama"),            # GQA: 4 query heads, 2 KV heads
    "qwen2": dict(model_type="qwen2"),
    "gpt_neox": dict(model_type="gpt_neox"),      # use_parallel_residual=True
}
INIT = 0.2  # larger than HF's 0.02 so that patches move the logits visibly

# The second norm of each block, for hand computations.
NORM2 = {"gpt2": "ln_2", "llama": "post_attention_layernorm", "qwen2": "post_attention_layernorm",
         "gpt_neox": "post_attention_layernorm"}

_cache: dict[str, object] = {}


def get_adapter(family: str):
    if family not in _cache:
        _cache[family] = build_random_model(**FAMILIES[family], seed=0, initializer_range=INIT)
    return _cache[family]


class Capture:
    """Records a clone of every site it asked for; `patches[site](value) -> new value` patches."""

    def __init__(self, sites, patches=None):
        self.sites = frozenset(sites)
        self.patches = dict(patches or {})
        self.values: dict[str, torch.Tensor] = {}
        self.order: list[str] = []

    def on_site(self, site, value):
        self.values[site] = value.detach().clone()
        self.order.append(site)
        fn = self.patches.get(site)
        return fn(value) if fn is not None else None
