"""tdb_client: the typed Python client of a tdb server (returns numpy and dataclasses, never protos)."""

from .client import EventCollector, Session, TdbClient
from .errors import TdbError
from .graph import Graph
from .results import (AblationEffect, AblationResult, AttentionResult, Comparison, InputAttributionResult,
                      LogitLensResult, NodeTable, NodeTableResult, PairedNodeTable, PatchSweepResult, ResolvedTarget,
                      SweepAxis, SweepStream)
from .sae import ActivationRecords, Explanation, SaeInfo
from .types import (Ablation, Breakpoint, BreakpointStatus, EvalResult, Event, Frame, Generate, ModelInfo, PatchResult,
                    ReplayReport, RunResult, RunStatus, Scope, ServerInfo, SiteInfo, StopInfo, Target, TensorSummary,
                    TokenProb, Trace, Variable)

__all__ = ["TdbClient", "Session", "EventCollector", "TdbError", "Breakpoint", "BreakpointStatus", "EvalResult",
           "Event", "Frame", "Generate", "ReplayReport", "ModelInfo", "PatchResult", "RunResult", "RunStatus", "Scope", "ServerInfo", "SiteInfo",
           "StopInfo", "TensorSummary", "TokenProb", "Variable",
           "Ablation", "AblationEffect", "AblationResult", "AttentionResult", "Comparison", "InputAttributionResult",
           "LogitLensResult", "NodeTable", "NodeTableResult", "PairedNodeTable", "ResolvedTarget", "Target", "Trace",
           "PatchSweepResult", "SweepAxis", "SweepStream", "Graph", "ActivationRecords", "Explanation", "SaeInfo"]

from . import _repr, notebook  # noqa: E402

_repr.install([globals()[name] for name in __all__])   # results print compactly (arrays as dtype + shape)
notebook.install()                                     # and render as tables and heatmaps in Jupyter
