"""Names on the client, for display and syntax only: writing a node's name from a node-table row, and
splitting a head or neuron name into its parts for a label or a chart.

Nothing here decides what a name means (whether a unit exists, what a layer node or a glob expands
to): that is the server's grammar (`tdb_server/model/sites.py`), asked through the protocol.
"""

from __future__ import annotations

from ._enums import NODE_TYPES

# The site code of a NODE_SAE_LATENT row (its key_pos): the index of the site's kind in the server's
# table of block sites, as the proto documents it (resid_pre 0 ... resid_post 11).
SITE_CODES = ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.out", "resid_mid",
              "mlp.pre", "mlp.post", "mlp.out", "resid_post")
_UNIT_PARTS = {("attn", "head"): "head", ("mlp", "neuron"): "neuron"}
_NODE_NAMES = {"embed_token": "embed.token", "embed_pos": "embed.pos", "attn_bias": "blocks.{layer}.attn.bias",
               "mlp_bias": "blocks.{layer}.mlp.bias", "constant": "final_norm.bias+unembed.bias"}


def head(layer: int, index: int) -> str:
    return f"blocks.{layer}.attn.head.{index}"


def neuron(layer: int, index: int) -> str:
    return f"blocks.{layer}.mlp.neuron.{index}"


def node_name(node_type: int, layer: int, index: int, key_pos: int = -1) -> str:
    """A node-table row's name: blocks.L.attn.head.H, blocks.L.mlp.neuron.N, embed.token, ..."""
    kind = NODE_TYPES.get(int(node_type), "?")
    if kind in ("head", "head_pair"):
        return head(layer, index)
    if kind == "neuron":
        return neuron(layer, index)
    if kind == "sae_latent":   # key_pos holds the site's code
        return f"blocks.{layer}.{SITE_CODES[key_pos]}.sae.latent.{index}" if 0 <= key_pos < len(SITE_CODES) else "?"
    return _NODE_NAMES.get(kind, kind).format(layer=layer)


def _number(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def split_unit(name: str) -> tuple[str, int, int] | None:
    """"blocks.1.attn.head.2" -> ("head", 1, 2), "blocks.0.mlp.neuron.7" -> ("neuron", 0, 7); None for
    anything else. Syntax only: whether the layer and index exist is the server's to say."""
    parts = name.strip().split(".")
    if len(parts) != 5 or parts[0] != "blocks" or (parts[2], parts[3]) not in _UNIT_PARTS:
        return None
    layer, index = _number(parts[1]), _number(parts[4])
    if layer is None or index is None:
        return None
    return _UNIT_PARTS[parts[2], parts[3]], layer, index


def is_head(name: str) -> bool:
    split = split_unit(name)
    return split is not None and split[0] == "head"
