"""A run's key and budget, kept by the orchestrator so that a handler restart cannot unbound it.

``GuardedModels`` wraps the handler client of a run (``AsyncHandlerClient``) and is the loop's
``ModelClient``; ``GuardedSandbox`` wraps the pool client and is the loop's ``Sandbox``:

- ``run_open`` opens the run with a fresh secret key: the handler then serves the run only to
  callers that show it. This client shows it on its own calls; the pool, given it at session
  open, shows it on the session's sub-calls. The model's code never holds it.
- The run's usage is followed as it goes: the handler's totals (``usage``, asked after every
  model call and every exec) plus what was seen since (this client's replies, the execs'
  ``llm_calls``).
- A call refused with ``unknown_run`` means the handler no longer holds the run (it restarted,
  or forgot it). When a handler of the front still holds it (shared state: every handler sees
  the run, its limits and its usage), the call is only sent again. Otherwise the run is
  reopened, under the same key, with what is left of each limit, and the call sent again.
  Nothing left, or the run taken by someone else: the run fails with a typed error
  (``BudgetSpent``, code ``budget_exceeded``; ``RunLost``, code ``unknown_run``). Never
  unlimited.
- ``run_close`` and ``usage`` answer the whole run's totals, every handler incarnation included.

What is exact: calls (an exec's ``llm_calls`` counts every sub-call it made, so calls served
by the lost handler after its last report are counted too, conservatively). Tokens and cost come
from the handler's reports; those of sub-calls served after its last report and before it died
are not known to anyone any more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlmq.protocol import (
    AsyncHandlerClient,
    ChatMessage,
    CompleteReply,
    ErrorCode,
    RemoteError,
    RunLimits,
    RunUsage,
    Usage,
)
from rlmq.protocol.sandbox import AsyncSandboxClient, ExecResult, Replay, SubCall, ToolCallback

from .errors import RunError
from .interfaces import RlmCallback, SandboxSession

__all__ = ["BudgetSpent", "GuardedModels", "GuardedSandbox", "RunLost"]

log = logging.getLogger(__name__)


class BudgetSpent(RunError):
    """The handler lost the run and nothing of one of its limits is left to reopen it with."""

    code = ErrorCode.BUDGET_EXCEEDED  # not retryable: the default of its code


class RunLost(RunError):
    """The handler lost the run and it could not be reopened under its key."""

    code = ErrorCode.UNKNOWN_RUN  # not retryable: the default of its code


@dataclass(slots=True)
class _Totals:
    calls: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0

    @classmethod
    def of(cls, u: RunUsage) -> _Totals:
        return cls(
            u.calls,
            u.cached_calls,
            u.failed_calls,
            u.usage.input_tokens,
            u.usage.output_tokens,
            u.usage.cache_read_tokens,
            u.usage.cache_write_tokens,
            u.cost_usd,
        )

    def __add__(self, o: _Totals) -> _Totals:
        return _Totals(
            *(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(o), strict=True))
        )

    def __sub__(self, o: _Totals) -> _Totals:
        return _Totals(
            *(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(o), strict=True))
        )


@dataclass(slots=True)
class _Book:
    """One run as this orchestrator follows it."""

    limits: RunLimits
    key: str
    opened: float
    carried: _Totals = field(default_factory=_Totals)  # spent under earlier handler incarnations
    seen: _Totals = field(default_factory=_Totals)  # the current handler's last report
    observed: _Totals = field(default_factory=_Totals)  # everything seen here, ever (monotonic)
    mark: _Totals = field(default_factory=_Totals)  # ``observed`` when ``seen`` was asked for
    last: RunUsage | None = None
    generation: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def used(self) -> _Totals:
        return self.carried + self.seen + (self.observed - self.mark)


class GuardedModels:
    """The loop's ``ModelClient``: an ``AsyncHandlerClient`` whose runs have keys and survive a
    handler restart with what is left of their budget (see the module docstring)."""

    def __init__(self, client: AsyncHandlerClient, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.clock = clock
        self._books: dict[str, _Book] = {}
        self._reopened: dict[str, int] = {}

    def key_of(self, run: str) -> str | None:
        """The key of a run this client opened (for the pool, at session open)."""
        book = self._books.get(run)
        return None if book is None else book.key

    def reopens(self, run: str) -> int:
        """How many times the run was reopened after the handler lost it (kept after its close)."""
        return self._reopened.get(run, 0)

    async def run_open(self, run: str, limits: RunLimits | None = None) -> RunUsage:
        limits = limits or RunLimits()
        book = self._books.get(run)
        key = book.key if book is not None else secrets.token_urlsafe(24)
        usage = await self.client.run_open(run, limits, key=key)
        if book is None:
            self._books[run] = _Book(limits, key, self.clock(), seen=_Totals.of(usage), last=usage)
        else:
            book.limits = limits
        return usage

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        /,
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        timeout_s: float | None = None,
        run: str | None = None,
        depth: int | None = None,
    ) -> CompleteReply:
        book = self._books.get(run) if run is not None else None

        async def send() -> CompleteReply:
            return await self.client.complete(
                messages,
                model=model,
                max_tokens=max_tokens,
                temperature=temperature,
                timeout_s=timeout_s,
                run=run,
                depth=depth,
            )

        if book is None or run is None:
            return await send()
        generation = book.generation
        try:
            reply = await send()
        except RemoteError as exc:
            if exc.code != ErrorCode.UNKNOWN_RUN:
                raise
            await self._reopen(run, book, generation)
            reply = await send()
        u = reply.usage
        book.observed = book.observed + _Totals(
            calls=0 if reply.cached else 1,
            cached_calls=1 if reply.cached else 0,
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            cache_read_tokens=u.cache_read_tokens,
            cache_write_tokens=u.cache_write_tokens,
        )
        await self.refresh(run)
        return reply

    def note_sub_calls(self, run: str, calls: int) -> None:
        """An exec of the run's sessions made ``calls`` sub-calls (its ``llm_calls``)."""
        book = self._books.get(run)
        if book is not None and calls:
            book.observed = book.observed + _Totals(calls=calls)

    async def refresh(self, run: str) -> None:
        """Take the handler's totals of the run as the new base; a handler that lost the run says
        nothing here (the next call reopens it)."""
        book = self._books.get(run)
        if book is None:
            return
        mark, generation = book.observed, book.generation
        try:
            usage = await self.client.usage(run)
        except RemoteError as exc:
            if exc.code == ErrorCode.UNKNOWN_RUN:
                return
            raise
        if book.generation == generation:  # not reopened meanwhile: this report is of this incarnation
            book.seen, book.mark, book.last = _Totals.of(usage), mark, usage

    async def _reopen(self, run: str, book: _Book, generation: int) -> None:
        async with book.lock:
            if book.generation != generation:
                return  # another call of this run reopened it already
            if await self._still_held(run):
                return  # shared state: the run is whole; reopening would double-count its usage
            used = book.used()
            limits, spent = self._left(book, used)
            if spent is not None:
                raise BudgetSpent(
                    f"run {run!r}: the handler no longer holds the run (did it restart?) and its "
                    f"{spent} is spent ({used.calls} calls so far); it is not reopened"
                )
            try:
                usage = await self.client.run_open(run, limits, key=book.key)
            except RemoteError as exc:
                if exc.code == ErrorCode.UNKNOWN_RUN:
                    raise RunLost(
                        f"run {run!r} was lost by the handler and is now held by another client"
                    ) from None
                raise
            book.carried, book.seen, book.mark, book.last = used, _Totals.of(usage), book.observed, usage
            book.generation += 1
            self._reopened[run] = self._reopened.get(run, 0) + 1
            log.warning(
                "run %s: the handler no longer held it (restarted?); reopened with what was left: %s",
                run,
                limits.to_wire(),
            )

    async def _still_held(self, run: str) -> bool:
        """Whether a handler of the front holds the run after all. With shared state (Redis) a
        run outlives any one handler, and the ``unknown_run`` came from a moment of doubt (a
        handler starting, a re-send racing the run's open): the call is only sent again. With
        in-process state the restarted handler knows nothing of it, and the run is reopened."""
        try:
            await self.client.usage(run)
        except RemoteError as exc:
            if exc.code == ErrorCode.UNKNOWN_RUN:
                return False
            raise
        return True

    def _left(self, book: _Book, used: _Totals) -> tuple[RunLimits, str | None]:
        """What is left of each limit, and the first one with nothing left (None: all have some)."""
        lim = book.limits

        def left(limit: float | None, spent: float) -> float | None:
            return None if limit is None else limit - spent

        calls = left(lim.max_calls, used.calls)
        tokens_in = left(lim.max_input_tokens, used.input_tokens)
        tokens_out = left(lim.max_output_tokens, used.output_tokens)
        cost = left(lim.max_cost_usd, used.cost_usd)
        deadline = left(lim.deadline_s, self.clock() - book.opened)
        for name, value in (
            ("max_calls", calls),
            ("max_input_tokens", tokens_in),
            ("max_output_tokens", tokens_out),
            ("max_cost_usd", cost),
            ("deadline_s", deadline),
        ):
            if value is not None and value <= 0:
                return lim, name
        remaining = RunLimits(
            max_calls=None if calls is None else int(calls),
            max_input_tokens=None if tokens_in is None else int(tokens_in),
            max_output_tokens=None if tokens_out is None else int(tokens_out),
            max_cost_usd=cost,
            deadline_s=deadline,
        )
        return remaining, None

    def _whole(self, run: str, book: _Book) -> RunUsage:
        """The run's totals over every handler incarnation, as a ``RunUsage``."""
        t = book.used()
        last = book.last
        return RunUsage(
            run=run,
            calls=t.calls,
            cached_calls=t.cached_calls,
            failed_calls=t.failed_calls,
            usage=Usage(t.input_tokens, t.output_tokens, t.cache_read_tokens, t.cache_write_tokens),
            cost_usd=round(t.cost_usd, 9),
            elapsed_s=round(self.clock() - book.opened, 6),
            limits=book.limits,
            closed=last.closed if last is not None else False,
            exceeded=last.exceeded if last is not None else None,
            in_flight=last.in_flight if last is not None else 0,
        )

    async def run_close(self, run: str) -> RunUsage:
        book = self._books.get(run)
        if book is None:
            return await self.client.run_close(run)
        mark, generation = book.observed, book.generation
        try:
            final = await self.client.run_close(run)
        except RemoteError as exc:
            if exc.code != ErrorCode.UNKNOWN_RUN:
                raise
            # Lost with the handler and never reopened: what was seen here is the total.
        else:
            if book.generation == generation:
                book.seen, book.mark, book.last = _Totals.of(final), mark, final
        del self._books[run]
        return dataclasses.replace(self._whole(run, book), closed=True)

    async def usage(self, run: str) -> RunUsage:
        book = self._books.get(run)
        if book is None:
            return await self.client.usage(run)
        await self.refresh(run)
        return self._whole(run, book)


class _GuardedSession:
    """A session whose execs report their sub-calls to the run's book."""

    def __init__(self, session: SandboxSession, models: GuardedModels, run: str) -> None:
        self._session = session
        self._models = models
        self._run = run

    async def exec(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        on_sub_call: Callable[[SubCall], None] | None = None,
        record_chars: int | None = None,
        replay: Replay | None = None,
    ) -> ExecResult:
        result = await self._session.exec(
            code, timeout_s=timeout_s, on_sub_call=on_sub_call, record_chars=record_chars, replay=replay
        )
        self._models.note_sub_calls(self._run, result.llm_calls)
        await self._models.refresh(self._run)
        return result

    async def close(self) -> None:
        await self._session.close()

    def __getattr__(self, name: str) -> Any:  # info, id, ...: the session's own
        return getattr(self._session, name)


class GuardedSandbox:
    """The loop's ``Sandbox``: sessions opened with the run's key (the pool shows it on their
    sub-calls), whose execs keep the run's book current."""

    def __init__(self, client: AsyncSandboxClient, models: GuardedModels) -> None:
        self.client = client
        self.models = models

    async def open(
        self,
        *,
        run: str,
        context: Any,
        depth: int,
        max_depth: int,
        sub_model: str,
        exec_timeout_s: float | None,
        max_output_chars: int | None,
        on_rlm_query: RlmCallback | None,
        tools: Sequence[str] = (),
        on_tool_call: ToolCallback | None = None,
        sandbox_modules: Sequence[str] = (),
    ) -> SandboxSession:
        """Host-side tools and ``sandbox_modules`` go to the pool as they are (the loop gives
        them only when a run has some)."""
        session = await self.client.open(
            run=run,
            context=context,
            depth=depth,
            max_depth=max_depth,
            sub_model=sub_model,
            exec_timeout_s=exec_timeout_s,
            max_output_chars=max_output_chars,
            on_rlm_query=on_rlm_query,
            run_key=self.models.key_of(run),
            tools=tools,
            on_tool_call=on_tool_call,
            sandbox_modules=sandbox_modules,
        )
        return _GuardedSession(session, self.models, run)
