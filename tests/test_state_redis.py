"""Several handlers, one Redis: budgets exact across them, pacing combined, runs surviving a
restart, finished calls replayed rather than paid, and what a Redis outage looks like.

Handlers run as real ``rlmq handler`` processes (the multi-handler cases) or in-process (the
outage); the Redis is Debian's redis-server on a random loopback port, persistence off.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from conftest import requires
from redis_server import RedisServer, free_port

from rlmq.fakeprovider import FakeProvider
from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.protocol import ErrorCode

pytestmark = [
    requires(shutil.which("redis-server") is not None, "redis-server (Debian's redis-server package)"),
    pytest.mark.slow,
]

READY_TIMEOUT_S = 30.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def write_config(path: Path, models: dict[str, dict[str, Any]], state: dict[str, Any]) -> Path:
    lines = []
    for alias, table in models.items():
        lines.append(f"[models.{alias}]")
        lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    lines.append("[state]")
    lines += [f"{k} = {_toml(v)}" for k, v in state.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


class HandlerProcess:
    """``rlmq handler`` in a child process; ``address`` once it printed its ready line."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str) -> None:
        self.proc = proc
        self.address = address

    @classmethod
    async def start(cls, config: Path, bind: str = "tcp://127.0.0.1:0") -> HandlerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rlmq",
            "handler",
            "--config",
            str(config),
            "--bind",
            bind,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                while True:
                    line = (await proc.stdout.readline()).decode()
                    if not line:
                        raise RuntimeError(f"handler exited with {await proc.wait()} before ready")
                    if line.startswith("lmhandler ready on "):
                        return cls(proc, line.split()[-1])
        except BaseException:
            proc.kill()
            await proc.wait()
            raise

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


@asynccontextmanager
async def handlers(config: Path, n: int) -> AsyncIterator[list[HandlerProcess]]:
    procs = await asyncio.gather(*(HandlerProcess.start(config) for _ in range(n)))
    try:
        yield list(procs)
    finally:
        for p in procs:
            await p.kill()


class Raw:
    """A DEALER speaking the wire protocol by hand: the test chooses every request id."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self._seq = 0

    def close(self) -> None:
        self.sock.close(linger=0)

    def new_id(self) -> str:
        self._seq += 1
        return f"{os.urandom(4).hex()}-{self._seq}"

    async def send(self, op: str, rid: str | None = None, **fields: Any) -> str:
        rid = rid or self.new_id()
        await self.sock.send(msgpack.packb({"v": 1, "op": op, "id": rid, **fields}))
        return rid

    async def recv(self) -> dict[str, Any]:
        reply: dict[str, Any] = msgpack.unpackb(await self.sock.recv())
        return reply

    async def call(self, op: str, rid: str | None = None, **fields: Any) -> dict[str, Any]:
        await self.send(op, rid, **fields)
        async with asyncio.timeout(30):
            return await self.recv()

    async def many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send every request at once, then gather every reply."""
        for req in requests:
            await self.send("complete", **req)
        async with asyncio.timeout(60):
            return [await self.recv() for _ in requests]


# ---------------------------------------------------------------- budgets across handlers


async def test_max_calls_holds_exactly_across_three_handlers(
    tmp_path: Path, redis_server: RedisServer, actx: zmq.asyncio.Context
) -> None:
    config = write_config(
        tmp_path / "rlmq.toml", {"root": echo_model(latency_ms=50)}, {"url": redis_server.url}
    )
    async with handlers(config, 3) as procs:
        clients = [Raw(actx, p.address) for p in procs]
        try:
            opened = await clients[0].call("run_open", run="budget", limits={"max_calls": 1000}, key="k")
            assert opened["ok"], opened
            batch = [{"model": "root", "prompt": f"p{i}", "run": "budget", "key": "k"} for i in range(1000)]
            replies = [r for rs in await asyncio.gather(*(c.many(batch) for c in clients)) for r in rs]
            ok = sum(1 for r in replies if r["ok"])
            codes = [r["error"]["code"] for r in replies if not r["ok"]]
            others = {
                r["error"]["message"]
                for r in replies
                if not r["ok"] and r["error"]["code"] != "budget_exceeded"
            }
            assert (ok, codes.count("budget_exceeded"), len(codes)) == (1000, 2000, 2000), others
            usage = (await clients[2].call("usage", run="budget"))["run"]
            assert (usage["calls"], usage["in_flight"], usage["exceeded"]) == (1000, 0, "max_calls")
        finally:
            for c in clients:
                c.close()


# ---------------------------------------------------------------- pacing across handlers


class TimedProvider(FakeProvider):
    """The fake provider, noting when each request arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    async def _handle(self, request: web.Request, api: Any) -> web.StreamResponse:
        self.arrivals.append(time.monotonic())
        return await super()._handle(request, api)


def most_in_any_window(times: list[float], window_s: float) -> int:
    """The largest number of ``times`` within any window of ``window_s`` (sliding)."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window_s:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def test_two_handlers_pace_one_model_to_the_combined_rpm(
    tmp_path: Path, redis_server: RedisServer, actx: zmq.asyncio.Context
) -> None:
    rpm = 6000  # 100 a second; a burst of a fifth of a second (20) on top, as in-process
    async with TimedProvider() as provider:
        model = {
            "backend": "openai",
            "model": "gpt-4o",
            "base_url": provider.base_url + "/v1",
            "rpm": rpm,
            "max_retries": 0,
        }
        config = write_config(tmp_path / "rlmq.toml", {"root": model}, {"url": redis_server.url})
        async with handlers(config, 2) as procs:
            clients = [Raw(actx, p.address) for p in procs]
            try:
                batch = [{"model": "root", "prompt": f"p{i}", "timeout_s": 60} for i in range(200)]
                replies = [r for rs in await asyncio.gather(*(c.many(batch) for c in clients)) for r in rs]
            finally:
                for c in clients:
                    c.close()
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]
    assert len(provider.arrivals) == 400
    # Each handler alone may send 100 a second plus a burst of 20: two unshared would let about
    # 440 into two seconds. Shared, the provider sees the combined rate: 200 in any two seconds
    # plus one burst, and some room for the jitter of three busy processes on a loaded machine.
    most = most_in_any_window(provider.arrivals, 2.0)
    assert most <= 200 + 20 + 30, most


# ---------------------------------------------------------------- restarts and re-sends


async def test_a_restarted_handler_keeps_the_run_and_takes_its_calls_over(
    tmp_path: Path, redis_server: RedisServer, actx: zmq.asyncio.Context
) -> None:
    state = {"url": redis_server.url}
    slow = write_config(tmp_path / "slow.toml", {"root": echo_model(latency_ms=60_000)}, state)
    fast = write_config(tmp_path / "fast.toml", {"root": echo_model()}, state)
    port = free_port()
    bind = f"tcp://127.0.0.1:{port}"
    first = await HandlerProcess.start(fast, bind)
    client = Raw(actx, first.address)
    try:
        await client.call("run_open", run="r", limits={"max_calls": 5}, key="k")
        for i in range(3):
            reply = await client.call("complete", model="root", prompt=f"p{i}", run="r", key="k")
            assert reply["ok"], reply
        await first.kill()
        # A handler whose calls hang: one is in flight when it is killed.
        second = await HandlerProcess.start(slow, bind)
        rid = await client.send("complete", model="root", prompt="in flight", run="r", key="k")
        async with asyncio.timeout(30):  # reserved in the shared run: visible from any handler
            while (await client.call("usage", run="r"))["run"]["in_flight"] != 1:
                await asyncio.sleep(0.02)  # no event to wait on: a bounded poll of usage
        await second.kill()
        third = await HandlerProcess.start(fast, bind)
        try:
            usage = (await client.call("usage", run="r"))["run"]
            assert (usage["calls"], usage["in_flight"], usage["limits"]) == (4, 1, {"max_calls": 5})
            assert usage["usage"]["input_tokens"] > 0
            # The client sends the call again, same id: it takes its reservation over.
            again = await client.call("complete", rid, model="root", prompt="in flight", run="r", key="k")
            assert again["ok"]
            assert again["text"] == "in flight"
            last = await client.call("complete", model="root", prompt="fifth", run="r", key="k")
            assert last["ok"], last
            over = await client.call("complete", model="root", prompt="sixth", run="r", key="k")
            assert over["error"]["code"] == "budget_exceeded"
            usage = (await client.call("usage", run="r"))["run"]
            assert (usage["calls"], usage["in_flight"], usage["failed_calls"]) == (5, 0, 0)
        finally:
            await third.kill()
    finally:
        client.close()
        await first.kill()


async def test_a_re_sent_finished_request_is_replayed_not_paid(
    tmp_path: Path, redis_server: RedisServer, actx: zmq.asyncio.Context
) -> None:
    config = write_config(tmp_path / "rlmq.toml", {"root": echo_model()}, {"url": redis_server.url})
    async with handlers(config, 2) as procs:
        a, b = (Raw(actx, p.address) for p in procs)
        try:
            await a.call("run_open", run="r", limits={"max_calls": 1}, key="k")
            first = await a.call("complete", "same-id", model="root", prompt="hello", run="r", key="k")
            assert first["ok"]
            assert "replayed" not in first
            again = await b.call("complete", "same-id", model="root", prompt="hello", run="r", key="k")
            assert again["ok"]
            assert again["replayed"] is True
            assert (again["text"], again["usage"]) == (first["text"], first["usage"])
            usage = (await b.call("usage", run="r"))["run"]
            assert (usage["calls"], usage["usage"]["input_tokens"]) == (1, first["usage"]["input_tokens"])
            stats = (await b.call("stats"))["stats"]
            assert (stats["replayed"], stats["state"], stats["runs_open"]) == (1, "redis", 1)
        finally:
            a.close()
            b.close()


# ---------------------------------------------------------------- Redis faults


async def test_redis_down_gives_unavailable_and_service_resumes(
    tmp_path: Path, actx: zmq.asyncio.Context
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        async with running_handler(
            {"root": echo_model(cache_entries=10)},
            state={"url": server.url, "timeout_s": 0.5, "connect_timeout_s": 0.5},
        ) as handler:
            client = Raw(actx, handler.address or "")
            try:
                await client.call("run_open", run="r")
                ok = await client.call("complete", model="root", prompt="x", run="r")
                assert ok["ok"]
                server.stop()
                for op, fields in (
                    ("complete", {"model": "root", "prompt": "y", "run": "r"}),
                    ("complete", {"model": "root", "prompt": "y"}),  # the cache is in Redis too
                    ("run_open", {"run": "r2"}),
                    ("usage", {"run": "r"}),
                ):
                    reply = await client.call(op, **fields)  # bounded: Raw.call times out at 30 s
                    assert not reply["ok"], reply
                    assert reply["error"]["code"] == ErrorCode.UNAVAILABLE
                    assert reply["error"]["retryable"] is True
                stats = (await client.call("stats"))["stats"]
                assert stats["runs_open"] == -1
                server.start()  # back, empty (no persistence): the run must be opened again
                gone = await client.call("complete", model="root", prompt="z", run="r")
                assert gone["error"]["code"] == "unknown_run"
                await client.call("run_open", run="r")
                back = await client.call("complete", model="root", prompt="z", run="r")
                assert back["ok"], back
            finally:
                client.close()


async def test_handler_refuses_to_start_without_its_redis(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    config = write_config(
        tmp_path / "rlmq.toml", {"root": echo_model()}, {"url": url, "connect_timeout_s": 0.5}
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rlmq",
        "handler",
        "--config",
        str(config),
        "--bind",
        "tcp://127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode not in (0, None)
    assert b"lmhandler ready" not in out
    assert url.encode() in err
    assert b"cannot reach Redis" in err


async def test_shared_cache_across_handlers(tmp_path: Path, redis_server: RedisServer) -> None:
    from rlmq.protocol import AsyncHandlerClient

    state = {"url": redis_server.url, "key_prefix": "cache-test:"}
    models = {"root": echo_model(cache_entries=100)}
    async with (
        running_handler(models, state=state) as a,
        running_handler(models, state=state) as b,
        AsyncHandlerClient(a.address or "") as ca,
        AsyncHandlerClient(b.address or "") as cb,
    ):
        first = await ca.complete("same prompt", model="root")
        # The entry is written in the background: wait for it (bounded) rather than sleep.
        async with asyncio.timeout(10):
            while not (await cb.complete("same prompt", model="root")).cached:
                await asyncio.sleep(0.01)
        assert not first.cached
