"""The sandbox pool's server: two ROUTER sockets, decode, dispatch, reply. The work is elsewhere.

    clients (orchestrators) --ROUTER--> Pool --> SessionManager (sessions.py) --> Supervisor
    workers --ROUTER (private ipc)-->   Pool --^                                  (supervisor.py)
    workers' sub-calls --ROUTER (private ipc)--> SubCallRelay (relay.py) --> the handler

- ``Supervisor``: worker processes (spawn, uid, cgroup, kill, reap, liveness); no ZeroMQ.
- ``SessionManager``: the session table, the warm supply, execs, reloads, rlm_query forwarding.
- ``Pool`` (here): the sockets, a dispatch table per side, the housekeeping tick, start and stop.

Errors, from the wire's point of view:

    ProtocolError (codec)      -> bad_request / unsupported_version / unknown_op / too_large
    PoolError (errors.py)      -> its code: unknown_session, session_busy, session_lost,
                                  pool_exhausted, overloaded, bad_request, too_large, timeout,
                                  unavailable (the pool stopping)
    anything else              -> internal (logged with traceback; the loop lives on)

A failure of the model's code is not an error reply: it is an ``ExecResult`` with ``error`` set
(exception, memory, timeout, worker_died).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

import zmq
import zmq.asyncio

from rlmq.protocol import ErrorCode, ErrorReply, ProtocolError, RlmqError, pack, peek_id
from rlmq.protocol.client import configure_socket
from rlmq.protocol.errors import ConfigError, ErrorInfo
from rlmq.protocol.sandbox import (
    CloseReply,
    CloseRequest,
    ExecRequest,
    OpenRequest,
    RlmResult,
    SandboxPing,
    SandboxPong,
    SandboxStats,
    SandboxStatsReply,
    decode_sandbox_request,
    split_delimited,
)
from rlmq.protocol.security import CurveClientKeys, CurveServerKeys, ServerSecurity

from ._tasks import Background, Stats, mark_retrieved, percentiles
from ._wire import Heartbeat, Loaded, Ready, Result, WorkerRlmQuery, decode_from_worker
from .config import PoolConfig
from .errors import PoolError, PoolFailure, PoolStopping, WorkerGone
from .relay import SubCallRelay
from .sessions import SessionManager
from .supervisor import Supervisor, Worker, WorkerState

__all__ = ["Pool", "PoolFailure", "WorkerGone"]

log = logging.getLogger(__name__)

ClientOp = Callable[[list[Any], Any, list[Any]], None]
WorkerOp = Callable[[Worker, Any, list[Any]], None]
# Tasks the pool must let finish when it stops (they spawn, reap and clean up processes).
_SUPERVISOR_TASKS = ("launch", "cleanup", "resolve")


class Pool:
    """Serve the sandbox session protocol on ``config.bind`` until ``stop``."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        context: zmq.asyncio.Context | None = None,
        curve_server: CurveServerKeys | None = None,
        curve_client: CurveClientKeys | None = None,
    ) -> None:
        """``curve_server``: keys for clients reaching the pool over TCP (required beyond
        loopback). ``curve_client``: keys for reaching a handler that requires CURVE; they stay
        in the pool's relay, which alone talks to handlers (workers never hold a key)."""
        if not config.handler:
            raise ConfigError("the pool needs a handler address (--handler)")
        self.config = config
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._security = ServerSecurity(self._ctx, curve_server)
        self._curve_client = curve_client
        self.address: str | None = None
        self._clients: zmq.asyncio.Socket | None = None
        self._worker_sock: zmq.asyncio.Socket | None = None
        self.relay: SubCallRelay | None = None
        self._background = Background()
        self.stats = Stats()
        self.supervisor = Supervisor(config, background=self._background, stats=self.stats)
        self.sessions = SessionManager(
            config,
            self.supervisor,
            send_worker=self._send_worker,
            send_client=self._send_client,
        )
        self.supervisor.events = self.sessions
        self._stopping = False
        self._stopped = asyncio.Event()
        self._client_ops: dict[type, ClientOp] = {
            OpenRequest: self._on_open,
            ExecRequest: self._on_exec,
            CloseRequest: self._on_close,
            SandboxPing: self._on_ping,
            SandboxStats: self._on_stats,
            RlmResult: self._on_rlm_result,
        }
        self._worker_ops: dict[type, WorkerOp] = {
            Ready: lambda w, m, _: self.supervisor.ready(w, m.pid),
            Loaded: lambda w, m, _: self.sessions.loaded(w, m),
            Result: lambda w, m, _: self.sessions.result(w, m),
            WorkerRlmQuery: self.sessions.rlm_query,
            Heartbeat: lambda w, m, _: None,
        }

    # ------------------------------------------------------------ life cycle

    async def start(self) -> str:
        """Bind, start the warm workers, serve in the background; returns the bound address.
        Workers become ready in the background (``wait_ready``)."""
        await self.supervisor.start()
        wsock = self._ctx.socket(zmq.ROUTER)
        configure_socket(wsock)
        # A worker runs untrusted code: cap what one message from it may make the pool hold.
        wsock.setsockopt(zmq.MAXMSGSIZE, self.config.max_context_bytes + 16 * 1024 * 1024)
        wsock.bind(self.supervisor.pool_address)
        self._worker_sock = wsock
        # Sub-calls leave only through the relay, stamped with their session's run and depth.
        relay = SubCallRelay(
            self.supervisor.relay_path,
            self.config.handler,
            curve=self._curve_client,
            max_message_bytes=self.config.max_context_bytes + 16 * 1024 * 1024,
        )
        await self._background.blocking(relay.start)
        self.relay = relay
        self.sessions.relay = relay
        csock = self._ctx.socket(zmq.ROUTER)
        configure_socket(csock)
        self._clients = csock
        self.address = self._security.bind(csock, self.config.bind)
        self._background.spawn(self._serve_clients())
        self._background.spawn(self._serve_workers())
        self._background.spawn(self._housekeeping())
        self.sessions.start_supply()
        log.info(
            "sandbox pool on %s (isolation %s, %d warm workers, uid drop %s, cgroup %s, network %s)",
            self.address,
            self.config.isolation,
            self.config.workers,
            "on" if self.supervisor.uid_drop else "off",
            "on" if self.supervisor.cgroups else "off",
            self.network,
        )
        return self.address

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the warm pool is full (``workers`` READY)."""
        await self.sessions.wait_ready(timeout_s)

    async def wait_cleaned(self, timeout_s: float = 15.0) -> None:
        """Wait until every discarded worker has exited and been cleaned up (tests use this)."""
        await self.supervisor.wait_cleaned(timeout_s)

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Kill every worker, answer what is in flight with ``unavailable``, remove temp dirs."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self.sessions.stopping = True
        for task in list(self._background.tasks):
            if not task.get_name().startswith(_SUPERVISOR_TASKS):
                task.cancel()
        await self.supervisor.stop()
        if self._background.tasks:
            await asyncio.wait(set(self._background.tasks), timeout=10.0)
        if self.relay is not None:
            await self._background.blocking(self.relay.stop)
        await self.supervisor.close()
        for sock in (self._clients, self._worker_sock):
            if sock is not None:
                sock.close(linger=0)
        self._security.close()
        self._background.shutdown()
        if self._own_context:
            self._ctx.term()
        self._stopped.set()
        log.info("sandbox pool stopped")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)  # a periodic tick
            for silent in self.supervisor.check():
                self.sessions.worker_silent(silent)
            self.sessions.expire_idle()

    @property
    def network(self) -> str:
        """What the workers' network is: "none" (a namespace of their own), "host"."""
        if self.config.network:
            return "host"
        return "none" if self.supervisor.netns or self.supervisor.bwrap else "host"

    # ------------------------------------------------------------ clients

    async def _serve_clients(self) -> None:
        sock = self._clients
        assert sock is not None
        while True:
            frames = await sock.recv_multipart(copy=False)
            self.stats.inc("received")
            try:
                self._on_client_message(frames)
            except Exception:  # the loop boundary: a bug answers `internal` and the loop lives on
                log.exception("handling a client message failed")
                parts = split_delimited(frames)
                if parts is not None:
                    rid = peek_id(parts[1].buffer)
                    if rid is not None:
                        self._reply_error(
                            parts[0], rid, ErrorInfo(ErrorCode.INTERNAL, "internal error in the sandbox pool")
                        )

    def _on_client_message(self, frames: list[Any]) -> None:
        parts = split_delimited(frames)
        if parts is None:
            self.stats.inc("dropped")
            log.debug("dropped a message without an empty delimiter frame")
            return
        envelope, header, blobs = parts
        try:
            request = decode_sandbox_request(header.buffer, len(blobs))
        except ProtocolError as exc:
            if exc.request_id is None:
                self.stats.inc("dropped")
                log.debug("dropped an unreadable message: %s", exc.message)
                return
            self._reply_error(envelope, exc.request_id, ErrorInfo.of(exc))
            return
        self.stats.inc(f"op_{request.OP}")
        try:
            self._client_ops[type(request)](envelope, request, blobs)
        except PoolError as exc:  # a refusal decided before any waiting (busy, unknown, full)
            self._reply_error(envelope, request.id, ErrorInfo.of(exc))

    def _send_client(self, envelope: list[Any], wire: dict[str, Any], blobs: Sequence[Any] = ()) -> None:
        if self._clients is None or self._clients.closed:
            return
        _send(self._clients, [*envelope, pack(wire), *blobs])

    def _reply_error(self, envelope: list[Any], rid: str, error: ErrorInfo) -> None:
        self.stats.errors[error.code] = self.stats.errors.get(error.code, 0) + 1
        reply = ErrorReply(rid, error.code, error.message, error.retryable, error.retry_after_s)
        self._send_client(envelope, reply.to_wire())

    def _run_op(self, envelope: list[Any], rid: str, op: Coroutine[Any, Any, dict[str, Any]]) -> None:
        """Run an op that waits as its own task; its result (a reply map) or failure is sent."""

        async def run() -> None:
            try:
                wire = await op
            except RlmqError as exc:
                self._reply_error(envelope, rid, ErrorInfo.of(exc))
            except asyncio.CancelledError:
                self._reply_error(envelope, rid, ErrorInfo.of(PoolStopping()))
                raise
            except Exception:  # the task boundary: same rule as the receive loop
                log.exception("op %s failed", rid)
                self._reply_error(
                    envelope, rid, ErrorInfo(ErrorCode.INTERNAL, "internal error in the sandbox pool")
                )
            else:
                self._send_client(envelope, wire)

        task = self._background.spawn(run(), name=f"op {rid}")
        # A task cancelled before its first step never starts `op`: close it, quietly.
        task.add_done_callback(lambda _: op.close())

    # ------------------------------------------------------------ client ops

    def _on_ping(self, envelope: list[Any], req: SandboxPing, blobs: list[Any]) -> None:
        pong = SandboxPong(req.id, self.config.isolation, self.sessions.warm, len(self.sessions.table))
        self._send_client(envelope, pong.to_wire())

    def _on_stats(self, envelope: list[Any], req: SandboxStats, blobs: list[Any]) -> None:
        self._send_client(envelope, SandboxStatsReply(req.id, self.snapshot()).to_wire())

    def snapshot(self) -> dict[str, Any]:
        relay = self.relay
        return {
            "uptime_s": round(time.monotonic() - self.stats.started, 3),
            "isolation": self.config.isolation,
            "uid_drop": self.supervisor.uid_drop,
            "cgroup": self.supervisor.cgroups is not None,
            "network": self.network,
            "sub_calls": {
                "relayed": relay.relayed if relay else 0,
                "refused": relay.refused if relay else 0,
                "dropped": relay.dropped if relay else 0,
            },
            "sessions_open": len(self.sessions.table),
            "workers": {s.value: self.supervisor.count(s) for s in WorkerState},
            "counters": dict(self.stats.counters),
            "errors": dict(self.stats.errors),
            "open_ms": percentiles(self.stats.open_ms),
            "exec_ms": percentiles(self.stats.exec_ms),
        }

    def _on_open(self, envelope: list[Any], req: OpenRequest, blobs: list[Any]) -> None:
        self.sessions.admit_open()
        self._run_op(envelope, req.id, self.sessions.open(req, blobs, envelope))

    def _on_exec(self, envelope: list[Any], req: ExecRequest, blobs: list[Any]) -> None:
        session = self.sessions.begin_exec(req, envelope)
        self._run_op(envelope, req.id, self.sessions.exec(session, req))

    def _on_close(self, envelope: list[Any], req: CloseRequest, blobs: list[Any]) -> None:
        session = self.sessions.close(req.session)
        self._send_client(envelope, CloseReply(req.id, session.id).to_wire())

    def _on_rlm_result(self, envelope: list[Any], req: RlmResult, blobs: list[Any]) -> None:
        self.sessions.rlm_result(req)

    # ------------------------------------------------------------ workers

    def _send_worker(self, worker: Worker, wire: dict[str, Any], blobs: Sequence[Any] = ()) -> None:
        if self._worker_sock is None or self._worker_sock.closed:
            return
        _send(self._worker_sock, [worker.wid.encode(), pack(wire), *blobs])

    async def _serve_workers(self) -> None:
        sock = self._worker_sock
        assert sock is not None
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                self._on_worker_message(frames)
            except Exception:  # the loop boundary for worker messages
                log.exception("handling a worker message failed")

    def _on_worker_message(self, frames: list[Any]) -> None:
        if len(frames) < 2:
            return
        ident = bytes(frames[0].buffer).decode("ascii", "replace")
        wid, _, channel = ident.partition(":")
        worker = self.supervisor.workers.get(wid)
        if worker is None or not worker.alive:
            return
        self.supervisor.seen(worker)
        if channel == "hb":
            return
        try:
            message = decode_from_worker(
                frames[1].buffer, len(frames) - 2, max_bytes=self.config.max_context_bytes
            )
        except ProtocolError as exc:
            log.warning("worker %s sent an unreadable message: %s", wid, exc.message)
            return
        self._worker_ops[type(message)](worker, message, list(frames[2:]))


def _send(sock: zmq.asyncio.Socket, frames: list[Any]) -> None:
    """Send without waiting; a peer that is gone is nobody to tell."""
    try:
        # zmq.asyncio returns a Future (typed as a plain Awaitable); NOBLOCK makes it done at once
        # unless the socket's queue is full.
        future = cast("asyncio.Future[Any]", sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False))
    except zmq.ZMQError as exc:
        log.debug("send dropped: %s", exc)
        return
    if future.done():
        if not future.cancelled() and future.exception() is not None:
            log.debug("send dropped: %s", future.exception())
    else:
        future.add_done_callback(mark_retrieved)
