"""What a task is, and the one entry point that makes one: ``generate(name, length_tokens, ...)``.

A task is made from its name, its length, a seed and its index alone (``random.Random`` seeded
with a string is the same on every machine and every run), so an eval can be interrupted,
resumed and compared across models. Each task carries its gold answer and the generator's
labels (where the needles are, which class each record is), so tests can check the gold with a
solver of their own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "CHARS_PER_TOKEN",
    "MAX_TOKENS",
    "MIN_TOKENS",
    "TASKS",
    "AnswerKind",
    "Gold",
    "Needle",
    "RecordLabels",
    "SniahLabels",
    "Task",
    "generate",
    "task_rng",
]

# The handler's own estimate when no provider count exists (lmhandler/backends/base.py).
CHARS_PER_TOKEN = 4
MIN_TOKENS = 1_000
MAX_TOKENS = 10_000_000


class AnswerKind(StrEnum):
    """How an answer is scored (rlmq.eval.scoring)."""

    EXACT = "exact"  # normalised exact match
    NUMBER = "number"  # 0.75 ** |error|
    PAIRS = "pairs"  # F1 over pairs of user ids
    SET = "set"  # a list in any order: exact match of the normalised set of items
    LIST = "list"  # a list in the asked order: exact match of the normalised items in order


# EXACT: str, NUMBER: int, PAIRS: frozenset of (smaller, larger), SET: frozenset[str], LIST: tuple[str, ...]
Gold = str | int | frozenset[tuple[int, int]] | frozenset[str] | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Needle:
    """A sentence the generator placed: the key's current value, or a decoy value for it."""

    key: str
    value: str
    line: int  # 0-based line of the context
    current: bool  # False: a retired, guessed or denied value (a decoy)


@dataclass(frozen=True, slots=True)
class SniahLabels:
    needles: tuple[Needle, ...]


@dataclass(frozen=True, slots=True)
class RecordLabels:
    """Record ``i`` is context line ``i``: its user id, its day (0 = the first day of the data's
    calendar, ``rlmq.eval.oolong.FIRST_DAY``) and its class (an index into ``oolong.LABELS``)."""

    users: tuple[int, ...]
    days: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True, slots=True, eq=False)
class Task:
    name: str
    length_tokens: int  # asked for; the context is within a line of it
    seed: int
    index: int
    query: str
    context: str
    gold: Gold
    kind: AnswerKind
    spec: Mapping[str, Any]  # the question as data, JSON-able
    labels: SniahLabels | RecordLabels

    @property
    def id(self) -> str:
        return task_id(self.name, self.length_tokens, self.seed, self.index)

    @property
    def context_tokens(self) -> int:
        return len(self.context) // CHARS_PER_TOKEN

    def gold_json(self) -> Any:
        """The gold answer as JSON: pairs become a sorted list of ``[a, b]``, a set a sorted list,
        a list a list."""
        gold = self.gold
        if isinstance(gold, tuple):
            return list(gold)
        if isinstance(gold, frozenset):
            return sorted(list(item) if isinstance(item, tuple) else item for item in gold)
        return gold


def task_id(name: str, length_tokens: int, seed: int, index: int) -> str:
    return f"{name}-{length_tokens}-s{seed}-{index}"


def task_rng(name: str, length_tokens: int, seed: int, index: int) -> random.Random:
    """The task's own generator: a string seed is hashed with SHA-512, the same everywhere."""
    return random.Random(f"rlmq-eval:{task_id(name, length_tokens, seed, index)}")


def _generators() -> Mapping[str, Callable[[str, int, int, int], Task]]:
    from . import oolong, sniah

    return {"sniah": sniah.make, "oolong": oolong.make_oolong, "oolong-pairs": oolong.make_pairs}


TASKS = ("sniah", "oolong", "oolong-pairs")


def generate(name: str, length_tokens: int, *, seed: int = 0, index: int = 0) -> Task:
    """Task ``index`` of ``name`` at about ``length_tokens`` tokens (4 characters a token)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    if not MIN_TOKENS <= length_tokens <= MAX_TOKENS:
        raise ValueError(f"length must be between {MIN_TOKENS:,} and {MAX_TOKENS:,} tokens")
    return _generators()[name](name, length_tokens, seed, index)
