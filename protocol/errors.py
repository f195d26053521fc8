"""The one registry of wire error codes, and the root of every exception rlmq raises on purpose.

    RlmqError                      code, message, retryable: the fields of a wire error
    ├── ConfigError                a config file, flag or setting that cannot be used as written
    ├── ProtocolError              a frame or message that does not follow the spec
    │   ├── DecodeError            not msgpack, not a map, missing/mistyped fields
    │   ├── UnsupportedVersion     `v` is not a version this side speaks
    │   ├── UnknownOp              `op` names no operation
    │   └── MessageTooLarge        payload over the configured limit
    ├── RemoteError                an error reply from a peer, its ErrorInfo kept whole
    │   └── SandboxError           ... from the sandbox pool (rlmq.protocol.sandbox)
    ├── TransportTimeout           no reply within the caller's timeout
    ├── CurveError                 keys missing or malformed (rlmq.protocol.security)
    └── one subtree per service, drawn in its package docstring:
        HandlerError (rlmq.lmhandler), PoolError (rlmq.sandbox), RunError (rlmq.orchestrator)

On the wire an error is always ``{code, message, retryable}`` (``ErrorInfo``); ``ErrorCode``
lists every code of both protocols, handler and sandbox. Each exception knows the code it travels
as, so any server turns any of them into a reply the same way (``ErrorInfo.of``), and any client
turns a reply back into an exception without folding it into text (``ErrorInfo.exception``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "ConfigError",
    "DecodeError",
    "ErrorCode",
    "ErrorInfo",
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
    """Every error code a reply of either protocol may carry. New codes may be added in a minor
    revision; a peer keeps a code it does not know verbatim (``RemoteError.raw_code``)."""

    # the handler protocol (and shared with the sandbox protocol)

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
    UNKNOWN_RUN = "unknown_run"  # no such run is held for this caller (never opened, or another key)
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    # the sandbox session protocol
    UNKNOWN_SESSION = "unknown_session"  # no open session has this id (closed, expired, never opened)
    SESSION_BUSY = "session_busy"  # an exec is already running in this session
    SESSION_LOST = "session_lost"  # the worker died and no replacement could be started
    POOL_EXHAUSTED = "pool_exhausted"  # no worker became ready within open_timeout_s
    RLM_FAILED = "rlm_failed"  # a child run (rlm_query) failed
    NOT_RECORDED = "not_recorded"  # a replayed exec made a sub-call the recording has no answer for


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
        # Seconds the peer asked us to wait before trying again, when it said.
        self.retry_after_s: float | None = None


class ConfigError(RlmqError):
    """A configuration file, flag or setting that cannot be used as written."""

    code = ErrorCode.BAD_REQUEST

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


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

    def __init__(
        self, code: str, message: str, *, retryable: bool = False, retry_after_s: float | None = None
    ) -> None:
        try:
            known: ErrorCode = ErrorCode(code)
        except ValueError:
            known = ErrorCode.INTERNAL
        self.code = known
        super().__init__(message, retryable=retryable)
        # Keep the raw code: a newer peer may send codes this version does not know.
        self.raw_code = str(code)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return f"{self.raw_code}: {self.message}"


class TransportTimeout(RlmqError):
    """No reply arrived within the caller's timeout."""

    code = ErrorCode.TIMEOUT


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error as it travels: on the wire, inside other messages, in results and trajectories.

    Every hop (handler -> worker -> pool -> orchestrator) carries this structure, never a string
    made of it, so the last receiver can still branch on ``code`` and ``retryable``.
    """

    code: str
    message: str
    retryable: bool = False
    retry_after_s: float | None = None

    @classmethod
    def of(cls, exc: BaseException) -> ErrorInfo:
        """The wire form of an exception: its own fields for an ``RlmqError``, else ``internal``."""
        if isinstance(exc, RemoteError):
            return cls(exc.raw_code, exc.message, exc.retryable, exc.retry_after_s)
        if isinstance(exc, RlmqError):
            return cls(str(exc.code), exc.message, exc.retryable, exc.retry_after_s)
        return cls(str(ErrorCode.INTERNAL), f"{type(exc).__name__}: {exc}", False)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.retry_after_s is not None:
            wire["retry_after_s"] = self.retry_after_s
        return wire

    @classmethod
    def from_wire(cls, value: object) -> ErrorInfo:
        """Read ``{code, message, retryable[, retry_after_s]}``; anything else is a DecodeError."""
        if not isinstance(value, Mapping):
            raise DecodeError(f"error must be a map, not {type(value).__name__}")
        code, message = value.get("code"), value.get("message")
        retryable = value.get("retryable", False)
        after = value.get("retry_after_s")
        if not isinstance(code, str) or not code:
            raise DecodeError("error.code must be a non-empty string")
        if not isinstance(message, str):
            raise DecodeError("error.message must be a string")
        if not isinstance(retryable, bool):
            raise DecodeError("error.retryable must be a boolean")
        if after is not None and (isinstance(after, bool) or not isinstance(after, int | float) or after < 0):
            raise DecodeError("error.retry_after_s must be a non-negative number")
        return cls(code, message, retryable, None if after is None else float(after))

    def exception(self) -> RemoteError:
        """The exception a client raises for this error."""
        return RemoteError(
            self.code, self.message, retryable=self.retryable, retry_after_s=self.retry_after_s
        )

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
