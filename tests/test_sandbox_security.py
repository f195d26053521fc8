"""CURVE on the pool's TCP endpoint: keyed clients work, others get nothing, wide binds need keys."""

from __future__ import annotations

import pytest
import zmq.asyncio

from rlmq.lmhandler.config import parse_config
from rlmq.lmhandler.server import Handler
from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.protocol import RunLimits
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
            handler.runs.open_run("r", RunLimits())
            session = await sc.open(run="r", context="secret document")
            result = await session.exec("print(llm_query(context[:6]))")
            assert result.stdout.strip() == "secret"
            await session.close()
        for keys_of in (None, CurveClientKeys(server.public, stranger)):
            async with AsyncSandboxClient(pool.address, context=actx, timeout_s=0.5, curve=keys_of) as other:
                with pytest.raises(SandboxError) as info:
                    await other.ping()
                assert info.value.code == "timeout"


async def test_sub_calls_reach_a_curve_handler_through_the_relay_keys_never_in_the_worker(
    actx: zmq.asyncio.Context,
) -> None:
    server, pool_key = generate_keypair(), generate_keypair()
    config = parse_config({"models": {"sub": echo_model()}, "handler": {"bind": "tcp://127.0.0.1:0"}})
    handler = Handler(config, context=actx, curve=CurveServerKeys(server, frozenset({pool_key.public})))
    await handler.start()
    try:
        handler.runs.open_run("r-curve", RunLimits(), "k-curve")
        curve = CurveClientKeys(server.public, pool_key)
        async with (
            running_pool(handler.address or "", workers=1, context=actx, curve_client=curve) as pool,
            AsyncSandboxClient(pool.address or "", context=actx) as sc,
        ):
            session = await sc.open(run="r-curve", run_key="k-curve")
            # Strings are not tracked by gc: look in every container that is, as code would. The
            # key is built at run time (the code's own text holds only halves of it).
            half = len(pool_key.secret) // 2
            code = (
                "import gc\n"
                f"key = {pool_key.secret[:half]!r} + {pool_key.secret[half:]!r}\n"
                "def texts(o):\n"
                "    if isinstance(o, dict):\n"
                "        return list(o.values())\n"
                "    return list(o) if isinstance(o, list | tuple) else []\n"
                "def holds(t):\n"
                "    raw = t if isinstance(t, bytes) else t.encode(errors='replace')\n"
                "    return t is not key and key in raw\n"
                "kinds = bytes | str\n"
                "found = any(holds(t) for o in gc.get_objects() for t in texts(o) if isinstance(t, kinds))\n"
                "print(llm_query('over curve'), found)"
            )
            result = await session.exec(code)
            assert (result.error, result.stdout) == (None, "over curve False\n")
            await session.close()
        assert handler.runs.get("r-curve").calls == 1
    finally:
        await handler.stop(grace_s=1.0)
