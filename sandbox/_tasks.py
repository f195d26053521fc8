"""Background work shared by the pool's parts: tracked tasks, a private thread pool, counters.

Spawns, cleanups, /proc scans and file reads block: they run in this executor, never on the
event loop, and never in the loop's default executor (the pool may live inside a bigger program).
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = [
    "EXEC_BUCKETS_MS",
    "OPEN_BUCKETS_MS",
    "Background",
    "Histogram",
    "Stats",
    "mark_retrieved",
    "percentiles",
]

T = TypeVar("T")


def mark_retrieved(future: asyncio.Future[Any]) -> None:
    """A done-callback that retrieves the exception, so asyncio does not log it as unhandled."""
    if not future.cancelled():
        future.exception()


class Background:
    """Tasks the pool starts and must wait for (or cancel) when it stops, and its executor."""

    def __init__(self, threads: int = 8) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sandbox-pool")

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def named(self, *prefixes: str) -> list[asyncio.Task[Any]]:
        return [t for t in self.tasks if t.get_name().startswith(prefixes)]

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


# Upper bounds of the duration histograms /metrics shows (rlmq_pool_*_duration_seconds).
EXEC_BUCKETS_MS = (
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1_000.0, 2_500.0, 5_000.0, 10_000.0, 30_000.0, 60_000.0, 120_000.0, 300_000.0,
)  # fmt: skip
OPEN_BUCKETS_MS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0)


class Histogram:
    """Counts of observations per fixed bucket (the last: above every bound), and their sum."""

    __slots__ = ("bounds_ms", "counts", "sum_ms")

    def __init__(self, bounds_ms: tuple[float, ...]) -> None:
        self.bounds_ms = bounds_ms
        self.counts = [0] * (len(bounds_ms) + 1)
        self.sum_ms = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect_left(self.bounds_ms, ms)] += 1
        self.sum_ms += ms


class Stats:
    """Counters, recent latencies (the ``stats`` op's percentiles) and histograms (/metrics)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.counters: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.open_ms: deque[float] = deque(maxlen=1000)
        self.exec_ms: deque[float] = deque(maxlen=1000)
        self.open_histogram = Histogram(OPEN_BUCKETS_MS)
        self.exec_histogram = Histogram(EXEC_BUCKETS_MS)

    def inc(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def observe_open(self, ms: float) -> None:
        """How long opening a session took."""
        self.open_ms.append(ms)
        self.open_histogram.observe(ms)

    def observe_exec(self, ms: float) -> None:
        """How long an exec took, as its caller waited for it (a timeout's or a death's included)."""
        self.exec_ms.append(ms)
        self.exec_histogram.observe(ms)


def percentiles(values: deque[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 3)}
