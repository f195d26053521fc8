"""Per-run accounting and hard budgets.

A run is opened with limits (``run_open``); every ``complete`` carrying its id, from any process
and any depth, is checked before it is sent and counted when it ends. A run never opened is not
opened by a call that names it: that call is refused (``unknown_run``), so nothing is spent
outside a budget. A run opened with a ``key`` belongs to whoever holds the key: calls, reopens
and closes that do not show it are refused as if the run did not exist. A call is reserved at
admission, so ``max_calls`` holds exactly even with thousands in flight. Token and cost limits
are checked against what finished calls spent; calls already in flight when a limit is reached
may overshoot it by their own usage, and the request's ``max_tokens`` is clamped to the output
tokens left so a single call cannot blow far past ``max_output_tokens``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from rlmq.protocol import ErrorCode, RunLimits, RunUsage, Usage

from .errors import HandlerError, UnknownRun

__all__ = [
    "BudgetExceeded",
    "Run",
    "RunClosed",
    "RunTable",
    "not_yours_message",
    "refusal_message",
    "unknown_run_message",
]

# Closed runs are remembered so late sub-calls get `run_closed`, and so `usage` still answers.
MAX_CLOSED_RUNS = 10_000


class BudgetExceeded(HandlerError):
    """A run's limit (``limit`` names it) refuses the call."""

    code = ErrorCode.BUDGET_EXCEEDED

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message, retryable=False)
        self.limit = limit


class RunClosed(HandlerError):
    """A call for a run that ``run_close`` has closed."""

    code = ErrorCode.RUN_CLOSED  # not retryable: the default of its code


@dataclass(slots=True)
class Run:
    id: str
    limits: RunLimits = field(default_factory=RunLimits)
    opened: float = field(default_factory=time.monotonic)
    calls: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    in_flight: int = 0
    # Token totals as plain ints: adding a frozen Usage per finished call costs more than the call.
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    closed: bool = False
    exceeded: str | None = None
    key: str | None = field(default=None, repr=False)  # the opener's secret; None: shared by id

    def held_by(self, key: str | None) -> bool:
        """Whether a caller showing ``key`` may use this run (any caller, for a run without one)."""
        return self.key is None or self.key == key

    @property
    def usage(self) -> Usage:
        return Usage(self.input_tokens, self.output_tokens, self.cache_read_tokens, self.cache_write_tokens)

    def _refuse(self, limit: str, used: float) -> BudgetExceeded:
        if self.exceeded is None:
            self.exceeded = limit
        return BudgetExceeded(limit, f"run {self.id!r}: {refusal_message(limit, self.limits, used)}")

    def admit(self) -> None:
        """Check the limits and reserve one call, or raise ``BudgetExceeded``/``RunClosed``."""
        if self.closed:
            raise RunClosed(f"run {self.id!r} is closed")
        lim = self.limits
        if lim.deadline_s is not None and time.monotonic() - self.opened >= lim.deadline_s:
            raise self._refuse("deadline_s", 0)
        if lim.max_calls is not None and self.calls >= lim.max_calls:
            raise self._refuse("max_calls", self.calls)
        if lim.max_input_tokens is not None and self.input_tokens >= lim.max_input_tokens:
            raise self._refuse("max_input_tokens", self.input_tokens)
        if lim.max_output_tokens is not None and self.output_tokens >= lim.max_output_tokens:
            raise self._refuse("max_output_tokens", self.output_tokens)
        if lim.max_cost_usd is not None and self.cost_usd >= lim.max_cost_usd:
            raise self._refuse("max_cost_usd", self.cost_usd)
        self.calls += 1
        self.in_flight += 1

    def admit_call(self, max_tokens: int, timeout_s: float) -> tuple[int, float]:
        """``admit``, then the call's ``max_tokens`` clamped to the output tokens left and its
        timeout to the run's deadline."""
        self.admit()
        lim = self.limits
        if lim.max_output_tokens is not None:
            max_tokens = max(1, min(max_tokens, lim.max_output_tokens - self.output_tokens))
        if lim.deadline_s is not None:
            timeout_s = min(timeout_s, max(0.0, lim.deadline_s - (time.monotonic() - self.opened)))
        return max_tokens, timeout_s

    def admit_cached(self) -> None:
        """A cache hit is free: it needs an open run but spends nothing."""
        if self.closed:
            raise RunClosed(f"run {self.id!r} is closed")
        self.cached_calls += 1

    def clamp_max_tokens(self, max_tokens: int) -> int:
        if self.limits.max_output_tokens is None:
            return max_tokens
        return max(1, min(max_tokens, self.limits.max_output_tokens - self.output_tokens))

    def remaining_s(self) -> float | None:
        if self.limits.deadline_s is None:
            return None
        return max(0.0, self.limits.deadline_s - (time.monotonic() - self.opened))

    def finish(self, usage: Usage | None, cost_usd: float) -> None:
        """Account one admitted call; ``usage=None`` for a call that failed."""
        self.in_flight -= 1
        if usage is None:
            self.failed_calls += 1
            return
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cache_read_tokens += usage.cache_read_tokens
        self.cache_write_tokens += usage.cache_write_tokens
        self.cost_usd += cost_usd

    def snapshot(self) -> RunUsage:
        return RunUsage(
            run=self.id,
            calls=self.calls,
            cached_calls=self.cached_calls,
            failed_calls=self.failed_calls,
            usage=self.usage,
            cost_usd=round(self.cost_usd, 9),
            elapsed_s=round(time.monotonic() - self.opened, 6),
            limits=self.limits,
            closed=self.closed,
            exceeded=self.exceeded,
            in_flight=self.in_flight,
        )


class RunTable:
    """Open runs, and a bounded memory of closed ones."""

    def __init__(self) -> None:
        self.open: dict[str, Run] = {}
        self.closed: OrderedDict[str, Run] = OrderedDict()

    def open_run(self, run_id: str, limits: RunLimits, key: str | None = None) -> Run:
        """Open a run, or update the limits of an open one. A run held under a key is reopened
        (and a closed one opened again) only by a caller showing that key: ``UnknownRun``."""
        held = self.find(run_id)
        if held is not None and held.key != key:
            raise UnknownRun(not_yours_message(run_id))
        self.closed.pop(run_id, None)
        run = self.open.get(run_id)
        if run is None:
            run = self.open[run_id] = Run(run_id, limits, key=key)
        else:
            run.limits = limits
        return run

    def get(self, run_id: str) -> Run:
        """The run of this id (open, or closed and remembered); ``UnknownRun`` when there is none."""
        run = self.open.get(run_id) or self.closed.get(run_id)
        if run is None:
            raise UnknownRun(unknown_run_message(run_id))
        return run

    def held(self, run_id: str, key: str | None) -> Run:
        """The run a call names, if the caller holds it; else ``UnknownRun`` (never opened here,
        forgotten, lost with a restart, or held under another key)."""
        run = self.open.get(run_id) or self.closed.get(run_id)
        if run is None:
            raise UnknownRun(unknown_run_message(run_id))
        if run.key is not None and run.key != key:
            raise UnknownRun(not_yours_message(run_id))
        return run

    def find(self, run_id: str) -> Run | None:
        return self.open.get(run_id) or self.closed.get(run_id)

    def close(self, run_id: str, key: str | None = None) -> Run:
        """Close a run the caller holds (``UnknownRun`` otherwise); closing it again is harmless."""
        run = self.held(run_id, key)
        if run.closed:
            return run
        del self.open[run_id]
        run.closed = True
        self.closed[run_id] = run
        while len(self.closed) > MAX_CLOSED_RUNS:
            self.closed.popitem(last=False)
        return run


def refusal_message(limit: str, lim: RunLimits, used: float) -> str:
    """Why ``limit`` refuses a call, ``used`` being what the run has spent of it."""
    if limit == "deadline_s":
        return f"deadline of {lim.deadline_s:g} s has passed"
    if limit == "max_calls":
        return f"call limit of {lim.max_calls} reached"
    if limit == "max_input_tokens":
        return f"input token limit of {lim.max_input_tokens} reached ({int(used)} used)"
    if limit == "max_output_tokens":
        return f"output token limit of {lim.max_output_tokens} reached ({int(used)} used)"
    return f"cost limit of ${lim.max_cost_usd:g} reached (${used:.6g} spent)"


def unknown_run_message(run_id: str) -> str:
    return (
        f"run {run_id!r} is not open on this handler (never opened, or lost when the handler "
        "restarted with in-process state); open it with run_open first"
    )


def not_yours_message(run_id: str) -> str:
    return f"run {run_id!r} is held by another client: the request does not show the run's key"
