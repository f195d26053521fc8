"""The handler's clients: ``AsyncHandlerClient`` (asyncio, for orchestrators and tools) and
``HandlerClient`` (blocking, for sandbox workers whose model code calls ``llm_query``).

Both take one handler address or several, comma-separated (``"A,B,C"``): one DEALER per address
(``front.py``), requests spread over the handlers that are up, and a request whose handler went
away sent again, same id, to another one (or to the same address once it is back). A request
no handler is up to take waits at most its own ``timeout_s`` (a complete's), else
``PARKED_TIMEOUT_S``, and at most the call's deadline: then it fails with the typed, retryable
``unavailable`` error (``RemoteError``), never a hang. Many
requests are in flight at once and replies are matched to requests by ``id``. They share one
core, ``_HandlerCalls``: how each request is built and how a reply becomes a result or an
exception; only the waiting differs. Every wait has a timeout; an error reply is raised as
``RemoteError`` with the peer's code, message and retryable flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Self, TypeVar

import zmq
import zmq.asyncio

from .codec import decode_reply, encode
from .dealer import RequestIds, configure_socket, read_reply
from .errors import DecodeError, ErrorCode, RemoteError, TransportTimeout
from .front import (
    Front,
    InFlight,
    Link,
    front_socket,
    monitor_event,
    reconnect,
    send_now,
    send_now_async,
    split_addresses,
)
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
from .security import CurveClientKeys
from .tracing import current_traceparent

__all__ = ["AsyncHandlerClient", "HandlerClient", "as_messages", "configure_socket"]

DEFAULT_TIMEOUT_S = 300.0
# The transport waits this much longer than a complete's own timeout, so the handler's typed
# `timeout` reply wins over the client's TransportTimeout.
TIMEOUT_MARGIN_S = 5.0
R = TypeVar("R", bound=Reply)
# How often requests parked for want of a usable connection are tried again.
_RETRY_PARKED_S = 0.25
_RETRY_PARKED_MS = 250
# Replies taken from one socket before the others get a turn.
_DRAIN = 256


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


def _park_bound(front: Front[str], park_s: float | None, timeout: float) -> float:
    """How long a request may wait with no handler up: its own bound, else the front's; never
    past its deadline."""
    return min(front.park_s if park_s is None else park_s, timeout)


def _unavailable(front: Front[str], call: InFlight[str], now: float) -> RemoteError:
    return RemoteError(ErrorCode.UNAVAILABLE, front.unavailable_message(call, now), retryable=True)


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
            trace=current_traceparent(),  # None (and nothing sent) when tracing is off
        )


class AsyncHandlerClient(_HandlerCalls):
    """An asyncio client of one handler or several (``"A,B,C"``); safe to share between tasks
    of one event loop."""

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
        self.address = address
        self.addresses = split_addresses(address)
        self.timeout_s = timeout_s
        self.run = run
        self.depth = depth
        self._run_keys = {}
        self._ids = RequestIds()
        self._own_context = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._curve = curve
        self._front: Front[str] = Front(_links(self._ctx, self.addresses, curve), send_now_async, self._reset)
        self._pending: dict[str, tuple[asyncio.Future[Reply], str]] = {}
        self._tasks: list[asyncio.Task[None]] = []  # started by the first request
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def resent(self) -> int:
        """Requests sent again because their handler went away."""
        return self._front.resent

    def live(self) -> list[str]:
        """The addresses of the handlers whose connection is up now."""
        return [link.address for link in self._front.live()]

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        for link in self._front.links:
            self._tasks.append(loop.create_task(self._read(link)))
            self._tasks.append(loop.create_task(self._watch(link)))
        self._tasks.append(loop.create_task(self._retry_parked()))

    async def _read(self, link: Link) -> None:
        sock = link.sock
        while True:
            self._on_reply(link, await sock.recv_multipart(copy=False))

    def _on_reply(self, link: Link, frames: list[zmq.Frame]) -> None:
        obj = read_reply(frames[-1].buffer, link.address)
        if obj is None:
            return
        rid = obj.get("id")
        if not isinstance(rid, str) or self._front.done(rid) is None:
            return  # a late reply, or a second one to a request that was sent again
        entry = self._pending.pop(rid, None)
        if entry is None:
            return
        future, op = entry
        if not future.done():
            try:
                future.set_result(decode_reply(obj, op))
            except Exception as exc:
                future.set_exception(exc)

    def _reset(self, link: Link) -> None:
        # The handler went down: take the replies it sent before it went (a non-blocking recv on
        # an asyncio socket is done at once), then drop what is queued for it.
        while True:
            fut = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            if fut.exception() is not None:
                break
            self._on_reply(link, fut.result())
        reconnect(link, self._curve)

    async def _watch(self, link: Link) -> None:
        while True:
            assert link.monitor is not None  # every link of this client has one
            self._front.event(link, monitor_event(await link.monitor.recv_multipart()))

    async def _retry_parked(self) -> None:
        # A request parked because its handler's connection was not usable at the very moment it
        # was sent (a handshake the socket has not caught up with) is tried again shortly; one
        # that had no handler up for its whole bound fails `unavailable`.
        front = self._front
        while True:
            await asyncio.sleep(_RETRY_PARKED_S)
            front.flush()
            now = time.monotonic()
            for call in front.unreachable(now):
                entry = self._pending.pop(call.key, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_exception(_unavailable(front, call, now))

    async def request(
        self, req: Request, *, timeout_s: float | None = None, park_s: float | None = None
    ) -> Reply:
        """Send one request and wait for its reply; raises ``RemoteError`` on an error reply
        (``unavailable`` when no handler was up to take it for ``park_s``, by default the
        front's ``PARKED_TIMEOUT_S``, or at its deadline)."""
        if self._closed:
            raise RuntimeError("client is closed")
        if not self._tasks:
            self._start()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[req.id] = (future, req.OP)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        call = self._front.send(req.id, (encode(req),), park_s=_park_bound(self._front, park_s, timeout))
        try:
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            if call.parked_at is not None:  # waiting for a handler to be up, not for a slow one
                raise _unavailable(self._front, call, time.monotonic()) from None
            raise TransportTimeout(
                f"no reply to {req.OP} {req.id} from {self.address} within {timeout:g} s"
            ) from None
        finally:
            if self._pending.pop(req.id, None) is not None:  # timed out or cancelled
                self._front.done(req.id)
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
        reply = await self.request(req, timeout_s=_complete_wait(timeout_s), park_s=timeout_s)
        return _expect(reply, CompleteReply)

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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeError("client closed"))
                future.exception()  # mark retrieved: nobody may be waiting any more
        self._pending.clear()
        self._front.close()
        if self._own_context:
            self._ctx.term()


def _links(ctx: zmq.Context[Any], addresses: Sequence[str], curve: CurveClientKeys | None) -> list[Link]:
    links: list[Link] = []
    try:
        for address in addresses:
            links.append(Link(address, *front_socket(ctx, address, curve)))
    except BaseException:
        for link in links:
            link.close()
        raise
    return links


class HandlerClient(_HandlerCalls):
    """A blocking client of one handler or several (``"A,B,C"``), for code that is not async
    (sandbox workers, tools).

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
        own, with its routing id, before it drops privileges); the client then owns it and
        takes it as always up (its peer, the pool's relay, lives as long as the worker)."""
        self.address = address
        self.timeout_s = timeout_s
        self.run = run
        self.depth = depth
        self._run_keys = {}
        self._own_context = context is None and sock is None
        self._ctx: zmq.Context[Any] = context or (sock.context if sock is not None else zmq.Context())
        if sock is not None:
            links = [Link(address, sock, None)]
        else:
            try:
                links = _links(self._ctx, split_addresses(address), curve)
            except BaseException:
                if self._own_context:
                    self._ctx.term()
                raise
        self._curve = curve
        self._ops: dict[str, str] = {}  # the batch being waited for: id -> op
        self._replies: dict[str, Reply] = {}
        self._front: Front[str] = Front(links, send_now, self._reset)
        self._poller = zmq.Poller()
        self._sockets: dict[Any, tuple[Link, bool]] = {}  # socket -> (its link, is it the monitor)
        for link in links:
            self._poller.register(link.sock, zmq.POLLIN)
            self._sockets[link.sock] = (link, False)
            if link.monitor is not None:
                self._poller.register(link.monitor, zmq.POLLIN)
                self._sockets[link.monitor] = (link, True)
        self._ids = RequestIds()
        self._lock = threading.Lock()

    def __enter__(self) -> HandlerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def resent(self) -> int:
        """Requests sent again because their handler went away."""
        return self._front.resent

    def live(self) -> list[str]:
        """The addresses of the handlers whose connection was up at the last call."""
        return [link.address for link in self._front.live()]

    def request_many(
        self, reqs: Sequence[Request], *, timeout_s: float | None = None, park_s: float | None = None
    ) -> list[Reply]:
        """Send all, then collect replies in request order. Error replies are returned, not raised:
        ``unavailable`` for a request no handler was up to take for ``park_s`` (by default the
        front's ``PARKED_TIMEOUT_S``) or until the deadline."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        front = self._front
        park = _park_bound(front, park_s, timeout)
        with self._lock:
            ops = self._ops = {r.id: r.OP for r in reqs}
            replies = self._replies = {}
            try:
                self._poll(0)  # monitor events since the last call: who is up now
                for r in reqs:
                    front.send(r.id, (encode(r),), park_s=park)
                deadline = time.monotonic() + timeout
                while len(replies) < len(ops):
                    now = time.monotonic()
                    if front.parked:
                        self._give_up_parked(front.unreachable(now), now)
                        if len(replies) == len(ops):
                            break
                    left_ms = int((deadline - now) * 1000)
                    if left_ms <= 0:
                        # At the deadline a request still parked was never taken by a handler:
                        # `unavailable`, as at its own bound; one taken and unanswered times out.
                        self._give_up_parked(list(front.parked.values()), now)
                        if len(replies) == len(ops):
                            break
                        missing = len(ops) - len(replies)
                        raise TransportTimeout(
                            f"{missing} of {len(ops)} replies from {self.address} missing after {timeout:g} s"
                        )
                    if not self._poll(min(left_ms, _RETRY_PARKED_MS)):
                        front.flush()  # a quiet moment: parked requests, if any, try again
            finally:
                for rid in ops:
                    front.done(rid)  # replied ones are gone already; the rest are given up
                self._ops, self._replies = {}, {}
        return [replies[r.id] for r in reqs]

    def _give_up_parked(self, calls: Sequence[InFlight[str]], now: float) -> None:
        for call in calls:
            self._front.done(call.key)
            if call.key in self._ops:
                message = self._front.unavailable_message(call, now)
                self._replies[call.key] = ErrorReply(call.key, ErrorCode.UNAVAILABLE, message, True)

    def _poll(self, timeout_ms: int) -> bool:
        """Handle what is ready within ``timeout_ms``: replies, and monitor events into the
        front. False when nothing was."""
        ready = self._poller.poll(timeout_ms)
        for sock, _ in ready:
            link, is_monitor = self._sockets[sock]
            if is_monitor:
                while True:
                    try:
                        msg = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._front.event(link, monitor_event(msg))
            else:
                self._drain(link, _DRAIN)
        return bool(ready)

    def _drain(self, link: Link, most: int) -> None:
        for _ in range(most):
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            obj = read_reply(frames[-1].buffer, link.address)
            if obj is None:
                continue
            rid = obj.get("id")
            if isinstance(rid, str) and rid in self._ops and self._front.done(rid) is not None:
                self._replies[rid] = decode_reply(obj, self._ops[rid])
            # anything else is a late reply to an earlier, timed-out request, or a second reply
            # to one that was sent again: dropped

    def _reset(self, link: Link) -> None:
        # The handler went down: take the replies it sent before it went, then drop what is
        # queued for it.
        self._drain(link, 1 << 30)
        reconnect(link, self._curve)

    def request(self, req: Request, *, timeout_s: float | None = None, park_s: float | None = None) -> Reply:
        return _raise_for(self.request_many([req], timeout_s=timeout_s, park_s=park_s)[0])

    def complete(
        self,
        prompt: str | Sequence[ChatMessage] | Sequence[dict[str, str]],
        *,
        model: str,
        max_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> CompleteReply:
        req = self._complete_request(prompt, model, max_tokens, None, timeout_s)
        return _expect(
            self.request(req, timeout_s=_complete_wait(timeout_s), park_s=timeout_s), CompleteReply
        )

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
        for r in self.request_many(reqs, timeout_s=_complete_wait(timeout_s), park_s=timeout_s):
            out.append(r if isinstance(r, ErrorReply) else _expect(r, CompleteReply))
        return out

    def ping(self, *, timeout_s: float | None = None) -> PongReply:
        return _expect(self.request(PingRequest(self.new_id()), timeout_s=timeout_s), PongReply)

    def stats(self) -> dict[str, Any]:
        return dict(_expect(self.request(StatsRequest(self.new_id())), StatsReply).stats)

    def usage(self, run: str) -> RunUsage:
        return _expect(self.request(UsageRequest(self.new_id(), run)), RunUsageReply).run

    def close(self) -> None:
        self._front.close()
        if self._own_context:
            self._ctx.term()
