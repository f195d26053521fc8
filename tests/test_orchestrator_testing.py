"""The orchestrator's test kit (rlmq.orchestrator.testing): the fakes behave like what they replace."""

from __future__ import annotations

import asyncio

import pytest

from rlmq.orchestrator.testing import (
    InMemorySandbox,
    InMemorySession,
    ManualClock,
    ModelRequest,
    ScriptedModelClient,
)
from rlmq.protocol import ChatMessage, ErrorCode, RemoteError, RunLimits
from rlmq.protocol.sandbox import SandboxError


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text)]


async def session(sandbox: InMemorySandbox | None = None, **options: object) -> InMemorySession:
    return await (sandbox or InMemorySandbox()).open(run="r", context="hello", **options)  # type: ignore[arg-type]


# ---------------------------------------------------------------- ScriptedModelClient


async def test_scripts_replay_per_run_and_per_depth() -> None:
    model = ScriptedModelClient()
    model.script("a", ["a1", "a2"])
    model.script("a", ["deep"], depth=1)
    model.script("b", ["b1"])
    answers = [
        (await model.complete(user("q"), model="root", run=run, depth=depth)).text
        for run, depth in [("a", 0), ("b", 0), ("a", 1), ("a", 0)]
    ]
    assert answers == ["a1", "b1", "deep", "a2"]
    assert [(r.run, r.depth) for r in model.requests_for("a")] == [("a", 0), ("a", 1), ("a", 0)]
    with pytest.raises(RemoteError) as info:
        await model.complete(user("q"), model="root", run="a", depth=0)
    assert info.value.code == ErrorCode.SCRIPT_EXHAUSTED


async def test_other_aliases_echo_and_scripted_errors_are_raised() -> None:
    model = ScriptedModelClient()
    model.script("r", [RemoteError("rate_limited", "slow down", retryable=True)])
    reply = await model.complete(user("say this"), model="sub", run="r", depth=1)
    assert (reply.text, reply.model) == ("say this", "sub")
    with pytest.raises(RemoteError) as info:
        await model.complete(user("q"), model="root", run="r")
    assert (info.value.code, info.value.retryable) == (ErrorCode.RATE_LIMITED, True)
    assert (await model.usage("r")).calls == 0  # not opened: no budget kept


async def test_budget_refuses_like_the_handler() -> None:
    clock = ManualClock()
    model = ScriptedModelClient(clock=clock)
    await model.run_open("r", RunLimits(max_calls=2))
    await model.complete(user("1"), model="sub", run="r")
    await model.complete(user("2"), model="sub", run="r")
    with pytest.raises(RemoteError, match="call limit of 2 reached") as info:
        await model.complete(user("3"), model="sub", run="r")
    assert info.value.code == ErrorCode.BUDGET_EXCEEDED
    usage = await model.run_close("r")
    assert (usage.calls, usage.exceeded, usage.closed) == (2, "max_calls", True)
    assert [r.last_user for r in model.refused] == ["3"]
    with pytest.raises(RemoteError) as closed:
        await model.complete(user("4"), model="sub", run="r")
    assert closed.value.code == ErrorCode.RUN_CLOSED

    await model.run_open("t", RunLimits(max_output_tokens=2, deadline_s=5))
    await model.complete(user("a long answer to count"), model="sub", run="t")
    with pytest.raises(RemoteError, match="output token limit"):
        await model.complete(user("x"), model="sub", run="t")
    await model.run_open("d", RunLimits(deadline_s=5))
    clock.advance(5)
    with pytest.raises(RemoteError, match="deadline of 5 s has passed"):
        await model.complete(user("x"), model="sub", run="d")


# ---------------------------------------------------------------- InMemorySandbox


async def test_session_runs_code_in_a_persistent_namespace() -> None:
    s = await session()
    first = await s.exec("x = len(context)\nprint('x is', x)")
    assert (first.stdout, first.error, first.final) == ("x is 5\n", None, None)
    second = await s.exec("import sys\nprint('warn', file=sys.stderr)\nx * 2")
    assert (second.stdout, second.stderr) == ("10\n", "warn\n")  # a last expression is echoed
    final = await s.exec("FINAL(x + 1)")
    assert (final.final, final.final_var) == ("6", None)
    named = await s.exec("FINAL_VAR('x')")
    assert (named.final, named.final_var) == ("5", "x")


async def test_session_reports_errors_cuts_output_and_closes() -> None:
    s = await session(max_output_chars=100)
    broken = await s.exec("y = 1\n1/0")
    assert broken.error is not None
    assert (broken.error.code, broken.error.type) == ("exception", "ZeroDivisionError")
    assert broken.error.traceback.startswith("Traceback")
    assert "<repl-1>" in broken.error.traceback
    missing = await s.exec("FINAL_VAR('nope')")
    assert missing.final is None
    assert missing.error is not None
    assert "no variable named 'nope'" in missing.error.message
    long = await s.exec("print('z' * 1000)")
    assert long.truncated_chars == 901
    assert "[truncated 901 characters]" in long.stdout
    await s.close()
    with pytest.raises(SandboxError) as info:
        await s.exec("1")
    assert info.value.code == ErrorCode.UNKNOWN_SESSION


async def test_llm_query_batched_sends_every_prompt_before_any_answer() -> None:
    all_in = asyncio.Barrier(5)  # no answer until all 5 requests are in flight

    async def hold(_: ModelRequest) -> None:
        await all_in.wait()

    model = ScriptedModelClient(before_reply=hold)
    s = await session(InMemorySandbox(model), depth=1)
    result = await s.exec("r = llm_query_batched([f'p{i}' for i in range(5)])\nprint(r)")
    assert result.stdout == "['p0', 'p1', 'p2', 'p3', 'p4']\n"
    assert result.llm_calls == 5
    assert {(r.run, r.depth, r.model) for r in model.requests} == {("r", 2, "sub")}


async def test_sub_call_failures_raise_in_the_code() -> None:
    model = ScriptedModelClient(scripted=("sub",))
    model.script("r", [RemoteError("backend_error", "provider down")])
    s = await session(InMemorySandbox(model))
    result = await s.exec("llm_query('q')")
    assert result.error is not None
    assert result.error.type == "LLMQueryError"
    assert result.error.message == "llm_query failed (backend_error): provider down"
    no_models = await session()
    unwired = await no_models.exec("llm_query('q')")
    assert unwired.error is not None
    assert "no model client" in unwired.error.message


async def test_a_second_exec_while_one_runs_is_refused() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def hold(_: ModelRequest) -> None:
        entered.set()
        await release.wait()

    s = await session(InMemorySandbox(ScriptedModelClient(before_reply=hold)))
    running = asyncio.create_task(s.exec("print(llm_query('slow'))"))
    await entered.wait()
    with pytest.raises(SandboxError) as info:
        await s.exec("1")
    assert info.value.code == ErrorCode.SESSION_BUSY
    release.set()
    assert (await running).stdout == "slow\n"


async def test_rlm_query_calls_back_or_refuses() -> None:
    async def child(prompt: str, context: object) -> str:
        return f"{prompt}/{context}"

    s = await session(max_depth=2, on_rlm_query=child)
    assert (await s.exec("rlm_query('q', context=[1])")).stdout == "'q/[1]'\n"
    flat = await session(max_depth=1, on_rlm_query=child)
    refused = await flat.exec("rlm_query('q')")
    assert refused.error is not None
    assert refused.error.type == "RLMQueryError"
    assert refused.error.message.startswith("rlm_query is disabled at depth 0 (max_depth=1)")


async def test_open_error_is_raised_once() -> None:
    sandbox = InMemorySandbox(open_error=SandboxError("pool_exhausted", "busy", retryable=True))
    with pytest.raises(SandboxError):
        await session(sandbox)
    assert (await session(sandbox)).closed is False
    assert len(sandbox.open_sessions) == 1


async def test_a_failed_batch_names_the_prompts_that_failed() -> None:
    def reply(request: ModelRequest) -> str:
        if request.last_user == "bad":
            raise RemoteError("too_large", "prompt too long")
        return request.last_user

    s = await session(InMemorySandbox(ScriptedModelClient(reply=reply)))
    result = await s.exec("llm_query_batched(['ok', 'bad', 'ok', 'bad'])")
    assert result.error is not None
    assert result.error.message == (
        "llm_query_batched: 2 of 4 prompts failed (indexes 1, 3); first error, at index 1: "
        "(too_large) prompt too long"
    )
