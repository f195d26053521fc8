"""``rlmq serve``: an OpenAI-compatible HTTP endpoint in front of RLM runs.

Starts private services from the config (or uses ``--handler``/``--sandbox``), then listens; logs
``rlmq serve ready on http://HOST:PORT`` on stdout when it takes requests. SIGINT or SIGTERM:
stop listening, give runs in flight ``shutdown_grace_s``, cancel the rest, stop the services.
Exit status: 0 after a clean stop, 2 on a bad config, 1 when the services do not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

from aiohttp import web

from rlmq.facade import RLM
from rlmq.protocol import ConfigError, RlmqError
from rlmq.protocol.security import CurveClientKeys, client_keys_from_env

from .app import make_app
from .settings import ServeConfig, load_serve_config

__all__ = ["add_arguments", "main"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("rlmq.serve.access")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Endpoints: POST /v1/chat/completions (stream: true for server-sent events with progress) and "
        "GET /v1/models. The request's model names a profile ([serve.profiles.NAME], default rlm); the "
        "last user message is the question, earlier messages or an extra 'context' field the context. "
        "Bearer keys: [serve] api_keys / api_keys_env (none: open, allowed only on loopback); bodies over "
        "[serve] max_body_bytes get 413. docs/serve.md has it all."
    )
    parser.add_argument(
        "--config", default="rlmq.toml", help="TOML with [models.*], [run] and [serve] (default: %(default)s)"
    )
    parser.add_argument("--bind", help="HOST:PORT to listen on (default: [serve] bind, or 127.0.0.1:8080)")
    parser.add_argument("--handler", help="address of a running handler (default: start a private one)")
    parser.add_argument("--sandbox", help="address of a running sandbox pool (default: start a private one)")
    parser.add_argument(
        "--data-dir", help='folder {"path": ...} contexts are read from (default: [serve] data_dir)'
    )


def _rlm(config: ServeConfig, args: argparse.Namespace, curve: CurveClientKeys | None) -> RLM:
    trajectories = config.settings.trajectory_dir or None
    if args.handler and args.sandbox:
        return RLM.connect(
            handler=args.handler,
            sandbox=args.sandbox,
            config=args.config,
            curve=curve,
            trajectory_dir=trajectories,
        )
    if args.handler or args.sandbox:
        raise ConfigError("give both --handler and --sandbox, or neither (private services)")
    return RLM.from_config(args.config, trajectory_dir=trajectories)


@contextlib.contextmanager
def _stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Iterator[None]:
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _serve(config: ServeConfig, args: argparse.Namespace, curve: CurveClientKeys | None) -> int:
    stop = asyncio.Event()
    with _stop_signals(asyncio.get_running_loop(), stop):
        async with _rlm(config, args, curve) as rlm:
            await rlm.astart()  # services up before we listen: ready means ready
            profiles = {name: rlm.with_options(**options) for name, options in config.profiles.items()}
            runner = web.AppRunner(
                make_app(config, profiles),
                handler_cancellation=True,  # a client that goes away cancels its run
                shutdown_timeout=config.settings.shutdown_grace_s,
                access_log=access_log if access_log.isEnabledFor(logging.INFO) else None,
            )
            await runner.setup()
            try:
                site = web.TCPSite(runner, config.host, config.port)
                await site.start()
                host, port = runner.addresses[0][:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"rlmq serve ready on http://{shown}:{port}", flush=True)
                log.info(
                    "serving %s (profiles: %s; %s)",
                    config.source,
                    ", ".join(profiles),
                    "open access, loopback" if config.open_access else f"{len(config.keys)} key(s)",
                )
                await stop.wait()
                log.info("stopping: %.0f s for runs in flight", config.settings.shutdown_grace_s)
            finally:
                await runner.cleanup()
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        # The environment is read here, at the entry point: the keys' variable and CURVE keys.
        config = load_serve_config(args.config, bind=args.bind, data_dir=args.data_dir, env=os.environ)
        curve = client_keys_from_env(os.environ)
        return asyncio.run(_serve(config, args, curve))
    except ConfigError as exc:
        print(f"rlmq serve: {exc.message}", file=sys.stderr)
        return 2
    except RlmqError as exc:
        print(f"rlmq serve: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:  # the address is taken, or not ours to bind
        print(f"rlmq serve: cannot listen on {args.bind or 'the configured address'}: {exc}", file=sys.stderr)
        return 1
