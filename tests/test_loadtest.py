"""``rlmq loadtest``, and the handler's fast paths it measures (no timing assertions here).

The handler drives a synchronous ROUTER from the event loop through ZeroMQ's edge-triggered FD,
answers latency-0 ``echo`` calls inline, and batches replies; the tests below would catch a
message left stranded in the socket (each waits for its replies without sending anything more,
so nothing else would wake the handler) and check the fast paths against the slow ones.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from rlmq.lmhandler import server as server_module
from rlmq.lmhandler.backends import Backend, BackendError, BackendRequest, Completion
from rlmq.lmhandler.loadtest import echo_config, spawned_handler, summarize
from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.protocol import (
    ChatMessage,
    CompleteReply,
    CompleteRequest,
    DecodeError,
    ErrorCode,
    Usage,
    decode_request,
    encode,
    pack,
)
from rlmq.protocol import messages as messages_module
from rlmq.protocol.codec import LARGE_REPLY_CHARS, encode_complete_reply


def loadtest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlmq", "loadtest", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------- the command


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_spawn_provider_measures_the_http_relay_path(provider: str) -> None:
    done = loadtest("--spawn", "--provider", provider, "--requests", "60", "--concurrency", "20", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] == 60
    assert report["errors"] == {}
    model = report["handler"]["after"]["models"]["echo"]
    assert model["sent"] >= 60  # every request went out over HTTP to the fake provider


def test_provider_needs_spawn() -> None:
    done = loadtest("--connect", "tcp://127.0.0.1:1", "--provider", "openai")
    assert done.returncode == 2
    assert "--provider goes with --spawn" in done.stderr


@pytest.mark.slow
def test_spawn_json_counts_every_request() -> None:
    done = loadtest("--spawn", "--requests", "200", "--concurrency", "16", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["spawned"] is True
    assert report["mode"] == "closed"
    assert report["sent"] == report["ok"] == 200
    assert report["errors"] == {}
    assert report["processes"] >= 1
    assert report["elapsed_s"] > 0
    assert report["throughput_rps"] > 0
    assert set(report["latency_ms"]) == {"min", "mean", "p50", "p90", "p99", "max"}
    lat = report["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    # The handler's own counters, before and after: every request of the test is in the delta.
    delta = report["handler"]["delta"]
    assert delta["models"]["echo"]["requests"] == delta["models"]["echo"]["ok"] == 200
    assert delta["by_op"]["complete"] == 200
    assert delta["replied"] == delta["received"]
    assert "errors" not in delta
    assert report["handler"]["after"]["in_flight"] == 0
    # Every request was accounted to the run the test opened (budgets on), which it closed.
    usage = report["run_usage"]
    assert usage["run"] == report["run"]
    assert usage["calls"] == 200
    assert usage["failed_calls"] == 0
    assert usage["closed"] is True


@pytest.mark.slow
def test_errors_are_counted_by_code() -> None:
    done = loadtest("--spawn", "--model", "no-such-model", "--requests", "50", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] == 0
    assert report["sent"] == 50
    assert report["errors"] == {"unknown_model": 50}
    assert report["latency_ms"]["max"] == 0.0  # latency is of successful calls only
    assert report["handler"]["delta"]["errors"] == {"unknown_model": 50}


@pytest.mark.slow
def test_open_loop_for_a_duration_against_a_running_handler() -> None:
    with spawned_handler(echo_config(latency_ms=1)) as handler:
        done = loadtest(
            "--connect",
            handler.address,
            "--model",
            "echo",
            "--rate",
            "400",
            "--duration",
            "0.5",
            "--no-run",
            "--json",
        )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["mode"] == "open"
    assert report["rate"] == 400
    assert report["sent"] > 0
    assert report["ok"] == report["sent"]
    assert report["errors"] == {}
    assert report["run"] is None
    assert report["run_usage"] is None
    assert "max_schedule_lag_ms" in report
    assert report["sent_rate_rps"] > 0


@pytest.mark.slow
def test_human_readable_report() -> None:
    done = loadtest("--spawn", "--requests", "100", "--prompt-bytes", "1000")
    assert done.returncode == 0, done.stderr
    assert "throughput" in done.stdout
    assert "100 sent, 100 ok, 0 errors" in done.stdout
    assert "handler     received" in done.stdout
    assert "\r" not in done.stderr  # no progress bar when stderr is not a terminal


def test_loadtest_refuses_bad_options() -> None:
    done = loadtest("--spawn", "--concurrency", "0", "--requests", "10")
    assert done.returncode == 1
    assert "concurrency" in done.stderr


def test_summarize_percentiles() -> None:
    assert summarize([]) == {"min": 0.0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    s = summarize([float(i) for i in range(1, 101)])
    assert s["min"] == 1.0
    assert s["p50"] == 51.0
    assert s["p99"] == 100.0
    assert s["max"] == 100.0


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
        answered: list[Any] = []

        def late_client() -> None:
            sock = zctx.socket(zmq.DEALER)
            sock.connect(address)
            try:
                sock.send(_complete("warm-up", "fast"))  # connected before the race starts
                assert sock.poll(5000)
                sock.recv()
                answered.append("ready")
                go.wait(10)
                sock.send(_complete("late", "fast"))
                if sock.poll(5000):
                    answered.append(msgpack.unpackb(sock.recv())["id"])
            finally:
                sock.close(linger=0)

        original_flush = handler._flush
        armed = threading.Event()
        eaten: list[int] = []

        def flush_that_eats_the_signal() -> None:
            if armed.is_set() and not eaten and handler._outbox:
                go.set()  # the late request is sent now, while this flush holds the loop
                time.sleep(0.05)  # ...and reaches the handler's socket meanwhile
                assert handler._sock is not None
                eaten.append(handler._sock.getsockopt(zmq.EVENTS))  # what a send may do
            original_flush()

        monkeypatch.setattr(handler, "_flush", flush_that_eats_the_signal)
        thread = threading.Thread(target=late_client)
        thread.start()
        try:
            while not answered:
                await asyncio.sleep(0.01)
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
    """Claims latency 0 but awaits: the inline step must hand it to a task, not lose it."""

    latency_s = 0.0

    async def complete(self, request: BackendRequest) -> Completion:
        await asyncio.sleep(0.01)
        return Completion(request.messages[-1].content, "waits", Usage(1, 1))


class _FailsOnceAtOnce(Backend):
    """Raises a retryable error without awaiting, then answers: retried by the task path."""

    latency_s = 0.0

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, request: BackendRequest) -> Completion:
        self.calls += 1
        if self.calls == 1:
            raise BackendError(ErrorCode.BACKEND_ERROR, "502", retryable=True, status=502)
        return Completion("second time", "flaky", Usage(1, 1))


async def test_inline_backend_that_waits_is_carried_on_by_a_task(
    actx: zmq.asyncio.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "_INLINE_BACKENDS", (_WaitsAfterAll, _FailsOnceAtOnce))
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


# ---------------------------------------------------------------- fast paths equal slow ones


def test_encode_complete_reply_is_encode_of_the_dataclass() -> None:
    usage = Usage(12, 34, 5, 6)
    for cached, retries, stop in [(False, 0, "end_turn"), (True, 3, None)]:
        reply = CompleteReply("id-1", "text ü", "m", usage, cached, retries, 1.25, stop)
        fast = encode_complete_reply(
            "id-1", "text ü", "m", usage, cached=cached, retries=retries, latency_ms=1.25, stop_reason=stop
        )
        assert fast == encode(reply)
    big = "x" * (LARGE_REPLY_CHARS + 5)  # packed into a presized buffer, sent as a view of it
    view = encode_complete_reply(
        "id-2", big, "m", usage, cached=False, retries=0, latency_ms=2.5, stop_reason=None
    )
    assert bytes(view) == encode(CompleteReply("id-2", big, "m", usage, False, 0, 2.5, None))


WELL_FORMED: list[dict[str, Any]] = [
    {"model": "m", "prompt": "hi"},
    {"model": "m", "prompt": ""},
    {"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
    {"model": "m", "prompt": "p", "max_tokens": 7, "temperature": 1, "timeout_s": 2, "run": "r", "depth": 3},
    {"model": "m", "prompt": "p", "temperature": 0.5, "timeout_s": 0.25, "depth": 0, "run": None},
    {"model": "m", "prompt": "ignored", "messages": [{"role": "assistant", "content": "a"}]},
    {"model": "m", "messages": [{"role": "user", "content": "u", "name": "extra keys are ignored"}]},
]

MALFORMED: list[dict[str, Any]] = [
    {"model": 1, "prompt": "p"},
    {"model": "m"},
    {"model": "m", "prompt": 3},
    {"model": "m", "messages": []},
    {"model": "m", "messages": "hi"},
    {"model": "m", "messages": [["user", "x"]]},
    {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
    {"model": "m", "messages": [{"role": "user", "content": None}]},
    {"model": "m", "prompt": "p", "max_tokens": 0},
    {"model": "m", "prompt": "p", "max_tokens": True},
    {"model": "m", "prompt": "p", "max_tokens": 1.5},
    {"model": "m", "prompt": "p", "temperature": -0.1},
    {"model": "m", "prompt": "p", "temperature": "hot"},
    {"model": "m", "prompt": "p", "timeout_s": False},
    {"model": "m", "prompt": "p", "run": 5},
    {"model": "m", "prompt": "p", "depth": -1},
    {"model": "m", "prompt": "p", "depth": 1.0},
]


@pytest.fixture
def slow_decode(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Decode with the field readers alone, the fast path switched off."""

    def decode(fields: dict[str, Any]) -> CompleteRequest:
        with monkeypatch.context() as m:
            m.setattr(messages_module, "_complete_fast", lambda d, rid: None)
            request = decode_request(pack({"v": 1, "op": "complete", "id": "x", **fields}))
        assert isinstance(request, CompleteRequest)
        return request

    return decode


@pytest.mark.parametrize("fields", WELL_FORMED)
def test_fast_decode_equals_the_field_readers(fields: dict[str, Any], slow_decode: Any) -> None:
    fast = decode_request(pack({"v": 1, "op": "complete", "id": "x", **fields}))
    assert fast == slow_decode(fields)
    assert isinstance(fast, CompleteRequest)
    assert all(isinstance(m, ChatMessage) for m in fast.messages)
    with pytest.raises(AttributeError):
        fast.model = "changed"  # type: ignore[misc]  # still frozen


@pytest.mark.parametrize("fields", MALFORMED)
def test_fast_decode_refuses_what_the_field_readers_refuse(fields: dict[str, Any], slow_decode: Any) -> None:
    with pytest.raises(DecodeError) as fast:
        decode_request(pack({"v": 1, "op": "complete", "id": "x", **fields}))
    with pytest.raises(DecodeError) as slow:
        slow_decode(fields)
    assert fast.value.message == slow.value.message
    assert fast.value.request_id == "x"
