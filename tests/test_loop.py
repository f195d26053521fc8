"""The RLM loop's behaviours, as fast units: the in-memory fakes of rlmq.orchestrator.testing.

Endings, nudges, compaction, limits, recursion, errors and overlapping runs. The same loop
against a real handler, pool and workers is tests/test_orchestrator.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from rlmq.orchestrator.errors import ChildRunFailed
from rlmq.orchestrator.loop import LAST_CALL, NO_CODE_NUDGE, RLM, RunCounters, RunResult, StopReason
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.testing import (
    InMemorySandbox,
    ManualClock,
    ModelRequest,
    ScriptedModelClient,
    events,
)
from rlmq.orchestrator.trajectory import Trajectory
from rlmq.protocol import ErrorCode, ErrorInfo, RemoteError
from rlmq.protocol.sandbox import SandboxError


@dataclass
class Kit:
    model: ScriptedModelClient = field(default_factory=ScriptedModelClient)
    sandbox: InMemorySandbox = field(default_factory=InMemorySandbox)
    trajectory: Trajectory = field(default_factory=lambda: Trajectory(None))

    def __post_init__(self) -> None:
        self.sandbox.models = self.model

    def user(self, call: int) -> str:
        """The last user message of the root loop's model call number ``call`` (0-based)."""
        return self.model.requests_for(model="root", depth=0)[call].last_user

    def events(self, name: str) -> list[dict[str, Any]]:
        return events(self.trajectory, name)


@pytest.fixture
def kit() -> Kit:
    return Kit()


async def run(
    kit: Kit,
    responses: list[str | Exception],
    *,
    context: Any = "hello",
    query: str = "Q?",
    clock: ManualClock | None = None,
    **settings: Any,
) -> RunResult:
    kit.model.script("t1", responses)  # type: ignore[arg-type]
    if clock is not None:
        kit.model.clock = clock
    rlm = RLM(kit.model, kit.sandbox, RunSettings(**settings), clock=clock or time.monotonic)
    result = await rlm.run(query, context, run_id="t1", trajectory=kit.trajectory)
    assert not kit.sandbox.open_sessions, "every session is closed when its depth ends"
    return result


# ---------------------------------------------------------------- endings


async def test_final_in_code_ends_after_that_block(kit: Kit) -> None:
    result = await run(
        kit,
        [
            "```repl\nx = 2\n```\n```repl\ny = x * 21\nprint(y)\n```",
            "```repl\nFINAL(y)\n```\n```repl\nz = 1\n```",
        ],
    )
    assert (result.answer, result.stop_reason, result.iterations) == ("42", StopReason.FINAL, 2)
    assert "42" in kit.user(1)  # the model saw its output before answering
    assert kit.sandbox.sessions[0].codes == ["x = 2", "y = x * 21\nprint(y)", "FINAL(y)"]  # z = 1 never ran
    assert [e["block"] for e in kit.events("exec_end")] == [0, 1, 0]


async def test_final_var_in_code(kit: Kit) -> None:
    result = await run(kit, ["```repl\nanswer = context[::-1]\nFINAL_VAR('answer')\n```"])
    assert (result.answer, result.stop_reason) == ("olleh", "final")
    assert kit.events("exec_end")[0]["final_var"] == "answer"


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("I know this one.\nFINAL(just this)", "just this"),
        ('FINAL("quoted, with a comma")', "quoted, with a comma"),
        ("FINAL('single')", "single"),
        ("FINAL(it is (probably) blue)\nThat is all.", "it is (probably) blue"),
    ],
)
async def test_final_as_text_without_code(kit: Kit, response: str, answer: str) -> None:
    result = await run(kit, [response])
    assert (result.answer, result.stop_reason, result.iterations) == (answer, "final", 1)
    assert not kit.events("exec_end")


@pytest.mark.parametrize("name", ["result", '"result"', "'result'"])
async def test_final_var_as_text_with_and_without_quotes(kit: Kit, name: str) -> None:
    result = await run(kit, ["```repl\nresult = 'abc'.upper()\n```", f"FINAL_VAR({name})"])
    assert (result.answer, result.stop_reason) == ("ABC", "final")
    (read,) = kit.events("final_var")
    assert (read["depth"], read["iteration"], read["name"], read["found"]) == (0, 2, "result", True)


async def test_prose_final_next_to_code_waits_for_the_output(kit: Kit) -> None:
    result = await run(kit, ["```repl\nx = len(context)\nprint(x)\n```\nFINAL(999)", "FINAL_VAR(x)"])
    assert (result.answer, result.iterations) == ("5", 2)
    assert "5" in kit.user(1)  # the code ran and the model saw it before the run ended
    assert kit.events("final_ignored")[0]["final"] == "999"


async def test_missing_final_var_is_reported_to_the_model(kit: Kit) -> None:
    result = await run(kit, ["FINAL_VAR(nothing_here)", "FINAL(ok)"])
    assert "names no variable" in kit.user(1)
    assert [e["found"] for e in kit.events("final_var")] == [False]
    assert result.answer == "ok"


async def test_broken_code_is_shown_and_the_next_turn_recovers(kit: Kit) -> None:
    result = await run(kit, ["```repl\n1/0\n```", "```repl\nFINAL('fixed')\n```"])
    assert "ZeroDivisionError" in kit.user(1)
    assert "Traceback" in kit.user(1)
    assert kit.events("exec_end")[0]["error"]["type"] == "ZeroDivisionError"
    assert result.answer == "fixed"


# ---------------------------------------------------------------- nudges


async def test_response_without_code_or_final_is_nudged(kit: Kit) -> None:
    result = await run(kit, ["Let me think about it.", "FINAL(ok)"])
    assert kit.user(1) == NO_CODE_NUDGE
    assert (result.answer, result.iterations) == ("ok", 2)


async def test_iteration_limit_asks_once_more_without_code(kit: Kit) -> None:
    result = await run(
        kit, ["```repl\nprint(1)\n```", "```repl\nprint(2)\n```", "FINAL(best guess)"], max_iterations=2
    )
    assert (result.answer, result.stop_reason, result.iterations) == ("best guess", "max_iterations", 2)
    assert result.ok
    assert kit.user(2) == LAST_CALL.format(n=2)
    assert [e["purpose"] for e in kit.events("model_call")] == ["iteration", "iteration", "last_call"]


async def test_last_call_may_name_a_variable(kit: Kit) -> None:
    result = await run(kit, ["```repl\ntotal = 7 * 6\n```", "FINAL_VAR(total)"], max_iterations=1)
    assert (result.answer, result.stop_reason) == ("42", "max_iterations")


async def test_last_call_without_final_takes_the_text_or_the_fallback(kit: Kit) -> None:
    result = await run(kit, ["```repl\nprint(1)\n```\nFINAL(early guess)", "   "], max_iterations=1)
    assert (result.answer, result.stop_reason) == ("early guess", "max_iterations")
    other = Kit()
    result = await run(other, ["```repl\nprint(1)\n```", "it is probably 3"], max_iterations=1)
    assert result.answer == "it is probably 3"


# ---------------------------------------------------------------- compaction


async def test_window_compaction_keeps_question_and_latest_turns(kit: Kit) -> None:
    long_turn = "```repl\nprint('x' * 800)\n```"
    result = await run(
        kit,
        [long_turn] * 6 + ["FINAL(done)"],
        query="Where is the needle?",
        history_max_chars=3000,
        keep_last_turns=1,
    )
    assert result.answer == "done"
    compactions = kit.events("compaction")
    assert compactions
    assert all(c["mode"] == "window" and c["summary"] is None for c in compactions)
    last = kit.model.requests_for(model="root")[-1].messages
    assert last[1].content == "Question: Where is the needle?"
    assert "earlier turns were dropped" in last[2].content
    assert len(last) == 2 + 1 + 2  # system, question, note, and the one turn kept
    assert all(r.run == "t1" and r.depth == 0 for r in kit.model.requests_for(model="root"))


async def test_summary_compaction_asks_the_model(kit: Kit) -> None:
    long_turn = "```repl\nprint('x' * 800)\n```"
    result = await run(
        kit,
        # The history passes 3,000 characters with two turns in: iteration 3 compacts first.
        [long_turn, long_turn, "SUMMARY: x printed many times", "FINAL(done)"],
        history_max_chars=3000,
        keep_last_turns=1,
        compaction="summary",
    )
    assert result.answer == "done"
    (compaction,) = kit.events("compaction")
    assert compaction["summary"] == "SUMMARY: x printed many times"
    purposes = [e["purpose"] for e in kit.events("model_call")]
    assert purposes == ["iteration", "iteration", "compaction", "iteration"]
    assert "Summarise" in kit.user(2)
    assert "SUMMARY: x printed many times" in kit.model.requests_for(model="root")[-1].messages[2].content


# ---------------------------------------------------------------- limits


async def test_budget_stops_the_run_with_the_best_answer(kit: Kit) -> None:
    result = await run(
        kit,
        ["```repl\nprint(llm_query('a sub-call'))\n```\nFINAL(my guess)", "```repl\nprint(2)\n```"],
        max_calls=2,
    )
    assert result.stop_reason == "budget_exceeded"
    assert result.answer == "my guess"  # the prose FINAL it had to ignore
    assert "call limit of 2" in result.detail
    assert result.error is not None
    assert (result.error.code, result.error.retryable) == ("budget_exceeded", False)
    assert not result.ok
    end = kit.events("run_end")[0]
    assert (end["stop_reason"], end["answer"]) == ("budget_exceeded", "my guess")
    assert end["error"]["code"] == "budget_exceeded"
    assert end["usage"]["calls"] == 2
    assert end["usage"]["exceeded"] == "max_calls"


async def test_wall_time_stops_the_run_between_iterations(kit: Kit) -> None:
    clock = ManualClock()

    async def slow_model(_: ModelRequest) -> None:
        clock.advance(6.0)

    kit.model.before_reply = slow_model
    result = await run(
        kit,
        ["```repl\nprint(1)\n```\nFINAL(partial)", "```repl\nprint(2)\n```", "FINAL(too late)"],
        wall_time_s=10,
        clock=clock,
    )
    assert (result.stop_reason, result.answer, result.iterations) == ("wall_time", "partial", 3)
    assert "wall time of 10 s" in result.detail
    assert result.error is None
    assert len(kit.model.requests_for(model="root")) == 2
    assert result.elapsed_s == 12.0


async def test_a_timeout_past_the_deadline_is_wall_time(kit: Kit) -> None:
    clock = ManualClock()

    async def stuck(_: ModelRequest) -> None:
        clock.advance(11.0)

    kit.model.before_reply = stuck
    timeout = RemoteError("timeout", "no answer in time", retryable=True)
    result = await run(kit, [timeout], wall_time_s=10, clock=clock)
    assert result.stop_reason == "wall_time"
    assert result.error == ErrorInfo("timeout", "no answer in time", True)


# ---------------------------------------------------------------- recursion


async def test_rlm_query_runs_a_child_at_the_next_depth(kit: Kit) -> None:
    kit.model.script("t1", ["```repl\nFINAL(context.upper())\n```"], depth=1)
    result = await run(
        kit,
        [
            "```repl\nsub = rlm_query('inner question', context='inner ctx')\nprint(sub)\n```",
            "FINAL_VAR(sub)",
        ],
        max_depth=2,
    )
    assert result.answer == "INNER CTX"
    child = kit.events("child_start")
    assert [(c["depth"], c["query"]) for c in child] == [(1, "inner question")]
    assert [e["depth"] for e in kit.events("final")] == [1, 0]
    (inner,) = kit.model.requests_for(depth=1)
    assert inner.messages[1].content == "Question: inner question"
    assert [s.depth for s in kit.sandbox.sessions] == [0, 1]
    assert kit.sandbox.sessions[1].namespace["context"] == "inner ctx"
    assert "INNER CTX" in kit.user(1)


async def test_child_context_defaults_to_the_prompt(kit: Kit) -> None:
    kit.model.script("t1", ["FINAL_VAR(context)"], depth=1)
    result = await run(kit, ["```repl\nFINAL(rlm_query('just the prompt'))\n```"], max_depth=2)
    assert result.answer == "just the prompt"


async def test_max_depth_refuses_rlm_query_in_the_models_code(kit: Kit) -> None:
    result = await run(
        kit,
        [
            "```repl\ntry:\n    rlm_query('x')\nexcept RLMQueryError as e:\n    print('refused:', e)\n```",
            "FINAL(ok)",
        ],
        max_depth=1,
    )
    assert "refused: rlm_query is disabled at depth 0" in kit.user(1)
    assert result.answer == "ok"
    assert kit.sandbox.sessions[0].on_rlm_query is None
    assert not kit.events("child_start")


async def test_a_child_stopped_by_a_limit_fails_its_rlm_query(kit: Kit) -> None:
    kit.model.script("t1", ["```repl\nprint(1)\n```", "never asked"], depth=1)
    result = await run(
        kit,
        [
            "```repl\ntry:\n    rlm_query('hard')\nexcept RLMQueryError as e:\n    print('child:', e)\n```",
            "FINAL(never asked)",
        ],
        max_depth=2,
        max_calls=2,  # the root's first call and the child's first: then the budget is spent
    )
    (root_exec,) = [e for e in kit.events("exec_end") if e["depth"] == 0]
    assert root_exec["stdout"].startswith(
        "child: rlm_query failed: (rlm_failed) the recursive run stopped: budget_exceeded (run 't1': "
    )
    assert result.stop_reason == "budget_exceeded"


async def test_a_child_at_its_iteration_limit_answers_with_its_last_words(kit: Kit) -> None:
    kit.model.script("t1", ["```repl\nprint(1)\n```", "about 3"], depth=1)
    result = await run(kit, ["```repl\nFINAL(rlm_query('count'))\n```"], max_depth=2, max_iterations=1)
    assert (result.answer, result.stop_reason) == ("about 3", "final")
    assert [(e["depth"], e["stop_reason"]) for e in kit.events("final")] == [
        (1, "max_iterations"),
        (0, "final"),
    ]


async def test_a_child_stopped_by_an_error_raises_a_typed_error(kit: Kit) -> None:
    kit.model.script("t1", [RemoteError("backend_error", "provider down", retryable=True)], depth=1)
    rlm = RLM(kit.model, kit.sandbox, RunSettings(max_depth=2))
    kit.model.script("t1", ["```repl\nprint(rlm_query('q'))\n```", "FINAL(ok)"])
    await rlm.run("Q?", "ctx", run_id="t1", trajectory=kit.trajectory)
    shown = kit.user(1)
    assert (
        "rlm_query failed: (rlm_failed) the recursive run stopped: error (backend_error: provider down)"
        in shown
    )
    child_final = kit.events("final")[0]
    assert child_final["depth"] == 1
    assert child_final["error"] == {"code": "backend_error", "message": "provider down", "retryable": True}


async def test_child_run_failed_carries_the_cause() -> None:
    cause = ErrorInfo("budget_exceeded", "run 'x': call limit of 3 reached")
    error = ChildRunFailed(StopReason.BUDGET_EXCEEDED, cause.message, cause=cause)
    assert error.code == ErrorCode.RLM_FAILED
    assert ErrorInfo.of(error) == ErrorInfo(
        "rlm_failed", "the recursive run stopped: budget_exceeded (run 'x': call limit of 3 reached)"
    )
    assert (error.stop_reason, error.cause) == ("budget_exceeded", cause)


# ---------------------------------------------------------------- errors


async def test_a_model_error_ends_the_run_with_the_error_kept_whole(kit: Kit) -> None:
    rlm = RLM(kit.model, kit.sandbox, RunSettings())
    kit.model.script("t2", [RemoteError("unknown_model", "no model 'missing'")])
    result = await rlm.run("Q?", "ctx", run_id="t2", trajectory=kit.trajectory)
    assert result.stop_reason == "error"
    assert result.error == ErrorInfo("unknown_model", "no model 'missing'", False)
    assert result.detail == "unknown_model: no model 'missing'"
    kinds = [e["event"] for e in kit.trajectory.events]
    assert (kinds[0], kinds[-1]) == ("run_start", "run_end")
    assert kit.trajectory.events[-1]["error"] == {
        "code": "unknown_model",
        "message": "no model 'missing'",
        "retryable": False,
    }


async def test_a_sandbox_refusal_is_structured(kit: Kit) -> None:
    kit.sandbox.open_error = SandboxError("pool_exhausted", "no worker ready", retryable=True)
    result = await run(kit, ["FINAL(never asked)"])
    assert result.stop_reason == "error"
    assert result.error == ErrorInfo("pool_exhausted", "no worker ready", True)
    assert kit.events("run_end")[0]["error"]["retryable"] is True
    assert not kit.model.requests


async def test_cancelled_run_still_closes_its_budget_and_trajectory(kit: Kit) -> None:
    entered = asyncio.Event()

    async def hang(_: ModelRequest) -> None:
        entered.set()
        await asyncio.Event().wait()  # never set: the test cancels the run while it waits here

    kit.model.before_reply = hang
    kit.model.script("t3", ["FINAL(x)"])
    rlm = RLM(kit.model, kit.sandbox, RunSettings())
    task = asyncio.create_task(rlm.run("Q?", "ctx", run_id="t3", trajectory=kit.trajectory))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    end = kit.events("run_end")[0]
    assert (end["stop_reason"], end["detail"]) == ("error", "CancelledError: ")
    assert (await kit.model.usage("t3")).closed
    assert not kit.sandbox.open_sessions
    assert rlm.counters("t3") is None


def test_stop_reasons_keep_their_strings() -> None:
    assert [str(r) for r in StopReason] == [
        "final",
        "max_iterations",
        "budget_exceeded",
        "wall_time",
        "error",
    ]
    assert [r for r in StopReason if r.answered] == [StopReason.FINAL, StopReason.MAX_ITERATIONS]


# ---------------------------------------------------------------- overlapping runs


async def test_two_concurrent_runs_on_one_rlm_keep_separate_state() -> None:
    both_asking = asyncio.Barrier(2)  # each run's first model call waits until the other's is in flight
    model = ScriptedModelClient()
    seen: dict[str, RunCounters] = {}

    async def hold(request: ModelRequest) -> None:
        if request.model == "root" and len(model.requests_for(request.run, model="root")) == 1:
            await both_asking.wait()
            counters = rlm.counters(request.run or "")
            assert counters is not None
            seen[request.run or ""] = dataclasses.replace(counters)

    model.before_reply = hold
    sandbox = InMemorySandbox(model)
    model.script("a", ["```repl\nx = 'A' * 3\n```", "```repl\nprint(llm_query('sub'))\n```", "FINAL_VAR(x)"])
    model.script("b", ["```repl\nFINAL(context)\n```"])
    rlm = RLM(model, sandbox, RunSettings())
    ta, tb = Trajectory(None), Trajectory(None)
    a, b = await asyncio.gather(
        rlm.run("QA", "ctx-a", run_id="a", trajectory=ta), rlm.run("QB", "ctx-b", run_id="b", trajectory=tb)
    )
    assert (a.answer, a.iterations, a.stop_reason) == ("AAA", 3, "final")
    assert (b.answer, b.iterations, b.stop_reason) == ("ctx-b", 1, "final")
    # While both were in flight, each run had its own counters.
    assert seen["a"] == seen["b"] == RunCounters(iterations=1, model_calls=0, asking=1, sub_calls=0)
    # Each trajectory holds its own run only.
    assert {e["run"] for e in ta.events if "run" in e} == {"a"}
    assert {e["run"] for e in tb.events if "run" in e} == {"b"}
    assert len(events(ta, "model_call")) == 3
    assert len(events(tb, "model_call")) == 1
    assert [e["llm_calls"] for e in events(ta, "exec_end")] == [0, 1]
    # Each run was billed to its own budget.
    assert ((await model.usage("a")).calls, (await model.usage("b")).calls) == (4, 1)
    assert rlm.counters("a") is None
    assert rlm.counters("b") is None


async def test_the_same_run_id_twice_at_once_is_refused() -> None:
    model = ScriptedModelClient()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold(_: ModelRequest) -> None:
        entered.set()
        await release.wait()

    model.before_reply = hold
    model.script("same", ["FINAL(1)"])
    rlm = RLM(model, InMemorySandbox(model), RunSettings())
    first = asyncio.create_task(rlm.run("Q", "c", run_id="same"))
    await entered.wait()
    with pytest.raises(ValueError, match="already running"):
        await rlm.run("Q", "c", run_id="same")
    release.set()
    assert (await first).answer == "1"


# ---------------------------------------------------------------- sub-calls guarded before they are sent


async def test_the_fake_sandbox_refuses_oversized_prompts_and_runaway_loops_like_a_worker() -> None:
    kit = Kit(sandbox=InMemorySandbox(context_windows={"sub": 10}, max_sub_calls=3))
    result = await run(
        kit,
        [
            "```repl\nllm_query(context * 20)\n```",
            "```repl\nllm_query_batched(['ok', context * 20])\n```",
            "```repl\nfor i in range(5):\n    llm_query(str(i))\n```",
            "FINAL(done)",
        ],
    )
    assert result.answer == "done"
    assert "about 25 tokens, over the context window of 'sub' (10 tokens)" in kit.user(1)
    assert "1 of 2 prompts are over the context window" in kit.user(2)
    assert "limit of 3 per block" in kit.user(3)
    assert len(kit.model.requests_for(model="sub")) == 3  # only the loop's first three were sent
