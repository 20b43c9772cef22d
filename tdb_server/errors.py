"""Errors that carry their gRPC status code and a machine-readable reason.

Every error the server raises on purpose is a `TdbServerError` with a neutral `Code` (named as gRPC's
canonical status codes, so that nothing below the servicers imports grpc); `_abort` in servicer.py is
the one place that turns it into a gRPC status (with `tdb-reason` trailing metadata). Anything else
that escapes a handler becomes INTERNAL with its traceback logged.

"Your request is invalid" (INVALID_ARGUMENT) is kept distinct from "not possible now"
(FAILED_PRECONDITION); stale references after a resume are ABORTED.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """The canonical status codes the server answers with (the servicer maps them to grpc.StatusCode)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    CANCELLED = "CANCELLED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


class TdbServerError(Exception):
    code: Code = Code.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, suggestions: list[str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.suggestions = list(suggestions or [])


def is_allocation_failure(e: BaseException) -> bool:
    """Whether `e` is a failed memory allocation: Python's MemoryError, or the RuntimeError torch's CPU
    allocator raises (torch.OutOfMemoryError, for accelerators, is a RuntimeError too)."""
    if isinstance(e, MemoryError):
        return True
    text = str(e) if isinstance(e, RuntimeError) else ""
    return type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text


class InvalidArgument(TdbServerError):
    code = Code.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(TdbServerError):
    code = Code.NOT_FOUND
    reason = "NOT_FOUND"


class FailedPrecondition(TdbServerError):
    code = Code.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(TdbServerError):
    code = Code.ABORTED
    reason = "STALE_REFERENCE"


class ResourceExhausted(TdbServerError):
    code = Code.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(TdbServerError):
    code = Code.DEADLINE_EXCEEDED
    reason = "TIMEOUT"


class Unauthenticated(TdbServerError):
    code = Code.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class Cancelled(TdbServerError):
    code = Code.CANCELLED
    reason = "CANCELLED"


class PermissionDenied(TdbServerError):
    code = Code.PERMISSION_DENIED
    reason = "PATH_NOT_ALLOWED"
