"""SAE latents as debugger units: which latents exist, and their value at a site.

A latent `blocks.{L}.{site}.sae.latent.{K}` is a unit of the grammar (model/sites.py) whose site is
`blocks.{L}.{site}`, where an SAE must be attached. Breakpoints, reads, patches, ablations and the
node table ask here:

| need               | here            | meaning                                                      |
|--------------------|-----------------|--------------------------------------------------------------|
| which latents exist | `latent_sizes` | site -> number of latents of the SAE attached there          |
| bounds check       | `check_latent`  | an SAE is attached at the site and K < d_sae (returns the SAE) |
| breakpoint / read  | `latent_value`  | encode(site value)[..., K] -> [B, T]                          |

Patches on a latent are `Intervention`s (model/interventions.py) carrying the SAE: a_K is edited and
the site becomes x + (a_K' - a_K) W_dec[K] (the reconstruction error is kept). A latent breakpoint
without a condition stops only where the latent fires (a_K > 0 somewhere).
"""

from __future__ import annotations

from typing import Any

import torch

from tdb_server.model.sites import check_latent_index

from .attach import attached, sae_at
from .sae import Sae


def latent_sizes(adapter: Any) -> dict[str, int]:
    """Site -> number of latents, for every SAE attached to the model."""
    return {site: entry.sae.d_sae for site, entry in attached(adapter).items()}


def check_latent(adapter: Any, site: str, index: int) -> Sae:
    """The SAE attached at `site`; SiteError when none is, or `index` is out of range."""
    check_latent_index(site, index, latent_sizes(adapter))
    return sae_at(adapter, site)


def latent_value(adapter: Any, site: str, index: int, value: torch.Tensor) -> torch.Tensor:
    """Latent `index` of the SAE at `site` for the site's value [B, T, ...] -> [B, T] float32."""
    sae = check_latent(adapter, site, index)
    return sae.encode(value)[..., index].to(value.device)
