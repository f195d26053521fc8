"""The real Anthropic backend (official SDK, aiohttp transport) against the fake provider."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import pytest

from rlmq.fakeprovider import FakeProvider, FakeProviderConfig, Forced
from rlmq.lmhandler.backends.anthropic import AnthropicBackend
from rlmq.lmhandler.backends.base import BackendError, BackendRequest
from rlmq.lmhandler.config import ModelConfig
from rlmq.protocol import ChatMessage, ErrorCode

EPHEMERAL = {"type": "ephemeral"}
KEY = "sk-ant-test-0123456789"


def config(base_url: str, **overrides: Any) -> ModelConfig:
    values: dict[str, Any] = {
        "alias": "m",
        "backend": "anthropic",
        "model": "claude-x",
        "base_url": base_url,
        "api_key": KEY,
    }
    values.update(overrides)
    return ModelConfig(**values)


def request(*messages: tuple[str, str], **overrides: Any) -> BackendRequest:
    values: dict[str, Any] = {
        "model": "claude-x",
        "messages": tuple(ChatMessage(role, content) for role, content in messages),
        "max_tokens": 64,
    }
    values.update(overrides)
    return BackendRequest(**values)


CONVERSATION = (
    ("system", "You are terse. " * 20),
    ("user", "first question"),
    ("assistant", "first answer"),
    ("user", "second question"),
)


@pytest.fixture
async def fp() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeProviderConfig(api_key=KEY)) as server:
        yield server


@pytest.fixture
async def backend(fp: FakeProvider) -> AsyncIterator[AnthropicBackend]:
    b = AnthropicBackend(config(fp.base_url))
    yield b
    await b.aclose()


async def test_request_shape_and_reply(fp: FakeProvider, backend: AnthropicBackend) -> None:
    completion = await backend.complete(request(*CONVERSATION, max_tokens=77))
    assert completion.text == "second question"
    assert completion.model == "claude-x"
    assert completion.stop_reason == "end_turn"

    sent = fp.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["anthropic-version"]
    body = sent.body
    assert body["model"] == "claude-x"
    assert body["max_tokens"] == 77
    assert "temperature" not in body
    assert body["system"] == [{"type": "text", "text": "You are terse. " * 20, "cache_control": EPHEMERAL}]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "first question", "cache_control": EPHEMERAL}],
        },
        {"role": "assistant", "content": "first answer"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "second question", "cache_control": EPHEMERAL}],
        },
    ]


async def test_usage_counts_cache_writes_then_reads(backend: AnthropicBackend) -> None:
    first = await backend.complete(request(*CONVERSATION))
    # Every block up to the last breakpoint is prefix: 300 + 14 + 12 + 15 chars = 86 tokens.
    assert first.usage.cache_write_tokens == 86
    assert first.usage.cache_read_tokens == 0
    assert first.usage.input_tokens == 86  # all prompt tokens, cached ones included
    assert first.usage.output_tokens == 4
    second = await backend.complete(request(*CONVERSATION))
    assert second.usage.cache_read_tokens == 86
    assert second.usage.cache_write_tokens == 0
    assert second.usage.input_tokens == 86


async def test_next_turn_reads_what_the_previous_turn_wrote(backend: AnthropicBackend) -> None:
    turn1 = (("system", "s" * 400), ("user", "u" * 40))
    turn2 = (*turn1, ("assistant", "a" * 40), ("user", "v" * 40))
    first = await backend.complete(request(*turn1))
    assert first.usage.cache_write_tokens == 110
    second = await backend.complete(request(*turn2))
    # The breakpoint on the second-to-last user message finds turn 1's prefix.
    assert second.usage.cache_read_tokens == 110
    assert second.usage.cache_write_tokens == 20
    assert second.usage.input_tokens == 130
    third = await backend.complete(request(*turn2))
    assert third.usage.cache_read_tokens == 130
    assert third.usage.cache_write_tokens == 0


async def test_without_prompt_caching_no_breakpoints(fp: FakeProvider) -> None:
    b = AnthropicBackend(config(fp.base_url, prompt_caching=False))
    try:
        completion = await b.complete(request(*CONVERSATION))
    finally:
        await b.aclose()
    body = fp.requests[-1].body
    assert body["system"] == "You are terse. " * 20
    assert [m["content"] for m in body["messages"]] == [
        "first question",
        "first answer",
        "second question",
    ]
    assert completion.usage.cache_read_tokens == completion.usage.cache_write_tokens == 0
    assert completion.usage.input_tokens == 86


async def test_merges_repeated_roles_and_hoists_system(fp: FakeProvider, backend: AnthropicBackend) -> None:
    await backend.complete(
        request(
            ("system", "rules"),
            ("user", "a"),
            ("user", "b"),
            ("system", "more rules"),
            ("assistant", "c"),
            ("assistant", "d"),
            ("user", "e"),
        )
    )
    body = fp.requests[-1].body
    assert body["system"][0]["text"] == "rules\n\nmore rules"
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"][0]["text"] == "a\n\nb"
    assert body["messages"][1]["content"] == "c\n\nd"
    assert body["messages"][2]["content"][0]["cache_control"] == EPHEMERAL


async def test_single_user_message_without_system(fp: FakeProvider, backend: AnthropicBackend) -> None:
    completion = await backend.complete(request(("user", "hi")))
    assert completion.text == "hi"
    body = fp.requests[-1].body
    assert "system" not in body
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": EPHEMERAL}]}
    ]


async def test_temperature_is_not_sent_and_warned_once(
    fp: FakeProvider, backend: AnthropicBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rlmq.lmhandler.backends.anthropic")
    for _ in range(2):
        await backend.complete(request(("user", "hi"), temperature=0.2))
        assert "temperature" not in fp.requests[-1].body
    assert len([r for r in caplog.records if "temperature" in r.getMessage()]) == 1


async def test_max_tokens_stop_reason(backend: AnthropicBackend) -> None:
    completion = await backend.complete(request(("user", "x" * 100), max_tokens=5))
    assert completion.stop_reason == "max_tokens"
    assert completion.text == "x" * 20
    assert completion.usage.output_tokens == 5


async def test_no_messages_is_a_bad_request(fp: FakeProvider, backend: AnthropicBackend) -> None:
    with pytest.raises(BackendError) as info:
        await backend.complete(request(("system", "only a system prompt")))
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert fp.counters.served == 0


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("forced", "code", "retryable", "retry_after_s"),
    [
        (400, ErrorCode.BAD_REQUEST, False, None),
        (401, ErrorCode.UNAUTHORIZED, False, None),
        (403, ErrorCode.UNAUTHORIZED, False, None),
        (404, ErrorCode.BACKEND_ERROR, False, None),
        (408, ErrorCode.TIMEOUT, True, None),
        (413, ErrorCode.TOO_LARGE, False, None),
        (429, ErrorCode.RATE_LIMITED, True, 1.0),
        (Forced(429, {"retry-after": "7"}), ErrorCode.RATE_LIMITED, True, 7.0),
        (Forced(429, {"retry-after-ms": "1500"}), ErrorCode.RATE_LIMITED, True, 1.5),
        (500, ErrorCode.BACKEND_ERROR, True, None),
        (502, ErrorCode.BACKEND_ERROR, True, None),
        (503, ErrorCode.BACKEND_ERROR, True, None),
        (504, ErrorCode.BACKEND_ERROR, True, None),
        (529, ErrorCode.OVERLOADED, True, None),
        ("malformed", ErrorCode.BACKEND_ERROR, True, None),
        ("reset", ErrorCode.BACKEND_ERROR, True, None),
    ],
)
async def test_error_mapping(
    fp: FakeProvider,
    backend: AnthropicBackend,
    forced: int | str | Forced,
    code: ErrorCode,
    retryable: bool,
    retry_after_s: float | None,
) -> None:
    fp.force([forced])
    with pytest.raises(BackendError) as info:
        await backend.complete(request(("user", "hi")))
    error = info.value
    assert error.code == code
    assert error.retryable is retryable
    assert error.retry_after_s == retry_after_s
    assert "'m'" in error.message  # names the model alias
    if isinstance(forced, int | Forced):
        status = forced if isinstance(forced, int) else forced.status
        assert error.status == status
        assert f"HTTP {status}" in error.message
    if forced == "malformed":
        assert "malformed" in error.message
    assert KEY not in error.message
    # The backend is still usable after any failure.
    assert (await backend.complete(request(("user", "again")))).text == "again"


async def test_provider_message_is_kept_but_the_key_is_not(
    fp: FakeProvider, backend: AnthropicBackend
) -> None:
    fp.force([Forced(401, message=f"key {KEY} was revoked")])
    with pytest.raises(BackendError) as info:
        await backend.complete(request(("user", "hi")))
    assert "authentication_error: key *** was revoked" in info.value.message
    assert KEY not in str(info.value)


async def test_wrong_key_is_unauthorized(fp: FakeProvider) -> None:
    b = AnthropicBackend(config(fp.base_url, api_key="sk-ant-wrong-key-000"))
    try:
        with pytest.raises(BackendError) as info:
            await b.complete(request(("user", "hi")))
    finally:
        await b.aclose()
    assert info.value.code == ErrorCode.UNAUTHORIZED
    assert info.value.retryable is False


async def test_without_a_key_no_auth_header_is_sent(fp: FakeProvider) -> None:
    b = AnthropicBackend(config(fp.base_url, api_key=None))
    try:
        with pytest.raises(BackendError) as info:
            await b.complete(request(("user", "hi")))
    finally:
        await b.aclose()
    assert info.value.code == ErrorCode.UNAUTHORIZED
    headers = fp.requests[-1].headers
    assert "authorization" not in headers
    assert "x-api-key" not in headers


async def test_timeout(fp: FakeProvider, backend: AnthropicBackend) -> None:
    fp.force(["timeout"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BackendError) as info:
        await backend.complete(request(("user", "hi"), timeout_s=0.3))
    assert loop.time() - started < 5
    assert info.value.code == ErrorCode.TIMEOUT
    assert info.value.retryable is True
    assert "0.3 s" in info.value.message


async def test_connection_refused() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = AnthropicBackend(config(f"http://127.0.0.1:{port}"))
    try:
        with pytest.raises(BackendError) as info:
            await b.complete(request(("user", "hi")))
    finally:
        await b.aclose()
    assert info.value.code == ErrorCode.BACKEND_ERROR
    assert info.value.retryable is True
    assert "connection failed" in info.value.message


async def test_many_calls_in_flight_share_a_small_pool() -> None:
    async with FakeProvider(FakeProviderConfig(api_key=KEY, latency_s=0.05)) as fp:
        b = AnthropicBackend(config(fp.base_url, max_concurrency=8))
        try:
            results = await asyncio.gather(*(b.complete(request(("user", f"n{i}"))) for i in range(64)))
        finally:
            await b.aclose()
    assert [r.text for r in results] == [f"n{i}" for i in range(64)]


# -- through the SDK's own transport seam ----------------------------------------------------------


def mock_backend(handler: Callable[[httpx2.Request], httpx2.Response]) -> AnthropicBackend:
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    return AnthropicBackend(config("http://provider.test"), http_client=client)


async def test_mock_transport_success() -> None:
    seen: list[httpx2.Request] = []

    def handler(req: httpx2.Request) -> httpx2.Response:
        seen.append(req)
        return httpx2.Response(
            200,
            json={
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-x-20990101",
                "content": [
                    {"type": "text", "text": "Hello, "},
                    {"type": "text", "text": "world"},
                ],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": 10,
                    "output_tokens": 3,
                    "cache_read_input_tokens": 100,
                    "cache_creation_input_tokens": 20,
                },
            },
        )

    b = mock_backend(handler)
    try:
        completion = await b.complete(request(("system", "sys"), ("user", "hi")))
    finally:
        await b.aclose()
    assert completion.text == "Hello, world"
    assert completion.model == "claude-x-20990101"
    assert completion.usage.input_tokens == 130
    assert completion.usage.cache_read_tokens == 100
    assert completion.usage.cache_write_tokens == 20
    assert completion.usage.output_tokens == 3
    (req,) = seen
    assert str(req.url) == "http://provider.test/v1/messages"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    body = json.loads(req.content)
    assert body["system"][0]["cache_control"] == EPHEMERAL


@pytest.mark.parametrize(
    "response",
    [
        httpx2.Response(200, text="<html>gateway says hi</html>", headers={"content-type": "text/html"}),
        httpx2.Response(200, json={"unexpected": True}),
        httpx2.Response(200, json={"type": "message", "content": [], "usage": {"input_tokens": "x"}}),
    ],
)
async def test_mock_transport_malformed_bodies(response: httpx2.Response) -> None:
    b = mock_backend(lambda req: response)
    try:
        with pytest.raises(BackendError) as info:
            await b.complete(request(("user", "hi")))
    finally:
        await b.aclose()
    assert info.value.code == ErrorCode.BACKEND_ERROR
    assert info.value.retryable is True
    assert "malformed" in info.value.message


async def test_mock_transport_retry_after_http_date() -> None:
    def handler(req: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(
            429,
            headers={"retry-after": "Fri, 01 Jan 2100 00:00:00 GMT"},
            json={"type": "error", "error": {"type": "rate_limit_error", "message": "later"}},
        )

    b = mock_backend(handler)
    try:
        with pytest.raises(BackendError) as info:
            await b.complete(request(("user", "hi")))
    finally:
        await b.aclose()
    assert info.value.code == ErrorCode.RATE_LIMITED
    assert info.value.retry_after_s is not None
    assert info.value.retry_after_s > 365 * 24 * 3600
    assert "rate_limit_error: later" in info.value.message
