"""The model layer: canonical sites, per-architecture mappings, leak-free hooks, the HF adapter.

Everything above (engine, analyses) talks to models through `ModelAdapter` and site names only.
"""

from .adapter import ModelAdapter, ModelInfo, ParityError
from .arch import ARCHITECTURES, ArchSpec, UnsupportedArchitecture, arch_for
from .hooks import Run, SiteHandler, eager_pattern
from .loading import build_random_model, load_model
from .sites import (
    Site,
    SiteError,
    Unit,
    all_sites,
    enclosing,
    expand_glob,
    parse_site,
    parse_unit,
    site_shape,
    sites_in,
)

__all__ = [
    "ARCHITECTURES", "ArchSpec", "ModelAdapter", "ModelInfo", "ParityError", "Run", "Site",
    "SiteError", "SiteHandler", "Unit", "UnsupportedArchitecture", "all_sites", "arch_for",
    "build_random_model", "eager_pattern", "enclosing", "expand_glob", "load_model", "parse_site",
    "parse_unit", "site_shape", "sites_in",
]
