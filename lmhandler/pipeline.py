"""The request pipeline: what every ``complete`` goes through, in one place.

    admission   a run the caller does not hold (unknown_run: never opened here, or its key
                not shown) or no run where anonymous calls are off (unauthorized), unknown
                model, the handler's max_in_flight, a prompt over the model's context window
                (too_large, never sent), then the run's budgets (a call is reserved at
                admission; a closed run refuses)
    cache       identical requests share one backend call (single flight); hits are free
    shaping     circuit breaker, adaptive concurrency, rpm/tpm pacing
    retries     retryable errors, with backoff that honours Retry-After, within the retry
                budget and the request's deadline
    backend     one attempt: ``Backend.complete``
    accounting  the run's usage and cost, the model's counters, the reply

There is one path. How it is driven is the only thing that differs: a call to a backend that
answers at once (``echo``/``script`` at 0 ms, ``Backend.answers_at_once``) is stepped inline in
the receive loop (a task, a timer and a context switch cost more than the call itself); if it
suspends after all (a shared cache entry, a full concurrency limit, a backoff, a backend that
waited), a task carries the same coroutine on from where it stopped. Every other call runs as a
task from the start. Either way the same admission, the same counters (``in_flight`` included,
which ``max_in_flight`` reads) and the same retry budget apply.

Every way a call can fail is a ``HandlerError`` with its wire code; the server turns it into the
error reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from time import monotonic
from typing import Any

from rlmq.protocol import CompleteRequest, ErrorCode, RlmqError, Usage, tracing
from rlmq.protocol.codec import encode_complete_reply

from .accounting import Run, RunTable
from .backends import Backend, BackendError, BackendRequest, Completion, estimate_tokens
from .cache import ResponseCache, cache_key
from .config import OFFLINE_CONCURRENCY, OFFLINE_CONTEXT_WINDOW_TOKENS, HandlerConfig, ModelConfig
from .deadlines import DeadlineWheel
from .errors import (
    AnonymousRefused,
    HandlerError,
    Overloaded,
    PromptTooLarge,
    RequestTimeout,
    ShuttingDown,
    UnknownModel,
)
from .pacing import TokenBucket
from .shaping import AdaptiveLimit, CircuitBreaker, CircuitOpen, RetryBudget
from .state import Admission, MemoryState, Pacer, State
from .state.base import encode_replayed
from .stats import ModelStats, ServerStats, trace_complete

__all__ = ["Model", "Pipeline", "too_large_message"]

log = logging.getLogger(__name__)

Payload = bytes | memoryview
# Where a call's outcome goes: its encoded reply, or the error it ended in.
Reply = Callable[[list[Any], Payload], None]
Fail = Callable[[list[Any], str, RlmqError], None]

# Failures that say the provider is down (not busy, not refusing this request).
# How long a settlement that failed (the shared state away) is retried in the background.
SETTLE_RETRY_S = 60.0

_DOWN_CODES = frozenset({ErrorCode.BACKEND_ERROR, ErrorCode.TIMEOUT})


_ANONYMOUS_OFF = (
    "this handler serves only calls that name an open run (allow_anonymous is off): open a run "
    "with run_open and name it in the call"
)


def too_large_message(alias: str, chars: int, window: int) -> str:
    """What a caller is told of a prompt over ``alias``'s window (4 characters a token)."""
    tokens = -(-chars // 4)
    return (
        f"the prompt for {alias!r} is about {tokens:,} tokens ({chars:,} characters), over its "
        f"context window of {window:,} tokens; nothing was sent. Split it into chunks of at most "
        f"about {window * 3:,} characters and send each separately (llm_query_batched)"
    )


class Model:
    """A configured alias with everything the pipeline keeps for it."""

    def __init__(self, config: ModelConfig, backend: Backend, state: State | None = None) -> None:
        self.config = config
        self.backend = backend
        # In flight to the provider: starts at max_concurrency, shrinks when 429/529s dominate.
        self.slots = AdaptiveLimit(config.max_concurrency, minimum=min(4, config.max_concurrency))
        self.breaker = CircuitBreaker(
            threshold=config.breaker_threshold, cooldown_s=config.breaker_cooldown_s
        )
        self.retry_budget = RetryBudget(config.retry_budget_ratio)
        # Shared state paces and caches for every handler of its store; in-process, this one alone.
        shared = state if state is not None and not state.local else None
        self.cache: ResponseCache | None = None
        if config.cache_entries > 0:
            store = shared.cache(config.alias, config.cache_entries) if shared is not None else None
            self.cache = ResponseCache(config.cache_entries, store)
        self.rpm: Pacer | None = None
        self.tpm: Pacer | None = None
        if config.rpm:
            self.rpm = shared.pacer(config.alias, "rpm", config.rpm) if shared else TokenBucket(config.rpm)
        if config.tpm:
            self.tpm = shared.pacer(config.alias, "tpm", config.tpm) if shared else TokenBucket(config.tpm)
        self.stats = ModelStats()
        prices = (
            config.price_in_per_mtok,
            config.price_out_per_mtok,
            config.price_cache_read_per_mtok,
            config.price_cache_write_per_mtok,
        )
        self._free = not any(prices)  # cost is 0 whatever the usage: skip the arithmetic
        # Stepped inline in the receive loop rather than started as a task (see the docstring).
        # Never with shared state: it waits for Redis at once, and its timeouts need a task.
        self.inline = backend.answers_at_once and shared is None
        # Breaker, adaptive concurrency and retry budget protect a provider; an offline backend
        # has none, unless its concurrency was limited on purpose (a load test of the queue).
        self.shaped = backend.has_provider or config.max_concurrency < OFFLINE_CONCURRENCY
        # A prompt longer than this (4 characters a token) is refused at admission; None: no
        # limit worth a sum over the messages (the offline backends read anything).
        window = config.context_window_tokens
        self.window_chars = window * 4 if window < OFFLINE_CONTEXT_WINDOW_TOKENS else None

    def cost_usd(self, usage: Usage) -> float:
        if self._free:
            return 0.0
        return self.config.cost_usd(
            usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            **self.stats.to_wire(),
            "concurrency": self.slots.to_wire(),
            "breaker": self.breaker.to_wire(),
            "retry_budget": self.retry_budget.to_wire(),
        }


class _Call:
    """One ``complete`` on its way through the pipeline."""

    __slots__ = (
        "booked",
        "deadline",
        "envelope",
        "flying",
        "model",
        "req",
        "run",
        "shared",
        "slot",
        "started",
        "task",
    )

    def __init__(self, envelope: list[Any], req: CompleteRequest, model: Model, booked: Run | None) -> None:
        self.envelope = envelope
        self.req = req
        self.model = model
        self.booked = booked  # the run the request names, found (and its key checked) at submit
        self.started = monotonic()
        self.run: Run | None = None  # admitted to this run, which must be told how the call ended
        self.task: asyncio.Task[None] | None = None  # None while stepped inline
        self.deadline: float | None = None  # set while the call is relayed (retries included)
        self.slot: int | None = None  # its place in the deadline wheel, once a task runs it
        self.shared = False  # reserved in its run in the shared state, which must be told how it ended
        # Its (run, request id) in the pipeline's table of calls in flight, while it is listed there.
        self.flying: tuple[str, str] | None = None


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], waiting_on: Any) -> Generator[Any, Any, None]:
    """Carry on, inside a task, a coroutine that was stepped inline and suspended on ``waiting_on``."""
    while True:
        try:
            value = yield waiting_on
        except BaseException as exc:  # cancellation and the like go to the coroutine
            try:
                waiting_on = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting_on = coro.send(value)
            except StopIteration:
                return


class Pipeline:
    """Admit, shape, retry, relay and account every ``complete``; outcomes go to ``reply``/``fail``.

    ``sleep`` is what backoff waits with; ``rng`` draws the jitter (both replaceable in tests).
    ``allow_anonymous``: whether a call naming no run is served (the handler decides: on for
    loopback and ipc, off with CURVE).
    """

    def __init__(
        self,
        config: HandlerConfig,
        models: Mapping[str, Model],
        runs: RunTable,
        stats: ServerStats,
        *,
        loop: asyncio.AbstractEventLoop,
        reply: Reply,
        fail: Fail,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        allow_anonymous: bool = True,
        state: State | None = None,
    ) -> None:
        self.config = config
        self.allow_anonymous = allow_anonymous
        self.models = models
        self.runs = runs
        if state is None:
            st = config.state
            state = MemoryState(runs, replay_ttl_s=st.replay_ttl_s, replay_entries=st.replay_entries)
        self.state = state
        # In-process state is called directly (plain functions: the zero-latency path); shared
        # state through its async interface, one round trip at admission and one at the end.
        self._shared = None if state.local else state
        self._replays = state.replays if isinstance(state, MemoryState) else None
        self.replayed = 0  # re-sent requests answered with the reply of their call (finished or joined)
        # In-process: the calls with a run that wait (a task runs them) by (run, request id), with
        # the envelopes of re-sends of that id that joined them; the outcome goes to those too.
        self._flying: dict[tuple[str, str], tuple[_Call, list[list[Any]]]] = {}
        self.late_settlements = 0  # settlements that failed at first and went through on a retry
        self.stats = stats
        self._loop = loop
        self._reply = reply
        self._fail = fail
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._max_in_flight = config.max_in_flight
        self.deadlines = DeadlineWheel(loop)
        self.tasks: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        self.deadlines.close()
        self._flying.clear()  # a task cancelled before its first step never ran to remove its entry

    # ------------------------------------------------------------ driving

    def submit(self, envelope: list[Any], req: CompleteRequest) -> None:
        """Take a ``complete`` from the receive loop: refuse it, answer it inline, or start it."""
        in_flight = self.stats.in_flight
        if in_flight >= self._max_in_flight:
            limit = self._max_in_flight
            error = Overloaded(f"handler has {in_flight} requests in flight (limit {limit})")
            self._fail(envelope, req.id, error)
            return
        booked: Run | None = None
        if req.run is not None:
            if self._shared is None:
                # One dict lookup and a key comparison: a run is spent only by whoever holds it.
                try:
                    booked = self.runs.held(req.run, req.key)
                except HandlerError as exc:
                    self._fail(envelope, req.id, exc)
                    return
                # A re-sent request whose call finished: its reply again, not a second call.
                if self._replays is not None:
                    kept = self._replays.get(req.run, req.id, req.model)
                    if kept is not None:
                        self.replayed += 1
                        self._reply(envelope, kept)
                        return
                # Re-sent while its call still runs here (the caller lost its connection and came
                # back): it joins that call, which answers it too. Counted once, paid once.
                flying = self._flying.get((req.run, req.id))
                if flying is not None and flying[0].req.model == req.model:
                    flying[1].append(envelope)
                    return
        elif not self.allow_anonymous:
            self._fail(envelope, req.id, AnonymousRefused(_ANONYMOUS_OFF))
            return
        model = self.models.get(req.model)
        if model is None:
            configured = ", ".join(self.models)
            self._fail(envelope, req.id, UnknownModel(f"no model {req.model!r}; configured: {configured}"))
            return
        call = _Call(envelope, req, model, booked)
        coro = self._complete(call)
        if not model.inline:
            if booked is not None:
                self._fly(call, booked.id)
            self._track(call, self._loop.create_task(coro))
            return
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            return  # answered without waiting: no task, no timer
        # It waits after all: a task carries it on from where it stopped, under its deadline.
        # Only now is it listed in flight: a call answered at once cannot be re-sent meanwhile.
        if booked is not None:
            self._fly(call, booked.id)
        task = self._loop.create_task(_resume(coro, waiting_on))
        self._track(call, task)
        if call.deadline is not None:
            call.slot = self.deadlines.add(task, call.deadline)

    def _fly(self, call: _Call, run: str) -> None:
        """List a call with a run as in flight, so that a re-send of its id joins it."""
        key = (run, call.req.id)
        if key not in self._flying:  # else that id is in flight for another model: not a re-send
            self._flying[key] = (call, [])
            call.flying = key

    def _land(self, call: _Call, payload: Payload | None, exc: HandlerError | None) -> None:
        """Take a call off the in-flight table; its outcome goes to the re-sends that joined it,
        a success as a kept reply (``replayed``), an error as it is."""
        assert call.flying is not None
        _, joined = self._flying.pop(call.flying)
        call.flying = None
        if not joined:
            return
        if payload is not None:
            again = encode_replayed(payload)  # before the caller's reply: its buffer is read here
            for envelope in joined:
                self.replayed += 1
                self._reply(envelope, again)
        elif exc is not None:
            for envelope in joined:
                self._fail(envelope, call.req.id, exc)

    def _track(self, call: _Call, task: asyncio.Task[None]) -> None:
        call.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------ the path

    async def _complete(self, call: _Call) -> None:
        """The whole life of one ``complete``, from admission to the reply."""
        model, req = call.model, call.req
        mstats = model.stats
        self.stats.in_flight += 1
        mstats.in_flight += 1
        mstats.requests += 1
        try:
            if self._shared is not None:
                payload = await self._complete_shared(call, self._shared)
            elif model.cache is None:  # _relay without the cache, one coroutine layer fewer
                completion, retries = await self._attempts(call, self._admit(call))
                payload = self._account(call, completion, retries)
            else:
                payload = await self._through_cache(call, model.cache)
            mstats.ok += 1
            if call.flying is not None:
                self._land(call, payload, None)
            self._reply(call.envelope, payload)
        except HandlerError as exc:
            self._failed(call, exc)
        except asyncio.CancelledError:
            self._failed(call, ShuttingDown("handler shutting down", retryable=True))
        except Exception:  # the request's boundary (a task's, or the receive loop's inline step)
            log.exception("complete %s failed", req.id)
            self._failed(call, HandlerError("internal error in the handler"))
        finally:
            mstats.in_flight -= 1
            self.stats.in_flight -= 1
            if call.flying is not None:  # ended by neither a reply nor an error (closed unfinished)
                self._flying.pop(call.flying, None)
                call.flying = None

    def _failed(self, call: _Call, exc: HandlerError) -> None:
        if call.run is not None:  # admitted: the run counts it as a failed call
            call.run.finish(None, 0.0)
            call.run = None
        elif call.shared:  # the same in the shared state, without holding up the error reply
            call.shared = False
            self._settle_failed(call)
        call.model.stats.errors[exc.code] += 1
        if tracing.enabled():
            trace_complete(call.req, call.started, error=exc.code)
        if call.flying is not None:
            self._land(call, None, exc)
        self._fail(call.envelope, call.req.id, exc)

    async def _through_cache(self, call: _Call, cache: ResponseCache) -> Payload:
        """Serve a hit (or share an identical call in flight), else relay and fill the cache."""
        model, req = call.model, call.req
        key = cache_key(
            model.config.alias, req.messages, req.max_tokens or model.config.max_tokens, req.temperature
        )
        hit = cache.get(key)
        if hit is None and (pending := cache.pending(key)) is not None:
            with contextlib.suppress(asyncio.CancelledError):
                hit = await asyncio.shield(pending)
        if hit is not None:
            # Free for the run's budget, but the run must still be open.
            if call.booked is not None:
                call.booked.admit_cached()
            model.stats.cache_hits += 1
            return self._encode(call, hit, Usage(), cached=True, retries=0)
        return await self._relay(call, cache, key)

    async def _relay(self, call: _Call, cache: ResponseCache, key: bytes) -> Payload:
        """Admission, then the backend with retries, then accounting, while the cache holds the
        key as pending so identical calls wait for this one. Admission and accounting are plain
        functions: each coroutine layer costs a call stepped inline about half a microsecond."""
        backend_req = self._admit(call)
        flight = cache.begin(key)
        completion: Completion | None = None
        try:
            completion, retries = await self._attempts(call, backend_req)
        finally:
            cache.end(key, completion, flight)
        return self._account(call, completion, retries)

    def _admit(self, call: _Call, admitted: Admission | None = None) -> BackendRequest:
        """Refuse a prompt over the model's window (PromptTooLarge, before anything is reserved);
        reserve the call in its run (``max_calls`` holds exactly however many are in flight),
        or raise BudgetExceeded / RunClosed; clamp max_tokens and the timeout to what it has left.
        ``admitted``: the shared state has done the window check and the reservation already."""
        model, req = call.model, call.req
        cfg = model.config
        if admitted is None:
            _check_window(model, req)
            max_tokens = req.max_tokens or cfg.max_tokens
            timeout_s = req.timeout_s or cfg.timeout_s
            run = call.booked
            if run is not None:
                max_tokens, timeout_s = run.admit_call(max_tokens, timeout_s)
                call.run = run
        else:
            max_tokens, timeout_s = admitted.max_tokens, admitted.timeout_s
        call.deadline = call.started + timeout_s
        if model.shaped:
            model.retry_budget.on_request(call.started)
        return BackendRequest(cfg.model, req.messages, max_tokens, req.temperature, timeout_s, req.run)

    def _account(self, call: _Call, completion: Completion, retries: int) -> Payload:
        """Charge the run and the model for a call that succeeded; the encoded reply."""
        model = call.model
        usage = completion.usage
        cost = model.cost_usd(usage)
        run = call.run
        if run is not None:
            run.finish(usage, cost)
            call.run = None
        mstats = model.stats
        mstats.input_tokens += usage.input_tokens
        mstats.output_tokens += usage.output_tokens
        mstats.cost_usd += cost
        payload = self._encode(call, completion, usage, cached=False, retries=retries, cost_usd=cost)
        if run is not None and self._replays is not None:  # kept for a re-send of the same id
            self._replays.put(run.id, call.req.id, call.req.model, payload)
        return payload

    # ------------------------------------------------------------ shared state

    async def _complete_shared(self, call: _Call, state: State) -> Payload:
        """The same path with the run in shared state: the cache (if any), then admission in one
        round trip (it finds a finished reply of a re-sent id, or reserves the call), the
        backend, and settlement in one more before the reply goes out."""
        model, req = call.model, call.req
        cache, key = model.cache, b""
        if cache is not None:
            key = cache_key(
                model.config.alias, req.messages, req.max_tokens or model.config.max_tokens, req.temperature
            )
            hit = await cache.fetch(key)
            if hit is None and (pending := cache.pending(key)) is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    hit = await asyncio.shield(pending)
            if hit is not None:
                if req.run is not None:  # free, but the run must be open and held
                    await state.admit_cached(req.run, req.key)
                model.stats.cache_hits += 1
                return self._encode(call, hit, Usage(), cached=True, retries=0)
        _check_window(model, req)
        admitted = Admission(
            req.max_tokens or model.config.max_tokens, req.timeout_s or model.config.timeout_s
        )
        if req.run is not None:
            admitted = await state.admit(
                req.run, req.key, req.id, req.model, admitted.max_tokens, admitted.timeout_s
            )
            if admitted.replay is not None:
                self.replayed += 1
                return admitted.replay
            call.shared = True
        backend_req = self._admit(call, admitted)
        completion: Completion | None = None
        # Begun only now, after the awaits of admission: None if an identical call took the
        # lead meanwhile (this one goes on alone rather than taking the flight over).
        flight = cache.begin(key) if cache is not None else None
        try:
            completion, retries = await self._attempts(call, backend_req)
        finally:
            if cache is not None:
                cache.end(key, completion, flight)
                if completion is not None and cache.store is not None:
                    self._spawn(cache.store.put(key, completion), "storing a cached response")
        payload = self._account(call, completion, retries)
        if call.shared:
            call.shared = False
            usage = completion.usage
            settle = functools.partial(
                state.settle, req.run or "", req.id, req.model, usage, model.cost_usd(usage), bytes(payload)
            )
            try:
                await settle()
            except HandlerError as exc:
                # The answer is paid for and good: give it now, and keep trying to count it in
                # the background (a late settlement still moves the call from failed to done).
                log.warning("usage of call %s in run %r not recorded yet: %s", req.id, req.run, exc.message)
                task = self._loop.create_task(self._settle_later(settle, req.id, req.run or ""))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        return payload

    async def _settle_later(self, settle: Callable[[], Awaitable[None]], rid: str, run: str) -> None:
        """Retry a settlement that failed, with backoff, for up to ``SETTLE_RETRY_S``: a Redis
        blip must not leave a paid call uncounted (its tokens and cost would escape the run's
        limits). Past that, the call stays counted as failed and a warning says so."""
        delay, waited = 0.25, 0.0
        while waited < SETTLE_RETRY_S:
            await self._sleep(delay)
            waited += delay
            try:
                await settle()
            except HandlerError:
                delay = min(delay * 2, 5.0)
                continue
            log.info("usage of call %s in run %r recorded after %.1f s", rid, run, waited)
            self.late_settlements += 1
            return
        log.warning(
            "usage of call %s in run %r not recorded: the shared state stayed away for %.0f s; "
            "the call counts as failed and its tokens and cost are not counted",
            rid,
            run,
            SETTLE_RETRY_S,
        )

    def _settle_failed(self, call: _Call) -> None:
        assert self._shared is not None
        req = call.req
        self._spawn(
            self._shared.settle(req.run or "", req.id, req.model, None, 0.0, None), f"settling {req.id}"
        )

    def _spawn(self, op: Coroutine[Any, Any, None], what: str) -> None:
        """Run a shared-state update nobody waits for (bounded by the state's timeout)."""

        async def run() -> None:
            try:
                await op
            except HandlerError as exc:
                log.warning("%s failed: %s", what, exc.message)

        task = self._loop.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _encode(
        self,
        call: _Call,
        completion: Completion,
        usage: Usage,
        *,
        cached: bool,
        retries: int,
        cost_usd: float = 0.0,
    ) -> Payload:
        """The encoded ``CompleteReply`` (built straight to bytes: one per model call)."""
        latency_ms = (monotonic() - call.started) * 1000.0
        call.model.stats.observe_latency(latency_ms)
        if tracing.enabled():
            trace_complete(call.req, call.started, cached=cached)
        return encode_complete_reply(
            call.req.id,
            completion.text,
            completion.model,
            usage,
            cached=cached,
            retries=retries,
            latency_ms=round(latency_ms, 3),
            stop_reason=completion.stop_reason,
            cost_usd=round(cost_usd, 9) if cost_usd else 0.0,
        )

    async def _attempts(self, call: _Call, req: BackendRequest) -> tuple[Completion, int]:
        """One backend call, retrying retryable errors, all within the call's deadline. Each
        attempt goes through the model's shaping: circuit breaker, concurrency slot, rpm/tpm."""
        model = call.model
        cfg = model.config
        mstats = model.stats
        deadline = call.deadline
        assert deadline is not None  # set by _admit
        attempt = 0
        if call.task is not None:  # a call stepped inline gets its slot if and when it waits
            call.slot = self.deadlines.add(call.task, deadline)
        shaped = model.shaped
        try:
            while True:
                now = monotonic()
                if deadline - now <= 0:
                    raise RequestTimeout(f"no answer from {cfg.alias} within the request's timeout")
                if shaped:
                    _check_breaker(model)
                    if not model.slots.try_acquire():
                        mstats.queued += 1
                        try:
                            await model.slots.acquire()
                        finally:
                            mstats.queued -= 1
                try:
                    estimate = 0
                    if model.rpm is not None or model.tpm is not None:
                        estimate = await _pace(model, req)
                    mstats.sent += 1
                    try:
                        completion = await model.backend.complete(req)
                    except BackendError as exc:
                        if shaped:
                            _observe_failure(model, exc)
                        failed = exc
                    else:
                        if shaped:
                            model.breaker.on_success()
                            model.slots.on_success(now)
                        if model.tpm is not None:
                            u = completion.usage
                            model.tpm.adjust(u.input_tokens + u.output_tokens - estimate)
                        return completion, attempt
                finally:
                    if shaped:
                        model.slots.release()
                if failed.code == ErrorCode.RATE_LIMITED:
                    mstats.rate_limited += 1
                delay = self._backoff(attempt, failed.retry_after_s)
                if not failed.retryable or attempt >= cfg.max_retries or monotonic() + delay >= deadline:
                    raise _final(failed, f" (after {attempt} retries)" if attempt else "")
                if shaped and not model.retry_budget.try_retry():
                    # Retries are already a large share of this model's traffic: do not multiply
                    # an outage.
                    raise _final(failed, f" (not retried: the retry budget of {cfg.alias} is spent)")
                attempt += 1
                mstats.retries += 1
                mstats.retry_wait_s += delay
                log.info(
                    "retrying %s in %.2f s after %s (attempt %d)", cfg.alias, delay, failed.code, attempt
                )
                await self._sleep(delay)
        except asyncio.CancelledError:
            if call.task is not None and self.deadlines.expired(call.task):
                after = f" after {attempt} retries" if attempt else ""
                raise RequestTimeout(
                    f"no answer from {cfg.alias} within {req.timeout_s:g} s{after}"
                ) from None
            raise
        finally:
            call.deadline = None
            if call.slot is not None:
                assert call.task is not None
                self.deadlines.remove(call.task, call.slot)
                call.slot = None

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        """The provider's Retry-After when it sent one (plus up to 10% jitter, so a burst of
        429s does not come back as one burst); otherwise exponential backoff with jitter.

        Taking the larger of the two instead stretched a 1 s Retry-After to 2-8 s by the third
        retry, and 1,000 requests under 20% 429s from 3 s to 9 s."""
        if retry_after_s is not None:
            return retry_after_s * self._rng.uniform(1.0, 1.1)
        ceiling = min(self.config.retry_max_s, self.config.retry_base_s * (2**attempt))
        return self._rng.uniform(ceiling / 2, ceiling)


def _check_window(model: Model, req: CompleteRequest) -> None:
    """Refuse a prompt over the model's context window (never sent, nothing reserved)."""
    if model.window_chars is not None:
        chars = sum(len(m.content) for m in req.messages)
        if chars > model.window_chars:
            cfg = model.config
            raise PromptTooLarge(too_large_message(cfg.alias, chars, cfg.context_window_tokens))


def _check_breaker(model: Model) -> None:
    """Fail fast, with a retryable ``unavailable``, while the provider looks down."""
    try:
        model.breaker.before_call()
    except CircuitOpen as exc:
        left = exc.retry_after_s or 0.0
        raise CircuitOpen(
            round(left, 3),
            f"{model.config.alias} is failing ({model.breaker.failures} errors in a row); "
            f"requests fail fast for {left:.1f} s more, then one probe tries again",
        ) from None


async def _pace(model: Model, req: BackendRequest) -> int:
    """Wait for the model's rpm/tpm buckets; returns the tokens charged to tpm (an estimate that
    is corrected once the usage is known)."""
    estimate = 0
    if model.rpm is not None:
        await model.rpm.acquire()
    if model.tpm is not None:
        estimate = sum(estimate_tokens(m.content) for m in req.messages) + req.max_tokens
        await model.tpm.acquire(estimate)
    return estimate


def _final(failed: BackendError, suffix: str) -> BackendError:
    """The error a call ends in after its last attempt failed with ``failed``."""
    return BackendError(
        failed.code,
        failed.message + suffix,
        retryable=failed.retryable,
        retry_after_s=failed.retry_after_s,
        status=failed.status,
    )


def _observe_failure(model: Model, exc: BackendError) -> None:
    """Feed one failed attempt to the model's adaptive limit and circuit breaker."""
    if exc.code in (ErrorCode.RATE_LIMITED, ErrorCode.OVERLOADED):
        model.slots.on_overload()
    down = exc.code in _DOWN_CODES and exc.retryable and (exc.status is None or exc.status >= 500)
    model.breaker.on_failure(provider_down=down)
