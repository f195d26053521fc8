"""Running an eval: generate each task, run it by each method, score it, write a line, resume.

The output directory is the eval's state. ``results.jsonl`` gets one line per (task, method)
as soon as that run ends, so an interrupted eval loses only the runs in flight; run it again with
the same directory and the lines already there are not run again. Trajectories go to
``trajectories/``. A run that the services could not carry out (a dead handler, a pool that is
gone) is reported and not written, so the next resume retries it; a run that the model failed is
written with its score.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rlmq.orchestrator.loop import StopReason, new_run_id
from rlmq.orchestrator.runner import run_query
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.trajectory import Trajectory
from rlmq.protocol import AsyncHandlerClient, RlmqError, RunUsage
from rlmq.protocol.security import CurveClientKeys

from .direct import run_direct
from .scoring import score
from .tasks import Task, generate, task_id

__all__ = [
    "ANSWER_KEEP_CHARS",
    "METHODS",
    "EvalOutcome",
    "EvalPlan",
    "Progress",
    "Results",
    "pending_runs",
    "run_eval",
]

log = logging.getLogger(__name__)

METHODS = ("rlm", "direct")
# An answer longer than this (an echo model's, say) is kept cut in the JSON line; it is scored whole.
ANSWER_KEEP_CHARS = 20_000


@dataclass(frozen=True, slots=True)
class EvalPlan:
    task: str
    lengths: tuple[int, ...]
    n: int
    seed: int = 0
    methods: tuple[str, ...] = ("rlm",)
    parallel: int = 4

    def runs(self) -> Iterator[tuple[int, int, str]]:
        """(length, index, method) of every run, shortest contexts first."""
        for length in self.lengths:
            for index in range(self.n):
                for method in self.methods:
                    yield length, index, method


class Results:
    """The output directory: ``results.jsonl`` and ``trajectories/``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "results.jsonl"
        self.trajectories = self.directory / "trajectories"
        self.unreadable = 0  # lines of an interrupted write, found by load()
        self._tail_checked = False

    def load(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        self.unreadable = 0
        if not self.path.exists():
            return records
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.unreadable += 1  # the last line of an eval killed mid-write
                continue
            if isinstance(record, dict) and "task_id" in record and "method" in record:
                records.append(record)
        return records

    def done(self) -> set[tuple[str, str]]:
        return {(r["task_id"], r["method"]) for r in self.load()}

    def append(self, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if not self._tail_checked:
            self._tail_checked = True
            # An eval killed mid-write may have left a line without its end: start a new one.
            if self.path.exists() and self.path.stat().st_size > 0:
                with self.path.open("rb") as f:
                    f.seek(-1, 2)
                    if f.read(1) != b"\n":
                        line = "\n" + line
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)

    def trajectory_path(self, task: str, method: str) -> Path:
        return self.trajectories / f"{task}.{method}.jsonl"


class Progress:
    """One status line on ``stream``, redrawn as runs start and end; silent unless a terminal."""

    def __init__(self, task: str, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.task, self.total = task, total
        self.running = self.done = self.failed = 0
        self.score_sum = self.cost_usd = 0.0
        self.started = time.monotonic()

    def start(self) -> None:
        self.running += 1
        self._draw()

    def end(self, record: dict[str, Any] | None) -> None:
        self.running -= 1
        if record is None:
            self.failed += 1
        else:
            self.done += 1
            self.score_sum += record["score"]
            self.cost_usd += record["cost_usd"]
        self._draw()

    def line(self) -> str:
        mean = f"{100 * self.score_sum / self.done:.1f}%" if self.done else "-"
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (
            f"eval {self.task}: {self.done}/{self.total} done{failed}, {self.running} running | "
            f"mean score {mean} | ${self.cost_usd:.4f} | {time.monotonic() - self.started:.0f} s"
        )

    def _draw(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[2K" + self.line())
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


@dataclass(slots=True)
class EvalOutcome:
    ran: int = 0
    skipped: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)  # task_id, method, error


@dataclass(frozen=True, slots=True)
class _Services:
    handler: str
    sandbox: str
    settings: RunSettings
    window_tokens: int
    curve: CurveClientKeys | None
    direct: AsyncHandlerClient | None


def _record(
    task: Task,
    method: str,
    *,
    answer: str,
    stop_reason: StopReason,
    detail: str,
    iterations: int,
    usage: RunUsage | None,
    elapsed_s: float,
    trajectory: Path,
    run_id: str,
    cut_tokens: int = 0,
) -> dict[str, Any]:
    u = usage.usage if usage is not None else None
    return {
        "task_id": task.id,
        "task": task.name,
        "length_tokens": task.length_tokens,
        "context_tokens": task.context_tokens,
        "seed": task.seed,
        "index": task.index,
        "method": method,
        "query": task.query,
        "answer": answer[:ANSWER_KEEP_CHARS],
        "answer_chars": len(answer),
        "gold": task.gold_json(),
        "score": score(task.kind, answer, task.gold),
        "stop_reason": str(stop_reason),  # the enum's value: "final", "max_iterations", ...
        "detail": detail,
        "iterations": iterations,
        "calls": usage.calls if usage is not None else 0,
        "input_tokens": u.input_tokens if u is not None else 0,
        "output_tokens": u.output_tokens if u is not None else 0,
        "cost_usd": usage.cost_usd if usage is not None else 0.0,
        "elapsed_s": round(elapsed_s, 3),
        "cut_tokens": cut_tokens,
        "run_id": run_id,
        "trajectory": str(trajectory),
    }


async def _run_rlm(task: Task, services: _Services, path: Path) -> dict[str, Any]:
    run_id = new_run_id()
    trajectory = Trajectory(path)
    started = time.monotonic()
    try:
        result = await run_query(
            task.query,
            task.context,
            handler=services.handler,
            sandbox=services.sandbox,
            settings=services.settings,
            trajectory=trajectory,
            run_id=run_id,
            curve=services.curve,
            show_progress=False,  # one line for the whole eval instead
        )
    finally:
        trajectory.close()
    return _record(
        task,
        "rlm",
        answer=result.answer,
        stop_reason=result.stop_reason,
        detail=result.detail,
        iterations=result.iterations,
        usage=result.usage,
        elapsed_s=time.monotonic() - started,
        trajectory=path,
        run_id=run_id,
    )


async def _run_direct(task: Task, services: _Services, path: Path) -> dict[str, Any]:
    assert services.direct is not None
    settings = services.settings
    run_id = new_run_id()
    trajectory = Trajectory(path)
    started = time.monotonic()
    try:
        trajectory.write("direct_start", run_id=run_id, model=settings.root_model, query=task.query)
        result = await run_direct(
            services.direct,
            task.context,
            task.query,
            run_id=run_id,
            model=settings.root_model,
            window_tokens=services.window_tokens,
            max_tokens=settings.max_tokens,
            limits=settings.limits(),
            timeout_s=settings.model_timeout_s,
        )
        trajectory.write(
            "direct_end",
            answer=result.answer,
            stop_reason=str(result.stop_reason),
            detail=result.detail,
            cut_tokens=result.cut_tokens,
            usage=result.usage.to_wire(),
        )
    finally:
        trajectory.close()
    return _record(
        task,
        "direct",
        answer=result.answer,
        stop_reason=result.stop_reason,
        detail=result.detail,
        iterations=1,
        usage=result.usage,
        elapsed_s=time.monotonic() - started,
        trajectory=path,
        run_id=run_id,
        cut_tokens=result.cut_tokens,
    )


def pending_runs(plan: EvalPlan, results: Results) -> list[tuple[int, int, str]]:
    """The runs of ``plan`` (length, index, method) that ``results`` does not hold yet."""
    done = results.done()
    return [(n, i, m) for n, i, m in plan.runs() if (task_id(plan.task, n, plan.seed, i), m) not in done]


async def run_eval(
    plan: EvalPlan,
    results: Results,
    *,
    handler: str,
    sandbox: str,
    settings: RunSettings,
    window_tokens: int,
    curve: CurveClientKeys | None = None,
    progress: Progress | None = None,
) -> EvalOutcome:
    """Run every run of ``plan`` not yet in ``results``, ``plan.parallel`` tasks at a time."""
    todo = pending_runs(plan, results)
    outcome = EvalOutcome(skipped=sum(1 for _ in plan.runs()) - len(todo))
    pending: dict[tuple[int, int], list[str]] = {}
    for length, index, method in todo:
        pending.setdefault((length, index), []).append(method)
    if not pending:
        return outcome
    limit = asyncio.Semaphore(plan.parallel)

    async def one(length: int, index: int, methods: list[str], services: _Services) -> None:
        async with limit:
            # Generating a 10M-token task takes about a second of CPU: off the event loop.
            task = await asyncio.to_thread(generate, plan.task, length, seed=plan.seed, index=index)
            for method in methods:
                if progress is not None:
                    progress.start()
                record: dict[str, Any] | None = None
                path = results.trajectory_path(task.id, method)
                try:
                    runner = _run_rlm if method == "rlm" else _run_direct
                    record = await runner(task, services, path)
                except RlmqError as exc:
                    log.warning("%s by %s could not run: %s", task.id, method, exc)
                    outcome.failed.append({"task_id": task.id, "method": method, "error": str(exc)})
                finally:
                    if progress is not None:
                        progress.end(record)
                if record is not None:
                    results.append(record)
                    outcome.ran += 1

    async with contextlib.AsyncExitStack() as stack:
        direct = None
        if "direct" in plan.methods:
            direct = await stack.enter_async_context(AsyncHandlerClient(handler, curve=curve))
        services = _Services(handler, sandbox, settings, window_tokens, curve, direct)
        async with asyncio.TaskGroup() as group:
            for (length, index), methods in pending.items():
                group.create_task(one(length, index, methods, services))
    return outcome
