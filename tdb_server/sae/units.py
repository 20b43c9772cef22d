"""SAE latents as debugger units: their value at a site, and patches on them.

The engine resolves `blocks.{L}.{site}.sae.latent.{K}` to the site `blocks.{L}.{site}` (where an SAE
must be attached) and calls these:

| engine need          | here                   | meaning                                                     |
|----------------------|------------------------|-------------------------------------------------------------|
| bounds check         | `check_latent`         | an SAE is attached at the site and K < d_sae                |
| breakpoint / read    | `latent_value`         | encode(site value)[..., K] -> [B, T]                         |
| patch                | `LatentPatchSpec`, `apply_latent_patch` | op on a_K (selector: batch, positions); the site becomes x + (a_K' - a_K) W_dec[K] (error kept) |

A latent breakpoint without a condition stops only where the latent fires (a_K > 0 somewhere).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from tdb_server.engine import patches as _patches
from tdb_server.engine.patches import PatchSpec
from tdb_server.model.sites import SiteError

from .attach import attached, sae_at
from .sae import Sae

LATENT_RE = re.compile(r"^blocks\.(\d+)\.(.+)\.sae\.latent\.(\d+)$")


def check_latent(adapter: Any, site: str, index: int) -> Sae:
    """The SAE attached at `site`; SiteError when none is, or `index` is out of range."""
    sae = sae_at(adapter, site)
    if sae is None:
        have = sorted(attached(adapter))
        hint = f"; SAEs are attached at {', '.join(have)}" if have else "; attach one first (AttachSae)"
        raise SiteError(f"no SAE is attached at {site}{hint}",
                        suggestions=[f"{s}.sae.latent.{index}" for s in have][:5])
    if not 0 <= index < sae.d_sae:
        raise SiteError(f"latent {index} out of range: the SAE at {site} has {sae.d_sae} latents (0..{sae.d_sae - 1})")
    return sae


def latent_value(adapter: Any, site: str, index: int, value: torch.Tensor) -> torch.Tensor:
    """Latent `index` of the SAE at `site` for the site's value [B, T, ...] -> [B, T] float32."""
    sae = check_latent(adapter, site, index)
    return sae.encode(value)[..., index].to(value.device)


@dataclass
class LatentPatchSpec(PatchSpec):
    """A patch on one SAE latent (the op acts on a_K [B, T]; the selector picks batch and positions)."""

    latent: int = -1


def apply_latent_patch(adapter: Any, value: torch.Tensor, spec: LatentPatchSpec,
                       lengths: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """The site's new value after `spec` edits latent `spec.latent` (reconstruction error kept)."""
    sae = check_latent(adapter, spec.site, spec.latent)
    a_k = sae.encode(value)[..., spec.latent].to(value.device)                    # [B, T]
    mask = _patches._mask(a_k.shape, "latent", spec.selector, a_k.device, offset)
    new = _patches._replacement(a_k, spec, "latent", lengths)
    if mask is not None:
        new = torch.where(mask, new, a_k)
    return value + sae.latent_delta(value, spec.latent, new - a_k)
