"""A session's event log: what happened in its runs, with sequence numbers, a bounded replay ring,
and waiting for new events.

Events are plain frozen dataclasses (an `Event` with one body: a `StopInfo` for a stop, or one of the
types below); the servicer converts them to the protocol's Event on the way out (serde.py). The ring keeps
the last `capacity`, so a client that reconnects with `after_seq` loses nothing that is still
retained, and learns when something was dropped. Bodies hold numbers and text only (a stop's value
as a summary, never a tensor), so a retained event keeps no activation alive.

Waiting comes in two forms: `wait` blocks a thread (the engine, tests), `wait_async` awaits on an asyncio
loop and holds no thread, so the server can keep a thousand event streams open on one loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Union

from .types import RunResult, StopInfo


@dataclass(frozen=True)
class RunStarted:
    batch: int
    seq_len: int


@dataclass(frozen=True)
class Continued:
    pass


@dataclass(frozen=True)
class RunExited:
    result: RunResult


@dataclass(frozen=True)
class Output:
    category: str      # "console" (log points), "stderr" (condition errors), "warning" (NaN/Inf, unknown words)
    text: str
    site: str = ""


@dataclass(frozen=True)
class Terminated:
    reason: str


@dataclass(frozen=True)
class Invalidated:
    what: str


@dataclass(frozen=True)
class TokenGenerated:
    step: int                        # generation step (0-based)
    token_ids: tuple[int, ...]       # one per batch item
    texts: tuple[str, ...]           # each token's text on its own
    appended: tuple[str, ...] = ()   # what each adds to the text so far (tokens.appended_text)


EventBody = Union[StopInfo, Continued, RunStarted, RunExited, Output, Terminated, Invalidated, TokenGenerated]


@dataclass(frozen=True)
class Event:
    seq: int
    time: float        # unix seconds
    run_id: str
    body: EventBody


def _field_names(kind: type) -> tuple[str, ...]:
    """The field names of an event body's class (dataclasses.fields walks the class at every call)."""
    names = _FIELDS.get(kind)
    if names is None:
        names = _FIELDS[kind] = tuple(f.name for f in dataclasses.fields(kind))
    return names


_FIELDS: dict[type, tuple[str, ...]] = {}


def _approx_bytes(body: EventBody) -> int:
    """Roughly what an event holds: its strings and lists (log lines and generated text dominate)."""
    total = 64
    for name in _field_names(type(body)):
        v = getattr(body, name)
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple)):
            total += sum(len(x) if isinstance(x, str) else 8 for x in v)
        elif dataclasses.is_dataclass(v):
            total += 256
    return total


class EventLog:
    """A session's events: sequence numbers and a bounded replay ring (at most `capacity` events and about
    `capacity_bytes` of them: a log point that fires at every token must not fill the host's memory)."""

    def __init__(self, capacity: int = 4096, capacity_bytes: int = 8 << 20):
        self._ring: collections.deque[Event] = collections.deque(maxlen=capacity)
        self._sizes: collections.deque[int] = collections.deque(maxlen=capacity)
        self._bytes, self.capacity_bytes = 0, capacity_bytes
        self._seq = 0
        self._cv = threading.Condition()
        self._async_waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.closed = False

    @property
    def last_seq(self) -> int:
        return self._seq

    def emit(self, run_id: str, body: EventBody) -> Event:
        with self._cv:
            self._seq += 1
            ev = Event(self._seq, time.time(), run_id, body)
            if len(self._ring) == self._ring.maxlen:
                self._bytes -= self._sizes[0]
            size = _approx_bytes(body)
            self._ring.append(ev)
            self._sizes.append(size)
            self._bytes += size
            while self._bytes > self.capacity_bytes and len(self._ring) > 1:   # oldest first; keep the newest
                self._ring.popleft()
                self._bytes -= self._sizes.popleft()
            self._wake()
            return ev

    def _wake(self) -> None:
        """Wake every waiter (called with the lock held): threads through the condition, coroutines through
        their loop."""
        self._cv.notify_all()
        for loop, woke in self._async_waiters:
            try:
                loop.call_soon_threadsafe(woke.set)
            except RuntimeError:     # that loop is closed: nobody waits there any more
                pass

    def since(self, after_seq: int, max_events: int = 0) -> tuple[list[Event], bool]:
        """Events with seq > after_seq still retained, and whether some were dropped from the ring."""
        with self._cv:
            events = [ev for ev in self._ring if ev.seq > after_seq]
            truncated = bool(self._ring) and self._ring[0].seq > after_seq + 1
            if not self._ring and self._seq > after_seq:
                truncated = True
        if max_events > 0:
            events = events[:max_events]
        return events, truncated

    def wait(self, after_seq: int, timeout: float) -> bool:
        """Block until an event with seq > after_seq exists, the log closes, or timeout passes."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._seq <= after_seq and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            return self._seq > after_seq

    async def wait_async(self, after_seq: int, timeout: float | None = None) -> bool:
        """Like `wait`, on the running asyncio loop and without holding a thread; cancelling the awaiting
        task (a client that leaves) ends the wait."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._cv:
            if self._seq > after_seq or self.closed:
                return self._seq > after_seq
            self._async_waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter[1].wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._cv:
                self._async_waiters.discard(waiter)
        return self._seq > after_seq

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._wake()
