"""The root of the handler's errors, and the ones that belong to no single stage.

Every error a ``complete`` can end in is a ``HandlerError`` carrying its wire ``code``, so the
server answers all of them the same way (``ErrorInfo.of``). The whole subtree is drawn in the
package docstring (``rlmq.lmhandler``).
"""

from __future__ import annotations

from rlmq.protocol import ErrorCode, RlmqError

__all__ = [
    "AnonymousRefused",
    "HandlerError",
    "Overloaded",
    "RequestTimeout",
    "ShuttingDown",
    "UnknownModel",
    "UnknownRun",
]


class HandlerError(RlmqError):
    """Base of every error the handler raises on purpose; ``internal`` unless a subclass says."""

    code = ErrorCode.INTERNAL


class UnknownModel(HandlerError):
    """A ``complete`` names a model alias the configuration does not have."""

    code = ErrorCode.UNKNOWN_MODEL


class UnknownRun(HandlerError):
    """A request names a run the handler does not hold for this caller: never opened here (or
    forgotten, or lost with a restart), or opened with a key the request does not show. Not
    retryable: the caller reopens the run, or the run has failed."""

    code = ErrorCode.UNKNOWN_RUN  # not retryable: the default of its code


class AnonymousRefused(HandlerError):
    """A ``complete`` without a run, or a run opened without a key, on a handler that does not
    allow anonymous calls."""

    code = ErrorCode.UNAUTHORIZED  # not retryable: the default of its code


class Overloaded(HandlerError):
    """The handler already has ``max_in_flight`` requests in flight."""

    code = ErrorCode.OVERLOADED


class RequestTimeout(HandlerError):
    """No answer within the request's timeout (clamped to its run's deadline), retries included."""

    code = ErrorCode.TIMEOUT


class ShuttingDown(HandlerError):
    """The handler stopped before the call finished."""

    code = ErrorCode.UNAVAILABLE


class PromptTooLarge(HandlerError):
    """The prompt is estimated over the model's context window: refused before it is sent."""

    code = ErrorCode.TOO_LARGE
