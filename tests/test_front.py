"""Several handlers as one front (issue 17): real handler processes on random ports, killed with
SIGKILL in the middle of calls; the clients and the pool's relay lose no call and answer each
caller once."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from conftest import requires
from redis_server import AVAILABLE as REDIS
from redis_server import RedisServer, free_port

from rlmq.loadtest.spawn import SpawnedHandler, echo_config, spawn_handler
from rlmq.protocol import (
    AsyncHandlerClient,
    ConfigError,
    ErrorCode,
    ErrorReply,
    HandlerClient,
    RemoteError,
    RunLimits,
)
from rlmq.protocol.front import Front, Link, split_addresses
from rlmq.protocol.sandbox import AsyncSandboxClient
from rlmq.sandbox.testing import running_pool

# Every wait below is bounded by this; nothing asserts how long a thing took.
BOUND_S = 30.0


@contextmanager
def handlers(n: int, latency_ms: float, *, model: str = "echo") -> Iterator[list[SpawnedHandler]]:
    """``n`` handler processes with an echo model, each on a free loopback port."""
    with ExitStack() as stack:
        out = []
        for _ in range(n):
            h = spawn_handler(echo_config(latency_ms, alias=model), env=os.environ)
            stack.callback(h.stop, 5.0)
            out.append(h)
        yield out


def kill(h: SpawnedHandler) -> None:
    h.process.kill()
    h.process.wait(10)


def joined(hs: Sequence[SpawnedHandler]) -> str:
    return ",".join(h.address for h in hs)


async def wait_until(check: Callable[[], Any], what: str) -> None:
    # A bounded poll: a handler process announces no event when a call reaches it.
    deadline = time.monotonic() + BOUND_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def all_up(client: AsyncHandlerClient) -> None:
    """Every handler of the client connected (else the first to connect takes the first calls)."""
    await client.ping()  # the first request starts the client's watch on its connections
    await wait_until(lambda: asyncio.sleep(0, len(client.live()) == len(client.addresses)), "all up")


async def in_flight(actx: zmq.asyncio.Context, address: str) -> int:
    async with AsyncHandlerClient(address, context=actx, timeout_s=10) as c:
        return int((await c.stats())["in_flight"])


async def received(actx: zmq.asyncio.Context, address: str) -> int:
    async with AsyncHandlerClient(address, context=actx, timeout_s=10) as c:
        return int((await c.stats())["received"])


def test_addresses_split_on_commas() -> None:
    assert split_addresses(" tcp://a:1, tcp://b:2 ,tcp://a:1") == ("tcp://a:1", "tcp://b:2")
    with pytest.raises(ConfigError):
        split_addresses(" , ")


async def test_requests_spread_over_three_handlers(actx: zmq.asyncio.Context) -> None:
    with handlers(3, 20) as hs:
        async with AsyncHandlerClient(joined(hs), context=actx, timeout_s=BOUND_S) as client:
            await all_up(client)
            replies = await asyncio.gather(*(client.complete(f"q{i}", model="echo") for i in range(90)))
            assert [r.text for r in replies] == [f"q{i}" for i in range(90)]
            assert sorted(client.live()) == sorted(h.address for h in hs)
        for h in hs:
            assert await received(actx, h.address) > 1  # its share of the calls, beside its stats


async def test_a_killed_handler_loses_no_call_and_answers_each_once(actx: zmq.asyncio.Context) -> None:
    with handlers(3, 1500) as hs:
        async with AsyncHandlerClient(joined(hs), context=actx, timeout_s=BOUND_S) as client:
            await all_up(client)
            calls = [asyncio.ensure_future(client.complete(f"q{i}", model="echo")) for i in range(60)]

            async def victim_busy() -> bool:
                return await in_flight(actx, hs[0].address) > 0

            await wait_until(victim_busy, "calls in flight on the handler to kill")
            kill(hs[0])
            replies = await asyncio.wait_for(asyncio.gather(*calls), BOUND_S)
            assert [r.text for r in replies] == [f"q{i}" for i in range(60)]
            assert client.resent > 0
            assert hs[0].address not in client.live()
            # Later calls go to the handlers still up.
            more = await asyncio.gather(*(client.complete(f"n{i}", model="echo") for i in range(10)))
            assert [r.text for r in more] == [f"n{i}" for i in range(10)]


async def test_a_lone_handler_restarted_gets_its_calls_again(actx: zmq.asyncio.Context) -> None:
    with handlers(1, 1500) as hs:
        address = hs[0].address
        async with AsyncHandlerClient(address, context=actx, timeout_s=BOUND_S) as client:
            calls = [asyncio.ensure_future(client.complete(f"q{i}", model="echo")) for i in range(20)]

            async def busy() -> bool:
                return await in_flight(actx, address) >= 20

            await wait_until(busy, "the calls in flight on the handler")
            kill(hs[0])
            await wait_until(lambda: asyncio.sleep(0, not client.live()), "the client to see it go")
            restarted = spawn_handler(echo_config(100), env=os.environ, bind=address)
            try:
                replies = await asyncio.wait_for(asyncio.gather(*calls), BOUND_S)
                assert [r.text for r in replies] == [f"q{i}" for i in range(20)]
                assert client.resent >= 20
            finally:
                restarted.stop(5.0)


def test_the_blocking_client_survives_a_kill(zctx: zmq.Context[Any]) -> None:
    with handlers(2, 1500) as hs, HandlerClient(joined(hs), context=zctx, timeout_s=BOUND_S) as client:
        out: list[Any] = []
        client.ping()
        deadline = time.monotonic() + BOUND_S
        while client.resent == 0 and len(client.live()) < 2:  # bounded poll: both connected
            assert time.monotonic() < deadline
            client.ping()
        batch = threading.Thread(
            target=lambda: out.append(client.complete_many([f"q{i}" for i in range(20)], model="echo"))
        )
        batch.start()
        with HandlerClient(hs[0].address, context=zctx, timeout_s=10) as watch:
            deadline = time.monotonic() + BOUND_S
            # A bounded poll: nothing announces a call's arrival at a handler process.
            while int(watch.stats()["in_flight"]) == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        kill(hs[0])
        batch.join(BOUND_S)
        assert not batch.is_alive()
        assert [getattr(r, "text", r) for r in out[0]] == [f"q{i}" for i in range(20)]
        assert client.resent > 0


async def test_a_sessions_batch_survives_a_handler_kill(actx: zmq.asyncio.Context) -> None:
    with handlers(2, 3000, model="sub") as hs:
        # In-process state on each handler: the run is opened on both, with one key.
        for h in hs:
            async with AsyncHandlerClient(h.address, context=actx) as c:
                await c.run_open("r1", RunLimits(max_calls=1000), key="k1")
        async with (
            running_pool(joined(hs), context=actx, workers=1) as pool,
            AsyncSandboxClient(pool.address or "", context=actx) as sc,
        ):
            session = await sc.open(run="r1", context="ctx", run_key="k1", exec_timeout_s=BOUND_S)
            code = 'answers = llm_query_batched([f"p{i}" for i in range(20)])\nkept = 42'
            exec_task = asyncio.ensure_future(session.exec(code))

            async def victim_busy() -> bool:
                return await in_flight(actx, hs[0].address) > 0

            await wait_until(victim_busy, "sub-calls in flight on the handler to kill")
            kill(hs[0])
            result = await asyncio.wait_for(exec_task, BOUND_S)
            assert result.error is None, result.error
            assert result.llm_calls == 20
            check = await session.exec('print(answers == [f"p{i}" for i in range(20)], kept)')
            assert check.stdout.strip() == "True 42"
            assert not check.state_lost
            await session.close()


# ---------------------------------------------------------------- with shared state (Redis)


@requires(REDIS, "redis-server")
async def test_three_handlers_on_one_redis_lose_no_call_and_pay_none_twice(
    actx: zmq.asyncio.Context, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "redis") as redis:
        state = f'\n[state]\nurl = "{redis.url}"\n'
        with ExitStack() as stack:
            hs = []
            for _ in range(3):
                h = spawn_handler(echo_config(1500, extra_handler=state), env=os.environ)
                stack.callback(h.stop, 5.0)
                hs.append(h)
            async with AsyncHandlerClient(joined(hs), context=actx, timeout_s=BOUND_S) as client:
                await all_up(client)
                await client.run_open("r3", RunLimits(max_calls=1000), key="k3")
                calls = [
                    asyncio.ensure_future(client.complete(f"q{i}", model="echo", run="r3")) for i in range(60)
                ]

                async def victim_busy() -> bool:
                    return await in_flight(actx, hs[0].address) > 0

                await wait_until(victim_busy, "calls in flight on the handler to kill")
                kill(hs[0])
                # The bound: the batch completes on the others within 10 s.
                replies = await asyncio.wait_for(asyncio.gather(*calls), 10.0)
                assert [r.text for r in replies] == [f"q{i}" for i in range(60)]
                assert client.resent > 0
                usage = await client.run_close("r3")
                assert usage.calls == 60  # each call counted once, re-sent ones included


# ---------------------------------------------------------------- no handler up: bounded waits


def dead_address() -> str:
    """A loopback port nothing listens on: its connection never comes up."""
    return f"tcp://127.0.0.1:{free_port()}"


def test_a_parked_request_is_handed_back_after_its_bound() -> None:
    down = [Link("tcp://a:1", object(), object()), Link("tcp://b:2", object(), object())]
    front: Front[str] = Front(down, lambda link, frames: True, park_s=30.0)
    front.send("default", (b"x",))
    front.send("own", (b"y",), park_s=2.0)
    assert set(front.parked) == {"default", "own"}
    call = front.parked["own"]
    assert call.parked_at is not None
    start = call.parked_at
    front.flush()  # nothing up: parked again, its wait still counted from the first time
    assert front.parked["own"].parked_at == start
    assert front.unreachable(start + 1.0) == []
    gone = front.unreachable(start + 2.0)
    assert [c.key for c in gone] == ["own"]
    assert "own" not in front.calls
    assert "own" not in front.parked
    message = front.unavailable_message(gone[0], start + 2.0)
    assert message.startswith("no handler reachable at tcp://a:1,tcp://b:2 for 2 s")
    assert [c.key for c in front.unreachable(start + 30.0)] == ["default"]
    # A request a handler takes is no longer parked: its bound no longer runs.
    down[0].up = True
    front.send("sent", (b"z",), park_s=0.0)
    assert front.calls["sent"].parked_at is None
    assert front.unreachable(start + 1000.0) == []


async def test_the_async_client_fails_unavailable_when_no_handler_is_up(actx: zmq.asyncio.Context) -> None:
    address = dead_address()
    async with AsyncHandlerClient(address, context=actx, timeout_s=BOUND_S) as client:
        # The complete's own timeout_s bounds its wait for a handler.
        with pytest.raises(RemoteError) as info:
            await client.complete("q", model="echo", timeout_s=1.0)
        assert (info.value.code, info.value.retryable) == (ErrorCode.UNAVAILABLE, True)
        assert f"no handler reachable at {address}" in info.value.message
        # Any request, at its deadline: unavailable, not a transport timeout.
        with pytest.raises(RemoteError) as info:
            await client.ping(timeout_s=1.0)
        assert info.value.code == ErrorCode.UNAVAILABLE
        assert not client._front.calls


async def test_a_parked_call_goes_when_its_handler_comes_up_in_time(actx: zmq.asyncio.Context) -> None:
    address = dead_address()
    async with AsyncHandlerClient(address, context=actx, timeout_s=BOUND_S) as client:
        call = asyncio.ensure_future(client.complete("late", model="echo", timeout_s=BOUND_S))
        await wait_until(lambda: asyncio.sleep(0, bool(client._front.parked)), "the call parked")
        started = await asyncio.to_thread(spawn_handler, echo_config(0), env=os.environ, bind=address)
        try:
            reply = await asyncio.wait_for(call, BOUND_S)
            assert reply.text == "late"
        finally:
            started.stop(5.0)


def test_the_blocking_client_answers_parked_calls_unavailable(zctx: zmq.Context[Any]) -> None:
    address = dead_address()
    with HandlerClient(f"{address},{dead_address()}", context=zctx, timeout_s=BOUND_S) as client:
        replies = client.complete_many(["a", "b", "c"], model="echo", timeout_s=1.0)
        assert [type(r).__name__ for r in replies] == ["ErrorReply"] * 3
        assert {(r.code, r.retryable) for r in replies if isinstance(r, ErrorReply)} == {
            (ErrorCode.UNAVAILABLE, True)
        }
        with pytest.raises(RemoteError) as info:
            client.ping(timeout_s=1.0)
        assert info.value.code == ErrorCode.UNAVAILABLE
        assert "no handler reachable at" in info.value.message
        assert not client._front.calls
