"""A session's event log: sequence numbers, a bounded replay ring, and waiting for new events.

Events are protocol messages (tdb.v1.Event) built by the engine; the ring keeps the last `capacity`
so a client that reconnects with `after_seq` loses nothing that is still retained, and learns when
something was dropped. The ring holds serialized events: a retained message would keep alive every
protobuf arena it was ever fused with (the run results and statuses it was built from).
"""

from __future__ import annotations

import collections
import threading
import time

from tdb.v1 import debugger_pb2 as pb


class EventLog:
    def __init__(self, capacity: int = 4096):
        self._ring: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=capacity)
        self._seq = 0
        self._cv = threading.Condition()
        self.closed = False

    @property
    def last_seq(self) -> int:
        return self._seq

    def emit(self, run_id: str = "", **body: object) -> pb.Event:
        with self._cv:
            self._seq += 1
            ev = pb.Event(seq=self._seq, time=time.time(), run_id=run_id, **body)
            self._ring.append((self._seq, ev.SerializeToString()))
            self._cv.notify_all()
            return ev

    def since(self, after_seq: int, max_events: int = 0) -> tuple[list[pb.Event], bool]:
        """Events with seq > after_seq still retained, and whether some were dropped from the ring."""
        with self._cv:
            raw = [data for seq, data in self._ring if seq > after_seq]
            truncated = bool(self._ring) and self._ring[0][0] > after_seq + 1
            if not self._ring and self._seq > after_seq:
                truncated = True
        if max_events > 0:
            raw = raw[:max_events]
        return [pb.Event.FromString(data) for data in raw], truncated

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

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()
