"""All sessions of one server over one model: creating, finding and closing them, closing abandoned
ones (idle timeout), and handing freed heap memory back to the operating system now and then.

A session belongs to its creator: `create` gives it a random secret that only the creator receives, and
`get` finds a session only with its id and that secret (compared in constant time). Without the secret
the answer is the one for a session that does not exist, so that a caller cannot learn that it does."""

from __future__ import annotations

import ctypes
import hmac
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import InvalidArgument, NotFound, ResourceExhausted
from ..limits import Limits
from .session import Session

_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it per thread arena otherwise), so a long-lived
    server's resident size follows what it really holds."""
    libc = _libc()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class SessionManager:
    """All sessions of one server over one model; closes abandoned ones."""

    def __init__(self, adapter: Any, limits: Limits | None = None, reap_interval_s: float = 0.5):
        self.adapter = adapter
        self.limits = limits or Limits()
        self.default_idle_timeout_s = self.limits.idle_timeout_s
        self.max_sessions = self.limits.max_sessions
        # one worker per possible session: a paused run holds its thread while it waits
        self.run_pool = ThreadPoolExecutor(max_workers=self.max_sessions + 2, thread_name_prefix="tdb-run")
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, args=(reap_interval_s,), name="tdb-reaper", daemon=True)
        self._reaper.start()

    def create(self, name: str = "", idle_timeout_s: float = 0.0, owner: str = "") -> Session:
        """A new session for `owner` (who it counts against: at most limits.max_sessions_per_client each)."""
        longest = self.limits.max_idle_timeout_s
        if not (0 <= idle_timeout_s <= longest):   # also rejects NaN
            raise InvalidArgument(f"idle_timeout_s = {idle_timeout_s} is out of range: it must be in 0..{longest:g} "
                                  "(0 = the server's default; tdb serve --max-idle-timeout)", reason="BAD_TIMEOUT")
        quota = self.limits.max_sessions_per_client
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ResourceExhausted(f"the server holds {self.max_sessions} sessions already; close one",
                                        reason="TOO_MANY_SESSIONS")
            if owner and sum(s.owner == owner for s in self._sessions.values()) >= quota:
                raise ResourceExhausted(f"this client holds {quota} sessions already, as many as one client may "
                                        "(tdb serve --max-sessions-per-client); close one", reason="TOO_MANY_SESSIONS")
            sid = uuid.uuid4().hex[:16]
            s = Session(self.adapter, sid, name, idle_timeout_s or self.default_idle_timeout_s, limits=self.limits,
                        total_captured=self.total_captured_bytes, run_pool=self.run_pool)
            s.secret = secrets.token_urlsafe(24)       # 192 random bits, told only to the creator
            s.owner = owner
            self._sessions[sid] = s
            return s

    def get(self, session_id: str, secret: str) -> Session:
        """The session with this id, if `secret` is its secret; NOT_FOUND otherwise, the same answer either way."""
        if not session_id:
            raise InvalidArgument("session_id is required", reason="NO_SESSION_ID")
        with self._lock:
            s = self._sessions.get(session_id[:64])
        if s is None or not hmac.compare_digest(s.secret.encode(), (secret or "").encode()):
            raise NotFound(f"session {session_id[:64]!r} does not exist (closed, timed out, or never created) or "
                           "belongs to another client (its session secret, from CreateSession, was not sent as the "
                           "metadata 'tdb-session-secret')", reason="UNKNOWN_SESSION")
        s.touch()
        return s

    def close(self, session_id: str, reason: str = "closed") -> None:
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            raise NotFound(f"session {session_id!r} does not exist", reason="UNKNOWN_SESSION")
        s.close(reason)

    def total_captured_bytes(self) -> int:
        return sum(s.captured_bytes() for s in self.sessions())

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def _reap(self, interval: float) -> None:
        last_trim = time.monotonic()
        while not self._stop.wait(interval):
            now = time.monotonic()
            if now - last_trim > 5.0:
                last_trim = now
                _release_free_memory()
            for s in self.sessions():
                if s.streams == 0 and now - s.last_activity > s.idle_timeout_s:
                    try:
                        self.close(s.id, reason="idle timeout")
                    except NotFound:
                        pass

    def shutdown(self) -> None:
        self._stop.set()
        for s in self.sessions():
            try:
                self.close(s.id, reason="server shutting down")
            except NotFound:
                pass
        self.run_pool.shutdown(wait=False)
