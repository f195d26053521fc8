"""``rlmq replay RUN.jsonl``: run a recorded trajectory again offline and say where it diverges.

Root responses and sub-call answers come from the recording (no model is called); the code runs
again in a real sandbox session (a pool given by ``--sandbox``, or a private one started from
``--config``). Exit status: 0 when the replay matched the recording, 1 when it diverged (the
first difference is printed), 2 on bad arguments or an unreadable trajectory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from rlmq.protocol import ConfigError, RlmqError
from rlmq.protocol.security import CurveClientKeys, client_keys_from_env

from .contexts import load_context
from .errors import ContextError, NoServices
from .local import services_or_private
from .replay import Recording, ReplayReport
from .runner import replay_recording
from .trajectory import Trajectory, TrajectoryError

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trajectory", metavar="RUN.jsonl", help="a trajectory written by rlmq run (schema 2)")
    parser.add_argument(
        "--context",
        "-c",
        help="the run's context (default: the context_path the trajectory recorded)",
    )
    parser.add_argument(
        "--config",
        default="rlmq.toml",
        help="TOML to start a private pool (and handler) with, when --sandbox is not given "
        "(default: %(default)s); no model is called",
    )
    parser.add_argument(
        "--handler", help="address of a running handler (only for starting nothing privately)"
    )
    parser.add_argument("--sandbox", help="address of a running sandbox pool (default: start a private one)")
    parser.add_argument(
        "--out", help="write the replay's own trajectory here (default: a temporary file, removed)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with the verdict")


async def _replay(args: argparse.Namespace, curve: CurveClientKeys | None, out: Path) -> ReplayReport:
    recording = Recording.load(args.trajectory)
    source = args.context or recording.start.get("context_path")
    if not source:
        raise ContextError("give --context: the trajectory does not say where its context was read from")
    context = load_context(source)
    trajectory = Trajectory(out)
    try:
        if args.sandbox:
            return await replay_recording(
                recording, context, sandbox=args.sandbox, trajectory=trajectory, curve=curve
            )
        async with services_or_private(args.handler, args.sandbox, args.config, guide="README") as (
            _,
            sandbox,
        ):
            return await replay_recording(
                recording, context, sandbox=sandbox, trajectory=trajectory, curve=curve
            )
    finally:
        trajectory.close()


def _print(args: argparse.Namespace, report: ReplayReport) -> None:
    result = report.result
    if args.json:
        print(
            json.dumps(
                {
                    "matched": report.matched,
                    "divergence": None if report.divergence is None else report.divergence.to_wire(),
                    "answer": result.answer,
                    "recorded_answer": report.recorded_answer,
                    "stop_reason": result.stop_reason,
                    "iterations": result.iterations,
                    "model_calls_replayed": report.model_calls,
                    "sub_calls_replayed": report.sub_calls,
                },
                ensure_ascii=False,
            )
        )
    elif report.divergence is None:
        print(
            f"replay matched: {result.iterations} iterations, {report.model_calls} model calls and "
            f"{report.sub_calls} sub-calls served from the recording; answer: {result.answer}"
        )
    else:
        print(f"replay diverged at {report.divergence}")


def main(args: argparse.Namespace) -> int:
    try:
        curve = client_keys_from_env(os.environ)
        with tempfile.TemporaryDirectory(prefix="rlmq-replay-") as tmp:
            out = Path(args.out) if args.out else Path(tmp) / "replay.jsonl"
            report = asyncio.run(_replay(args, curve, out))
    except (ConfigError, ContextError, NoServices, TrajectoryError) as exc:
        print(f"rlmq replay: {exc.message}", file=sys.stderr)
        return 2
    except RlmqError as exc:
        print(f"rlmq replay: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rlmq replay: interrupted", file=sys.stderr)
        return 130
    _print(args, report)
    return 0 if report.matched else 1
