"""DAP wire framing: `Content-Length: N\\r\\n\\r\\n` + N bytes of UTF-8 JSON, both directions.

`read_message` reads one framed message from a binary stream; `Channel` writes messages with
sequence numbers (one lock, so the reader, the request worker and the event pump can all send).
`DapError` is a failed request, and `tdb_message` the text a failed tdb call shows the IDE.
"""

from __future__ import annotations

import json
import threading
from typing import Any, BinaryIO

from ..errors import TdbError

MAX_MESSAGE_BYTES = 64 << 20


class FramingError(Exception):
    """The peer sent bytes that are not a framed DAP message."""


class DapError(Exception):
    """A request failed: the message goes back in the response (success: false)."""


def tdb_message(e: TdbError) -> str:
    """The server's message for a failed tdb call, shown to the IDE verbatim."""
    return e.message or f"{e.code.name} ({e.reason})"


def read_message(stream: BinaryIO) -> dict[str, Any] | None:
    """One message, or None at end of stream. Raises FramingError on a malformed header or body."""
    length = None
    while True:
        line = stream.readline(4096)
        if not line:
            return None
        line = line.strip()
        if not line:
            if length is None:
                continue          # tolerate stray blank lines between messages
            break
        name, _, value = line.decode("ascii", "replace").partition(":")
        if name.strip().lower() == "content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise FramingError(f"bad Content-Length header {line!r}") from None
            if not 0 <= length <= MAX_MESSAGE_BYTES:
                raise FramingError(f"Content-Length {length} out of range")
    body = b""
    while len(body) < length:
        chunk = stream.read(length - len(body))
        if not chunk:
            return None
        body += chunk
    try:
        msg = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FramingError(f"message body is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise FramingError("message body is not a JSON object")
    return msg


def encode(msg: dict[str, Any]) -> bytes:
    body = json.dumps(msg, separators=(",", ":"), allow_nan=False, default=str).encode("utf-8")
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


class Channel:
    """The sending half of a DAP connection: numbers messages and writes them whole."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._lock = threading.Lock()
        self._seq = 0
        self.closed = False

    def send(self, msg: dict[str, Any]) -> None:
        with self._lock:
            if self.closed:
                return
            self._seq += 1
            msg = {"seq": self._seq, **msg}
            try:
                self._stream.write(encode(msg))
                self._stream.flush()
            except (OSError, ValueError):
                self.closed = True     # the client went away; the reader sees EOF and cleans up

    def event(self, event: str, body: dict[str, Any] | None = None) -> None:
        self.send({"type": "event", "event": event, **({"body": body} if body is not None else {})})

    def response(self, request: dict[str, Any], body: dict[str, Any] | None = None) -> None:
        self.send({"type": "response", "request_seq": request.get("seq", 0), "success": True,
                   "command": request.get("command", ""), **({"body": body} if body is not None else {})})

    def error(self, request: dict[str, Any], message: str, show_user: bool = True) -> None:
        self.send({"type": "response", "request_seq": request.get("seq", 0), "success": False,
                   "command": request.get("command", ""), "message": message,
                   "body": {"error": {"id": 1, "format": message, "showUser": show_user}}})
