"""Sparse autoencoders in the SAELens on-disk layout: loading, saving, encoding and decoding.

A folder holds `cfg.json` and `sae_weights.safetensors` (the layout SAELens' `save_model` writes and
`SAE.load_from_disk` reads):

| tensor      | shape          | meaning                                                         |
|-------------|----------------|-----------------------------------------------------------------|
| `W_enc`     | [d_in, d_sae]  | encoder                                                         |
| `b_enc`     | [d_sae]        | encoder bias                                                    |
| `W_dec`     | [d_sae, d_in]  | decoder: row k is what latent k writes                          |
| `b_dec`     | [d_in]         | decoder bias (subtracted from the input when apply_b_dec_to_input) |
| `threshold` | [d_sae]        | JumpReLU only (older files: `log_threshold`, exponentiated)     |

cfg.json keys read here: `architecture` ("standard" | "topk" | "jumprelu"), `d_in`, `d_sae`,
`apply_b_dec_to_input`, `normalize_activations` ("none" | "expected_average_only_in" |
"constant_norm_rescale" | "layer_norm"), `k` and `rescale_acts_by_decoder_norm` (topk),
`reshape_activations` ("hook_z"), and the hook: `hook_name` (SAELens <= 5, top level) or
`metadata.hook_name` (SAELens 6), either a TransformerLens name (`blocks.1.hook_resid_post`) or a
tdb site (`blocks.1.resid_post`); `metadata.tdb_site` wins when present. For
`expected_average_only_in` SAELens folds a dataset-wide scale into the weights when it loads a
pretrained SAE; a file that still needs it may carry `norm_scaling_factor` (ours), else none is used.

Encoding, as SAELens does it (x [..., d_in] the site's value, flattened over heads for attn.z):

    x_n     = normalize_in(x)                        (identity for "none")
    pre     = (x_n - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    standard: a = relu(pre)    jumprelu: a = relu(pre) * (pre > relu(threshold))
    topk:     a = relu of the k largest of pre (times |W_dec| rows first when rescale_acts_by_decoder_norm)
    x_hat   = normalize_out(a @ W_dec + b_dec)       (topk with rescale: a / |W_dec| @ W_dec)

normalize_out is affine per position (x * scale + shift), so changing latents by da changes the
reconstruction by exactly (da @ W_dec) * scale: that is how a latent is patched with the
reconstruction error kept (`delta`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tdb_server.errors import InvalidArgument, NotFound
from tdb_server.model.sites import site_kind, site_layer

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")

# TransformerLens hook names -> tdb site kinds (inside blocks.{L}.)
_TL_HOOKS = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
             "hook_attn_out": "attn.out", "hook_mlp_out": "mlp.out", "attn.hook_z": "attn.z",
             "mlp.hook_pre": "mlp.pre", "mlp.hook_post": "mlp.post"}


def site_from_hook(hook_name: str) -> str:
    """`blocks.1.hook_resid_post` -> `blocks.1.resid_post`; tdb site names pass through."""
    layer, kind = site_layer(hook_name or ""), site_kind(hook_name or "")
    if layer is not None and kind in _TL_HOOKS:
        return f"blocks.{layer}.{_TL_HOOKS[kind]}"
    if hook_name == "hook_embed" or hook_name == "embed":
        return "embed"
    return hook_name


def hook_from_site(site: str) -> str:
    """`blocks.1.resid_post` -> `blocks.1.hook_resid_post` (the TransformerLens name SAELens records)."""
    layer = site_layer(site)
    if layer is not None:
        for hook, kind in _TL_HOOKS.items():
            if kind == site_kind(site):
                return f"blocks.{layer}.{hook}"
    return site


@dataclass
class SaeConfig:
    architecture: str
    d_in: int
    d_sae: int
    site: str                            # tdb site the SAE reads
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    k: int = 0                           # topk
    rescale_acts_by_decoder_norm: bool = False
    norm_scaling_factor: float | None = None
    dtype: str = "float32"
    raw: dict[str, Any] = field(default_factory=dict)   # the file's cfg.json, as read

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SaeConfig":
        meta = d.get("metadata") or {}
        arch = d.get("architecture", "standard")
        if arch not in ARCHITECTURES:
            raise InvalidArgument(f"SAE architecture {arch!r} is not supported; one of {', '.join(ARCHITECTURES)}",
                                  reason="BAD_SAE")
        norm = d.get("normalize_activations") or "none"
        if norm not in NORMALIZATIONS:
            raise InvalidArgument(f"normalize_activations {norm!r} is not supported; one of {', '.join(NORMALIZATIONS)}",
                                  reason="BAD_SAE")
        site = meta.get("tdb_site") or d.get("tdb_site") or site_from_hook(d.get("hook_name") or meta.get("hook_name") or "")
        if not site:
            raise InvalidArgument("the SAE's cfg.json names no hook (hook_name or metadata.hook_name)", reason="BAD_SAE")
        k = int(d.get("k") or (d.get("activation_fn_kwargs") or {}).get("k") or 0)
        if arch == "topk" and k <= 0:
            raise InvalidArgument("a topk SAE needs k > 0 in cfg.json", reason="BAD_SAE")
        try:
            d_in, d_sae = int(d["d_in"]), int(d["d_sae"])
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument("cfg.json needs integer d_in and d_sae", reason="BAD_SAE") from None
        factor = d.get("norm_scaling_factor")
        return cls(arch, d_in, d_sae, site, bool(d.get("apply_b_dec_to_input", True)), norm, k,
                   bool(d.get("rescale_acts_by_decoder_norm", False)),
                   float(factor) if factor is not None else None, str(d.get("dtype", "float32")), dict(d))

    def to_dict(self) -> dict[str, Any]:
        """cfg.json as SAELens 6 writes it, plus the older top-level hook_name and our tdb_site."""
        d = dict(self.raw)
        meta = dict(d.get("metadata") or {})
        meta.update(hook_name=hook_from_site(self.site), tdb_site=self.site)
        d.update(architecture=self.architecture, d_in=self.d_in, d_sae=self.d_sae, dtype=self.dtype,
                 apply_b_dec_to_input=self.apply_b_dec_to_input, normalize_activations=self.normalize_activations,
                 hook_name=hook_from_site(self.site), metadata=meta, reshape_activations=d.get(
                     "reshape_activations", "hook_z" if self.site.endswith("attn.z") else "none"))
        if self.architecture == "topk":
            d.update(k=self.k, rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm)
        if self.norm_scaling_factor is not None:
            d["norm_scaling_factor"] = self.norm_scaling_factor
        return d


class Sae:
    """An SAE's weights and its encode / decode. All math in float32 on the weights' device."""

    def __init__(self, cfg: SaeConfig, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                 b_dec: torch.Tensor, threshold: torch.Tensor | None = None, path: str = ""):
        shapes = {"W_enc": (W_enc, (cfg.d_in, cfg.d_sae)), "b_enc": (b_enc, (cfg.d_sae,)),
                  "W_dec": (W_dec, (cfg.d_sae, cfg.d_in)), "b_dec": (b_dec, (cfg.d_in,))}
        if cfg.architecture == "jumprelu":
            if threshold is None:
                raise InvalidArgument("a jumprelu SAE needs `threshold` (or `log_threshold`) weights", reason="BAD_SAE")
            shapes["threshold"] = (threshold, (cfg.d_sae,))
        for name, (t, want) in shapes.items():
            if tuple(t.shape) != want:
                raise InvalidArgument(f"SAE weight {name} has shape {list(t.shape)}, cfg.json says {list(want)}",
                                      reason="BAD_SAE")
        self.cfg = cfg
        self.W_enc, self.b_enc = W_enc.float(), b_enc.float()
        self.W_dec, self.b_dec = W_dec.float(), b_dec.float()
        self.threshold = threshold.float() if threshold is not None else None
        self.path = path

    @property
    def site(self) -> str:
        return self.cfg.site

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def to(self, device: torch.device | str) -> "Sae":
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    # --- normalization -------------------------------------------------------------------------

    def _in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., d_in] -> (x_n, scale [..., 1], shift [..., 1]) with normalize_out(y) = y * scale + shift."""
        one = torch.ones_like(x[..., :1])
        zero = torch.zeros_like(one)
        norm = self.cfg.normalize_activations
        if norm == "constant_norm_rescale":
            coeff = (self.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, 1 / coeff, zero
        if norm == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            c = x - mu
            std = c.std(dim=-1, keepdim=True)
            return c / (std + 1e-5), std, mu
        if norm == "expected_average_only_in" and self.cfg.norm_scaling_factor:
            s = self.cfg.norm_scaling_factor
            return x * s, one / s, zero
        return x, one, zero

    def flat(self, value: torch.Tensor) -> torch.Tensor:
        """A site value -> [..., d_in] float32 (attn.z [B, T, H, Dh] -> [B, T, H*Dh])."""
        x = value.float().to(self.W_enc.device)
        if x.shape[-1] != self.cfg.d_in and x.dim() >= 2 and x.shape[-2] * x.shape[-1] == self.cfg.d_in:
            x = x.flatten(-2)                                                   # [B, T, H*Dh]
        if x.shape[-1] != self.cfg.d_in:
            raise InvalidArgument(f"SAE for {self.site} takes d_in={self.cfg.d_in}, the site's value has shape "
                                  f"{list(value.shape)}", reason="SAE_SHAPE_MISMATCH")
        return x

    # --- encode / decode -----------------------------------------------------------------------

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] -> hidden pre-activations [..., d_sae]."""
        x_n, _, _ = self._in(x)
        pre = (x_n - self.b_dec * float(self.cfg.apply_b_dec_to_input)) @ self.W_enc + self.b_enc
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "standard":
            return pre.relu()
        if arch == "jumprelu":
            return pre.relu() * (pre > self.threshold.relu()).to(pre.dtype)
        k = min(self.cfg.k, pre.shape[-1])
        top = torch.topk(pre, k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())

    def encode(self, value: torch.Tensor) -> torch.Tensor:
        """A site value [B, T, ...] -> latent activations [B, T, d_sae] (float32)."""
        return self.activate(self.pre_acts(self.flat(value)))

    def _dec(self, a: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            a = a / self.W_dec.norm(dim=-1)
        return a @ self.W_dec

    def decode(self, a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Latents [..., d_sae] -> reconstruction [..., d_in]; `x` (the flat input) supplies the
        per-position normalization (layer_norm, constant_norm_rescale)."""
        _, scale, shift = self._in(x)
        return (self._dec(a) + self.b_dec) * scale + shift

    def reconstruct(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents [B, T, d_sae], reconstruction shaped like `value`, float32)."""
        x = self.flat(value)
        a = self.activate(self.pre_acts(x))
        return a, self.decode(a, x).reshape(value.shape)

    def delta(self, value: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
        """The change of the site's value [B, T, ...] when latents change by da [B, T, d_sae] and the
        reconstruction error is kept: (da @ W_dec) * scale, shaped like `value`, in value's dtype."""
        _, scale, _ = self._in(self.flat(value))
        return (self._dec(da) * scale).reshape(value.shape).to(dtype=value.dtype, device=value.device)

    def latent_delta(self, value: torch.Tensor, index: int, da_k: torch.Tensor) -> torch.Tensor:
        """Like `delta` for one latent: da_k [B, T] -> [B, T, ...]."""
        x = self.flat(value)
        _, scale, _ = self._in(x)
        row = self.W_dec[index]
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            row = row / row.norm()
        d = da_k.float().to(row.device)[..., None] * row * scale                 # [B, T, d_in]
        return d.reshape(value.shape).to(dtype=value.dtype, device=value.device)

    def write_direction(self, index: int) -> torch.Tensor:
        """What one unit of latent `index` adds to the site (before per-position normalization) [d_in]."""
        row = self.W_dec[index]
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            row = row / row.norm()
        return row

    # --- files ---------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write cfg.json + sae_weights.safetensors (SAELens layout)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
        (folder / CFG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=1, sort_keys=True) + "\n")
        return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> Sae:
    """Load an SAE saved in the SAELens layout (cfg.json + sae_weights.safetensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise NotFound(f"no SAE at {str(folder)!r}: expected {CFG_FILE} and {WEIGHTS_FILE}", reason="SAE_NOT_FOUND")
    try:
        cfg = SaeConfig.from_dict(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{cfg_path}: not JSON ({e})", reason="BAD_SAE") from None
    w = load_file(str(weights_path), device=str(device))
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in w]
    if missing:
        raise InvalidArgument(f"{weights_path} lacks {', '.join(missing)}", reason="BAD_SAE")
    threshold = w.get("threshold")
    if threshold is None and "log_threshold" in w:
        threshold = torch.exp(w["log_threshold"])
    return Sae(cfg, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], threshold, path=str(folder))


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2 over rows [n, d_in]."""
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return float(1 - resid / total) if total > 0 else math.nan
