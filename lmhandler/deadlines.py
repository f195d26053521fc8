"""Deadlines of the requests in flight, in buckets, under one event-loop timer.

A deadline costs a set insertion and removal, where ``asyncio.timeout`` costs a timer in the
event loop's heap (whose entries compare in Python), a context manager, and three running-loop
lookups, each a ``getpid()`` system call on Python 3.11: with 10,000 requests in flight those
were a fifth of the loop's time (py-spy; docs/benchmarks.md). A deadline fires up to
``resolution_s`` late.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Any

__all__ = ["DeadlineWheel"]


class DeadlineWheel:
    """Cancel tasks whose deadline passed; ``expired`` tells that cancellation from others."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution_s: float = 0.01) -> None:
        self._loop = loop
        self._resolution_s = resolution_s
        self._buckets: dict[int, set[asyncio.Task[Any]]] = {}
        self._slots: list[int] = []  # a heap of the buckets' slots
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot: int | None = None
        self._expired: set[asyncio.Task[Any]] = set()

    def add(self, task: asyncio.Task[Any], deadline: float) -> int:
        """Cancel ``task`` once ``deadline`` (loop time) passes, unless removed before; returns
        the slot to hand to ``remove``."""
        slot = math.ceil(deadline / self._resolution_s)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = set()
            heapq.heappush(self._slots, slot)
            if self._timer_slot is None or slot < self._timer_slot:
                self._arm(slot)
        bucket.add(task)
        return slot

    def remove(self, task: asyncio.Task[Any], slot: int) -> None:
        bucket = self._buckets.get(slot)
        if bucket is not None:
            bucket.discard(task)
            if not bucket:  # its slot stays in the heap and finds nothing when it comes
                del self._buckets[slot]
        self._expired.discard(task)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task``'s cancellation is this deadline's, and the only one pending: then it
        becomes a timeout (as ``asyncio.timeout`` decides)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self._loop.call_at(slot * self._resolution_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_slot = None
        now = self._loop.time()
        slots = self._slots
        while slots and slots[0] * self._resolution_s <= now:
            for task in self._buckets.pop(heapq.heappop(slots), ()):
                if not task.done():
                    self._expired.add(task)
                    task.cancel("deadline")
        if slots:
            self._arm(slots[0])
