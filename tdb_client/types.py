"""Typed results of the client: dataclasses and numpy arrays, never protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tdb.v1 import common_pb2, debugger_pb2 as pb

from . import _wire

STATE_NAMES = {pb.IDLE: "idle", pb.RUNNING: "running", pb.PAUSED: "paused", pb.EXITED: "exited",
               pb.TERMINATED: "terminated", pb.FAILED: "failed", pb.RUN_STATE_UNSPECIFIED: "unknown"}


@dataclass(frozen=True)
class SiteInfo:
    name: str
    dims: tuple[str, ...]
    verified: bool
    kind: str
    layer: int | None


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

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @classmethod
    def from_proto(cls, m: common_pb2.ModelInfo) -> "ModelInfo":
        sites = tuple(SiteInfo(s.name, tuple(s.dims), s.verified, s.kind, None if s.layer < 0 else s.layer)
                      for s in m.sites)
        return cls(m.name, m.architecture, m.n_layers, m.n_heads, m.n_kv_heads, m.d_model, m.d_head, m.d_mlp,
                   m.vocab_size, m.dtype, m.device, sites, m.parallel_blocks, m.has_tokenizer, m.source,
                   m.max_positions)


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

    @classmethod
    def from_proto(cls, m: common_pb2.TensorSummary) -> "TensorSummary":
        return cls(_wire.DTYPE_NAMES.get(m.dtype, "?"), tuple(m.shape), m.min, m.max, m.mean, m.std, m.norm,
                   m.nan_count, m.inf_count, m.numel, tuple(m.dims))


@dataclass(frozen=True)
class Breakpoint:
    """A breakpoint to set: a site, a unit (blocks.1.attn.head.2) or a glob (blocks.*.mlp.out)."""

    site: str
    when: str = "after"          # "after" | "before"
    condition: str = ""          # e.g. "norm > 40", "any_nan"
    hit_condition: str = ""      # e.g. "3", ">=2", "%2"
    log_message: str = ""        # a log point: print this ({norm}, {max}, ...) and go on
    tokens: tuple[int, int] | None = None   # generation: only in steps first..last (inclusive)

    def to_proto(self) -> pb.Breakpoint:
        if self.when not in ("after", "before"):
            raise ValueError(f"when must be 'after' or 'before', not {self.when!r}")
        msg = pb.Breakpoint(site=self.site, when=pb.BEFORE if self.when == "before" else pb.AFTER,
                            condition=self.condition, hit_condition=self.hit_condition, log_message=self.log_message)
        if self.tokens is not None:
            msg.tokens.first, msg.tokens.last = self.tokens
        return msg


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

    def to_proto(self) -> pb.GenerateOptions:
        return pb.GenerateOptions(max_new_tokens=self.max_new_tokens, sample=self.sample, temperature=self.temperature,
                                  top_k=self.top_k, seed=self.seed, stop_at_tokens=self.stop_at_tokens,
                                  stop_token_ids=list(self.stop_token_ids))


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

    @classmethod
    def from_proto(cls, m: pb.StopInfo) -> "StopInfo":
        return cls(m.site, "before" if m.when == pb.BEFORE else "after", m.reason, tuple(m.hit_breakpoint_ids),
                   m.description, m.stop_id, m.exception,
                   TensorSummary.from_proto(m.value) if m.HasField("value") else None, m.token)


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

    @classmethod
    def from_proto(cls, m: pb.RunResult) -> "RunResult":
        top = tuple(tuple(TokenProb(t.token_id, t.text, t.logit, t.prob) for t in tt.tokens) for tt in m.top)
        logits = _wire.from_wire(m.last_logits) if m.HasField("last_logits") else None
        return cls(m.run_id, STATE_NAMES.get(m.state, "unknown"), top, logits, m.exception,
                   tuple(tuple(t.ids) for t in m.input_ids), tuple(m.lengths),
                   tuple(tuple(t.ids) for t in m.generated), tuple(m.generated_text))


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

    @property
    def paused(self) -> bool:
        return self.state == "paused"

    @property
    def site(self) -> str | None:
        return self.stop.site if self.stop else None

    @classmethod
    def from_proto(cls, m: pb.RunStatus) -> "RunStatus":
        return cls(m.run_id, STATE_NAMES.get(m.state, "unknown"),
                   StopInfo.from_proto(m.stop) if m.HasField("stop") else None,
                   RunResult.from_proto(m.result) if m.HasField("result") else None,
                   tuple(PatchInfo(p.patch_id, p.site, p.op, p.scope, p.applied) for p in m.patches))


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

    @classmethod
    def from_proto(cls, m: pb.Event) -> "Event":
        kind = m.WhichOneof("body") or "unknown"
        ev: dict[str, Any] = {"seq": m.seq, "time": m.time, "run_id": m.run_id, "kind": kind}
        if kind == "stopped":
            ev["stop"] = StopInfo.from_proto(m.stopped)
        elif kind == "run_exited":
            ev["result"] = RunResult.from_proto(m.run_exited.result)
        elif kind == "output":
            ev["text"] = m.output.text
            ev["data"] = {"category": m.output.category, "site": m.output.site}
        elif kind == "progress":
            p = m.progress
            ev["text"] = p.message
            ev["data"] = {"id": p.id, "title": p.title, "fraction": p.fraction, "eta_s": p.eta_s}
        elif kind == "terminated":
            ev["text"] = m.terminated.reason
        elif kind == "invalidated":
            ev["text"] = m.invalidated.what
        elif kind == "token":
            ev["text"] = m.token.texts[0] if m.token.texts else ""
            ev["data"] = {"step": m.token.step, "token_ids": list(m.token.token_ids), "texts": list(m.token.texts)}
        elif kind == "run_started":
            ev["data"] = {"batch": m.run_started.batch, "seq_len": m.run_started.seq_len}
        return cls(**ev)


@dataclass(frozen=True)
class ReplayReport:
    ok: bool                       # every stop and every read matched the recording
    actions: int
    stops_checked: int
    reads_checked: int
    mismatches: tuple[str, ...]
    session_id: str                # the replay's session, left open at the recording's last state
