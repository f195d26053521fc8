"""Shared handler state: runs and budgets, finished replies, pacing, cache (in-process or Redis).

``base`` holds the interface (``State``, ``Pacer``, ``CacheStore``) and ``StateUnavailable``
(wire code ``unavailable``); ``memory.MemoryState`` is the embedded default, ``redis.RedisState``
the shared one (``[state] url``). ``make_state`` picks by the config. docs/state.md tells why.
"""

from __future__ import annotations

from ..config import StateConfig
from .base import Admission, CacheStore, Pacer, State, StateUnavailable
from .memory import MemoryState, ReplayStore

__all__ = [
    "Admission",
    "CacheStore",
    "MemoryState",
    "Pacer",
    "ReplayStore",
    "State",
    "StateUnavailable",
    "make_state",
]


def make_state(config: StateConfig) -> State:
    """In-process state, or Redis at ``config.url`` (not connected yet: ``await state.start()``)."""
    if config.url is None:
        return MemoryState(replay_ttl_s=config.replay_ttl_s, replay_entries=config.replay_entries)
    from .redis import RedisState  # imported only where it is used: redis-py costs ~50 ms to load

    return RedisState(config)
