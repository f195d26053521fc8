"""The ZeroMQ side shared by every client of both protocols: socket options, request ids, the
asyncio DEALER base, and reading one reply frame.

The handler clients (``client.py``) and the sandbox client (``sandbox/client.py``) build on this;
the codec and the messages know nothing of sockets. The servers own their ROUTER sockets
themselves (``rlmq.lmhandler.transport``, ``rlmq.sandbox.pool``) and use ``configure_socket``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from typing import Any, Self

import zmq
import zmq.asyncio

from .codec import unpack
from .errors import ProtocolError
from .security import CurveClientKeys, connect

__all__ = ["HWM", "AsyncDealer", "RequestIds", "configure_socket", "read_reply"]

log = logging.getLogger(__name__)

# High water marks: a relay holds thousands of requests in flight on one socket, and ZeroMQ's
# default of 1,000 would block senders or (on ROUTER) silently drop replies past it.
HWM = 1_000_000
# Replies are as large as the server allows; a client reads whatever its server chose to send.
_NO_LIMIT = 1 << 62


def configure_socket(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.LINGER, 0)


class RequestIds:
    """Request ids unique across processes sharing one server: a random prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"


def read_reply(payload: bytes | memoryview, address: str) -> dict[str, Any] | None:
    """The map of a reply's payload frame, or None for one that cannot be read: it cannot be
    matched to a request either, so it is logged and dropped."""
    try:
        return unpack(payload, max_bytes=_NO_LIMIT)
    except ProtocolError as exc:
        log.warning("unreadable reply from %s dropped: %s", address, exc.message)
        return None


class AsyncDealer:
    """One asyncio DEALER socket to a server, with request ids; the handler's and the sandbox
    pool's async clients build their request/reply matching on it."""

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
        self._ids = RequestIds()
        self._reader: asyncio.Task[None] | None = None  # started by the first request
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
