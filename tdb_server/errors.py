"""Errors that carry their gRPC status code and a machine-readable reason.

Every error the server raises on purpose is a `TdbServerError`; `wire_error` in servicer.py is the
one place that turns it into a gRPC status (with `tdb-reason` trailing metadata). Anything else that
escapes a handler becomes INTERNAL with its traceback logged.

"Your request is invalid" (INVALID_ARGUMENT) is kept distinct from "not possible now"
(FAILED_PRECONDITION); stale references after a resume are ABORTED.
"""

from __future__ import annotations

import grpc


class TdbServerError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, suggestions: list[str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.suggestions = list(suggestions or [])


class InvalidArgument(TdbServerError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(TdbServerError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class FailedPrecondition(TdbServerError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(TdbServerError):
    code = grpc.StatusCode.ABORTED
    reason = "STALE_REFERENCE"


class ResourceExhausted(TdbServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(TdbServerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "TIMEOUT"


class Unauthenticated(TdbServerError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class Cancelled(TdbServerError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class PermissionDenied(TdbServerError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PATH_NOT_ALLOWED"
