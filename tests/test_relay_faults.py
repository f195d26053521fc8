"""Issue 8's faults over real HTTP: handler -> Anthropic/OpenAI backend -> fake provider."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import zmq.asyncio

from rlmq.fakeprovider import FakeProvider, FakeProviderConfig
from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.protocol import AsyncHandlerClient, CompleteReply, ErrorCode, RemoteError

BACKENDS = ["anthropic", "openai"]


def model_table(backend: str, base_url: str, **extra: Any) -> dict[str, Any]:
    suffix = "/v1" if backend == "openai" else ""
    return {"backend": backend, "model": "m", "base_url": base_url + suffix, "api_key_env": "K", **extra}


async def burst(client: AsyncHandlerClient, n: int, model: str = "p") -> list[CompleteReply | BaseException]:
    return await asyncio.gather(
        *(client.complete(f"q{i}", model=model, timeout_s=30) for i in range(n)), return_exceptions=True
    )


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_fifth_of_429s_all_succeed_with_retries(actx: zmq.asyncio.Context, backend: str) -> None:
    config = FakeProviderConfig(api_key="k", rate_limit_fraction=0.2, retry_after_s=0.05, seed=3)
    async with (
        FakeProvider(config) as fp,
        running_handler({"p": model_table(backend, fp.base_url)}, env={"K": "k"}, retry_base_s=0.01) as h,
        AsyncHandlerClient(h.address or "", context=actx) as client,
    ):
        replies = await burst(client, 200)
        assert [getattr(r, "text", r) for r in replies] == [f"q{i}" for i in range(200)]
        stats = (await client.stats())["models"]["p"]
        assert stats["rate_limited"] > 10
        assert stats["retries"] == stats["sent"] - 200
        # A steady fifth of refusals is the provider's noise, not a concurrency cap: the
        # limit stays put (it used to collapse to its floor and take 20x longer).
        assert stats["concurrency"]["limit"] == stats["concurrency"]["max"]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_rpm_pacing_keeps_a_burst_under_the_providers_limit(
    actx: zmq.asyncio.Context, backend: str
) -> None:
    # The provider takes 60 a second; the handler is told 45 a second. A burst of 90 must be
    # paced, not bounced.
    async with (
        FakeProvider(FakeProviderConfig(api_key="k", max_rps=60)) as fp,
        running_handler({"p": model_table(backend, fp.base_url, rpm=2700)}, env={"K": "k"}) as h,
        AsyncHandlerClient(h.address or "", context=actx) as client,
    ):
        replies = await burst(client, 90)
        assert all(isinstance(r, CompleteReply) for r in replies)
        assert fp.counters.to_dict()["by_status"].get("429", 0) <= 3


@pytest.mark.parametrize("backend", BACKENDS)
async def test_provider_down_fails_fast_others_serve_traffic_resumes(
    actx: zmq.asyncio.Context, backend: str
) -> None:
    fp = FakeProvider(FakeProviderConfig(api_key="k"))
    await fp.start()
    base_url, port = fp.base_url, fp.port
    await fp.close()  # the provider is down: connections are refused
    models = {
        "p": model_table(backend, base_url, breaker_threshold=3, breaker_cooldown_s=0.3, max_retries=1),
        "local": echo_model(),
    }
    async with (
        running_handler(models, env={"K": "k"}, retry_base_s=0.01, retry_max_s=0.02) as h,
        AsyncHandlerClient(h.address or "", context=actx) as client,
    ):
        replies = await burst(client, 20)  # each carries timeout_s: nothing can hang
        codes = {r.code for r in replies if isinstance(r, RemoteError)}
        assert len(codes) > 0
        assert all(isinstance(r, RemoteError) and r.retryable for r in replies)
        assert codes <= {ErrorCode.BACKEND_ERROR, ErrorCode.UNAVAILABLE}
        assert ErrorCode.UNAVAILABLE in codes  # the circuit opened and failed the rest fast
        assert (await client.complete("still here", model="local")).text == "still here"
        stats = (await client.stats())["models"]["p"]
        assert stats["breaker"]["state"] == "open"

        async with FakeProvider(FakeProviderConfig(api_key="k"), port=port):  # the provider returns
            # The breaker lets a probe through once its cooldown is over: wait out what is left
            # of it (a wait for the clock the breaker itself reads, nothing else to wait on).
            breaker = h.models["p"].breaker
            await asyncio.sleep(max(0.0, breaker.opened_at + breaker.cooldown_s - time.monotonic()))
            outcome = (await burst(client, 1))[0]
            assert isinstance(outcome, CompleteReply), outcome
            assert outcome.text == "q0"
            assert (await client.stats())["models"]["p"]["breaker"]["state"] == "closed"
