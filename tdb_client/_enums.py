"""The client's spellings of the protocol's enums ("head_out", "zero", "paused"), derived from the proto
descriptors so that no table is typed twice: a value's spelling is its proto name without the enum's
prefix, in lowercase (SWEEP_HEAD_OUT -> "head_out"); `*_UNSPECIFIED` has no spelling of its own.

A leaf: the serde edge, the result types and `names` read these tables; it imports only the generated
descriptors. Spelling tables map spelling -> number (requests); `*_NAMES` map number -> spelling (results).
"""

from __future__ import annotations

from typing import Any

from tdb.v1 import analysis_pb2 as apb, debugger_pb2 as pb


def spellings(enum: Any, prefix: str = "") -> dict[str, int]:
    """A generated enum (EnumTypeWrapper) as {spelling: number}, its `*_UNSPECIFIED` value left out."""
    return {name.removeprefix(prefix).lower(): number for name, number in enum.items()
            if not name.endswith("_UNSPECIFIED")}


def numbers_to_names(table: dict[str, int]) -> dict[int, str]:
    return {number: name for name, number in table.items()}


# Analysis service
NODE_TYPE = spellings(apb.NodeType, "NODE_")                 # "head", "head_pair", "neuron", ... "sae_latent"
NODE_TYPES = numbers_to_names(NODE_TYPE)
METRIC = spellings(apb.Metric, "METRIC_")                    # "activation", "write_norm", ...
METRIC_NAMES = numbers_to_names(METRIC)
# The columns of a node table's metrics, in the enum's order (the proto: metrics[r] = (activation,
# write_norm, direct_effect, total_effect)).
METRICS: tuple[str, ...] = tuple(sorted(METRIC, key=METRIC.__getitem__))
TARGET_KIND = {"": apb.TARGET_KIND_UNSPECIFIED, **spellings(apb.TargetKind, "TARGET_")}   # "" = the server decides
TARGET_KIND_NAMES = numbers_to_names(TARGET_KIND)
HEAD_PART = spellings(apb.HeadPart, "HEAD_PART_")            # "output", "q", "k", "qk", "v"
ABLATION_METHOD = spellings(apb.AblationMethod, "ABLATION_")  # "zero", "mean", "resample"
INPUT_ATTRIBUTION = spellings(apb.InputAttributionMethod, "INPUT_ATTRIBUTION_")
SWEEP_KIND = spellings(apb.SweepKind, "SWEEP_")              # "resid_pre", ... "head_out", ... "neuron"
SWEEP_KIND_NAMES = numbers_to_names(SWEEP_KIND)
SWEEP_DIRECTION = spellings(apb.SweepDirection, "SWEEP_")    # "denoising", "noising"
SWEEP_DIRECTION_NAMES = numbers_to_names(SWEEP_DIRECTION)
SWEEP_METHOD = spellings(apb.SweepMethod, "SWEEP_")          # "exact", "attribution"
SWEEP_METHOD_NAMES = numbers_to_names(SWEEP_METHOD)
CIRCUIT_ABLATION = spellings(apb.CircuitAblation, "CIRCUIT_ABLATION_")   # "corrupted", "mean"
CIRCUIT_ABLATION_NAMES = numbers_to_names(CIRCUIT_ABLATION)

# Debugger service
RUN_STATE_NAMES = {pb.RUN_STATE_UNSPECIFIED: "unknown", **numbers_to_names(spellings(pb.RunState))}
PATCH_OP = {**spellings(pb.PatchOp), "copy": pb.COPY_FROM_RUN}   # "copy": a short spelling of copy_from_run
STEP_KIND = spellings(pb.StepKind, "STEP_")                  # "into", "over", "out", "token"
BREAK_WHEN = spellings(pb.BreakWhen)                         # "after", "before"
BREAK_WHEN_NAMES = numbers_to_names(BREAK_WHEN)
