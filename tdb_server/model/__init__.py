"""The model layer: the HF adapter and what everything above shares about a model.

    sites.py          THE name grammar: sites, units, layer nodes, globs, axes and dims
    arch.py           per-architecture mappings (one row a family); hooks.py: leak-free dispatcher hooks
    adapter.py        ModelAdapter: the wrapped model, its weights, `run_with_cache`, model facts
    capture.py        the one capture (`Capture`, what `run_with_cache` returns)
    interventions.py  the one intervention model (ops, selectors, composition) for every path
    tokens.py         prompts as validated token ids; corpus.py: text cut into windows
    fingerprint.py    the model's identity (recordings, record and explanation caches)
    loading.py        loading a local HF directory; tiny random models for tests

Everything above (engine, analyses) talks to models through `ModelAdapter` and these names only.
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
