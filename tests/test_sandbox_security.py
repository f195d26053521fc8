"""CURVE on the pool's TCP endpoint: keyed clients work, others get nothing, wide binds need keys."""

from __future__ import annotations

import pytest
import zmq.asyncio

from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.protocol.sandbox import AsyncSandboxClient, SandboxError
from rlmq.protocol.security import AuthRequired, CurveClientKeys, CurveServerKeys, generate_keypair
from rlmq.sandbox.testing import running_pool


async def test_pool_beyond_loopback_refuses_to_start_without_keys(actx: zmq.asyncio.Context) -> None:
    async with running_handler({"sub": echo_model()}) as handler:
        with pytest.raises(AuthRequired, match="needs CURVE keys"):
            async with running_pool(handler.address or "", bind="tcp://0.0.0.0:0", workers=1, context=actx):
                pass


async def test_pool_with_keys_serves_keyed_clients_only(actx: zmq.asyncio.Context) -> None:
    server, client, stranger = generate_keypair(), generate_keypair(), generate_keypair()
    keys = CurveServerKeys(server, frozenset({client.public}))
    async with (
        running_handler({"sub": echo_model()}) as handler,
        running_pool(
            handler.address or "", bind="tcp://127.0.0.1:0", workers=1, context=actx, curve_server=keys
        ) as pool,
    ):
        async with AsyncSandboxClient(
            pool.address, context=actx, curve=CurveClientKeys(server.public, client)
        ) as sc:
            session = await sc.open(run="r", context="secret document")
            result = await session.exec("print(llm_query(context[:6]))")
            assert result.stdout.strip() == "secret"
            await session.close()
        for keys_of in (None, CurveClientKeys(server.public, stranger)):
            async with AsyncSandboxClient(pool.address, context=actx, timeout_s=0.5, curve=keys_of) as other:
                with pytest.raises(SandboxError) as info:
                    await other.ping()
                assert info.value.code == "timeout"
