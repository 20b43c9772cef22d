"""Activation records: top-activating and random corpus windows for a neuron, head or SAE latent,
with per-token activations; batched with progress, cached on disk (see records.py).

| module      | what                                                                 |
|-------------|----------------------------------------------------------------------|
| corpus.py   | `load_corpus` (held-out slice or a user's file), `windows`, `cache_dir` |
| records.py  | `activation_records`, `Records`, `Window`, `site_maxima`               |
"""

from tdb_server.model.corpus import Corpus, cache_dir, load_corpus, windows
from .records import Records, UnitRef, Window, activation_records, site_maxima, unit_ref

__all__ = ["Corpus", "Records", "UnitRef", "Window", "activation_records", "cache_dir", "load_corpus",
           "site_maxima", "unit_ref", "windows"]
