"""The launch configuration: what to run (a prompt or token ids), checked before anything starts, and
where the tdb server comes from (`"server"`, or one started in this process, its loading reported as
progress).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import Breakpoint, ModelInfo
from ..client import TdbClient
from . import backend
from .breakpoints import launch_breakpoints
from .protocol import Channel, DapError


def _check_prompt(prompt: Any) -> None:
    ok = isinstance(prompt, str) and prompt or isinstance(prompt, list) and prompt and \
        all(isinstance(p, str) and p for p in prompt)
    if not ok:
        raise DapError("'prompt' must be a non-empty string (or a list of them, for a batch)")


def _token_rows(tokens: Any) -> list[list[int]]:
    rows = tokens if tokens and all(isinstance(t, list) for t in tokens) else [tokens]
    if not rows or not all(isinstance(r, list) and r and all(isinstance(i, int) and not isinstance(i, bool) for i in r)
                           for r in rows):
        raise DapError("'tokens' must be a non-empty list of token ids (or a list of such lists, for a batch)")
    return rows


@dataclass
class LaunchConfig:
    """The launch arguments that say what runs: exactly one of prompt / tokens, and breakpoints."""

    prompt: Any                                # a string, or a list of them (a batch); None with tokens
    tokens: list[list[int]] | None
    breakpoints: list[Breakpoint]

    @classmethod
    def parse(cls, args: dict[str, Any]) -> "LaunchConfig":
        prompt, tokens = args.get("prompt"), args.get("tokens")
        if args.get("generate"):
            raise DapError("'generate' is not supported yet: the tdb server runs one forward pass per launch "
                           "(there is no generation in its protocol); remove 'generate' from the launch configuration")
        if (prompt is None) == (tokens is None):
            raise DapError("give exactly one of 'prompt' (text) or 'tokens' (token ids) in the launch configuration")
        if prompt is not None:
            _check_prompt(prompt)
        rows = _token_rows(tokens) if tokens is not None else None
        return cls(prompt, rows, launch_breakpoints(args.get("breakpoints")))

    def check_model(self, info: ModelInfo) -> None:
        """Refuse what the model cannot take: text without a tokenizer, ids outside the vocabulary, too long."""
        if self.prompt is not None and not info.has_tokenizer:
            raise DapError(f"model {info.name} has no tokenizer: give 'tokens' instead of 'prompt'")
        for b, row in enumerate(self.tokens or []):
            bad = [i for i in row if not 0 <= i < info.vocab_size]
            if bad:
                raise DapError(f"token id {bad[0]} (sequence {b}) is outside the vocabulary [0, {info.vocab_size})")
            if info.max_positions and len(row) > info.max_positions:
                raise DapError(f"sequence {b} has {len(row)} tokens; {info.name} takes at most {info.max_positions}")


def connect(args: dict[str, Any], out: Channel, progress: bool) -> TdbClient:
    """A client of the configuration's server, or of one started here (loading shown as progress)."""
    if args.get("server"):
        return backend.connect(str(args["server"]))
    what = args.get("model") or "the bundled model"
    pid = "tdb-load-model"
    if progress:
        out.event("progressStart", {"progressId": pid, "title": f"tdb: loading {what}", "cancellable": False})
    try:
        server = backend.embedded_server(args.get("model"), str(args.get("device", "auto")),
                                         str(args.get("dtype", "auto")))
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's launch error
        raise DapError(f"cannot start a tdb server on {what}: {getattr(e, 'message', None) or e}") from None
    finally:
        if progress:
            out.event("progressEnd", {"progressId": pid})
    return backend.connect(server.address)
