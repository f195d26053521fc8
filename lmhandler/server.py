"""The LM handler: one asyncio process, one ZeroMQ ROUTER, every model call of the system.

Errors, from the wire's point of view:

    ProtocolError (codec)      -> bad_request / unsupported_version / unknown_op / too_large
    unknown alias              -> unknown_model
    BudgetExceeded / RunClosed -> budget_exceeded / run_closed
    BackendError               -> its own code, after retries where retryable
    TimeoutError               -> timeout
    shutdown                   -> unavailable
    anything else              -> internal (logged with traceback; the loop lives on)

Requests that need no backend (ping, stats, run_*, usage, errors) are answered inline in the
receive loop; each ``complete`` runs as its own task so a slow backend never blocks anyone. A
``complete`` for a backend that answers without waiting (``echo``/``script`` at 0 ms) is answered
inline too: a task, a timer and a context switch cost more than the call itself.

The socket is a plain (synchronous) pyzmq socket driven by the event loop through its file
descriptor, not ``zmq.asyncio``: one wake-up drains every queued message with non-blocking
``recv`` and replies go out with non-blocking ``send`` (a ROUTER never blocks on send), so no
future is made per message. The ZeroMQ descriptor is edge-triggered: it signals "something
changed", not "a message is waiting", and any ``send`` may consume the signal of a message that
arrived meanwhile. So a drain reads until ``EAGAIN``; replies are queued and sent in batches
(``_flush``), after which ``EVENTS`` is read again and another drain scheduled if a message is
waiting; and a reply queued outside a drain schedules one. No message can be stranded
(tests/test_loadtest.py forces the race).

Other costs the profiles showed, and what replaced them: ``asyncio.timeout`` per request (a
shared deadline wheel, ``_Deadlines``); the garbage collector re-scanning thousands of live
requests (thresholds raised while a handler runs); the dataclass round trip of every reply
(``encode_complete_reply``); validation through generic field readers (a fast path in
``protocol.messages`` that accepts exactly what they accept). docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import logging
import math
import random
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from time import monotonic as _monotonic
from typing import Any

import zmq
import zmq.asyncio

from rlmq.protocol import (
    PROTOCOL_VERSION,
    CompleteRequest,
    ErrorCode,
    ErrorReply,
    PingRequest,
    PongReply,
    ProtocolError,
    Reply,
    RunCloseRequest,
    RunOpenRequest,
    RunUsageReply,
    StatsReply,
    StatsRequest,
    Usage,
    UsageRequest,
    decode_request,
    encode,
    peek_id,
)
from rlmq.protocol.client import configure_socket
from rlmq.protocol.codec import encode_complete_reply
from rlmq.protocol.security import CurveServerKeys, ServerSecurity

from .accounting import BudgetExceeded, Run, RunClosed, RunTable
from .backends import (
    Backend,
    BackendError,
    BackendRequest,
    Completion,
    EchoBackend,
    ScriptBackend,
    estimate_tokens,
    make_backend,
)
from .cache import ResponseCache, cache_key
from .config import HandlerConfig, ModelConfig
from .pacing import TokenBucket
from .shaping import AdaptiveLimit, CircuitBreaker, CircuitOpen, RetryBudget
from .stats import ModelStats, ServerStats

__all__ = ["Handler"]

log = logging.getLogger(__name__)

# Plain ints: pyzmq's flag enums cost an enum operation per use on the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_SNDMORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_COPY_THRESHOLD = zmq.COPY_THRESHOLD
# pyzmq's compiled send/recv of one frame, without the Python wrappers of ``zmq.Socket``
# (multipart loops, flag enums, argument checks): those cost several times the call itself.
_recv = zmq.backend.Socket.recv
_send = zmq.backend.Socket.send
# Messages handled per wake-up before other ready callbacks (replies, timers) get a turn.
DRAIN_BATCH = 1024
# Replies queued during a drain go out at its end, or every FLUSH_EVERY messages. Sent in
# batches, they wake ZeroMQ's I/O thread once per batch instead of once per reply (its CPU per
# reply fell from 13.5 to 3.5 us). Sent only at the end of a long drain, they stall closed-loop
# clients whose every request sits in that drain: measured at 64 in flight against the bare echo,
# flushing every 64 gave 0.64x, 32 0.85x, 24 0.87x, 16 0.76x (more flushes, more wake-ups);
# at 256 in flight, 32 gave 0.71x and 128 0.76x. 32 is the simple setting that never convoys a
# window of 64 or more and stays close to the best elsewhere.
FLUSH_EVERY = 32
# Backends whose ``complete`` never suspends when their latency is 0: their coroutine is stepped
# once, inline, instead of running as a task. Exact types only: a subclass may await.
_INLINE_BACKENDS: tuple[type[Backend], ...] = (EchoBackend, ScriptBackend)


# The cyclic garbage collector, tuned while a handler runs in the process. A request allocates a
# few dozen container objects (task, coroutines, timers, futures) and thousands stay alive at
# once; at CPython's default first threshold of 700 the collector runs every few dozen requests
# and keeps re-scanning the live ones: 18% of the loop's time with 10,000 in flight (py-spy),
# and 1.48 s instead of 1.22 s for that burst. Requests make few reference cycles, so collecting
# less often frees the same memory, a little later.
GC_THRESHOLDS = (50_000, 20, 10)
_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None


def _tune_gc() -> None:
    global _gc_users, _gc_saved
    if _gc_users == 0:
        _gc_saved = gc.get_threshold()
        gc.set_threshold(*(max(a, b) for a, b in zip(GC_THRESHOLDS, _gc_saved, strict=True)))
    _gc_users += 1


def _restore_gc() -> None:
    global _gc_users, _gc_saved
    _gc_users -= 1
    if _gc_users == 0 and _gc_saved is not None:
        gc.set_threshold(*_gc_saved)
        _gc_saved = None


def _events(sock: zmq.Socket[Any]) -> int:
    events = sock.getsockopt(zmq.EVENTS)
    assert isinstance(events, int)
    return events


def _answers_inline(backend: Backend) -> bool:
    return type(backend) in _INLINE_BACKENDS and getattr(backend, "latency_s", None) == 0


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Completion], waiting_on: Any) -> Generator[Any, Any, Completion]:
    """Carry on, inside a task, a coroutine that was stepped inline and suspended on ``waiting_on``."""
    while True:
        try:
            value = yield waiting_on
        except BaseException as exc:  # cancellation and the like go to the coroutine
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as done:
                result: Completion = done.value
                return result
        else:
            try:
                waiting_on = coro.send(value)
            except StopIteration as done:
                result = done.value
                return result


class _Model:
    """A configured alias with everything the handler keeps for it."""

    def __init__(self, config: ModelConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        # In flight to the provider: starts at max_concurrency, halves on 429/529, grows back.
        self.slots = AdaptiveLimit(config.max_concurrency, minimum=min(4, config.max_concurrency))
        self.breaker = CircuitBreaker(
            threshold=config.breaker_threshold, cooldown_s=config.breaker_cooldown_s
        )
        self.retry_budget = RetryBudget(config.retry_budget_ratio)
        self.cache = ResponseCache(config.cache_entries) if config.cache_entries > 0 else None
        self.rpm = TokenBucket(config.rpm) if config.rpm else None
        self.tpm = TokenBucket(config.tpm) if config.tpm else None
        self.stats = ModelStats()
        prices = (
            config.price_in_per_mtok,
            config.price_out_per_mtok,
            config.price_cache_read_per_mtok,
            config.price_cache_write_per_mtok,
        )
        self._free = not any(prices)  # cost is 0 whatever the usage: skip the arithmetic
        # Answered inline when nothing can make the call wait: no pacing, no cache to share.
        self.inline = (
            _answers_inline(backend) and self.cache is None and self.rpm is None and self.tpm is None
        )

    def cost_usd(self, usage: Usage) -> float:
        if self._free:
            return 0.0
        return self.config.cost_usd(
            usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens
        )


class _Deadlines:
    """Deadlines of the requests in flight, in buckets of ``resolution_s``, under one loop timer.

    A deadline costs a set insertion and removal, where ``asyncio.timeout`` costs a timer in the
    event loop's heap (whose entries compare in Python), a context manager, and three running-loop
    lookups, each a ``getpid()`` system call on Python 3.11: with 10,000 requests in flight those
    were a fifth of the loop's time (py-spy). A deadline fires up to ``resolution_s`` late.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution_s: float = 0.01) -> None:
        self._loop = loop
        self._resolution_s = resolution_s
        self._buckets: dict[int, set[asyncio.Task[Any]]] = {}
        self._slots: list[int] = []  # a heap of the buckets' slots
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot: int | None = None
        self._expired: set[asyncio.Task[Any]] = set()

    def add(self, task: asyncio.Task[Any], deadline: float) -> int:
        """Cancel ``task`` once ``deadline`` (loop time) passes, unless removed before."""
        slot = math.ceil(deadline / self._resolution_s)
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = set()
            heapq.heappush(self._slots, slot)
            if self._timer_slot is None or slot < self._timer_slot:
                self._arm(slot)
        bucket.add(task)
        return slot

    def remove(self, task: asyncio.Task[Any], slot: int) -> None:
        bucket = self._buckets.get(slot)
        if bucket is not None:
            bucket.discard(task)
            if not bucket:  # its slot stays in the heap and finds nothing when it comes
                del self._buckets[slot]
        self._expired.discard(task)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task``'s cancellation is this deadline's, and the only one pending: then it
        becomes a timeout (as ``asyncio.timeout`` decides)."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self._loop.call_at(slot * self._resolution_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_slot = None
        now = self._loop.time()
        slots = self._slots
        while slots and slots[0] * self._resolution_s <= now:
            for task in self._buckets.pop(heapq.heappop(slots), ()):
                if not task.done():
                    self._expired.add(task)
                    task.cancel("deadline")
        if slots:
            self._arm(slots[0])


class _Call:
    """A complete admitted to its run, with the request its backend gets."""

    __slots__ = ("backend_req", "finished", "req", "run", "timeout_s")

    def __init__(self, req: CompleteRequest, run: Run | None, backend_req: BackendRequest, timeout_s: float):
        self.req = req
        self.run = run
        self.backend_req = backend_req
        self.timeout_s = timeout_s
        self.finished = False  # the run has been told how the call ended


class _Failure(Exception):
    """A complete request that ends in an error reply."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class Handler:
    """Serve the handler protocol on ``config.bind`` until ``stop`` is called."""

    def __init__(
        self,
        config: HandlerConfig,
        *,
        backends: Mapping[str, Backend] | None = None,
        context: zmq.asyncio.Context | None = None,
        curve: CurveServerKeys | None = None,
    ) -> None:
        self.config = config
        self._backends = dict(backends or {})
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._sock: zmq.Socket[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: _Deadlines | None = None
        self._fd: int | None = None
        self._draining = False
        self._drain_scheduled = False
        self._outbox: list[tuple[list[Any], bytes | memoryview]] = []
        self._max_message_bytes = config.max_message_bytes
        self._max_in_flight = config.max_in_flight
        self._gc_tuned = False
        # ipc stays open; TCP gets CURVE when keys are given; TCP beyond loopback without keys
        # is refused (protocol.security.AuthRequired). Owns the authenticator thread.
        self._security = ServerSecurity(self._ctx, curve)
        self.address: str | None = None
        self.addresses: list[str] = []
        self.models: dict[str, _Model] = {}
        self.runs = RunTable()
        self.stats = ServerStats()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._dispatch: dict[type, Callable[[Any], Reply]] = {
            PingRequest: self._ping,
            StatsRequest: self._stats,
            RunOpenRequest: self._run_open,
            RunCloseRequest: self._run_close,
            UsageRequest: self._usage,
        }

    # ------------------------------------------------------------ life cycle

    async def start(self) -> str:
        """Create backends, bind, and start serving in the background; returns the bound address."""
        for alias, model_config in self.config.models.items():
            backend = self._backends.get(alias) or make_backend(model_config)
            self.models[alias] = _Model(model_config, backend)
        # A synchronous socket on the (possibly asyncio) context; the loop watches its FD.
        sock: zmq.Socket[Any] = zmq.Socket(self._ctx, zmq.ROUTER)
        try:
            configure_socket(sock)
            for address in (self.config.bind, *self.config.also_bind):
                self.addresses.append(self._security.bind(sock, address))
            self.address = self.addresses[0]
        except BaseException:
            sock.close(linger=0)
            self._security.close()
            raise
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._deadlines = _Deadlines(self._loop)
        fd = sock.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._fd = fd
        self._loop.add_reader(fd, self._drain)
        self._schedule_drain()  # messages may have arrived before the reader was added
        _tune_gc()
        self._gc_tuned = True
        log.info("lmhandler listening on %s (models: %s)", self.address, ", ".join(self.models))
        return self.address

    async def __aenter__(self) -> Handler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop reading, let in-flight calls finish within the grace period, fail the rest."""
        if self._stopping.is_set():
            await self._stopped.wait()
            return
        self._stopping.set()
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
        if self._tasks:
            log.info("lmhandler stopping: %d request(s) in flight, grace %.1f s", len(self._tasks), grace)
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self._flush()  # the last replies, "unavailable" ones included
        if self._deadlines is not None:
            self._deadlines.close()
        for model in self.models.values():
            try:
                await model.backend.aclose()
            except Exception:
                log.exception("closing backend %s failed", model.config.alias)
        if self._sock is not None:
            self._sock.close(linger=100)
        self._security.close()  # before term: its sockets live on our context
        if self._own_context:
            self._ctx.term()
        if self._gc_tuned:
            self._gc_tuned = False
            _restore_gc()
        self._stopped.set()
        log.info("lmhandler stopped")

    # ------------------------------------------------------------ receive loop

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and self._loop is not None:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Handle the messages already queued (up to a batch), send the replies, yield to the loop.

        Called when the FD signals, and after replies were queued outside a drain.
        """
        self._drain_scheduled = False
        sock = self._sock
        if sock is None or sock.closed:
            return
        if not self._stopping.is_set():
            on_message = self._on_message
            outbox = self._outbox
            handled = 0
            self._draining = True
            try:
                while handled < DRAIN_BATCH:
                    try:
                        frame = _recv(sock, _NOBLOCK, False)
                        frames = [frame]
                        while frame.more:  # the parts of a message arrive together
                            frame = _recv(sock, _NOBLOCK, False)
                            frames.append(frame)
                    except zmq.Again:
                        break
                    except zmq.ZMQError as exc:  # socket closed under us during shutdown
                        log.debug("receive failed: %s", exc)
                        return
                    handled += 1
                    try:
                        on_message(frames)
                    except Exception:  # the loop boundary: nothing a message does may stop it
                        log.exception("handling a message failed")
                    if len(outbox) >= FLUSH_EVERY:
                        self._flush()
                else:
                    # A full batch: more may be queued, and the FD will not say so again.
                    self._schedule_drain()
            finally:
                self._draining = False
        if self._outbox:
            self._flush()
            # Sending may have consumed the FD's signal of a message that arrived meanwhile;
            # EVENTS tells the truth (and re-arms the FD when nothing is waiting).
            if not self._stopping.is_set() and _events(sock) & _POLLIN:
                self._schedule_drain()

    def _flush(self) -> None:
        """Send every queued reply. Sent back to back, they reach ZeroMQ's I/O thread as one
        batch instead of waking it once per reply."""
        sock = self._sock
        outbox = self._outbox
        if sock is None or sock.closed:
            outbox.clear()
            return
        for envelope, payload in outbox:
            try:
                for part in envelope:
                    _send(sock, part, _NOBLOCK_SNDMORE, False)
                # Small payloads are cheaper copied; large ones go without a copy.
                if len(payload) < _COPY_THRESHOLD:
                    _send(sock, payload, _NOBLOCK)
                else:
                    _send(sock, payload, _NOBLOCK, False)
            except zmq.ZMQError as exc:  # peer gone or socket closing: nobody is left to tell
                log.debug("a reply was dropped: %s", exc)
        outbox.clear()

    def _send(self, envelope: list[Any], reply: Reply) -> None:
        if isinstance(reply, ErrorReply):
            self.stats.errors[reply.code] += 1
        self._send_payload(envelope, encode(reply))

    def _send_payload(self, envelope: list[Any], payload: bytes | memoryview) -> None:
        """Queue a reply; it goes out at the end of the current drain, or of the next one."""
        self.stats.replied += 1
        self._outbox.append((envelope, payload))
        if not self._draining:
            self._schedule_drain()

    def _on_message(self, frames: list[Any]) -> None:
        stats = self.stats
        stats.received += 1
        payload = frames.pop()  # what is left is the envelope, echoed back as it came
        envelope = frames
        if not envelope:  # cannot happen on a ROUTER, but never trust a frame count
            stats.dropped += 1
            return
        try:
            request = decode_request(payload.buffer, max_bytes=self._max_message_bytes)
        except ProtocolError as exc:
            rid = exc.request_id
            if rid is None:
                stats.dropped += 1
                log.debug("dropped an unreadable message: %s", exc.message)
                return
            self._send(envelope, ErrorReply(rid, exc.code, exc.message, retryable=False))
            return
        except Exception:  # the codec is ours, but the loop must outlive any bug in it
            log.exception("decoding a message failed")
            rid = peek_id(payload.buffer)
            if rid is not None:
                self._send(envelope, ErrorReply(rid, ErrorCode.INTERNAL, "internal error while decoding"))
            return
        stats.by_op[request.OP] += 1
        if type(request) is CompleteRequest:
            if stats.in_flight >= self._max_in_flight:
                self._send(
                    envelope,
                    ErrorReply(
                        request.id,
                        ErrorCode.OVERLOADED,
                        f"handler has {stats.in_flight} requests in flight (limit {self._max_in_flight})",
                        retryable=True,
                    ),
                )
                return
            model = self.models.get(request.model)
            if model is None:
                self._send(
                    envelope,
                    ErrorReply(
                        request.id,
                        ErrorCode.UNKNOWN_MODEL,
                        f"no model {request.model!r}; configured: {', '.join(self.models)}",
                    ),
                )
                return
            if model.inline:
                # Never holds a concurrency slot across a wait: it has none.
                self._complete_now(envelope, request, model)
            else:
                self._start(self._complete(envelope, request, model, _monotonic()))
            return
        try:
            reply = self._dispatch[type(request)](request)
        except Exception:
            log.exception("op %s failed", request.OP)
            reply = ErrorReply(request.id, ErrorCode.INTERNAL, f"internal error in {request.OP}")
        self._send(envelope, reply)

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ inline ops

    def _ping(self, req: PingRequest) -> Reply:
        return PongReply(req.id, versions=(PROTOCOL_VERSION,), models=tuple(self.models))

    def _stats(self, req: StatsRequest) -> Reply:
        s = self.stats
        return StatsReply(
            req.id,
            {
                "uptime_s": round(time.monotonic() - s.started, 3),
                "received": s.received,
                "replied": s.replied,
                "dropped": s.dropped,
                "in_flight": s.in_flight,
                "by_op": dict(s.by_op),
                "errors": dict(s.errors),
                "runs_open": len(self.runs.open),
                "models": {alias: self._model_stats(m) for alias, m in self.models.items()},
            },
        )

    @staticmethod
    def _model_stats(model: _Model) -> dict[str, Any]:
        return {
            **model.stats.to_wire(),
            "concurrency": model.slots.to_wire(),
            "breaker": model.breaker.to_wire(),
            "retry_budget": model.retry_budget.to_wire(),
        }

    def _run_open(self, req: RunOpenRequest) -> Reply:
        return RunUsageReply(req.id, self.runs.open_run(req.run, req.limits).snapshot())

    def _run_close(self, req: RunCloseRequest) -> Reply:
        run = self.runs.close(req.run)
        if run is None:
            return ErrorReply(req.id, ErrorCode.BAD_REQUEST, f"no run {req.run!r} is known")
        return RunUsageReply(req.id, run.snapshot())

    def _usage(self, req: UsageRequest) -> Reply:
        run = self.runs.find(req.run)
        if run is None:
            return ErrorReply(req.id, ErrorCode.BAD_REQUEST, f"no run {req.run!r} is known")
        return RunUsageReply(req.id, run.snapshot())

    # ------------------------------------------------------------ complete

    def _complete_now(self, envelope: list[Any], req: CompleteRequest, model: _Model) -> None:
        """A complete whose backend answers without waiting: no task, no timer, one step.

        The same steps as the task path (``_admit_call``, the attempt, ``_finish``), written out
        flat because this is the handler's hottest code.
        """
        started = _monotonic()
        cfg = model.config
        stats = model.stats
        stats.requests += 1
        max_tokens = req.max_tokens or cfg.max_tokens
        timeout = req.timeout_s or cfg.timeout_s
        run: Run | None = None
        if req.run is not None:
            run = self.runs.get(req.run)
            try:
                max_tokens, timeout = run.admit_call(max_tokens, timeout)
            except (BudgetExceeded, RunClosed) as exc:
                code = ErrorCode.BUDGET_EXCEEDED if isinstance(exc, BudgetExceeded) else ErrorCode.RUN_CLOSED
                stats.errors[code] += 1
                self._send(envelope, ErrorReply(req.id, code, str(exc)))
                return
        backend_req = BackendRequest(cfg.model, req.messages, max_tokens, req.temperature, timeout, req.run)
        stats.sent += 1
        finished = False
        try:
            coro = model.backend.complete(backend_req)
            try:
                waiting_on = coro.send(None)
            except StopIteration as done:
                completion: Completion = done.value
            except BackendError as exc:
                # Retries and the error reply are the task path's business.
                call = _Call(req, run, backend_req, timeout)
                self._start(self._complete(envelope, req, model, started, call=call, first_error=exc))
                return
            else:
                # The backend waited after all: a task carries it on from where it stopped.
                call = _Call(req, run, backend_req, timeout)
                first = _resume(coro, waiting_on)
                self._start(self._complete(envelope, req, model, started, call=call, first=first))
                return
            usage = completion.usage
            cost = model.cost_usd(usage)
            if run is not None:
                finished = True
                run.finish(usage, cost)
            stats.input_tokens += usage.input_tokens
            stats.output_tokens += usage.output_tokens
            stats.cost_usd += cost
            latency_ms = (_monotonic() - started) * 1000.0
            payload = encode_complete_reply(
                req.id,
                completion.text,
                completion.model,
                usage,
                cached=False,
                retries=0,
                latency_ms=round(latency_ms, 3),
                stop_reason=completion.stop_reason,
            )
        except Exception:
            log.exception("complete %s failed", req.id)
            if run is not None and not finished:
                run.finish(None, 0.0)
            stats.errors[ErrorCode.INTERNAL] += 1
            self._send(envelope, ErrorReply(req.id, ErrorCode.INTERNAL, "internal error in the handler"))
            return
        stats.ok += 1
        stats.latency_ms.append(latency_ms)
        self._send_payload(envelope, payload)

    async def _complete(
        self,
        envelope: list[Any],
        req: CompleteRequest,
        model: _Model,
        started: float,
        *,
        call: _Call | None = None,
        first: Awaitable[Completion] | None = None,
        first_error: BackendError | None = None,
    ) -> None:
        """A complete as a task. ``call`` is given when ``_complete_now`` began it and handed
        over, with the backend's first attempt still ``first`` (suspended) or its ``first_error``."""
        self.stats.in_flight += 1
        stats = model.stats
        if call is None:
            stats.requests += 1
        stats.in_flight += 1
        try:
            try:
                payload = await self._complete_model(model, req, started, call, first, first_error)
            finally:
                stats.in_flight -= 1
            stats.ok += 1
            stats.latency_ms.append((time.monotonic() - started) * 1000.0)
            self._send_payload(envelope, payload)
        except _Failure as f:
            stats.errors[f.code] += 1
            self._send(envelope, ErrorReply(req.id, f.code, f.message, f.retryable, f.retry_after_s))
        except asyncio.CancelledError:
            stats.errors[ErrorCode.UNAVAILABLE] += 1
            self._send(
                envelope,
                ErrorReply(req.id, ErrorCode.UNAVAILABLE, "handler shutting down", retryable=True),
            )
        except Exception:
            log.exception("complete %s failed", req.id)
            stats.errors[ErrorCode.INTERNAL] += 1
            self._send(envelope, ErrorReply(req.id, ErrorCode.INTERNAL, "internal error in the handler"))
        finally:
            self.stats.in_flight -= 1

    async def _complete_model(
        self,
        model: _Model,
        req: CompleteRequest,
        started: float,
        call: _Call | None,
        first: Awaitable[Completion] | None,
        first_error: BackendError | None,
    ) -> bytes | memoryview:
        cfg = model.config
        key: bytes | None = None
        if call is None:
            max_tokens = req.max_tokens or cfg.max_tokens
            if model.cache is not None:
                key = cache_key(cfg.alias, req.messages, max_tokens, req.temperature)
                # A cache hit (or an identical call already in flight) is free for the run's budget.
                hit = model.cache.get(key)
                if hit is None and (pending := model.cache.pending(key)) is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        hit = await asyncio.shield(pending)
                if hit is not None:
                    if req.run is not None:
                        self._admit(self.runs.get(req.run), cached=True)
                    model.stats.cache_hits += 1
                    return self._reply(req, hit, Usage(), cached=True, retries=0, started=started)
            call = self._admit_call(model, req)
        if model.cache is not None and key is not None:
            model.cache.begin(key)
        completion: Completion | None = None
        try:
            completion, retries = await self._call_with_retries(
                model, call.backend_req, started + call.timeout_s, first=first, first_error=first_error
            )
        finally:
            if model.cache is not None and key is not None:
                model.cache.end(key, completion)
            if completion is None and call.run is not None and not call.finished:
                call.finished = True
                call.run.finish(None, 0.0)
        return self._finish(model, call, completion, retries=retries, started=started)

    def _admit_call(self, model: _Model, req: CompleteRequest) -> _Call:
        """Budget admission and the backend request; raises ``_Failure`` when the run refuses."""
        cfg = model.config
        run: Run | None = self.runs.get(req.run) if req.run is not None else None
        max_tokens = req.max_tokens or cfg.max_tokens
        timeout = req.timeout_s or cfg.timeout_s
        if run is not None:
            try:
                max_tokens, timeout = run.admit_call(max_tokens, timeout)
            except BudgetExceeded as exc:
                raise _Failure(ErrorCode.BUDGET_EXCEEDED, str(exc)) from None
            except RunClosed as exc:
                raise _Failure(ErrorCode.RUN_CLOSED, str(exc)) from None
        model.retry_budget.on_request()
        backend_req = BackendRequest(
            model=cfg.model,
            messages=req.messages,
            max_tokens=max_tokens,
            temperature=req.temperature,
            timeout_s=timeout,
            run=req.run,
        )
        return _Call(req, run, backend_req, timeout)

    def _finish(
        self, model: _Model, call: _Call, completion: Completion, *, retries: int, started: float
    ) -> bytes | memoryview:
        """Account a call that succeeded and encode its reply."""
        usage = completion.usage
        cost = model.cost_usd(usage)
        if call.run is not None and not call.finished:
            call.finished = True
            call.run.finish(usage, cost)
        stats = model.stats
        stats.input_tokens += usage.input_tokens
        stats.output_tokens += usage.output_tokens
        stats.cost_usd += cost
        return self._reply(call.req, completion, usage, cached=False, retries=retries, started=started)

    @staticmethod
    def _admit(run: Run, *, cached: bool) -> None:
        try:
            if cached:
                run.admit_cached()
            else:
                run.admit()
        except BudgetExceeded as exc:
            raise _Failure(ErrorCode.BUDGET_EXCEEDED, str(exc)) from None
        except RunClosed as exc:
            raise _Failure(ErrorCode.RUN_CLOSED, str(exc)) from None

    @staticmethod
    def _reply(
        req: CompleteRequest,
        completion: Completion,
        usage: Usage,
        *,
        cached: bool,
        retries: int,
        started: float,
    ) -> bytes | memoryview:
        """The encoded ``CompleteReply`` (built straight to bytes: one per model call)."""
        return encode_complete_reply(
            req.id,
            completion.text,
            completion.model,
            usage,
            cached=cached,
            retries=retries,
            latency_ms=round((time.monotonic() - started) * 1000.0, 3),
            stop_reason=completion.stop_reason,
        )

    async def _call_with_retries(
        self,
        model: _Model,
        req: BackendRequest,
        deadline: float,
        *,
        first: Awaitable[Completion] | None = None,
        first_error: BackendError | None = None,
    ) -> tuple[Completion, int]:
        """One backend call with retries of retryable errors, all within ``deadline``.

        ``first`` is a first attempt already under way, ``first_error`` one that already failed.
        """
        cfg = model.config
        attempt = 0
        error = first_error
        task = asyncio.current_task(self._loop)
        deadlines = self._deadlines
        assert task is not None
        assert deadlines is not None
        slot = deadlines.add(task, deadline)
        try:
            while True:
                if error is None:
                    if deadline - time.monotonic() <= 0:
                        raise _Failure(
                            ErrorCode.TIMEOUT,
                            f"no answer from {cfg.alias} within the request's timeout",
                            retryable=True,
                        )
                    try:
                        if first is not None:
                            pending, first = first, None
                            completion = await pending
                        else:
                            completion = await self._attempt(model, req)
                        return completion, attempt
                    except BackendError as exc:
                        error = exc
                attempt = await self._after_failure(model, error, attempt, deadline)
                error = None
        except asyncio.CancelledError:
            if deadlines.expired(task):
                raise _Failure(
                    ErrorCode.TIMEOUT,
                    f"no answer from {cfg.alias} within {req.timeout_s:g} s"
                    + (f" after {attempt} retries" if attempt else ""),
                    retryable=True,
                ) from None
            raise
        finally:
            deadlines.remove(task, slot)

    async def _after_failure(self, model: _Model, failed: BackendError, attempt: int, deadline: float) -> int:
        """Count a failed attempt; raise ``_Failure`` if it is final, else wait and return the
        number of the next attempt."""
        cfg = model.config
        if failed.code == ErrorCode.RATE_LIMITED:
            model.stats.rate_limited += 1
        delay = self._backoff(attempt, failed.retry_after_s)
        if not failed.retryable or attempt >= cfg.max_retries or time.monotonic() + delay >= deadline:
            suffix = f" (after {attempt} retries)" if attempt else ""
            raise _Failure(
                failed.code,
                failed.message + suffix,
                retryable=failed.retryable,
                retry_after_s=failed.retry_after_s,
            ) from None
        if not model.retry_budget.try_retry():
            # Retries are already a large share of this model's traffic: do not multiply an outage.
            raise _Failure(
                failed.code,
                f"{failed.message} (not retried: the retry budget of {cfg.alias} is spent)",
                retryable=failed.retryable,
                retry_after_s=failed.retry_after_s,
            ) from None
        attempt += 1
        model.stats.retries += 1
        log.info("retrying %s in %.2f s after %s (attempt %d)", cfg.alias, delay, failed.code, attempt)
        await asyncio.sleep(delay)
        return attempt

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        """The provider's Retry-After when it sent one (plus up to 10% jitter, so a burst of
        429s does not come back as one burst); otherwise exponential backoff with jitter.

        Taking the larger of the two instead stretched a 1 s Retry-After to 2-8 s by the third
        retry, and 1,000 requests under 20% 429s from 3 s to 9 s."""
        if retry_after_s is not None:
            return retry_after_s * random.uniform(1.0, 1.1)
        ceiling = min(self.config.retry_max_s, self.config.retry_base_s * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)

    async def _attempt(self, model: _Model, req: BackendRequest) -> Completion:
        stats = model.stats
        try:
            model.breaker.before_call()
        except CircuitOpen as exc:
            # The provider looks down: fail fast instead of queueing into its outage.
            raise _Failure(
                ErrorCode.UNAVAILABLE,
                f"{model.config.alias} is failing ({model.breaker.failures} errors in a row); "
                f"requests fail fast for {exc.retry_after_s:.1f} s more, then one probe tries again",
                retryable=True,
                retry_after_s=round(exc.retry_after_s, 3),
            ) from None
        stats.queued += 1
        try:
            await model.slots.acquire()
        finally:
            stats.queued -= 1
        try:
            estimate = 0
            if model.rpm is not None:
                await model.rpm.acquire()
            if model.tpm is not None:
                estimate = sum(estimate_tokens(m.content) for m in req.messages) + req.max_tokens
                await model.tpm.acquire(estimate)
            stats.sent += 1
            try:
                completion = await model.backend.complete(req)
            except BackendError as exc:
                _observe_failure(model, exc)
                raise
            model.breaker.on_success()
            model.slots.on_success()
            if model.tpm is not None:
                u = completion.usage
                model.tpm.adjust(u.input_tokens + u.output_tokens - estimate)
            return completion
        finally:
            model.slots.release()


# Failures that say the provider is down (not busy, not refusing this request).
_DOWN_CODES = frozenset({ErrorCode.BACKEND_ERROR, ErrorCode.TIMEOUT})


def _observe_failure(model: _Model, exc: BackendError) -> None:
    """Feed one failed attempt to the model's adaptive limit and circuit breaker."""
    if exc.code in (ErrorCode.RATE_LIMITED, ErrorCode.OVERLOADED):
        model.slots.on_overload()
    down = exc.code in _DOWN_CODES and exc.retryable and (exc.status is None or exc.status >= 500)
    model.breaker.on_failure(provider_down=down)
