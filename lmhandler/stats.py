"""Counters the handler reports through the ``stats`` op."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelStats", "ServerStats", "percentiles"]

LATENCY_WINDOW = 10_000


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
