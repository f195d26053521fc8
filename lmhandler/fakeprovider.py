"""A fake model provider speaking real HTTP: the Anthropic Messages API and OpenAI chat completions.

It lets the real backends (and load tests) run against a local server with no model and no
network. Replies echo the last user message (or a fixed text); token counts are estimated at
four characters a token. Anthropic prompt caching is simulated from the ``cache_control``
breakpoints the client sends: the longest prefix seen before is a cache read, the rest up to
the last breakpoint a cache write (no minimum length, no expiry). Faults can be injected at
random (fractions of requests, seeded) or forced one per request with ``FakeProvider.force``,
so tests stay deterministic.

    async with FakeProvider(FakeProviderConfig(api_key="k")) as fp:
        fp.force([429, "malformed"])   # the next two requests fail this way
        ...                            # point a client at fp.base_url

``run`` serves until SIGINT/SIGTERM; the ``rlmq fake-provider`` command calls it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import signal
import sys
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal

from aiohttp import web

__all__ = [
    "FakeProvider",
    "FakeProviderConfig",
    "FakeProviderCounters",
    "Forced",
    "RecordedRequest",
    "run",
]

ANTHROPIC_PATH: Final = "/v1/messages"
OPENAI_PATH: Final = "/v1/chat/completions"
STATS_PATH: Final = "/stats"

# Named outcomes ``force`` accepts besides an HTTP status code.
FORCED_NAMES: Final = frozenset({"ok", "malformed", "timeout", "reset"})
_SEEN_PREFIXES_MAX = 10_000
SAMPLING_PARAMS: Final = ("temperature", "top_p", "top_k")

Api = Literal["anthropic", "openai"]


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


class _Drop(Exception):
    """Internal: the outcome is a dropped connection or a stall, not an HTTP response."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _tokens(chars: int) -> int:
    return math.ceil(chars / 4)


def _block_text(content: Any) -> str:
    """The text of a message content: a string, or the text blocks of a block list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            b.get("text", "") for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    return ""


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
        self._window_second = -1
        self._window_count = 0
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._runner is None:
            raise RuntimeError("the fake provider is not started")
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
                raise ValueError(f"unknown forced outcome {item!r}; use one of {sorted(FORCED_NAMES)}")
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
                return _error(api, 400, "anthropic-version: header is required")
            # API version 2026-10-21 dropped the sampling parameters; older versions take them.
            if version >= "2026-10-21" and isinstance(body, dict):
                for name in SAMPLING_PARAMS:
                    if name in body:
                        return _error(api, 400, f"{name}: Extra inputs are not permitted")
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
            return _malformed()
        if item in ("timeout", "reset"):
            raise _Drop(str(item))
        if isinstance(item, Forced):
            return _error(api, item.status, item.message, dict(item.headers))
        assert isinstance(item, int)
        headers = {"retry-after": _fmt_seconds(self.config.retry_after_s)} if item == 429 else {}
        return _error(api, item, None, headers)

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
                return _error(api, 401, what)
            return None
        if expected is None or bearer == expected:
            return None
        return _error(api, 401, "Incorrect API key provided.")

    def _check_rps(self, api: Api) -> web.Response | None:
        if self.config.max_rps is None:
            return None
        second = int(self._clock())
        if second != self._window_second:
            self._window_second = second
            self._window_count = 0
        self._window_count += 1
        if self._window_count > self.config.max_rps:
            return _error(api, 429, "Too many requests per second.", {"retry-after": "1"})
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
                    return _error(api, 429, None, {"retry-after": _fmt_seconds(c.retry_after_s)})
                if outcome == "malformed":
                    return _malformed()
                if outcome == "reset":
                    raise _Drop("reset")
                assert isinstance(outcome, int)
                return _error(api, outcome, None)
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
        if max_tokens is not None and _tokens(len(text)) > max_tokens:
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
        problem = _check_anthropic_body(body)
        if problem is not None:
            return _error("anthropic", 400, problem)
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
                last_user = _block_text(content)
        total_chars = sum(len(text) for _, text in segments)
        prefix_chars = read_chars = 0
        if breakpoints:
            prefix_chars = sum(len(text) for _, text in segments[: breakpoints[-1]])
            for end in breakpoints:  # remember every prefix; keep the longest one seen before
                if self._seen("anthropic", segments[:end]):
                    read_chars = sum(len(text) for _, text in segments[:end])
        cache_read = _tokens(read_chars)
        cache_write = _tokens(prefix_chars) - cache_read
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
                    "input_tokens": _tokens(total_chars - prefix_chars),
                    "output_tokens": _tokens(len(text)),
                    "cache_read_input_tokens": cache_read,
                    "cache_creation_input_tokens": cache_write,
                },
            }
        )

    def _openai_reply(self, body: Any) -> web.Response:
        problem = _check_openai_body(body)
        if problem is not None:
            return _error("openai", 400, problem)
        messages = body["messages"]
        segments = [(str(m["role"]), _block_text(m.get("content"))) for m in messages]
        last_user = next(
            (_block_text(m.get("content")) for m in reversed(messages) if m["role"] == "user"), ""
        )
        # OpenAI caches prompt prefixes by itself; report everything before the last message as
        # cached when it was seen before.
        cached = 0
        if len(segments) > 1 and self._seen("openai", segments[:-1]):
            cached = _tokens(sum(len(text) for _, text in segments[:-1]))
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        text, cut = self._reply(last_user, max_tokens if isinstance(max_tokens, int) else None)
        prompt_tokens = _tokens(sum(len(text) for _, text in segments))
        completion_tokens = _tokens(len(text))
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


# -- bodies and errors in each provider's shape ----------------------------------------------------


def _check_anthropic_body(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: field required"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: field required, an integer of at least 1"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        return "system: must be a string or a list of text blocks"
    if isinstance(system, list) and not all(isinstance(b, dict) for b in system):
        return "system: must be a list of text blocks"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: must be 'user' or 'assistant'"
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(b, dict) for b in content):
                return f"messages.{i}.content: must be a list of content blocks"
        elif not isinstance(content, str):
            return f"messages.{i}.content: must be a string or a list of content blocks"
    return None


def _check_openai_body(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: a non-empty array is required"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"messages[{i}]: each message needs a role"
    return None


_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_OPENAI_TYPES: Final = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_DEFAULT_MESSAGES: Final = {
    400: "Invalid request.",
    401: "Invalid API key.",
    403: "Permission denied.",
    404: "Not found.",
    408: "Request timed out.",
    413: "Request too large.",
    429: "Rate limit exceeded.",
    500: "Internal server error.",
    502: "Bad gateway.",
    503: "Service unavailable.",
    504: "Gateway timeout.",
    529: "Overloaded.",
}


def _error(api: Api, status: int, message: str | None, headers: dict[str, str] | None = None) -> web.Response:
    text = message or _DEFAULT_MESSAGES.get(status, f"Error {status}.")
    body: dict[str, Any]
    if api == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        body = {"type": "error", "error": {"type": kind, "message": text}}
    else:
        kind, code = _OPENAI_TYPES.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None)
        )
        body = {"error": {"message": text, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _malformed() -> web.Response:
    # What a truncating proxy produces: says JSON, is not.
    return web.Response(status=200, text='{"id": "msg_trunc', content_type="application/json")


def _fmt_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


# -- blocking entry point --------------------------------------------------------------------------


def run(host: str, port: int, config: FakeProviderConfig | None = None) -> None:
    """Serve until SIGINT or SIGTERM; print one line with the address once listening."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with FakeProvider(config, host=host, port=port) as fp:
            print(f"fake-provider listening on {fp.base_url}", flush=True)
            await stop.wait()

    asyncio.run(serve())


# -- rlmq fake-provider ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--api-key", default=None, help="the key clients must send (default: any)")
    parser.add_argument("--latency-s", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument(
        "--reply", default=None, help="fixed reply text (default: echo the last user message)"
    )
    parser.add_argument(
        "--rate-limit-fraction", type=float, default=0.0, help="share of 429s with retry-after"
    )
    parser.add_argument("--retry-after-s", type=float, default=1.0, help="retry-after sent with 429s")
    parser.add_argument("--server-error-fraction", type=float, default=0.0, help="share of 500s")
    parser.add_argument("--overloaded-fraction", type=float, default=0.0, help="share of 529 overloaded")
    parser.add_argument("--malformed-fraction", type=float, default=0.0, help="share of non-JSON 200s")
    parser.add_argument("--reset-fraction", type=float, default=0.0, help="share of dropped connections")
    parser.add_argument("--max-rps", type=int, default=None, help="requests per second before 429s")
    parser.add_argument("--seed", type=int, default=None, help="seed for the random faults")


def main(args: argparse.Namespace) -> int:
    config = FakeProviderConfig(
        api_key=args.api_key,
        latency_s=args.latency_s,
        reply_text=args.reply,
        rate_limit_fraction=args.rate_limit_fraction,
        retry_after_s=args.retry_after_s,
        server_error_fraction=args.server_error_fraction,
        overloaded_fraction=args.overloaded_fraction,
        malformed_fraction=args.malformed_fraction,
        reset_fraction=args.reset_fraction,
        max_rps=args.max_rps,
        seed=args.seed,
    )
    try:
        run(args.host, args.port, config)
    except OSError as exc:
        print(f"fake-provider cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0
