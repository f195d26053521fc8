"""``rlmq run``: one RLM run from the command line.

Exit status: 0 with an answer (FINAL, or the best answer when the iteration limit was hit);
3 when a budget or the wall time stopped the run; 1 on errors; 2 on bad arguments or config.

``--resume RUN.jsonl`` continues a run that was cut (docs/trajectory.md, "Resume"). A run that
already ended (its ``run_end`` says so, for any reason but an error) is not run again: its
recorded answer is printed as the run printed it, with the same exit status (docs/orchestrator.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlmq.protocol import ConfigError, RlmqError, tracing
from rlmq.protocol.security import CurveClientKeys, client_keys_from_env

from .contexts import load_context
from .errors import ContextError, NoServices
from .local import services_or_private
from .loop import RunResult, StopReason, new_run_id
from .replay import Recording
from .runner import resume_run, run_query
from .settings import load_run_settings
from .trajectory import Trajectory, TrajectoryError

__all__ = ["add_arguments", "main"]

DEFAULT_RUNS_DIR = Path("rlmq-runs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query", "-q", help="the question to answer (with --resume: the recorded one)")
    parser.add_argument(
        "--context",
        "-c",
        help="a text file, a .json file (list or dict), a directory (dict of path to text), or - for stdin "
        "(with --resume: default the recorded context_path)",
    )
    parser.add_argument(
        "--config", default="rlmq.toml", help="TOML with [models.*] and optional [run] (default: %(default)s)"
    )
    parser.add_argument(
        "--handler",
        help="address of a running handler, or a comma-separated list of several handlers of one front "
        "(default: start a private one)",
    )
    parser.add_argument("--sandbox", help="address of a running sandbox pool (default: start a private one)")
    parser.add_argument(
        "--max-iterations", type=int, help="root-model turns before a forced answer (default 30)"
    )
    parser.add_argument(
        "--max-depth", type=int, help="recursion depth; 1 = llm_query only, no rlm_query (default 1)"
    )
    parser.add_argument("--wall-time-s", type=float, help="stop the run after this many seconds")
    parser.add_argument("--max-calls", type=int, help="model calls the run may make, sub-calls included")
    parser.add_argument(
        "--max-cost-usd", type=float, help="cost the run may spend (needs prices in the config)"
    )
    parser.add_argument("--max-input-tokens", type=int, help="input tokens the run may spend")
    parser.add_argument("--max-output-tokens", type=int, help="output tokens the run may spend")
    parser.add_argument("--root-model", help="model alias for the main loop (default root)")
    parser.add_argument("--sub-model", help="model alias for llm_query (default sub)")
    parser.add_argument(
        "--trajectory", help=f"JSON-lines trace of the run (default: {DEFAULT_RUNS_DIR}/RUN_ID.jsonl)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the bare answer"
    )
    parser.add_argument(
        "--record-chars",
        type=_record_chars,
        metavar="N|off",
        help="record each sub-call in the trajectory, prompts longer than N characters kept as head "
        "and tail (default 2000); off: record no sub-calls",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN.jsonl",
        help="continue a run that was cut: replay its trajectory (no model calls, no cost), rebuild "
        "the REPL by running its code again, then go on live under what is left of its budget, "
        "appending to the same file. Settings come from the recording. A run that already ended "
        "(except by an error) is not continued: its recorded answer is printed",
    )
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export OpenTelemetry spans (rlmq.run, rlmq.iteration, rlmq.exec) over OTLP/HTTP to URL "
        "(needs the otel extra); off by default",
    )


_OFF = -1  # --record-chars off, told apart from "not given"


def _record_chars(text: str) -> int:
    if text.strip().lower() in ("off", "none"):
        return _OFF
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of characters or off, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (or off)")
    return value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_iterations": args.max_iterations,
        "max_depth": args.max_depth,
        "wall_time_s": args.wall_time_s,
        "max_calls": args.max_calls,
        "max_cost_usd": args.max_cost_usd,
        "max_input_tokens": args.max_input_tokens,
        "max_output_tokens": args.max_output_tokens,
        "root_model": args.root_model,
        "sub_model": args.sub_model,
    }


def _with_record_chars(overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    given = getattr(args, "record_chars", None)
    if given is None:
        return overrides
    return {**overrides, "record_chars": None if given == _OFF else given}


def _context_path(given: str) -> str | None:
    return None if given == "-" else str(Path(given).resolve())


async def _resume(
    args: argparse.Namespace, curve: CurveClientKeys | None, recording: Recording
) -> tuple[RunResult, Path]:
    path = Path(args.resume)
    source = args.context or recording.start.get("context_path")
    if not source:
        raise ContextError("--resume needs --context: the recording does not say where its context was")
    if args.query is not None and args.query != recording.query:
        raise ContextError(
            "--query differs from the recorded question; a resumed run answers the recorded one"
        )
    context = load_context(source)
    resumes = sum(1 for e in recording.events if e.get("event") == "resume")
    run_id = f"{recording.run_id}-r{resumes + 1}"
    last_t = float(recording.events[-1].get("t", 0.0))
    trajectory = Trajectory(path, append=True, t_offset_s=last_t)
    try:
        async with services_or_private(args.handler, args.sandbox, args.config, guide="README") as (
            handler,
            sandbox,
        ):
            result = await resume_run(
                recording,
                context,
                handler=handler,
                sandbox=sandbox,
                trajectory=trajectory,
                run_id=run_id,
                curve=curve,
            )
    finally:
        trajectory.close()
    return result, path


async def _main(args: argparse.Namespace, curve: CurveClientKeys | None) -> int:
    if args.otlp_endpoint:
        tracing.configure(service="rlmq-run", endpoint=args.otlp_endpoint)
    try:
        return await _run_or_resume(args, curve)
    finally:
        tracing.shutdown()


async def _run_or_resume(args: argparse.Namespace, curve: CurveClientKeys | None) -> int:
    if args.resume:
        recording = Recording.load(args.resume)
        if recording.finished is not None:
            return _already_ended(args, recording.finished, Path(args.resume))
        result, path = await _resume(args, curve, recording)
        return _report(args, result, path)
    if args.query is None or args.context is None:
        raise ContextError("rlmq run needs --query and --context (or --resume RUN.jsonl)")
    settings = load_run_settings(args.config, _with_record_chars(_overrides(args), args))
    context = load_context(args.context)
    run_id = new_run_id()
    path = Path(args.trajectory) if args.trajectory else DEFAULT_RUNS_DIR / f"{run_id}.jsonl"
    trajectory = Trajectory(path)
    try:
        async with services_or_private(args.handler, args.sandbox, args.config, guide="README") as (
            handler,
            sandbox,
        ):
            result = await run_query(
                args.query,
                context,
                handler=handler,
                sandbox=sandbox,
                settings=settings,
                trajectory=trajectory,
                run_id=run_id,
                curve=curve,
                context_path=_context_path(args.context),
            )
    finally:
        trajectory.close()
    return _report(args, result, path)


def _exit_status(stop_reason: str | None, ok: bool) -> int:
    if stop_reason in (StopReason.BUDGET_EXCEEDED, StopReason.WALL_TIME):
        return 3
    return 0 if ok else 1


def _already_ended(args: argparse.Namespace, end: Mapping[str, Any], path: Path) -> int:
    """``--resume`` of a run that ended: nothing runs; the recorded end is reported as the run
    reported it (stdout, ``--json``, exit status), with a note on stderr."""
    stop_reason = end.get("stop_reason")
    answer = end.get("answer")
    answer = "" if answer is None else str(answer)
    if args.json:
        print(
            json.dumps(
                {
                    "answer": answer,
                    "stop_reason": stop_reason,
                    "detail": end.get("detail"),
                    "iterations": end.get("iterations"),
                    "usage": end.get("usage"),
                    "elapsed_s": end.get("elapsed_s"),
                    "run_id": end.get("run"),
                    "trajectory": str(path),
                    "resumed": False,
                },
                ensure_ascii=False,
            )
        )
    else:
        print(answer)
    how = f"{stop_reason}" + (f": {end.get('detail')}" if end.get("detail") else "")
    print(
        f"rlmq run: {path} already ended ({how}); nothing to resume, its recorded answer is printed. "
        "Run again without --resume to start over (with higher limits, if a limit stopped it)",
        file=sys.stderr,
    )
    return _exit_status(stop_reason, stop_reason in (StopReason.FINAL, StopReason.MAX_ITERATIONS))


def _report(args: argparse.Namespace, result: RunResult, path: Path) -> int:
    if args.json:
        fields: dict[str, Any] = {
            "answer": result.answer,
            "stop_reason": result.stop_reason,
            "detail": result.detail,
            "iterations": result.iterations,
            "usage": result.usage.to_wire() if result.usage else None,
            "elapsed_s": result.elapsed_s,
            "run_id": result.run_id,
            "trajectory": str(path),
        }
        if args.resume:
            fields["resumed"] = True
        print(json.dumps(fields, ensure_ascii=False))
    else:
        print(result.answer)
    note = f"run {result.run_id}: {result.stop_reason}"
    if result.detail:
        note += f" ({result.detail})"
    print(
        f"{note}; {result.iterations} iterations, {result.elapsed_s:.1f} s; trajectory: {path}",
        file=sys.stderr,
    )
    return _exit_status(result.stop_reason, result.ok)


def main(args: argparse.Namespace) -> int:
    try:
        # Handler and pool on TCP beyond loopback require CURVE: the keys come from the environment,
        # read here, at the entry point, and nowhere else.
        curve = client_keys_from_env(os.environ)
        return asyncio.run(_main(args, curve))
    except (ConfigError, ContextError, NoServices, TrajectoryError) as exc:
        print(f"rlmq run: {exc.message}", file=sys.stderr)
        return 2
    except RlmqError as exc:
        print(f"rlmq run: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rlmq run: interrupted", file=sys.stderr)
        return 130
