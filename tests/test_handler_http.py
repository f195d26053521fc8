"""The whole relay path: ZeroMQ client -> handler -> real HTTP backend -> fake provider."""

from __future__ import annotations

import pytest
import zmq.asyncio

from rlmq.fakeprovider import FakeProvider, FakeProviderConfig, Forced
from rlmq.lmhandler.testing import running_handler
from rlmq.protocol import AsyncHandlerClient, ErrorCode, RemoteError, RunLimits


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
async def test_retries_through_http_are_counted(actx: zmq.asyncio.Context, backend: str) -> None:
    base = "/v1" if backend == "openai" else ""
    async with FakeProvider(FakeProviderConfig(api_key="sk-test")) as fp:
        model = {"backend": backend, "model": "m-1", "base_url": fp.base_url + base, "api_key_env": "K"}
        fp.force([Forced(429, {"retry-after-ms": "100"}), 500, "ok"])
        async with (
            running_handler({"root": model}, env={"K": "sk-test"}, retry_base_s=0.001) as handler,
            AsyncHandlerClient(handler.address or "", context=actx) as client,
        ):
            await client.run_open("r", RunLimits(max_calls=5))
            reply = await client.complete("hello over http", model="root", run="r")
            # The provider's retry-after-ms (100 ms, plus up to 10% jitter) was what the handler
            # waited, not retry_base_s's 1 ms backoff; the 500 after it, the second retry, adds
            # at most retry_base_s * 2 = 2 ms. These are the recorded waits, not a clock.
            assert 0.1 <= handler.models["root"].stats.retry_wait_s <= 0.11 + 0.002
            assert reply.text == "hello over http"
            assert reply.retries == 2
            assert reply.usage.input_tokens > 0
            stats = (await client.stats())["models"]["root"]
            assert (stats["sent"], stats["retries"], stats["rate_limited"]) == (3, 2, 1)
            usage = await client.usage("r")
            assert usage.calls == 1
            assert usage.usage == reply.usage
        assert len(fp.requests) == 3


async def test_bad_key_is_unauthorized_and_not_retried(actx: zmq.asyncio.Context) -> None:
    async with FakeProvider(FakeProviderConfig(api_key="right")) as fp:
        model = {"backend": "anthropic", "model": "m", "base_url": fp.base_url, "api_key_env": "K"}
        async with (
            running_handler({"root": model}, env={"K": "wrong"}) as handler,
            AsyncHandlerClient(handler.address or "", context=actx) as client,
        ):
            with pytest.raises(RemoteError) as info:
                await client.complete("x", model="root")
            assert info.value.code == ErrorCode.UNAUTHORIZED
            assert "wrong" not in info.value.message
        assert len(fp.requests) == 1


# ---------------------------------------------------------------- first contact and oversized prompts


def _http_model(backend: str, fp: FakeProvider, **extra: object) -> dict[str, object]:
    base = "/v1" if backend == "openai" else ""
    return {"backend": backend, "model": "m-1", "base_url": fp.base_url + base, "api_key_env": "K", **extra}


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
async def test_a_prompt_over_the_window_is_refused_before_anything_is_sent(
    actx: zmq.asyncio.Context, backend: str
) -> None:
    async with FakeProvider(FakeProviderConfig(api_key="sk-test")) as fp:
        model = _http_model(backend, fp, context_window_tokens=1_000)
        async with (
            running_handler({"sub": model}, env={"K": "sk-test"}) as handler,
            AsyncHandlerClient(handler.address or "", context=actx) as client,
        ):
            await client.run_open("r", RunLimits(max_calls=5))
            with pytest.raises(RemoteError) as info:
                await client.complete("x" * 4_001, model="sub", run="r")
            assert info.value.code == ErrorCode.TOO_LARGE
            assert not info.value.retryable
            message = info.value.message
            assert "about 1,001 tokens" in message
            assert "1,000 tokens" in message
            assert "chunks" in message
            assert (await client.usage("r")).calls == 0  # refused before the run's budget saw it
            reply = await client.complete("x" * 4_000, model="sub", run="r")  # exactly the window fits
            assert reply.text
            pong = await client.ping()
            assert pong.context_windows == {"sub": 1_000}
        assert len(fp.requests) == 1  # only the prompt that fits reached the provider


async def test_an_unset_key_is_said_at_start_and_on_use_and_nothing_is_sent(
    actx: zmq.asyncio.Context, caplog: pytest.LogCaptureFixture
) -> None:
    # No base_url: the provider's own API, whose key is ANTHROPIC_API_KEY when the config names none.
    # The refusal comes before any connection, so this runs offline.
    model = {"backend": "anthropic", "model": "claude-sonnet-4-5"}
    with caplog.at_level("WARNING"):
        async with (
            running_handler({"root": model}, env={}) as handler,
            AsyncHandlerClient(handler.address or "", context=actx) as client,
        ):
            started = [r.getMessage() for r in caplog.records]
            assert any("$ANTHROPIC_API_KEY is not set" in m and "'root'" in m for m in started)
            for _ in range(2):
                with pytest.raises(RemoteError) as info:
                    await client.complete("hello", model="root")
                assert info.value.code == ErrorCode.UNAUTHORIZED
                assert not info.value.retryable
                assert "$ANTHROPIC_API_KEY is not set" in info.value.message
                assert "nothing was sent" in info.value.message
            stats = (await client.stats())["models"]["root"]
            assert stats["retries"] == 0
    said = [r.getMessage() for r in caplog.records if "ANTHROPIC_API_KEY" in r.getMessage()]
    assert len(said) == 2  # once at start, once on first use


async def test_a_named_key_unset_on_loopback_still_reaches_a_keyless_server(
    actx: zmq.asyncio.Context,
) -> None:
    async with FakeProvider(FakeProviderConfig(api_key=None)) as fp:
        async with (
            running_handler({"sub": _http_model("openai", fp)}, env={}) as handler,
            AsyncHandlerClient(handler.address or "", context=actx) as client,
        ):
            reply = await client.complete("keyless", model="sub")
            assert reply.text == "keyless"
        assert len(fp.requests) == 1


@pytest.mark.parametrize("backend", ["anthropic", "openai"])
async def test_a_host_that_does_not_resolve_is_a_configuration_error_not_retried(
    actx: zmq.asyncio.Context, backend: str
) -> None:
    base = "http://no-such-host.invalid" + ("/v1" if backend == "openai" else "")
    model = {"backend": backend, "model": "m", "base_url": base}
    async with (
        running_handler({"root": model}, env={}) as handler,
        AsyncHandlerClient(handler.address or "", context=actx) as client,
    ):
        with pytest.raises(RemoteError) as info:
            await client.complete("hello", model="root")
        assert info.value.code == ErrorCode.BACKEND_ERROR
        assert not info.value.retryable
        assert "cannot resolve the host name 'no-such-host.invalid'" in info.value.message
        assert "base_url" in info.value.message
        stats = (await client.stats())["models"]["root"]
        assert (stats["sent"], stats["retries"]) == (1, 0)
        assert stats["breaker"]["consecutive_failures"] == 0  # a configuration error, not an outage
