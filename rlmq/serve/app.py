"""The OpenAI-compatible HTTP application: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Each model name is an RLM profile (an ``RLM`` view on the same services). A plain request gets
one ``chat.completion`` with ``usage``; ``stream: true`` gets server-sent events in OpenAI's chunk
format: progress as the run goes (``delta.reasoning_content`` lines, and an ``rlmq`` field with
the numbers), then the answer as content, the finish reason, the usage when asked for
(``stream_options.include_usage``), and ``data: [DONE]``. Every error is OpenAI's error shape with
its HTTP status; an error after a stream began is one chunk holding ``error``, which the openai
SDK raises. A client that goes away cancels its run (the runner cancels the handler's task).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from rlmq.facade import RLM, Progress, Result
from rlmq.orchestrator import StopReason
from rlmq.protocol import RlmqError

from .errors import ApiError, NotFound, TooLarge, Unauthorized
from .requests import ChatRequest, ContextPath, load_path_context, parse_chat_request
from .settings import ServeConfig

__all__ = ["make_app"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CONFIG: web.AppKey[ServeConfig] = web.AppKey("config", ServeConfig)
PROFILES: web.AppKey[Mapping[str, RLM]] = web.AppKey("profiles", Mapping)
STARTED = int(time.time())


def _json(body: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, ensure_ascii=False).encode(), status=status, content_type="application/json"
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as OpenAI's error shape, aiohttp's own (404, 405, 413) included."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _json(exc.body(), exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = ApiError(exc.reason, api_code=exc.reason.lower().replace(" ", "_"), status=exc.status)
        error.type = "invalid_request_error" if exc.status < 500 else "server_error"
        return _json(error.body(), exc.status)
    except RlmqError as exc:  # a run that could not start (services, settings)
        log.warning("%s %s: %s", request.method, request.path, exc.message)
        return _json(ApiError(exc.message, api_code=str(exc.code), status=503).body(), 503)
    except Exception:  # the one catch-all: the server lives on
        log.exception("%s %s failed", request.method, request.path)
        return _json(ApiError("internal error", api_code="internal").body(), 500)


def _authorize(request: web.Request) -> None:
    keys = request.app[CONFIG].keys
    if not keys:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("no API key given: send Authorization: Bearer KEY")
    given = token.strip().encode()
    # compare with every key, in constant time each, so timing tells nothing about which matched
    if not any([hmac.compare_digest(given, key.encode()) for key in keys]):
        raise Unauthorized("the API key is not valid")


async def _body(request: web.Request) -> bytes:
    limit = request.app[CONFIG].settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the request body is {request.content_length} bytes; this server takes {limit}")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:  # chunked bodies: aiohttp counts as it reads
        raise TooLarge(f"the request body is over this server's limit of {limit} bytes") from None


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    _authorize(request)
    data = [
        {"id": name, "object": "model", "created": STARTED, "owned_by": "rlmq"}
        for name in request.app[PROFILES]
    ]
    return _json({"object": "list", "data": data})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    _authorize(request)
    chat = parse_chat_request(await _body(request))
    profiles = request.app[PROFILES]
    rlm = profiles.get(chat.model)
    if rlm is None:
        names = ", ".join(profiles)
        raise NotFound(
            f"the model {chat.model!r} does not exist here; models: {names}", api_code="model_not_found"
        )
    context = chat.context
    if isinstance(context, ContextPath):
        context = await asyncio.to_thread(load_path_context, request.app[CONFIG].data_dir, context)
    if chat.stream:
        return await _stream(request, rlm, chat, context)
    result = await rlm.acompletion(chat.question, context)
    if result.stop_reason == StopReason.ERROR:
        raise _run_error(result)
    return _json(_completion(chat, result))


def _run_error(result: Result) -> ApiError:
    if result.error is not None:
        return ApiError.from_info(result.error)
    return ApiError(result.detail or "the run failed", api_code="rlm_failed", status=502)


def _finish_reason(result: Result) -> str:
    # A limit that cut the run short gave the best answer available, not the model's own.
    return "length" if result.stop_reason in (StopReason.BUDGET_EXCEEDED, StopReason.WALL_TIME) else "stop"


def _usage(result: Result) -> dict[str, int]:
    u = result.usage
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
    }


def _extension(result: Result) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "stop_reason": str(result.stop_reason),
        "detail": result.detail,
        "iterations": result.iterations,
        "calls": result.calls,
        "cost_usd": result.cost_usd,
        "elapsed_s": result.elapsed_s,
        "trajectory": None if result.trajectory is None else str(result.trajectory),
    }


def _completion(chat: ChatRequest, result: Result) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.run_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": chat.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.answer},
                "finish_reason": _finish_reason(result),
                "logprobs": None,
            }
        ],
        "usage": _usage(result),
        "rlmq": _extension(result),
    }


class _Chunks:
    """Writes one stream's chunks, all with the same id, model and creation time."""

    def __init__(self, response: web.StreamResponse, model: str) -> None:
        self.response = response
        self.model = model
        self.id = f"chatcmpl-{time.time_ns():x}"
        self.created = int(time.time())

    async def send(self, body: Mapping[str, Any]) -> None:
        await self.response.write(b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n")

    async def chunk(self, delta: Mapping[str, Any], *, finish: str | None = None, **extra: Any) -> None:
        await self.send(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish, "logprobs": None}],
                **extra,
            }
        )


async def _stream(request: web.Request, rlm: RLM, chat: ChatRequest, context: Any) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    out = _Chunks(response, chat.model)
    steps: asyncio.Queue[Progress] = asyncio.Queue()
    run = asyncio.ensure_future(rlm.acompletion(chat.question, context, on_progress=steps.put_nowait))
    keepalive_s = request.app[CONFIG].settings.keepalive_s
    try:
        await out.chunk({"role": "assistant", "content": ""})
        while not run.done() or not steps.empty():
            step = await _next(steps, run, keepalive_s)
            if step is None:
                if not run.done():
                    await response.write(b": keepalive\n\n")
                continue
            await out.chunk({"reasoning_content": step.message + "\n"}, rlmq=step.to_dict())
        try:
            result = run.result()
        except RlmqError as exc:
            await out.send(ApiError(exc.message, api_code=str(exc.code), status=503).body())
        else:
            if result.stop_reason == StopReason.ERROR:
                await out.send(_run_error(result).body())
            else:
                await out.chunk({"content": result.answer})
                await out.chunk({}, finish=_finish_reason(result), rlmq=_extension(result))
                if chat.include_usage:
                    await out.send(
                        {
                            "id": out.id,
                            "object": "chat.completion.chunk",
                            "created": out.created,
                            "model": chat.model,
                            "choices": [],
                            "usage": _usage(result),
                        }
                    )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    finally:
        if not run.done():  # the client went away (or the server stops): the run stops too
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
    return response


async def _next(
    steps: asyncio.Queue[Progress], run: asyncio.Future[Result], timeout_s: float
) -> Progress | None:
    """The next progress step; None when the run ended first or nothing came for ``timeout_s``."""
    if not steps.empty():
        return steps.get_nowait()
    getter = asyncio.ensure_future(steps.get())
    waiting: list[asyncio.Future[Any]] = [getter, run]
    try:
        await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await getter
    return getter.result() if not getter.cancelled() else None


def make_app(config: ServeConfig, profiles: Mapping[str, RLM]) -> web.Application:
    """The application; ``profiles`` maps each model name to its RLM."""
    app = web.Application(middlewares=[_errors], client_max_size=config.settings.max_body_bytes)
    app[CONFIG] = config
    app[PROFILES] = profiles
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app
