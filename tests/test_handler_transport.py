"""The handler's transport (rlmq.lmhandler.transport): no message stranded by ZeroMQ's
edge-triggered descriptor, REQ and extra envelope frames on the inline path, and inline calls
that turn out to wait.

The transport drives a synchronous ROUTER from the event loop through the edge-triggered FD and
batches replies, and the pipeline answers latency-0 ``echo`` calls inline; the tests below would
catch a message left stranded in the socket (each waits for its replies without sending anything
more, so nothing else would wake the handler). Their ``asyncio.sleep`` calls shape the load
(bursts, pauses, a request landing while a reply goes out): they are the traffic pattern under
test, not synchronisation.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from rlmq.lmhandler.backends import Backend, BackendError, BackendRequest, Completion
from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.protocol import (
    ErrorCode,
    Usage,
    pack,
)

# ---------------------------------------------------------------- no message left behind


def _complete(rid: str, model: str) -> bytes:
    return pack({"v": 1, "op": "complete", "id": rid, "model": model, "prompt": rid})


async def _collect(sock: zmq.asyncio.Socket, ids: set[str], timeout_s: float = 10.0) -> None:
    """Receive until every id has its reply; sends nothing, so a stranded message times out."""
    pending = set(ids)
    while pending:
        frames = await asyncio.wait_for(sock.recv_multipart(), timeout_s)
        reply = msgpack.unpackb(frames[-1])
        assert reply["ok"] is True, reply
        assert reply["text"] == reply["id"]
        pending.discard(reply["id"])


async def test_bursts_with_pauses_leave_no_message_behind(actx: zmq.asyncio.Context) -> None:
    rng = random.Random(5)
    async with running_handler(
        {"fast": echo_model(), "slow": echo_model(latency_ms=2), "slower": echo_model(latency_ms=15)}
    ) as handler:
        socks = []
        try:
            for _ in range(3):
                sock = actx.socket(zmq.DEALER)
                sock.connect(handler.address or "")
                socks.append(sock)
            for burst in range(40):
                size = rng.choice([1, 2, 3, 50, 400, 3000])
                ids: dict[int, set[str]] = {i: set() for i in range(len(socks))}
                for n in range(size):
                    i = rng.randrange(len(socks))
                    rid = f"b{burst}-{n}"
                    await socks[i].send(_complete(rid, rng.choice(["fast", "fast", "slow", "slower"])))
                    ids[i].add(rid)
                    if rng.random() < 0.01:
                        await asyncio.sleep(rng.choice([0, 0.001, 0.003]))
                await asyncio.gather(*(_collect(socks[i], ids[i]) for i in ids))
                await asyncio.sleep(rng.choice([0, 0.001, 0.02]))  # the pause: the handler idles
            assert handler.stats.in_flight == 0
            assert handler.stats.received == handler.stats.replied
        finally:
            for sock in socks:
                sock.close(linger=0)


async def test_requests_arriving_while_replies_go_out_are_all_answered(
    actx: zmq.asyncio.Context,
) -> None:
    """Replies sent from tasks (outside a drain) interleaved with single requests: the send can
    eat the FD's signal of the request that just arrived. Each request waits for its own reply."""
    rng = random.Random(7)
    async with running_handler({"fast": echo_model(), "slow": echo_model(latency_ms=3)}) as handler:
        a = actx.socket(zmq.DEALER)
        b = actx.socket(zmq.DEALER)
        a.connect(handler.address or "")
        b.connect(handler.address or "")
        try:
            for i in range(300):
                await a.send(_complete(f"slow-{i}", "slow"))
                await asyncio.sleep(rng.choice([0.002, 0.003, 0.0035, 0.004]))
                await b.send(_complete(f"fast-{i}", "fast"))  # lands as slow-i's reply is sent
                await _collect(b, {f"fast-{i}"}, timeout_s=5)
                await _collect(a, {f"slow-{i}"}, timeout_s=5)
        finally:
            a.close(linger=0)
            b.close(linger=0)


async def test_a_send_that_eats_the_fd_signal_strands_nothing(
    actx: zmq.asyncio.Context,
    zctx: zmq.Context,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[type-arg]
) -> None:
    """The worst case, forced: a request arrives while replies are being sent, and the send
    processes ZeroMQ's commands (which resets the FD) so the loop is never told. The handler
    must find the request anyway; with no other traffic, a stranded one would never be answered.
    """
    async with running_handler({"fast": echo_model()}) as handler:
        address = handler.address or ""
        go = threading.Event()
        warmed_up = threading.Event()
        answered: list[Any] = []

        def late_client() -> None:
            sock = zctx.socket(zmq.DEALER)
            sock.connect(address)
            try:
                sock.send(_complete("warm-up", "fast"))  # connected before the race starts
                assert sock.poll(5000)
                sock.recv()
                answered.append("ready")
                warmed_up.set()
                go.wait(10)
                sock.send(_complete("late", "fast"))
                if sock.poll(5000):
                    answered.append(msgpack.unpackb(sock.recv())["id"])
            finally:
                sock.close(linger=0)

        transport = handler.transport
        assert transport is not None
        original_flush = transport.flush
        armed = threading.Event()
        eaten: list[int] = []

        def flush_that_eats_the_signal() -> None:
            if armed.is_set() and not eaten and transport.outbox:
                go.set()  # the late request is sent now, while this flush holds the loop...
                # ...and we wait, holding the loop on purpose (the race being forced), until it
                # is in the handler's socket. Polling processes ZeroMQ's commands just as a send
                # may, so the FD's edge for it is gone: only the post-flush EVENTS check is left.
                assert transport.sock.poll(5000, zmq.POLLIN)
                eaten.append(transport.sock.getsockopt(zmq.EVENTS))
            original_flush()

        monkeypatch.setattr(transport, "flush", flush_that_eats_the_signal)
        thread = threading.Thread(target=late_client)
        thread.start()
        try:
            await asyncio.to_thread(warmed_up.wait, 10)  # the late client is connected
            assert answered == ["ready"]
            first = actx.socket(zmq.DEALER)
            first.connect(address)
            try:
                await first.send(_complete("first-warm-up", "fast"))
                await _collect(first, {"first-warm-up"})
                armed.set()
                await first.send(_complete("first", "fast"))
                await _collect(first, {"first"})
                # Closing a socket is traffic too (it would wake the handler): only afterwards.
                await asyncio.to_thread(thread.join, 10)
            finally:
                first.close(linger=0)
        finally:
            go.set()
            thread.join(10)
        assert eaten  # the race was forced...
        assert eaten[0] & zmq.POLLIN  # ...the late request was waiting, and the FD reset
        assert answered == ["ready", "late"]


async def test_req_clients_and_extra_envelope_frames_through_the_fast_path(
    actx: zmq.asyncio.Context,
) -> None:
    async with running_handler({"fast": echo_model()}) as handler:
        req = actx.socket(zmq.REQ)
        dealer = actx.socket(zmq.DEALER)
        req.connect(handler.address or "")
        dealer.connect(handler.address or "")
        try:
            for i in range(20):
                await req.send(_complete(f"r{i}", "fast"))
                reply = msgpack.unpackb(await asyncio.wait_for(req.recv(), 5))
                assert reply["id"] == reply["text"] == f"r{i}"
                await dealer.send_multipart([b"hop-1", b"hop-2", _complete(f"d{i}", "fast")])
                frames = await asyncio.wait_for(dealer.recv_multipart(), 5)
                assert frames[:2] == [b"hop-1", b"hop-2"]
                assert msgpack.unpackb(frames[-1])["text"] == f"d{i}"
        finally:
            req.close(linger=0)
            dealer.close(linger=0)


# ---------------------------------------------------------------- the inline path's escapes


class _WaitsAfterAll(Backend):
    """Claims to answer at once but awaits: the inline step must hand it to a task, not lose it."""

    @property
    def answers_at_once(self) -> bool:
        return True

    async def complete(self, request: BackendRequest) -> Completion:
        await asyncio.sleep(0.01)  # the model's latency
        return Completion(request.messages[-1].content, "waits", Usage(1, 1))


class _FailsOnceAtOnce(Backend):
    """Raises a retryable error without awaiting, then answers: the backoff hands it to a task."""

    @property
    def answers_at_once(self) -> bool:
        return True

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, request: BackendRequest) -> Completion:
        self.calls += 1
        if self.calls == 1:
            raise BackendError(ErrorCode.BACKEND_ERROR, "502", retryable=True, status=502)
        return Completion("second time", "flaky", Usage(1, 1))


async def test_inline_backend_that_waits_is_carried_on_by_a_task(actx: zmq.asyncio.Context) -> None:
    flaky = _FailsOnceAtOnce()
    async with running_handler(
        {"waits": echo_model(), "flaky": echo_model()},
        backends={"waits": _WaitsAfterAll(), "flaky": flaky},
        retry_base_s=0.001,
    ) as handler:
        assert handler.models["waits"].inline
        sock = actx.socket(zmq.DEALER)
        sock.connect(handler.address or "")
        try:
            for i in range(30):
                await sock.send(_complete(f"w{i}", "waits"))
            await _collect(sock, {f"w{i}" for i in range(30)})
            await sock.send(_complete("f", "flaky"))
            reply = msgpack.unpackb(await asyncio.wait_for(sock.recv(), 5))
            assert reply["ok"] is True
            assert reply["text"] == "second time"
            assert reply["retries"] == 1
            stats = handler.stats
            assert stats.in_flight == 0
            assert handler.models["flaky"].stats.retries == 1
            assert handler.models["waits"].stats.ok == 30
        finally:
            sock.close(linger=0)
