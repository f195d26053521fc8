"""Test kit, public so that users' tests and ours start handlers the same way.

async with running_handler({"root": echo_model(latency_ms=50)}) as handler:
    async with AsyncHandlerClient(handler.address) as client:
        ...
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import zmq.asyncio

from .backends import Backend
from .config import HandlerConfig, parse_config
from .server import Handler

__all__ = ["echo_model", "ipc_address", "running_handler", "script_model"]


def echo_model(latency_ms: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"backend": "echo", "latency_ms": latency_ms, **extra}


def script_model(path: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "script", "path": path, **extra}


def ipc_address(name: str = "rlmq") -> str:
    """A fresh ipc:// address in a private temporary directory (removed by the OS's tmp cleanup)."""
    directory = tempfile.mkdtemp(prefix="rlmq-")
    return f"ipc://{os.path.join(directory, name + '.sock')}"


@asynccontextmanager
async def running_handler(
    models: Mapping[str, Mapping[str, Any]] | HandlerConfig,
    *,
    bind: str = "tcp://127.0.0.1:0",
    backends: Mapping[str, Backend] | None = None,
    context: zmq.asyncio.Context | None = None,
    env: Mapping[str, str] | None = None,
    **handler_settings: Any,
) -> AsyncIterator[Handler]:
    """A handler serving in this event loop on a free port, stopped on exit.

    ``env`` stands in for the environment when resolving ``api_key_env`` (default: empty).
    """
    if isinstance(models, HandlerConfig):
        config = models
    else:
        table = {"models": dict(models), "handler": {"bind": bind, **handler_settings}}
        config = parse_config(table, env=env or {})
    handler = Handler(config, backends=backends, context=context)
    await handler.start()
    try:
        yield handler
    finally:
        await handler.stop(grace_s=1.0)
