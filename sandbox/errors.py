"""The sandbox pool's errors: one subtree of ``RlmqError``, each class knowing its wire code.

    PoolError                   root of every error the pool raises on purpose
    └── PoolFailure             becomes an error reply with its code (bad_request, too_large, ...)
        ├── UnknownSession      unknown_session: no open session has this id
        ├── SessionBusy         session_busy: an exec is already running in the session
        ├── SessionLost         session_lost: no worker could replace a dead one
        │   └── WorkerGone      the worker exited or was killed while something waited on it
        ├── PoolExhausted       pool_exhausted: no worker became ready in time (retryable)
        └── PoolStopping        unavailable: the pool is shutting down (retryable)

The server turns any of them into ``{code, message, retryable}`` with ``ErrorInfo.of``.
"""

from __future__ import annotations

from rlmq.protocol.errors import ErrorCode, RlmqError

__all__ = [
    "PoolError",
    "PoolExhausted",
    "PoolFailure",
    "PoolStopping",
    "SessionBusy",
    "SessionLost",
    "UnknownSession",
    "WorkerGone",
]


class PoolError(RlmqError):
    """Root of the sandbox pool's errors."""


class PoolFailure(PoolError):
    """A failure that becomes an error reply with this code."""

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False) -> None:
        self.code = code
        super().__init__(message, retryable=retryable)


class UnknownSession(PoolFailure):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNKNOWN_SESSION, message)


class SessionBusy(PoolFailure):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.SESSION_BUSY, message)


class SessionLost(PoolFailure):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.SESSION_LOST, message)


class WorkerGone(SessionLost):
    """The worker exited or was killed; ``message`` says how."""


class PoolExhausted(PoolFailure):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.POOL_EXHAUSTED, message, retryable=True)


class PoolStopping(PoolFailure):
    def __init__(self, message: str = "the sandbox pool is stopping") -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message, retryable=True)
