"""OpenAI-compatible chat completions (OpenAI, vLLM, llama.cpp's server, ...) over ``httpx``.

No SDK: one ``POST {base_url}/chat/completions`` per call, one attempt (the handler retries).
Errors are mapped to ``BackendError`` with the table in ``_http``. The transport is injectable,
so tests can hand in ``httpx.MockTransport``; by default it is ``httpx-aiohttp``'s transport,
which holds thousands of requests in flight (see docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeGuard

import httpx
from httpx_aiohttp import AiohttpTransport

from rlmq.protocol import Usage

from ..config import ModelConfig
from . import _http
from .base import Backend, BackendError, BackendRequest, Completion, estimate_tokens

__all__ = ["OpenAIBackend"]

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"


class OpenAIBackend(Backend):
    """One connection pool per model alias, sized to its ``max_concurrency``."""

    def __init__(self, config: ModelConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._config = config
        base_url = (config.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._url = base_url
        self._key = _http.KeyCheck(config)
        self._where = f"model {config.alias!r} ({config.model} at {base_url})"
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        limits = httpx.Limits(
            max_connections=config.max_concurrency,
            max_keepalive_connections=config.max_concurrency,
        )
        if transport is None:
            # httpx's own transport slows with the square of the requests in flight (1,000 at 1 s
            # latency: about 28 s here); the aiohttp transport holds them in about 2.3 s.
            transport = AiohttpTransport(limits=limits)
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            limits=limits,
            transport=transport,
        )

    async def complete(self, request: BackendRequest) -> Completion:
        self._key.before_call()
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        total_s = request.timeout_s if request.timeout_s is not None else self._config.timeout_s
        timeout = httpx.Timeout(total_s, connect=min(self._config.connect_timeout_s, total_s))
        try:
            response = await self._client.post("/chat/completions", json=body, timeout=timeout)
        except httpx.TimeoutException as exc:
            if _really_timed_out(exc):
                raise _http.timeout_error(self._where, total_s) from None
            raise _http.connection_error(
                self._where, exc.__cause__ or exc, self._config.api_key, url=self._url
            ) from None
        except httpx.TransportError as exc:
            raise _http.connection_error(self._where, exc, self._config.api_key, url=self._url) from None
        if response.status_code >= 400:
            raise self._status_error(response)
        return self._completion(response, request)

    def _status_error(self, response: httpx.Response) -> BackendError:
        detail = _http.error_detail(_http.parse_json(response.text), response.text)
        return _http.status_error(
            self._where,
            response.status_code,
            detail,
            retry_after_s=_http.parse_retry_after(response.headers),
            secret=self._config.api_key,
        )

    def _completion(self, response: httpx.Response, request: BackendRequest) -> Completion:
        data = _http.parse_json(response.text)
        if not isinstance(data, Mapping):
            raise _http.malformed_error(self._where, "body is not a JSON object", response.status_code)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
            raise _http.malformed_error(self._where, "no choices", response.status_code)
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, Mapping):
            raise _http.malformed_error(self._where, "choice without a message", response.status_code)
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise _http.malformed_error(self._where, "message content is not text", response.status_code)
        text = content or ""
        stop = choice.get("finish_reason")
        model = data.get("model")
        return Completion(
            text=text,
            model=model if isinstance(model, str) and model else request.model,
            usage=_usage(data.get("usage"), request, text),
            stop_reason=stop if isinstance(stop, str) else None,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _usage(raw: Any, request: BackendRequest, text: str) -> Usage:
    """The server's counts, or estimates when it sent none (some local servers do not)."""
    if isinstance(raw, Mapping):
        prompt = raw.get("prompt_tokens")
        completion = raw.get("completion_tokens")
        if _count(prompt) and _count(completion):
            details = raw.get("prompt_tokens_details")
            cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
            return Usage(
                input_tokens=prompt,
                output_tokens=completion,
                cache_read_tokens=cached if _count(cached) else 0,
            )
    return Usage(
        input_tokens=sum(estimate_tokens(m.content) for m in request.messages),
        output_tokens=estimate_tokens(text),
    )


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _really_timed_out(exc: httpx.TimeoutException) -> bool:
    """httpx-aiohttp reports every aiohttp connection error (reset, refused) as ConnectTimeout;
    only a cause that is itself a timeout (or none, from httpx's own transport) is one."""
    return exc.__cause__ is None or isinstance(exc.__cause__, TimeoutError)
