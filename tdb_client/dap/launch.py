"""The launch configuration: what to run (a prompt or token ids, one forward pass or a generation),
checked before anything starts, and where the tdb server comes from (`"server"`, the server `tdb dap`
was configured with, or one started in this process on `"model"`).

    "generate": 5                                     5 new tokens, greedy
    "generate": {"maxNewTokens": 5, "sample": true, "temperature": 0.8, "topK": 20, "seed": 7,
                 "stopAtTokens": true, "stopTokenIds": [0]}

The adapter checks the shape of these options; the server checks their values (and says what it takes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from .. import Breakpoint, Generate, ModelInfo
from ..client import TdbClient
from ..errors import TdbError
from . import backend
from .breakpoints import launch_breakpoints
from .options import AdapterOptions
from .protocol import DapError, tdb_message

# "generate" object keys -> (Generate field, accepted JSON types)
_GENERATE_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "maxNewTokens": ("max_new_tokens", (int,)), "sample": ("sample", (bool,)),
    "temperature": ("temperature", (int, float)), "topK": ("top_k", (int,)), "seed": ("seed", (int,)),
    "stopAtTokens": ("stop_at_tokens", (bool,)), "stopTokenIds": ("stop_token_ids", (list,)),
}


def _check_prompt(prompt: Any) -> None:
    ok = isinstance(prompt, str) and prompt or isinstance(prompt, list) and prompt and \
        all(isinstance(p, str) and p for p in prompt)
    if not ok:
        raise DapError("'prompt' must be a non-empty string (or a list of them, for a batch)")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_rows(tokens: Any) -> list[list[int]]:
    rows = tokens if tokens and all(isinstance(t, list) for t in tokens) else [tokens]
    if not rows or not all(isinstance(r, list) and r and all(_is_int(i) for i in r) for r in rows):
        raise DapError("'tokens' must be a non-empty list of token ids (or a list of such lists, for a batch)")
    return rows


def parse_generate(raw: Any) -> Generate | None:
    """The "generate" attribute: a number of new tokens, or an object of generation options."""
    if raw is None:
        return None
    if _is_int(raw):
        return Generate(raw)
    if not isinstance(raw, dict):
        raise DapError("'generate' must be a number of new tokens or an object "
                       f"{{{', '.join(_GENERATE_KEYS)}}}")
    unknown = sorted(set(raw) - set(_GENERATE_KEYS))
    if unknown:
        raise DapError(f"'generate' has no option {unknown[0]!r}; it takes {', '.join(_GENERATE_KEYS)}")
    if "maxNewTokens" not in raw:
        raise DapError("'generate' needs maxNewTokens, the number of new tokens")
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        name, types = _GENERATE_KEYS[key]
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if key == "stopTokenIds":
            ok = ok and all(_is_int(i) for i in value)
        if not ok:
            kind = {"stopTokenIds": "a list of token ids", "sample": "true or false",
                    "stopAtTokens": "true or false", "temperature": "a number"}.get(key, "an integer")
            raise DapError(f"'generate.{key}' must be {kind}, not {value!r}")
        fields[name] = tuple(value) if key == "stopTokenIds" else value
    return Generate(**fields)


@dataclass
class LaunchConfig:
    """The launch arguments that say what runs: exactly one of prompt / tokens, breakpoints, generation."""

    prompt: Any                                # a string, or a list of them (a batch); None with tokens
    tokens: list[list[int]] | None
    breakpoints: list[Breakpoint]
    generate: Generate | None = None

    @classmethod
    def parse(cls, args: dict[str, Any]) -> "LaunchConfig":
        prompt, tokens = args.get("prompt"), args.get("tokens")
        if (prompt is None) == (tokens is None):
            raise DapError("give exactly one of 'prompt' (text) or 'tokens' (token ids) in the launch configuration")
        if prompt is not None:
            _check_prompt(prompt)
        rows = _token_rows(tokens) if tokens is not None else None
        return cls(prompt, rows, launch_breakpoints(args.get("breakpoints")), parse_generate(args.get("generate")))

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


def server_address(args: dict[str, Any], options: AdapterOptions) -> str:
    """The server this launch uses: its own "server", else the one tdb dap was configured with ("" = start one)."""
    server = args.get("server")
    if server is not None and (not isinstance(server, str) or not server.strip()):
        raise DapError("'server' must be \"host:port\" of a running `tdb serve`")
    return (server or options.server or "").strip()


def connect_server(address: str, args: dict[str, Any], options: AdapterOptions) -> TdbClient:
    """A client of a running server, with the token meant for that address (and no other)."""
    try:
        return backend.connect(address, options.token_for(address, args.get("token")))
    except TdbError as e:
        hint = ""
        if e.code == grpc.StatusCode.UNAUTHENTICATED:
            hint = (" (tdb dap sends a token only to the server it was configured for, `tdb dap --server "
                    "HOST:PORT --token TOKEN` or $TDB_SERVER with $TDB_TOKEN, or the launch's own \"token\")")
        raise DapError(f"cannot use the tdb server at {address}: {tdb_message(e)}{hint}") from None


def start_embedded(path: str, args: dict[str, Any], options: AdapterOptions) -> TdbClient:
    """Load the model folder `path` in this process (slow the first time) and connect to its server."""
    try:
        server = backend.embedded_server(path, str(args.get("device", "auto")), str(args.get("dtype", "auto")),
                                         options.data_dirs)
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's launch error
        raise DapError(f"cannot start a tdb server on {args.get('model') or 'the bundled model'}: "
                       f"{getattr(e, 'message', None) or e}") from None
    return backend.connect(server.address)
