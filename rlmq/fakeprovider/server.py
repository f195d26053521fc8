"""The fake provider's server: one aiohttp app answering both APIs, with faults on demand."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from aiohttp import web

from rlmq.protocol import ErrorCode, RlmqError

from .apis import (
    ANTHROPIC_PATH,
    OPENAI_PATH,
    STATS_PATH,
    Api,
    block_text,
    check_anthropic_body,
    check_openai_body,
    error_response,
    fmt_seconds,
    malformed_response,
    tokens,
)

__all__ = [
    "FORCED_NAMES",
    "FakeProvider",
    "FakeProviderConfig",
    "FakeProviderCounters",
    "FakeProviderError",
    "Forced",
    "NotStarted",
    "RecordedRequest",
    "UnknownOutcome",
]

# Named outcomes ``force`` accepts besides an HTTP status code.
FORCED_NAMES: Final = frozenset({"ok", "malformed", "timeout", "reset"})
_SEEN_PREFIXES_MAX = 10_000
SAMPLING_PARAMS: Final = ("temperature", "top_p", "top_k")


class FakeProviderError(RlmqError):
    """The fake provider was used wrongly (its subtree, drawn in ``rlmq.fakeprovider``)."""


class UnknownOutcome(FakeProviderError, ValueError):
    """``force`` was given an outcome it does not know (still a ValueError, as a bad argument)."""

    code = ErrorCode.BAD_REQUEST


class NotStarted(FakeProviderError, RuntimeError):
    """The server's address was asked for before ``start`` (still a RuntimeError)."""


@dataclass(frozen=True, slots=True)
class FakeProviderConfig:
    """How the fake behaves. Fractions are per request, drawn from one seeded generator."""

    api_key: str | None = None  # None: openai accepts anything, anthropic any non-empty key
    latency_s: float = 0.0
    reply_text: str | None = None  # None: echo the last user message
    rate_limit_fraction: float = 0.0  # 429 with retry-after
    retry_after_s: float = 1.0
    server_error_fraction: float = 0.0  # 500
    overloaded_fraction: float = 0.0  # 529 (Anthropic's overloaded_error)
    malformed_fraction: float = 0.0  # 200 whose body is not JSON
    reset_fraction: float = 0.0  # connection dropped without a response
    max_rps: int | None = None  # requests beyond this within one second get 429
    seed: int | None = None
    timeout_sleep_s: float = 3600.0  # how long a "timeout" fault stalls
    record_last: int = 100  # how many requests ``requests`` keeps
    max_body_bytes: int = 32 * 1024 * 1024  # larger bodies get 413, as from the real API


@dataclass(frozen=True, slots=True)
class Forced:
    """A forced response spelled out: a status with extra headers (e.g. a retry-after-ms)."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    message: str | None = None


ForcedItem = int | str | Forced


@dataclass(slots=True)
class FakeProviderCounters:
    """Requests seen. ``by_status`` keys are status codes as strings, or "reset"/"timeout"."""

    served: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    by_path: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "served": self.served,
            "by_status": dict(self.by_status),
            "by_path": dict(self.by_path),
        }


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # names in lower case
    body: Any  # the parsed JSON, or None when the body was not JSON


class _Drop(FakeProviderError):
    """Internal: the outcome is a dropped connection or a stall, not an HTTP response."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class FakeProvider:
    """The server. Use as ``async with FakeProvider(config) as fp`` (binds 127.0.0.1, port 0).

    Not thread-safe: use it from the event loop it was started on.
    """

    def __init__(
        self,
        config: FakeProviderConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config or FakeProviderConfig()
        self.host = host
        self.port = port
        self.counters = FakeProviderCounters()
        self._recorded: deque[RecordedRequest] = deque(maxlen=max(1, self.config.record_last))
        self._forced: deque[ForcedItem] = deque()
        self._rng = random.Random(self.config.seed)
        self._seen_prefixes: OrderedDict[str, None] = OrderedDict()
        self._clock = clock  # for max_rps windows; tests pass a fake one
        # The latency and "timeout" waits. None: a timer that close() cuts short; tests pass
        # one they release themselves, to see a request held without measuring time.
        self._sleeper = sleep
        self._window_second = -1
        self._window_count = 0
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._runner is None:
            raise NotStarted("the fake provider is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """The last ``config.record_last`` requests, oldest first."""
        return list(self._recorded)

    def force(self, items: Iterable[ForcedItem]) -> None:
        """Queue outcomes for the next requests, one each: a status code, "ok", "malformed",
        "timeout" (stall far past any client timeout), "reset" (drop the connection) or a
        ``Forced``. Forced outcomes come before key checks, rate limits and random faults."""
        for item in items:
            if isinstance(item, str) and item not in FORCED_NAMES:
                raise UnknownOutcome(f"unknown forced outcome {item!r}; use one of {sorted(FORCED_NAMES)}")
            self._forced.append(item)

    async def start(self) -> None:
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post(ANTHROPIC_PATH, self._anthropic)
        app.router.add_post(OPENAI_PATH, self._openai)
        app.router.add_get(STATS_PATH, self._stats)
        # handler_cancellation: a client that gives up (timeout test) ends its stalled handler.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def close(self) -> None:
        self._closing.set()  # wakes every stalled handler
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- request pipeline ----------------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.counters.to_dict())

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "anthropic")

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "openai")

    async def _handle(self, request: web.Request, api: Api) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        self._recorded.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
        )
        self.counters.served += 1
        self.counters.by_path[request.path] = self.counters.by_path.get(request.path, 0) + 1
        try:
            response = await self._respond(request, api, body)
        except _Drop as drop:
            self._count(drop.kind)
            if drop.kind == "timeout":
                await self._sleep(self.config.timeout_sleep_s)
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)  # never reaches the client: the socket is gone
        self._count(str(response.status))
        return response

    def _count(self, key: str) -> None:
        self.counters.by_status[key] = self.counters.by_status.get(key, 0) + 1

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the server closes so shutdown never waits on stalls."""
        if seconds <= 0:
            return
        if self._sleeper is not None:
            await self._sleeper(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _respond(self, request: web.Request, api: Api, body: Any) -> web.Response:
        if self._forced:
            return await self._forced_response(self._forced.popleft(), api, body)
        denied = self._check_key(request, api)
        if denied is not None:
            return denied
        if api == "anthropic":
            version = request.headers.get("anthropic-version")
            if not version:
                return error_response(api, 400, "anthropic-version: header is required")
            # API version 2026-10-21 dropped the sampling parameters; older versions take them.
            if version >= "2026-10-21" and isinstance(body, dict):
                for name in SAMPLING_PARAMS:
                    if name in body:
                        return error_response(api, 400, f"{name}: Extra inputs are not permitted")
        limited = self._check_rps(api)
        if limited is not None:
            return limited
        faulted = self._random_fault(api)
        if faulted is not None:
            return faulted
        await self._sleep(self.config.latency_s)
        return self._success(api, body)

    async def _forced_response(self, item: ForcedItem, api: Api, body: Any) -> web.Response:
        if item == "ok" or item == 200:
            await self._sleep(self.config.latency_s)
            return self._success(api, body)
        if item == "malformed":
            return malformed_response()
        if item in ("timeout", "reset"):
            raise _Drop(str(item))
        if isinstance(item, Forced):
            return error_response(api, item.status, item.message, dict(item.headers))
        assert isinstance(item, int)
        headers = {"retry-after": fmt_seconds(self.config.retry_after_s)} if item == 429 else {}
        return error_response(api, item, None, headers)

    def _check_key(self, request: web.Request, api: Api) -> web.Response | None:
        expected = self.config.api_key
        auth = request.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if api == "anthropic":
            offered = [k for k in (request.headers.get("x-api-key"), bearer) if k]
            # No key configured: any key will do, but one must be there (like the real API).
            ok = bool(offered) if expected is None else expected in offered
            if not ok:
                what = "invalid x-api-key" if offered else "x-api-key header is required"
                return error_response(api, 401, what)
            return None
        if expected is None or bearer == expected:
            return None
        return error_response(api, 401, "Incorrect API key provided.")

    def _check_rps(self, api: Api) -> web.Response | None:
        if self.config.max_rps is None:
            return None
        second = int(self._clock())
        if second != self._window_second:
            self._window_second = second
            self._window_count = 0
        self._window_count += 1
        if self._window_count > self.config.max_rps:
            return error_response(api, 429, "Too many requests per second.", {"retry-after": "1"})
        return None

    def _random_fault(self, api: Api) -> web.Response | None:
        c = self.config
        draw = self._rng.random()
        for fraction, outcome in (
            (c.rate_limit_fraction, 429),
            (c.server_error_fraction, 500),
            (c.overloaded_fraction, 529),
            (c.malformed_fraction, "malformed"),
            (c.reset_fraction, "reset"),
        ):
            if draw < fraction:
                if outcome == 429:
                    return error_response(api, 429, None, {"retry-after": fmt_seconds(c.retry_after_s)})
                if outcome == "malformed":
                    return malformed_response()
                if outcome == "reset":
                    raise _Drop("reset")
                assert isinstance(outcome, int)
                return error_response(api, outcome, None)
            draw -= fraction
        return None

    # -- successful replies --------------------------------------------------------------------

    def _success(self, api: Api, body: Any) -> web.Response:
        if api == "anthropic":
            return self._anthropic_reply(body)
        return self._openai_reply(body)

    def _reply(self, last_user: str, max_tokens: int | None) -> tuple[str, bool]:
        """The reply text and whether it was cut at ``max_tokens``."""
        text = self.config.reply_text if self.config.reply_text is not None else last_user
        if max_tokens is not None and tokens(len(text)) > max_tokens:
            return text[: max_tokens * 4], True
        return text, False

    def _seen(self, api: Api, segments: list[tuple[str, str]]) -> bool:
        """Whether this cacheable prefix was sent before; remembers it either way (LRU)."""
        digest = hashlib.sha256(json.dumps([api, segments]).encode()).hexdigest()
        if digest in self._seen_prefixes:
            self._seen_prefixes.move_to_end(digest)
            return True
        self._seen_prefixes[digest] = None
        if len(self._seen_prefixes) > _SEEN_PREFIXES_MAX:
            self._seen_prefixes.popitem(last=False)
        return False

    def _anthropic_reply(self, body: Any) -> web.Response:
        problem = check_anthropic_body(body)
        if problem is not None:
            return error_response("anthropic", 400, problem)
        # Walk the prompt in order: system blocks, then each message's blocks. Each block with
        # cache_control ends a cacheable prefix. Like the real API, the longest prefix seen
        # before is read from the cache and the rest, up to the last breakpoint, is written.
        segments: list[tuple[str, str]] = []  # (role, text)
        breakpoints: list[int] = []  # prefix lengths, in segments
        system = body.get("system")
        system_blocks: list[Any] = [{"text": system}] if isinstance(system, str) else system or []
        for block in system_blocks:
            segments.append(("system", str(block.get("text", ""))))
            if block.get("cache_control"):
                breakpoints.append(len(segments))
        last_user = ""
        for message in body["messages"]:
            content = message["content"]
            blocks: list[Any] = [{"text": content}] if isinstance(content, str) else content
            for block in blocks:
                segments.append((message["role"], str(block.get("text", ""))))
                if block.get("cache_control"):
                    breakpoints.append(len(segments))
            if message["role"] == "user":
                last_user = block_text(content)
        total_chars = sum(len(text) for _, text in segments)
        prefix_chars = read_chars = 0
        if breakpoints:
            prefix_chars = sum(len(text) for _, text in segments[: breakpoints[-1]])
            for end in breakpoints:  # remember every prefix; keep the longest one seen before
                if self._seen("anthropic", segments[:end]):
                    read_chars = sum(len(text) for _, text in segments[:end])
        cache_read = tokens(read_chars)
        cache_write = tokens(prefix_chars) - cache_read
        text, cut = self._reply(last_user, body["max_tokens"])
        return web.json_response(
            {
                "id": f"msg_{uuid.uuid4().hex[:24]}",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": text}],
                "stop_reason": "max_tokens" if cut else "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": tokens(total_chars - prefix_chars),
                    "output_tokens": tokens(len(text)),
                    "cache_read_input_tokens": cache_read,
                    "cache_creation_input_tokens": cache_write,
                },
            }
        )

    def _openai_reply(self, body: Any) -> web.Response:
        problem = check_openai_body(body)
        if problem is not None:
            return error_response("openai", 400, problem)
        messages = body["messages"]
        segments = [(str(m["role"]), block_text(m.get("content"))) for m in messages]
        last_user = next(
            (block_text(m.get("content")) for m in reversed(messages) if m["role"] == "user"), ""
        )
        # OpenAI caches prompt prefixes by itself; report everything before the last message as
        # cached when it was seen before.
        cached = 0
        if len(segments) > 1 and self._seen("openai", segments[:-1]):
            cached = tokens(sum(len(text) for _, text in segments[:-1]))
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        text, cut = self._reply(last_user, max_tokens if isinstance(max_tokens, int) else None)
        prompt_tokens = tokens(sum(len(text) for _, text in segments))
        completion_tokens = tokens(len(text))
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "length" if cut else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": cached},
                },
            }
        )
