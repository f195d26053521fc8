"""The real OpenAI-compatible backend (httpx) against the fake provider, plus the shared HTTP
helpers both backends use (Retry-After parsing, status mapping, redaction)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from rlmq.fakeprovider import FakeProvider, FakeProviderConfig, Forced
from rlmq.lmhandler.backends import _http
from rlmq.lmhandler.backends.base import BackendError, BackendRequest
from rlmq.lmhandler.backends.openai import OpenAIBackend
from rlmq.lmhandler.config import ModelConfig
from rlmq.protocol import ChatMessage, ErrorCode

KEY = "sk-test-0123456789abcdef"


def config(base_url: str | None, **overrides: Any) -> ModelConfig:
    values: dict[str, Any] = {
        "alias": "m",
        "backend": "openai",
        "model": "gpt-x",
        "base_url": base_url,
        "api_key": KEY,
    }
    values.update(overrides)
    return ModelConfig(**values)


def request(*messages: tuple[str, str], **overrides: Any) -> BackendRequest:
    values: dict[str, Any] = {
        "model": "gpt-x",
        "messages": tuple(ChatMessage(role, content) for role, content in messages),
        "max_tokens": 64,
    }
    values.update(overrides)
    return BackendRequest(**values)


@pytest.fixture
async def fp() -> AsyncIterator[FakeProvider]:
    async with FakeProvider(FakeProviderConfig(api_key=KEY)) as server:
        yield server


@pytest.fixture
async def backend(fp: FakeProvider) -> AsyncIterator[OpenAIBackend]:
    b = OpenAIBackend(config(f"{fp.base_url}/v1"))
    yield b
    await b.aclose()


async def test_request_shape_and_reply(fp: FakeProvider, backend: OpenAIBackend) -> None:
    completion = await backend.complete(
        request(
            ("system", "be brief"),
            ("user", "hello"),
            ("assistant", "hi"),
            ("user", "how are you"),
            max_tokens=33,
            temperature=0.25,
        )
    )
    assert completion.text == "how are you"
    assert completion.model == "gpt-x"
    assert completion.stop_reason == "stop"
    # 8 + 5 + 2 + 11 = 26 chars = 7 tokens; "how are you" = 3 tokens
    assert completion.usage.input_tokens == 7
    assert completion.usage.output_tokens == 3

    sent = fp.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.body == {
        "model": "gpt-x",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how are you"},
        ],
        "max_tokens": 33,
        "temperature": 0.25,
    }


async def test_temperature_left_out_when_unset(fp: FakeProvider, backend: OpenAIBackend) -> None:
    await backend.complete(request(("user", "hi")))
    assert "temperature" not in fp.requests[-1].body


async def test_cached_tokens_become_cache_reads(backend: OpenAIBackend) -> None:
    convo = (("system", "s" * 400), ("user", "question"))
    first = await backend.complete(request(*convo))
    assert first.usage.cache_read_tokens == 0
    second = await backend.complete(request(*convo))
    assert second.usage.cache_read_tokens == 100
    assert second.usage.input_tokens == 102  # cached ones included
    assert second.usage.cache_write_tokens == 0


async def test_length_stop_reason(backend: OpenAIBackend) -> None:
    completion = await backend.complete(request(("user", "y" * 100), max_tokens=3))
    assert completion.stop_reason == "length"
    assert completion.text == "y" * 12


async def test_trailing_slash_and_no_key() -> None:
    async with FakeProvider() as fp:  # no key configured: accepts anything
        b = OpenAIBackend(config(f"{fp.base_url}/v1/", api_key=None))
        try:
            completion = await b.complete(request(("user", "hi")))
        finally:
            await b.aclose()
        assert completion.text == "hi"
        assert fp.requests[-1].path == "/v1/chat/completions"
        assert "authorization" not in fp.requests[-1].headers


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
        (422, ErrorCode.BAD_REQUEST, False, None),
        (429, ErrorCode.RATE_LIMITED, True, 1.0),
        (Forced(429, {"retry-after": "0.5"}), ErrorCode.RATE_LIMITED, True, 0.5),
        (Forced(429, {"retry-after-ms": "40"}), ErrorCode.RATE_LIMITED, True, 0.04),
        (500, ErrorCode.BACKEND_ERROR, True, None),
        (502, ErrorCode.BACKEND_ERROR, True, None),
        (503, ErrorCode.BACKEND_ERROR, True, None),
        (504, ErrorCode.BACKEND_ERROR, True, None),
        (529, ErrorCode.OVERLOADED, True, None),
        (Forced(503, {"retry-after": "3"}), ErrorCode.BACKEND_ERROR, True, 3.0),
        ("malformed", ErrorCode.BACKEND_ERROR, True, None),
        ("reset", ErrorCode.BACKEND_ERROR, True, None),
    ],
)
async def test_error_mapping(
    fp: FakeProvider,
    backend: OpenAIBackend,
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
    assert "'m'" in error.message
    if isinstance(forced, int | Forced):
        status = forced if isinstance(forced, int) else forced.status
        assert error.status == status
        assert f"HTTP {status}" in error.message
    if forced == "malformed":
        assert "malformed" in error.message
    assert KEY not in error.message
    assert (await backend.complete(request(("user", "again")))).text == "again"


async def test_wrong_key_keeps_provider_message_without_the_key(fp: FakeProvider) -> None:
    fp.force([Forced(401, message=f"Incorrect API key provided: {KEY}.")])
    b = OpenAIBackend(config(f"{fp.base_url}/v1"))
    try:
        with pytest.raises(BackendError) as info:
            await b.complete(request(("user", "hi")))
    finally:
        await b.aclose()
    assert info.value.code == ErrorCode.UNAUTHORIZED
    assert "Incorrect API key provided: ***." in info.value.message
    assert KEY not in str(info.value)


async def test_timeout(fp: FakeProvider, backend: OpenAIBackend) -> None:
    fp.force(["timeout"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BackendError) as info:
        await backend.complete(request(("user", "hi"), timeout_s=0.3))
    assert loop.time() - started < 5
    assert info.value.code == ErrorCode.TIMEOUT
    assert info.value.retryable is True


async def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = OpenAIBackend(config(f"http://127.0.0.1:{port}/v1"))
    try:
        with pytest.raises(BackendError) as info:
            await b.complete(request(("user", "hi")))
    finally:
        await b.aclose()
    assert info.value.code == ErrorCode.BACKEND_ERROR
    assert info.value.retryable is True


async def test_many_calls_in_flight() -> None:
    async with FakeProvider(FakeProviderConfig(latency_s=0.05)) as fp:
        b = OpenAIBackend(config(f"{fp.base_url}/v1", max_concurrency=8))
        try:
            results = await asyncio.gather(*(b.complete(request(("user", f"n{i}"))) for i in range(64)))
        finally:
            await b.aclose()
    assert [r.text for r in results] == [f"n{i}" for i in range(64)]


# -- through httpx.MockTransport -----------------------------------------------------------------


def mock_backend(handler: Callable[[httpx.Request], httpx.Response], **overrides: Any) -> OpenAIBackend:
    return OpenAIBackend(config(None, **overrides), transport=httpx.MockTransport(handler))


async def test_mock_transport_default_url_null_content_and_no_usage() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(
            200,
            json={
                "id": "x",
                "model": "gpt-x-2099",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": None}}],
            },
        )

    b = mock_backend(handler)
    try:
        completion = await b.complete(request(("system", "s" * 8), ("user", "u" * 12)))
    finally:
        await b.aclose()
    assert completion.text == ""
    assert completion.model == "gpt-x-2099"
    assert completion.stop_reason is None
    # No usage from the server: estimated, 4 characters a token.
    assert completion.usage.input_tokens == 5
    assert completion.usage.output_tokens == 0
    (req,) = seen
    assert str(req.url) == "https://api.openai.com/v1/chat/completions"
    assert json.loads(req.content)["model"] == "gpt-x"


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, json={"choices": []}),
        httpx.Response(200, json={"id": "x"}),
        httpx.Response(200, json={"choices": [{"index": 0}]}),
        httpx.Response(200, json={"choices": [{"message": {"content": ["parts"]}}]}),
        httpx.Response(200, text="<html>proxy page</html>"),
    ],
)
async def test_mock_transport_malformed(response: httpx.Response) -> None:
    b = mock_backend(lambda req: response)
    try:
        with pytest.raises(BackendError) as info:
            await b.complete(request(("user", "hi")))
    finally:
        await b.aclose()
    assert info.value.code == ErrorCode.BACKEND_ERROR
    assert info.value.retryable is True
    assert "malformed" in info.value.message


async def test_mock_transport_plain_text_error_body() -> None:
    b = mock_backend(lambda req: httpx.Response(502, text="upstream connect error"))
    try:
        with pytest.raises(BackendError) as info:
            await b.complete(request(("user", "hi")))
    finally:
        await b.aclose()
    assert info.value.code == ErrorCode.BACKEND_ERROR
    assert info.value.retryable is True
    assert "upstream connect error" in info.value.message


# -- shared helpers ------------------------------------------------------------------------------

NOW = 4_102_444_800.0  # 2100-01-01T00:00:00Z


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": " 1.5 "}, 1.5),
        ({"retry-after": "-1"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "Fri, 01 Jan 2100 00:00:10 GMT"}, 10.0),
        ({"retry-after": "Thu, 31 Dec 2099 23:59:00 GMT"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert _http.parse_retry_after(httpx.Headers(headers), now=NOW) == expected


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (409, ErrorCode.BACKEND_ERROR, False),
        (418, ErrorCode.BACKEND_ERROR, False),
        (501, ErrorCode.BACKEND_ERROR, True),
        (599, ErrorCode.BACKEND_ERROR, True),
    ],
)
def test_unlisted_statuses(status: int, code: ErrorCode, retryable: bool) -> None:
    error = _http.status_error("model 'm'", status, "detail")
    assert (error.code, error.retryable, error.status) == (code, retryable, status)


def test_redact_masks_long_secrets_and_truncates() -> None:
    assert _http.redact(f"bad key {KEY}!", KEY) == "bad key ***!"
    assert _http.redact("a key k here", "k") == "a key k here"  # too short to be a real key
    long = _http.redact("x" * 2000, None)
    assert len(long) == _http.MAX_DETAIL_CHARS + 1


# -- first contact: an unset key, a host that does not resolve ------------------------------------


@pytest.mark.parametrize(
    ("base_url", "refused"),
    [(None, True), ("https://gateway.example/v1", True), ("http://127.0.0.1:8080/v1", False)],
)
async def test_an_unset_key_variable_refuses_before_sending_except_on_loopback(
    base_url: str | None, refused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}]})

    cfg = config(base_url, api_key=None, api_key_env="MISSING_KEY")
    b = OpenAIBackend(cfg, transport=httpx.MockTransport(handler))
    try:
        with caplog.at_level("WARNING"):
            for _ in range(2):
                if refused:
                    with pytest.raises(BackendError) as info:
                        await b.complete(request(("user", "hi")))
                    assert info.value.code == ErrorCode.UNAUTHORIZED
                    assert info.value.retryable is False
                    assert "$MISSING_KEY is not set" in info.value.message
                else:
                    assert (await b.complete(request(("user", "hi")))).text == "ok"
    finally:
        await b.aclose()
    assert len(seen) == (0 if refused else 2)
    said = [r.getMessage() for r in caplog.records if "MISSING_KEY" in r.getMessage()]
    assert len(said) == 1  # on first use, once
    assert "'m'" in said[0]
    if not refused:
        assert "Authorization" not in seen[0].headers


@pytest.mark.parametrize(
    ("errno", "said"),
    [(socket.EAI_NONAME, "Name or service not known"), (socket.EAI_AGAIN, "is this machine offline?")],
)
def test_a_name_resolution_failure_is_a_configuration_error(errno: int, said: str) -> None:
    gai = socket.gaierror(errno, "Name or service not known")
    try:
        try:
            raise gai
        except socket.gaierror as inner:
            raise httpx.ConnectError("Cannot connect to host") from inner
    except httpx.ConnectError as exc:
        error = _http.connection_error("model 'm'", exc, url="http://no-such-host.invalid/v1")
    assert error.code == ErrorCode.BACKEND_ERROR
    assert error.retryable is False
    assert "cannot resolve the host name 'no-such-host.invalid'" in error.message
    assert said in error.message
    plain = _http.connection_error("model 'm'", ConnectionRefusedError("refused"))
    assert plain.retryable is True  # any other connection failure stays a transient fault
