"""The canonical site grammar: the one place that says which names exist and what they hold.

A *site* is a point in the forward pass whose value can be seen (breakpoint, capture) and replaced
(patch). The same names are used on the wire, in the client, the dashboard and the DAP bridge; there
are no aliases. Shapes use B = batch, T = positions (query positions), Tk = key positions (T, plus
cached positions during generation), D = d_model, H = query heads, Hkv = key/value heads (= H
without GQA), Dh = d_head, N = d_mlp (neurons), V = vocab.

| site                      | shape            | meaning                                                    |
|---------------------------|------------------|------------------------------------------------------------|
| `embed`                   | [B, T, D]        | token (+ position) embedding: the stream entering block 0  |
| `blocks.{L}.resid_pre`    | [B, T, D]        | residual stream entering block L                           |
| `blocks.{L}.attn.q`       | [B, T, H, Dh]    | queries, after projection and RoPE                         |
| `blocks.{L}.attn.k`       | [B, Tk, Hkv, Dh] | keys, after projection and RoPE (KV heads under GQA)       |
| `blocks.{L}.attn.v`       | [B, Tk, Hkv, Dh] | values (KV heads under GQA)                                |
| `blocks.{L}.attn.pattern` | [B, H, T, Tk]    | attention probabilities; computed only when asked          |
| `blocks.{L}.attn.z`       | [B, T, H, Dh]    | per-head mixed values: input of the output projection      |
| `blocks.{L}.attn.out`     | [B, T, D]        | attention's write to the residual stream                   |
| `blocks.{L}.resid_mid`    | [B, T, D]        | resid_pre + attn.out (parallel blocks: see adapter docs)   |
| `blocks.{L}.mlp.pre`      | [B, T, N]        | neuron pre-activations (gated MLP: the gate projection)    |
| `blocks.{L}.mlp.post`     | [B, T, N]        | neuron activations, input of the down projection           |
|                           |                  | (gated MLP: act(gate) * up)                                |
| `blocks.{L}.mlp.out`      | [B, T, D]        | MLP's write to the residual stream                         |
| `blocks.{L}.resid_post`   | [B, T, D]        | residual stream leaving block L                            |
| `final_norm`              | [B, T, D]        | after the final normalisation                              |
| `logits`                  | [B, T, V]        |                                                            |

Units live inside a site (an intervention edits them there); a breakpoint on one stops at its stop site:

| unit                               | lives in                 | stops at / value read     | index range |
|------------------------------------|--------------------------|---------------------------|-------------|
| `blocks.{L}.attn.head.{H}`         | `blocks.{L}.attn.z`      | `attn.out`: its write     | 0..H-1      |
| `blocks.{L}.mlp.neuron.{N}`        | `blocks.{L}.mlp.post`    | `mlp.post[..., N]`        | 0..N-1      |
| `blocks.{L}.{site}.sae.latent.{K}` | `blocks.{L}.{site}`      | encode(site)[..., K]      | 0..K-1      |

Layer nodes name a layer's writes into the residual stream (ablations and patches take them):
`blocks.{L}` (attn.out and mlp.out), `blocks.{L}.attn` (attn.out), `blocks.{L}.mlp` (mlp.out). Any
of these names may be an fnmatch pattern (`blocks.*.attn.head.*`, `blocks.*.mlp.out`).

`all_sites` lists the sites in execution order, which is also the order of stepping. Nothing else in
tdb parses these names: every module asks the functions below.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tdb_server.errors import InvalidArgument

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import ModelInfo

# Block-level site kinds in execution order (per block).
BLOCK_KINDS: tuple[str, ...] = (
    "resid_pre",
    "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.out",
    "resid_mid",
    "mlp.pre", "mlp.post", "mlp.out",
    "resid_post",
)
MODEL_KINDS_BEFORE: tuple[str, ...] = ("embed",)
MODEL_KINDS_AFTER: tuple[str, ...] = ("final_norm", "logits")
# Sites served by the attention-function wrapper rather than by module hooks.
ATTN_FN_KINDS: frozenset[str] = frozenset({"attn.q", "attn.k", "attn.v", "attn.pattern"})

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HEAD_RE = re.compile(r"^blocks\.(\d+)\.attn\.head\.(\d+)$")
_NEURON_RE = re.compile(r"^blocks\.(\d+)\.mlp\.neuron\.(\d+)$")
_LATENT_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.sae\.latent\.(\d+)$")
_LAYER_RE = re.compile(r"^blocks\.(\d+)(?:\.(attn|mlp))?$")

# Axes of a site's value (batch is always axis 0): positions, heads, neurons, and the names of all axes.
POS_AXIS: dict[str, int] = {"attn.pattern": 2}                                          # default 1
HEAD_AXIS: dict[str, int] = {"attn.q": 2, "attn.k": 2, "attn.v": 2, "attn.z": 2, "attn.pattern": 1}
NEURON_AXIS: dict[str, int] = {"mlp.pre": 2, "mlp.post": 2}
_DIMS: dict[str, tuple[str, ...]] = {
    "attn.q": ("batch", "pos", "head", "d_head"), "attn.k": ("batch", "pos", "kv_head", "d_head"),
    "attn.v": ("batch", "pos", "kv_head", "d_head"), "attn.z": ("batch", "pos", "head", "d_head"),
    "attn.pattern": ("batch", "head", "query_pos", "key_pos"), "mlp.pre": ("batch", "pos", "neuron"),
    "mlp.post": ("batch", "pos", "neuron"), "logits": ("batch", "pos", "vocab"),
}


class SiteError(InvalidArgument, ValueError):
    """An unknown or malformed site / unit name. The message lists the nearest valid names."""

    reason = "UNKNOWN_SITE"


@dataclass(frozen=True)
class Site:
    """A parsed site name. `layer` is None for model-level sites; `kind` is the name without the
    `blocks.{L}.` prefix (e.g. "attn.z", "resid_pre", "logits")."""

    name: str
    layer: int | None
    kind: str

    @property
    def module(self) -> str | None:
        """'attn' or 'mlp' for sites inside those modules, else None."""
        head = self.kind.split(".", 1)[0]
        return head if head in ("attn", "mlp") else None


@dataclass(frozen=True)
class Unit:
    """A parsed unit name: a head, a neuron or an SAE latent.

    `site` holds its activation, at `index` along the unit axis (heads: axis 2 of attn.z, [B, T, Dh]
    each; neurons: the last axis of mlp.post; latents: encode(site)[..., K]). An intervention on the
    unit edits that activation there. `stop_site` is where a breakpoint on the unit stops and what its
    value is read against: a head's write into the residual stream, z_h @ W_O[h], is complete only at
    attn.out; a neuron and a latent stop at their own site."""

    name: str
    layer: int
    kind: str  # "head" | "neuron" | "latent"
    index: int
    site: str

    @property
    def stop_site(self) -> str:
        return f"blocks.{self.layer}.attn.out" if self.kind == "head" else self.site


@dataclass(frozen=True)
class LayerNode:
    """A whole layer as one node: `blocks.L` (attention and MLP), `blocks.L.attn` or `blocks.L.mlp`.
    `sites` are its writes into the residual stream, the values an ablation of the node replaces."""

    name: str
    layer: int
    sites: tuple[str, ...]


def all_sites(n_layers: int) -> list[str]:
    """Every canonical site of an `n_layers` model, in execution order."""
    names = list(MODEL_KINDS_BEFORE)
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{kind}" for kind in BLOCK_KINDS]
    return names + list(MODEL_KINDS_AFTER)


def site_kind(site: str) -> str:
    """'blocks.1.attn.out' -> 'attn.out'; 'logits' -> 'logits' (no validation: see parse_site)."""
    return _split(site)[1]


def site_layer(site: str) -> int | None:
    """'blocks.1.attn.out' -> 1; model-level sites -> None (no validation: see parse_site)."""
    return _split(site)[0]


def site_dims(kind: str) -> list[str]:
    """The names of the axes of a site kind's value, e.g. attn.z -> [batch, pos, head, d_head]."""
    return list(_DIMS.get(kind, ("batch", "pos", "d_model")))


def pos_axis(kind: str) -> int:
    """The axis of a site kind's value that holds (query) positions."""
    return POS_AXIS.get(kind, 1)


MAX_NAME_LEN = 256   # no site, unit or pattern is longer; suggestions cost |name| x |candidates|


def _check_length(name: str) -> None:
    if len(name) > MAX_NAME_LEN:
        raise SiteError(f"a name of {len(name)} characters: site, unit and layer names and their patterns are at "
                        f"most {MAX_NAME_LEN}")


def _nearest(name: str, candidates: list[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)


def _error(what: str, name: str, candidates: list[str]) -> SiteError:
    _check_length(name)
    near = _nearest(name, candidates)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return SiteError(f"unknown {what} {name!r}{hint}", suggestions=near)


def parse_site(name: str, n_layers: int) -> Site:
    """Parse a canonical site name of an `n_layers` model. Raises SiteError (with suggestions)."""
    _check_length(name)
    if name in MODEL_KINDS_BEFORE or name in MODEL_KINDS_AFTER:
        return Site(name, None, name)
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in BLOCK_KINDS and int(m.group(1)) < n_layers and str(int(m.group(1))) == m.group(1):
        return Site(name, int(m.group(1)), m.group(2))
    if m and m.group(2) in BLOCK_KINDS:
        raise SiteError(f"site {name!r}: layer {m.group(1)!r} is not one of 0..{n_layers - 1} "
                        f"(the model has {n_layers} blocks)", suggestions=[])
    unit_hint = ""
    if _HEAD_RE.match(name) or _NEURON_RE.match(name) or _LATENT_RE.match(name):
        unit_hint = " (that is a unit name; units live inside sites, see parse_unit)"
    err = _error("site", name, all_sites(n_layers) + ([] if unit_hint else _unit_examples(name, n_layers)))
    if unit_hint:
        err = SiteError(str(err) + unit_hint, suggestions=err.suggestions)
    raise err


def parse_unit(name: str, n_layers: int | None = None, n_heads: int | None = None,
               d_mlp: int | None = None) -> Unit:
    """Parse a unit name (head, neuron or SAE latent). Bounds are checked where given."""
    _check_length(name)
    def check_layer(layer: int) -> None:
        if n_layers is not None and layer >= n_layers:
            raise SiteError(f"unit {name!r}: layer {layer} out of range (model has {n_layers} blocks)")

    if m := _HEAD_RE.match(name):
        layer, index = int(m.group(1)), int(m.group(2))
        check_layer(layer)
        if n_heads is not None and index >= n_heads:
            raise SiteError(f"unit {name!r}: head {index} out of range (0..{n_heads - 1})")
        return Unit(name, layer, "head", index, f"blocks.{layer}.attn.z")
    if m := _NEURON_RE.match(name):
        layer, index = int(m.group(1)), int(m.group(2))
        check_layer(layer)
        if d_mlp is not None and index >= d_mlp:
            raise SiteError(f"unit {name!r}: neuron {index} out of range (0..{d_mlp - 1})")
        return Unit(name, layer, "neuron", index, f"blocks.{layer}.mlp.post")
    if (m := _LATENT_RE.match(name)) and m.group(2) in BLOCK_KINDS:
        layer = int(m.group(1))
        check_layer(layer)
        return Unit(name, layer, "latent", int(m.group(3)), f"blocks.{layer}.{m.group(2)}")
    raise _error("unit", name, _unit_examples(name, n_layers, n_heads, d_mlp))


def _unit_examples(name: str, n_layers: int | None, n_heads: int | None = None, d_mlp: int | None = None) -> list[str]:
    """Unit names to suggest for a mistyped `name`: a head, a neuron and a latent of each layer, with the
    index typed at the end of `name` (0 without one), kept in range where the bounds are known."""
    m = re.search(r"\.(\d{1,9})$", name)
    k = int(m.group(1)) if m else 0
    head, neuron = min(k, n_heads - 1) if n_heads else k, min(k, d_mlp - 1) if d_mlp else k
    layers = range(n_layers or 1)
    return ([f"blocks.{layer}.attn.head.{head}" for layer in layers]
            + [f"blocks.{layer}.mlp.neuron.{neuron}" for layer in layers]
            + [f"blocks.{layer}.resid_post.sae.latent.{k}" for layer in layers])


def is_unit_name(name: str) -> bool:
    """Whether `name` is shaped like a unit (head, neuron or latent), valid or not."""
    return bool(_HEAD_RE.match(name) or _NEURON_RE.match(name) or _LATENT_RE.match(name))


def is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def parse_layer_node(name: str, n_layers: int) -> LayerNode | None:
    """`blocks.L`, `blocks.L.attn` or `blocks.L.mlp` -> LayerNode; None for other shapes of name.
    Raises SiteError for a layer the model does not have."""
    _check_length(name)
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    layer = int(m.group(1))
    if layer >= n_layers or str(layer) != m.group(1):
        raise SiteError(f"{name!r}: layer {m.group(1)} out of range (0..{n_layers - 1})")
    kinds = [m.group(2)] if m.group(2) else ["attn", "mlp"]
    return LayerNode(name, layer, tuple(f"blocks.{layer}.{k}.out" for k in kinds))


def node_names(info: ModelInfo, latents: dict[str, int], neurons: bool = True) -> list[str]:
    """Every node an ablation can name: layers, their attn/mlp, heads, neurons (when asked: there may be
    many) and the latents of attached SAEs (`latents`: site -> number of latents)."""
    names: list[str] = []
    for layer in range(info.n_layers):
        names += [f"blocks.{layer}", f"blocks.{layer}.attn", f"blocks.{layer}.mlp"]
        names += [f"blocks.{layer}.attn.head.{h}" for h in range(info.n_heads)]
        if neurons:
            names += [f"blocks.{layer}.mlp.neuron.{n}" for n in range(info.d_mlp)]
    for site, n in latents.items():
        names += [f"{site}.sae.latent.{k}" for k in range(n)]
    return names


def check_latent_index(site: str, index: int, latents: dict[str, int]) -> None:
    """SiteError unless an SAE is attached at `site` (`latents`: site -> number of latents) with latent `index`."""
    if site not in latents:
        have = sorted(latents)
        hint = f"; SAEs are attached at {', '.join(have)}" if have else "; attach one first (AttachSae)"
        raise SiteError(f"no SAE is attached at {site}{hint}", suggestions=[f"{s}.sae.latent.{index}" for s in have][:5])
    n = latents[site]
    if not 0 <= index < n:
        raise SiteError(f"latent {index} out of range: the SAE at {site} has {n} latents (0..{n - 1})")


def check_unit(unit: Unit, info: ModelInfo, latents: dict[str, int]) -> Unit:
    """`unit` if this model has it (a latent: an SAE attached at its site has it); SiteError otherwise."""
    if not 0 <= unit.layer < info.n_layers:
        raise SiteError(f"layer {unit.layer} out of range: the model has {info.n_layers} layers")
    if unit.kind == "latent":
        parse_site(unit.site, info.n_layers)
        check_latent_index(unit.site, unit.index, latents)
        return unit
    limit = info.n_heads if unit.kind == "head" else info.d_mlp
    if not 0 <= unit.index < limit:
        raise SiteError(f"{unit.kind} {unit.index} out of range: layer {unit.layer} has {limit} {unit.kind}s")
    return unit


def expand_nodes(pattern: str, info: ModelInfo, latents: dict[str, int]) -> list[str]:
    """The nodes an fnmatch pattern names (`blocks.*.attn.head.*`), in model order; SiteError if none.
    Neurons are candidates only when the pattern says `neuron` (there may be many)."""
    _check_length(pattern)
    names = node_names(info, latents if "latent" in pattern else {}, neurons="neuron" in pattern)
    matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        raise SiteError(f"pattern {pattern!r} matches no head, neuron, latent or layer",
                        suggestions=_nearest(pattern, names))
    return matched


def unknown_name(name: str, info: ModelInfo, latents: dict[str, int]) -> SiteError:
    """The error for a name that is no site, unit or layer node, with the nearest of all of them."""
    return _error("site, unit or layer", name, all_sites(info.n_layers) + node_names(info, latents, neurons=False))


def expand_glob(pattern: str, sites: list[str]) -> list[str]:
    """Sites matching an fnmatch pattern (e.g. `blocks.*.mlp.out`), in the order of `sites`.
    A pattern without wildcards must name a site exactly. Raises SiteError when nothing matches."""
    _check_length(pattern)
    if not any(c in pattern for c in "*?["):
        if pattern in sites:
            return [pattern]
        raise _error("site", pattern, sites)
    matched = [s for s in sites if fnmatch.fnmatchcase(s, pattern)]
    if not matched:
        raise SiteError(f"pattern {pattern!r} matches no site", suggestions=_nearest(pattern, sites))
    return matched


def site_shape(site: str | Site, info: ModelInfo, batch: int, seq: int,
               kv_seq: int | None = None) -> tuple[int, ...]:
    """The documented shape of a site's value for a forward on [batch, seq] tokens.
    `kv_seq` (default `seq`) is the number of key positions, larger with a KV cache."""
    s = site if isinstance(site, Site) else parse_site(site, info.n_layers)
    tk = seq if kv_seq is None else kv_seq
    shapes = {
        "embed": (batch, seq, info.d_model),
        "resid_pre": (batch, seq, info.d_model),
        "attn.q": (batch, seq, info.n_heads, info.d_head),
        "attn.k": (batch, tk, info.n_kv_heads, info.d_head),
        "attn.v": (batch, tk, info.n_kv_heads, info.d_head),
        "attn.pattern": (batch, info.n_heads, seq, tk),
        "attn.z": (batch, seq, info.n_heads, info.d_head),
        "attn.out": (batch, seq, info.d_model),
        "resid_mid": (batch, seq, info.d_model),
        "mlp.pre": (batch, seq, info.d_mlp),
        "mlp.post": (batch, seq, info.d_mlp),
        "mlp.out": (batch, seq, info.d_model),
        "resid_post": (batch, seq, info.d_model),
        "final_norm": (batch, seq, info.d_model),
        "logits": (batch, seq, info.vocab_size),
    }
    return shapes[s.kind]


# --- hierarchy, for step over / step out -------------------------------------------------------

def enclosing(site: str | Site) -> tuple[str, ...]:
    """Scopes enclosing a site, outermost first: `blocks.3.attn.z` -> ("blocks.3", "blocks.3.attn");
    `blocks.3.resid_mid` -> ("blocks.3",); `logits` -> ()."""
    s = site if isinstance(site, Site) else Site(site, *_split(site))
    if s.layer is None:
        return ()
    block = f"blocks.{s.layer}"
    return (block, f"{block}.{s.module}") if s.module else (block,)


def sites_in(scope: str, n_layers: int) -> list[str]:
    """Sites inside a scope (`blocks.L` or `blocks.L.attn|mlp`), in execution order; `""` = all."""
    names = all_sites(n_layers)
    if scope == "":
        return names
    inside = [s for s in names if s.startswith(scope + ".")]
    if not inside:
        raise _error("scope", scope, [f"blocks.{layer}{m}" for layer in range(n_layers)
                                      for m in ("", ".attn", ".mlp")])
    return inside


def _split(name: str) -> tuple[int | None, str]:
    m = _BLOCK_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)
