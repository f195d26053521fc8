"""The sandbox pool: one asyncio loop, a ROUTER for orchestrators, a ROUTER for its workers.

Life of a worker (one per session, never reused):

    STARTING --READY--> WARM --open--> SESSION --close / timeout / death / silence--> KILLED --> exit
        (spawned ahead of demand)         (loads the context, runs execs)          (cleanup, refill)

Liveness: a worker's exit is seen at once (a pidfd in the event loop). Its heartbeat thread sends
every ``heartbeat_interval_s``; a worker silent for ``interval x liveness`` is lost, except that a
worker in a session whose CPU time still advances is busy (a C call holding the GIL), not hung,
and is left to its exec deadline.

Errors, from the wire's point of view:

    ProtocolError (codec)      -> bad_request / unsupported_version / unknown_op / too_large
    PoolFailure                -> its code: unknown_session, session_busy, session_lost,
                                  pool_exhausted, overloaded, bad_request, too_large, timeout
    the pool stopping          -> unavailable
    anything else              -> internal (logged with traceback; the loop lives on)

A failure of the model's code is not an error reply: it is an ``ExecResult`` with ``error`` set
(exception, memory, timeout, worker_died).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import zmq
import zmq.asyncio

from rlmq.protocol import ErrorCode, ErrorReply, ProtocolError, RlmqError, pack, peek_id
from rlmq.protocol.client import configure_socket
from rlmq.protocol.sandbox import (
    CloseReply,
    CloseRequest,
    ContextFormat,
    ExecError,
    ExecReply,
    ExecRequest,
    ExecResult,
    OpenReply,
    OpenRequest,
    RlmQuery,
    RlmResult,
    SandboxCode,
    SandboxPing,
    SandboxPong,
    SandboxStats,
    SandboxStatsReply,
    SessionInfo,
    decode_sandbox_request,
    split_delimited,
)
from rlmq.protocol.security import CurveClientKeys, CurveServerKeys, ServerSecurity, uses_curve

from . import procs
from ._wire import (
    Assign,
    Exec,
    Heartbeat,
    Loaded,
    Ready,
    Result,
    RlmAnswer,
    WorkerRlmQuery,
    decode_from_worker,
)
from .config import ConfigError, PoolConfig
from .isolation import Cgroups, HandlerProxy, UidSlots, find_bwrap, worker_command, worker_env
from .spec import WorkerSpec

__all__ = ["Pool", "PoolFailure"]

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_RLM_PENDING = 64  # outstanding rlm_query requests per session
_SIGNALS = {
    signal.SIGKILL: "killed by SIGKILL (from outside, or by the kernel when out of memory)",
    signal.SIGXCPU: "stopped by its CPU time limit (SIGXCPU)",
    signal.SIGSEGV: "crashed (SIGSEGV)",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGBUS: "crashed (SIGBUS)",
    signal.SIGTERM: "terminated (SIGTERM)",
}


class PoolFailure(RlmqError):
    """A failure that becomes an error reply with this code (an ErrorCode or SandboxCode)."""

    code: str  # type: ignore[assignment]

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message, retryable=retryable)
        self.code = code


class WorkerGone(PoolFailure):
    """The worker exited or was killed; ``message`` says how."""

    def __init__(self, message: str) -> None:
        super().__init__(SandboxCode.SESSION_LOST, message)


class _State(enum.Enum):
    STARTING = "starting"
    WARM = "warm"
    SESSION = "session"
    KILLED = "killed"
    EXITED = "exited"


def _describe_exit(code: int | None) -> str:
    """The nanny exits with the code-running child's status, 128 + signal when it was killed."""
    if code is None:
        return "the worker vanished"
    sig = -code if code < 0 else code - 128 if code > 128 else 0
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        known = {int(k): v for k, v in _SIGNALS.items()}
        return "the worker was " + known.get(sig, f"killed by {name}")
    return f"the worker exited with status {code}"


@dataclass(eq=False)
class _Worker:
    wid: str
    uid: int | None
    workdir: Path
    state: _State = _State.STARTING
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    stderr_fd: int | None = None
    stderr_tail: bytes = b""
    child_pid: int | None = None  # host pid of the code-running process, known at READY
    started: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    cpu_mark: int | None = None
    waiters: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    session: _Session | None = None
    kill_reason: str | None = None
    kill_timer: asyncio.TimerHandle | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def alive(self) -> bool:
        return self.state in (_State.STARTING, _State.WARM, _State.SESSION)


@dataclass(eq=False)
class _Session:
    id: str
    run: str
    depth: int
    max_depth: int
    sub_model: str
    handler: str | None
    exec_timeout_s: float
    max_output_chars: int
    rlm_error: str | None
    context_format: str
    context_blob: Any  # a zmq.Frame (inline) or bytes (read from a path); kept for reloads
    envelope: list[Any]
    info: SessionInfo | None = None
    worker: _Worker | None = None
    replacing: asyncio.Task[None] | None = None
    executing: bool = False
    lost_reason: str | None = None  # the worker died between execs: told on the next exec
    broken: str | None = None  # no replacement could be started: the session is lost
    closed: bool = False
    last_used: float = field(default_factory=time.monotonic)
    reloads: int = 0
    rlm_pending: dict[str, tuple[_Worker, str]] = field(default_factory=dict)


class _Stats:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.counters: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.open_ms: deque[float] = deque(maxlen=1000)
        self.exec_ms: deque[float] = deque(maxlen=1000)

    def inc(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n


def _percentiles(values: deque[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ordered[-1], 3)}


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


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
        loopback). ``curve_client``: keys for reaching a handler that requires CURVE; then the
        workers reach it through a proxy in the pool, so they never hold a key."""
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
        self._base: Path | None = None
        self._ipc_dir: Path | None = None
        self._public_dir: Path | None = None
        self._bwrap: str | None = None
        self._cgroups: Cgroups | None = None
        self._drop = config.uid_base is not None and os.geteuid() == 0
        self._uids = UidSlots(config.uid_base, config.uid_count) if self._drop and config.uid_base else None
        self._worker_handler = config.handler
        self._proxies: dict[str, HandlerProxy] = {}
        self._workers: dict[str, _Worker] = {}
        self._warm: deque[_Worker] = deque()
        self._starting: set[_Worker] = set()
        self._sessions: dict[str, _Session] = {}
        self._opening = 0
        self._demand = 0
        self._ready_event = asyncio.Event()
        self._ids = itertools.count(1)
        self._failures = 0  # consecutive workers that died before READY
        self._spawn_after = 0.0
        self._last_failure = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._stopped = asyncio.Event()
        # Spawns, cleanups and /proc scans block: they run here, never on the event loop, and
        # never in the loop's default executor (the pool may live inside a bigger program).
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sandbox-pool")
        self.stats = _Stats()
        self._dispatch: dict[type, Callable[[list[Any], Any, list[Any]], None]] = {
            OpenRequest: self._on_open,
            ExecRequest: self._on_exec,
            CloseRequest: self._on_close,
            SandboxPing: self._on_ping,
            SandboxStats: self._on_stats,
            RlmResult: self._on_rlm_result,
        }

    # ------------------------------------------------------------ life cycle

    async def start(self) -> str:
        """Bind, start the warm workers, serve in the background; returns the bound address.
        Workers become ready in the background (``wait_ready``)."""
        if self.config.isolation == "bwrap":
            self._bwrap = find_bwrap()
            if self._bwrap is None:
                raise ConfigError('isolation = "bwrap" but bubblewrap (bwrap) is not installed')
        base = await self._blocking(_make_dirs)
        self._base = base
        self._ipc_dir = base / "ipc"
        self._public_dir = base / "public"
        if self._drop and self.config.cgroup:
            self._cgroups = await self._blocking(Cgroups.create, base.name)
        wsock = self._ctx.socket(zmq.ROUTER)
        configure_socket(wsock)
        # A worker runs untrusted code: cap what one message from it may make the pool hold.
        wsock.setsockopt(zmq.MAXMSGSIZE, self.config.max_context_bytes + 16 * 1024 * 1024)
        wsock.bind(f"ipc://{self._ipc_dir / 'workers.sock'}")
        self._worker_sock = wsock
        handler_curve = (
            self._curve_client if uses_curve(self.config.handler, self._curve_client is not None) else None
        )
        if self._bwrap is not None:
            proxy = HandlerProxy(
                self.config.handler, str(self._ipc_dir / "handler.sock"), curve=handler_curve
            )
            self._worker_handler = await self._blocking(proxy.start)
            self._proxies[self.config.handler] = proxy
        elif handler_curve is not None:
            # Workers run untrusted code: the CURVE client key stays in the pool, in a proxy.
            self._worker_handler = await self._public_proxy(self.config.handler, curve=handler_curve)
        csock = self._ctx.socket(zmq.ROUTER)
        configure_socket(csock)
        self._clients = csock
        self.address = self._security.bind(csock, self.config.bind)
        self._spawn_task(self._serve_clients())
        self._spawn_task(self._serve_workers())
        self._spawn_task(self._housekeeping())
        self._refill()
        log.info(
            "sandbox pool on %s (isolation %s, %d warm workers, uid drop %s, cgroup %s)",
            self.address,
            self.config.isolation,
            self.config.workers,
            "on" if self._drop else "off",
            "on" if self._cgroups else "off",
        )
        return self.address

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the warm pool is full (``workers`` READY)."""
        timeout = self.config.open_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while len(self._warm) < self.config.workers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PoolFailure(
                    SandboxCode.POOL_EXHAUSTED,
                    f"{len(self._warm)} of {self.config.workers} workers ready after {timeout:g} s"
                    + (f"; last failure: {self._last_failure}" if self._last_failure else ""),
                )
            event = self._ready_event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)

    async def wait_cleaned(self, timeout_s: float = 15.0) -> None:
        """Wait until every discarded worker has exited and been cleaned up (tests use this)."""
        async with asyncio.timeout(timeout_s):
            while True:
                dying = [w for w in self._workers.values() if w.state in (_State.KILLED, _State.EXITED)]
                if not dying:
                    return
                await dying[0].exited.wait()

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
        keep = ("launch", "cleanup", "resolve")
        for task in list(self._tasks):
            if not task.get_name().startswith(keep):
                task.cancel()
        launching = [t for t in self._tasks if t.get_name().startswith(("launch", "resolve"))]
        if launching:
            await asyncio.wait(launching, timeout=10.0)
        for worker in list(self._workers.values()):
            self._kill(worker, "the pool is stopping")
        exits = [w.exited.wait() for w in self._workers.values()]
        if exits:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(e) for e in exits], timeout=self.config.kill_grace_s + 2.0
            )
            for p in pending:
                p.cancel()
        for worker in list(self._workers.values()):
            if not worker.exited.is_set():
                log.warning("worker %s did not exit; cleaning up after it", worker.wid)
                self._force_kill(worker)
                self._on_exit(worker, force=True)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10.0)
        for proxy in self._proxies.values():
            await self._blocking(proxy.stop)
        if self._cgroups is not None:
            await self._blocking(self._cgroups.remove_root)
        if self._base is not None:
            await self._blocking(shutil.rmtree, self._base, True)
        for sock in (self._clients, self._worker_sock):
            if sock is not None:
                sock.close(linger=0)
        self._security.close()
        self._executor.shutdown(wait=True)
        if self._own_context:
            self._ctx.term()
        self._stopped.set()
        log.info("sandbox pool stopped")

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _spawn_task(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------ client side: receive loop

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
                        self._error(parts[0], rid, ErrorCode.INTERNAL, "internal error in the sandbox pool")

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
            self._error(envelope, exc.request_id, exc.code, exc.message)
            return
        self.stats.inc(f"op_{request.OP}")
        self._dispatch[type(request)](envelope, request, blobs)

    def _send_client(self, envelope: list[Any], wire: dict[str, Any], blobs: list[Any] | None = None) -> None:
        if self._clients is None or self._clients.closed:
            return
        _send(self._clients, [*envelope, pack(wire), *(blobs or [])])

    def _error(self, envelope: list[Any], rid: str, code: str, message: str, retryable: bool = False) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        self._send_client(envelope, ErrorReply(rid, code, message, retryable).to_wire())

    def _run_op(self, envelope: list[Any], rid: str, op: Coroutine[Any, Any, dict[str, Any]]) -> None:
        """Run an op that waits as its own task; its result (a reply map) or failure is sent."""

        async def run() -> None:
            try:
                wire = await op
            except PoolFailure as f:
                self._error(envelope, rid, f.code, f.message, f.retryable)
            except asyncio.CancelledError:
                self._error(envelope, rid, ErrorCode.UNAVAILABLE, "the sandbox pool is stopping", True)
                raise
            except Exception:  # the task boundary: same rule as the receive loop
                log.exception("op %s failed", rid)
                self._error(envelope, rid, ErrorCode.INTERNAL, "internal error in the sandbox pool")
            else:
                self._send_client(envelope, wire)

        task = self._spawn_task(run(), name=f"op {rid}")
        # A task cancelled before its first step never starts `op`: close it, quietly.
        task.add_done_callback(lambda _: op.close())

    # ------------------------------------------------------------ ops

    def _on_ping(self, envelope: list[Any], req: SandboxPing, blobs: list[Any]) -> None:
        pong = SandboxPong(req.id, self.config.isolation, len(self._warm), len(self._sessions))
        self._send_client(envelope, pong.to_wire())

    def _on_stats(self, envelope: list[Any], req: SandboxStats, blobs: list[Any]) -> None:
        self._send_client(envelope, SandboxStatsReply(req.id, self.snapshot()).to_wire())

    def snapshot(self) -> dict[str, Any]:
        states: dict[str, int] = {s.value: 0 for s in _State}
        for w in self._workers.values():
            states[w.state.value] += 1
        return {
            "uptime_s": round(time.monotonic() - self.stats.started, 3),
            "isolation": self.config.isolation,
            "uid_drop": self._drop,
            "cgroup": self._cgroups is not None,
            "sessions_open": len(self._sessions),
            "workers": states,
            "counters": dict(self.stats.counters),
            "errors": dict(self.stats.errors),
            "open_ms": _percentiles(self.stats.open_ms),
            "exec_ms": _percentiles(self.stats.exec_ms),
        }

    def _on_open(self, envelope: list[Any], req: OpenRequest, blobs: list[Any]) -> None:
        if self._stopping:
            self._error(envelope, req.id, ErrorCode.UNAVAILABLE, "the sandbox pool is stopping", True)
            return
        if len(self._sessions) + self._opening >= self.config.max_sessions:
            self._error(
                envelope,
                req.id,
                ErrorCode.OVERLOADED,
                f"the pool has {len(self._sessions) + self._opening} sessions (max_sessions "
                f"{self.config.max_sessions}); close one or retry later",
                retryable=True,
            )
            return
        self._opening += 1
        self._run_op(envelope, req.id, self._open(envelope, req, blobs))

    async def _open(self, envelope: list[Any], req: OpenRequest, blobs: list[Any]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            fmt, blob = await self._context_of(req, blobs)
            if req.depth + 1 >= req.max_depth:
                rlm_error: str | None = (
                    f"rlm_query is disabled at depth {req.depth} (max_depth={req.max_depth}): a child "
                    f"run would be at depth {req.depth + 1}. Use llm_query(prompt) for a plain sub-call."
                )
            elif not req.rlm_query:
                rlm_error = (
                    "rlm_query is not available: the orchestrator that opened this session does not "
                    "answer recursive runs. Use llm_query(prompt) for a plain sub-call."
                )
            else:
                rlm_error = None
            handler = req.handler if req.handler and req.handler != self.config.handler else None
            if handler is not None and self._bwrap is not None:
                handler = await self._public_proxy(handler)
            session = _Session(
                id=f"s-{os.urandom(6).hex()}",
                run=req.run,
                depth=req.depth,
                max_depth=req.max_depth,
                sub_model=req.sub_model,
                handler=handler,
                exec_timeout_s=req.exec_timeout_s or self.config.exec_timeout_s,
                max_output_chars=req.max_output_chars or self.config.max_output_chars,
                rlm_error=rlm_error,
                context_format=fmt,
                context_blob=blob,
                envelope=envelope,
            )
            info: SessionInfo | None = None
            last: PoolFailure | None = None
            for _ in range(2):  # a worker that dies while loading gets one successor
                worker = await self._acquire_worker(self.config.open_timeout_s)
                try:
                    info = await self._assign(session, worker)
                    break
                except WorkerGone as gone:
                    last = PoolFailure(
                        SandboxCode.SESSION_LOST, f"the worker died while loading the context: {gone.message}"
                    )
            if info is None:
                assert last is not None
                raise last
            if self._stopping:
                raise PoolFailure(ErrorCode.UNAVAILABLE, "the sandbox pool is stopping", retryable=True)
            self._sessions[session.id] = session
            self.stats.inc("sessions_opened")
            self.stats.open_ms.append((time.monotonic() - started) * 1000.0)
            log.debug(
                "session %s open on %s (run %s)", session.id, session.worker and session.worker.wid, req.run
            )
            return OpenReply(
                req.id, session.id, info, session.exec_timeout_s, session.max_output_chars
            ).to_wire()
        finally:
            self._opening -= 1

    async def _context_of(self, req: OpenRequest, blobs: list[Any]) -> tuple[str, Any]:
        limit = self.config.max_context_bytes
        if req.context_format is not None:
            blob = blobs[0]
            if len(blob) > limit:
                raise PoolFailure(
                    ErrorCode.TOO_LARGE, f"context of {len(blob):,} bytes is over max_context_bytes {limit:,}"
                )
            return req.context_format, blob
        if req.context_path is None:
            return ContextFormat.TEXT.value, b""
        path = req.context_path
        fmt = ContextFormat.JSON.value if path.lower().endswith(".json") else ContextFormat.TEXT.value

        def read() -> bytes:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > limit:
                    raise PoolFailure(
                        ErrorCode.TOO_LARGE, f"{path} has {size:,} bytes, over max_context_bytes {limit:,}"
                    )
                return f.read(limit + 1)

        try:
            data = await self._blocking(read)
        except OSError as exc:
            raise PoolFailure(
                ErrorCode.BAD_REQUEST, f"cannot read context_path {path}: {exc.strerror}"
            ) from None
        if len(data) > limit:
            raise PoolFailure(ErrorCode.TOO_LARGE, f"{path} is over max_context_bytes {limit:,}")
        return fmt, data

    async def _public_proxy(self, upstream: str, *, curve: CurveClientKeys | None = None) -> str:
        """A handler reached through a proxy the worker may connect to after its uid drop (the
        socket is world-connectable in a directory it can traverse): for a per-session handler
        under bwrap, and for a handler that requires CURVE (the key stays in the pool)."""
        proxy = self._proxies.get(upstream)
        if proxy is None:
            assert self._public_dir is not None
            path = str(self._public_dir / f"handler-{len(self._proxies)}.sock")
            proxy = HandlerProxy(upstream, path, public=True, curve=curve)
            self._proxies[upstream] = proxy
            await self._blocking(proxy.start)
        return proxy.address

    async def _assign(self, session: _Session, worker: _Worker) -> SessionInfo:
        """Give ``worker`` the session and its context; the worker is the session's on success
        and discarded on failure (it has seen the context: never reused)."""
        worker.state = _State.SESSION
        worker.session = session
        future: asyncio.Future[Loaded] = asyncio.get_running_loop().create_future()
        worker.waiters["load"] = future
        assign = Assign(
            session=session.id,
            run=session.run,
            depth=session.depth,
            sub_model=session.sub_model,
            max_output_chars=session.max_output_chars,
            context_format=session.context_format,
            rlm_error=session.rlm_error,
            handler=session.handler,
        )
        self._send_worker(worker, assign.to_wire(), [session.context_blob])
        try:
            loaded = await asyncio.wait_for(future, self.config.open_timeout_s)
        except TimeoutError:
            self._kill(
                worker,
                f"the worker was killed: it did not load the context within {self.config.open_timeout_s:g} s",
            )
            raise PoolFailure(
                ErrorCode.TIMEOUT,
                f"the worker did not load the context within {self.config.open_timeout_s:g} s",
                retryable=True,
            ) from None
        finally:
            worker.waiters.pop("load", None)
        if not loaded.ok or loaded.info is None:
            self._kill(worker, "the worker was killed: its context could not be loaded")
            raise PoolFailure(loaded.error_code or ErrorCode.BAD_REQUEST, loaded.error_message)
        assert worker.child_pid is not None
        info = replace(loaded.info, worker_pid=worker.child_pid)
        if session.closed or self._stopping:
            self._kill(worker, "the session was closed")
            raise PoolFailure(SandboxCode.UNKNOWN_SESSION, f"session {session.id} was closed")
        session.worker = worker
        session.info = info
        return info

    def _on_exec(self, envelope: list[Any], req: ExecRequest, blobs: list[Any]) -> None:
        session = self._sessions.get(req.session)
        if session is None:
            self._error(envelope, req.id, SandboxCode.UNKNOWN_SESSION, f"no open session {req.session!r}")
            return
        if session.executing:
            self._error(
                envelope, req.id, SandboxCode.SESSION_BUSY, f"session {req.session} is already running code"
            )
            return
        session.executing = True
        session.envelope = envelope  # rlm_query requests go back the way the exec came
        self._run_op(envelope, req.id, self._exec(session, req))

    async def _exec(self, session: _Session, req: ExecRequest) -> dict[str, Any]:
        try:
            worker = await self._session_worker(session)
            timeout = req.timeout_s or session.exec_timeout_s
            lost, session.lost_reason = session.lost_reason, None
            exec_id = f"x{next(self._ids)}"
            future: asyncio.Future[ExecResult] = asyncio.get_running_loop().create_future()
            worker.waiters[exec_id] = future
            started = time.monotonic()
            self._send_worker(worker, Exec(exec_id, req.code, timeout).to_wire())
            self.stats.inc("execs")
            try:
                result = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                self.stats.inc("exec_timeouts")
                message = (
                    f"killed after {timeout:g} s (the exec timeout); the session's variables are lost "
                    "and the next exec runs on a fresh worker with `context` reloaded"
                )
                self._kill(
                    worker, f"the worker was killed at the exec timeout ({timeout:g} s)", replace_for=session
                )
                result = _failed_result("timeout", "TimeoutError", message, started)
            except WorkerGone as gone:
                self.stats.inc("exec_worker_died")
                message = f"{gone.message} while the code ran" + (
                    ""
                    if session.closed
                    else "; the session's variables are lost and the next exec runs on a fresh "
                    "worker with `context` reloaded"
                )
                result = _failed_result("worker_died", "WorkerDied", message, started)
            finally:
                worker.waiters.pop(exec_id, None)
            if lost is not None and not result.state_lost:
                note = f"[rlmq] {lost} between execs: variables were lost and `context` was reloaded.\n"
                result = replace(result, state_lost=True, stderr=note + result.stderr)
            self.stats.exec_ms.append((time.monotonic() - started) * 1000.0)
            session.last_used = time.monotonic()
            reply = ExecReply(req.id, session.id, result).to_wire()
            pid = session.worker.child_pid if session.worker is not None else None
            if pid is not None:
                reply["worker_pid"] = pid  # changes when the session moved to a fresh worker
            return reply
        finally:
            session.executing = False
            session.last_used = time.monotonic()

    async def _session_worker(self, session: _Session) -> _Worker:
        if session.replacing is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(session.replacing), self.config.open_timeout_s * 2 + 5)
        worker = session.worker
        if worker is None or not worker.alive or session.broken:
            self._sessions.pop(session.id, None)
            self.stats.inc("sessions_lost")
            raise PoolFailure(
                SandboxCode.SESSION_LOST,
                f"session {session.id} is lost: {session.broken or 'no worker could replace the dead one'}",
            )
        return worker

    def _on_close(self, envelope: list[Any], req: CloseRequest, blobs: list[Any]) -> None:
        session = self._sessions.pop(req.session, None)
        if session is None:
            self._error(envelope, req.id, SandboxCode.UNKNOWN_SESSION, f"no open session {req.session!r}")
            return
        self._close_session(session, "the session was closed")
        self.stats.inc("sessions_closed")
        self._send_client(envelope, CloseReply(req.id, session.id).to_wire())

    def _close_session(self, session: _Session, reason: str) -> None:
        session.closed = True
        if session.replacing is not None:
            session.replacing.cancel()
        if session.worker is not None:
            self._kill(session.worker, reason)
            session.worker = None
        session.context_blob = b""

    def _on_rlm_result(self, envelope: list[Any], req: RlmResult, blobs: list[Any]) -> None:
        session = self._sessions.get(req.session)
        entry = session.rlm_pending.pop(req.id, None) if session is not None else None
        if entry is None:
            self.stats.inc("rlm_results_dropped")
            return
        worker, worker_qid = entry
        if not worker.alive:
            return
        if req.ok:
            answer = RlmAnswer(worker_qid, True, text=req.text or "")
        else:
            # TODO(structural): RlmAnswer carries ErrorInfo once the worker wire does.
            error = req.error
            answer = RlmAnswer(worker_qid, False, error=f"({error.code}) {error.message}" if error else "")
        self._send_worker(worker, answer.to_wire())

    # ------------------------------------------------------------ worker side

    def _send_worker(self, worker: _Worker, wire: dict[str, Any], blobs: list[Any] | None = None) -> None:
        if self._worker_sock is None or self._worker_sock.closed:
            return
        _send(self._worker_sock, [worker.wid.encode(), pack(wire), *(blobs or [])])

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
        worker = self._workers.get(wid)
        if worker is None or not worker.alive:
            return
        worker.last_seen = time.monotonic()
        try:
            message = decode_from_worker(
                frames[1].buffer, len(frames) - 2, max_bytes=self.config.max_context_bytes
            )
        except ProtocolError as exc:
            log.warning("worker %s sent an unreadable message: %s", wid, exc.message)
            return
        if channel == "hb" or isinstance(message, Heartbeat):
            return
        if isinstance(message, Ready):
            self._on_ready(worker, message)
        elif isinstance(message, Loaded):
            future = worker.waiters.get("load")
            if future is not None and not future.done():
                future.set_result(message)
        elif isinstance(message, Result):
            future = worker.waiters.get(message.id)
            if future is not None and not future.done():
                future.set_result(message.result)
        elif isinstance(message, WorkerRlmQuery):
            self._forward_rlm_query(worker, message, list(frames[2:]))

    def _on_ready(self, worker: _Worker, msg: Ready) -> None:
        if worker.state is not _State.STARTING:
            return
        if self._bwrap is None:
            self._became_ready(worker, msg.pid)
            return
        assert worker.proc is not None
        root = worker.proc.pid

        async def resolve() -> None:  # the worker knows only its pid inside its namespace
            pid = await self._blocking(procs.host_pid_of, msg.pid, root)
            if pid is None:
                self._kill(worker, "the worker was killed: its host pid could not be found")
            elif worker.state is _State.STARTING:
                self._became_ready(worker, pid)

        self._spawn_task(resolve(), name=f"resolve {worker.wid}")

    def _became_ready(self, worker: _Worker, pid: int) -> None:
        worker.child_pid = pid
        worker.state = _State.WARM
        self._starting.discard(worker)
        self._warm.append(worker)
        self._failures = 0
        self.stats.inc("workers_ready")
        log.debug(
            "worker %s ready (pid %d, %.0f ms)", worker.wid, pid, (time.monotonic() - worker.started) * 1000
        )
        event, self._ready_event = self._ready_event, asyncio.Event()
        event.set()

    def _forward_rlm_query(self, worker: _Worker, msg: WorkerRlmQuery, blobs: list[Any]) -> None:
        session = worker.session
        if session is None or session.worker is not worker or session.closed:
            return
        if session.rlm_error is not None or len(session.rlm_pending) >= MAX_RLM_PENDING:
            why = session.rlm_error or f"more than {MAX_RLM_PENDING} rlm_query requests outstanding"
            self._send_worker(worker, RlmAnswer(msg.id, False, error=why).to_wire())
            return
        qid = f"{session.id}.{msg.id}"
        session.rlm_pending[qid] = (worker, msg.id)
        self.stats.inc("rlm_queries")
        query = RlmQuery(qid, session.id, msg.prompt, msg.context_format)
        self._send_client(session.envelope, query.to_wire(), blobs)

    # ------------------------------------------------------------ workers: supply

    def _pop_warm(self) -> _Worker | None:
        while self._warm:
            worker = self._warm.popleft()
            if worker.state is _State.WARM:
                return worker
        return None

    async def _acquire_worker(self, timeout_s: float) -> _Worker:
        deadline = time.monotonic() + timeout_s
        self._demand += 1
        try:
            while True:
                worker = self._pop_warm()
                if worker is not None:
                    return worker
                if self._stopping:
                    raise PoolFailure(ErrorCode.UNAVAILABLE, "the sandbox pool is stopping", retryable=True)
                self._refill()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolFailure(
                        SandboxCode.POOL_EXHAUSTED,
                        f"no worker became ready within {timeout_s:g} s"
                        + (f"; last failure: {self._last_failure}" if self._last_failure else ""),
                        retryable=True,
                    )
                event = self._ready_event
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
        finally:
            self._demand -= 1
            self._refill()

    def _refill(self) -> None:
        """Start workers until the warm pool (plus anyone waiting for a worker) is covered."""
        if self._stopping or self._clients is None:
            return
        now = time.monotonic()
        if now < self._spawn_after:
            asyncio.get_running_loop().call_later(self._spawn_after - now + 0.01, self._refill)
            return
        want = self.config.workers + self._demand
        have = len(self._warm) + len(self._starting)
        live = sum(1 for w in self._workers.values() if w.alive)
        cap = self.config.max_sessions + self.config.workers
        while have < want and live < cap:
            self._start_worker()
            have += 1
            live += 1

    def _start_worker(self) -> None:
        assert self._base is not None
        uid = None
        if self._uids is not None:
            uid = self._uids.take()
            if uid is None:
                self._last_failure = "no free uid in the uid range"
                return
        wid = f"w{next(self._ids)}"
        worker = _Worker(wid=wid, uid=uid, workdir=self._base / wid)
        self._workers[wid] = worker
        self._starting.add(worker)
        self._spawn_task(self._launch(worker), name=f"launch {wid}")

    def _spec(self, worker: _Worker) -> WorkerSpec:
        assert self._ipc_dir is not None
        return WorkerSpec(
            wid=worker.wid,
            pool=f"ipc://{self._ipc_dir / 'workers.sock'}",
            handler=self._worker_handler,
            workdir=str(worker.workdir),
            uid=worker.uid,
            gid=worker.uid,
            memory_mb=self.config.memory_mb,
            cpu_s=self.config.cpu_s,
            fsize_mb=self.config.fsize_mb,
            nproc=self.config.nproc,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            preimport=self.config.preimport,
            connect_timeout_s=min(5.0, self.config.open_timeout_s),
        )

    def _popen(self, worker: _Worker) -> tuple[subprocess.Popen[bytes], int] | None:
        """In a thread: the worker's directory, cgroup and process. None: its uid is taken on
        this host (another pool?), try another."""
        if worker.uid is not None and procs.pids_of_uid(worker.uid, include_zombies=True):
            return None
        worker.workdir.mkdir(mode=0o700)
        if worker.uid is not None:
            os.chown(worker.workdir, worker.uid, worker.uid)
        cgroup_procs = None
        if self._cgroups is not None:
            cgroup_procs = self._cgroups.make(worker.wid, self.config.nproc + 8)
        assert self._ipc_dir is not None
        assert self._public_dir is not None
        spec = self._spec(worker)
        cmd = worker_command(
            self.config,
            spec,
            bwrap=self._bwrap,
            bind_dirs=[str(self._ipc_dir), str(self._public_dir)],
            cgroup_procs=cgroup_procs,
        )
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=worker_env(spec.workdir),
            cwd=self._base,
            start_new_session=True,
            close_fds=True,
        )
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
            raise
        return proc, pidfd

    async def _launch(self, worker: _Worker) -> None:
        try:
            launched = await self._blocking(self._popen, worker)
        except Exception as exc:  # OSError from mkdir/cgroup/exec; a bug here must not stop the pool
            log.exception("starting worker %s failed", worker.wid)
            self._last_failure = f"cannot start a worker: {exc}"
            self._failures += 1
            self._forget(worker, avoid_uid=False)
            return
        if launched is None:
            log.info("uid %s has processes on this host; skipping it", worker.uid)
            self._forget(worker, avoid_uid=True)
            return
        proc, pidfd = launched
        worker.proc = proc
        worker.pidfd = pidfd
        loop = asyncio.get_running_loop()
        loop.add_reader(pidfd, self._on_exit, worker)
        if proc.stderr is not None:
            fd = proc.stderr.fileno()
            os.set_blocking(fd, False)
            worker.stderr_fd = fd
            loop.add_reader(fd, self._on_stderr, worker)
        if worker.state is _State.KILLED:  # discarded (the pool stopping) while being spawned
            self._signal_worker(worker, was_starting=True)

    def _forget(self, worker: _Worker, *, avoid_uid: bool) -> None:
        """A worker that never got a process."""
        worker.state = _State.EXITED
        self._starting.discard(worker)
        self._workers.pop(worker.wid, None)
        if self._uids is not None and worker.uid is not None:
            self._uids.release(worker.uid, avoid=avoid_uid)
        with contextlib.suppress(OSError):
            worker.workdir.rmdir()
        worker.exited.set()
        self._refill()

    def _on_stderr(self, worker: _Worker) -> None:
        fd = worker.stderr_fd
        if fd is None:
            return
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(fd)
            worker.stderr_fd = None
            if worker.proc is not None and worker.proc.stderr is not None:
                worker.proc.stderr.close()
            return
        worker.stderr_tail = (worker.stderr_tail + data)[-4096:]
        log.debug("worker %s stderr: %s", worker.wid, data.decode("utf-8", "replace").rstrip())

    # ------------------------------------------------------------ workers: death

    def _kill(self, worker: _Worker, reason: str, *, replace_for: _Session | None = None) -> None:
        """Discard a worker: fail what waits on it, detach it from its session (and, with
        ``replace_for``, start a successor for that session), kill it. Cleanup follows its exit."""
        if worker.state in (_State.KILLED, _State.EXITED):
            return
        worker.kill_reason = reason
        was_starting = worker.state is _State.STARTING
        worker.state = _State.KILLED
        self._starting.discard(worker)
        self._fail_waiters(worker, reason)
        session = worker.session
        worker.session = None
        if session is not None and session.worker is worker:
            session.worker = None
            if replace_for is session:
                self._replace(session)
        self.stats.inc("workers_killed")
        self._signal_worker(worker, was_starting)
        self._refill()

    def _signal_worker(self, worker: _Worker, was_starting: bool) -> None:
        if worker.proc is None:
            return  # not launched yet: _launch signals it when Popen returns
        if worker.child_pid is not None and not was_starting:
            # The nanny sees its child die, kills and reaps the rest, and exits (then, under
            # bwrap, bubblewrap's init and bubblewrap itself): nothing is left unreaped.
            _signal(worker.child_pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.killpg(worker.child_pid, signal.SIGKILL)
        elif self._bwrap is not None:
            self._spawn_task(self._kill_unready_bwrap(worker), name=f"resolve kill {worker.wid}")
        else:
            _signal(worker.proc.pid, signal.SIGTERM)  # the nanny kills its child
        loop = asyncio.get_running_loop()
        worker.kill_timer = loop.call_later(self.config.kill_grace_s, self._force_kill, worker)

    async def _kill_unready_bwrap(self, worker: _Worker) -> None:
        """Not ready yet under bwrap: kill the nanny, pid 1 of the namespace (the kernel then
        kills the rest), found as bubblewrap's child so that bubblewrap reaps it. Only signals
        with a handler reach a namespace's pid 1 from outside, and SIGKILL."""
        assert worker.proc is not None
        outer = worker.proc.pid
        table = await self._blocking(procs.process_table)
        for pid in [p for p, parent in table.items() if parent == outer] or [outer]:
            _signal(pid, signal.SIGKILL)

    def _force_kill(self, worker: _Worker) -> None:
        if worker.exited.is_set() or worker.proc is None:
            return
        log.warning(
            "worker %s did not exit %.1f s after being killed; SIGKILL", worker.wid, self.config.kill_grace_s
        )
        _signal(worker.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(worker.proc.pid, signal.SIGKILL)

    def _fail_waiters(self, worker: _Worker, reason: str) -> None:
        for future in worker.waiters.values():
            if not future.done():
                future.set_exception(WorkerGone(reason))
                future.add_done_callback(_mark_retrieved)
        worker.waiters.clear()

    def _on_exit(self, worker: _Worker, *, force: bool = False) -> None:
        """The worker's process exited (its pidfd is readable): reap, report, clean up, refill."""
        if worker.exited.is_set():
            return
        loop = asyncio.get_running_loop()
        code: int | None = None
        if worker.pidfd is not None:
            loop.remove_reader(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = None
        if worker.proc is not None:
            if force:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = worker.proc.wait(timeout=0.5)
            else:
                code = worker.proc.wait()
        if worker.stderr_fd is not None:
            loop.remove_reader(worker.stderr_fd)
            worker.stderr_fd = None
            if worker.proc is not None and worker.proc.stderr is not None:
                worker.proc.stderr.close()
        if worker.kill_timer is not None:
            worker.kill_timer.cancel()
        reason = _describe_exit(code)
        if worker.state is _State.STARTING:
            self._failures += 1
            tail = worker.stderr_tail.decode("utf-8", "replace").strip().splitlines()[-5:]
            self._last_failure = f"{reason} before it was ready" + (f": {' | '.join(tail)}" if tail else "")
            log.warning("worker %s: %s", worker.wid, self._last_failure)
            if self._failures >= 3:
                self._spawn_after = time.monotonic() + min(10.0, 0.25 * 2 ** min(self._failures, 6))
        elif worker.state is not _State.KILLED:
            log.info("worker %s: %s", worker.wid, reason)
            self.stats.inc("workers_died")
        session = worker.session
        if worker.state is not _State.KILLED:
            # An unexpected death: tell the waiters, give its session a successor.
            self._fail_waiters(worker, reason)
            worker.session = None
            if session is not None and session.worker is worker:
                session.worker = None
                if not session.executing:
                    session.lost_reason = reason
                self._replace(session)
        worker.state = _State.EXITED
        self._starting.discard(worker)
        self._spawn_task(
            self._cleanup(worker, force or code is None or code < 0), name=f"cleanup {worker.wid}"
        )
        self._refill()

    async def _cleanup(self, worker: _Worker, sweep: bool) -> None:
        """Kill anything of the worker still running (its nanny normally has), remove its
        directory and cgroup, free its uid. In a thread: /proc scans and rmtree take a while."""

        def work() -> bool:
            lingering = False
            if self._cgroups is not None:
                lingering = not self._cgroups.kill_and_remove(worker.wid)
            if worker.uid is not None:
                for _ in range(200 if sweep else 20):
                    pids = procs.pids_of_uid(worker.uid)
                    if not pids:
                        break
                    procs.kill_pids(pids)
                    time.sleep(0.005)
                lingering = lingering or bool(procs.pids_of_uid(worker.uid, include_zombies=True))
            shutil.rmtree(worker.workdir, ignore_errors=True)
            return lingering

        lingering = True
        try:
            lingering = await self._blocking(work)
        finally:
            if self._uids is not None and worker.uid is not None:
                self._uids.release(worker.uid, avoid=lingering)
            self._workers.pop(worker.wid, None)
            worker.exited.set()

    def _replace(self, session: _Session) -> None:
        if session.closed or session.replacing is not None or self._stopping:
            return
        session.replacing = self._spawn_task(self._reattach(session), name=f"replace {session.id}")

    async def _reattach(self, session: _Session) -> None:
        try:
            last = ""
            for _ in range(2):
                try:
                    worker = await self._acquire_worker(self.config.open_timeout_s)
                    await self._assign(session, worker)
                    session.reloads += 1
                    self.stats.inc("sessions_reloaded")
                    return
                except PoolFailure as f:
                    last = f.message
            session.broken = f"no replacement worker could load the context ({last})"
        finally:
            session.replacing = None

    # ------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        interval = self.config.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            self._check_workers()
            self._expire_sessions()

    def _check_workers(self) -> None:
        now = time.monotonic()
        expiry = self.config.heartbeat_expiry_s
        for worker in list(self._workers.values()):
            if worker.state is _State.STARTING:
                if now - worker.started > self.config.open_timeout_s:
                    limit = self.config.open_timeout_s
                    self._kill(worker, f"the worker was killed: not ready within {limit:g} s of its start")
                continue
            if worker.state not in (_State.WARM, _State.SESSION) or worker.child_pid is None:
                continue
            cpu = procs.cpu_ticks(worker.child_pid)
            silent = now - worker.last_seen
            if silent <= expiry:
                worker.cpu_mark = cpu
                continue
            if (
                worker.session is not None
                and cpu is not None
                and worker.cpu_mark is not None
                and cpu > worker.cpu_mark
            ):
                worker.cpu_mark = cpu  # busy, not hung: a long C call holds the GIL
                continue
            self.stats.inc("workers_silent")
            session = worker.session
            self._kill(
                worker,
                f"the worker was killed: silent for {silent:.1f} s (no heartbeat: stopped or hung)",
                replace_for=session,
            )
            if session is not None and not session.executing:
                session.lost_reason = f"the worker was silent for {silent:.1f} s and was replaced"

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for session in list(self._sessions.values()):
            if not session.executing and now - session.last_used > self.config.idle_timeout_s:
                log.info("session %s idle for %.0f s: closed", session.id, now - session.last_used)
                self._sessions.pop(session.id, None)
                self._close_session(session, "the session expired (idle)")
                self.stats.inc("sessions_expired")


def _failed_result(code: str, kind: str, message: str, started: float) -> ExecResult:
    return ExecResult(
        stdout="",
        stderr="",
        error=ExecError(code, kind, message, ""),
        final=None,
        final_var=None,
        elapsed_ms=round((time.monotonic() - started) * 1000.0, 3),
        truncated_chars=0,
        llm_calls=0,
        state_lost=True,
    )


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


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
        future.add_done_callback(_mark_retrieved)


def _make_dirs() -> Path:
    """The pool's private tree: ``ipc/`` (0700, root's sockets), ``public/`` (proxies workers may
    reach after their uid drop) and one 0700 directory per worker, owned by its uid."""
    base = Path(tempfile.mkdtemp(prefix="rlmq-sandbox-"))
    # Workers (other uids) traverse base to reach their own directory, nothing more.
    base.chmod(0o711)
    (base / "ipc").mkdir(mode=0o700)
    (base / "public").mkdir(mode=0o711)
    return base
