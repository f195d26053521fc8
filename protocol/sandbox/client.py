"""The orchestrator's client of a sandbox pool: one DEALER socket, many sessions over it.

Errors it raises:

    RemoteError
    └── SandboxError      an error reply from the pool, or no reply in time; ``code`` is an
                          ``ErrorCode`` (``raw_code`` keeps a code this version does not know)

Errors of the model's code are not exceptions here: they come back inside ``ExecResult.error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import zmq
import zmq.asyncio

from ..codec import DEFAULT_MAX_MESSAGE_BYTES, pack, unpack
from ..dealer import AsyncDealer
from ..errors import ErrorCode, ErrorInfo, ProtocolError, RemoteError, RlmqError
from ..messages import ErrorReply
from ..security import CurveClientKeys
from ..tracing import current_traceparent
from .context import decode_context, encode_context
from .messages import (
    CloseRequest,
    ExecReply,
    ExecRequest,
    ExecResult,
    OpenReply,
    OpenRequest,
    Replay,
    RlmQuery,
    RlmResult,
    SandboxPing,
    SandboxStats,
    SessionInfo,
    SubCall,
    SubCallsNotice,
    split_delimited,
)

__all__ = ["AsyncSandboxClient", "RlmCallback", "SandboxError", "Session", "SubCallCallback", "ToolCallback"]

log = logging.getLogger(__name__)


class SandboxError(RemoteError):
    """An error reply from the sandbox pool (or no reply in time): one ``RemoteError`` type
    carries every wire error; this subclass only says which peer sent it."""


RlmCallback = Callable[[str, Any], Awaitable[str]]
# Answers a host-side tool call of a session's code: (name, args, kwargs) -> a msgpack-able value.
ToolCallback = Callable[[str, list[Any], dict[str, Any]], Awaitable[Any]]
# Gets each sub-call record of an exec, in order of issue, before the exec returns.
SubCallCallback = Callable[[SubCall], None]
# The pool answers an exec at its own deadline; the client waits this much longer before it
# gives up on the pool itself.
EXEC_WAIT_MARGIN_S = 15.0


def _raise_for(obj: Mapping[str, Any]) -> None:
    if obj.get("ok") is True:
        return
    try:
        err = ErrorReply.from_wire(obj)
    except ProtocolError as exc:
        raise SandboxError(ErrorCode.BAD_REQUEST, f"malformed reply from the pool: {exc.message}") from None
    raise SandboxError(err.code, err.message, retryable=err.retryable)


class Session:
    """One open session: a worker process with a persistent namespace. Made by ``open``."""

    def __init__(
        self,
        client: AsyncSandboxClient,
        session_id: str,
        info: SessionInfo,
        exec_timeout_s: float,
        on_rlm_query: RlmCallback | None,
        on_tool_call: ToolCallback | None = None,
    ) -> None:
        self._client = client
        self.id = session_id
        self.info = info
        self.exec_timeout_s = exec_timeout_s
        self.on_rlm_query = on_rlm_query
        self.on_tool_call = on_tool_call
        self.closed = False
        # Sub-call records of the last exec that never reached its on_sub_call (a malformed
        # notice, or the callback failed): the caller's trajectory lacks that many of them.
        self.records_dropped = 0

    def __repr__(self) -> str:
        info = self.info
        return f"<Session {self.id} pid={info.worker_pid} {info.context_type}[{info.context_length}]>"

    async def exec(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        on_sub_call: SubCallCallback | None = None,
        record_chars: int | None = None,
        replay: Replay | None = None,
    ) -> ExecResult:
        """Run ``code`` in the session's namespace. Errors of the code come back in the result;
        raises ``SandboxError`` only when the session itself cannot serve (closed, lost).

        ``record_chars``: the pool records every sub-call of the code (prompts longer than this
        cut to head and tail) and ``on_sub_call`` gets each record, in order of issue, before
        this returns; None records nothing. ``replay``: the pool answers the sub-calls from
        these records instead of the handler (see ``Replay``). After it returns (or raises),
        ``records_dropped`` counts the records of this exec that were lost on the way."""
        if self.closed:
            raise SandboxError(ErrorCode.UNKNOWN_SESSION, f"session {self.id} is closed")
        if record_chars is not None and record_chars < 0:
            raise ValueError("record_chars must be >= 0")
        deadline = (timeout_s or self.exec_timeout_s) + EXEC_WAIT_MARGIN_S
        req = ExecRequest(
            self._client.new_id(),
            self.id,
            code,
            timeout_s,
            record_chars=record_chars,
            replay=replay,
            trace=current_traceparent(),
        )
        self.records_dropped = 0
        if on_sub_call is not None and record_chars is not None:
            self._client._sub_call_sinks[req.id] = on_sub_call
        try:
            obj, _ = await self._client._request(req.to_wire(), [], deadline)
        finally:
            self._client._sub_call_sinks.pop(req.id, None)
            self.records_dropped = self._client._records_dropped.pop(req.id, 0)
        try:
            _raise_for(obj)
        except SandboxError as exc:
            if exc.code in (ErrorCode.SESSION_LOST, ErrorCode.UNKNOWN_SESSION):
                self.closed = True  # the pool has forgotten it: so do we
                self._client._sessions.pop(self.id, None)
            raise
        pid = obj.get("worker_pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and pid != self.info.worker_pid:
            # The session moved to a fresh worker (after a timeout or a death).
            self.info = dataclasses.replace(self.info, worker_pid=pid)
        try:
            return ExecReply.from_wire(obj).result
        except ProtocolError as exc:
            raise SandboxError(ErrorCode.BAD_REQUEST, f"malformed exec reply: {exc.message}") from None

    async def close(self) -> None:
        """Close the session; its worker is killed and never reused. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._client._sessions.pop(self.id, None)
        req = CloseRequest(self._client.new_id(), self.id)
        obj, _ = await self._client._request(req.to_wire(), [], self._client.timeout_s)
        if obj.get("ok") is not True:
            err = ErrorReply.from_wire(obj)
            if err.code != ErrorCode.UNKNOWN_SESSION:  # already gone is closed enough
                raise SandboxError(err.code, err.message, retryable=err.retryable)

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSandboxClient(AsyncDealer):
    """One DEALER socket to a sandbox pool; many sessions over it, matched by request id.

    ``rlm_query`` requests from a session's code are answered by that session's ``on_rlm_query``
    callback, each in its own task, so a slow child run never blocks the reader.
    """

    def __init__(
        self,
        address: str,
        *,
        context: zmq.asyncio.Context | None = None,
        timeout_s: float = 60.0,
        curve: CurveClientKeys | None = None,
    ) -> None:
        """``curve``: keys for a pool that requires CURVE (see ``protocol.security``)."""
        super().__init__(address, context=context, timeout_s=timeout_s, curve=curve)
        self._pending: dict[str, asyncio.Future[tuple[dict[str, Any], list[Any]]]] = {}
        self._sessions: dict[str, Session] = {}
        self._callbacks: set[asyncio.Task[None]] = set()
        self._sub_call_sinks: dict[str, SubCallCallback] = {}  # exec request id -> its on_sub_call
        self._records_dropped: dict[str, int] = {}  # exec request id -> records lost (see _on_sub_calls)

    # ------------------------------------------------------------ transport

    async def _send(self, header: Mapping[str, Any], blobs: Sequence[Any]) -> None:
        await self._sock.send_multipart([b"", pack(header), *blobs], copy=False)

    async def _request(
        self, header: Mapping[str, Any], blobs: Sequence[Any], timeout_s: float
    ) -> tuple[dict[str, Any], list[Any]]:
        if self._closed:
            raise SandboxError(ErrorCode.UNAVAILABLE, "client is closed")
        loop = asyncio.get_running_loop()
        if self._reader is None:
            self._reader = loop.create_task(self._read())
        rid = header["id"]
        future: asyncio.Future[tuple[dict[str, Any], list[Any]]] = loop.create_future()
        self._pending[rid] = future
        try:
            await self._send(header, blobs)
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise SandboxError(
                ErrorCode.TIMEOUT,
                f"no reply to {header.get('op')} {rid} from {self.address} within {timeout_s:g} s",
                retryable=True,
            ) from None
        finally:
            self._pending.pop(rid, None)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            parts = split_delimited(frames)
            if parts is None:
                log.warning("message without a delimiter from %s dropped", self.address)
                continue
            _, header, blobs = parts
            try:
                obj = unpack(header.buffer, max_bytes=DEFAULT_MAX_MESSAGE_BYTES * 16)
            except ProtocolError as exc:
                log.warning("unreadable message from %s dropped: %s", self.address, exc.message)
                continue
            op = obj.get("op")
            if op == SubCallsNotice.OP:
                self._on_sub_calls(obj)
                continue
            if op == RlmQuery.OP:
                self._on_rlm_query(obj, blobs)
                continue
            rid = obj.get("id")
            future = self._pending.get(rid) if isinstance(rid, str) else None
            if future is not None and not future.done():
                future.set_result((obj, blobs))
            # else: a late reply to a request that timed out

    def _on_sub_calls(self, obj: Mapping[str, Any]) -> None:
        """Records of a running exec, to its ``on_sub_call`` in the reader: in order of arrival,
        and all before the exec's reply (which the pool sends after them)."""
        rid = obj.get("id")
        sink = self._sub_call_sinks.get(rid) if isinstance(rid, str) else None
        if sink is None:
            return  # nobody asked for them (or the exec timed out here)
        assert isinstance(rid, str)
        try:
            records: Sequence[SubCall] = SubCallsNotice.from_wire(obj).records
        except ProtocolError as exc:
            # Keep what can be read, one record at a time, and count the rest: a silent loss
            # would make a later replay of the trajectory report a divergence that is not one.
            records, lost = self._readable_records(obj.get("records"), rid)
            self._records_dropped[rid] = self._records_dropped.get(rid, 0) + lost
            log.warning(
                "malformed sub_calls notice from %s: %d record(s) of exec %s dropped: %s",
                self.address,
                lost,
                rid,
                exc.message,
            )
        for record in records:
            try:
                sink(record)
            except Exception:  # the callback's bug must not stop the reader of every session
                self._records_dropped[rid] = self._records_dropped.get(rid, 0) + 1
                log.exception("on_sub_call failed on record %d of exec %s", record.seq, rid)

    @staticmethod
    def _readable_records(raw: Any, rid: str) -> tuple[list[SubCall], int]:
        """The records of a malformed notice that decode on their own, and how many do not (a
        notice without a list of records counts as one lost: its size is unknown)."""
        if not isinstance(raw, list):
            return [], 1
        good: list[SubCall] = []
        for item in raw:
            with contextlib.suppress(ProtocolError):
                if isinstance(item, Mapping):
                    good.append(SubCall.from_wire(item, rid))
        return good, len(raw) - len(good)

    def _on_rlm_query(self, obj: Mapping[str, Any], blobs: list[Any]) -> None:
        try:
            query = RlmQuery.from_wire(obj, len(blobs))
        except ProtocolError as exc:
            log.warning("malformed rlm_query from %s dropped: %s", self.address, exc.message)
            return
        task = asyncio.get_running_loop().create_task(self._answer(query, blobs))
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _answer(self, query: RlmQuery, blobs: list[Any]) -> None:
        session = self._sessions.get(query.session)
        if query.tool is not None:
            result = await self._call_tool(session, query)
            if not self._closed:
                await self._send(result.to_wire(), [])
            return
        callback = session.on_rlm_query if session is not None else None
        if callback is None:
            result = RlmResult(
                query.id,
                query.session,
                False,
                error=ErrorInfo(ErrorCode.RLM_FAILED, "this session has no on_rlm_query handler"),
            )
        else:
            try:
                context = (
                    decode_context(query.context_format, blobs[0].buffer)
                    if query.context_format is not None
                    else None
                )
                text = await callback(query.prompt, context)
                result = RlmResult(query.id, query.session, True, text=str(text))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the orchestrator's failure becomes an exception in the code
                error = ErrorInfo.of(exc)
                if not isinstance(exc, RlmqError):  # a bug of the callback, not a typed failure
                    error = ErrorInfo(ErrorCode.RLM_FAILED, error.message)
                result = RlmResult(query.id, query.session, False, error=error)
        if not self._closed:
            await self._send(result.to_wire(), [])

    async def _call_tool(self, session: Session | None, query: RlmQuery) -> RlmResult:
        """A host-side tool call of the session's code, answered by its ``on_tool_call``."""
        assert query.tool is not None
        callback = session.on_tool_call if session is not None else None
        if callback is None:
            error = ErrorInfo(ErrorCode.BAD_REQUEST, f"this session has no host-side tool {query.tool!r}")
            return RlmResult(query.id, query.session, False, error=error)
        try:
            value = await callback(query.tool, list(query.args or ()), dict(query.kwargs or {}))
            return RlmResult(query.id, query.session, True, text="", value=value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the tool's failure becomes an exception in the code
            error = ErrorInfo.of(exc)
            if not isinstance(exc, RlmqError):  # a bug of the callback, not a typed failure
                error = ErrorInfo(ErrorCode.INTERNAL, error.message)
            return RlmResult(query.id, query.session, False, error=error)

    # ------------------------------------------------------------ operations

    async def open(
        self,
        *,
        run: str,
        context: str | bytes | list[Any] | dict[Any, Any] | None = None,
        context_path: str | None = None,
        depth: int = 0,
        max_depth: int = 1,
        handler: str | None = None,
        sub_model: str = "sub",
        exec_timeout_s: float | None = None,
        max_output_chars: int | None = None,
        on_rlm_query: RlmCallback | None = None,
        run_key: str | None = None,
        tools: Sequence[str] = (),
        on_tool_call: ToolCallback | None = None,
        sandbox_modules: Sequence[str] = (),
    ) -> Session:
        """Open a session on a fresh worker with ``context`` (inline) or ``context_path`` (a file
        the pool reads; ``.json`` is parsed, anything else is UTF-8 text). ``run_key``: the key
        the run was opened with at the handler, for the pool to show on the session's sub-calls.
        ``tools``: names of host-side tools, functions of the namespace whose calls come back to
        ``on_tool_call``; ``sandbox_modules``: modules the worker imports into the namespace (one
        it cannot import fails the open)."""
        if tools and on_tool_call is None:
            raise ValueError("tools need an on_tool_call to answer them")
        if context is not None and context_path is not None:
            raise ValueError("give context or context_path, not both")
        blobs: list[Any] = []
        fmt: str | None = None
        if context is not None:
            fmt, payload = encode_context(context)
            blobs = [payload]
        req = OpenRequest(
            id=self.new_id(),
            run=run,
            depth=depth,
            max_depth=max_depth,
            sub_model=sub_model,
            handler=handler,
            exec_timeout_s=exec_timeout_s,
            max_output_chars=max_output_chars,
            context_format=fmt,
            context_path=context_path,
            rlm_query=on_rlm_query is not None,
            run_key=run_key,
            tools=tuple(tools),
            sandbox_modules=tuple(sandbox_modules),
        )
        started = time.monotonic()
        obj, _ = await self._request(req.to_wire(), blobs, self.timeout_s)
        _raise_for(obj)
        try:
            reply = OpenReply.from_wire(obj)
        except ProtocolError as exc:
            raise SandboxError(ErrorCode.BAD_REQUEST, f"malformed open reply: {exc.message}") from None
        answers_tools = on_tool_call if tools else None
        session = Session(self, reply.session, reply.info, reply.exec_timeout_s, on_rlm_query, answers_tools)
        self._sessions[session.id] = session
        log.debug("session %s open in %.1f ms", session.id, (time.monotonic() - started) * 1000)
        return session

    async def ping(self) -> dict[str, Any]:
        obj, _ = await self._request(SandboxPing(self.new_id()).to_wire(), [], self.timeout_s)
        _raise_for(obj)
        return {k: v for k, v in obj.items() if k not in ("v", "id", "ok")}

    async def stats(self) -> dict[str, Any]:
        obj, _ = await self._request(SandboxStats(self.new_id()).to_wire(), [], self.timeout_s)
        _raise_for(obj)
        stats = obj.get("stats")
        if not isinstance(stats, dict):
            raise SandboxError(ErrorCode.BAD_REQUEST, "malformed stats reply")
        return stats

    async def aclose(self) -> None:
        """Close every session still open (best effort, briefly), then the socket."""
        if self._closed:
            return
        if self._sessions:
            sessions = list(self._sessions.values())
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        self._closed = True
        for task in [*self._callbacks, *([self._reader] if self._reader else [])]:
            task.cancel()
        for task in [*self._callbacks, *([self._reader] if self._reader else [])]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        self._close_socket()
