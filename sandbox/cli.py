"""``rlmq sandbox``: run a sandbox pool in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from rlmq.protocol import RlmqError, tracing
from rlmq.protocol.hostport import add_metrics_bind, bind_error
from rlmq.protocol.security import CurveError, client_keys_from_env, server_keys_from_env

from .config import ConfigError, build_config, load_table
from .pool import Pool

__all__ = ["add_arguments", "main"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--handler",
        default=None,
        help="address of the LM handler (required), e.g. tcp://127.0.0.1:5555 or "
        "ipc:///run/rlmq/handler.sock; workers' sub-calls reach it only through the pool's stamping relay. "
        "Several handlers of one front (the same [state] url) go comma-separated, "
        "tcp://a:5555,tcp://b:5555: sub-calls are spread over the handlers that are up, and a call whose "
        "handler went away is sent again to another (docs/deployment.md, 'Several handlers')",
    )
    parser.add_argument(
        "--bind",
        default=None,
        help="address to listen on (default: [sandbox] bind, else tcp://127.0.0.1:5556); "
        "port 0 picks a free port",
    )
    parser.add_argument("--workers", type=int, default=None, help="warm workers kept ready (default: 2)")
    parser.add_argument(
        "--config", default=None, help="TOML file whose optional [sandbox] table sets PoolConfig fields"
    )
    parser.add_argument(
        "--isolation",
        choices=("process", "bwrap"),
        default=None,
        help="process (default): each worker a process of its own, run as a uid of its own with its own "
        "network namespace when the pool runs as root; bwrap: each worker also inside bubblewrap "
        "(a private view of the filesystem). [sandbox] network = true gives workers the network "
        "back. docs/security.md says what each level stops",
    )
    add_metrics_bind(parser)
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        default=None,
        help="export OpenTelemetry spans over OTLP/HTTP to URL, e.g. http://127.0.0.1:4318 (sub-calls "
        "carry the exec's trace to the handler either way); needs pip install 'rlmq[otel]'. Default: off",
    )


async def _serve(pool: Pool, metrics_bind: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = None
    try:
        await pool.start()
        if metrics_bind is not None:
            from .metrics import start_metrics  # prometheus-client and aiohttp only when asked for

            metrics = await start_metrics(pool, metrics_bind)
            print(f"sandbox metrics on {metrics.url}", flush=True)
        waiter = asyncio.ensure_future(stop.wait())
        ready = asyncio.ensure_future(pool.wait_ready())
        await asyncio.wait({waiter, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            ready.result()  # raises if the warm workers could not start
            # The one line scripts wait for: bound, and the warm workers are ready.
            print(f"sandbox ready on {pool.address}", flush=True)
            await waiter
        else:
            ready.cancel()
        log.info("signal received, shutting down")
    finally:
        if metrics is not None:
            await metrics.stop()
        await pool.stop()


def main(args: argparse.Namespace) -> int:
    bad_bind = bind_error(args.metrics_bind)
    if bad_bind is not None:
        log.error("%s", bad_bind)
        return 2
    try:
        table = load_table(args.config) if args.config else {}
        config = build_config(
            table,
            source=args.config or "<flags>",
            handler=args.handler,
            bind=args.bind,
            workers=args.workers,
            isolation=getattr(args, "isolation", None),
        )
        # Keys are secrets: they come from the environment (or files it names), never flags.
        pool = Pool(
            config,
            curve_server=server_keys_from_env(os.environ),
            curve_client=client_keys_from_env(os.environ),
        )
    except (ConfigError, CurveError) as exc:
        log.error("%s", exc.message)
        return 2
    try:
        if args.otlp_endpoint is not None:
            tracing.configure(service="rlmq-sandbox", endpoint=args.otlp_endpoint)
        asyncio.run(_serve(pool, args.metrics_bind))
    except ConfigError as exc:  # --otlp-endpoint
        log.error("%s", exc.message)
        return 2
    except RlmqError as exc:
        log.error("the sandbox pool failed: %s", exc.message)
        return 1
    except OSError as exc:
        log.error("cannot start the sandbox pool on %s: %s", config.bind, exc)
        return 1
    finally:
        tracing.shutdown()  # sends the spans still batched
    return 0
