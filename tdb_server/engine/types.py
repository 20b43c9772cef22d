"""The engine's own request, reply and state types: plain data, no protobuf and no behaviour.

Everything below the protobuf edge (runs, stop decisions, inspection, session control) speaks these;
`tdb_server/serde.py` is the one module that converts them to and from the protocol's messages. The
event types of the Events stream live beside the event log, in `events.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from ..model.interventions import Selector


class RunState(enum.Enum):
    """Where a session's run is: RUNNING -> PAUSED -> RUNNING ... -> EXITED | TERMINATED | FAILED."""

    IDLE = "idle"                # no run has been launched in this session
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"            # finished normally; the result is available
    TERMINATED = "terminated"    # stopped by Terminate or by the server
    FAILED = "failed"            # an exception inside the model ended the run


ACTIVE = (RunState.RUNNING, RunState.PAUSED)
DONE = (RunState.EXITED, RunState.TERMINATED, RunState.FAILED)


class When(enum.Enum):
    """A breakpoint (or stop) after a site's value exists, or just before the site runs."""

    AFTER = "after"
    BEFORE = "before"


@dataclass(frozen=True)
class GenOptions:
    """Generation settings of a run (max_new_tokens > 0)."""

    max_new_tokens: int
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_at_tokens: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class LaunchRequest:
    """What to run: a batch of prompts or of token id lists, what to keep, and how to start."""

    prompts: list[str]
    token_ids: list[list[int]]
    prepend_bos: bool = False
    capture: list[str] = field(default_factory=list)   # [] = every site; ["none"] = nothing
    stop_on_entry: bool = False
    gen: GenOptions | None = None


@dataclass(frozen=True)
class BreakpointRequest:
    """A breakpoint as asked: a site, a unit or a glob, and when, under which conditions, it stops."""

    site: str
    when: When = When.AFTER
    condition: str = ""
    hit_condition: str = ""
    log_message: str = ""
    tokens: tuple[int, int] | None = None   # generation steps first..last (None = every step)


@dataclass
class PatchRequest:
    """A patch as asked: a site or unit, an op of model.interventions.OPS, where, and with what."""

    name: str
    op: str
    selector: Selector
    value: torch.Tensor | None = None
    scalar: float = 0.0
    source_run_id: str = ""
    mean_over: str = ""
    tokens: tuple[int, ...] = ()
    run_id: str = ""             # the run it is for ("" = the live run, else the session)


@dataclass(frozen=True)
class TensorSummary:
    """Statistics of a tensor (NaN and Inf left out of min/max/mean/std/norm and counted apart)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    numel: int
    dims: tuple[str, ...] = ()
    min: float = 0.0
    max: float = 0.0
    mean: float = 0.0
    std: float = 0.0
    norm: float = 0.0
    nan_count: int = 0
    inf_count: int = 0


@dataclass(frozen=True)
class StopInfo:
    """Where and why a run stopped, as reported (a snapshot: the Stopped event and the run's status)."""

    site: str                       # "" at a token boundary or on entry before the first forward
    when: When
    reason: str                     # "breakpoint", "step", "pause", "entry", "exception", "token"
    hit_breakpoint_ids: tuple[int, ...]
    description: str
    stop_id: int
    exception: str = ""
    value: TensorSummary | None = None
    token: int = 0                  # generation step of the forward pass this stop is in


@dataclass(frozen=True)
class TokenProb:
    token_id: int
    text: str
    logit: float
    prob: float


@dataclass(frozen=True)
class TopTokens:
    batch_index: int
    position: int
    tokens: tuple[TokenProb, ...]


@dataclass
class RunResult:
    """A finished (or failing) run: its inputs, top next tokens, generated tokens and logits when asked."""

    run_id: str
    state: RunState
    exception: str = ""
    lengths: list[int] = field(default_factory=list)
    input_ids: list[list[int]] = field(default_factory=list)
    generated: list[list[int]] = field(default_factory=list)
    generated_text: list[str] = field(default_factory=list)
    top: list[TopTokens] = field(default_factory=list)
    last_logits: torch.Tensor | None = None     # [batch, vocab] at the last real position


@dataclass(frozen=True)
class PatchInfo:
    patch_id: int
    site: str
    op: str
    scope: str         # "run" or "session"
    applied: bool


@dataclass
class RunStatus:
    session_id: str
    run_id: str = ""
    state: RunState = RunState.IDLE
    stop: StopInfo | None = None
    result: RunResult | None = None
    patches: list[PatchInfo] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # about the run's input (words the model does not know)


@dataclass(frozen=True)
class StackFrame:
    id: int            # valid for this stop only
    name: str
    site: str          # the site path prefix of the frame ("" for the model frame)


@dataclass(frozen=True)
class Scope:
    name: str          # "Value", "Captured", "Patches"
    variables_reference: int
    named_variables: int


@dataclass
class Variable:
    name: str
    value: str = ""
    type: str = ""
    summary: TensorSummary | None = None
    variables_reference: int = 0
    evaluate_name: str = ""
    indexed_variables: int = 0
