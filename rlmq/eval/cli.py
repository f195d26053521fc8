"""``rlmq eval``: generate the paper's long-context tasks, run them, score them, plot them.

Exit status: 0 when every run was carried out (whatever the scores); 1 when some runs could not
run (they are retried when the eval is resumed); 2 on bad arguments or config; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rlmq.orchestrator.errors import NoServices
from rlmq.orchestrator.local import services_or_private
from rlmq.orchestrator.settings import load_run_settings
from rlmq.protocol import ConfigError, RlmqError
from rlmq.protocol.security import CurveClientKeys, client_keys_from_env

from .direct import context_window_tokens
from .harness import METHODS, EvalOutcome, EvalPlan, Progress, Results, pending_runs, run_eval
from .report import format_table, plot, summarize
from .tasks import MAX_TOKENS, MIN_TOKENS, TASKS

__all__ = ["add_arguments", "main", "parse_tokens"]

DEFAULT_EVALS_DIR = Path("rlmq-evals")

TASK_HELP = (
    "sniah: find keys' current values among decoys, one, all of one key's, or several keys' at once "
    "(RULER's NIAH); oolong: count, compare and filter records by a class that must be read "
    "(OOLONG); oolong-pairs: every pair of users meeting a condition on their class counts, scored by F1"
)


def parse_tokens(text: str) -> tuple[int, ...]:
    """'8K,131072,1M' -> (8000, 131072, 1000000); K is 1,000 and M 1,000,000."""
    lengths = []
    for part in text.split(","):
        word = part.strip().upper()
        scale = {"K": 1_000, "M": 1_000_000}.get(word[-1:], 1)
        number = word[:-1] if scale > 1 else word
        try:
            value = round(float(number) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not a token count like 8K, 131072 or 1M"
            ) from None
        if not MIN_TOKENS <= value <= MAX_TOKENS:
            raise argparse.ArgumentTypeError(
                f"{part.strip()}: lengths go from {MIN_TOKENS:,} to {MAX_TOKENS:,} tokens"
            )
        lengths.append(value)
    return tuple(dict.fromkeys(lengths))


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",")))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method {unknown[0]!r}; methods: {', '.join(METHODS)}")
    return methods


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Tasks are generated on this machine, the same for a given seed, with exact gold answers. "
        "Each run adds a line to OUT/results.jsonl; run the same command with --out OUT to resume "
        "an interrupted eval, or with another --method or --tokens to add to it. See docs/eval.md."
    )
    add = parser.add_argument
    add("--task", required=True, choices=TASKS, help=TASK_HELP)
    add(
        "--tokens",
        required=True,
        type=parse_tokens,
        metavar="N[,N...]",
        help="context lengths, comma-separated: 8K,32K,131K,1M (K = 1,000; from 1K to 10M)",
    )
    add("--n", type=_positive, default=5, metavar="K", help="tasks per length (default %(default)s)")
    add(
        "--config",
        default="rlmq.toml",
        metavar="FILE",
        help="TOML with [models.*] and optional [run] (default: %(default)s)",
    )
    add(
        "--method",
        type=_methods,
        default=("rlm",),
        metavar="rlm|direct",
        help="rlm (a recursive run), direct (the whole context in one call, cut to the model's "
        "context window), or both: rlm,direct (default rlm)",
    )
    add("--seed", type=int, default=0, metavar="S", help="the same seed makes the same tasks (default 0)")
    add(
        "--out",
        metavar="DIR",
        help=f"output directory; resumes one that exists (default: a new one under {DEFAULT_EVALS_DIR}/)",
    )
    add("--parallel", type=_positive, default=4, metavar="P", help="tasks run at once (default %(default)s)")
    add("--json", action="store_true", help="print one JSON object instead of the table")
    add("--handler", metavar="ADDR", help="address of a running handler (default: start a private one)")
    add("--sandbox", metavar="ADDR", help="address of a running sandbox pool (default: start a private one)")
    add("--root-model", metavar="ALIAS", help="model alias for the main loop and for direct (default root)")
    add("--sub-model", metavar="ALIAS", help="model alias for llm_query (default sub)")
    add("--max-iterations", type=_positive, metavar="N", help="root-model turns per run (default 30)")


async def _run(
    args: argparse.Namespace, plan: EvalPlan, results: Results, runs: int, curve: CurveClientKeys | None
) -> EvalOutcome:
    overrides = {
        "root_model": args.root_model,
        "sub_model": args.sub_model,
        "max_iterations": args.max_iterations,
    }
    settings = load_run_settings(args.config, overrides)
    window = context_window_tokens(args.config, settings.root_model)
    progress = Progress(plan.task, runs)
    try:
        async with services_or_private(args.handler, args.sandbox, args.config, guide="docs/eval.md") as (
            handler,
            sandbox,
        ):
            return await run_eval(
                plan,
                results,
                handler=handler,
                sandbox=sandbox,
                settings=settings,
                window_tokens=window,
                curve=curve,
                progress=progress,
            )
    finally:
        progress.close()


def _report(args: argparse.Namespace, results: Results, outcome: EvalOutcome) -> None:
    rows = summarize(results.load())
    picture = plot(rows, results.directory / "plot.png") if rows else None
    if rows and picture is None:
        print("rlmq eval: matplotlib is not installed (pip install 'rlmq[eval]'); no plot", file=sys.stderr)
    if args.json:
        summary: dict[str, Any] = {
            "task": args.task,
            "out": str(results.directory),
            "results": str(results.path),
            "plot": str(picture) if picture else None,
            "ran": outcome.ran,
            "skipped": outcome.skipped,
            "failed": outcome.failed,
            "rows": rows,
        }
        print(json.dumps(summary, ensure_ascii=False))
    else:
        if rows:
            print(format_table(rows))
        print(f"\nresults: {results.path}" + (f"\nplot: {picture}" if picture else ""))
    for failure in outcome.failed:
        print(
            f"rlmq eval: {failure['task_id']} by {failure['method']} did not run: {failure['error']}",
            file=sys.stderr,
        )


def main(args: argparse.Namespace) -> int:
    plan = EvalPlan(args.task, args.tokens, args.n, args.seed, args.method, args.parallel)
    out = Path(args.out) if args.out else DEFAULT_EVALS_DIR / f"{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    results = Results(out)
    runs = len(pending_runs(plan, results))
    outcome = EvalOutcome(skipped=sum(1 for _ in plan.runs()) - runs)
    if results.unreadable:
        print(
            f"rlmq eval: {results.unreadable} unreadable line(s) in {results.path} ignored", file=sys.stderr
        )
    if outcome.skipped:
        runs_word = "run" if outcome.skipped == 1 else "runs"
        print(f"rlmq eval: skipped {outcome.skipped} {runs_word} already in {results.path}", file=sys.stderr)
    try:
        if runs:
            # TCP beyond loopback requires CURVE: the keys come from the environment, read here only.
            curve = client_keys_from_env(os.environ)
            outcome = asyncio.run(_run(args, plan, results, runs, curve))
    except (ConfigError, NoServices) as exc:
        print(f"rlmq eval: {exc.message}", file=sys.stderr)
        return 2
    except RlmqError as exc:
        print(f"rlmq eval: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\nrlmq eval: interrupted; finished runs are in {results.path}. "
            f"Run the same command with --out {out} to resume.",
            file=sys.stderr,
        )
        return 130
    _report(args, results, outcome)
    return 1 if outcome.failed else 0
