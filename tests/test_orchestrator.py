"""The RLM loop with a scripted root model, a real handler, a real pool and real workers.

The same behaviours as fast units, on the in-memory fakes, are in tests/test_loop.py; these prove
the loop and the real ZeroMQ clients fit together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import zmq.asyncio

from rlmq.lmhandler.testing import ScriptedModel, echo_model, running_handler
from rlmq.orchestrator.loop import LAST_CALL, NO_CODE_NUDGE, RLM, RunResult
from rlmq.orchestrator.runner import run_query
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.trajectory import Trajectory
from rlmq.protocol import AsyncHandlerClient
from rlmq.protocol.sandbox import AsyncSandboxClient
from rlmq.sandbox.testing import running_pool


@dataclass
class Stack:
    model: ScriptedModel
    handler: AsyncHandlerClient
    sandbox: AsyncSandboxClient


@pytest.fixture
async def stack(actx: zmq.asyncio.Context) -> AsyncIterator[Stack]:
    model = ScriptedModel()
    async with (
        running_handler(
            {"root": echo_model(), "sub": echo_model(latency_ms=5)}, backends={"root": model}
        ) as h,
        running_pool(h.address or "", workers=1) as pool,
        AsyncHandlerClient(h.address or "", context=actx) as hc,
        AsyncSandboxClient(pool.address, context=actx) as sc,
    ):
        yield Stack(model, hc, sc)


async def run(
    stack: Stack, responses: list[str], *, context: Any = "hello", query: str = "Q?", **settings: Any
) -> tuple[RunResult, Trajectory]:
    stack.model.script("t1", responses)
    trajectory = Trajectory(None)
    rlm = RLM(stack.handler, stack.sandbox, RunSettings(**settings))
    return await rlm.run(query, context, run_id="t1", trajectory=trajectory), trajectory


def events(trajectory: Trajectory, name: str) -> list[dict[str, Any]]:
    return [e for e in trajectory.events if e["event"] == name]


def last_user(stack: Stack, call: int) -> str:
    return stack.model.requests[call][1][-1].content


async def test_blocks_run_in_order_and_final_in_code(stack: Stack) -> None:
    result, trajectory = await run(
        stack, ["```repl\nx = 2\n```\n```repl\ny = x * 21\nprint(y)\n```", "```repl\nFINAL(y)\n```"]
    )
    assert (result.answer, result.stop_reason, result.iterations) == ("42", "final", 2)
    assert "42" in last_user(stack, 1)  # the model saw its output before answering
    assert [e["block"] for e in events(trajectory, "exec_end")] == [0, 1, 0]
    assert result.usage is not None
    assert result.usage.calls == 2


async def test_final_var_as_text(stack: Stack) -> None:
    result, _ = await run(stack, ["```repl\nresult = 'abc'.upper()\n```", "FINAL_VAR(result)"])
    assert (result.answer, result.stop_reason) == ("ABC", "final")


async def test_final_as_text_without_code(stack: Stack) -> None:
    result, _ = await run(stack, ["I know this one.\nFINAL(just this)"])
    assert (result.answer, result.iterations) == ("just this", 1)


async def test_prose_final_next_to_code_waits_for_the_output(stack: Stack) -> None:
    result, trajectory = await run(
        stack, ["```repl\nx = len(context)\nprint(x)\n```\nFINAL(999)", "FINAL_VAR(x)"], context="hello"
    )
    assert result.answer == "5"
    assert result.iterations == 2
    assert "5" in last_user(stack, 1)
    assert events(trajectory, "final_ignored")[0]["final"] == "999"


async def test_iteration_limit_asks_once_more_without_code(stack: Stack) -> None:
    result, _ = await run(
        stack, ["```repl\nprint(1)\n```", "```repl\nprint(2)\n```", "FINAL(best guess)"], max_iterations=2
    )
    assert (result.answer, result.stop_reason) == ("best guess", "max_iterations")
    assert last_user(stack, 2) == LAST_CALL.format(n=2)


async def test_broken_code_recovers_on_the_next_turn(stack: Stack) -> None:
    result, _ = await run(stack, ["```repl\n1/0\n```", "```repl\nFINAL('fixed')\n```"])
    assert "ZeroDivisionError" in last_user(stack, 1)
    assert "Traceback" in last_user(stack, 1)
    assert result.answer == "fixed"


async def test_response_without_code_or_final_is_nudged(stack: Stack) -> None:
    result, _ = await run(stack, ["Let me think about it.", "FINAL(ok)"])
    assert last_user(stack, 1) == NO_CODE_NUDGE
    assert result.answer == "ok"


async def test_missing_final_var_is_reported_to_the_model(stack: Stack) -> None:
    result, _ = await run(stack, ["FINAL_VAR(nothing_here)", "FINAL(ok)"])
    assert "names no variable" in last_user(stack, 1)
    assert result.answer == "ok"


async def test_compaction_keeps_question_and_latest_turns(stack: Stack) -> None:
    long_turn = "```repl\nprint('x' * 800)\n```"
    result, trajectory = await run(
        stack,
        [long_turn] * 6 + ["FINAL(done)"],
        query="Where is the needle?",
        history_max_chars=3000,
        keep_last_turns=1,
    )
    assert result.answer == "done"
    assert events(trajectory, "compaction")
    final_messages = stack.model.requests[-1][1]
    assert final_messages[1].content == "Question: Where is the needle?"
    assert "earlier turns were dropped" in final_messages[2].content
    assert sum(len(m.content) for m in final_messages) < 3000 + 2 * len(long_turn) + 2000


async def test_recursion_at_depth_two(stack: Stack) -> None:
    result, trajectory = await run(
        stack,
        [
            "```repl\nsub = rlm_query('inner question', context='inner ctx')\nprint(sub)\n```",
            "```repl\nFINAL(context.upper())\n```",  # the child run, at depth 1
            "FINAL_VAR(sub)",
        ],
        max_depth=2,
    )
    assert result.answer == "INNER CTX"
    child = events(trajectory, "child_start")
    assert [c["depth"] for c in child] == [1]
    assert child[0]["query"] == "inner question"
    assert [e["depth"] for e in events(trajectory, "final")] == [1, 0]
    # The child's first model call saw the inner question, not the root's.
    assert stack.model.requests[1][1][1].content == "Question: inner question"


async def test_depth_limit_is_a_clear_error_in_model_code(stack: Stack) -> None:
    result, _ = await run(
        stack,
        [
            "```repl\ntry:\n    rlm_query('x')\nexcept Exception as e:\n    print('refused:', e)\n```",
            "FINAL(ok)",
        ],
        max_depth=1,
    )
    observation = last_user(stack, 1)
    assert "refused:" in observation
    assert "depth" in observation or "recursion" in observation
    assert result.answer == "ok"


async def test_budget_stops_the_run_with_a_reason(stack: Stack) -> None:
    result, trajectory = await run(
        stack,
        ["```repl\nprint(llm_query('a sub-call'))\n```", "```repl\nprint(2)\n```", "FINAL(never)"],
        max_calls=2,
    )
    assert result.stop_reason == "budget_exceeded"
    assert "call limit of 2" in result.detail
    end = events(trajectory, "run_end")[0]
    assert end["stop_reason"] == "budget_exceeded"
    assert end["usage"]["calls"] == 2
    assert end["usage"]["exceeded"] == "max_calls"


async def test_failed_run_still_leaves_a_whole_trajectory(stack: Stack) -> None:
    trajectory = Trajectory(None)
    rlm = RLM(stack.handler, stack.sandbox, RunSettings(root_model="missing"))
    result = await rlm.run("Q?", "ctx", run_id="t2", trajectory=trajectory)
    assert result.stop_reason == "error"
    assert "unknown_model" in result.detail
    assert result.error is not None
    assert (result.error.code, result.error.retryable) == ("unknown_model", False)
    assert next(e["event"] for e in trajectory.events) == "run_start"
    assert trajectory.events[-1]["event"] == "run_end"
    assert trajectory.events[-1]["stop_reason"] == "error"
    assert trajectory.events[-1]["error"]["code"] == "unknown_model"


async def test_a_failed_child_run_reaches_the_models_code_as_rlm_failed(stack: Stack) -> None:
    result, trajectory = await run(
        stack,
        [
            "```repl\ntry:\n    rlm_query('hard')\nexcept Exception as e:\n    print('child:', e)\n```",
            "```repl\nprint('the child works')\n```",  # the child's first turn; its second is refused
        ],
        max_depth=2,
        max_calls=2,
    )
    (root_exec,) = [e for e in events(trajectory, "exec_end") if e["depth"] == 0]
    assert "rlm_query failed: (rlm_failed) the recursive run stopped: budget_exceeded" in root_exec["stdout"]
    assert result.stop_reason == "budget_exceeded"


async def test_run_query_tells_the_model_the_sub_models_window(actx: zmq.asyncio.Context) -> None:
    model = ScriptedModel()
    model.script("w1", ["FINAL(ok)"])
    async with (
        running_handler(
            {"root": echo_model(), "sub": echo_model(context_window_tokens=8_192)}, backends={"root": model}
        ) as h,
        running_pool(h.address or "", workers=1) as pool,
    ):
        result = await run_query(
            "Q?",
            "ctx",
            handler=h.address or "",
            sandbox=pool.address,
            settings=RunSettings(),
            trajectory=Trajectory(None),
            run_id="w1",
            show_progress=False,
        )
    assert result.answer == "ok"
    system = model.requests[0][1][0]
    assert system.role == "system"
    assert "about 8,192 tokens" in system.content
