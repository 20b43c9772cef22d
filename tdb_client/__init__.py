"""tdb_client: the typed Python client of a tdb server (returns numpy and dataclasses, never protos)."""

from .client import EventCollector, Session, TdbClient
from .errors import TdbError, TdbWarning
from .graph import Graph
from .results import (AblationEffect, AblationResult, AttentionResult, Comparison, InputAttributionResult,
                      LogitLensResult, NodeTable, NodeTableResult, PairedNodeTable, PatchSweepResult, ResolvedTarget,
                      SweepAxis, SweepStream)
from .sae import ActivationRecords, Explanation, SaeInfo
from .types import (Ablation, Breakpoint, BreakpointStatus, EvalResult, Event, Frame, Generate, ModelInfo, PatchResult,
                    ReplayReport, RunResult, RunStatus, Scope, ServerInfo, SiteInfo, StopInfo, Target, TensorSummary,
                    TokenProb, Trace, Variable)

__all__ = ["TdbClient", "Session", "EventCollector", "TdbError", "TdbWarning", "Breakpoint", "BreakpointStatus", "EvalResult",
           "Event", "Frame", "Generate", "ReplayReport", "ModelInfo", "PatchResult", "RunResult", "RunStatus", "Scope", "ServerInfo", "SiteInfo",
           "StopInfo", "TensorSummary", "TokenProb", "Variable",
           "Ablation", "AblationEffect", "AblationResult", "AttentionResult", "Comparison", "InputAttributionResult",
           "LogitLensResult", "NodeTable", "NodeTableResult", "PairedNodeTable", "ResolvedTarget", "Target", "Trace",
           "PatchSweepResult", "SweepAxis", "SweepStream", "Graph", "ActivationRecords", "Explanation", "SaeInfo"]

from . import _repr, graph, notebook, results, sae, types  # noqa: E402

# every result dataclass prints compactly (arrays as dtype + shape), nested ones (circuits, windows) too
_repr.install([c for m in (types, results, sae, graph) for c in vars(m).values()
               if isinstance(c, type) and c.__module__ == m.__name__])
notebook.install()                                     # and render as tables and heatmaps in Jupyter


def __getattr__(name: str) -> str:
    """`tdb_client.__version__`: the installed tdb-client's version (the file VERSION of the repository),
    looked up on first use (importlib.metadata costs import time that most sessions never need)."""
    if name == "__version__":
        from importlib.metadata import version

        return version("tdb-client")
    raise AttributeError(f"module 'tdb_client' has no attribute {name!r}")
