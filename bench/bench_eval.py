"""``rlmq eval``: the time to generate a task, and the harness's own overhead per task.

    .venv/bin/python bench/bench_eval.py [--quick]

1. Generation: ``rlmq.eval.generate`` for each task at 131K, 1M and 10M tokens, best of a few.
2. Harness overhead: N sniah tasks, one at a time, through a private handler and pool (the root
   model is the ``script`` backend answering ``FINAL(0)`` at once, so no model time hides
   anything), first as a bare loop (generate, then ``run_query`` with a trajectory file: what
   ``rlmq run`` does), then through ``run_eval`` (the same, plus scoring, the JSON line, the
   resume bookkeeping and the progress counters). The difference per task is the harness's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, table, write_results

from rlmq.eval import TASKS, EvalPlan, Results, generate, run_eval
from rlmq.eval.harness import _record
from rlmq.orchestrator import StopReason
from rlmq.orchestrator.local import local_services
from rlmq.orchestrator.loop import new_run_id
from rlmq.orchestrator.runner import run_query
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.trajectory import Trajectory


def generation(lengths: list[int], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for name in TASKS:
        for length in lengths:
            times = []
            for index in range(rounds):
                started = time.perf_counter()
                task = generate(name, length, seed=0, index=index)
                times.append(time.perf_counter() - started)
            rows.append({"task": name, "tokens": length, "best_s": min(times), "chars": len(task.context)})
            print(f"generate {name} {length:,}: best {min(times):.2f} s of {rounds}", flush=True)
    return rows


async def overhead(config: Path, length: int, n: int, rounds: int) -> dict[str, Any]:
    settings = RunSettings(max_iterations=2)
    bare_s: list[float] = []
    eval_s: list[float] = []
    async with local_services(config, workers=1) as services:
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                for index in range(n):
                    task = generate("sniah", length, seed=0, index=index)
                    trajectory = Trajectory(Path(tmp) / f"{index}.jsonl")
                    try:
                        await run_query(task.query, task.context, handler=services.handler,
                                        sandbox=services.sandbox, settings=settings, trajectory=trajectory,
                                        run_id=new_run_id(), show_progress=False)  # fmt: skip
                    finally:
                        trajectory.close()
                bare_s.append((time.perf_counter() - started) / n)
            with tempfile.TemporaryDirectory() as tmp:
                plan = EvalPlan("sniah", (length,), n, seed=0, parallel=1)
                started = time.perf_counter()
                outcome = await run_eval(
                    plan,
                    Results(tmp),
                    handler=services.handler,
                    sandbox=services.sandbox,
                    settings=settings,
                    window_tokens=128_000,
                )
                eval_s.append((time.perf_counter() - started) / n)
                assert outcome.ran == n, outcome
    bare, full = statistics.median(bare_s), statistics.median(eval_s)
    print(f"{length:,} tokens: bare {1000 * bare:.1f} ms/task, eval {1000 * full:.1f} ms/task", flush=True)
    return {
        "tokens": length,
        "n": n,
        "bare_ms": 1000 * bare,
        "eval_ms": 1000 * full,
        "overhead_ms": 1000 * (full - bare),
    }


def bookkeeping(n: int = 200) -> float:
    """Milliseconds per task of what the harness adds around a run, timed alone: scoring, the
    record, appending its line, and reading the results file back for the resume check."""
    task = generate("oolong-pairs", 8_000, seed=0, index=0)
    answer = "\n".join(f"({a}, {b})" for a, b in sorted(task.gold))
    with tempfile.TemporaryDirectory() as tmp:
        results = Results(tmp)
        started = time.perf_counter()
        for i in range(n):
            record = _record(
                task,
                "rlm",
                answer=answer,
                stop_reason=StopReason.FINAL,
                detail="",
                iterations=2,
                usage=None,
                elapsed_s=0.1,
                trajectory=Path(tmp),
                run_id=str(i),
            )
            results.append(record)
        results.done()
        return 1000 * (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tasks (a smoke run)")
    args = parser.parse_args()
    rounds = 1 if args.quick else 3
    gen = generation([131_072, 1_000_000, 10_000_000], rounds)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "script.json"
        script.write_text(json.dumps(["FINAL(0)"]))
        config = Path(tmp) / "rlmq.toml"
        config.write_text(
            f'[models.root]\nbackend = "script"\npath = "{script}"\n\n[models.sub]\nbackend = "echo"\n'
        )
        runs = [
            asyncio.run(overhead(config, 8_000, 10 if args.quick else 40, rounds)),
            asyncio.run(overhead(config, 1_000_000, 3 if args.quick else 10, rounds)),
        ]
    print()
    print(
        table(
            ["task", "tokens", "generate (best)"],
            [[r["task"], f"{r['tokens']:,}", f"{r['best_s']:.2f} s"] for r in gen],
        )
    )
    print()
    rows = [
        [
            f"{r['tokens']:,}",
            r["n"],
            f"{r['bare_ms']:.1f} ms",
            f"{r['eval_ms']:.1f} ms",
            f"{r['overhead_ms']:.1f} ms",
        ]
        for r in runs
    ]
    print(
        table(["context", "tasks", "bare loop per task", "rlmq eval per task", "difference per task"], rows)
    )
    own = bookkeeping()
    print(f"\nthe harness's own steps (score, JSON line, append, resume check): {own:.3f} ms per task")
    path = write_results(
        "eval", {"machine": machine(), "generation": gen, "overhead": runs}, quick=args.quick
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
