"""The session manager: the session table, the warm supply, and what execs and loads wait on.

A session is one worker at a time. Opening takes a warm worker, tells the sub-call relay what to
stamp on its sub-calls (the session's run, depth + 1, the run's key, its handler, the per-exec
cap and max_batch) and sends the worker the context; an exec waits for the worker's result or its exec
deadline; a worker that dies or falls silent is replaced by a fresh one with the context
reloaded (the client is told its variables are lost). Sessions idle past ``idle_timeout_s`` are
closed. ``rlm_query`` requests from a worker go to the client
that sent the running exec, and the answers come back to that worker. An exec that asks for
sub-call records (``record_chars``) or a ``replay`` hands the relay an ``ExecRecording``
(recording.py); its records go to the exec's client as ``sub_calls`` notices, all before the
exec's reply.

No sockets here: the server hands in two send functions and the relay, and the supervisor runs
the processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rlmq.protocol import tracing
from rlmq.protocol.errors import ErrorCode, ErrorInfo
from rlmq.protocol.sandbox import (
    ContextFormat,
    ExecError,
    ExecReply,
    ExecRequest,
    ExecResult,
    OpenReply,
    OpenRequest,
    RlmQuery,
    RlmResult,
    SessionInfo,
    SubCall,
    SubCallsNotice,
)

from ._tasks import Background, Stats, mark_retrieved
from ._wire import Assign, Exec, Loaded, Result, RlmAnswer, WorkerRlmQuery
from .config import PoolConfig
from .errors import (
    PoolExhausted,
    PoolFailure,
    PoolStopping,
    SessionBusy,
    SessionLost,
    UnknownSession,
    WorkerGone,
)
from .recording import ExecRecording
from .relay import Stamp, SubCallRelay
from .supervisor import Silent, Supervisor, Worker, WorkerState

__all__ = ["MAX_RLM_PENDING", "Session", "SessionManager"]

log = logging.getLogger(__name__)

MAX_RLM_PENDING = 64  # outstanding rlm_query requests per session
# A sub_calls notice holds at most this many records, or about this many characters of them.
_NOTICE_RECORDS = 512
_NOTICE_CHARS = 4 * 1024 * 1024
# While records keep coming, the pool sends them this often (one notice each time), not one by one.
_NOTICE_INTERVAL_S = 0.005

Wire = dict[str, Any]
SendWorker = Callable[[Worker, Wire, Sequence[Any]], None]
SendClient = Callable[[list[Any], Wire, Sequence[Any]], None]


@dataclass(eq=False)
class Session:
    id: str
    run: str
    depth: int
    max_depth: int
    sub_model: str
    handler: str | None
    run_key: str | None  # the run's key at the handler: the relay shows it, the worker never sees it
    exec_timeout_s: float
    max_output_chars: int
    rlm_error: ErrorInfo | None  # None: rlm_query is available; else what it raises
    context_format: str
    context_blob: Any  # a zmq.Frame (inline) or bytes (read from a path); kept for reloads
    route: list[Any]  # the client envelope rlm_query requests go back to
    last_used: float
    info: SessionInfo | None = None
    worker: Worker | None = None
    replacing: asyncio.Task[None] | None = None
    executing: bool = False
    lost_reason: str | None = None  # the worker died between execs: told on the next exec
    broken: str | None = None  # no replacement could be started: the session is lost
    closed: bool = False
    reloads: int = 0
    rlm_pending: dict[str, tuple[Worker, str]] = field(default_factory=dict)
    stamp: Stamp | None = None  # what the relay writes on its sub-calls; one per session
    tools: tuple[str, ...] = ()  # host-side tools, called through the client like rlm_query
    modules: tuple[str, ...] = ()  # sandbox_modules, imported by the worker at load


def _known(code: str) -> ErrorCode:
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL


class SessionManager:
    """Sessions over the supervisor's workers; implements ``SupervisorEvents``."""

    def __init__(
        self,
        config: PoolConfig,
        supervisor: Supervisor,
        *,
        send_worker: SendWorker,
        send_client: SendClient,
        background: Background | None = None,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self._send_worker = send_worker
        self._send_client = send_client
        # The pool's sub-call relay (set once it runs): told of every worker and its session.
        self.relay: SubCallRelay | None = None
        self.background = background or supervisor.background
        self.stats = stats or supervisor.stats
        self.clock = clock
        self.table: dict[str, Session] = {}
        self._owner: dict[Worker, Session] = {}  # the session a worker was given
        self._waiters: dict[Worker, dict[str, asyncio.Future[Any]]] = {}  # "load" or an exec id
        self._warm: deque[Worker] = deque()
        self._ready_event = asyncio.Event()
        self._opening = 0
        self._demand = 0  # callers waiting for a warm worker
        self._ids = itertools.count(1)
        self._supplying = False
        self.stopping = False

    # ------------------------------------------------------------ supply

    @property
    def warm(self) -> int:
        return len(self._warm)

    def start_supply(self) -> None:
        """Start keeping ``workers`` warm workers ready (the server is listening)."""
        self._supplying = True
        self.refill()

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the warm supply is full (``workers`` READY)."""
        timeout = self.config.open_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while len(self._warm) < self.config.workers:
            left = deadline - time.monotonic()
            if left <= 0:
                last = self.supervisor.last_failure
                raise PoolExhausted(
                    f"{len(self._warm)} of {self.config.workers} workers ready after {timeout:g} s"
                    + (f"; last failure: {last}" if last else ""),
                )
            event = self._ready_event
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)

    def refill(self) -> None:
        """Start workers until the warm supply (plus anyone waiting for a worker) is covered."""
        if self.stopping or not self._supplying:
            return
        delay = self.supervisor.spawn_delay()
        if delay > 0:
            asyncio.get_running_loop().call_later(delay + 0.01, self.refill)
            return
        want = self.config.workers + self._demand
        have = len(self._warm) + self.supervisor.starting
        live = self.supervisor.live
        cap = self.config.max_sessions + self.config.workers
        while have < want and live < cap:
            worker = self.supervisor.spawn()  # None (no free uid) is recorded as the last failure
            if worker is not None and self.relay is not None:
                self.relay.admit(worker.relay_id)
            have += 1
            live += 1

    def _pop_warm(self) -> Worker | None:
        while self._warm:
            worker = self._warm.popleft()
            if worker.state is WorkerState.WARM:
                return worker
        return None

    async def _acquire_worker(self, timeout_s: float) -> Worker:
        deadline = time.monotonic() + timeout_s
        self._demand += 1
        try:
            while True:
                worker = self._pop_warm()
                if worker is not None:
                    return worker
                if self.stopping:
                    raise PoolStopping()
                self.refill()
                left = deadline - time.monotonic()
                if left <= 0:
                    last = self.supervisor.last_failure
                    raise PoolExhausted(
                        f"no worker became ready within {timeout_s:g} s"
                        + (f"; last failure: {last}" if last else ""),
                    )
                event = self._ready_event
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
        finally:
            self._demand -= 1
            self.refill()

    # ------------------------------------------------------------ supervisor events

    def worker_ready(self, worker: Worker) -> None:
        self._warm.append(worker)
        event, self._ready_event = self._ready_event, asyncio.Event()
        event.set()

    def worker_killed(self, worker: Worker, reason: str) -> None:
        if self.relay is not None:
            self.relay.forget(worker.relay_id)
        self._fail_waiters(worker, reason)
        self._drop_warm(worker)
        session = self._owner.pop(worker, None)
        if session is not None and session.worker is worker:
            session.worker = None
        self.refill()

    def worker_exited(self, worker: Worker, reason: str, *, unexpected: bool) -> None:
        if self.relay is not None:
            self.relay.forget(worker.relay_id)
        self._drop_warm(worker)
        session = self._owner.pop(worker, None)
        if unexpected:
            # A death nobody asked for: tell the waiters, give its session a successor.
            self._fail_waiters(worker, reason)
            if session is not None and session.worker is worker:
                session.worker = None
                if not session.executing:
                    session.lost_reason = reason
                self._replace(session)
        self._waiters.pop(worker, None)
        self.refill()

    def worker_silent(self, silent: Silent) -> None:
        """The supervisor found ``silent.worker`` silent: kill it, give its session a successor."""
        session = self._owner.get(silent.worker)
        self._retire(silent.worker, silent.reason, replace=True)
        if session is not None and not session.executing:
            session.lost_reason = f"the worker was silent for {silent.silent_s:.1f} s and was replaced"

    def _drop_warm(self, worker: Worker) -> None:
        with contextlib.suppress(ValueError):
            self._warm.remove(worker)

    def _fail_waiters(self, worker: Worker, reason: str) -> None:
        for future in self._waiters.pop(worker, {}).values():
            if not future.done():
                future.set_exception(WorkerGone(reason))
                future.add_done_callback(mark_retrieved)

    def _retire(self, worker: Worker, reason: str, *, replace: bool = False) -> None:
        """Kill a worker (waiters fail, its session loses it); ``replace``: start a successor
        for the session it served."""
        session = self._owner.get(worker)
        attached = session is not None and session.worker is worker
        if self.supervisor.kill(worker, reason) and replace and attached and session is not None:
            self._replace(session)

    def _waiter(self, worker: Worker, key: str) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(worker, {})[key] = future
        return future

    def _unwait(self, worker: Worker, key: str) -> None:
        self._waiters.get(worker, {}).pop(key, None)

    # ------------------------------------------------------------ worker messages

    def loaded(self, worker: Worker, message: Loaded) -> None:
        future = self._waiters.get(worker, {}).get("load")
        if future is not None and not future.done():
            future.set_result(message)

    def result(self, worker: Worker, message: Result) -> None:
        future = self._waiters.get(worker, {}).get(message.id)
        if future is not None and not future.done():
            future.set_result(message.result)

    def rlm_query(self, worker: Worker, message: WorkerRlmQuery, blobs: list[Any]) -> None:
        """Forward a worker's rlm_query (or tool call) to the client whose exec is running."""
        session = self._owner.get(worker)
        if session is None or session.worker is not worker or session.closed:
            return
        if message.tool is not None:
            self._tool_call(worker, session, message)
            return
        refusal = session.rlm_error
        if refusal is None and len(session.rlm_pending) >= MAX_RLM_PENDING:
            refusal = ErrorInfo(
                ErrorCode.OVERLOADED, f"more than {MAX_RLM_PENDING} rlm_query requests outstanding", True
            )
        if refusal is None and session.stamp is not None and not session.stamp.take():
            # The same per-exec cap the worker checks, kept here too: the worker runs the model's code.
            refusal = ErrorInfo(
                ErrorCode.BUDGET_EXCEEDED,
                f"this block has made {session.stamp.max_calls:,} sub-calls, the limit per block "
                "(max_sub_calls_per_exec); the rlm_query was not started",
            )
        if refusal is not None:
            self._send_worker(worker, RlmAnswer(message.id, False, error=refusal).to_wire(), ())
            return
        qid = f"{session.id}.{message.id}"
        session.rlm_pending[qid] = (worker, message.id)
        self.stats.inc("rlm_queries")
        query = RlmQuery(qid, session.id, message.prompt, message.context_format)
        self._send_client(session.route, query.to_wire(), blobs)

    def _tool_call(self, worker: Worker, session: Session, message: WorkerRlmQuery) -> None:
        """A host-side tool call goes the way of an rlm_query, minus the sub-call stamp: it spends
        nothing of the run's model budget."""
        refusal: ErrorInfo | None = None
        if message.tool not in session.tools:
            refusal = ErrorInfo(ErrorCode.BAD_REQUEST, f"this session has no host-side tool {message.tool!r}")
        elif len(session.rlm_pending) >= MAX_RLM_PENDING:
            refusal = ErrorInfo(
                ErrorCode.OVERLOADED, f"more than {MAX_RLM_PENDING} tool calls outstanding", True
            )
        if refusal is not None:
            self._send_worker(worker, RlmAnswer(message.id, False, error=refusal).to_wire(), ())
            return
        qid = f"{session.id}.{message.id}"
        session.rlm_pending[qid] = (worker, message.id)
        self.stats.inc("tool_calls")
        query = RlmQuery(qid, session.id, "", None, message.tool, message.args or [], message.kwargs or {})
        self._send_client(session.route, query.to_wire(), ())

    def rlm_result(self, req: RlmResult) -> None:
        """The client's answer to a forwarded rlm_query, passed on to the worker as it came."""
        session = self.table.get(req.session)
        entry = session.rlm_pending.pop(req.id, None) if session is not None else None
        if entry is None:
            self.stats.inc("rlm_results_dropped")
            return
        worker, worker_qid = entry
        if not worker.alive:
            return
        if req.ok:
            answer = RlmAnswer(worker_qid, True, text=req.text or "", value=req.value)
        else:
            error = req.error or ErrorInfo(ErrorCode.RLM_FAILED, "the child run failed")
            answer = RlmAnswer(worker_qid, False, error=error)
        self._send_worker(worker, answer.to_wire(), ())

    # ------------------------------------------------------------ open

    def admit_open(self) -> None:
        """Count an open in, or refuse it (stopping, or at ``max_sessions``). The caller runs
        ``open`` next, which counts it out."""
        if self.stopping:
            raise PoolStopping()
        busy = len(self.table) + self._opening
        if busy >= self.config.max_sessions:
            raise PoolFailure(
                ErrorCode.OVERLOADED,
                f"the pool has {busy} sessions (max_sessions {self.config.max_sessions}); "
                "close one or retry later",
                retryable=True,
            )
        self._opening += 1

    async def open(self, req: OpenRequest, blobs: list[Any], route: list[Any]) -> Wire:
        """Open a session on a warm worker (after ``admit_open``); returns the reply."""
        started = time.monotonic()
        try:
            fmt, blob = await self._context_of(req, blobs)
            handler = req.handler if req.handler and req.handler != self.config.handler else None
            session = Session(
                id=f"s-{os.urandom(6).hex()}",
                run=req.run,
                depth=req.depth,
                max_depth=req.max_depth,
                sub_model=req.sub_model,
                handler=handler,
                run_key=req.run_key,
                exec_timeout_s=req.exec_timeout_s or self.config.exec_timeout_s,
                max_output_chars=req.max_output_chars or self.config.max_output_chars,
                rlm_error=_rlm_refusal(req),
                context_format=fmt,
                context_blob=blob,
                route=route,
                last_used=self.clock(),
                tools=req.tools,
                modules=req.sandbox_modules,
            )
            session.stamp = Stamp(
                run=session.run,
                depth=session.depth + 1,
                key=session.run_key,
                upstream=handler or self.config.handler,
                max_calls=self.config.max_sub_calls_per_exec,
                max_batch=self.config.max_batch,
            )
            info: SessionInfo | None = None
            last: PoolFailure | None = None
            for _ in range(2):  # a worker that dies while loading gets one successor
                worker = await self._acquire_worker(self.config.open_timeout_s)
                try:
                    info = await self._assign(session, worker)
                    break
                except WorkerGone as gone:
                    last = SessionLost(f"the worker died while loading the context: {gone.message}")
            if info is None:
                assert last is not None
                raise last
            if self.stopping:
                raise PoolStopping()
            self.table[session.id] = session
            self.stats.inc("sessions_opened")
            self.stats.observe_open((time.monotonic() - started) * 1000.0)
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
            data = await self.background.blocking(read)
        except OSError as exc:
            raise PoolFailure(
                ErrorCode.BAD_REQUEST, f"cannot read context_path {path}: {exc.strerror}"
            ) from None
        if len(data) > limit:
            raise PoolFailure(ErrorCode.TOO_LARGE, f"{path} is over max_context_bytes {limit:,}")
        return fmt, data

    async def _assign(self, session: Session, worker: Worker) -> SessionInfo:
        """Give ``worker`` the session and its context; the worker is the session's on success
        and discarded on failure (it has seen the context: never reused)."""
        self.supervisor.claim(worker)
        self._owner[worker] = session
        if self.relay is not None and session.stamp is not None:
            self.relay.assign(worker.relay_id, session.stamp)
        future = self._waiter(worker, "load")
        assign = Assign(
            session=session.id,
            run=session.run,
            depth=session.depth,
            sub_model=session.sub_model,
            max_output_chars=session.max_output_chars,
            context_format=session.context_format,
            rlm_error=session.rlm_error,
            handler=session.handler,
            max_sub_calls=self.config.max_sub_calls_per_exec,
            tools=session.tools,
            modules=session.modules,
        )
        self._send_worker(worker, assign.to_wire(), [session.context_blob])
        limit = self.config.open_timeout_s
        try:
            loaded: Loaded = await asyncio.wait_for(future, limit)
        except TimeoutError:
            self._retire(worker, f"the worker was killed: it did not load the context within {limit:g} s")
            raise PoolFailure(
                ErrorCode.TIMEOUT, f"the worker did not load the context within {limit:g} s", retryable=True
            ) from None
        finally:
            self._unwait(worker, "load")
        if not loaded.ok or loaded.info is None:
            self._retire(worker, "the worker was killed: its context could not be loaded")
            error = loaded.error or ErrorInfo(ErrorCode.BAD_REQUEST, "the context could not be loaded")
            raise PoolFailure(_known(error.code), error.message, retryable=error.retryable)
        assert worker.child_pid is not None
        info = replace(loaded.info, worker_pid=worker.child_pid)
        if session.closed or self.stopping:
            self._retire(worker, "the session was closed")
            raise UnknownSession(f"session {session.id} was closed")
        session.worker = worker
        session.info = info
        return info

    def _replace(self, session: Session) -> None:
        if session.closed or session.replacing is not None or self.stopping:
            return
        session.replacing = self.background.spawn(self._reattach(session), name=f"replace {session.id}")

    async def _reattach(self, session: Session) -> None:
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

    # ------------------------------------------------------------ exec

    def begin_exec(self, req: ExecRequest, route: list[Any]) -> Session:
        """Mark the session busy for ``req`` (or refuse); the caller runs ``exec`` next."""
        session = self.table.get(req.session)
        if session is None:
            raise UnknownSession(f"no open session {req.session!r}")
        if session.executing:
            raise SessionBusy(f"session {req.session} is already running code")
        session.executing = True
        session.route = route  # rlm_query requests go back the way the exec came
        return session

    async def exec(self, session: Session, req: ExecRequest) -> Wire:
        """Run ``req`` in the session (after ``begin_exec``); returns the reply."""
        with tracing.span("rlmq.exec.pool", parent=req.trace, attributes={"rlmq.session": session.id}):
            return await self._exec(session, req)

    async def _exec(self, session: Session, req: ExecRequest) -> Wire:
        recording: ExecRecording | None = None
        route = session.route
        try:
            worker = await self._session_worker(session)
            timeout = req.timeout_s or session.exec_timeout_s
            lost, session.lost_reason = session.lost_reason, None
            exec_id = f"x{next(self._ids)}"
            future = self._waiter(worker, exec_id)
            recording = self._begin_records(session, req, route)
            started = time.monotonic()
            self._send_worker(worker, Exec(exec_id, req.code, timeout).to_wire(), ())
            self.stats.inc("execs")
            try:
                result: ExecResult = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                self.stats.inc("exec_timeouts")
                message = (
                    f"killed after {timeout:g} s (the exec timeout); the session's variables are lost "
                    "and the next exec runs on a fresh worker with `context` reloaded"
                )
                self._retire(
                    worker, f"the worker was killed at the exec timeout ({timeout:g} s)", replace=True
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
                self._unwait(worker, exec_id)
            if lost is not None and not result.state_lost:
                note = f"[rlmq] {lost} between execs: variables were lost and `context` was reloaded.\n"
                result = replace(result, state_lost=True, stderr=note + result.stderr)
            self.stats.observe_exec((time.monotonic() - started) * 1000.0)
            reply = ExecReply(req.id, session.id, result).to_wire()
            pid = session.worker.child_pid if session.worker is not None else None
            if pid is not None:
                reply["worker_pid"] = pid  # changes when the session moved to a fresh worker
            return reply
        finally:
            self._end_records(session, req, route, recording)
            session.executing = False
            session.last_used = self.clock()

    def _begin_records(self, session: Session, req: ExecRequest, route: list[Any]) -> ExecRecording | None:
        """Tell the relay what to do with this exec's sub-calls: its trace, and a recording when
        the client asked for records or a replay (else none: recording costs nothing)."""
        stamp = session.stamp
        if stamp is None:
            return None
        stamp.begin_exec()
        # Handler spans nest under the pool's exec span when the pool traces, else the caller's.
        stamp.trace = tracing.current_traceparent() or req.trace
        if req.record_chars is None and req.replay is None:
            stamp.recording = None
            return None
        loop = asyncio.get_running_loop()

        def pump() -> None:  # the loop: send what is ready, and look again soon while records come
            if self._send_records(route, req, session.id, recording.drain):
                loop.call_later(_NOTICE_INTERVAL_S, pump)

        def wake() -> None:  # the relay thread: records wait
            loop.call_soon_threadsafe(pump)

        recording = ExecRecording(
            depth=stamp.depth, record_chars=req.record_chars, replay=req.replay, wake=wake
        )
        stamp.recording = recording
        return recording

    def _end_records(
        self, session: Session, req: ExecRequest, route: list[Any], recording: ExecRecording | None
    ) -> None:
        """The exec is over: the relay stops recording it, and the records not sent yet go now,
        before the exec's reply (sent by the caller once ``exec`` returns)."""
        if session.stamp is not None:
            session.stamp.recording = None
            session.stamp.trace = None
        if recording is not None:
            self._send_records(route, req, session.id, recording.finish)
            if recording.replayed or recording.diverged:
                self.stats.inc("sub_calls_replayed", recording.replayed)
                self.stats.inc("sub_calls_diverged", recording.diverged)

    def _send_records(
        self, route: list[Any], req: ExecRequest, session_id: str, take: Callable[[], list[SubCall]]
    ) -> bool:
        """Send the records ``take`` gives as ``sub_calls`` notices; False when there were none."""
        records = take()
        if not records:
            return False
        if req.record_chars is None:
            return True
        self.stats.inc("sub_calls_recorded", len(records))
        # One notice per batch, split so that no notice grows without bound.
        chunk: list[SubCall] = []
        size = 0
        for record in records:
            chunk.append(record)
            size += len(record.prompt) + len(record.prompt_tail or "") + len(record.text or "")
            if len(chunk) >= _NOTICE_RECORDS or size >= _NOTICE_CHARS:
                self._send_client(route, SubCallsNotice(req.id, session_id, chunk).to_wire(), ())
                chunk, size = [], 0
        if chunk:
            self._send_client(route, SubCallsNotice(req.id, session_id, chunk).to_wire(), ())
        return True

    async def _session_worker(self, session: Session) -> Worker:
        if session.replacing is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(session.replacing), self.config.open_timeout_s * 2 + 5)
        worker = session.worker
        if worker is None or not worker.alive or session.broken:
            self.table.pop(session.id, None)
            self.stats.inc("sessions_lost")
            raise SessionLost(
                f"session {session.id} is lost: {session.broken or 'no worker could replace the dead one'}"
            )
        return worker

    # ------------------------------------------------------------ close and expiry

    def close(self, session_id: str) -> Session:
        session = self.table.pop(session_id, None)
        if session is None:
            raise UnknownSession(f"no open session {session_id!r}")
        self._close(session, "the session was closed")
        self.stats.inc("sessions_closed")
        return session

    def _close(self, session: Session, reason: str) -> None:
        session.closed = True
        if session.replacing is not None:
            session.replacing.cancel()
        if session.worker is not None:
            self._retire(session.worker, reason)
            session.worker = None
        session.context_blob = b""

    def expire_idle(self, now: float | None = None) -> int:
        """Close sessions with no exec for ``idle_timeout_s``; returns how many."""
        now = self.clock() if now is None else now
        expired = 0
        for session in list(self.table.values()):
            if not session.executing and now - session.last_used > self.config.idle_timeout_s:
                log.info("session %s idle for %.0f s: closed", session.id, now - session.last_used)
                self.table.pop(session.id, None)
                self._close(session, "the session expired (idle)")
                self.stats.inc("sessions_expired")
                expired += 1
        return expired


def _rlm_refusal(req: OpenRequest) -> ErrorInfo | None:
    """Why rlm_query is unavailable in a session opened by ``req``, or None if it is available."""
    if req.depth + 1 >= req.max_depth:
        return ErrorInfo(
            ErrorCode.BAD_REQUEST,
            f"rlm_query is disabled at depth {req.depth} (max_depth={req.max_depth}): a child "
            f"run would be at depth {req.depth + 1}. Use llm_query(prompt) for a plain sub-call.",
        )
    if not req.rlm_query:
        return ErrorInfo(
            ErrorCode.BAD_REQUEST,
            "rlm_query is not available: the orchestrator that opened this session does not "
            "answer recursive runs. Use llm_query(prompt) for a plain sub-call.",
        )
    return None


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
