"""One place that owns the device: model work from every session takes fair (FIFO) turns.

A debug run holds a turn while its forward pass computes and gives it up while it is paused, so a
paused session never blocks the others; analyses take a turn for their forward/backward passes.
Turns are granted in arrival order (a ticket queue), so no session can starve another.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import weakref
from typing import Any, Iterator


class DeviceScheduler:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self._holder: object | None = None
        self.turns = 0

    def acquire(self, timeout: float | None = None) -> object:
        """Wait for a turn; returns the ticket to pass to release()."""
        ticket = object()
        with self._cv:
            self._queue.append(ticket)
            ok = self._cv.wait_for(lambda: self._holder is None and self._queue[0] is ticket, timeout=timeout)
            if not ok:
                self._queue.remove(ticket)
                self._cv.notify_all()
                raise TimeoutError("timed out waiting for the device")
            self._holder = ticket
            self.turns += 1
            return ticket

    def release(self, ticket: object) -> None:
        with self._cv:
            if self._holder is not ticket:
                raise RuntimeError("release() by a ticket that does not hold the device")
            self._holder = None
            self._queue.popleft()
            self._cv.notify_all()

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        ticket = self.acquire()
        try:
            yield
        finally:
            self.release(ticket)

    @property
    def waiting(self) -> int:
        with self._cv:
            return len(self._queue) - (1 if self._holder is not None else 0)


_SCHEDULERS: "weakref.WeakKeyDictionary[Any, DeviceScheduler]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def scheduler_for(adapter: Any) -> DeviceScheduler:
    """The scheduler of the device that holds `adapter`'s model (one per loaded model)."""
    with _LOCK:
        sched = _SCHEDULERS.get(adapter)
        if sched is None:
            sched = _SCHEDULERS[adapter] = DeviceScheduler()
        return sched
