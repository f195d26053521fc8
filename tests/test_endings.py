"""How runs end: the endings real root models write, and the fallbacks when a run stops early.

A regression suite in one table. Every ``Case`` is a habit seen in real transcripts (gpt-4o,
gpt-5, qwen3 under the reference implementation, rlms on PyPI), written as the responses of a
scripted root model, with the answer, the stop reason and the ``Ending`` it must produce. Each
case runs twice: on the loop's in-memory fakes (fast), and through a real handler and a real
pool whose workers are real processes. When a new habit turns up, add a case here.

The table of endings and fallbacks these cases pin down is in docs/orchestrator.md ("Endings").
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
import zmq.asyncio

from rlmq.lmhandler.backends import Backend, BackendError, BackendRequest, Completion, estimate_tokens
from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.orchestrator.loop import CUT_OFF_NOTE, RLM, Ending, RunResult, StopReason
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.testing import (
    InMemorySandbox,
    ManualClock,
    ModelRequest,
    ScriptedModelClient,
    ScriptedReply,
    events,
)
from rlmq.orchestrator.trajectory import Trajectory
from rlmq.protocol import AsyncHandlerClient, ErrorCode, RemoteError, RlmqError, Usage
from rlmq.protocol.sandbox import AsyncSandboxClient
from rlmq.sandbox.testing import running_pool

CONTEXT = "2024-01-05 alice: error in billing\n2024-01-06 bob: deploy ok\n2024-02-11 alice: error in search\n"
COUNT_ERRORS = (
    '```repl\nerrors = [line for line in context.splitlines() if "error" in line]\n'
    "count = len(errors)\nprint(count)\n```"
)

Response = str | ScriptedReply | RlmqError


@dataclass(frozen=True)
class Case:
    id: str
    habit: str  # what a real model did, that this case keeps working
    responses: tuple[Response, ...]
    answer: str
    stop: StopReason
    ending: Ending
    iterations: int
    settings: Mapping[str, Any] = field(default_factory=dict)
    seen: str | None = None  # text the root model must have been shown before the end
    clock_step_s: float | None = None  # move a manual clock this much per root call (fakes only)


CASES = [
    # ------------------------------------------------------------ endings in code
    Case(
        "final_var_value_in_code",
        "gpt-5 and qwen3 pass the variable itself, not its name, to FINAL_VAR in code",
        (
            '```repl\nusers = sorted({line.split()[1].rstrip(":") for line in context.splitlines()})\n'
            'result = ", ".join(users)\nFINAL_VAR(result)\n```',
        ),
        "alice, bob",
        StopReason.FINAL,
        Ending.CODE_FINAL_VAR,
        1,
    ),
    Case(
        "final_var_of_an_expression_in_code",
        "FINAL_VAR given a computed value that is not a str",
        ('```repl\nerrors = [l for l in context.splitlines() if "error" in l]\nFINAL_VAR(len(errors))\n```',),
        "2",
        StopReason.FINAL,
        Ending.CODE_FINAL_VAR,
        1,
    ),
    Case(
        "final_var_quoted_name_in_code",
        "the documented form: the variable's name as a string",
        (COUNT_ERRORS + '\n```repl\nFINAL_VAR("count")\n```',),
        "2",
        StopReason.FINAL,
        Ending.CODE_FINAL_VAR,
        1,
    ),
    Case(
        "final_in_code_as_a_bare_last_line",
        "FINAL(x) as the block's last line: a call, not an expression to echo",
        (COUNT_ERRORS + "\n```repl\nFINAL(f'{count} errors')\n```",),
        "2 errors",
        StopReason.FINAL,
        Ending.CODE_FINAL,
        1,
    ),
    # ------------------------------------------------------------ the answer dict (rlms >= 0.1.2)
    Case(
        "answer_dict_over_two_turns",
        "models prompted for rlms >= 0.1.2 fill answer['content'], look, then set answer['ready']",
        (
            '```repl\ndates = [line.split()[0] for line in context.splitlines() if "error" in line]\n'
            'answer["content"] = ", ".join(dates)\nprint(answer)\n```',
            '```repl\nanswer["content"] = "Errors on " + answer["content"]\nanswer["ready"] = True\n```',
        ),
        "Errors on 2024-01-05, 2024-02-11",
        StopReason.FINAL,
        Ending.ANSWER_DICT,
        2,
        settings={"endings": "answer"},
        seen="'ready': False",
    ),
    Case(
        "answer_dict_under_the_final_prompt",
        "a model trained on the answer dict, prompted for FINAL: its ending is accepted anyway",
        ('```repl\nanswer["content"] = "2 errors"\nanswer["ready"] = True\n```',),
        "2 errors",
        StopReason.FINAL,
        Ending.ANSWER_DICT,
        1,
    ),
    Case(
        "answer_dict_ready_without_content",
        "ready set before the content: no empty answer, the model is told and fills it in",
        (
            '```repl\nanswer["ready"] = True\n```',
            '```repl\nanswer["content"] = "2 errors"\n```',
        ),
        "2 errors",
        StopReason.FINAL,
        Ending.ANSWER_DICT,
        2,
        seen='answer["content"] is empty',
    ),
    # ------------------------------------------------------------ endings in prose
    Case(
        "code_then_prose_final_var",
        "gpt-4o sets a variable in code, then names it in prose after the block, in one response",
        ("Let me count the error lines.\n" + COUNT_ERRORS + "\nFINAL_VAR(count)",),
        "2",
        StopReason.FINAL,
        Ending.FINAL_VAR_AFTER_CODE,
        1,
    ),
    Case(
        "code_then_prose_final_var_of_a_missing_name",
        "the prose names a variable the code did not define: not taken, the model is told",
        (COUNT_ERRORS + "\nFINAL_VAR(total)", "FINAL_VAR(count)"),
        "2",
        StopReason.FINAL,
        Ending.PROSE_FINAL_VAR,
        2,
        seen="FINAL_VAR(total) was not taken",
    ),
    Case(
        "prose_final_beside_code_stays_ignored",
        "the answer written before the code's output was seen (a hallucinated 10) is not taken",
        (
            "```repl\nprint(len(context.splitlines()))\n```\nFINAL(There are 10 lines.)",
            "FINAL(There are 3 lines.)",
        ),
        "There are 3 lines.",
        StopReason.FINAL,
        Ending.PROSE_FINAL,
        2,
        seen="3",
    ),
    Case(
        "final_cut_off_mid_line",
        "a response at its max_tokens limit ends inside FINAL(: asked again, not taken half",
        (
            ScriptedReply("The error dates are:\nFINAL(2024-01-05 and 2024-02-", "max_tokens"),
            "FINAL(2024-01-05 and 2024-02-11)",
        ),
        "2024-01-05 and 2024-02-11",
        StopReason.FINAL,
        Ending.PROSE_FINAL,
        2,
        seen=CUT_OFF_NOTE,
    ),
    Case(
        "final_without_its_closing_parenthesis",
        "the parenthesis forgotten (the response was not cut): the rest of the text is the answer",
        ("Counted.\nFINAL(2 errors, both from alice",),
        "2 errors, both from alice",
        StopReason.FINAL,
        Ending.PROSE_FINAL,
        1,
    ),
    *(
        Case(
            f"prose_final_var_{label}",
            "FINAL_VAR as text names a variable, quoted or not",
            (COUNT_ERRORS, f"FINAL_VAR({name})"),
            "2",
            StopReason.FINAL,
            Ending.PROSE_FINAL_VAR,
            2,
        )
        for label, name in (("unquoted", "count"), ("double_quoted", '"count"'), ("single_quoted", "'count'"))
    ),
    Case(
        "bare_expression_as_the_last_line",
        "a block ending in a bare expression: echoed like a REPL, no ending, the model answers next",
        (
            '```repl\nsummary = "; ".join(l.split(": ")[1] for l in context.splitlines())\nsummary\n```',
            "FINAL_VAR(summary)",
        ),
        "error in billing; deploy ok; error in search",
        StopReason.FINAL,
        Ending.PROSE_FINAL_VAR,
        2,
        seen="'error in billing; deploy ok; error in search'",
    ),
    Case(
        "show_vars_as_the_last_line",
        "SHOW_VARS() of the reference implementation, to see what is defined",
        (COUNT_ERRORS + "\n```repl\nSHOW_VARS()\n```", "FINAL_VAR(count)"),
        "2",
        StopReason.FINAL,
        Ending.PROSE_FINAL_VAR,
        2,
        seen="count (int)",
    ),
    # ------------------------------------------------------------ fallbacks when a run stops early
    Case(
        "budget_stop_reads_the_ignored_final_var",
        "FINAL_VAR in prose after a block that failed, then the budget ran out: its variable",
        (
            '```repl\nerrors = [l for l in context.splitlines() if "error" in l]\n'
            "first = errors[0].split()[0]\nprint(errors[5])\n```\nFINAL_VAR(first)",
        ),
        "2024-01-05",
        StopReason.BUDGET_EXCEEDED,
        Ending.FALLBACK_FINAL_VAR,
        2,
        settings={"max_calls": 1},
    ),
    Case(
        "error_stop_reads_the_answer_dict",
        "a draft in answer['content'], never made ready, then the provider failed",
        (
            '```repl\nanswer["content"] = "2 errors (draft)"\n```',
            RemoteError(ErrorCode.BACKEND_ERROR, "the provider is down"),
        ),
        "2 errors (draft)",
        StopReason.ERROR,
        Ending.FALLBACK_ANSWER_DICT,
        2,
    ),
    Case(
        "budget_stop_keeps_the_last_final_literal",
        "a FINAL literal beside code (not taken), then the budget ran out: the literal is all there is",
        ("```repl\nprint(len(context))\n```\nFINAL(about 2 errors)",),
        "about 2 errors",
        StopReason.BUDGET_EXCEEDED,
        Ending.FALLBACK_FINAL,
        2,
        settings={"max_calls": 1},
    ),
    Case(
        "wall_time_prefers_the_variable_to_the_literal",
        "both a FINAL_VAR and a FINAL were not taken: the executed value wins over the imagined one",
        (
            COUNT_ERRORS + "\nFINAL(maybe 5)",
            "```repl\nprint(errors)\n```\nFINAL_VAR(count)\n```repl\nprint('more')\n```",
        ),
        "2",
        StopReason.WALL_TIME,
        Ending.FALLBACK_FINAL_VAR,
        3,
        settings={"wall_time_s": 10},
        clock_step_s=6,
    ),
    # ------------------------------------------------------------ the last call ("answer now")
    Case(
        "last_call_prose_final_var",
        "asked for the answer at the iteration limit, the model names its variable",
        (COUNT_ERRORS, "FINAL_VAR(count)"),
        "2",
        StopReason.MAX_ITERATIONS,
        Ending.PROSE_FINAL_VAR,
        1,
        settings={"max_iterations": 1},
    ),
    Case(
        "last_call_answer_dict_in_code",
        "asked for no code, a model of the answer dict still answers with a block",
        (COUNT_ERRORS, '```repl\nanswer["content"] = f"{count} errors"\nanswer["ready"] = True\n```'),
        "2 errors",
        StopReason.MAX_ITERATIONS,
        Ending.ANSWER_DICT,
        1,
        settings={"max_iterations": 1},
    ),
    Case(
        "last_call_final_beside_code",
        "code and a FINAL in the last response: no later turn to wait for, the FINAL is taken",
        (COUNT_ERRORS, "```repl\nprint(count)\n```\nFINAL(2 errors)"),
        "2 errors",
        StopReason.MAX_ITERATIONS,
        Ending.LAST_CALL_FINAL,
        1,
        settings={"max_iterations": 1},
    ),
    Case(
        "last_call_cut_off",
        "the last answer cut at max_tokens: the part that came is better than nothing",
        (COUNT_ERRORS, ScriptedReply("FINAL(Two errors: billing on 2024-01-05 and sea", "max_tokens")),
        "Two errors: billing on 2024-01-05 and sea",
        StopReason.MAX_ITERATIONS,
        Ending.LAST_CALL_FINAL,
        1,
        settings={"max_iterations": 1},
    ),
    Case(
        "last_call_plain_text",
        "the answer as plain text, with no FINAL at all: the last resort",
        (COUNT_ERRORS, "There are 2 error lines."),
        "There are 2 error lines.",
        StopReason.MAX_ITERATIONS,
        Ending.LAST_CALL_TEXT,
        1,
        settings={"max_iterations": 1},
    ),
    Case(
        "last_call_text_loses_to_the_answer_dict",
        "a draft answer from code beats the words of a model that gave up",
        ('```repl\nanswer["content"] = "2 errors"\n```', "I ran out of iterations."),
        "2 errors",
        StopReason.MAX_ITERATIONS,
        Ending.FALLBACK_ANSWER_DICT,
        1,
        settings={"max_iterations": 1},
    ),
]


def _check(case: Case, result: RunResult, shown: list[str], trajectory: Trajectory) -> None:
    assert (result.answer, result.stop_reason, result.ending, result.iterations) == (
        case.answer,
        case.stop,
        case.ending,
        case.iterations,
    ), case.habit
    (final,) = [e for e in events(trajectory, "final") if e["depth"] == 0]
    assert final["ending"] == case.ending
    if case.seen is not None:
        assert any(case.seen in text for text in shown), f"the model was never shown {case.seen!r}"


# ---------------------------------------------------------------- on the fakes


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_ending_on_the_fakes(case: Case) -> None:
    model = ScriptedModelClient()
    sandbox = InMemorySandbox(model)
    clock = ManualClock()
    if case.clock_step_s is not None:
        step = case.clock_step_s

        async def tick(request: ModelRequest) -> None:
            clock.advance(step)

        model.before_reply = tick
        model.clock = clock
    model.script("r", list(case.responses))
    trajectory = Trajectory(None)
    rlm = RLM(
        model,
        sandbox,
        RunSettings(**case.settings).validated(),
        clock=clock if case.clock_step_s is not None else time.monotonic,
    )
    result = await rlm.run("How many error lines are there?", CONTEXT, run_id="r", trajectory=trajectory)
    shown = [r.last_user for r in model.requests_for(model="root")]
    _check(case, result, shown, trajectory)
    assert not sandbox.open_sessions


# ---------------------------------------------------------------- through real processes


class ReplayModel(Backend):
    """The root model for the end-to-end runs: each run id replays its responses (with their stop
    reasons), an ``RlmqError`` entry fails the call with its code, as a provider's failure would."""

    def __init__(self) -> None:
        self.scripts: dict[str | None, list[Response]] = {}
        self.shown: dict[str | None, list[str]] = {}

    async def complete(self, request: BackendRequest) -> Completion:
        last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        self.shown.setdefault(request.run, []).append(last_user)
        queue = self.scripts.get(request.run) or []
        if not queue:
            raise BackendError(ErrorCode.SCRIPT_EXHAUSTED, "no response left", retryable=False)
        entry = queue.pop(0)
        if isinstance(entry, RlmqError):
            raise BackendError(ErrorCode(entry.code), entry.message, retryable=False)
        text, stop = (
            (entry.text, entry.stop_reason) if isinstance(entry, ScriptedReply) else (entry, "end_turn")
        )
        prompt = sum(estimate_tokens(m.content) for m in request.messages)
        return Completion(text, request.model, Usage(prompt, estimate_tokens(text)), stop)


@dataclass
class Stack:
    model: ReplayModel
    handler: AsyncHandlerClient
    sandbox: AsyncSandboxClient


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    """One handler and one pool for every end-to-end case (each case is its own run id)."""
    ctx = zmq.asyncio.Context()
    model = ReplayModel()
    try:
        async with (
            running_handler({"root": echo_model(), "sub": echo_model()}, backends={"root": model}) as h,
            running_pool(h.address or "", workers=2) as pool,
            AsyncHandlerClient(h.address or "", context=ctx) as hc,
            AsyncSandboxClient(pool.address, context=ctx) as sc,
        ):
            yield Stack(model, hc, sc)
    finally:
        ctx.term()


E2E = [c for c in CASES if c.clock_step_s is None]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", E2E, ids=[c.id for c in E2E])
async def test_ending_through_real_processes(stack: Stack, case: Case) -> None:
    run_id = f"e2e-{case.id}"
    stack.model.scripts[run_id] = list(case.responses)
    trajectory = Trajectory(None)
    rlm = RLM(stack.handler, stack.sandbox, RunSettings(**case.settings).validated())
    result = await rlm.run("How many error lines are there?", CONTEXT, run_id=run_id, trajectory=trajectory)
    _check(case, result, stack.model.shown.get(run_id, []), trajectory)


def test_every_ending_has_a_case() -> None:
    """A new ``Ending`` comes with its case in this table."""
    covered = {c.ending for c in CASES}
    assert covered == set(Ending) - {Ending.NONE}
