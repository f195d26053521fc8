"""run_query (rlmq.orchestrator.runner): one run by address, against an in-process handler and pool."""

from __future__ import annotations

import pytest

from rlmq.lmhandler.testing import ScriptedModel, echo_model, running_handler
from rlmq.orchestrator.runner import run_query
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.testing import events
from rlmq.orchestrator.trajectory import Trajectory
from rlmq.sandbox.testing import running_pool


@pytest.mark.parametrize("show_progress", [True, False])
async def test_run_query_connects_runs_and_reads_no_environment(
    monkeypatch: pytest.MonkeyPatch, show_progress: bool
) -> None:
    # Half-set CURVE keys would make any reader of the environment fail: run_query takes keys
    # only as an argument.
    monkeypatch.setenv("RLMQ_CURVE_SERVER_PUBLIC", "not a key")
    model = ScriptedModel()
    model.script("q1", ["```repl\nn = len(context)\n```", "FINAL_VAR(n)"])
    trajectory = Trajectory(None)
    async with (
        running_handler({"root": echo_model(), "sub": echo_model()}, backends={"root": model}) as h,
        running_pool(h.address or "", workers=1) as pool,
    ):
        result = await run_query(
            "How long?",
            "x" * 12,
            handler=h.address or "",
            sandbox=pool.address,
            settings=RunSettings(),
            trajectory=trajectory,
            run_id="q1",
            show_progress=show_progress,
        )
    assert (result.answer, result.stop_reason, result.run_id) == ("12", "final", "q1")
    assert result.usage is not None
    assert result.usage.calls == 2
    assert [e["run"] for e in events(trajectory, "run_end")] == ["q1"]
