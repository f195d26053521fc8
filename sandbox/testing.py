"""Test kit, public so that users' tests and ours start pools the same way.

async with running_handler({"sub": echo_model()}) as handler:
    async with running_pool(handler.address) as pool:
        async with AsyncSandboxClient(pool.address) as client:
            session = await client.open(run="r1", context="...")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import zmq.asyncio

from rlmq.protocol.security import CurveClientKeys, CurveServerKeys

from .config import PoolConfig
from .pool import Pool

__all__ = ["running_pool"]


@asynccontextmanager
async def running_pool(
    handler_address: str,
    *,
    bind: str = "tcp://127.0.0.1:0",
    context: zmq.asyncio.Context | None = None,
    wait_ready: bool = True,
    curve_server: CurveServerKeys | None = None,
    curve_client: CurveClientKeys | None = None,
    **settings: Any,
) -> AsyncIterator[Pool]:
    """A pool serving in this event loop on a free port, with its warm workers ready (unless
    ``wait_ready`` is false); every worker is killed and every temp dir removed on exit, also
    when starting fails."""
    config = PoolConfig(handler=handler_address, bind=bind, **settings)
    pool = Pool(config, context=context, curve_server=curve_server, curve_client=curve_client)
    try:
        await pool.start()
        if wait_ready:
            await pool.wait_ready()
        yield pool
    finally:
        await pool.stop()
