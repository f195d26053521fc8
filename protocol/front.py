"""Several handlers as one front: one DEALER per address, liveness from ZeroMQ, re-sends.

A handler address may name several handlers, comma-separated (``"tcp://a:5555,tcp://b:5555"``).
The clients (``client.py``) and the sandbox pool's relay hold one DEALER per address and spread
requests over the handlers that are up, each to the one with the fewest requests in flight.

Liveness comes from ZeroMQ, never from a call's timeout:

- each DEALER has a socket monitor: a connection is *up* once its handshake succeeded, and *down*
  at its ``DISCONNECTED`` event (a killed process's connection is reset at once);
- ZMTP heartbeats (``HEARTBEAT_IVL_MS``/``HEARTBEAT_TIMEOUT_MS``) close a connection whose peer
  went silent (a hung or unreachable host), which the monitor then reports the same way;
- at ``DISCONNECTED`` the replies that did arrive are read first (a handler that answers and then
  stops loses nothing), then the address is disconnected and connected again: that discards what
  ZeroMQ still queued for the old connection, so a handler that returns on the same address is
  not handed those requests a second time beside their re-sends.

``Front`` is the part both kinds of socket share (httpx style: the sync and async clients differ
only in how they wait): which requests are in flight on which handler, with their frames kept.
When a handler goes down, its requests are sent again, same frames and same request id, to
another handler that is up, or parked until one is (a lone handler restarted on its address).
A parked request waits at most its own bound (``park_s``: a complete's ``timeout_s``, else
``PARKED_TIMEOUT_S``); past it ``unreachable()`` hands it back, and the caller answers it with the
typed, retryable ``unavailable`` error, so a handler that never comes back costs a call, never
the exec (and the session's variables) it was made from. The handler's shared state remembers
finished request ids, so a re-sent call that had finished is neither paid nor counted twice
(docs/protocol.md, "Several handlers"). Each caller keeps its own deadline and drops its request
from the front when that passes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import zmq

from .dealer import configure_socket
from .errors import ConfigError
from .security import CurveClientKeys, connect

__all__ = [
    "HEARTBEAT_IVL_MS",
    "HEARTBEAT_TIMEOUT_MS",
    "PARKED_TIMEOUT_S",
    "Front",
    "InFlight",
    "Link",
    "front_socket",
    "monitor_event",
    "reconnect",
    "send_now",
    "send_now_async",
    "split_addresses",
]

# A silent peer is given up after HEARTBEAT_TIMEOUT_MS: well under any call's deadline, and over
# what a busy handler's I/O thread (which answers pings, not the event loop) ever lags.
HEARTBEAT_IVL_MS = 1_000
HEARTBEAT_TIMEOUT_MS = 3_000
# Asks the handler to drop this connection too when it hears nothing from us for this long.
HEARTBEAT_TTL_MS = 6_000
# How often a handler that is down is tried again (ZeroMQ's default, made explicit).
RECONNECT_IVL_MS = 100
MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
# How long a request with no handler up to take it waits (unless it names its own timeout_s)
# before it is answered `unavailable`: room for a handler to restart on its address, and well
# below a sandbox exec's timeout (120 s by default), so the exec ends with a typed error in the
# model's code instead of timing out and losing the session's variables.
PARKED_TIMEOUT_S = 30.0

K = TypeVar("K", bound=Hashable)
Frames = Sequence[Any]  # bytes, memoryview or zmq.Frame: what send_multipart takes


def split_addresses(address: str) -> tuple[str, ...]:
    """``"A,B,C"`` to ``("A", "B", "C")``: stripped, duplicates dropped, order kept."""
    parts = tuple(dict.fromkeys(p.strip() for p in address.split(",") if p.strip()))
    if not parts:
        raise ConfigError(f"no handler address in {address!r}")
    return parts


def front_socket(ctx: zmq.Context[Any], address: str, curve: CurveClientKeys | None) -> tuple[Any, Any]:
    """A DEALER connected to one handler, and the PAIR socket its monitor reports on.

    The socket type follows the context (an asyncio context gives asyncio sockets)."""
    sock = ctx.socket(zmq.DEALER)
    try:
        configure_socket(sock)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        monitor = sock.get_monitor_socket(MONITOR_EVENTS)  # before connecting: no event missed
    except BaseException:
        sock.close(linger=0)
        raise
    try:
        connect(sock, address, curve)  # CURVE on TCP when keys are given
    except BaseException:
        close_link_sockets(sock, monitor)
        raise
    return sock, monitor


def close_link_sockets(sock: Any, monitor: Any) -> None:
    if monitor is not None:
        with contextlib.suppress(zmq.ZMQError):  # the socket is already closing
            sock.disable_monitor()
        monitor.close(linger=0)
    sock.close(linger=0)


def reconnect(link: Link, curve: CurveClientKeys | None) -> None:
    """Disconnect ``link``'s socket and connect it again: what ZeroMQ still queued for the old
    connection is dropped (LINGER 0), and the new one comes up, as any, with a handshake event."""
    with contextlib.suppress(zmq.ZMQError):  # not connected any more: nothing to drop
        link.sock.disconnect(link.address)
    connect(link.sock, link.address, curve)


def monitor_event(frames: Sequence[bytes | zmq.Frame]) -> int:
    """The event number of one monitor message (its first frame: 16-bit event, 32-bit value)."""
    first = frames[0]
    return int.from_bytes((first.bytes if isinstance(first, zmq.Frame) else first)[:2], "little")


class Link:
    """One handler of a front: its DEALER, its monitor, whether it is up, its requests in flight."""

    __slots__ = ("address", "calls", "monitor", "sock", "up")

    def __init__(self, address: str, sock: Any, monitor: Any | None) -> None:
        self.address = address
        self.sock = sock
        self.monitor = monitor
        # A socket given without a monitor (a sandbox worker's, to its relay) is taken as up.
        self.up = monitor is None
        self.calls: set[Hashable] = set()

    def close(self) -> None:
        close_link_sockets(self.sock, self.monitor)

    def __repr__(self) -> str:
        return f"Link({self.address!r}, up={self.up}, in_flight={len(self.calls)})"


class InFlight(Generic[K]):
    """A request the front has not seen answered: its frames, where it is, how often it went."""

    __slots__ = ("frames", "key", "link", "park_s", "parked_at", "sends", "since")

    def __init__(self, key: K, frames: Frames, since: float, park_s: float) -> None:
        self.key = key
        self.frames = frames
        self.link: Link | None = None
        self.sends = 0
        self.since = since
        self.park_s = park_s  # the longest it may wait with no handler to take it
        self.parked_at: float | None = None  # since when it has had none (monotonic)


class Front(Generic[K]):
    """Requests in flight over several handlers (the shared core; no waiting, no clock of its own
    but ``since``). ``transmit(link, frames)`` sends without blocking and says whether it went."""

    def __init__(
        self,
        links: Sequence[Link],
        transmit: Callable[[Link, Frames], bool],
        reset: Callable[[Link], None] | None = None,
        *,
        park_s: float = PARKED_TIMEOUT_S,
    ) -> None:
        """``reset(link)``, when a handler went down: read the replies it did send (they end with
        ``done``), then drop what is still queued for it (``reconnect``). ``park_s``: how long a
        request may wait with no handler up, unless ``send`` names its own bound."""
        self.links = list(links)
        self.park_s = park_s
        self._transmit = transmit
        self._reset = reset
        self.calls: dict[K, InFlight[K]] = {}
        self.parked: dict[K, InFlight[K]] = {}  # no handler up to take them (yet)
        self.resent = 0  # requests sent again after their handler went down

    def live(self) -> list[Link]:
        return [link for link in self.links if link.up]

    @property
    def address(self) -> str:
        """The handlers' addresses, as one ``"A,B,C"`` string (for messages)."""
        return ",".join(link.address for link in self.links)

    def send(self, key: K, frames: Frames, *, park_s: float | None = None) -> InFlight[K]:
        """Send (or park) a request; ``park_s`` bounds its wait with no handler up (default: the
        front's ``park_s``). Its ``parked_at`` says, even once it is forgotten, whether it was
        waiting for a handler rather than for a reply."""
        call = InFlight(key, frames, time.monotonic(), self.park_s if park_s is None else park_s)
        self.calls[key] = call
        self._place(call)
        return call

    def _place(self, call: InFlight[K]) -> None:
        tried: list[Link] = []
        while True:
            # The handler that is up with the fewest requests in flight: evens the load out and
            # steers around a slow handler. A handful of links: a plain scan.
            best: Link | None = None
            for link in self.links:
                if link.up and link not in tried and (best is None or len(link.calls) < len(best.calls)):
                    best = link
            if best is None:
                call.link = None
                if call.parked_at is None:  # a retry that parks it again keeps its first time
                    call.parked_at = time.monotonic()
                self.parked[call.key] = call
                return
            if self._transmit(best, call.frames):
                best.calls.add(call.key)
                call.link = best
                call.parked_at = None
                call.sends += 1
                return
            # No connection under it after all (it just went; its DISCONNECTED is on the way, or
            # its handshake is not yet seen by the socket): try the others, park if none takes it.
            tried.append(best)

    def done(self, key: K) -> InFlight[K] | None:
        """The request ``key`` was answered (or its caller gave up): forget it. None when it was
        not in flight: a second reply to a re-sent request, or a late one, to be dropped."""
        call = self.calls.pop(key, None)
        if call is None:
            return None
        if call.link is not None:
            call.link.calls.discard(key)
        else:
            self.parked.pop(key, None)
        return call

    def event(self, link: Link, event: int) -> None:
        """A monitor event of ``link``'s socket."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            link.up = True
            self.flush()
        elif event == zmq.EVENT_DISCONNECTED:
            link.up = False
            if self._reset is not None:
                self._reset(link)
            moved = [call for call in self.calls.values() if call.link is link]
            link.calls.clear()
            for call in moved:
                self.resent += 1
                self._place(call)

    def flush(self) -> None:
        """Send the parked requests, if a handler is up to take them."""
        if not self.parked or not any(link.up for link in self.links):
            return
        parked = list(self.parked.values())
        self.parked.clear()
        for call in parked:
            self._place(call)

    def expire(self, older_than: float) -> list[K]:
        """Forget the requests sent before ``older_than`` (monotonic): their callers gave up."""
        old = [key for key, call in self.calls.items() if call.since < older_than]
        for key in old:
            self.done(key)
        return old

    def unreachable(self, now: float) -> list[InFlight[K]]:
        """The parked requests that waited their ``park_s`` (``now``: monotonic) with no handler
        to take them, forgotten here: each caller answers its own with ``unavailable_message``."""
        if not self.parked:
            return []
        out = [
            call
            for call in self.parked.values()
            if call.parked_at is not None and now - call.parked_at >= call.park_s
        ]
        for call in out:
            self.done(call.key)
        return out

    def unavailable_message(self, call: InFlight[K], now: float) -> str:
        """What a request given up by ``unreachable`` is answered (code ``unavailable``)."""
        waited = now - (call.parked_at if call.parked_at is not None else call.since)
        return (
            f"no handler reachable at {self.address} for {waited:.0f} s; the request was not answered "
            "(retryable: once a handler is up again)"
        )

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.calls.clear()
        self.parked.clear()


def send_now(link: Link, frames: Frames) -> bool:
    """``transmit`` for blocking sockets."""
    try:
        if len(frames) == 1:
            link.sock.send(frames[0], zmq.NOBLOCK, copy=False)
        else:
            link.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return False
    return True


def send_now_async(link: Link, frames: Frames) -> bool:
    """``transmit`` for asyncio sockets: with NOBLOCK their send is tried at once and the future
    it returns is already done (nothing else on these sockets sends without NOBLOCK)."""
    if len(frames) == 1:
        fut = link.sock.send(frames[0], zmq.NOBLOCK, copy=False)
    else:
        fut = link.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
    if not fut.done():
        return True  # queued behind another send: it goes when the socket is writable
    exc = fut.exception()
    if exc is None:
        return True
    if isinstance(exc, zmq.Again):
        return False
    raise exc
