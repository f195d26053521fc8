"""Error codes of the wire protocol and the exception tree every rlmq package shares.

    RlmqError                      base of everything raised on purpose by rlmq
    ├── ProtocolError              a frame or message that does not follow the spec
    │   ├── DecodeError            not msgpack, not a map, missing/mistyped fields
    │   ├── UnsupportedVersion     `v` is not a version this side speaks
    │   ├── UnknownOp              `op` names no operation
    │   └── MessageTooLarge        payload over the configured limit
    ├── RemoteError                an error reply from a peer (code, message, retryable)
    └── TransportTimeout           no reply within the caller's timeout

On the wire an error is always ``{code, message, retryable}``; ``ErrorCode`` lists the codes.
Each exception knows the code it travels as, so servers turn any of them into a reply the same way.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "DecodeError",
    "ErrorCode",
    "MessageTooLarge",
    "ProtocolError",
    "RemoteError",
    "RlmqError",
    "TransportTimeout",
    "UnknownOp",
    "UnsupportedVersion",
    "default_retryable",
]


class ErrorCode(StrEnum):
    """Every error code a reply may carry. New codes may be added in a minor revision."""

    BAD_REQUEST = "bad_request"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_MODEL = "unknown_model"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    BACKEND_ERROR = "backend_error"
    TIMEOUT = "timeout"
    OVERLOADED = "overloaded"
    BUDGET_EXCEEDED = "budget_exceeded"
    UNAUTHORIZED = "unauthorized"
    SCRIPT_EXHAUSTED = "script_exhausted"
    RUN_CLOSED = "run_closed"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


_RETRYABLE = frozenset(
    {
        ErrorCode.RATE_LIMITED,
        ErrorCode.TIMEOUT,
        ErrorCode.OVERLOADED,
        ErrorCode.UNAVAILABLE,
    }
)


def default_retryable(code: ErrorCode) -> bool:
    """Whether an error of this code is worth retrying when nothing more specific is known."""
    return code in _RETRYABLE


class RlmqError(Exception):
    """Base of every error rlmq raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = default_retryable(self.code) if retryable is None else retryable


class ProtocolError(RlmqError):
    """A message that does not follow the wire spec."""

    code = ErrorCode.BAD_REQUEST

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message, retryable=False)
        # The id of the offending request when it could be read, so the error reply can carry it.
        self.request_id = request_id


class DecodeError(ProtocolError):
    """Bytes that are not a msgpack map, or a map whose fields are missing or mistyped."""


class UnsupportedVersion(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownOp(ProtocolError):
    code = ErrorCode.UNKNOWN_OP


class MessageTooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE


class RemoteError(RlmqError):
    """An error reply received from a peer; carries the peer's code verbatim."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        try:
            known: ErrorCode = ErrorCode(code)
        except ValueError:
            known = ErrorCode.INTERNAL
        self.code = known
        # Keep the raw code: a newer peer may send codes this version does not know.
        self.raw_code = code
        super().__init__(f"{code}: {message}", retryable=retryable)
        self.message = message


class TransportTimeout(RlmqError):
    """No reply arrived within the caller's timeout."""

    code = ErrorCode.TIMEOUT
