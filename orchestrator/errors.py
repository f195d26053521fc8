"""The orchestrator's errors: one subtree of ``RlmqError``, drawn in the package docstring.

A run that a limit or a remote error stops is not an exception: it ends with a ``RunResult``
whose ``stop_reason`` says why and whose ``error`` keeps the remote ``ErrorInfo`` whole. These
exceptions are for what prevents a run from starting, and for a child run that cannot answer
the ``rlm_query`` waiting on it.
"""

from __future__ import annotations

from rlmq.protocol import ConfigError, ErrorCode, ErrorInfo, RlmqError

__all__ = [
    "ChildRunFailed",
    "ContextError",
    "NoServices",
    "RunError",
    "ServiceError",
    "SettingsError",
]


class RunError(RlmqError):
    """Base of the orchestrator's own errors."""


class ContextError(RunError):
    """A ``--context`` that cannot be read."""

    code = ErrorCode.BAD_REQUEST


class NoServices(RunError):
    """Neither addresses of running services nor a config to start private ones."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class ServiceError(RunError):
    """A local service (handler or pool started by ``local_services``) that did not start."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class ChildRunFailed(RunError):
    """A recursive run (``rlm_query``) stopped without an answer.

    Raised from the session's ``rlm_query`` callback; the protocol layer sends it to the worker as
    ``ErrorInfo(rlm_failed, ...)``, where the model's code sees it as an exception.
    """

    code = ErrorCode.RLM_FAILED

    def __init__(self, stop_reason: str, detail: str, *, cause: ErrorInfo | None = None) -> None:
        message = f"the recursive run stopped: {stop_reason}" + (f" ({detail})" if detail else "")
        super().__init__(message, retryable=False)
        self.stop_reason = stop_reason
        self.cause = cause  # the error that stopped the child, if one did


class SettingsError(ConfigError):
    """Run settings (flags, the ``[run]`` table) that cannot be used as written."""
