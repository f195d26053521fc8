"""``rlmq fake-provider``: serve both provider APIs on a local port until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from .server import FakeProvider, FakeProviderConfig

__all__ = ["add_arguments", "main", "run"]


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
