"""A live progress line on stderr, only when stderr is a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TextIO

from rlmq.protocol import RlmqError

from .interfaces import ModelClient
from .loop import RunCounters

__all__ = ["progress_line"]


def _tokens(n: int) -> str:
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)


@contextlib.asynccontextmanager
async def progress_line(
    models: ModelClient,
    run_id: str,
    counters: Callable[[], RunCounters | None],
    *,
    max_iterations: int,
    stream: TextIO | None = None,
    interval_s: float = 0.5,
) -> AsyncIterator[None]:
    """Redraw one status line while the block runs: iteration, sub-calls, tokens, cost, time.

    ``counters`` gives the run's live ``RunCounters`` (``RLM.counters(run_id)``; None before the
    run starts); the rest comes from the handler's ``usage`` of the run, so sub-calls of every
    worker are counted.
    """
    out = stream or sys.stderr
    if not out.isatty():
        yield
        return
    started = time.monotonic()

    async def draw() -> None:
        while True:
            await asyncio.sleep(interval_s)
            state = counters()
            if state is None:
                continue
            try:
                usage = await models.usage(run_id)
            except RlmqError:
                continue
            u = usage.usage
            sub_in_flight = max(0, usage.in_flight - state.asking)
            sub_started = max(0, usage.calls - state.model_calls - state.asking)
            line = (
                f"iteration {state.iterations}/{max_iterations} | sub-calls "
                f"{max(0, sub_started - sub_in_flight)} done, {sub_in_flight} in flight | "
                f"tokens {_tokens(u.input_tokens)} in, "
                f"{_tokens(u.output_tokens)} out | ${usage.cost_usd:.4f} | {time.monotonic() - started:.1f}s"
            )
            out.write("\r\x1b[2K" + line)
            out.flush()

    task = asyncio.get_running_loop().create_task(draw())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        out.write("\r\x1b[2K")
        out.flush()
