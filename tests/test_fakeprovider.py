"""The fake provider (``rlmq.fakeprovider``) speaks both APIs over real HTTP, checks keys, and
injects faults on demand. Nothing here measures time: waits are seen through the ``sleep`` seam."""

from __future__ import annotations

import ast
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rlmq.fakeprovider import (
    FakeProvider,
    FakeProviderConfig,
    FakeProviderError,
    Forced,
    NotStarted,
    UnknownOutcome,
)
from rlmq.protocol import RlmqError

ANTHROPIC_HEADERS = {"x-api-key": "k", "anthropic-version": "2026-10-21"}
OPENAI_HEADERS = {"authorization": "Bearer k"}


def anthropic_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-x",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def openai_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-x", "messages": [{"role": "user", "content": text}], **extra}


class Held:
    """A ``sleep`` for the fake provider that records what it was asked and waits for the test."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.entered.set()
        await self.release.wait()


@pytest.fixture
async def fp() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeProviderConfig(api_key="k")) as server:
        yield server


@pytest.fixture
async def client(fp: FakeProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fp.base_url, timeout=5.0) as c:
        yield c


# -- Anthropic Messages API ---------------------------------------------------------------------


async def test_anthropic_success_shape(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/messages", json=anthropic_body("say this", system="be brief"), headers=ANTHROPIC_HEADERS
    )
    assert r.status_code == 200
    data = r.json()
    assert data["id"].startswith("msg_")
    assert data["type"] == "message"
    assert data["role"] == "assistant"
    assert data["model"] == "claude-x"
    assert data["content"] == [{"type": "text", "text": "say this"}]
    assert data["stop_reason"] == "end_turn"
    assert data["stop_sequence"] is None
    # "be brief" (8) + "say this" (8) = 16 chars = 4 tokens; no cache_control, nothing cached
    assert data["usage"] == {
        "input_tokens": 4,
        "output_tokens": 2,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }


async def test_anthropic_echoes_last_user_message_blocks(client: httpx.AsyncClient) -> None:
    body = anthropic_body()
    body["messages"] = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "sec"}, {"type": "text", "text": "ond"}]},
    ]
    r = await client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    assert r.json()["content"][0]["text"] == "second"


async def test_anthropic_fixed_reply_and_max_tokens_cut() -> None:
    async with (
        FakeProvider(FakeProviderConfig(reply_text="x" * 40)) as fp,
        httpx.AsyncClient(base_url=fp.base_url) as c,
    ):
        r = await c.post("/v1/messages", json=anthropic_body(), headers=ANTHROPIC_HEADERS)
        assert r.json()["content"][0]["text"] == "x" * 40
        r = await c.post("/v1/messages", json=anthropic_body(max_tokens=2), headers=ANTHROPIC_HEADERS)
        data = r.json()
        assert data["content"][0]["text"] == "x" * 8
        assert data["stop_reason"] == "max_tokens"
        assert data["usage"]["output_tokens"] == 2


async def test_anthropic_prompt_caching_simulation(client: httpx.AsyncClient) -> None:
    cached = {"type": "ephemeral"}
    body = anthropic_body()
    body["system"] = [{"type": "text", "text": "s" * 400, "cache_control": cached}]
    body["messages"] = [
        {"role": "user", "content": [{"type": "text", "text": "u" * 40, "cache_control": cached}]},
        {"role": "assistant", "content": "a" * 40},
        {"role": "user", "content": "tail" * 10},
    ]
    first = (await client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)).json()
    # prefix = system 400 + first user 40 chars = 110 tokens; the rest 80 chars = 20 tokens
    assert first["usage"]["cache_creation_input_tokens"] == 110
    assert first["usage"]["cache_read_input_tokens"] == 0
    assert first["usage"]["input_tokens"] == 20
    second = (await client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)).json()
    assert second["usage"]["cache_read_input_tokens"] == 110
    assert second["usage"]["cache_creation_input_tokens"] == 0
    assert second["usage"]["input_tokens"] == 20
    # A different prefix is a new cache write.
    body["system"][0]["text"] = "t" * 400
    third = (await client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)).json()
    assert third["usage"]["cache_creation_input_tokens"] == 110


@pytest.mark.parametrize(
    "headers",
    [
        {"x-api-key": "k", "anthropic-version": "2026-10-21"},
        {"authorization": "Bearer k", "anthropic-version": "2026-10-21"},
    ],
)
async def test_anthropic_accepts_both_key_headers(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    r = await client.post("/v1/messages", json=anthropic_body(), headers=headers)
    assert r.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"anthropic-version": "2026-10-21"},
        {"x-api-key": "wrong", "anthropic-version": "2026-10-21"},
        {"authorization": "Bearer wrong", "anthropic-version": "2026-10-21"},
    ],
)
async def test_anthropic_rejects_bad_key(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    r = await client.post("/v1/messages", json=anthropic_body(), headers=headers)
    assert r.status_code == 401
    data = r.json()
    assert data["type"] == "error"
    assert data["error"]["type"] == "authentication_error"
    assert data["error"]["message"]


async def test_anthropic_without_configured_key_wants_some_key() -> None:
    async with FakeProvider() as fp, httpx.AsyncClient(base_url=fp.base_url) as c:
        version = {"anthropic-version": "2026-10-21"}
        r = await c.post("/v1/messages", json=anthropic_body(), headers=version)
        assert r.status_code == 401
        r = await c.post("/v1/messages", json=anthropic_body(), headers={**version, "x-api-key": "any"})
        assert r.status_code == 200


async def test_anthropic_version_rules(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages", json=anthropic_body(), headers={"x-api-key": "k"})
    assert r.status_code == 400
    assert "anthropic-version" in r.json()["error"]["message"]
    # 2026-10-21 dropped the sampling parameters; 2023-06-01 still takes them.
    r = await client.post("/v1/messages", json=anthropic_body(temperature=1.0), headers=ANTHROPIC_HEADERS)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "type": "invalid_request_error",
        "message": "temperature: Extra inputs are not permitted",
    }
    old = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    r = await client.post("/v1/messages", json=anthropic_body(temperature=0.2), headers=old)
    assert r.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "max_tokens": 10, "messages": []},
        {"model": "m", "max_tokens": 10, "messages": [{"role": "system", "content": "x"}]},
        {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": 3}]},
        ["not", "an", "object"],
    ],
)
async def test_anthropic_rejects_bad_bodies(client: httpx.AsyncClient, body: Any) -> None:
    r = await client.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


# -- OpenAI chat completions ---------------------------------------------------------------------


async def test_openai_success_shape(client: httpx.AsyncClient) -> None:
    body = openai_body("repeat me", max_tokens=50, temperature=0.3)
    body["messages"].insert(0, {"role": "system", "content": "sys"})
    r = await client.post("/v1/chat/completions", json=body, headers=OPENAI_HEADERS)
    assert r.status_code == 200
    data = r.json()
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert data["model"] == "gpt-x"
    assert data["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "repeat me"},
            "finish_reason": "stop",
        }
    ]
    usage = data["usage"]
    assert usage["prompt_tokens"] == 3  # "sys" + "repeat me" = 12 chars
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == 6
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_openai_reports_cached_prefix_and_length_cut(client: httpx.AsyncClient) -> None:
    body = openai_body("q" * 40)
    body["messages"].insert(0, {"role": "system", "content": "s" * 80})
    await client.post("/v1/chat/completions", json=body, headers=OPENAI_HEADERS)
    r = await client.post("/v1/chat/completions", json={**body, "max_tokens": 1}, headers=OPENAI_HEADERS)
    data = r.json()
    assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 20
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["choices"][0]["message"]["content"] == "q" * 4


async def test_openai_key_check(client: httpx.AsyncClient) -> None:
    for headers in ({}, {"authorization": "Bearer nope"}):
        r = await client.post("/v1/chat/completions", json=openai_body(), headers=headers)
        assert r.status_code == 401
        error = r.json()["error"]
        assert set(error) >= {"message", "type", "code"}
        assert error["code"] == "invalid_api_key"


async def test_openai_without_configured_key_accepts_anything() -> None:
    async with FakeProvider() as fp, httpx.AsyncClient(base_url=fp.base_url) as c:
        r = await c.post("/v1/chat/completions", json=openai_body())
        assert r.status_code == 200
        r = await c.post("/v1/chat/completions", json=openai_body(), headers={"authorization": "Bearer x"})
        assert r.status_code == 200


async def test_openai_bad_body(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", content=b"{nope", headers=OPENAI_HEADERS)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


# -- faults --------------------------------------------------------------------------------------


async def test_forced_statuses_in_each_api_shape(fp: FakeProvider, client: httpx.AsyncClient) -> None:
    fp.force([429, 529, 500])
    r = await client.post("/v1/messages", json=anthropic_body(), headers=ANTHROPIC_HEADERS)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    r = await client.post("/v1/messages", json=anthropic_body(), headers=ANTHROPIC_HEADERS)
    assert r.status_code == 529
    assert r.json()["error"]["type"] == "overloaded_error"
    r = await client.post("/v1/chat/completions", json=openai_body(), headers=OPENAI_HEADERS)
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    # The queue is used up: back to normal.
    r = await client.post("/v1/chat/completions", json=openai_body(), headers=OPENAI_HEADERS)
    assert r.status_code == 200


async def test_forced_comes_before_the_key_check(fp: FakeProvider, client: httpx.AsyncClient) -> None:
    fp.force(["ok", Forced(429, {"retry-after-ms": "250"}, "slow down")])
    r = await client.post("/v1/messages", json=anthropic_body("hi"))
    assert r.status_code == 200
    r = await client.post("/v1/messages", json=anthropic_body())
    assert r.status_code == 429
    assert r.headers["retry-after-ms"] == "250"
    assert r.json()["error"]["message"] == "slow down"


async def test_forced_malformed_reset_timeout(fp: FakeProvider, client: httpx.AsyncClient) -> None:
    fp.force(["malformed", "reset", "timeout"])
    r = await client.post("/v1/messages", json=anthropic_body(), headers=ANTHROPIC_HEADERS)
    assert r.status_code == 200
    with pytest.raises(ValueError, match=r"Unterminated|Expecting"):
        r.json()
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/v1/messages", json=anthropic_body(), headers=ANTHROPIC_HEADERS)
    # The stall outlasts any client: this one gives up after its own timeout.
    with pytest.raises(httpx.ReadTimeout):
        # Only the read is short: after the reset the client connects afresh, and a connection
        # slower than 0.2 s on a loaded machine would be a ConnectTimeout, not the stall.
        await client.post(
            "/v1/chat/completions",
            json=openai_body(),
            headers=OPENAI_HEADERS,
            timeout=httpx.Timeout(10.0, read=0.2),
        )
    assert fp.counters.by_status == {"200": 1, "reset": 1, "timeout": 1}


async def test_forced_timeout_stalls_for_timeout_sleep_s_and_close_ends_it() -> None:
    held = Held()
    config = FakeProviderConfig(timeout_sleep_s=123.0)
    async with FakeProvider(config, sleep=held.sleep) as fp, httpx.AsyncClient(base_url=fp.base_url) as c:
        fp.force(["timeout"])
        request = asyncio.create_task(c.post("/v1/chat/completions", json=openai_body()))
        await held.entered.wait()
        assert held.asked == [123.0]
        assert fp.counters.by_status == {"timeout": 1}
        held.release.set()  # the stall ends: the connection is dropped, never answered
        with pytest.raises(httpx.RemoteProtocolError):
            await request


async def test_force_rejects_unknown_names(fp: FakeProvider) -> None:
    with pytest.raises(UnknownOutcome, match="unknown forced outcome") as caught:
        fp.force(["explode"])
    assert isinstance(caught.value, ValueError)  # a bad argument, as before the error tree


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (FakeProviderConfig(rate_limit_fraction=1.0, retry_after_s=2.5), 429),
        (FakeProviderConfig(server_error_fraction=1.0), 500),
        (FakeProviderConfig(overloaded_fraction=1.0), 529),
    ],
)
async def test_random_faults_at_fraction_one(config: FakeProviderConfig, expected: int) -> None:
    async with FakeProvider(config) as fp, httpx.AsyncClient(base_url=fp.base_url) as c:
        r = await c.post("/v1/messages", json=anthropic_body(), headers=ANTHROPIC_HEADERS)
        assert r.status_code == expected
        if expected == 429:
            assert r.headers["retry-after"] == "2.5"


async def test_random_malformed_and_reset_at_fraction_one() -> None:
    config = FakeProviderConfig(malformed_fraction=1.0)
    async with FakeProvider(config) as fp, httpx.AsyncClient(base_url=fp.base_url) as c:
        r = await c.post("/v1/chat/completions", json=openai_body())
        assert r.status_code == 200
        with pytest.raises(ValueError, match=r"Unterminated|Expecting"):
            r.json()
    config = FakeProviderConfig(reset_fraction=1.0)
    async with FakeProvider(config) as fp, httpx.AsyncClient(base_url=fp.base_url) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post("/v1/chat/completions", json=openai_body())


async def test_random_faults_follow_the_seed() -> None:
    config = FakeProviderConfig(server_error_fraction=0.3, rate_limit_fraction=0.2, seed=7)

    async def outcomes() -> list[int]:
        async with FakeProvider(config) as fp, httpx.AsyncClient(base_url=fp.base_url) as c:
            return [(await c.post("/v1/chat/completions", json=openai_body())).status_code for _ in range(40)]

    first = await outcomes()
    assert first == await outcomes()
    assert {200, 429, 500} == set(first)


async def test_max_rps_limits_each_second() -> None:
    now = [1000.0]
    config = FakeProviderConfig(max_rps=3)
    async with (
        FakeProvider(config, clock=lambda: now[0]) as fp,
        httpx.AsyncClient(base_url=fp.base_url) as c,
    ):

        async def post() -> httpx.Response:
            return await c.post("/v1/chat/completions", json=openai_body())

        statuses = [r.status_code for r in await asyncio.gather(*(post() for _ in range(5)))]
        assert sorted(statuses) == [200, 200, 200, 429, 429]
        limited = await post()
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1"
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        now[0] += 1.0  # the next second has a fresh budget
        assert (await post()).status_code == 200


@pytest.mark.parametrize("forced", [None, "ok"])
async def test_latency_holds_the_reply(forced: str | None) -> None:
    held = Held()
    config = FakeProviderConfig(latency_s=0.2)
    async with FakeProvider(config, sleep=held.sleep) as fp, httpx.AsyncClient(base_url=fp.base_url) as c:
        if forced is not None:
            fp.force([forced])
        request = asyncio.create_task(c.post("/v1/chat/completions", json=openai_body("late")))
        await held.entered.wait()
        assert held.asked == [0.2]
        # Inside the latency wait: the request is in, and nothing has been answered yet.
        assert fp.counters.served == 1
        assert fp.counters.by_status == {}
        assert not request.done()
        held.release.set()
        r = await request
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "late"
        assert fp.counters.by_status == {"200": 1}


async def test_no_latency_no_wait() -> None:
    held = Held()
    async with FakeProvider(sleep=held.sleep) as fp, httpx.AsyncClient(base_url=fp.base_url) as c:
        assert (await c.post("/v1/chat/completions", json=openai_body())).status_code == 200
    assert held.asked == []


# -- counters and records ------------------------------------------------------------------------


async def test_counters_stats_and_records() -> None:
    config = FakeProviderConfig(api_key="k", record_last=2)
    async with FakeProvider(config) as fp, httpx.AsyncClient(base_url=fp.base_url) as c:
        await c.post("/v1/messages", json=anthropic_body("one"), headers=ANTHROPIC_HEADERS)
        await c.post("/v1/messages", json=anthropic_body("two"))  # 401
        await c.post("/v1/chat/completions", json=openai_body("three"), headers=OPENAI_HEADERS)
        stats = (await c.get("/stats")).json()
        expected = {
            "served": 3,
            "by_status": {"200": 2, "401": 1},
            "by_path": {"/v1/messages": 2, "/v1/chat/completions": 1},
        }
        assert stats == expected
        assert fp.counters.to_dict() == expected
        assert fp.counters.served == 3
        # Only the last two are kept, oldest first, with lower-case header names.
        assert [r.body["messages"][0]["content"] for r in fp.requests] == ["two", "three"]
        last = fp.requests[-1]
        assert last.method == "POST"
        assert last.path == "/v1/chat/completions"
        assert last.headers["authorization"] == "Bearer k"


async def test_base_url_needs_a_started_server() -> None:
    fp = FakeProvider()
    with pytest.raises(NotStarted, match="not started") as caught:
        _ = fp.base_url
    assert isinstance(caught.value, RuntimeError)
    await fp.close()  # closing an unstarted server is harmless


def test_errors_are_in_the_rlmq_tree() -> None:
    assert issubclass(FakeProviderError, RlmqError)
    assert issubclass(UnknownOutcome, FakeProviderError)
    assert issubclass(NotStarted, FakeProviderError)


def test_no_module_reads_the_environment() -> None:
    package = Path(__file__).resolve().parent.parent / "rlmq" / "fakeprovider"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            assert not (isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv"}), path.name


@pytest.mark.slow
async def test_command_serves_until_sigterm() -> None:
    argv = [sys.executable, "-m", "rlmq", "fake-provider", "--port", "0"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert line.startswith("fake-provider listening on http://127.0.0.1:")
        base_url = line.rsplit(" ", 1)[1]
        async with httpx.AsyncClient(base_url=base_url) as c:
            r = await c.post("/v1/chat/completions", json=openai_body("up"))
            assert r.json()["choices"][0]["message"]["content"] == "up"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
