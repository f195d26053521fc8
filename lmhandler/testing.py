"""Test kit, public so that users' tests and ours start handlers the same way.

async with running_handler({"root": echo_model(latency_ms=50)}) as handler:
    async with AsyncHandlerClient(handler.address) as client:
        ...
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import zmq.asyncio

from rlmq.protocol import ChatMessage, ErrorCode, Usage

from .backends import Backend, BackendError, BackendRequest, Completion, estimate_tokens
from .config import HandlerConfig, parse_config
from .server import Handler

__all__ = ["HeldModel", "ScriptedModel", "echo_model", "ipc_address", "running_handler", "script_model"]


class ScriptedModel(Backend):
    """A model whose answers a test writes per run: ``model.script("run-1", ["...", "..."])``.

    Responses are served in order for each run id (``None`` for calls without one; ``default``
    for runs not scripted). Every request is recorded in ``requests`` as ``(run, messages)`` so a
    test can assert what the model was shown.
    """

    def __init__(self, default: list[str] | None = None) -> None:
        self.default = list(default or [])
        self.scripts: dict[str | None, list[str]] = {}
        self.requests: list[tuple[str | None, tuple[ChatMessage, ...]]] = []

    def script(self, run: str | None, responses: list[str]) -> None:
        self.scripts[run] = list(responses)

    async def complete(self, request: BackendRequest) -> Completion:
        self.requests.append((request.run, request.messages))
        queue = self.scripts.setdefault(request.run, list(self.default))
        if not queue:
            raise BackendError(
                ErrorCode.SCRIPT_EXHAUSTED,
                f"no scripted response left for run {request.run!r}",
                retryable=False,
            )
        text = queue.pop(0)
        prompt = sum(estimate_tokens(m.content) for m in request.messages)
        return Completion(text, request.model, Usage(prompt, estimate_tokens(text)), "end_turn")


class HeldModel(Backend):
    """Echoes the last user message, but holds every call until released: a test can then see
    how many calls are in the backend at once, without timing anything.

    ``await model.entered(n)`` returns once ``n`` calls are held; ``release()`` lets every held
    and future call through. With ``open_at=n`` the model releases itself when ``n`` calls are
    held at once (so it answers only if the handler really runs ``n`` calls concurrently).
    """

    def __init__(self, *, open_at: int | None = None) -> None:
        self.open_at = open_at
        self.calls = 0
        self.held = 0
        self.peak = 0  # the most calls held at once
        self._open = asyncio.Event()
        self._changed = asyncio.Condition()

    def release(self) -> None:
        self._open.set()

    async def entered(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.held >= n or self._open.is_set())

    async def complete(self, request: BackendRequest) -> Completion:
        self.calls += 1
        async with self._changed:
            self.held += 1
            self.peak = max(self.peak, self.held)
            if self.open_at is not None and self.held >= self.open_at:
                self._open.set()
            self._changed.notify_all()
        try:
            await self._open.wait()
        finally:
            self.held -= 1
        text = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        prompt = sum(estimate_tokens(m.content) for m in request.messages)
        return Completion(text, request.model, Usage(prompt, estimate_tokens(text)), "end_turn")


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
    state: Mapping[str, Any] | None = None,
    **handler_settings: Any,
) -> AsyncIterator[Handler]:
    """A handler serving in this event loop on a free port, stopped on exit.

    ``env`` stands in for the environment when resolving ``api_key_env`` (default: empty);
    ``state`` is the ``[state]`` table (``{"url": "redis://..."}``; default: in-process).
    """
    if isinstance(models, HandlerConfig):
        config = models
    else:
        table: dict[str, Any] = {"models": dict(models), "handler": {"bind": bind, **handler_settings}}
        if state is not None:
            table["state"] = dict(state)
        config = parse_config(table, env=env or {})
    handler = Handler(config, backends=backends, context=context)
    await handler.start()
    try:
        yield handler
    finally:
        await handler.stop(grace_s=1.0)
