"""The messaging half of the adapter (as debugpy's `common/messaging.py`): reading requests, answering
them, and cancellation. It knows nothing of tdb beyond how a failed tdb call reads.

Requests are read on one thread and handled in order on another, so `cancel` can reach a request
still queued (or a read-only one in flight, whose result is then dropped). A request is handled by
the method of the handlers object its command names, `<command>_request(arguments)`, which returns
the response body; whatever it raises becomes a failed response with a message. Actions a handler
defers with `after_response` run once its response is sent, still under the ordering lock that the
event pump takes too, so every response to a request that resumes the run goes out before the events
that follow from it.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, BinaryIO, Callable

from ..errors import TdbError
from .patching import PatchSyntaxError
from .protocol import Channel, DapError, FramingError, read_message, tdb_message

log = logging.getLogger("tdb.dap")

Body = dict[str, Any] | None


class Transport:
    """One DAP connection's requests: `serve(reader, handlers)` returns when the client leaves or `done` is set."""

    def __init__(self, out: Channel, read_only: frozenset[str] = frozenset(),
                 guard: Callable[[str], None] | None = None):
        self.out = out
        self.read_only = read_only          # commands that may be cancelled while in flight
        self.guard = guard                  # guard(command) raises to refuse a request before its handler runs
        self.order = threading.RLock()      # held while handling a request; the event pump takes it too
        self.done = threading.Event()
        self.reader: threading.Thread | None = None
        self._after: list[Callable[[], None]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._pending: dict[int, str] = {}          # request seq -> "queued" | "running" | "cancelled"
        self._pending_lock = threading.Lock()
        self._inflight_read_only = False

    def after_response(self, action: Callable[[], None]) -> None:
        """Run `action` once the response to the request being handled is sent."""
        self._after.append(action)

    def serve(self, reader: BinaryIO, handlers: object) -> None:
        self.reader = threading.Thread(target=self._read_loop, args=(reader,), name="tdb-dap-reader", daemon=True)
        self.reader.start()
        while not self.done.is_set():
            request = self._queue.get()
            if request is None:
                break
            self._handle(request, handlers)

    # -- the reader thread ---------------------------------------------------------------------------

    def _read_loop(self, reader: BinaryIO) -> None:
        while True:
            try:
                msg = read_message(reader)
            except FramingError as e:
                log.warning("dropping a malformed message: %s", e)
                self.out.event("output", {"category": "stderr", "output": f"tdb dap: malformed message: {e}\n"})
                continue
            except (OSError, ValueError):
                msg = None
            if msg is None:
                self._queue.put(None)
                return
            if msg.get("type") != "request":
                continue                                # responses to reverse requests: we send none
            if msg.get("command") == "cancel":
                self._cancel(msg)
                continue
            with self._pending_lock:
                if isinstance(msg.get("seq"), int):
                    self._pending[msg["seq"]] = "queued"
            self._queue.put(msg)

    def _cancel(self, request: dict[str, Any]) -> None:
        """Cancel a queued request, or a read-only one in flight (its result is dropped)."""
        args = request.get("arguments") or {}
        if "progressId" in args:
            self.out.error(request, "tdb progress cannot be cancelled from the IDE")
            return
        rid = args.get("requestId")
        with self._pending_lock:
            state = self._pending.get(rid)
            if state == "queued" or (state == "running" and self._inflight_read_only):
                self._pending[rid] = "cancelled"
        self.out.response(request)

    # -- the request worker --------------------------------------------------------------------------

    def _start(self, seq: Any, command: Any) -> bool:
        """Mark the request running; False if it was cancelled while queued."""
        with self._pending_lock:
            if self._pending.get(seq) == "cancelled":
                self._pending.pop(seq, None)
                return False
            self._pending[seq] = "running"
            self._inflight_read_only = command in self.read_only
        return True

    def _was_cancelled(self, seq: Any) -> bool:
        with self._pending_lock:
            return self._pending.get(seq) == "cancelled"

    def _finish(self, seq: Any) -> None:
        with self._pending_lock:
            self._pending.pop(seq, None)
            self._inflight_read_only = False
        after, self._after = self._after, []
        for action in after:
            action()

    def _handle(self, request: dict[str, Any], handlers: object) -> None:
        seq, command = request.get("seq"), request.get("command")
        if not self._start(seq, command):
            self.out.error(request, "cancelled", show_user=False)
            return
        with self.order:
            try:
                if self.guard is not None and isinstance(command, str):
                    self.guard(command)
                body = _dispatch(handlers, command, request.get("arguments") or {})
                if self._was_cancelled(seq):
                    self.out.error(request, "cancelled", show_user=False)
                else:
                    self.out.response(request, body if body is not None else {})
            except Exception as e:  # noqa: BLE001 - the adapter must survive a bug in one handler
                self.out.error(request, _failure(command, e))
            finally:
                self._finish(seq)


def _dispatch(handlers: object, command: Any, args: Any) -> Body:
    """Call `handlers.<command>_request(args)`: the handler is found by the command's name."""
    fn = getattr(handlers, f"{command}_request", None) if isinstance(command, str) and command.isidentifier() else None
    if fn is None:
        raise DapError(f"unknown request {command!r}")
    if not isinstance(args, dict):
        raise DapError("arguments must be an object")
    return fn(args)


def _failure(command: Any, e: Exception) -> str:
    """The message of a failed response."""
    if isinstance(e, (DapError, PatchSyntaxError)):
        return str(e)
    if isinstance(e, TdbError):
        return tdb_message(e)
    if isinstance(e, (KeyError, TypeError, ValueError)):
        return f"bad arguments for {command!r}: {type(e).__name__}: {e}"
    log.error("internal error handling %s", command, exc_info=e)
    return f"internal error in the tdb adapter: {type(e).__name__}: {e}"
