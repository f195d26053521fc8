"""The handler's clients: ``AsyncHandlerClient`` (asyncio, for orchestrators and tools) and
``HandlerClient`` (blocking, for sandbox workers whose model code calls ``llm_query``).

Both use one DEALER socket (``dealer.py``), many requests in flight on it, and match replies to
requests by ``id``. They share one core, ``_HandlerCalls``: how each request is built and how a
reply becomes a result or an exception. Only the waiting differs. Every wait has a timeout; an
error reply is raised as ``RemoteError`` with the peer's code, message and retryable flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from .codec import decode_reply, encode
from .dealer import AsyncDealer, RequestIds, configure_socket, read_reply
from .errors import DecodeError, RemoteError, TransportTimeout
from .messages import (
    ChatMessage,
    CompleteReply,
    CompleteRequest,
    ErrorReply,
    PingRequest,
    PongReply,
    Reply,
    Request,
    RunCloseRequest,
    RunLimits,
    RunOpenRequest,
    RunUsage,
    RunUsageReply,
    StatsReply,
    StatsRequest,
    UsageRequest,
)
from .security import CurveClientKeys, connect

__all__ = ["AsyncHandlerClient", "HandlerClient", "as_messages", "configure_socket"]

DEFAULT_TIMEOUT_S = 300.0
# The transport waits this much longer than a complete's own timeout, so the handler's typed
# `timeout` reply wins over the client's TransportTimeout.
TIMEOUT_MARGIN_S = 5.0
R = TypeVar("R", bound=Reply)


def as_messages(
    prompt: str | Sequence[ChatMessage] | Sequence[dict[str, str]],
) -> tuple[ChatMessage, ...]:
    """A prompt string or a list of messages (dataclasses or ``{role, content}`` maps)."""
    if isinstance(prompt, str):
        return (ChatMessage("user", prompt),)
    out = []
    for m in prompt:
        out.append(m if isinstance(m, ChatMessage) else ChatMessage(str(m["role"]), str(m["content"])))
    return tuple(out)


def _raise_for(reply: Reply) -> Reply:
    if isinstance(reply, ErrorReply):
        raise RemoteError(
            reply.code, reply.message, retryable=reply.retryable, retry_after_s=reply.retry_after_s
        )
    return reply


def _expect(reply: Reply, kind: type[R]) -> R:
    """``reply`` as the type its request asks for; an error reply is raised."""
    _raise_for(reply)
    if not isinstance(reply, kind):
        raise DecodeError(
            f"expected a {kind.__name__} reply, got {type(reply).__name__}", request_id=reply.id
        )
    return reply


def _complete_wait(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else timeout_s + TIMEOUT_MARGIN_S


class _HandlerCalls:
    """What both handler clients share: building requests and reading replies into results."""

    run: str | None
    depth: int
    _ids: RequestIds
    # Keys of the runs this client opened with one (``run_open(..., key=)``): shown on every
    # ``complete`` and ``run_close`` naming the run, so the handler knows the caller holds it.
    _run_keys: dict[str, str]

    def new_id(self) -> str:
        return self._ids.next()

    def _complete_request(
        self,
        prompt: str | Sequence[ChatMessage] | Sequence[dict[str, str]],
        model: str,
        max_tokens: int | None,
        temperature: float | None,
        timeout_s: float | None,
        run: str | None = None,
        depth: int | None = None,
    ) -> CompleteRequest:
        run = run if run is not None else self.run
        return CompleteRequest(
            id=self.new_id(),
            model=model,
            messages=as_messages(prompt),
            max_tokens=max_tokens,
            temperature=temperature,
            timeout_s=timeout_s,
            run=run,
            depth=self.depth if depth is None else depth,
            key=None if run is None else self._run_keys.get(run),
        )


class AsyncHandlerClient(AsyncDealer, _HandlerCalls):
    """An asyncio client of the handler; safe to share between tasks of one event loop."""

    def __init__(
        self,
        address: str,
        *,
        context: zmq.asyncio.Context | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        run: str | None = None,
        depth: int = 0,
        curve: CurveClientKeys | None = None,
    ) -> None:
        super().__init__(address, context=context, timeout_s=timeout_s, curve=curve)
        self.run = run
        self.depth = depth
        self._run_keys = {}
        self._pending: dict[str, tuple[asyncio.Future[Reply], str]] = {}

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            obj = read_reply(frames[-1].buffer, self.address)
            if obj is None:
                continue
            rid = obj.get("id")
            entry = self._pending.pop(rid, None) if isinstance(rid, str) else None
            if entry is None:
                continue  # late reply to a request that already timed out
            future, op = entry
            if not future.done():
                try:
                    future.set_result(decode_reply(obj, op))
                except Exception as exc:
                    future.set_exception(exc)

    async def request(self, req: Request, *, timeout_s: float | None = None) -> Reply:
        """Send one request and wait for its reply; raises ``RemoteError`` on an error reply."""
        if self._closed:
            raise RuntimeError("client is closed")
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[req.id] = (future, req.OP)
        await self._sock.send(encode(req), copy=False)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._pending.pop(req.id, None)
            raise TransportTimeout(
                f"no reply to {req.OP} {req.id} from {self.address} within {timeout:g} s"
            ) from None
        return _raise_for(reply)

    async def complete(
        self,
        prompt: str | Sequence[ChatMessage] | Sequence[dict[str, str]],
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        timeout_s: float | None = None,
        run: str | None = None,
        depth: int | None = None,
    ) -> CompleteReply:
        req = self._complete_request(prompt, model, max_tokens, temperature, timeout_s, run, depth)
        return _expect(await self.request(req, timeout_s=_complete_wait(timeout_s)), CompleteReply)

    async def ping(self, *, timeout_s: float | None = None) -> PongReply:
        return _expect(await self.request(PingRequest(self.new_id()), timeout_s=timeout_s), PongReply)

    async def stats(self) -> dict[str, Any]:
        return dict(_expect(await self.request(StatsRequest(self.new_id())), StatsReply).stats)

    async def run_open(
        self, run: str, limits: RunLimits | None = None, *, key: str | None = None
    ) -> RunUsage:
        """Open ``run`` (or replace its limits). With ``key`` the run is this client's: the
        handler refuses it to callers that do not show the key, and this client shows it on
        every ``complete`` and ``run_close`` naming the run."""
        key = key if key is not None else self._run_keys.get(run)
        req = RunOpenRequest(self.new_id(), run, limits or RunLimits(), key)
        usage = _expect(await self.request(req), RunUsageReply).run
        if key is not None:
            self._run_keys[run] = key
        return usage

    async def run_close(self, run: str) -> RunUsage:
        req = RunCloseRequest(self.new_id(), run, self._run_keys.get(run))
        usage = _expect(await self.request(req), RunUsageReply).run
        self._run_keys.pop(run, None)
        return usage

    async def usage(self, run: str) -> RunUsage:
        return _expect(await self.request(UsageRequest(self.new_id(), run)), RunUsageReply).run

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("client closed"))
                future.exception()  # mark retrieved: nobody may be waiting any more
        self._pending.clear()
        self._close_socket()


class HandlerClient(_HandlerCalls):
    """A blocking client for code that is not async (sandbox workers).

    ``complete_many`` sends every request before waiting for any reply, so a batch of N
    sub-calls takes about as long as the slowest one. A lock makes it safe from several threads.
    """

    def __init__(
        self,
        address: str,
        *,
        context: zmq.Context[Any] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        run: str | None = None,
        depth: int = 0,
        curve: CurveClientKeys | None = None,
        sock: zmq.Socket[Any] | None = None,
    ) -> None:
        """``sock``: a DEALER already connected to ``address`` (a sandbox worker connects its
        own, with its routing id, before it drops privileges); the client then owns it."""
        self.address = address
        self.timeout_s = timeout_s
        self.run = run
        self.depth = depth
        self._run_keys = {}
        self._own_context = context is None and sock is None
        self._ctx: zmq.Context[Any] = context or (sock.context if sock is not None else zmq.Context())
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            configure_socket(sock)
            connect(sock, address, curve)  # CURVE on TCP when keys are given
        self._sock: zmq.Socket[Any] = sock
        self._ids = RequestIds()
        self._lock = threading.Lock()

    def __enter__(self) -> HandlerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_many(self, reqs: Sequence[Request], *, timeout_s: float | None = None) -> list[Reply]:
        """Send all, then collect replies in request order. Error replies are returned, not raised."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        ops = {r.id: r.OP for r in reqs}
        replies: dict[str, Reply] = {}
        with self._lock:
            for r in reqs:
                self._sock.send(encode(r), copy=False)
            deadline = time.monotonic() + timeout
            while len(replies) < len(ops):
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0 or not self._sock.poll(left_ms, zmq.POLLIN):
                    missing = len(ops) - len(replies)
                    raise TransportTimeout(
                        f"{missing} of {len(ops)} replies from {self.address} missing after {timeout:g} s"
                    )
                frames = self._sock.recv_multipart(copy=False)
                obj = read_reply(frames[-1].buffer, self.address)
                if obj is None:
                    continue
                rid = obj.get("id")
                if isinstance(rid, str) and rid in ops and rid not in replies:
                    replies[rid] = decode_reply(obj, ops[rid])
                # anything else is a late reply to an earlier, timed-out request: dropped
        return [replies[r.id] for r in reqs]

    def request(self, req: Request, *, timeout_s: float | None = None) -> Reply:
        return _raise_for(self.request_many([req], timeout_s=timeout_s)[0])

    def complete(
        self,
        prompt: str | Sequence[ChatMessage] | Sequence[dict[str, str]],
        *,
        model: str,
        max_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> CompleteReply:
        req = self._complete_request(prompt, model, max_tokens, None, timeout_s)
        return _expect(self.request(req, timeout_s=_complete_wait(timeout_s)), CompleteReply)

    def complete_many(
        self,
        prompts: Iterable[str | Sequence[ChatMessage]],
        *,
        model: str,
        max_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> list[CompleteReply | ErrorReply]:
        reqs = [self._complete_request(p, model, max_tokens, None, timeout_s) for p in prompts]
        out: list[CompleteReply | ErrorReply] = []
        for r in self.request_many(reqs, timeout_s=_complete_wait(timeout_s)):
            out.append(r if isinstance(r, ErrorReply) else _expect(r, CompleteReply))
        return out

    def ping(self, *, timeout_s: float | None = None) -> PongReply:
        return _expect(self.request(PingRequest(self.new_id()), timeout_s=timeout_s), PongReply)

    def stats(self) -> dict[str, Any]:
        return dict(_expect(self.request(StatsRequest(self.new_id())), StatsReply).stats)

    def usage(self, run: str) -> RunUsage:
        return _expect(self.request(UsageRequest(self.new_id(), run)), RunUsageReply).run

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._own_context:
            self._ctx.term()
