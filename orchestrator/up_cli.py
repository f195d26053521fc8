"""``rlmq up``: handlers and a sandbox pool on this machine, in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ServiceError
from .local import STATE_URL_ENV, LocalServices, local_services

__all__ = ["add_arguments", "main"]

DEFAULT_HANDLER_BIND = "tcp://127.0.0.1:5555"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="rlmq.toml", help="TOML with [models.*] (default: %(default)s)")
    parser.add_argument(
        "--handlers",
        type=_positive,
        default=None,
        metavar="N",
        help="handler processes sharing one state (default: one per --handler-bind, else 1). With N > 1 "
        "they share $RLMQ_STATE_URL or the config's [state] url, else a private redis-server (Debian's "
        "redis-server package) on a random loopback port, without persistence, stopped with the rest "
        "and given to the handlers as RLMQ_STATE_URL (the config is not changed)",
    )
    parser.add_argument(
        "--handler-bind",
        action="append",
        default=None,
        metavar="ADDR",
        help=f"a handler's address; repeat for each handler (default: {DEFAULT_HANDLER_BIND}). "
        "Handlers without one get the first's next free ports (tcp; port 0: a random port each) "
        "or a -N suffix (ipc)",
    )
    parser.add_argument(
        "--sandbox-bind", default="tcp://127.0.0.1:5556", help="pool address (default: %(default)s)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="warm sandbox workers (default: the pool's)"
    )


def _redacted(url: str | None) -> str:
    """A Redis url fit for stdout: its password starred out."""
    parts = urlsplit(url or "")
    if parts.password is None:
        return url or ""
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def _announce(services: LocalServices) -> None:
    """Every address on stdout, the line with all of them last (scripts wait for it)."""
    several = len(services.handlers) > 1
    if several:
        for i, address in enumerate(services.handlers, start=1):
            print(f"rlmq up: handler {i} on {address}", flush=True)
        if services.private_redis:
            kind = "a private redis-server, stopped with the rest"
        else:
            kind = STATE_URL_ENV if os.environ.get(STATE_URL_ENV) else "[state] url"
        print(f"rlmq up: shared state on {_redacted(services.state_url)} ({kind})", flush=True)
    print(f"rlmq up: handler on {services.handler}, sandbox on {services.sandbox}", flush=True)
    print(
        f"  ask: rlmq run --handler {services.handler} --sandbox {services.sandbox} "
        "--query '...' --context FILE",
        file=sys.stderr,
    )
    logs = [f"handler-{i}.log" for i in range(1, len(services.handlers) + 1)] if several else ["handler.log"]
    logs += ["sandbox.log"] + (["redis.log"] if services.private_redis else [])
    print(f"  logs: {', '.join(f'{services.directory}/{name}' for name in logs)}", file=sys.stderr)


async def _main(args: argparse.Namespace) -> int:
    binds = args.handler_bind or [DEFAULT_HANDLER_BIND]
    count = args.handlers if args.handlers is not None else len(args.handler_bind or ()) or 1
    # Signals are ours from the start: one during start-up stops everything once it is up, so
    # no child (each in its own session) is left behind.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with local_services(
        args.config,
        workers=args.workers,
        handler_bind=binds,
        sandbox_bind=args.sandbox_bind,
        handlers=count,
    ) as services:
        _announce(services)
        await stop.wait()
        print("rlmq up: stopping", file=sys.stderr)
    return 0


def main(args: argparse.Namespace) -> int:
    if not Path(args.config).exists():
        print(f"rlmq up: no config file {args.config}; see README for [models.*]", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_main(args))
    except ServiceError as exc:
        print(f"rlmq up: {exc.message}", file=sys.stderr)
        return 1
