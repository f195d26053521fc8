"""A response cache per model, keyed on the request's content.

In-process state keeps the entries here (bounded, least recently used out first); shared state
keeps them in its ``CacheStore`` (Redis, with a TTL: shared by every handler, surviving
restarts), and this object only coalesces. Identical requests in flight at the same time in one
handler are coalesced: the first one goes to the backend, the others wait for its result
(single flight), so a burst of duplicates costs one call.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict

from rlmq.protocol import ChatMessage, pack

from .backends.base import Completion
from .state.base import CacheStore

__all__ = ["ResponseCache", "cache_key"]


def cache_key(
    model: str, messages: tuple[ChatMessage, ...], max_tokens: int, temperature: float | None
) -> bytes:
    payload = pack(
        {
            "model": model,
            "messages": [(m.role, m.content) for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
    )
    return hashlib.blake2b(payload, digest_size=20).digest()


class ResponseCache:
    def __init__(self, max_entries: int, store: CacheStore | None = None) -> None:
        self.max_entries = max_entries
        self.store = store  # None: the entries live here
        self._entries: OrderedDict[bytes, Completion] = OrderedDict()
        self._in_flight: dict[bytes, asyncio.Future[Completion]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Completion | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return hit

    async def fetch(self, key: bytes) -> Completion | None:
        """A hit from the store (shared state only)."""
        assert self.store is not None
        hit = await self.store.get(key)
        if hit is not None:
            self.hits += 1
        return hit

    def pending(self, key: bytes) -> asyncio.Future[Completion] | None:
        """The future of an identical request already in flight, if any."""
        return self._in_flight.get(key)

    def begin(self, key: bytes) -> asyncio.Future[Completion] | None:
        """Lead the flight of ``key``: the future identical requests wait on, or None when another
        call already leads one (this call then goes on alone: it waited on something first, an
        earlier leader or the shared state, and a flight must never change hands, or the
        waiters of the first leader would wait on a future nobody resolves)."""
        self.misses += 1
        if key in self._in_flight:
            return None
        future: asyncio.Future[Completion] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        return future

    def end(self, key: bytes, result: Completion | None, future: asyncio.Future[Completion] | None) -> None:
        """Finish a call: store its result, and, if it led the flight (``future`` from ``begin``),
        share the result with the waiters or, on failure, let them retry."""
        if result is not None and self.store is None:
            self._entries[key] = result
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        if future is None:
            return
        if self._in_flight.get(key) is future:
            del self._in_flight[key]
        if not future.done():
            if result is not None:
                future.set_result(result)
            else:
                future.cancel()
