"""Errors of the transport layer.

:class:`RejectedError` carries the gRPC status a refused call gets; the server turns it into
``context.abort(code, message)``. The codes used: INVALID_ARGUMENT (malformed message or payload),
FAILED_PRECONDITION (out of phase, another round, a stale session), PERMISSION_DENIED (not on the
roster, or claiming another identity), RESOURCE_EXHAUSTED (size, rate or concurrency limit),
UNIMPLEMENTED (an aggregation this server does not run).
"""

from __future__ import annotations

from secure_fl.errors import SecureFLError

STATUS_CODES = (
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "UNIMPLEMENTED",
    "UNAUTHENTICATED",
)


class TransportError(SecureFLError):
    """Base class of transport failures (a call refused, a payload corrupted, a peer gone)."""


class RejectedError(TransportError):
    """A call or payload is refused; ``code`` is the name of the gRPC status it maps to."""

    def __init__(self, code: str, message: str) -> None:
        if code not in STATUS_CODES:
            raise ValueError(f"code must be one of {STATUS_CODES}, got {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
