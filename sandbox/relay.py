"""The stamping relay: the only way a worker's sub-calls leave the sandbox.

    worker (model code)  --DEALER, ipc in the pool's 0700 directory-->  relay (a thread of the pool)
                                                                          |  stamps run, depth, key
                                                                          v  counts sub-calls per exec
                                                          handler (the session's, CURVE keys here)

Every worker connects one DEALER to the relay's ROUTER before it drops privileges, with a routing
id the pool chose for it; after the drop the worker cannot enter the directory again, so no other
connection can appear, and the routing id says which worker (and so which session) sent a message.
Whatever the model's code puts in a request, the relay decides what goes on:

- ``complete``: ``run``, ``depth`` and ``key`` are overwritten with the session's (the run's key is
  the pool's, given by the orchestrator at open; the worker never holds it), and the call is
  counted against the session's per-exec cap (``max_sub_calls_per_exec``, which the worker's
  namespace also checks); past it the relay answers ``budget_exceeded`` and sends nothing. At most
  ``max_batch`` of a session's calls are in flight at once (``llm_query_batched`` sends waves of
  that many); one more is answered ``overloaded`` at once (retryable: the calls in flight end) and
  never sent.
- ``ping``: passed on unchanged (workers read the models' context windows from it).
- a request whose id is one of the worker's requests still in flight: ``bad_request`` (replies
  are matched to requests by id, so a reused id would let calls leave the in-flight count early).
- anything else (``run_open``, ``usage``, ...): refused with ``unauthorized``.
- a routing id the pool did not give out: dropped.

A request none of its session's handlers is up to take (the one handler died, or all of them) is
kept and sent as soon as one is (a handler restarted on its address), but for at most its own
``timeout_s``, else ``parked_timeout_s`` (``PARKED_TIMEOUT_S``, 30 s, well below the exec timeout):
then the relay answers it ``unavailable`` (retryable), so ``llm_query`` raises in the model's code
and the exec, and the session's variables, outlive a handler that does not come back.

The handler echoes the envelope (the worker's routing id), so the relay sends each reply back to
that worker as it came, and strikes the reply's id off that worker's requests in flight. The thread
shares nothing with the event loop but ``Stamp`` objects, whose counters take a lock, and the
table of workers (single dict operations).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from rlmq.protocol import ErrorCode, ErrorReply, ProtocolError, pack, peek_id, unpack
from rlmq.protocol.client import configure_socket
from rlmq.protocol.front import (
    PARKED_TIMEOUT_S,
    Front,
    Link,
    front_socket,
    monitor_event,
    reconnect,
    send_now,
    split_addresses,
)
from rlmq.protocol.security import CurveClientKeys

from .recording import ExecRecording

__all__ = ["Stamp", "SubCallRelay"]

log = logging.getLogger(__name__)

# Messages taken from one socket before the others get a turn.
_BATCH = 256
# How often calls given up are forgotten by the upstream side, and parked ones tried again.
_SWEEP_S = 1.0

# A request still unanswered after this long is taken as lost (its handler died before replying)
# and stops counting against max_batch. Well past the handler's own deadline for a call (120 s by
# default) and the worker's wait for it (300 s), so a slow call is never taken for a lost one.
LOST_AFTER_S = 600.0

# Pings in flight per worker (a worker sends one at start and one per handler it meets): bounds
# what a flood of pings to an unanswering handler makes the relay remember.
_MAX_PINGS = 8


@dataclass(eq=False)
class Stamp:
    """What the relay writes on a session's sub-calls, and its per-exec count of them."""

    run: str
    depth: int  # of the sub-calls: the session's depth + 1
    key: str | None  # the run's key, if the orchestrator gave one
    upstream: str  # the handler this session's sub-calls go to
    max_calls: int  # sub-calls per exec (llm_query prompts and rlm_query calls)
    max_batch: int  # llm_query calls in flight at once
    calls: int = 0
    # Per exec, set by the pool's loop (single attribute writes, read once per message here):
    trace: str | None = None  # a W3C traceparent put on every complete the relay sends on
    recording: ExecRecording | None = None  # records the exec's sub-calls, answers its replay
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, n: int = 1) -> bool:
        """Count ``n`` sub-calls of the current exec; False (nothing counted) past the cap."""
        with self._lock:
            if self.calls + n > self.max_calls:
                return False
            self.calls += n
            return True

    def begin_exec(self) -> None:
        with self._lock:
            self.calls = 0


@dataclass(eq=False)
class _Slot:
    """A worker the pool started: its session's stamp (None before it has one) and its requests
    in flight. ``pending`` and ``calls`` are the relay thread's alone."""

    stamp: Stamp | None = None
    pending: dict[str, tuple[float, bool]] = field(default_factory=dict)  # id -> (lost at, a call?)
    calls: int = 0  # the completes among ``pending``

    def done(self, rid: str | None) -> None:
        entry = self.pending.pop(rid, None) if rid is not None else None
        if entry is not None and entry[1]:
            self.calls -= 1

    def expire(self, now: float) -> None:
        for rid in [rid for rid, (lost_at, _) in self.pending.items() if lost_at <= now]:
            self.done(rid)


class SubCallRelay:
    """A ROUTER on an ipc path (in a directory only the pool can enter) relaying workers'
    sub-calls to their sessions' handlers, stamped; in its own thread."""

    def __init__(
        self,
        path: str,
        default_upstream: str,
        *,
        curve: CurveClientKeys | None = None,
        max_message_bytes: int,
    ) -> None:
        self.address = f"ipc://{path}"
        self.default_upstream = default_upstream
        self.curve = curve  # CURVE client keys for upstreams that require them; never a worker's
        self.max_message_bytes = max_message_bytes
        # routing id -> the worker's slot. Written by the event loop, read by the relay thread
        # (single dict operations).
        self._workers: dict[bytes, _Slot] = {}
        # How long a request waits for a handler to be up (unless it names its own timeout_s)
        # before it is answered `unavailable`. Read by the relay thread at each send.
        self.parked_timeout_s = PARKED_TIMEOUT_S
        self.relayed = 0
        self.refused = 0
        self.dropped = 0
        self.unreachable = 0  # requests answered `unavailable`: no handler up for their bound
        # One front per upstream string ("A" or "A,B,C"): a DEALER and a monitor per handler, and
        # the calls in flight with their frames, sent again, same id, when their handler goes.
        # Made and used by the relay thread; others only read (``live``, ``resent``).
        self._upstreams: dict[str, Front[tuple[bytes, str]]] = {}
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._control_address = f"inproc://relay-control-{id(self)}"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"sub-call relay {path}", daemon=True)

    # ------------------------------------------------------------ the pool's side

    def admit(self, ident: bytes) -> None:
        """A worker the pool starts will connect with ``ident``."""
        self._workers[ident] = _Slot()

    def assign(self, ident: bytes, stamp: Stamp) -> None:
        """The worker with ``ident`` now serves a session: stamp its sub-calls with ``stamp``."""
        slot = self._workers.get(ident)
        if slot is not None:
            slot.stamp = stamp

    def forget(self, ident: bytes) -> None:
        """The worker is gone: anything still arriving under its id is dropped, and its calls in
        flight no longer count (a session's next worker starts with none)."""
        self._workers.pop(ident, None)

    @property
    def resent(self) -> int:
        """Sub-calls sent again because their handler went away (every upstream)."""
        return sum(upstream.resent for upstream in list(self._upstreams.values()))

    def live(self, upstream: str) -> list[str]:
        """The handlers of ``upstream`` (``"A,B,C"``) whose connection is up now; none before the
        first sub-call to it (connections are made on first use). A snapshot, for tools and tests."""
        front = self._upstreams.get(upstream)
        return [] if front is None else [link.address for link in list(front.links) if link.up]

    def start(self, timeout_s: float = 5.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            raise OSError(f"sub-call relay on {self.address} did not start: {self._error}")
        return self.address

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            client = self._ctx.socket(zmq.PAIR)
            try:
                client.connect(self._control_address)
                client.send(b"stop")
            finally:
                client.close(linger=0)
            self._thread.join(timeout_s)
        self._ctx.term()

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        front = self._ctx.socket(zmq.ROUTER)
        control = self._ctx.socket(zmq.PAIR)
        try:
            configure_socket(front)
            # Workers run untrusted code: cap what one message may make the pool hold.
            front.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
            front.bind(self.address)
            control.bind(self._control_address)
        except BaseException as exc:  # the thread's boundary: handed to start(), which raises
            self._error = exc
            self._ready.set()
            front.close(linger=0)
            control.close(linger=0)
            return
        self._front = front
        # an upstream socket -> its front, its link, and whether it is the link's monitor
        self._links: dict[Any, tuple[Front[tuple[bytes, str]], Link, bool]] = {}
        self._poller = zmq.Poller()
        self._poller.register(front, zmq.POLLIN)
        self._poller.register(control, zmq.POLLIN)
        self._ready.set()
        try:
            self._serve(front, control)
        except zmq.ZMQError as exc:
            log.debug("sub-call relay %s ended: %s", self.address, exc)
        finally:
            for sock in (front, control):
                sock.close(linger=0)
            for upstream in self._upstreams.values():
                upstream.close()

    def _serve(self, front: zmq.Socket[Any], control: zmq.Socket[Any]) -> None:
        next_sweep = time.monotonic() + _SWEEP_S
        while True:
            ready = dict(self._poller.poll(int(_SWEEP_S * 1000)))
            if control in ready:
                return
            for sock in ready:
                if sock is front:
                    self._drain(front, self._from_worker)
                elif sock is not control:
                    upstream, link, is_monitor = self._links[sock]
                    if is_monitor:
                        self._drain(sock, lambda msg, u=upstream, k=link: u.event(k, monitor_event(msg)))
                    else:
                        self._drain(sock, lambda frames, u=upstream: self._upstream_reply(u, frames))
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + _SWEEP_S
                for upstream in self._upstreams.values():
                    upstream.expire(now - LOST_AFTER_S)  # their workers struck them off already
                    upstream.flush()  # parked for want of a usable connection: try again
                    for call in upstream.unreachable(now):
                        try:
                            self._unreachable(call.key, upstream.unavailable_message(call, now))
                        except Exception:  # the loop boundary, as in _drain
                            log.exception("the sub-call relay failed to answer a parked call")

    def _unreachable(self, key: tuple[bytes, str], message: str) -> None:
        """Answer a request no handler was up to take within its bound: ``unavailable``, as if from
        the handler (recorded, struck off the worker's calls in flight)."""
        ident, rid = key
        self.unreachable += 1
        reply = pack(ErrorReply(rid, ErrorCode.UNAVAILABLE, message, True).to_wire())
        slot = self._workers.get(ident)
        recording = slot.stamp.recording if slot is not None and slot.stamp is not None else None
        if recording is not None:
            recording.reply(reply)
        if slot is not None:
            slot.done(rid)
        self._front.send_multipart([ident, reply], copy=False)

    def _upstream_reply(self, upstream: Front[tuple[bytes, str]], frames: list[zmq.Frame]) -> None:
        """A handler's reply: struck off its front's calls in flight and passed on, once. A second
        reply to a call that was sent again (or one to a call given up) is dropped here."""
        rid = peek_id(frames[-1].buffer)
        if rid is None or upstream.done((frames[0].bytes, rid)) is None:
            self.dropped += 1
            return
        self._from_handler(frames)

    def _upstream_reset(self, link: Link) -> None:
        # The handler went down: pass on the replies it sent before it went, then drop what is
        # still queued for it (its calls are sent again by the front).
        upstream = self._links[link.sock][0]
        while True:
            try:
                frames = link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                self._upstream_reply(upstream, frames)
            except Exception:  # the loop boundary, as in _drain
                log.exception("the sub-call relay failed on a message")
        reconnect(link, self.curve)

    def _upstream_send(
        self, address: str, ident: bytes, rid: str, payload: bytes, timeout_s: Any = None
    ) -> None:
        """Send a worker's request to one of ``address``'s handlers, keeping it until its reply.
        ``timeout_s``: the request's own, which bounds its wait for a handler to be up."""
        park_s = self.parked_timeout_s
        if isinstance(timeout_s, int | float) and not isinstance(timeout_s, bool) and timeout_s > 0:
            park_s = min(float(timeout_s), LOST_AFTER_S)  # the worker's value: capped
        self._upstream(address).send((ident, rid), (ident, payload), park_s=park_s)

    @staticmethod
    def _drain(sock: zmq.Socket[Any], handle: Any) -> None:
        for _ in range(_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # the loop boundary: one bad message must not stop the relay
                log.exception("the sub-call relay failed on a message")

    def _from_handler(self, frames: list[zmq.Frame]) -> None:
        # [worker routing id, reply]: the handler echoed the envelope the relay sent.
        slot = self._workers.get(frames[0].bytes)
        recording = slot.stamp.recording if slot is not None and slot.stamp is not None else None
        if recording is not None:  # recorded before the worker has the answer, so before its result
            recording.reply(frames[-1].buffer)
        if slot is not None and slot.pending:
            slot.done(peek_id(frames[-1].buffer))
        self._front.send_multipart(frames, copy=False)

    def _upstream(self, address: str) -> Front[tuple[bytes, str]]:
        upstream = self._upstreams.get(address)
        if upstream is None:
            links: list[Link] = []
            try:
                for one in split_addresses(address):
                    links.append(Link(one, *front_socket(self._ctx, one, self.curve)))
            except BaseException:
                for link in links:
                    link.close()
                raise
            upstream = Front(links, send_now, self._upstream_reset)
            for link in links:
                self._links[link.sock] = (upstream, link, False)
                self._links[link.monitor] = (upstream, link, True)
                self._poller.register(link.sock, zmq.POLLIN)
                self._poller.register(link.monitor, zmq.POLLIN)
            self._upstreams[address] = upstream
        return upstream

    def _from_worker(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0].bytes
        slot = self._workers.get(ident)
        if slot is None or len(frames) != 2:
            self.dropped += 1  # not a worker the pool started, or not one of its messages
            return
        stamp = slot.stamp
        payload = frames[1]
        try:
            obj = unpack(payload.buffer, max_bytes=self.max_message_bytes)
        except ProtocolError as exc:
            self._refuse(ident, peek_id(payload.buffer), ErrorCode.BAD_REQUEST, exc.message)
            return
        rid = obj.get("id")
        if not isinstance(rid, str):
            self.dropped += 1
            return
        op = obj.get("op")
        upstream = stamp.upstream if stamp is not None else self.default_upstream
        if rid in slot.pending:
            self._refuse(
                ident, rid, ErrorCode.BAD_REQUEST, f"request id {rid!r} is already in flight; ids must differ"
            )
            return
        if op == "ping":
            if len(slot.pending) - slot.calls >= _MAX_PINGS:
                self._refuse(ident, rid, ErrorCode.OVERLOADED, "too many pings in flight", retryable=True)
                return
            slot.pending[rid] = (time.monotonic() + LOST_AFTER_S, False)
            self._upstream_send(upstream, ident, rid, payload.bytes)
            return
        if op != "complete":
            self._refuse(
                ident, rid, ErrorCode.UNAUTHORIZED, f"only complete and ping leave the sandbox, not {op!r}"
            )
            return
        if stamp is None:
            self._refuse(ident, rid, ErrorCode.BAD_REQUEST, "this worker has no session")
            return
        if slot.calls >= stamp.max_batch:
            slot.expire(time.monotonic())  # only when full: the sweep is O(in flight)
        if slot.calls >= stamp.max_batch:
            self._refuse(
                ident,
                rid,
                ErrorCode.OVERLOADED,
                f"this session already has {stamp.max_batch:,} sub-calls in flight, the most it may "
                "have at once (max_batch); the call was not sent. Wait for answers before sending "
                "more (llm_query_batched does)",
                retryable=True,
            )
            return
        if not stamp.take():
            self._refuse(
                ident,
                rid,
                ErrorCode.BUDGET_EXCEEDED,
                f"this block has made {stamp.max_calls:,} sub-calls, the limit per block "
                "(max_sub_calls_per_exec); the call was not sent",
            )
            return
        obj["run"] = stamp.run
        obj["depth"] = stamp.depth
        if stamp.key is None:
            obj.pop("key", None)
        else:
            obj["key"] = stamp.key
        if stamp.trace is None:  # the exec's trace context, never one the code wrote
            obj.pop("trace", None)
        else:
            obj["trace"] = stamp.trace
        recording = stamp.recording
        if recording is not None:
            answer = recording.request(rid, obj)
            if answer is not None:  # answered from the exec's replay list: nothing is sent
                self._front.send_multipart([ident, answer], copy=False)
                return
        self.relayed += 1
        slot.pending[rid] = (time.monotonic() + LOST_AFTER_S, True)
        slot.calls += 1
        self._upstream_send(upstream, ident, rid, pack(obj), obj.get("timeout_s"))

    def _refuse(
        self, ident: bytes, rid: str | None, code: ErrorCode, message: str, *, retryable: bool = False
    ) -> None:
        self.refused += 1
        if rid is None:
            return
        reply = ErrorReply(rid, code, message, retryable)
        self._front.send_multipart([ident, pack(reply.to_wire())], copy=False)
