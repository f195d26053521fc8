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
from .replay import Recording, ReplayReport, check_context, replay_on, resume_on
from .settings import RunSettings
from .trajectory import Trajectory

__all__ = ["replay_recording", "resume_run", "run_query"]

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
    context_path: str | None = None,
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
            return await rlm.run(
                query, context, run_id=run_id, trajectory=trajectory, context_path=context_path
            )
        counters = functools.partial(rlm.counters, run_id)
        async with progress_line(models, run_id, counters, max_iterations=settings.max_iterations):
            return await rlm.run(
                query, context, run_id=run_id, trajectory=trajectory, context_path=context_path
            )


async def replay_recording(
    recording: Recording,
    context: Any,
    *,
    sandbox: str,
    trajectory: Trajectory,
    curve: CurveClientKeys | None = None,
) -> ReplayReport:
    """Run ``recording`` again with no model calls, its code in a session of the pool at
    ``sandbox`` (see ``replay.replay_on``). Needs no handler."""
    check_context(recording, context)
    async with AsyncSandboxClient(sandbox, curve=curve) as sc:
        return await replay_on(recording, context, sc, trajectory)


async def resume_run(
    recording: Recording,
    context: Any,
    *,
    handler: str,
    sandbox: str,
    trajectory: Trajectory,
    run_id: str,
    curve: CurveClientKeys | None = None,
) -> RunResult:
    """Continue a recorded run that was cut, with the handler and the pool at these addresses
    (see ``replay.resume_on``): no model call for what was recorded, live for the rest."""
    check_context(recording, context)
    async with AsyncHandlerClient(handler, curve=curve) as hc, AsyncSandboxClient(sandbox, curve=curve) as sc:
        guarded = GuardedModels(hc)
        return await resume_on(
            recording,
            context,
            live=guarded,
            sandbox=GuardedSandbox(sc, guarded),
            trajectory=trajectory,
            run_id=run_id,
        )
