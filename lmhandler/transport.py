"""The handler's side of ZeroMQ: one ROUTER socket driven by the event loop, replies in batches.

The socket is a plain (synchronous) pyzmq socket driven by the event loop through its file
descriptor, not ``zmq.asyncio``: one wake-up drains every queued message with non-blocking
``recv`` and replies go out with non-blocking ``send`` (a ROUTER never blocks on send), so no
future is made per message. The ZeroMQ descriptor is edge-triggered: it signals "something
changed", not "a message is waiting", and any ``send`` may consume the signal of a message that
arrived meanwhile. So a drain reads until ``EAGAIN``; replies are queued and sent in batches
(``flush``), after which ``EVENTS`` is read again and another drain scheduled if a message is
waiting; and a reply queued outside a drain schedules one. No message can be stranded
(tests/test_handler_transport.py forces the race).

Envelopes are kept as they came: every frame before the payload is echoed back in front of the
reply, so DEALER and REQ clients (and proxies that add hops) all work.

The garbage collector is tuned here too, while a handler runs in the process (``tune_gc``):
thousands of live requests made it a large share of the loop's time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable
from typing import Any

import zmq

__all__ = ["DRAIN_BATCH", "FLUSH_EVERY", "GC_THRESHOLDS", "RouterTransport", "restore_gc", "tune_gc"]

log = logging.getLogger(__name__)

# Plain ints: pyzmq's flag enums cost an enum operation per use on the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_SNDMORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_COPY_THRESHOLD = zmq.COPY_THRESHOLD
# pyzmq's compiled send/recv of one frame, without the Python wrappers of ``zmq.Socket``
# (multipart loops, flag enums, argument checks): those cost several times the call itself.
_recv = zmq.backend.Socket.recv
_send = zmq.backend.Socket.send
# Messages handled per wake-up before other ready callbacks (replies, timers) get a turn.
DRAIN_BATCH = 1024
# Replies queued during a drain go out at its end, or every FLUSH_EVERY messages. Sent in
# batches, they wake ZeroMQ's I/O thread once per batch instead of once per reply (its CPU per
# reply fell from 13.5 to 3.5 us). Sent only at the end of a long drain, they stall closed-loop
# clients whose every request sits in that drain: measured at 64 in flight against the bare echo,
# flushing every 64 gave 0.64x, 32 0.85x, 24 0.87x, 16 0.76x (more flushes, more wake-ups);
# at 256 in flight, 32 gave 0.71x and 128 0.76x. 32 is the simple setting that never convoys a
# window of 64 or more and stays close to the best elsewhere.
FLUSH_EVERY = 32

Payload = bytes | memoryview
# A received message: the envelope frames, then the payload frame (pyzmq ``Frame`` objects).
OnMessage = Callable[[list[Any]], None]


# The cyclic garbage collector, tuned while a handler runs in the process. A request allocates a
# few dozen container objects (task, coroutines, timers, futures) and thousands stay alive at
# once; at CPython's default first threshold of 700 the collector runs every few dozen requests
# and keeps re-scanning the live ones: 18% of the loop's time with 10,000 in flight (py-spy),
# and 1.48 s instead of 1.22 s for that burst. Requests make few reference cycles, so collecting
# less often frees the same memory, a little later.
GC_THRESHOLDS = (50_000, 20, 10)
_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None


def tune_gc() -> None:
    """Raise the collector's thresholds (the first user in the process saves them)."""
    global _gc_users, _gc_saved
    if _gc_users == 0:
        _gc_saved = gc.get_threshold()
        gc.set_threshold(*(max(a, b) for a, b in zip(GC_THRESHOLDS, _gc_saved, strict=True)))
    _gc_users += 1


def restore_gc() -> None:
    """Undo one ``tune_gc``; the last user restores the saved thresholds."""
    global _gc_users, _gc_saved
    _gc_users -= 1
    if _gc_users == 0 and _gc_saved is not None:
        gc.set_threshold(*_gc_saved)
        _gc_saved = None


def _events(sock: zmq.Socket[Any]) -> int:
    events = sock.getsockopt(zmq.EVENTS)
    assert isinstance(events, int)
    return events


class RouterTransport:
    """Drive a bound ROUTER socket from ``loop``: every message goes to ``on_message`` (the
    envelope frames, then the payload frame); ``send`` queues a reply behind an envelope."""

    def __init__(self, sock: zmq.Socket[Any], loop: asyncio.AbstractEventLoop, on_message: OnMessage) -> None:
        self.sock = sock
        self._loop = loop
        self._on_message = on_message
        self._fd: int | None = None
        self._reading = False
        self._draining = False
        self._drain_scheduled = False
        self.outbox: list[tuple[list[Any], Payload]] = []

    def start(self) -> None:
        """Start reading: the loop watches the socket's FD."""
        fd = self.sock.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._fd = fd
        self._reading = True
        self._loop.add_reader(fd, self._drain)
        self._schedule_drain()  # messages may have arrived before the reader was added

    def stop_reading(self) -> None:
        """Take no more messages; replies still go out (``send``, ``flush``)."""
        self._reading = False
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None

    def close(self, linger_ms: int = 100) -> None:
        self.stop_reading()
        self.flush()
        self.sock.close(linger=linger_ms)

    def send(self, envelope: list[Any], payload: Payload) -> None:
        """Queue a reply; it goes out at the end of the current drain, or of the next one."""
        self.outbox.append((envelope, payload))
        if not self._draining:
            self._schedule_drain()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        """Handle the messages already queued (up to a batch), send the replies, yield to the loop.

        Called when the FD signals, and after replies were queued outside a drain.
        """
        self._drain_scheduled = False
        sock = self.sock
        if sock.closed:
            return
        if self._reading:
            on_message = self._on_message
            outbox = self.outbox
            handled = 0
            self._draining = True
            try:
                while handled < DRAIN_BATCH:
                    try:
                        frame = _recv(sock, _NOBLOCK, False)
                        frames = [frame]
                        while frame.more:  # the parts of a message arrive together
                            frame = _recv(sock, _NOBLOCK, False)
                            frames.append(frame)
                    except zmq.Again:
                        break
                    except zmq.ZMQError as exc:  # socket closed under us during shutdown
                        log.debug("receive failed: %s", exc)
                        return
                    handled += 1
                    try:
                        on_message(frames)
                    except Exception:  # the loop boundary: nothing a message does may stop it
                        log.exception("handling a message failed")
                    if len(outbox) >= FLUSH_EVERY:
                        self.flush()
                else:
                    # A full batch: more may be queued, and the FD will not say so again.
                    self._schedule_drain()
            finally:
                self._draining = False
        if self.outbox:
            self.flush()
            # Sending may have consumed the FD's signal of a message that arrived meanwhile;
            # EVENTS tells the truth (and re-arms the FD when nothing is waiting).
            if self._reading and _events(sock) & _POLLIN:
                self._schedule_drain()

    def flush(self) -> None:
        """Send every queued reply. Sent back to back, they reach ZeroMQ's I/O thread as one
        batch instead of waking it once per reply."""
        sock = self.sock
        outbox = self.outbox
        if sock.closed:
            outbox.clear()
            return
        for envelope, payload in outbox:
            try:
                for part in envelope:
                    _send(sock, part, _NOBLOCK_SNDMORE, False)
                # Small payloads are cheaper copied; large ones go without a copy.
                if len(payload) < _COPY_THRESHOLD:
                    _send(sock, payload, _NOBLOCK)
                else:
                    _send(sock, payload, _NOBLOCK, False)
            except zmq.ZMQError as exc:  # peer gone or socket closing: nobody is left to tell
                log.debug("a reply was dropped: %s", exc)
        outbox.clear()
