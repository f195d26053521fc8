"""The live progress line of ``rlmq run`` (rlmq.orchestrator.progress)."""

from __future__ import annotations

import asyncio
import io

from rlmq.orchestrator.loop import RunCounters
from rlmq.orchestrator.progress import progress_line
from rlmq.orchestrator.testing import ScriptedModelClient
from rlmq.protocol import ChatMessage


class Terminal(io.StringIO):
    """A stream that says it is a terminal and tells when a status line was drawn."""

    def __init__(self, tty: bool = True) -> None:
        super().__init__()
        self.tty = tty
        self.drawn = asyncio.Event()

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        if "iteration" in text:
            self.drawn.set()
        return super().write(text)


async def test_draws_the_runs_counters_and_the_handlers_usage() -> None:
    model = ScriptedModelClient()
    await model.run_open("r")
    await model.complete([ChatMessage("user", "sub-call")], model="sub", run="r", depth=1)
    counters = RunCounters(iterations=2)
    terminal = Terminal()
    async with progress_line(model, "r", lambda: counters, max_iterations=5, stream=terminal, interval_s=0):
        await terminal.drawn.wait()
    shown = terminal.getvalue()
    assert "iteration 2/5 | sub-calls 1 done, 0 in flight | tokens 2 in, 2 out" in shown
    assert shown.endswith("\r\x1b[2K")  # the line is wiped when the run ends


async def test_writes_nothing_when_not_a_terminal() -> None:
    terminal = Terminal(tty=False)
    async with progress_line(ScriptedModelClient(), "r", RunCounters, max_iterations=5, stream=terminal):
        pass
    assert terminal.getvalue() == ""
