"""``rlmq up``: a handler and a sandbox pool on this machine, in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from .errors import ServiceError
from .local import local_services

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="rlmq.toml", help="TOML with [models.*] (default: %(default)s)")
    parser.add_argument(
        "--handler-bind", default="tcp://127.0.0.1:5555", help="handler address (default: %(default)s)"
    )
    parser.add_argument(
        "--sandbox-bind", default="tcp://127.0.0.1:5556", help="pool address (default: %(default)s)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="warm sandbox workers (default: the pool's)"
    )


async def _main(args: argparse.Namespace) -> int:
    async with local_services(
        args.config, workers=args.workers, handler_bind=args.handler_bind, sandbox_bind=args.sandbox_bind
    ) as services:
        print(f"rlmq up: handler on {services.handler}, sandbox on {services.sandbox}", flush=True)
        print(
            f"  ask: rlmq run --handler {services.handler} --sandbox {services.sandbox} "
            "--query '...' --context FILE",
            file=sys.stderr,
        )
        print(f"  logs: {services.directory}/handler.log, {services.directory}/sandbox.log", file=sys.stderr)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
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
