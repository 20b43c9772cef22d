"""The client's own types: what a request asks for (Breakpoint, Generate; Target, Trace, Ablation for
the analyses) and what the Debugger service's calls return. Dataclasses and numpy arrays, never
protobuf messages: `serde` converts both ways at the edge (the analyses' results are in `results`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class SiteInfo:
    name: str
    dims: tuple[str, ...]
    verified: bool
    kind: str
    layer: int | None


@dataclass(frozen=True)
class Demo:
    """A prompt that shows the model's behaviour (from its ground truth) and the token it should predict."""
    prompt: str
    answer: str
    distractor: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    vocab_size: int
    dtype: str
    device: str
    sites: tuple[SiteInfo, ...]
    parallel_blocks: bool
    has_tokenizer: bool
    source: str
    max_positions: int
    unk_token_id: int | None = None   # the id of text the tokenizer cannot represent (None: it has none)
    demo: Demo | None = None          # the model's demo prompt, when its ground truth has one

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


@dataclass(frozen=True)
class ServerInfo:
    protocol_version: str
    server_version: str
    capabilities: dict[str, bool]
    analyses: tuple[str, ...]
    expression_functions: tuple[str, ...]
    patch_ops: tuple[str, ...]
    model: ModelInfo
    limits: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSummary:
    dtype: str
    shape: tuple[int, ...]
    min: float
    max: float
    mean: float
    std: float
    norm: float
    nan_count: int
    inf_count: int
    numel: int
    dims: tuple[str, ...] = ()


@dataclass(frozen=True)
class Breakpoint:
    """A breakpoint to set: a site, a unit (blocks.1.attn.head.2) or a glob (blocks.*.mlp.out)."""

    site: str
    when: str = "after"          # "after" | "before"
    condition: str = ""          # e.g. "norm > 40", "any_nan"
    hit_condition: str = ""      # e.g. "3", ">=2", "%2"
    log_message: str = ""        # a log point: print this ({norm}, {max}, ...) and go on
    tokens: tuple[int, int] | None = None   # generation: only in steps first..last (inclusive)


@dataclass(frozen=True)
class Generate:
    """Generation options for `Session.launch(..., generate=Generate(5))`."""

    max_new_tokens: int
    sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_at_tokens: bool = False
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class BreakpointStatus:
    id: int
    verified: bool
    message: str
    sites: tuple[str, ...]


@dataclass(frozen=True)
class StopInfo:
    site: str
    when: str
    reason: str               # "breakpoint", "step", "pause", "entry", "exception"
    hit_breakpoint_ids: tuple[int, ...]
    description: str
    stop_id: int
    exception: str
    value: TensorSummary | None
    token: int = 0            # generation step of the forward pass this stop is in


@dataclass(frozen=True)
class TokenProb:
    token_id: int
    text: str
    logit: float
    prob: float


@dataclass(frozen=True)
class RunResult:
    run_id: str
    state: str
    top: tuple[tuple[TokenProb, ...], ...]     # per batch item, at its last real position
    last_logits: np.ndarray | None           # [batch, vocab] when asked for
    exception: str
    input_ids: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]
    generated: tuple[tuple[int, ...], ...] = ()   # generation: new tokens per batch item
    generated_text: tuple[str, ...] = ()


@dataclass(frozen=True)
class PatchInfo:
    patch_id: int
    site: str
    op: str
    scope: str
    applied: bool


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    state: str                # "idle", "running", "paused", "exited", "terminated", "failed"
    stop: StopInfo | None
    result: RunResult | None
    patches: tuple[PatchInfo, ...]
    warnings: tuple[str, ...] = ()   # about the input: prompt words the model does not know (its unknown token)

    @property
    def paused(self) -> bool:
        return self.state == "paused"

    @property
    def site(self) -> str | None:
        return self.stop.site if self.stop else None


@dataclass(frozen=True)
class Frame:
    id: int
    name: str
    site: str


@dataclass(frozen=True)
class Scope:
    name: str
    variables_reference: int
    named_variables: int


@dataclass(frozen=True)
class Variable:
    name: str
    value: str
    type: str
    summary: TensorSummary | None
    variables_reference: int
    evaluate_name: str
    indexed_variables: int


@dataclass(frozen=True)
class EvalResult:
    text: str
    value: np.ndarray | None          # the tensor when small enough ([2, k] values/indices for topk)
    summary: TensorSummary | None
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class PatchResult:
    patch_id: int
    applied_now: bool
    scope: str
    message: str


@dataclass(frozen=True)
class Event:
    seq: int
    time: float
    run_id: str
    kind: str                          # "stopped", "continued", "run_started", "run_exited", "output", ...
    stop: StopInfo | None = None
    result: RunResult | None = None
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplayReport:
    ok: bool                       # every stop and every read matched the recording
    actions: int
    stops_checked: int
    reads_checked: int
    mismatches: tuple[str, ...]
    session_id: str                # the replay's session, left open at the recording's last state
    session_secret: str = ""       # its secret, to use it: Session(client, session_id, 0, session_secret)


# -- analysis requests ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """What to explain: mean logit of `tokens` - mean logit of `distractors` (strings or token ids)
    at `position` (default last); kind "logit", "logprob" or "direction" (final residual . direction)."""

    tokens: Any = ()
    distractors: Any = ()
    kind: str = ""
    position: int | None = None
    direction: Any = None


@dataclass(frozen=True)
class Trace:
    """Upstream tracing: a neuron (its pre-activation) or a head (part: output | q | k | qk | v)."""

    node: str
    part: str = "output"
    position: int | None = None
    key_position: int | None = None


@dataclass(frozen=True)
class Ablation:
    """Ablate a node (head, neuron, blocks.L.attn, blocks.L.mlp, blocks.L; fnmatch patterns allowed)."""

    node: str
    method: str = "zero"
    positions: Sequence[int] = ()
