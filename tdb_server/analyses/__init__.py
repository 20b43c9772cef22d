"""Analyses: plain functions over a ModelAdapter and token ids (no gRPC), registered by name.

| module                 | analyses                                                                 |
|------------------------|--------------------------------------------------------------------------|
| inputs.py              | prompts -> token ids; targets (logit diff, logit, log-prob, direction)   |
| node_table.py          | node_table, direct_logit_attribution, token_pair_attribution,            |
|                        | trace_upstream, compare_prompts                                          |
| ablation.py            | ablation (zero / mean / resample; heads, neurons, layers)                |
| lens.py                | logit_lens, attention_pattern                                            |
| input_attribution.py   | input_attribution (gradient x input, integrated gradients)              |
| sweeps.py (resume.py)  | patch_sweep, attribution_patching (batched, resumed at the patched layer)|
| circuits/              | edge_attribution, path_patching, circuit, information_flow             |

`analysis_names()` lists what `Capabilities.analyses` advertises.
"""

from . import ablation, circuits, input_attribution, lens, node_table, sweeps  # noqa: F401  (importing registers them)
from .inputs import Prompt, Target, TargetSpec, encode, resolve_target
from .registry import REGISTRY, analysis_names

__all__ = ["REGISTRY", "Prompt", "Target", "TargetSpec", "analysis_names", "encode", "resolve_target"]
