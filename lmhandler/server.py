"""The LM handler: one asyncio process, one ZeroMQ ROUTER, every model call of the system.

Three rooms:

    transport.RouterTransport   the socket: drain until EAGAIN, batched replies, envelopes
    pipeline.Pipeline           every ``complete``: admission, cache, shaping, retries, backend
    server.Handler (here)       life cycle, and the dispatch table for the other ops

Requests that need no backend (ping, stats, run_*, usage) are answered inline in the receive
loop from the dispatch table; ``complete`` goes to the pipeline, which answers it inline when
its backend answers at once and runs it as a task otherwise, so a slow backend never blocks
anyone.

Errors, from the wire's point of view (every reply built from the exception's own fields,
``ErrorInfo.of``, in ``_send_error``):

    ProtocolError (codec)      -> bad_request / unsupported_version / unknown_op / too_large
    HandlerError subtree       -> its own code (unknown_model, unknown_run, budget_exceeded,
                                  run_closed, a backend's code after retries, timeout, ...)
    anything else              -> internal (logged with traceback; the loop lives on)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import zmq
import zmq.asyncio

from rlmq.protocol import (
    PROTOCOL_VERSION,
    CompleteRequest,
    ErrorInfo,
    ErrorReply,
    PingRequest,
    PongReply,
    ProtocolError,
    Reply,
    RlmqError,
    RunCloseRequest,
    RunOpenRequest,
    RunUsageReply,
    StatsReply,
    StatsRequest,
    UsageRequest,
    decode_request,
    encode,
    peek_id,
)
from rlmq.protocol.client import configure_socket
from rlmq.protocol.security import CurveServerKeys, ServerSecurity

from .accounting import RunTable
from .backends import Backend, make_backend
from .config import OFFLINE_CONTEXT_WINDOW_TOKENS, HandlerConfig
from .errors import AnonymousRefused, HandlerError
from .pipeline import Model, Pipeline
from .state import MemoryState, State, StateUnavailable, make_state
from .stats import ServerStats
from .transport import Payload, RouterTransport, restore_gc, tune_gc

__all__ = ["Handler"]

log = logging.getLogger(__name__)


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
        self.transport: RouterTransport | None = None
        self.pipeline: Pipeline | None = None
        self._max_message_bytes = config.max_message_bytes
        self._gc_tuned = False
        # ipc stays open; TCP gets CURVE when keys are given; TCP beyond loopback without keys
        # is refused (protocol.security.AuthRequired). Owns the authenticator thread.
        self._security = ServerSecurity(self._ctx, curve)
        # Calls naming no run: on for loopback and ipc, off once the handler has CURVE keys.
        self.allow_anonymous = config.allow_anonymous if config.allow_anonymous is not None else curve is None
        self.address: str | None = None
        self.addresses: list[str] = []
        self.models: dict[str, Model] = {}
        self._windows: dict[str, int] = {}  # what ping tells workers, so they refuse oversized prompts
        self.runs = RunTable()
        # Runs, budgets, finished replies, pacing and cache: in this process, or in Redis shared
        # with every handler of the same [state] url (lmhandler.state).
        self.state: State = (
            MemoryState(
                self.runs, replay_ttl_s=config.state.replay_ttl_s, replay_entries=config.state.replay_entries
            )
            if config.state.url is None
            else make_state(config.state)
        )
        # Ops answered in a task when the state is shared (they wait for it); None: all inline.
        self._async_ops: dict[type, Callable[[Any], Awaitable[Reply]]] | None = None
        if not self.state.local:
            self._async_ops = {
                StatsRequest: self._stats_shared,
                RunOpenRequest: self._run_open_shared,
                RunCloseRequest: self._run_close_shared,
                UsageRequest: self._usage_shared,
            }
        self._op_tasks: set[asyncio.Task[None]] = set()
        self.stats = ServerStats()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        # Every op but ``complete``: answered at once, in the receive loop.
        self._dispatch: dict[type, Callable[[Any], Reply]] = {
            PingRequest: self._ping,
            StatsRequest: self._stats,
            RunOpenRequest: self._run_open,
            RunCloseRequest: self._run_close,
            UsageRequest: self._usage,
        }

    # ------------------------------------------------------------ life cycle

    async def start(self) -> str:
        """Create backends, bind, and start serving in the background; returns the bound address.

        A handler configured for shared state does not start without it: ``ConfigError`` naming
        the url, never a silent fall back to state of its own."""
        await self.state.start()
        for alias, model_config in self.config.models.items():
            backend = self._backends.get(alias) or make_backend(model_config)
            self.models[alias] = Model(model_config, backend, self.state)
            problem = model_config.key_problem()
            if problem is not None:  # said again on first use, where the call fails (or goes keyless)
                log.warning("%s", problem)
        self._windows = {  # the offline backends read anything: no window to tell
            alias: m.config.context_window_tokens
            for alias, m in self.models.items()
            if m.config.context_window_tokens < OFFLINE_CONTEXT_WINDOW_TOKENS
        }
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
        loop = asyncio.get_running_loop()
        self.pipeline = Pipeline(
            self.config,
            self.models,
            self.runs,
            self.stats,
            loop=loop,
            reply=self._send_payload,
            fail=self._send_error,
            allow_anonymous=self.allow_anonymous,
            state=self.state,
        )
        self.transport = RouterTransport(sock, loop, self._on_message)
        self.transport.start()
        tune_gc()
        self._gc_tuned = True
        log.info(
            "lmhandler listening on %s (models: %s; calls without a run %s)",
            self.address,
            ", ".join(self.models),
            "allowed" if self.allow_anonymous else "refused",
        )
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
        if self.transport is not None:
            self.transport.stop_reading()
        if self.pipeline is not None:
            tasks = set(self.pipeline.tasks)
            if tasks:
                log.info("lmhandler stopping: %d request(s) in flight, grace %.1f s", len(tasks), grace)
                _, pending = await asyncio.wait(tasks, timeout=grace)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending)
            self.pipeline.close()
        if self._op_tasks:  # run_open/usage/... waiting on the shared state: bounded by its timeout
            await asyncio.wait(set(self._op_tasks))
        await self.state.aclose()
        if self.transport is not None:
            self.transport.flush()  # the last replies, "unavailable" ones included
        for model in self.models.values():
            try:
                await model.backend.aclose()
            except Exception:  # one backend's failure to close must not keep the others open
                log.exception("closing backend %s failed", model.config.alias)
        if self.transport is not None:
            self.transport.close(linger_ms=100)
        self._security.close()  # before term: its sockets live on our context
        if self._own_context:
            self._ctx.term()
        if self._gc_tuned:
            self._gc_tuned = False
            restore_gc()
        self._stopped.set()
        log.info("lmhandler stopped")

    # ------------------------------------------------------------ messages

    def _on_message(self, frames: list[Any]) -> None:
        """One message from the transport: decode, then the pipeline or the dispatch table.

        This is the message's boundary: whatever goes wrong becomes an error reply (or, with no
        readable id, a dropped message) and the receive loop lives on.
        """
        stats = self.stats
        stats.received += 1
        payload = frames.pop()  # what is left is the envelope, echoed back as it came
        envelope = frames
        if not envelope:  # cannot happen on a ROUTER, but never trust a frame count
            stats.dropped += 1
            return
        request: Any = None
        try:
            request = decode_request(payload.buffer, max_bytes=self._max_message_bytes)
            stats.by_op[request.OP] += 1
            if type(request) is CompleteRequest:
                assert self.pipeline is not None
                self.pipeline.submit(envelope, request)
            elif self._async_ops is not None and type(request) in self._async_ops:
                self._start_op(envelope, request, self._async_ops[type(request)])
            else:
                self._send_payload(envelope, encode(self._dispatch[type(request)](request)))
        except ProtocolError as exc:
            if exc.request_id is None:
                stats.dropped += 1
                log.debug("dropped an unreadable message: %s", exc.message)
            else:
                self._send_error(envelope, exc.request_id, exc)
        except HandlerError as exc:  # an op refused (an unknown run, ...)
            self._send_error(envelope, request.id, exc)
        except Exception:  # a bug (the codec's or an op's): an internal error reply, the loop lives on
            where = "decoding" if request is None else f"op {request.OP}"
            log.exception("handling a message failed (%s)", where)
            rid = peek_id(payload.buffer) if request is None else request.id
            if rid is not None:
                self._send_error(envelope, rid, HandlerError(f"internal error in the handler ({where})"))

    def _start_op(self, envelope: list[Any], request: Any, op: Callable[[Any], Awaitable[Reply]]) -> None:
        """Answer an op that waits on the shared state, in a task of its own."""

        async def answer() -> None:
            try:
                self._send_payload(envelope, encode(await op(request)))
            except HandlerError as exc:  # unknown_run, unavailable, ...
                self._send_error(envelope, request.id, exc)
            except Exception:  # the op's boundary: an internal error reply, the loop lives on
                log.exception("handling a message failed (op %s)", request.OP)
                self._send_error(
                    envelope, request.id, HandlerError(f"internal error in the handler (op {request.OP})")
                )

        task = asyncio.get_running_loop().create_task(answer())
        self._op_tasks.add(task)
        task.add_done_callback(self._op_tasks.discard)

    def _send_payload(self, envelope: list[Any], payload: Payload) -> None:
        self.stats.replied += 1
        assert self.transport is not None
        self.transport.send(envelope, payload)

    def _send_error(self, envelope: list[Any], rid: str, exc: RlmqError) -> None:
        """The one place an error becomes a reply: the exception's own fields, as they travel."""
        info = ErrorInfo.of(exc)
        self.stats.errors[info.code] += 1
        reply = ErrorReply(rid, info.code, info.message, info.retryable, info.retry_after_s)
        self._send_payload(envelope, encode(reply))

    # ------------------------------------------------------------ the other ops

    def _ping(self, req: PingRequest) -> Reply:
        return PongReply(
            req.id,
            versions=(PROTOCOL_VERSION,),
            models=tuple(self.models),
            context_windows=self._windows,
        )

    def _stats(self, req: StatsRequest, runs_open: int | None = None) -> StatsReply:
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
                "runs_open": len(self.runs.open) if runs_open is None else runs_open,
                "replayed": self.pipeline.replayed if self.pipeline is not None else 0,
                "late_settlements": self.pipeline.late_settlements if self.pipeline is not None else 0,
                "state": "memory" if self.state.local else "redis",
                "models": {alias: m.to_wire() for alias, m in self.models.items()},
            },
        )

    def _run_open(self, req: RunOpenRequest) -> Reply:
        if req.key is None and not self.allow_anonymous:
            # Where calls with no run are refused, a run anyone could name would be the way round.
            raise AnonymousRefused(
                f"run {req.run!r} has no key: this handler serves only keyed runs (allow_anonymous is "
                "off); open it with a key, which every call and the close must then show"
            )
        return RunUsageReply(req.id, self.runs.open_run(req.run, req.limits, req.key).snapshot())

    def _run_close(self, req: RunCloseRequest) -> Reply:
        return RunUsageReply(req.id, self.runs.close(req.run, req.key).snapshot())

    def _usage(self, req: UsageRequest) -> Reply:
        # Read-only, so no key: a run's totals are not a way to spend it.
        return RunUsageReply(req.id, self.runs.get(req.run).snapshot())

    # The same ops when the state is shared: they wait for it, in a task (``_start_op``).

    async def _stats_shared(self, req: StatsRequest) -> Reply:
        try:
            runs_open = await self.state.runs_open()
        except StateUnavailable:
            runs_open = -1  # stats still answer while the shared state is away
        return self._stats(req, runs_open)

    async def _run_open_shared(self, req: RunOpenRequest) -> Reply:
        if req.key is None and not self.allow_anonymous:
            self._run_open(req)  # raises AnonymousRefused, in the same words
        return RunUsageReply(req.id, await self.state.run_open(req.run, req.limits, req.key))

    async def _run_close_shared(self, req: RunCloseRequest) -> Reply:
        return RunUsageReply(req.id, await self.state.run_close(req.run, req.key))

    async def _usage_shared(self, req: UsageRequest) -> Reply:
        return RunUsageReply(req.id, await self.state.usage(req.run))
