"""Sparse autoencoders: SAELens-format loading (sae.py), attaching to a model and splicing with the
reconstruction error kept, quality reports (attach.py), and latents as debugger units (units.py).

| module     | what                                                                          |
|------------|-------------------------------------------------------------------------------|
| sae.py     | `Sae` (encode / decode / delta), `load_sae`, `Sae.save` (cfg.json + safetensors) |
| attach.py  | `attach`, `detach`, `attached`, `attach_bundled`, `SaeSplice`, `quality`        |
| units.py   | `latent_sizes`, `check_latent`, `latent_value` (edits: model/interventions.py)   |
"""

from .attach import AttachedSae, Quality, SaeSplice, attach, attach_bundled, attached, detach, quality, sae_at
from .sae import Sae, SaeConfig, load_sae, site_from_hook

__all__ = ["AttachedSae", "Quality", "Sae", "SaeConfig", "SaeSplice", "attach", "attach_bundled", "attached",
           "detach", "load_sae", "quality", "sae_at", "site_from_hook"]
