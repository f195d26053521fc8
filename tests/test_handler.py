"""Service tests: a real handler loop on real ZeroMQ sockets, with fake backends behind it."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio

from rlmq.lmhandler.backends import Backend, BackendError, BackendRequest, Completion
from rlmq.lmhandler.testing import HeldModel, echo_model, ipc_address, running_handler, script_model
from rlmq.protocol import (
    AsyncHandlerClient,
    ErrorCode,
    HandlerClient,
    RemoteError,
    RunLimits,
    Usage,
    pack,
)


class FlakyBackend(Backend):
    """Fails with the given errors in order, then answers; with a ``gate``, every call waits
    for it first."""

    def __init__(self, errors: list[BackendError], gate: asyncio.Event | None = None) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.gate = gate

    async def complete(self, request: BackendRequest) -> Completion:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.errors:
            raise self.errors.pop(0)
        return Completion("fine", request.model, Usage(100, 10))


def rate_limited(after: float = 0.01) -> BackendError:
    return BackendError(
        ErrorCode.RATE_LIMITED, "429 from provider", retryable=True, retry_after_s=after, status=429
    )


async def test_dealer_client_complete_and_ping(actx: zmq.asyncio.Context) -> None:
    async with (
        running_handler({"root": echo_model()}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        pong = await client.ping()
        assert pong.models == ("root",)
        reply = await client.complete(
            [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}], model="root"
        )
        assert reply.text == "hello"
        assert not reply.cached
        assert reply.usage.input_tokens > 0


async def test_req_client_works_with_envelope_echo(actx: zmq.asyncio.Context) -> None:
    address = ipc_address()
    async with running_handler({"root": echo_model()}, bind=address):
        sock = actx.socket(zmq.REQ)
        sock.connect(address)
        try:
            for i in range(3):
                await sock.send(
                    pack(
                        {
                            "v": 1,
                            "op": "complete",
                            "id": f"q{i}",
                            "model": "root",
                            "prompt": f"p{i}",
                        }
                    )
                )
                reply = msgpack.unpackb(await asyncio.wait_for(sock.recv(), 5))
                assert reply["ok"] is True
                assert reply["id"] == f"q{i}"
                assert reply["text"] == f"p{i}"
        finally:
            sock.close(linger=0)


async def test_500_concurrent_requests_overlap(actx: zmq.asyncio.Context) -> None:
    # The model answers none until all 500 are in it at once: only a handler that runs them
    # concurrently gets any answer at all.
    model = HeldModel(open_at=500)
    async with (
        running_handler({"root": echo_model()}, backends={"root": model}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        replies = await asyncio.gather(*(client.complete(f"q{i}", model="root") for i in range(500)))
    assert [r.text for r in replies] == [f"q{i}" for i in range(500)]
    assert model.peak == 500


def test_blocking_client_batch_is_concurrent(zctx: zmq.Context) -> None:  # type: ignore[type-arg]
    async def main() -> None:
        model = HeldModel(open_at=100)  # answers only once the whole batch is in flight at once
        async with running_handler({"root": echo_model()}, backends={"root": model}) as handler:
            handler.runs.open_run("r1", RunLimits())

            def batch() -> list[str]:
                with HandlerClient(handler.address or "", context=zctx, run="r1") as client:
                    replies = client.complete_many([f"x{i}" for i in range(100)], model="root")
                    return [r.text if hasattr(r, "text") else "ERR" for r in replies]

            texts = await asyncio.to_thread(batch)
            assert texts == [f"x{i}" for i in range(100)]
            assert model.peak == 100
            assert handler.runs.get("r1").calls == 100

    asyncio.run(main())


async def test_budget_calls_and_exact_usage(actx: zmq.asyncio.Context) -> None:
    async with (
        running_handler({"root": echo_model(price_in_per_mtok=1.0, price_out_per_mtok=2.0)}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        await client.run_open("run-a", RunLimits(max_calls=5))
        results = await asyncio.gather(
            *(client.complete("x" * 40, model="root", run="run-a") for _ in range(8)),
            return_exceptions=True,
        )
        ok = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, RemoteError)]
        assert len(ok) == 5
        assert len(refused) == 3
        assert all(r.code == ErrorCode.BUDGET_EXCEEDED and not r.retryable for r in refused)
        usage = await client.usage("run-a")
        assert usage.calls == 5
        assert usage.usage.input_tokens == sum(r.usage.input_tokens for r in ok) == 50
        assert usage.usage.output_tokens == 50
        assert usage.cost_usd == pytest.approx((50 * 1.0 + 50 * 2.0) / 1e6)
        assert usage.exceeded == "max_calls"
        closed = await client.run_close("run-a")
        assert closed.closed
        with pytest.raises(RemoteError) as info:
            await client.complete("late", model="root", run="run-a")
        assert info.value.code == ErrorCode.RUN_CLOSED


@pytest.mark.parametrize(
    ("limits", "exceeded"),
    [
        (RunLimits(max_input_tokens=15), "max_input_tokens"),
        (RunLimits(max_output_tokens=15), "max_output_tokens"),
        (RunLimits(max_cost_usd=0.00003), "max_cost_usd"),
    ],
)
async def test_token_and_cost_budgets(actx: zmq.asyncio.Context, limits: RunLimits, exceeded: str) -> None:
    async with (
        running_handler({"root": echo_model(price_in_per_mtok=1.0, price_out_per_mtok=1.0)}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        await client.run_open("r", limits)
        for _ in range(2):  # 10 in + 10 out tokens each: the second passes the limit
            await client.complete("y" * 40, model="root", run="r")
        with pytest.raises(RemoteError) as info:
            await client.complete("y" * 40, model="root", run="r")
        assert info.value.code == ErrorCode.BUDGET_EXCEEDED
        assert (await client.usage("r")).exceeded == exceeded


async def test_deadline_budget_and_timeout_clamp(actx: zmq.asyncio.Context) -> None:
    async with (
        running_handler({"root": echo_model(latency_ms=2000)}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        await client.run_open("r", RunLimits(deadline_s=0.3))
        with pytest.raises(RemoteError) as info:
            # The model takes 2 s and the request's own timeout is the default 120 s: a timeout
            # here can only be the run's deadline, clamping the call's.
            await client.complete("slow", model="root", run="r")
        assert info.value.code == ErrorCode.TIMEOUT
        with pytest.raises(RemoteError) as info:
            await client.complete("late", model="root", run="r")
        assert info.value.code == ErrorCode.BUDGET_EXCEEDED


async def test_retries_honour_retry_after_and_are_counted(actx: zmq.asyncio.Context) -> None:
    backend = FlakyBackend([rate_limited(0.05), rate_limited(0.05)])
    async with (
        running_handler({"m": echo_model()}, backends={"m": backend}, retry_base_s=0.001) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        reply = await client.complete("x", model="m")
        # Two waits of Retry-After (plus at most 10% jitter each), not retry_base_s's backoff.
        assert 0.1 <= handler.models["m"].stats.retry_wait_s <= 0.11 + 1e-9
        assert reply.retries == 2
        assert backend.calls == 3
        stats = (await client.stats())["models"]["m"]
        assert stats["retries"] == 2
        assert stats["rate_limited"] == 2
        assert stats["sent"] == 3


async def test_non_retryable_errors_are_not_retried(actx: zmq.asyncio.Context) -> None:
    backend = FlakyBackend([BackendError(ErrorCode.UNAUTHORIZED, "bad key", retryable=False, status=401)])
    async with (
        running_handler({"m": echo_model()}, backends={"m": backend}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        with pytest.raises(RemoteError) as info:
            await client.complete("x", model="m")
        assert info.value.code == ErrorCode.UNAUTHORIZED
        assert backend.calls == 1


async def test_retries_stop_at_max_retries(actx: zmq.asyncio.Context) -> None:
    backend = FlakyBackend([rate_limited(0.0) for _ in range(10)])
    async with (
        running_handler(
            {"m": echo_model(max_retries=2)},
            backends={"m": backend},
            retry_base_s=0.001,
            retry_max_s=0.002,
        ) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        with pytest.raises(RemoteError) as info:
            await client.complete("x", model="m")
        assert info.value.code == ErrorCode.RATE_LIMITED
        assert info.value.retryable
        assert backend.calls == 3


async def test_request_timeout_is_typed(actx: zmq.asyncio.Context) -> None:
    async with (
        running_handler({"root": echo_model(latency_ms=5000)}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        with pytest.raises(RemoteError) as info:
            await client.complete("x", model="root", timeout_s=0.2)
        assert info.value.code == ErrorCode.TIMEOUT
        assert info.value.retryable


async def test_cache_hits_are_marked_and_free(actx: zmq.asyncio.Context) -> None:
    gate = asyncio.Event()
    backend = FlakyBackend([], gate=gate)
    async with (
        running_handler({"m": echo_model(cache_entries=16)}, backends={"m": backend}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        await client.run_open("r", RunLimits(max_calls=1))
        # Five identical requests at once: one backend call, the others share it. A `ping` sent
        # after them on the same socket is answered in the same drain that took all five in (one
        # connection's messages are handled in order), and their first steps run before this
        # task sees the reply: the first is then held in the backend and the others wait on it.
        sock = actx.socket(zmq.DEALER)
        sock.connect(handler.address or "")
        try:
            for i in range(5):
                request = {
                    "v": 1,
                    "op": "complete",
                    "id": f"c{i}",
                    "model": "m",
                    "prompt": "same",
                    "run": "r",
                }
                await sock.send(pack(request))
            await sock.send(pack({"v": 1, "op": "ping", "id": "p"}))
            assert msgpack.unpackb(await asyncio.wait_for(sock.recv(), 5))["id"] == "p"
            assert handler.models["m"].stats.requests == 5
            assert backend.calls == 1
            gate.set()
            replies = [msgpack.unpackb(await asyncio.wait_for(sock.recv(), 5)) for _ in range(5)]
        finally:
            sock.close(linger=0)
        assert all(r["ok"] and r["text"] == "fine" for r in replies)
        assert backend.calls == 1
        assert sorted(r["cached"] for r in replies) == [False, True, True, True, True]
        again = await client.complete("same", model="m", run="r")  # over max_calls, but free
        assert again.cached
        assert again.text == "fine"
        usage = await client.usage("r")
        assert usage.calls == 1
        assert usage.cached_calls == 5
        assert usage.usage.input_tokens == 100
        other = await client.complete("same", model="m", max_tokens=7)  # other parameters, other key
        assert not other.cached


async def test_unknown_model(actx: zmq.asyncio.Context) -> None:
    async with (
        running_handler({"root": echo_model()}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        with pytest.raises(RemoteError) as info:
            await client.complete("x", model="nope")
        assert info.value.code == ErrorCode.UNKNOWN_MODEL
        assert "root" in info.value.message


async def test_script_backend_replays_per_run(actx: zmq.asyncio.Context, tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(["one", "two"]))
    async with (
        running_handler({"s": script_model(str(script))}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        await client.run_open("a")
        await client.run_open("b")
        assert (await client.complete("?", model="s", run="a")).text == "one"
        assert (await client.complete("?", model="s", run="b")).text == "one"
        assert (await client.complete("?", model="s", run="a")).text == "two"
        with pytest.raises(RemoteError) as info:
            await client.complete("?", model="s", run="a")
        assert info.value.code == ErrorCode.SCRIPT_EXHAUSTED


MALFORMED: list[tuple[str, bytes, str | None]] = [
    ("random bytes", os.urandom(100), None),
    ("msgpack list", msgpack.packb([1, 2]), None),
    ("no id", pack({"v": 1, "op": "ping"}), None),
    ("missing field", pack({"v": 1, "id": "m1", "op": "complete"}), "bad_request"),
    (
        "wrong type",
        pack({"v": 1, "id": "m2", "op": "complete", "model": 3, "prompt": "x"}),
        "bad_request",
    ),
    ("unknown op", pack({"v": 1, "id": "m3", "op": "dance"}), "unknown_op"),
    (
        "unknown model",
        pack({"v": 1, "id": "m4", "op": "complete", "model": "zz", "prompt": "x"}),
        "unknown_model",
    ),
    ("wrong version", pack({"v": 2, "id": "m5", "op": "ping"}), "unsupported_version"),
    (
        "over the limit",
        pack({"v": 1, "id": "m6", "op": "complete", "model": "root", "prompt": "x" * 5000}),
        "too_large",
    ),
]


async def test_malformed_input_gets_errors_and_handler_lives(actx: zmq.asyncio.Context) -> None:
    async with running_handler({"root": echo_model()}, max_message_bytes=4096) as handler:
        sock = actx.socket(zmq.DEALER)
        sock.connect(handler.address or "")
        try:
            for name, payload, code in MALFORMED:
                await sock.send(payload)
                await sock.send_multipart([b"extra", b"frames", payload])  # multi-frame garbage too
                if code is not None:
                    for _ in range(2):
                        reply = msgpack.unpackb((await asyncio.wait_for(sock.recv_multipart(), 5))[-1])
                        assert reply["ok"] is False, name
                        assert reply["error"]["code"] == code, name
            await sock.send(b"")  # an empty frame
            await sock.send(pack({"v": 1, "id": "alive", "op": "ping"}))
            reply = msgpack.unpackb(await asyncio.wait_for(sock.recv(), 5))
            assert reply == {**reply, "id": "alive", "ok": True}
            stats = handler.stats
            assert stats.dropped == 7  # 3 payloads without a readable id, twice, and the empty frame
        finally:
            sock.close(linger=0)


async def test_shutdown_finishes_or_fails_every_request(actx: zmq.asyncio.Context) -> None:
    fast_model, slow_model = HeldModel(), HeldModel()  # slow is never released
    async with (
        running_handler(
            {"fast": echo_model(), "slow": echo_model()}, backends={"fast": fast_model, "slow": slow_model}
        ) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        fast = [asyncio.ensure_future(client.complete("f", model="fast")) for _ in range(20)]
        slow = [asyncio.ensure_future(client.complete("s", model="slow")) for _ in range(20)]
        await asyncio.wait_for(asyncio.gather(fast_model.entered(20), slow_model.entered(20)), 10)
        assert handler.stats.in_flight == 40
        stopping = asyncio.ensure_future(handler.stop(grace_s=1.0))
        fast_model.release()  # the fast ones finish within the grace period; the slow ones cannot
        await stopping
        done = await asyncio.gather(*fast, *slow, return_exceptions=True)
    assert all(getattr(r, "text", None) == "f" for r in done[:20])
    assert all(
        isinstance(r, RemoteError) and r.code == ErrorCode.UNAVAILABLE and r.retryable for r in done[20:]
    )


# ---------------------------------------------------------------- runs belong to their opener


async def test_a_call_naming_a_run_never_opened_is_refused_and_never_sent(actx: zmq.asyncio.Context) -> None:
    backend = FlakyBackend([])
    async with (
        running_handler({"root": echo_model()}, backends={"root": backend}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        for name in ("made-up", ""):
            with pytest.raises(RemoteError) as info:
                await client.complete("x", model="root", run=name)
            assert info.value.code == ErrorCode.UNKNOWN_RUN
            assert not info.value.retryable
        for op in (client.usage, client.run_close):
            with pytest.raises(RemoteError) as info:
                await op("made-up")
            assert info.value.code == ErrorCode.UNKNOWN_RUN
        assert backend.calls == 0
        assert handler.runs.find("made-up") is None  # a call does not open a run


async def test_a_run_with_a_key_serves_only_callers_showing_it(actx: zmq.asyncio.Context) -> None:
    async with (
        running_handler({"root": echo_model()}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as owner,
        AsyncHandlerClient(handler.address or "", context=actx) as other,
    ):
        await owner.run_open("mine", RunLimits(max_calls=10), key="s3cret")
        assert (await owner.complete("ok", model="root", run="mine")).text == "ok"  # the key is shown
        refusals = [
            other.complete("x", model="root", run="mine"),
            other.run_open("mine", RunLimits()),  # cannot lift the limits
            other.run_open("mine", RunLimits(), key="guess"),
            other.run_close("mine"),
        ]
        for refused in refusals:
            with pytest.raises(RemoteError) as info:
                await refused
            assert info.value.code == ErrorCode.UNKNOWN_RUN
        forged = pack({"v": 1, "op": "complete", "id": "f", "model": "root", "prompt": "x", "run": "mine"})
        sock = actx.socket(zmq.DEALER)
        try:
            sock.connect(handler.address or "")
            await sock.send(forged)  # a raw client naming the run, without its key
            reply = msgpack.unpackb(await sock.recv())
        finally:
            sock.close(linger=0)
        assert reply["error"]["code"] == "unknown_run"
        usage = await other.usage("mine")  # reading the totals needs no key
        assert (usage.calls, usage.limits.max_calls) == (1, 10)
        await owner.run_open("mine", RunLimits(max_calls=20))  # the owner may
        closed = await owner.run_close("mine")
        assert (closed.calls, closed.closed) == (1, True)


async def test_a_run_without_a_key_is_shared_by_id(actx: zmq.asyncio.Context) -> None:
    """The load tester opens one run and spreads its calls over processes: a run opened without
    a key is spent by whoever names it (still within its limits)."""
    async with (
        running_handler({"root": echo_model()}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as opener,
        AsyncHandlerClient(handler.address or "", context=actx) as other,
    ):
        await opener.run_open("shared", RunLimits(max_calls=1))
        assert (await other.complete("x", model="root", run="shared")).text == "x"
        with pytest.raises(RemoteError) as info:
            await other.complete("y", model="root", run="shared")
        assert info.value.code == ErrorCode.BUDGET_EXCEEDED


@pytest.mark.parametrize(("setting", "served"), [(None, True), (True, True), (False, False)])
async def test_calls_without_a_run_follow_allow_anonymous(
    actx: zmq.asyncio.Context, setting: bool | None, served: bool
) -> None:
    extra = {} if setting is None else {"allow_anonymous": setting}
    async with (
        running_handler({"root": echo_model()}, **extra) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        assert handler.allow_anonymous is served  # default: on, on loopback without keys
        if served:
            assert (await client.complete("x", model="root")).text == "x"
        else:
            with pytest.raises(RemoteError) as info:
                await client.complete("x", model="root")
            assert info.value.code == ErrorCode.UNAUTHORIZED
            await client.run_open("r", key="k")
            assert (await client.complete("x", model="root", run="r")).text == "x"
