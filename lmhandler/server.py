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
receive loop; each ``complete`` runs as its own task so a slow backend never blocks anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import zmq
import zmq.asyncio

from protocol import (
    PROTOCOL_VERSION,
    CompleteReply,
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
from protocol.client import configure_socket

from .accounting import BudgetExceeded, Run, RunClosed, RunTable
from .backends import (
    Backend,
    BackendError,
    BackendRequest,
    Completion,
    estimate_tokens,
    make_backend,
)
from .cache import ResponseCache, cache_key
from .config import HandlerConfig, ModelConfig
from .pacing import TokenBucket
from .stats import ModelStats, ServerStats

__all__ = ["Handler", "bind_socket"]

log = logging.getLogger(__name__)


def bind_socket(sock: zmq.Socket[Any], address: str) -> str:
    """Bind, accepting port 0 or * for a free port; returns the address actually bound."""
    if address.startswith("tcp://") and (address.endswith(":0") or address.endswith(":*")):
        address = address.rsplit(":", 1)[0] + ":*"
    sock.bind(address)
    bound = sock.getsockopt(zmq.LAST_ENDPOINT)
    return bound.decode() if isinstance(bound, bytes) else str(bound)


class _Model:
    """A configured alias with everything the handler keeps for it."""

    def __init__(self, config: ModelConfig, backend: Backend) -> None:
        self.config = config
        self.backend = backend
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self.cache = ResponseCache(config.cache_entries) if config.cache_entries > 0 else None
        self.rpm = TokenBucket(config.rpm) if config.rpm else None
        self.tpm = TokenBucket(config.tpm) if config.tpm else None
        self.stats = ModelStats()


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
    ) -> None:
        self.config = config
        self._backends = dict(backends or {})
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self.address: str | None = None
        self.models: dict[str, _Model] = {}
        self.runs = RunTable()
        self.stats = ServerStats()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._serve_task: asyncio.Task[None] | None = None
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
        sock = self._ctx.socket(zmq.ROUTER)
        configure_socket(sock)
        self._sock = sock
        self.address = bind_socket(sock, self.config.bind)
        self._serve_task = asyncio.get_running_loop().create_task(self._serve())
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
        if self._serve_task is not None:
            self._serve_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serve_task
        if self._tasks:
            log.info("lmhandler stopping: %d request(s) in flight, grace %.1f s", len(self._tasks), grace)
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for model in self.models.values():
            try:
                await model.backend.aclose()
            except Exception:
                log.exception("closing backend %s failed", model.config.alias)
        if self._sock is not None:
            self._sock.close(linger=100)
        if self._own_context:
            self._ctx.term()
        self._stopped.set()
        log.info("lmhandler stopped")

    # ------------------------------------------------------------ receive loop

    async def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            frames = await sock.recv_multipart(copy=False)
            self._on_message(frames)
            # Drain what is already queued before yielding to the event loop again.
            for _ in range(256):
                try:
                    frames = await sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._on_message(frames)

    def _send(self, envelope: list[Any], reply: Reply) -> None:
        assert self._sock is not None
        self.stats.replied += 1
        if isinstance(reply, ErrorReply):
            self.stats.errors[reply.code] += 1
        try:
            self._sock.send_multipart([*envelope, encode(reply)], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # peer gone or socket closing: nobody is left to tell
            log.debug("reply %s dropped: %s", reply.id, exc)

    def _on_message(self, frames: list[Any]) -> None:
        self.stats.received += 1
        envelope, payload = frames[:-1], frames[-1]
        if not envelope:  # cannot happen on a ROUTER, but never trust a frame count
            self.stats.dropped += 1
            return
        try:
            request = decode_request(payload.buffer, max_bytes=self.config.max_message_bytes)
        except ProtocolError as exc:
            rid = exc.request_id
            if rid is None:
                self.stats.dropped += 1
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
        self.stats.by_op[request.OP] += 1
        if isinstance(request, CompleteRequest):
            if self.stats.in_flight >= self.config.max_in_flight:
                self._send(
                    envelope,
                    ErrorReply(
                        request.id,
                        ErrorCode.OVERLOADED,
                        f"handler has {self.stats.in_flight} requests in flight "
                        f"(limit {self.config.max_in_flight})",
                        retryable=True,
                    ),
                )
                return
            task = asyncio.get_running_loop().create_task(self._complete(envelope, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        try:
            reply = self._dispatch[type(request)](request)
        except Exception:
            log.exception("op %s failed", request.OP)
            reply = ErrorReply(request.id, ErrorCode.INTERNAL, f"internal error in {request.OP}")
        self._send(envelope, reply)

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
                "models": {alias: m.stats.to_wire() for alias, m in self.models.items()},
            },
        )

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

    async def _complete(self, envelope: list[Any], req: CompleteRequest) -> None:
        started = time.monotonic()
        self.stats.in_flight += 1
        model = self.models.get(req.model)
        stats = model.stats if model is not None else None
        try:
            if model is None:
                raise _Failure(
                    ErrorCode.UNKNOWN_MODEL,
                    f"no model {req.model!r}; configured: {', '.join(self.models)}",
                )
            stats = model.stats
            stats.requests += 1
            stats.in_flight += 1
            try:
                reply = await self._complete_model(model, req, started)
            finally:
                stats.in_flight -= 1
            stats.ok += 1
            stats.latency_ms.append((time.monotonic() - started) * 1000.0)
            self._send(envelope, reply)
        except _Failure as f:
            if stats is not None:
                stats.errors[f.code] += 1
            self._send(envelope, ErrorReply(req.id, f.code, f.message, f.retryable, f.retry_after_s))
        except asyncio.CancelledError:
            if stats is not None:
                stats.errors[ErrorCode.UNAVAILABLE] += 1
            self._send(
                envelope,
                ErrorReply(req.id, ErrorCode.UNAVAILABLE, "handler shutting down", retryable=True),
            )
        except Exception:
            log.exception("complete %s failed", req.id)
            if stats is not None:
                stats.errors[ErrorCode.INTERNAL] += 1
            self._send(envelope, ErrorReply(req.id, ErrorCode.INTERNAL, "internal error in the handler"))
        finally:
            self.stats.in_flight -= 1

    async def _complete_model(self, model: _Model, req: CompleteRequest, started: float) -> CompleteReply:
        cfg = model.config
        run: Run | None = self.runs.get(req.run) if req.run is not None else None
        max_tokens = req.max_tokens or cfg.max_tokens
        key = (
            cache_key(cfg.alias, req.messages, max_tokens, req.temperature)
            if model.cache is not None
            else None
        )

        # A cache hit (or an identical call already in flight) is free for the run's budget.
        if model.cache is not None and key is not None:
            hit = model.cache.get(key)
            if hit is None and (pending := model.cache.pending(key)) is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    hit = await asyncio.shield(pending)
            if hit is not None:
                if run is not None:
                    self._admit(run, cached=True)
                model.stats.cache_hits += 1
                return self._reply(req, hit, Usage(), cached=True, retries=0, started=started)

        if run is not None:
            self._admit(run, cached=False)
            max_tokens = run.clamp_max_tokens(max_tokens)
        timeout = req.timeout_s or cfg.timeout_s
        if run is not None and (left := run.remaining_s()) is not None:
            timeout = min(timeout, left)
        backend_req = BackendRequest(
            model=cfg.model,
            messages=req.messages,
            max_tokens=max_tokens,
            temperature=req.temperature,
            timeout_s=timeout,
            run=req.run,
        )
        if model.cache is not None and key is not None:
            model.cache.begin(key)
        completion: Completion | None = None
        try:
            completion, retries = await self._call_with_retries(model, backend_req, started + timeout)
        finally:
            if model.cache is not None and key is not None:
                model.cache.end(key, completion)
            if run is not None:
                usage = completion.usage if completion else None
                cost = cfg.cost_usd(*_usage_tuple(usage)) if usage else 0.0
                run.finish(usage, cost)
        usage = completion.usage
        model.stats.input_tokens += usage.input_tokens
        model.stats.output_tokens += usage.output_tokens
        model.stats.cost_usd += cfg.cost_usd(*_usage_tuple(usage))
        return self._reply(req, completion, usage, cached=False, retries=retries, started=started)

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
    ) -> CompleteReply:
        return CompleteReply(
            id=req.id,
            text=completion.text,
            model=completion.model,
            usage=usage,
            cached=cached,
            retries=retries,
            latency_ms=round((time.monotonic() - started) * 1000.0, 3),
            stop_reason=completion.stop_reason,
        )

    async def _call_with_retries(
        self, model: _Model, req: BackendRequest, deadline: float
    ) -> tuple[Completion, int]:
        """One backend call with retries of retryable errors, all within ``deadline``."""
        cfg = model.config
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failure(
                    ErrorCode.TIMEOUT,
                    f"no answer from {cfg.alias} within the request's timeout",
                    retryable=True,
                )
            try:
                async with asyncio.timeout(left):
                    completion = await self._attempt(model, req)
                return completion, attempt
            except TimeoutError:
                raise _Failure(
                    ErrorCode.TIMEOUT,
                    f"no answer from {cfg.alias} within {req.timeout_s:g} s"
                    + (f" after {attempt} retries" if attempt else ""),
                    retryable=True,
                ) from None
            except BackendError as exc:
                if exc.code == ErrorCode.RATE_LIMITED:
                    model.stats.rate_limited += 1
                delay = self._backoff(attempt, exc.retry_after_s)
                if not exc.retryable or attempt >= cfg.max_retries or time.monotonic() + delay >= deadline:
                    suffix = f" (after {attempt} retries)" if attempt else ""
                    raise _Failure(
                        exc.code,
                        exc.message + suffix,
                        retryable=exc.retryable,
                        retry_after_s=exc.retry_after_s,
                    ) from None
                attempt += 1
                model.stats.retries += 1
                log.info(
                    "retrying %s in %.2f s after %s (attempt %d)",
                    cfg.alias,
                    delay,
                    exc.code,
                    attempt,
                )
                await asyncio.sleep(delay)

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float:
        """Exponential backoff with full jitter, never shorter than the provider's Retry-After."""
        ceiling = min(self.config.retry_max_s, self.config.retry_base_s * (2**attempt))
        delay = random.uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return delay

    async def _attempt(self, model: _Model, req: BackendRequest) -> Completion:
        stats = model.stats
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
            completion = await model.backend.complete(req)
            if model.tpm is not None:
                u = completion.usage
                model.tpm.adjust(u.input_tokens + u.output_tokens - estimate)
            return completion
        finally:
            model.slots.release()


def _usage_tuple(usage: Usage) -> tuple[int, int, int, int]:
    return (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
    )
