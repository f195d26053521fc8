"""``rlmq loadtest``: the command's flags, and its entry point, the one place that reads the environment."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from rlmq.protocol import RlmqError
from rlmq.protocol.security import client_keys_from_env

from .driver import run_load
from .report import format_report
from .spawn import (
    RELAY_KEY,
    RELAY_KEY_ENV,
    FakeProviderProcess,
    SpawnedHandler,
    echo_config,
    relay_config,
    spawn_fake_provider,
    spawn_handler,
)
from .spec import OPEN_LOOP_CAP, LoadSpec, check_spec

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--connect",
        metavar="ADDR",
        help="the handler to drive, e.g. tcp://127.0.0.1:5555; several, comma-separated (A,B,C), "
        "share the load (client processes spread over them) and are reported each and in total",
    )
    target.add_argument(
        "--spawn",
        action="store_true",
        help="start a private handler with an `echo` model for the test, and stop it afterwards",
    )
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--requests", "-n", type=int, default=None, help="requests to send (default 10000)")
    bound.add_argument("--duration", type=float, default=None, metavar="S", help="send for S seconds")
    parser.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=None,
        help="requests in flight (closed loop, default 64); with --rate, the cap on requests "
        "outstanding (default 100000)",
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="open loop: requests per second, on a fixed schedule"
    )
    parser.add_argument(
        "--model", default=None, help="model alias to call (default: echo with --spawn, else root)"
    )
    parser.add_argument(
        "--prompt-bytes", type=int, default=16, help="size of each prompt in bytes (default: %(default)s)"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens of each request")
    parser.add_argument(
        "--processes", type=int, default=None, help="client processes (default: one per core, at least 2)"
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="a reply not back within this many seconds counts as client_timeout (default: %(default)s)",
    )
    run = parser.add_mutually_exclusive_group()
    run.add_argument(
        "--run",
        default=None,
        help="account every request to this run id, which must already be open on the handler "
        "(a handler refuses runs it does not hold with unknown_run); default: a run the load test opens",
    )
    run.add_argument("--no-run", action="store_true", help="send requests without a run (no budget checks)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="with --spawn: the model's latency, echo or fake provider (default: %(default)s)",
    )
    parser.add_argument(
        "--provider",
        choices=("anthropic", "openai"),
        default=None,
        help="with --spawn: also start `rlmq fake-provider` and relay to it over HTTP through this "
        "backend, measuring the whole path client -> handler -> HTTP -> provider",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def main(args: argparse.Namespace) -> int:
    """Run the command. The environment is read here, once, and handed to what needs it."""
    env = os.environ
    requests = args.requests if args.requests is not None else (None if args.duration else 10_000)
    spec = LoadSpec(
        address=args.connect or "",
        requests=requests,
        duration_s=args.duration,
        concurrency=args.concurrency
        if args.concurrency is not None
        else (OPEN_LOOP_CAP if args.rate else 64),
        rate=args.rate,
        model=args.model or ("echo" if args.spawn else "root"),
        prompt_bytes=args.prompt_bytes,
        processes=args.processes,
        timeout_s=args.timeout_s,
        max_tokens=args.max_tokens,
        run=args.run,
    )
    progress = sys.stderr if sys.stderr.isatty() and not args.json else None
    spawned: SpawnedHandler | None = None
    provider: FakeProviderProcess | None = None
    if args.provider and not args.spawn:
        print("rlmq loadtest: --provider goes with --spawn", file=sys.stderr)
        return 2
    try:
        # A handler with CURVE keys needs ours: from the environment, like every rlmq client.
        spec = dataclasses.replace(spec, curve=client_keys_from_env(env))
        check_spec(spec)  # before a handler is started for nothing
        if args.spawn and args.provider:
            provider = spawn_fake_provider(args.latency_ms / 1000.0, env=env)
            config = relay_config(
                args.provider, provider.base_url, alias=spec.model, concurrency=spec.concurrency
            )
            spawned = spawn_handler(config, env={**env, RELAY_KEY_ENV: RELAY_KEY})
            spec = dataclasses.replace(spec, address=spawned.address)
        elif args.spawn:
            spawned = spawn_handler(echo_config(args.latency_ms), env=env)
            spec = dataclasses.replace(spec, address=spawned.address)
        report = run_load(spec, env=env, progress=progress, open_run=not args.no_run and args.run is None)
    except RlmqError as exc:  # LoadtestError, CurveError, and a handler refusing the run
        print(f"rlmq loadtest: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rlmq loadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        if spawned is not None:
            code = spawned.stop()
            if code not in (0, None):
                print(f"rlmq loadtest: the spawned handler exited with {code}", file=sys.stderr)
        if provider is not None:
            provider.stop()
    report["spawned"] = args.spawn
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0
