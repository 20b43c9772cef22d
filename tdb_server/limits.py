"""Server limits: configurable, with sane defaults, reported to clients in Capabilities.limits."""

from __future__ import annotations

from dataclasses import asdict, dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 64
    max_prompt_tokens: int = 8192          # per sequence (the model's own context length also applies)
    max_batch: int = 256
    max_read_bytes: int = 4 * GiB          # one ReadTensor / Evaluate result
    max_expr_bytes: int = 1 * GiB          # one operation of an expression (Evaluate, reads, conditions, log points)
    max_sessions_per_client: int = 32      # sessions one client may hold at once (servicer.client_of says who)
    max_idle_timeout_s: float = 3600.0     # the longest idle timeout a client may ask for its session
    max_analysis_s: float = 600.0          # one analysis (sweep, circuit, activation records) runs at most this long
    records_cache_bytes: int = 1 * GiB     # the activation-records disk cache; least recently used files go first
    session_capture_bytes: int = 4 * GiB   # activations a session may keep (current + retained runs)
    total_capture_bytes: int = 16 * GiB    # across all sessions
    idle_timeout_s: float = 600.0          # sessions with no request (and no open event stream)
    max_patch_bytes: int = 256 << 20       # a tensor sent with Patch
    max_request_bytes: int = 64 << 20      # one request but Patch and ReplayRecording, refused before it is parsed
    max_streams: int = 1024                # open Events streams + PollEvents long-polls (each a waiter on the event loop)

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}
