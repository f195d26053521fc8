"""Counters the handler reports through the ``stats`` op and ``/metrics``, and the span of a call."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from rlmq.protocol import CompleteRequest, tracing

__all__ = ["LATENCY_BUCKETS_MS", "ModelStats", "ServerStats", "percentiles", "trace_complete"]

LATENCY_WINDOW = 10_000
# Upper bounds of the latency histogram (what /metrics shows as rlmq_handler_request_duration_seconds):
# from the handler's own cost on an offline backend (well under 1 ms) to a long provider answer.
LATENCY_BUCKETS_MS = (
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1_000.0, 2_500.0, 5_000.0, 10_000.0, 30_000.0, 60_000.0, 120_000.0,
)  # fmt: skip


def percentiles(samples: deque[float] | list[float]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(samples)
    n = len(ordered)

    def at(q: float) -> float:
        return round(ordered[min(n - 1, int(q * n))], 3)

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(ordered[-1], 3)}


@dataclass(slots=True)
class ModelStats:
    requests: int = 0
    ok: int = 0
    in_flight: int = 0
    queued: int = 0
    sent: int = 0  # attempts that reached the backend
    retries: int = 0
    cache_hits: int = 0
    rate_limited: int = 0  # 429s seen from the provider
    retry_wait_s: float = 0.0  # backoff waited before retries (Retry-After or exponential); in-process only
    errors: Counter[str] = field(default_factory=Counter)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # Counts per bucket of LATENCY_BUCKETS_MS (the last one: above them all), and their sum:
    # a histogram since start, where latency_ms is a recent window for the percentiles.
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    latency_sum_ms: float = 0.0

    def observe_latency(self, ms: float) -> None:
        """One answered call's latency, for the percentiles and the histogram."""
        self.latency_ms.append(ms)
        self.latency_buckets[bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self.latency_sum_ms += ms

    def to_wire(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "sent": self.sent,
            "retries": self.retries,
            "cache_hits": self.cache_hits,
            "rate_limited": self.rate_limited,
            "errors": dict(self.errors),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 9),
            "latency_ms": percentiles(self.latency_ms),
        }


@dataclass(slots=True)
class ServerStats:
    started: float = field(default_factory=time.monotonic)
    received: int = 0
    replied: int = 0
    dropped: int = 0  # unreadable messages with no id to answer
    by_op: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0


def trace_complete(
    req: CompleteRequest, started: float, *, cached: bool = False, error: str | None = None
) -> None:
    """Record the ``rlmq.complete`` span of a call that ended now (when tracing is on), a child
    of the caller's span when the request carried a ``trace``."""
    tracing.record(
        "rlmq.complete",
        started=started,
        parent=req.trace,
        attributes={
            "rlmq.model": req.model,
            "rlmq.run": req.run,
            "rlmq.depth": req.depth,
            "rlmq.cached": cached,
        },
        error=error,
    )
