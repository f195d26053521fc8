"""Shaping traffic to a provider: adaptive concurrency, a retry budget, a circuit breaker.

``rpm``/``tpm`` pacing (``pacing.TokenBucket``) keeps a burst inside what the provider allows;
these three react to what the provider actually does:

* ``AdaptiveLimit``: how many calls may be in flight. It starts at the model's
  ``max_concurrency``. Every ``window_s`` it looks at the share of attempts the provider refused
  with 429/529: past ``overload_share`` (25%) the limit shrinks by that share (at most by half),
  otherwise it grows by about one per round trip (one per ``limit`` successes) up to
  ``max_concurrency``. Deciding on the share, not on each refusal, matters: a provider that
  refuses a steady fifth of requests whatever the load would otherwise drive the limit to its
  floor (measured: 1,000 slots down to 4, and 1,000 requests taking 57 s instead of 3).
  Waiters are served in arrival order.
* ``RetryBudget``: retries may be at most ``ratio`` of recent requests (plus a small reserve),
  so when a provider fails everything, retries cannot multiply the load on it.
* ``CircuitBreaker``: after ``threshold`` consecutive failures that say the provider is down
  (connection errors, 5xx, timeouts; not 429s or 4xx), calls fail at once with a retryable
  ``unavailable`` for ``cooldown_s``; then one probe goes through, and its success closes the
  circuit (its failure opens it again, with the cooldown doubled up to ``max_cooldown_s``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from rlmq.protocol import ErrorCode

from .errors import HandlerError

__all__ = ["AdaptiveLimit", "CircuitBreaker", "CircuitOpen", "RetryBudget"]


class AdaptiveLimit:
    def __init__(
        self,
        maximum: int,
        *,
        minimum: int = 1,
        window_s: float = 1.0,
        overload_share: float = 0.25,
        min_samples: int = 10,
    ) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.limit = float(maximum)
        self.in_flight = 0
        self.window_s = window_s
        self.overload_share = overload_share
        self.min_samples = min_samples
        self._window_start = time.monotonic()
        self._attempts = 0
        self._overloads = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.decreases = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits for one, without waiting."""
        if self.in_flight < int(self.limit) and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted and cancelled at once: hand the slot on
            else:
                # ``_wake`` may already have dropped this (cancelled, hence done) future.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(future)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < int(self.limit):
            future = self._waiters.popleft()
            if not future.done():
                self.in_flight += 1
                future.set_result(None)

    def on_success(self, now: float | None = None) -> None:
        """``now``: the caller's clock reading, when it has one (saves a read per call)."""
        self._attempts += 1
        self._roll(now)
        if self.limit < self.maximum:
            self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
            self._wake()

    def on_overload(self) -> None:
        self._attempts += 1
        self._overloads += 1
        self._roll()

    def _roll(self, now: float | None = None) -> None:
        """At the end of a window, shrink the limit if too large a share was refused."""
        if now is None:
            now = time.monotonic()
        if now - self._window_start < self.window_s:
            return
        attempts, overloads = self._attempts, self._overloads
        self._window_start, self._attempts, self._overloads = now, 0, 0
        if attempts < self.min_samples:
            return
        share = overloads / attempts
        if share > self.overload_share:
            self.limit = max(float(self.minimum), self.limit * max(0.5, 1.0 - share))
            self.decreases += 1

    def to_wire(self) -> dict[str, Any]:
        return {"limit": int(self.limit), "max": self.maximum, "decreases": self.decreases}


class RetryBudget:
    """Each request deposits ``ratio`` of a retry; a retry withdraws one. Deposits decay over
    ``window_s`` so an old calm period does not pay for a new outage."""

    def __init__(self, ratio: float = 0.5, *, reserve: float = 10.0, window_s: float = 10.0) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self.window_s = window_s
        self.balance = reserve
        self._updated = time.monotonic()
        self.refused = 0

    def _decay(self, now: float | None = None) -> None:
        if now is None:
            now = time.monotonic()
        elapsed = now - self._updated
        self._updated = now
        if self.balance > self.reserve:
            self.balance = self.reserve + (self.balance - self.reserve) * max(
                0.0, 1 - elapsed / self.window_s
            )

    def on_request(self, now: float | None = None) -> None:
        """``now``: the caller's clock reading, when it has one (saves a read per call)."""
        self._decay(now)
        self.balance += self.ratio

    def try_retry(self) -> bool:
        self._decay()
        if self.balance >= 1.0:
            self.balance -= 1.0
            return True
        self.refused += 1
        return False

    def to_wire(self) -> dict[str, Any]:
        return {"balance": round(self.balance, 2), "refused": self.refused}


class CircuitOpen(HandlerError):
    """The provider looks down: calls fail fast, retryable after ``retry_after_s``."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, retry_after_s: float, message: str | None = None) -> None:
        super().__init__(message or f"circuit open for {retry_after_s:.1f} s more", retryable=True)
        self.retry_after_s = retry_after_s


class CircuitBreaker:
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, *, threshold: int = 5, cooldown_s: float = 2.0, max_cooldown_s: float = 30.0) -> None:
        self.threshold = threshold
        self.base_cooldown_s = cooldown_s
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.opens = 0
        self._probing = False

    def before_call(self) -> None:
        """Raise ``CircuitOpen`` unless a call may go now (closed, or the one half-open probe)."""
        if self.state == self.CLOSED:
            return
        left = self.opened_at + self.cooldown_s - time.monotonic()
        if self.state == self.OPEN and left > 0:
            raise CircuitOpen(left)
        if self._probing:
            raise CircuitOpen(max(0.1, left))
        self.state = self.HALF_OPEN
        self._probing = True

    def on_success(self) -> None:
        self.failures = 0
        if self.state != self.CLOSED:
            self.state = self.CLOSED
            self.cooldown_s = self.base_cooldown_s
            self._probing = False

    def on_failure(self, *, provider_down: bool) -> None:
        """Count a failed call; only failures that say the provider is down trip the breaker."""
        if self.state == self.HALF_OPEN:
            self._probing = False
            if provider_down:
                self._open(min(self.max_cooldown_s, self.cooldown_s * 2))
            else:
                self.state = self.CLOSED  # it answered: not down
            return
        if not provider_down:
            self.failures = 0
            return
        self.failures += 1
        if self.state == self.CLOSED and self.failures >= self.threshold:
            self._open(self.base_cooldown_s)

    def _open(self, cooldown_s: float) -> None:
        self.state = self.OPEN
        self.cooldown_s = cooldown_s
        self.opened_at = time.monotonic()
        self.opens += 1

    def to_wire(self) -> dict[str, Any]:
        return {"state": self.state, "consecutive_failures": self.failures, "opens": self.opens}
