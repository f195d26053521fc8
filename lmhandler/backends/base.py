"""The small interface every model backend implements, and the errors backends raise.

A backend turns one ``BackendRequest`` into one ``Completion`` or raises ``BackendError``.
Usage travels inside each ``Completion`` (never as shared "last usage" state), so concurrent
calls cannot mix up their accounting. Retries, budgets, caching and pacing live in the handler,
not here: a backend makes exactly one attempt per call (SDK retries are switched off).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from rlmq.protocol import ChatMessage, ErrorCode, Usage

from ..errors import HandlerError

__all__ = [
    "Backend",
    "BackendError",
    "BackendRequest",
    "Completion",
    "estimate_tokens",
]


def estimate_tokens(text: str) -> int:
    """A rough token count (4 characters a token) for when no provider count exists."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """One call as a backend sees it. ``model`` is the provider's model name, not the alias."""

    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float | None = None
    timeout_s: float | None = None
    run: str | None = None

    @property
    def system(self) -> str | None:
        """All system messages joined, for APIs that take the system prompt apart."""
        parts = [m.content for m in self.messages if m.role == "system"]
        return "\n\n".join(parts) if parts else None

    @property
    def chat(self) -> tuple[ChatMessage, ...]:
        """The messages without system messages."""
        return tuple(m for m in self.messages if m.role != "system")


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    model: str
    usage: Usage
    stop_reason: str | None = None


class BackendError(HandlerError):
    """One failed attempt, already mapped to a wire error code (the foreign error mapped at the
    backend, the boundary it crossed).

    ``retry_after_s`` carries the provider's Retry-After when it sent one; ``status`` the HTTP
    status when there was one (for stats and logs).
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool,
        retry_after_s: float | None = None,
        status: int | None = None,
    ) -> None:
        self.code = code  # per instance: a backend error travels as whatever the provider said
        super().__init__(message, retryable=retryable)
        self.retry_after_s = retry_after_s
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Backend(ABC):
    """A model provider. One instance serves every call to one model alias, concurrently."""

    @property
    def answers_at_once(self) -> bool:
        """Whether ``complete`` usually returns without suspending (an offline backend at 0 ms).

        The handler then runs a call's pipeline inline in its receive loop instead of as a task
        (no task, timer or context switch). A wrong answer costs speed, never correctness: a call
        that suspends after all is carried on by a task from where it stopped.
        """
        return False

    @property
    def has_provider(self) -> bool:
        """Whether a provider stands behind this backend, to be protected and watched: circuit
        breaker, adaptive concurrency and the retry budget. The offline backends have none (and
        never fail in a way worth retrying), so the pipeline gives them no shaping to pay for.
        rpm/tpm pacing applies to any model that configures it."""
        return True

    @abstractmethod
    async def complete(self, request: BackendRequest) -> Completion:
        """Make one attempt; raise ``BackendError`` on any failure."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections. Called once at shutdown."""
