"""``rlmq replay RUN.jsonl``: run a recorded trajectory again offline and say where it diverges.

Root responses and sub-call answers come from the recording (no model is called); the code runs
again in a real sandbox session (a pool given by ``--sandbox``, or a private one started from
``--config``, else ``rlmq.toml``, else a built-in offline config: echo models under the aliases
the recording used). Exit status: 0 when the replay matched the recording, 1 when it did not (the
first difference, or where a cut or incomplete recording stops the check, is printed), 2 on bad
arguments or an unreadable trajectory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from rlmq.protocol import ConfigError, RlmqError
from rlmq.protocol.security import CurveClientKeys, client_keys_from_env

from .contexts import load_context
from .errors import ContextError, NoServices
from .local import services_or_private
from .replay import Recording, ReplayReport
from .runner import replay_recording
from .trajectory import Trajectory, TrajectoryError

__all__ = ["add_arguments", "main", "offline_config"]

DEFAULT_CONFIG = "rlmq.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trajectory", metavar="RUN.jsonl", help="a trajectory written by rlmq run (schema 2)")
    parser.add_argument(
        "--context",
        "-c",
        help="the run's context (default: the context_path the trajectory recorded)",
    )
    parser.add_argument(
        "--config",
        help=f"TOML to start the private pool (and the handler it is wired to) with, when --sandbox is "
        f"not given (default: {DEFAULT_CONFIG} if there is one, else a built-in offline config of echo "
        "models under the aliases the recording used). No model is called either way",
    )
    parser.add_argument(
        "--handler",
        help="address(es) of a running handler for the private pool to be wired to, instead of a "
        "private handler: a comma-separated list for several handlers of one front. Not needed: "
        "replay sends no model call; unused with --sandbox",
    )
    parser.add_argument(
        "--sandbox",
        help="address of a running sandbox pool to execute the code in (default: start a private one)",
    )
    parser.add_argument(
        "--out", help="write the replay's own trajectory here (default: a temporary file, removed)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with the verdict")


def offline_config(recording: Recording) -> str:
    """A config for the private services of a replay: an echo model under every alias the
    recording names (its settings, model calls and sub-calls). None of them is called: the pool
    answers sub-calls from the recording, the root responses come from the file."""
    aliases: dict[str, None] = {}
    for name in ("root_model", "sub_model"):
        value = recording.settings.get(name)
        aliases.setdefault(value if isinstance(value, str) and value else name.split("_")[0], None)
    for e in recording.events:
        model = e.get("model")
        if e.get("event") in ("model_call", "sub_call") and isinstance(model, str) and model:
            aliases.setdefault(model, None)
    lines = ["# Built in by `rlmq replay`: no model is called; these only let the services start."]
    for alias in aliases:
        lines += [f"[models.{json.dumps(alias)}]", 'backend = "echo"', ""]
    return "\n".join(lines)


def _config(args: argparse.Namespace, recording: Recording, directory: Path) -> str:
    """The config for private services: --config, else rlmq.toml here, else a built-in one."""
    if args.config:
        return str(args.config)
    if Path(DEFAULT_CONFIG).exists():
        return DEFAULT_CONFIG
    path = directory / "offline.toml"
    path.write_text(offline_config(recording), encoding="utf-8")
    print(
        f"rlmq replay: no --config and no {DEFAULT_CONFIG} here: starting private services with a "
        "built-in offline config (echo models; none is called)",
        file=sys.stderr,
    )
    return str(path)


async def _replay(
    args: argparse.Namespace, curve: CurveClientKeys | None, out: Path, directory: Path
) -> ReplayReport:
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
        config = _config(args, recording, directory)
        async with services_or_private(args.handler, args.sandbox, config, guide="README") as (
            _,
            sandbox,
        ):
            return await replay_recording(
                recording, context, sandbox=sandbox, trajectory=trajectory, curve=curve
            )
    finally:
        trajectory.close()


_VERDICT: dict[str, Any] = {
    "differs": "replay diverged at",
    "recording_ends": "replay reached the end of a cut recording (everything before matched) at",
    "incomplete": "replay cannot check an incomplete recording (everything before matched) at",
}


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
        print(f"{_VERDICT.get(report.divergence.kind, _VERDICT['differs'])} {report.divergence}")


def main(args: argparse.Namespace) -> int:
    try:
        curve = client_keys_from_env(os.environ)
        with tempfile.TemporaryDirectory(prefix="rlmq-replay-") as tmp:
            out = Path(args.out) if args.out else Path(tmp) / "replay.jsonl"
            report = asyncio.run(_replay(args, curve, out, Path(tmp)))
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
