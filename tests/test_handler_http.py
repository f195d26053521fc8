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
            # waited, not retry_base_s's 1 ms backoff (the 500 after it adds at most 1 ms).
            assert 0.1 <= handler.models["root"].stats.retry_wait_s <= 0.111
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
