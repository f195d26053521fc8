"""ZeroMQ clients of the handler: the only module of ``protocol`` that owns sockets.

``AsyncHandlerClient`` (asyncio, for orchestrators and tools) and ``HandlerClient`` (blocking,
for sandbox workers whose model code calls ``llm_query`` synchronously) both use one DEALER
socket, many requests in flight on it, and match replies to requests by ``id``. Every wait has a
timeout; an error reply is raised as ``RemoteError`` with the peer's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Self

import zmq
import zmq.asyncio

from .codec import decode_reply, encode, unpack
from .errors import ProtocolError, RemoteError, TransportTimeout
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

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
# High water marks: a relay holds thousands of requests in flight on one socket, and ZeroMQ's
# default of 1,000 would block senders or (on ROUTER) silently drop replies past it.
HWM = 1_000_000


def configure_socket(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.LINGER, 0)


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


class _Ids:
    """Request ids unique across processes sharing one handler: a random prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"


def _check(reply: Reply) -> Reply:
    if isinstance(reply, ErrorReply):
        raise RemoteError(reply.code, reply.message, retryable=reply.retryable)
    return reply


class _AsyncDealer:
    """One asyncio DEALER socket to a server, with request ids; the handler's and the sandbox
    pool's clients build their request/reply matching on it."""

    def __init__(
        self,
        address: str,
        *,
        context: zmq.asyncio.Context | None,
        timeout_s: float,
        curve: CurveClientKeys | None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        configure_socket(self._sock)
        connect(self._sock, address, curve)  # CURVE on TCP when keys are given
        self._ids = _Ids()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def new_id(self) -> str:
        return self._ids.next()

    async def aclose(self) -> None:
        raise NotImplementedError

    def _close_socket(self) -> None:
        self._sock.close(linger=0)
        if self._own_context:
            self._ctx.term()


class AsyncHandlerClient(_AsyncDealer):
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
        self._pending: dict[str, tuple[asyncio.Future[Reply], str]] = {}

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                obj = unpack(frames[-1].buffer, max_bytes=1 << 62)
            except ProtocolError as exc:
                # A reply we cannot read cannot be matched to a request either.
                log.warning("unreadable reply from %s dropped: %s", self.address, exc.message)
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
        return _check(reply)

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
        req = CompleteRequest(
            id=self.new_id(),
            model=model,
            messages=as_messages(prompt),
            max_tokens=max_tokens,
            temperature=temperature,
            timeout_s=timeout_s,
            run=run if run is not None else self.run,
            depth=self.depth if depth is None else depth,
        )
        # The transport waits a little longer than the handler so its typed timeout wins.
        wait = None if timeout_s is None else timeout_s + 5.0
        reply = await self.request(req, timeout_s=wait)
        assert isinstance(reply, CompleteReply)
        return reply

    async def ping(self, *, timeout_s: float | None = None) -> PongReply:
        reply = await self.request(PingRequest(self.new_id()), timeout_s=timeout_s)
        assert isinstance(reply, PongReply)
        return reply

    async def stats(self) -> dict[str, Any]:
        reply = await self.request(StatsRequest(self.new_id()))
        assert isinstance(reply, StatsReply)
        return dict(reply.stats)

    async def run_open(self, run: str, limits: RunLimits | None = None) -> RunUsage:
        reply = await self.request(RunOpenRequest(self.new_id(), run, limits or RunLimits()))
        assert isinstance(reply, RunUsageReply)
        return reply.run

    async def run_close(self, run: str) -> RunUsage:
        reply = await self.request(RunCloseRequest(self.new_id(), run))
        assert isinstance(reply, RunUsageReply)
        return reply.run

    async def usage(self, run: str) -> RunUsage:
        reply = await self.request(UsageRequest(self.new_id(), run))
        assert isinstance(reply, RunUsageReply)
        return reply.run

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


class HandlerClient:
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
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.run = run
        self.depth = depth
        self._own_context = context is None
        self._ctx: zmq.Context[Any] = context or zmq.Context()
        self._sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        configure_socket(self._sock)
        connect(self._sock, address, curve)  # CURVE on TCP when keys are given
        self._ids = _Ids()
        self._lock = threading.Lock()

    def __enter__(self) -> HandlerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_id(self) -> str:
        return self._ids.next()

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
                try:
                    obj = unpack(frames[-1].buffer, max_bytes=1 << 62)
                except ProtocolError as exc:
                    log.warning("unreadable reply from %s dropped: %s", self.address, exc.message)
                    continue
                rid = obj.get("id")
                if isinstance(rid, str) and rid in ops and rid not in replies:
                    replies[rid] = decode_reply(obj, ops[rid])
                # anything else is a late reply to an earlier, timed-out request: dropped
        return [replies[r.id] for r in reqs]

    def request(self, req: Request, *, timeout_s: float | None = None) -> Reply:
        return _check(self.request_many([req], timeout_s=timeout_s)[0])

    def _complete_req(
        self, prompt: Any, model: str, max_tokens: int | None, timeout_s: float | None
    ) -> CompleteRequest:
        return CompleteRequest(
            id=self.new_id(),
            model=model,
            messages=as_messages(prompt),
            max_tokens=max_tokens,
            timeout_s=timeout_s,
            run=self.run,
            depth=self.depth,
        )

    def complete(
        self,
        prompt: str | Sequence[ChatMessage] | Sequence[dict[str, str]],
        *,
        model: str,
        max_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> CompleteReply:
        wait = None if timeout_s is None else timeout_s + 5.0
        reply = self.request(self._complete_req(prompt, model, max_tokens, timeout_s), timeout_s=wait)
        assert isinstance(reply, CompleteReply)
        return reply

    def complete_many(
        self,
        prompts: Iterable[str | Sequence[ChatMessage]],
        *,
        model: str,
        max_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> list[CompleteReply | ErrorReply]:
        reqs = [self._complete_req(p, model, max_tokens, timeout_s) for p in prompts]
        wait = None if timeout_s is None else timeout_s + 5.0
        out: list[CompleteReply | ErrorReply] = []
        for r in self.request_many(reqs, timeout_s=wait):
            assert isinstance(r, CompleteReply | ErrorReply)
            out.append(r)
        return out

    def ping(self, *, timeout_s: float | None = None) -> PongReply:
        reply = self.request(PingRequest(self.new_id()), timeout_s=timeout_s)
        assert isinstance(reply, PongReply)
        return reply

    def stats(self) -> dict[str, Any]:
        reply = self.request(StatsRequest(self.new_id()))
        assert isinstance(reply, StatsReply)
        return dict(reply.stats)

    def usage(self, run: str) -> RunUsage:
        reply = self.request(UsageRequest(self.new_id(), run))
        assert isinstance(reply, RunUsageReply)
        return reply.run

    def close(self) -> None:
        self._sock.close(linger=0)
        if self._own_context:
            self._ctx.term()
