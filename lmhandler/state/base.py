"""The interface of the handler's shared state, and what both implementations have in common.

A ``State`` holds what several handlers must agree on: open runs with their limits and usage
(reserved at admission, settled after the call), the replies of finished calls by request id (so
a re-sent request is answered again, not paid again), rpm/tpm pacing per model, and the response
cache. ``memory.MemoryState`` keeps it in this process; ``redis.RedisState`` in Redis, shared by
every handler given the same url.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from rlmq.protocol import CompleteReply, ErrorCode, RunLimits, RunUsage, Usage, encode, unpack

from ..backends.base import Completion
from ..errors import HandlerError

__all__ = ["Admission", "CacheStore", "Pacer", "State", "StateUnavailable", "encode_replayed"]


def encode_replayed(payload: bytes | memoryview) -> bytes:
    """A kept ``CompleteReply`` payload again, marked ``replayed`` (rare: only re-sends pay this)."""
    reply = CompleteReply.from_wire(unpack(payload, max_bytes=len(payload) + 1))
    data = encode(dataclasses.replace(reply, replayed=True))
    return bytes(data)


class StateUnavailable(HandlerError):
    """The shared state (Redis) could not be reached within its timeout: retry later."""

    code = ErrorCode.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Admission:
    """A call admitted to its run: ``max_tokens`` clamped to the output tokens left, ``timeout_s``
    to the run's deadline. ``replay``: the encoded reply of this request id, which already
    finished; nothing was reserved and the caller answers with it."""

    max_tokens: int
    timeout_s: float
    replay: bytes | None = None


class Pacer(Protocol):
    """rpm or tpm pacing of one model: ``acquire`` waits for ``amount`` units; ``adjust`` charges
    (positive) or refunds (negative) the difference between an estimate and what was spent."""

    async def acquire(self, amount: float = 1.0) -> None: ...

    def adjust(self, delta: float) -> None: ...


class CacheStore(Protocol):
    """Where finished completions are kept by the cache key of their request."""

    async def get(self, key: bytes) -> Completion | None: ...

    async def put(self, key: bytes, completion: Completion) -> None: ...


class State(Protocol):
    """The handler's shared state. Every method raises ``StateUnavailable`` (a retryable
    ``unavailable``) when the store cannot be reached in time; run methods raise
    ``UnknownRun``, ``RunClosed`` and ``BudgetExceeded`` as ``accounting`` describes."""

    @property
    def local(self) -> bool:
        """True for in-process state: the pipeline then takes its synchronous fast path."""
        ...

    async def start(self) -> None:
        """Connect; raise ``ConfigError`` naming the store when it cannot be reached."""

    async def aclose(self) -> None: ...

    async def run_open(self, run: str, limits: RunLimits, key: str | None) -> RunUsage: ...

    async def run_close(self, run: str, key: str | None) -> RunUsage: ...

    async def usage(self, run: str) -> RunUsage: ...

    async def runs_open(self) -> int: ...

    async def admit(
        self, run: str, key: str | None, rid: str, model: str, max_tokens: int, timeout_s: float
    ) -> Admission:
        """Reserve one call of ``run`` for request ``rid`` (or find its finished reply)."""
        ...

    async def admit_cached(self, run: str, key: str | None) -> None:
        """A cache hit: the run must be open and held; it spends nothing."""

    async def settle(
        self, run: str, rid: str, model: str, usage: Usage | None, cost_usd: float, reply: bytes | None
    ) -> None:
        """End the call ``admit`` reserved: its usage (``None``: it failed) and, for a success,
        its encoded reply, kept for re-sends of ``rid``. Settling the same ``rid`` twice counts once."""

    def pacer(self, alias: str, kind: str, per_minute: float) -> Pacer:
        """The ``kind`` ("rpm" or "tpm") pacing of model ``alias``."""
        ...

    def cache(self, alias: str, max_entries: int) -> CacheStore | None:
        """The stored side of ``alias``'s response cache; None: the in-process cache holds it."""
        ...
