"""``rlmq handler``: run the handler in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal

from rlmq.protocol import tracing
from rlmq.protocol.hostport import add_metrics_bind, bind_error
from rlmq.protocol.security import CurveError, server_keys_from_env

from .config import ConfigError, load_config
from .server import Handler

__all__ = ["add_arguments", "main"]

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="rlmq.toml",
        help="TOML file with [models.*] and optionally [state] (default: %(default)s); "
        "$RLMQ_STATE_URL, when set, overrides [state] url",
    )
    parser.add_argument(
        "--bind",
        action="append",
        default=None,
        help="address to listen on, e.g. tcp://127.0.0.1:5555 or ipc:///tmp/rlmq.sock "
        "(default: [handler] bind in the config, else tcp://127.0.0.1:5555); port 0 picks a free port; "
        "repeat to listen on several. TCP beyond loopback needs CURVE keys in the environment "
        "(RLMQ_CURVE_SERVER_SECRET and RLMQ_CURVE_CLIENTS, from `rlmq keys`)",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=None,
        help="seconds in-flight calls may finish after SIGTERM (default: 10)",
    )
    parser.add_argument(
        "--no-anonymous",
        action="store_true",
        help="serve only calls that name a run opened on this handler (the same as [handler] "
        "allow_anonymous = false; the default refuses them only when CURVE keys are set)",
    )
    add_metrics_bind(parser)
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        default=None,
        help="export OpenTelemetry spans (one rlmq.complete per call, a child of the caller's span) "
        "over OTLP/HTTP to URL, e.g. http://127.0.0.1:4318; needs pip install 'rlmq[otel]'. Default: off",
    )


async def _serve(handler: Handler, metrics_bind: str | None = None) -> None:
    await handler.start()
    metrics = None
    try:
        if metrics_bind is not None:
            from .metrics import start_metrics  # prometheus-client and aiohttp only when asked for

            metrics = await start_metrics(handler, metrics_bind)
            print(f"lmhandler metrics on {metrics.url}", flush=True)
        # The one line scripts wait for: the address is final only after bind.
        print(f"lmhandler ready on {handler.address}", flush=True)
        for extra in handler.addresses[1:]:
            log.info("lmhandler also listening on %s", extra)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        if metrics is not None:
            await metrics.stop()
        await handler.stop()


def main(args: argparse.Namespace) -> int:
    bad_bind = bind_error(args.metrics_bind)
    if bad_bind is not None:
        log.error("%s", bad_bind)
        return 2
    try:
        config = load_config(args.config, env=os.environ)
    except ConfigError as exc:
        log.error("%s", exc.message)
        return 2
    if args.bind:
        config = dataclasses.replace(config, bind=args.bind[0], also_bind=tuple(args.bind[1:]))
    try:
        curve = server_keys_from_env(os.environ)
    except CurveError as exc:
        log.error("%s", exc.message)
        return 2
    if args.grace_s is not None:
        config = dataclasses.replace(config, shutdown_grace_s=args.grace_s)
    if args.no_anonymous:
        config = dataclasses.replace(config, allow_anonymous=False)
    try:
        if args.otlp_endpoint is not None:
            tracing.configure(service="rlmq-handler", endpoint=args.otlp_endpoint)
        handler = Handler(config, curve=curve)
        asyncio.run(_serve(handler, args.metrics_bind))
    except (ConfigError, CurveError) as exc:
        log.error("%s", exc.message)
        return 2
    except OSError as exc:
        log.error("cannot start the handler on %s: %s", config.bind, exc)
        return 1
    finally:
        tracing.shutdown()  # sends the spans still batched
    return 0
