"""The Anthropic Messages API through the official ``anthropic`` SDK (built on ``httpx2``).

One attempt per call: SDK retries are off, the handler retries. SDK and transport errors are
mapped to ``BackendError`` here (table in ``_http``). Requests are shaped the Anthropic way:

* system messages are joined into the ``system`` parameter, wherever they stood;
* consecutive messages of one role are merged into one (contents joined by a blank line),
  because the API wants user and assistant turns to alternate;
* ``temperature`` is not sent: API version 2026-10-21, which SDK 2.x speaks, rejects
  ``temperature``/``top_p``/``top_k`` with a 400 even at their defaults, and the SDK no longer
  has the parameters. A request that sets it is served at the model's default (warned once);
* with ``prompt_caching`` the system block and the last block of the last two user messages
  carry ``cache_control`` (3 breakpoints, the API allows 4): this turn writes the cache at its
  last user message and reads what the previous turn wrote at the one before.
"""

from __future__ import annotations

import json
import logging
from typing import Final

import anthropic
import httpx2
from anthropic.types import Message, MessageParam, TextBlockParam

from rlmq.protocol import ChatMessage, ErrorCode, Usage

from ..config import ModelConfig
from . import _http
from .base import Backend, BackendError, BackendRequest, Completion

__all__ = ["AnthropicBackend", "build_messages", "build_system"]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL: Final = "https://api.anthropic.com"


class AnthropicBackend(Backend):
    """One client per model alias, shared by all its concurrent calls.

    ``http_client`` replaces the SDK's HTTP client (tests hand in an ``httpx2.AsyncClient`` on a
    ``MockTransport``). Without it the SDK's aiohttp-based client is used: it holds thousands of
    requests in flight far better than the httpx2 default (see MACHINE.md).
    """

    def __init__(self, config: ModelConfig, *, http_client: httpx2.AsyncClient | None = None) -> None:
        self._config = config
        self._where = f"model {config.alias!r} ({config.model} at anthropic)"
        self._url = config.base_url or DEFAULT_BASE_URL
        self._key = _http.KeyCheck(config)
        timeout = httpx2.Timeout(config.timeout_s, connect=config.connect_timeout_s)
        if http_client is None:
            # The aiohttp transport honours ``limits.max_connections`` as the connector's limit
            # (keep-alive count does not map to aiohttp; it keeps what it can).
            limits = httpx2.Limits(
                max_connections=config.max_concurrency,
                max_keepalive_connections=config.max_concurrency,
            )
            http_client = anthropic.DefaultAioHttpClient(timeout=timeout, limits=limits)
        # Pass key and base URL explicitly even when unset: given neither, the SDK would look for
        # credentials in ANTHROPIC_* variables and profile files, behind the config's back.
        self._client = anthropic.AsyncAnthropic(
            api_key=config.api_key or "",
            base_url=config.base_url or DEFAULT_BASE_URL,
            max_retries=0,
            timeout=timeout,
            http_client=http_client,
        )
        # No key configured (a local server that wants none): send no Authorization header at
        # all rather than an empty bearer token.
        self._extra_headers: dict[str, str | anthropic.Omit] | None = (
            None if config.api_key else {"Authorization": anthropic.omit}
        )
        self._warned_temperature = False

    async def complete(self, request: BackendRequest) -> Completion:
        self._key.before_call()
        messages = build_messages(request.chat, caching=self._config.prompt_caching)
        if not messages:
            raise BackendError(
                ErrorCode.BAD_REQUEST,
                f"{self._where}: a call needs at least one user or assistant message",
                retryable=False,
            )
        total_s = request.timeout_s if request.timeout_s is not None else self._config.timeout_s
        timeout = httpx2.Timeout(total_s, connect=min(self._config.connect_timeout_s, total_s))
        system = build_system(request.system, caching=self._config.prompt_caching)
        if request.temperature is not None and not self._warned_temperature:
            self._warned_temperature = True
            log.warning(
                "%s: temperature is ignored; the Anthropic API (version 2026-10-21) rejects it",
                self._where,
            )
        try:
            message = await self._client.messages.create(
                model=request.model,
                max_tokens=request.max_tokens,
                messages=messages,
                system=system if system is not None else anthropic.omit,
                timeout=timeout,
                extra_headers=self._extra_headers,
            )
        except anthropic.APITimeoutError:
            raise _http.timeout_error(self._where, total_s) from None
        except anthropic.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise _http.connection_error(self._where, cause, self._config.api_key, url=self._url) from None
        except anthropic.APIStatusError as exc:
            raise self._status_error(exc) from None
        except anthropic.APIResponseValidationError as exc:
            raise _http.malformed_error(self._where, str(exc), exc.status_code) from None
        except json.JSONDecodeError as exc:  # a body labelled JSON that is not
            raise _http.malformed_error(self._where, f"body is not JSON: {exc}") from None
        return self._completion(message, request.model)

    def _status_error(self, exc: anthropic.APIStatusError) -> BackendError:
        response = exc.response
        if exc.api_message:
            kind = f"{exc.type}: " if exc.type else ""
            detail = f"{kind}{exc.api_message}"
        else:
            detail = _http.error_detail(exc.body, str(exc.body) if exc.body is not None else "")
        return _http.status_error(
            self._where,
            exc.status_code,
            detail,
            retry_after_s=_http.parse_retry_after(response.headers),
            secret=self._config.api_key,
        )

    def _completion(self, message: object, model: str) -> Completion:
        # The SDK does not validate response bodies: a non-JSON body comes back as a str, and a
        # JSON body of the wrong shape as a Message missing attributes. Check what we read.
        if not isinstance(message, Message):
            raise _http.malformed_error(self._where, f"expected a message, got {type(message).__name__}")
        content = getattr(message, "content", None)
        usage = getattr(message, "usage", None)
        if not isinstance(content, list) or usage is None:
            raise _http.malformed_error(self._where, "the message has no content or no usage")
        text = "".join(
            b.text for b in content if getattr(b, "type", None) == "text" and isinstance(b.text, str)
        )
        plain = getattr(usage, "input_tokens", None)
        output = getattr(usage, "output_tokens", None)
        read = getattr(usage, "cache_read_input_tokens", None) or 0  # null when caching is off
        write = getattr(usage, "cache_creation_input_tokens", None) or 0
        if not (
            isinstance(plain, int)
            and isinstance(output, int)
            and isinstance(read, int)
            and isinstance(write, int)
        ):
            raise _http.malformed_error(self._where, "usage counts are missing or not integers")
        stop = getattr(message, "stop_reason", None)
        return Completion(
            text=text,
            model=str(getattr(message, "model", None) or model),
            usage=Usage(
                input_tokens=plain + read + write,  # Anthropic leaves cached tokens out
                output_tokens=output,
                cache_read_tokens=read,
                cache_write_tokens=write,
            ),
            stop_reason=stop if isinstance(stop, str) else None,
        )

    async def aclose(self) -> None:
        await self._client.close()


def build_system(system: str | None, *, caching: bool) -> str | list[TextBlockParam] | None:
    """The ``system`` parameter: a plain string, or one text block marked for caching. None when
    there is no system text (the API refuses empty text blocks)."""
    if not system:
        return None
    if not caching:
        return system
    return [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]


def build_messages(chat: tuple[ChatMessage, ...], *, caching: bool) -> list[MessageParam]:
    """User and assistant messages, merged where one role repeats, with cache breakpoints."""
    merged: list[tuple[str, list[str]]] = []
    for m in chat:
        if merged and merged[-1][0] == m.role:
            merged[-1][1].append(m.content)
        else:
            merged.append((m.role, [m.content]))
    marked: set[int] = set()
    if caching:
        users = [i for i, (role, _) in enumerate(merged) if role == "user"]
        marked = set(users[-2:])
    out: list[MessageParam] = []
    for i, (role, parts) in enumerate(merged):
        text = "\n\n".join(parts)
        content: str | list[TextBlockParam] = text
        if i in marked:
            content = [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
        if role == "user":
            out.append({"role": "user", "content": content})
        else:
            out.append({"role": "assistant", "content": content})
    return out
