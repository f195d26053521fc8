"""One load-generator process: a DEALER and a synchronous pyzmq loop, driven over a socket pair.

The driver starts each as a fresh interpreter running ``BOOT`` (``python -c``), sends it a
``WorkerSpec``, and hears back ``("ready", None)``, ``("progress", (done, errors))`` and
``("result", {...})`` in that order, or ``("failed", why)``.
"""

from __future__ import annotations

import array
import math
import os
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import zmq

from rlmq.protocol.client import configure_socket
from rlmq.protocol.security import CurveClientKeys, connect

from .spec import CLIENT_TIMEOUT

__all__ = ["BOOT", "PROGRESS_INTERVAL_S", "WorkerSpec", "worker_entry"]

PROGRESS_INTERVAL_S = 0.2
# What a worker interpreter runs; its argument is the file descriptor of its end of the pair.
BOOT = "import sys; from rlmq.loadtest.worker import worker_entry; worker_entry(int(sys.argv[1]))"
# A reply that is not a msgpack map with an id: counted, never fatal to the worker.
_UNREADABLE = (msgpack.UnpackException, ValueError, TypeError, KeyError)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One process's share of the load; the request bytes come encoded but for the id."""

    index: int
    address: str
    requests: int | None
    duration_s: float | None
    concurrency: int
    rate: float | None
    payload_head: bytes
    timeout_s: float
    curve: CurveClientKeys | None = None


@dataclass(slots=True)
class _WorkerResult:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: array.array[float] = field(default_factory=lambda: array.array("d"))
    first_send: float = math.inf
    last_reply: float = 0.0
    last_send: float = 0.0
    max_lag_ms: float = 0.0  # open loop: how far behind schedule the generator fell


def worker_entry(fd: int) -> None:
    """``python -c`` entry of a client process: its spec comes first on the socket ``fd``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    conn = Connection(fd)
    try:
        spec = conn.recv()
    except EOFError:
        return
    _worker_main(conn, spec)


def _cpu_s() -> float:
    """CPU seconds of this whole process, ZeroMQ's I/O thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """One client process: connect, say ready, wait for go, run, send the result back."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    configure_socket(sock)
    try:
        connect(sock, spec.address, spec.curve)
        # One ping so that "ready" means the connection is up and the handler answers.
        sock.send(msgpack.packb({"v": 1, "op": "ping", "id": f"w{spec.index}-ping"}))
        if not sock.poll(10_000):
            conn.send(("failed", f"no answer from {spec.address} within 10 s"))
            return
        sock.recv()
        conn.send(("ready", None))
        cmd, start_at = conn.recv()
        if cmd != "go":
            return
        delay = start_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        cpu_before = _cpu_s()
        result = _run_worker(sock, spec, conn)
        cpu_s = _cpu_s() - cpu_before
        conn.send(
            (
                "result",
                {
                    "sent": result.sent,
                    "ok": result.ok,
                    "errors": dict(result.errors),
                    "latencies_ms": result.latencies_ms.tobytes(),
                    "first_send": result.first_send,
                    "last_reply": result.last_reply,
                    "last_send": result.last_send,
                    "max_lag_ms": result.max_lag_ms,
                    "cpu_s": cpu_s,
                },
            )
        )
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        sock.close(linger=0)
        ctx.term()
        conn.close()


def _run_worker(sock: zmq.Socket[Any], spec: WorkerSpec, conn: Connection) -> _WorkerResult:
    res = _WorkerResult()
    head = spec.payload_head
    # Unique across load tests too: handlers keep finished replies by (run, request id) so that a
    # re-sent request is not paid twice, and a second load test reusing --run must not hit them.
    prefix = f"{os.urandom(4).hex()}-w{spec.index}-"
    pending: dict[str, float] = {}  # id -> time it was (due to be) sent; insertion order = age
    latencies = res.latencies_ms
    errors = res.errors
    unpackb = msgpack.unpackb
    packb = msgpack.packb
    send = sock.send
    recv = sock.recv
    poll = sock.poll
    monotonic = time.monotonic
    noblock = zmq.NOBLOCK
    again = zmq.Again

    started = monotonic()
    stop_sending_at = started + spec.duration_s if spec.duration_s is not None else math.inf
    budget = spec.requests if spec.requests is not None else -1  # -1: until the duration ends
    interval = 1.0 / spec.rate if spec.rate else 0.0
    next_due = started
    seq = 0
    next_progress = started + PROGRESS_INTERVAL_S
    timeout_s = spec.timeout_s
    # Large prompts (and their echoes) go without a copy into and out of ZeroMQ.
    small = len(head) < zmq.COPY_THRESHOLD

    def may_send(now: float) -> bool:
        return budget != 0 and now < stop_sending_at and len(pending) < spec.concurrency

    def send_one(due: float) -> None:
        nonlocal seq, budget
        seq += 1
        rid = prefix + str(seq)
        pending[rid] = due
        res.last_send = due
        if small:
            send(head + packb(rid))
        else:
            send(head + packb(rid), copy=False)
        if budget > 0:
            budget -= 1
        res.sent += 1

    now = monotonic()
    res.first_send = now
    if not interval:
        while may_send(now):
            send_one(now)
    while True:
        now = monotonic()
        if interval:
            # Open loop: send everything that is due; the concurrency cap is a safety valve.
            while next_due <= now and may_send(now):
                lag = (now - next_due) * 1000.0
                if lag > res.max_lag_ms:
                    res.max_lag_ms = lag
                send_one(next_due)
                next_due += interval
        if not pending and not may_send(now):
            break
        if now >= next_progress:
            next_progress = now + PROGRESS_INTERVAL_S
            conn.send(("progress", (res.ok + sum(errors.values()), sum(errors.values()))))
            # Requests older than the timeout are counted and forgotten (oldest first).
            while pending:
                rid, t0 = next(iter(pending.items()))
                if now - t0 < timeout_s:
                    break
                del pending[rid]
                errors[CLIENT_TIMEOUT] += 1
        wait_s = min(PROGRESS_INTERVAL_S, max(0.0, next_progress - now))
        if interval and may_send(now):
            wait_s = min(wait_s, max(0.0, next_due - now))
        if not poll(int(wait_s * 1000) + (0 if wait_s == 0 else 1)):
            continue
        # Drain every reply already queued before looking at the clock again.
        while True:
            try:
                frame = recv(noblock, copy=small)
            except again:
                break
            now = monotonic()
            try:
                reply = unpackb(frame.buffer if isinstance(frame, zmq.Frame) else frame)
                rid = reply["id"]
            except _UNREADABLE:
                errors["unreadable_reply"] += 1
                continue
            sent_at = pending.pop(rid, None) if isinstance(rid, str) else None
            if sent_at is None:
                continue  # late reply to a request already counted as timed out
            res.last_reply = now
            if reply.get("ok") is True:
                res.ok += 1
                latencies.append((now - sent_at) * 1000.0)
            else:
                error = reply.get("error")
                code = error.get("code") if isinstance(error, dict) else None
                errors[str(code)] += 1
            if not interval and may_send(now):
                send_one(now)
    return res
