"""One run against running services, by address: connect, run, disconnect.

The library side of ``rlmq run`` and ``rlmq demo``. It reads no environment: CURVE keys, like
every other setting, come from the caller (the command line reads them at its entry point).
The run is opened with a key of its own and survives a handler restart with what is left of its
budget (``budget.GuardedModels``).
"""

from __future__ import annotations

import functools
from typing import Any

from rlmq.protocol import AsyncHandlerClient, RlmqError
from rlmq.protocol.sandbox import AsyncSandboxClient
from rlmq.protocol.security import CurveClientKeys

from .budget import GuardedModels, GuardedSandbox
from .loop import RLM, RunResult
from .progress import progress_line
from .settings import RunSettings
from .trajectory import Trajectory

__all__ = ["run_query"]

PING_TIMEOUT_S = 5.0


async def run_query(
    query: str,
    context: Any,
    *,
    handler: str,
    sandbox: str,
    settings: RunSettings,
    trajectory: Trajectory,
    run_id: str,
    curve: CurveClientKeys | None = None,
    show_progress: bool = True,
) -> RunResult:
    """Answer ``query`` about ``context`` with the handler and the pool at these addresses.

    ``curve``: client keys for services on TCP beyond loopback, which require CURVE.
    ``show_progress``: a progress line on stderr, when stderr is a terminal.
    """
    async with AsyncHandlerClient(handler, curve=curve) as hc, AsyncSandboxClient(sandbox, curve=curve) as sc:
        # The handler tells the sub-model's context window, which the system prompt passes on.
        # A handler that does not answer is the run's problem to report, not this lookup's.
        try:
            window = (await hc.ping(timeout_s=PING_TIMEOUT_S)).context_windows.get(settings.sub_model)
        except RlmqError:
            window = None
        models = GuardedModels(hc)
        # The pool gets the run's key, and [run] sandbox_modules, through GuardedSandbox.
        rlm = RLM(models, GuardedSandbox(sc, models), settings, sub_window_tokens=window)
        if not show_progress:
            return await rlm.run(query, context, run_id=run_id, trajectory=trajectory)
        counters = functools.partial(rlm.counters, run_id)
        async with progress_line(models, run_id, counters, max_iterations=settings.max_iterations):
            return await rlm.run(query, context, run_id=run_id, trajectory=trajectory)
