"""The one error type of the client: every failed call raises TdbError(code, reason, message)."""

from __future__ import annotations

import grpc


class TdbError(Exception):
    """A call to a tdb server failed.

    code: the gRPC status code (grpc.StatusCode), e.g. INVALID_ARGUMENT, FAILED_PRECONDITION, ABORTED.
    reason: a machine-readable reason from the server, e.g. "UNKNOWN_SITE", "SITE_ALREADY_RAN".
    message: the server's message, written for a person.
    suggestions: nearest valid names, when the server had some.
    """

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, suggestions: list[str] | None = None):
        super().__init__(f"{code.name} ({reason}): {message}")
        self.code, self.reason, self.message = code, reason, message
        self.suggestions = list(suggestions or [])

    @classmethod
    def data_loss(cls, reason: str, message: str) -> "TdbError":
        """What the client raises itself when the bytes it received are not what the server sent."""
        return cls(grpc.StatusCode.DATA_LOSS, reason, message)

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "TdbError":
        md = {k: v for k, v in (e.trailing_metadata() or ())} if hasattr(e, "trailing_metadata") else {}
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        reason = md.get("tdb-reason") or (code.name if code else "UNKNOWN")
        sugg = [s for s in (md.get("tdb-suggestions") or "").split(",") if s]
        details = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.UNAVAILABLE and "tdb-reason" not in md:
            details = no_server(details or "")
        return cls(code, reason, details or "", sugg)


class TdbWarning(UserWarning):
    """Something the server says about a call that succeeded, e.g. prompt words the model does not know."""


def no_server(details: str) -> str:
    """The message of a call that reached no server (gRPC's own words kept: they name the address)."""
    return (f"no tdb server is answering there ({details}). Is one running at that address? "
            "Start one with `tdb serve` (or `tdb serve --port PORT`).")
