"""In-process state: the embedded default. Nothing to install; it lives and dies with the process.

The pipeline does not go through the async ``State`` methods here: it calls the ``RunTable``
and the ``ReplayStore`` directly (plain functions, no coroutine per step), which is what keeps
the zero-latency path as fast as it was. The async methods exist for the other callers and
for the contract tests both implementations pass.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from rlmq.protocol import RunLimits, RunUsage, Usage

from ..accounting import RunTable
from ..pacing import TokenBucket
from .base import Admission, CacheStore, Pacer, encode_replayed

__all__ = ["MemoryState", "ReplayStore"]


SETTLED_IDS = 100_000  # settled ids remembered when no replies are kept


class ReplayStore:
    """The encoded replies of finished calls by (run, request id), for ``ttl_s`` and at most
    ``max_entries`` of them (the oldest go first)."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, str, bytes | memoryview]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item: tuple[str, str]) -> bool:
        return item in self._entries

    def get(self, run: str, rid: str, model: str) -> bytes | None:
        """The reply to replay for a re-sent ``rid`` (marked ``replayed``), or None."""
        entry = self._entries.get((run, rid))
        if entry is None:
            return None
        expires, kept_model, payload = entry
        if expires <= time.monotonic():
            del self._entries[(run, rid)]
            return None
        if kept_model != model:  # the same id for another model: not a re-send
            return None
        return encode_replayed(payload)

    def put(self, run: str, rid: str, model: str, payload: bytes | memoryview) -> None:
        entries = self._entries
        entries[(run, rid)] = (time.monotonic() + self.ttl_s, model, payload)
        if len(entries) > self.max_entries:
            entries.popitem(last=False)


class MemoryState:
    """``State`` in this process: a ``RunTable``, a ``ReplayStore``, token buckets."""

    local = True

    def __init__(
        self, runs: RunTable | None = None, *, replay_ttl_s: float = 600.0, replay_entries: int = 100_000
    ) -> None:
        self.runs = runs if runs is not None else RunTable()
        # None: replays off (replay_ttl_s = 0).
        self.replays = ReplayStore(replay_ttl_s, replay_entries) if replay_ttl_s > 0 else None
        # With replays off, the ids settled lately (this async interface only: the handler's
        # in-process path settles each call once, inline).
        self._settled: OrderedDict[tuple[str, str], None] = OrderedDict()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def run_open(self, run: str, limits: RunLimits, key: str | None) -> RunUsage:
        return self.runs.open_run(run, limits, key).snapshot()

    async def run_close(self, run: str, key: str | None) -> RunUsage:
        return self.runs.close(run, key).snapshot()

    async def usage(self, run: str) -> RunUsage:
        return self.runs.get(run).snapshot()

    async def runs_open(self) -> int:
        return len(self.runs.open)

    async def admit(
        self, run: str, key: str | None, rid: str, model: str, max_tokens: int, timeout_s: float
    ) -> Admission:
        held = self.runs.held(run, key)
        if self.replays is not None:
            replay = self.replays.get(run, rid, model)
            if replay is not None:
                return Admission(max_tokens, timeout_s, replay)
        max_tokens, timeout_s = held.admit_call(max_tokens, timeout_s)
        return Admission(max_tokens, timeout_s)

    async def admit_cached(self, run: str, key: str | None) -> None:
        self.runs.held(run, key).admit_cached()

    async def settle(
        self, run: str, rid: str, model: str, usage: Usage | None, cost_usd: float, reply: bytes | None
    ) -> None:
        held = self.runs.find(run)
        if held is None or (self.replays is not None and (run, rid) in self.replays):
            return  # forgotten, or settled already
        if self.replays is None:  # no replies kept: remember the id alone, as Redis does
            if (run, rid) in self._settled:
                return
            self._settled[(run, rid)] = None
            if len(self._settled) > SETTLED_IDS:
                self._settled.popitem(last=False)
        held.finish(usage, cost_usd)
        if usage is not None and reply is not None and self.replays is not None:
            self.replays.put(run, rid, model, reply)

    def pacer(self, alias: str, kind: str, per_minute: float) -> Pacer:
        return TokenBucket(per_minute)

    def cache(self, alias: str, max_entries: int) -> CacheStore | None:
        return None
