"""Client-side pacing to a provider's limits: requests per minute and tokens per minute.

A token bucket refilled continuously; a bucket may go into debt (a call larger than the burst
still goes, later calls wait it off), and ``adjust`` corrects an estimate once the real usage is
known. Waiters are served in arrival order so a burst of thousands drains at the set rate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

__all__ = ["TokenBucket"]


class TokenBucket:
    """``clock`` and ``sleep`` are what the bucket reads time with and waits with (a test may
    hand it a fake clock that ``sleep`` advances)."""

    def __init__(
        self,
        per_minute: float,
        *,
        burst_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.rate = per_minute / 60.0
        # A small burst (a fifth of a second's worth, at least one unit): providers count in
        # one-second windows, and a full second of burst plus a second of refill can land in one
        # window, twice the rate. With 0.2 s, any window sees at most 1.2x the configured rate.
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.updated = clock()
        self._lock = asyncio.Lock()
        self.waiting = 0

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    async def acquire(self, amount: float = 1.0) -> None:
        self.waiting += 1
        try:
            async with self._lock:  # FIFO: asyncio.Lock wakes waiters in order
                self._refill()
                while self.level < min(amount, self.capacity):
                    await self._sleep((min(amount, self.capacity) - self.level) / self.rate)
                    self._refill()
                self.level -= amount
        finally:
            self.waiting -= 1

    def adjust(self, delta: float) -> None:
        """Charge (positive) or refund (negative) the difference between estimate and actual."""
        self._refill()
        self.level = min(self.capacity, self.level - delta)
