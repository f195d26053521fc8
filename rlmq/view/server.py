"""The viewer's HTTP server: the page, and the trajectory's events as the file grows.

``GET /`` is the page; ``GET /events?offset=N&gen=G&wait=S`` answers the whole lines of the file
from byte ``N`` on, as they are (JSON lines), with headers ``X-Rlmq-Offset`` (where to ask from
next), ``X-Rlmq-Generation`` (which file that offset is in: send it back as ``gen``),
``X-Rlmq-Reset: 1`` (the file was rewritten, shorter or with another first line or inode than
``gen`` names: the lines start at 0), ``X-Rlmq-More: 1`` (cut at the size limit: ask again at
once) and ``X-Rlmq-Exists``. When nothing new is there it holds the request up to ``wait``
seconds (long poll), so a page follows a live run without busy asking.
Only loopback Host headers are served, so a web page elsewhere cannot read a trajectory through
DNS rebinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web

from .page import render_page
from .tail import DEFAULT_CHUNK_BYTES, read_lines

__all__ = ["MAX_WAIT_S", "ViewServer", "make_app", "serving"]

MAX_WAIT_S = 25.0  # a held request answers before proxies and browsers give up on it
POLL_S = 0.2  # how often a held request looks at the file: a file has no event to wait on
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})

PATH: web.AppKey[Path] = web.AppKey("path", Path)
CHUNK: web.AppKey[int] = web.AppKey("chunk", int)
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing", asyncio.Event)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _loopback_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    host = request.host if request.host.endswith("]") else request.host.rsplit(":", 1)[0]
    if host not in LOOPBACK_HOSTS:
        raise web.HTTPForbidden(text="rlmq view answers only to 127.0.0.1 and localhost")
    return await handler(request)


def _float(value: str | None, default: float, name: str) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):  # inf reaches int() as an OverflowError, nan holds a wait forever
        raise web.HTTPBadRequest(text=f"{name} must be a finite number, not {value!r}")
    return number


async def _page(request: web.Request) -> web.Response:
    page = render_page(title=request.app[PATH].name)
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


async def _events(request: web.Request) -> web.Response:
    offset = int(_float(request.query.get("offset"), 0, "offset"))
    if offset < 0:
        raise web.HTTPBadRequest(text="offset must be >= 0")
    wait_s = min(max(_float(request.query.get("wait"), 0.0, "wait"), 0.0), MAX_WAIT_S)
    generation = request.query.get("gen") or None
    path, chunk_bytes, closing = request.app[PATH], request.app[CHUNK], request.app[CLOSING]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        lines = await asyncio.to_thread(
            read_lines, path, offset, max_bytes=chunk_bytes, generation=generation
        )
        if lines.data or lines.reset or closing.is_set() or loop.time() >= deadline:
            break
        with contextlib.suppress(TimeoutError):  # timing out is the normal case: look at the file again
            await asyncio.wait_for(closing.wait(), POLL_S)
    # The lines go as they are in the file: the page parses them (no parse and re-encode here).
    return web.Response(
        body=lines.data,
        content_type="application/x-ndjson",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            "X-Rlmq-Offset": str(lines.offset),
            "X-Rlmq-Generation": lines.generation,
            "X-Rlmq-Size": str(lines.size),
            "X-Rlmq-Reset": "1" if lines.reset else "0",
            "X-Rlmq-More": "1" if lines.more else "0",
            "X-Rlmq-Exists": "1" if lines.exists else "0",
        },
    )


async def _on_startup(app: web.Application) -> None:
    app[CLOSING] = asyncio.Event()  # made here, on the loop that serves


async def _on_shutdown(app: web.Application) -> None:
    app[CLOSING].set()  # held requests answer now, instead of holding the shutdown up


def make_app(path: str | Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> web.Application:
    """The viewer's application for one trajectory file."""
    app = web.Application(middlewares=[_loopback_only])
    app[PATH] = Path(path)
    app[CHUNK] = chunk_bytes
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/", _page)
    app.router.add_get("/events", _events)
    return app


class ViewServer:
    """The viewer on 127.0.0.1 inside a running event loop; ``port=0`` takes a free port."""

    def __init__(self, path: str | Path, *, port: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.path = Path(path)
        self.port = port
        self._app = make_app(path, chunk_bytes=chunk_bytes)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> str:
        # Bind first, so port 0 becomes a real free port before anything is printed.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        # Held requests end when the server stops instead of keeping it up for their wait.
        self._runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.contextmanager
def serving(path: str | Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[str]:
    """The viewer in a thread of its own for as long as the block runs: yields its URL.

    For tests and scripts that drive a browser from blocking code.
    """
    loop = asyncio.new_event_loop()
    server = ViewServer(path, chunk_bytes=chunk_bytes)
    thread = threading.Thread(target=loop.run_forever, name="rlmq-view", daemon=True)
    thread.start()
    try:
        url = asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
        yield url
    finally:
        try:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
