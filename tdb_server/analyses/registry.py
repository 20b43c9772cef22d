"""The registry of analyses: each analysis registers under a name; `Initialize` advertises the names.

    @register("node_table", "heads, neurons, embeddings with direct and total effects on a target")
    def node_table(adapter, ids, objective, ...): ...

`analysis_names()` is what `Capabilities.analyses` lists (servicer.capabilities imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class AnalysisSpec:
    name: str
    description: str
    fn: Callable


REGISTRY: dict[str, AnalysisSpec] = {}


def register(name: str, description: str) -> Callable[[Callable], Callable]:
    def add(fn: Callable) -> Callable:
        if name in REGISTRY and REGISTRY[name].fn is not fn:
            raise ValueError(f"analysis {name!r} registered twice")
        REGISTRY[name] = AnalysisSpec(name, description, fn)
        return fn
    return add


def analysis_names() -> list[str]:
    """Registered analyses, in registration order."""
    return list(REGISTRY)
