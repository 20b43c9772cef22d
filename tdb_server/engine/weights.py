"""Named weights and read-outs of a model adapter, as the expression language sees them."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidArgument
from ..model.sites import site_kind, site_layer

# per-layer weights by the module they belong to: blocks.L.attn.W_O, blocks.L.mlp.W_out, ...
LAYER_WEIGHTS = {"attn": ("W_O", "b_O"), "mlp": ("W_out", "b_out", "W_in")}


def layer_weight(name: str) -> tuple[int, str] | None:
    """'blocks.1.attn.W_O' -> (1, 'W_O'); None for a name that is not a per-layer weight."""
    layer, kind = site_layer(name), site_kind(name)
    module, _, weight = kind.partition(".")
    return (layer, weight) if layer is not None and weight in LAYER_WEIGHTS.get(module, ()) else None


def device(adapter: Any) -> torch.device:
    """Where inputs go: the input embedding's device (with a device_map, the first module's)."""
    model = adapter.model
    dm = getattr(model, "hf_device_map", None)
    if dm:
        first = next(iter(dm.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        return torch.device("cpu" if first == "disk" else first)
    return model.get_input_embeddings().weight.device


def weight(adapter: Any, name: str) -> torch.Tensor:
    """W_U [D, V], b_U [V], W_E [V, D], blocks.L.attn.W_O [H, Dh, D], b_O [D], blocks.L.mlp.W_out [N, D],
    b_out [D], W_in [N, D]."""
    if name in ("W_U", "b_U", "W_E"):
        return getattr(adapter, name)
    found = layer_weight(name)
    if found is None:
        raise InvalidArgument(f"unknown weight {name!r}: W_U, b_U, W_E, blocks.L.attn.W_O/b_O, "
                              "blocks.L.mlp.W_in/W_out/b_out", reason="UNKNOWN_WEIGHT")
    layer, which = found
    if not 0 <= layer < adapter.info.n_layers:
        raise InvalidArgument(f"layer {layer} out of range (the model has {adapter.info.n_layers})",
                              reason="OUT_OF_RANGE")
    return getattr(adapter, which)(layer)


def unembed(adapter: Any, x: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ W_U + b_U -> [..., V] (no final norm)."""
    W_U = adapter.W_U
    return x.to(dtype=W_U.dtype, device=W_U.device) @ W_U + adapter.b_U


def logit_lens(adapter: Any, resid: torch.Tensor) -> torch.Tensor:
    """The final norm then the unembedding of a residual stream [..., D] -> [..., V]."""
    norm = adapter.final_norm
    weight = next(norm.parameters(), None)
    dev = weight.device if weight is not None and weight.device.type != "meta" else resid.device
    with torch.no_grad():
        return unembed(adapter, norm(resid.to(dtype=adapter.W_U.dtype, device=dev)))
