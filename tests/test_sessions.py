"""Sessions: many questions over one context (``RLM.session``, ``orchestrator.loop.Conversation``).

Real handler, pool and worker processes with the script backend, through ``from rlmq import RLM``:
a session's questions share one run id, so the root model's script runs on from one question to
the next. The history's side (``History.follow_up``) and the loop's are also tested in memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlmq import RLM
from rlmq.orchestrator import RLM as Loop
from rlmq.orchestrator import RunSettings, StopReason
from rlmq.orchestrator.history import History
from rlmq.orchestrator.testing import InMemorySandbox, ScriptedModelClient
from rlmq.orchestrator.trajectory import rebuild_history


def repl(code: str) -> str:
    return f"```repl\n{code}\n```"


SCRIPTS = {
    # Question 1 defines `total` and the worker's pid; question 2 uses both.
    "chat": [
        repl("import os\ntotal = len(context)\npid = os.getpid()\nFINAL(f'first:{total}')"),
        repl("FINAL(f'second:{total * 2}:same worker {pid == os.getpid()}')"),
    ],
    "one_call": [repl("FINAL('only one')"), repl("FINAL('never reached')")],
}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sessions")
    lines = []
    for alias, script in SCRIPTS.items():
        (directory / f"{alias}.json").write_text(json.dumps(script))
        lines += [f"[models.{alias}]", 'backend = "script"', f'path = "{alias}.json"', ""]
    lines += ["[models.sub]", 'backend = "echo"', "", "[sandbox]", "workers = 2", "uid_base = false"]
    (directory / "rlmq.toml").write_text("\n".join(lines) + "\n")
    return directory / "rlmq.toml"


@pytest.fixture(scope="module")
def rlm(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RLM]:
    runs = tmp_path_factory.mktemp("runs")
    with RLM.from_config(config, trajectory_dir=runs, root_model="chat") as shared:
        yield shared


def read(path: Path | None) -> list[dict[str, Any]]:
    assert path is not None
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- real processes


def test_a_session_keeps_a_variable_between_two_questions(rlm: RLM) -> None:
    with rlm.session("abcdef") as s:
        a = s.ask("How long is it?")
        b = s.ask("And twice that?")
    assert (a.answer, a.stop_reason) == ("first:6", StopReason.FINAL)
    # The second answer uses the first's variable, in the same worker: the context was loaded once.
    assert (b.answer, b.stop_reason) == ("second:12:same worker True", StopReason.FINAL)
    assert s.closed


def test_the_history_carries_the_earlier_question_and_answer(rlm: RLM) -> None:
    with rlm.session("abcdef") as s:
        s.ask("How long is it?")
        b = s.ask("And twice that?")
    calls = rebuild_history(read(b.trajectory), "0")
    messages = [(m["role"], m["content"]) for m in calls[1]]
    assert messages[1:] == [
        ("user", "Question: How long is it?"),
        ("assistant", SCRIPTS["chat"][0]),
        ("user", "[Your answer was recorded: first:6]\n\nNext question: And twice that?"),
    ]
    assert "This is a conversation" in messages[0][1]


def test_one_run_one_trajectory_and_each_question_counts_its_own_usage(rlm: RLM) -> None:
    with rlm.session("abcdef") as s:
        a = s.ask("q1")
        b = s.ask("q2")
    assert a.run_id == b.run_id == s.run_id
    assert a.trajectory == b.trajectory == s.trajectory
    names = [e["event"] for e in read(s.trajectory)]
    assert names.count("run_start") == names.count("run_end") == 1
    assert [e["query"] for e in read(s.trajectory) if e["event"] == "ask"] == ["q1", "q2"]
    assert (a.calls, b.calls) == (1, 1)  # each question's own, not the running total
    assert s.usage is not None
    assert s.usage.calls == 2


def test_the_sessions_budget_spans_its_questions(rlm: RLM) -> None:
    with rlm.session("abc", root_model="one_call", max_calls=1) as s:
        first = s.ask("q1")
        second = s.ask("q2")
    assert (first.answer, first.stop_reason) == ("only one", StopReason.FINAL)
    assert second.stop_reason == StopReason.BUDGET_EXCEEDED


def test_the_async_twin(rlm: RLM) -> None:
    async def main() -> tuple[str, str]:
        async with rlm.asession("abcdef") as s:
            a = await s.aask("How long is it?")
            b = await s.aask("And twice that?")
        return a.answer, b.answer

    assert asyncio.run(main()) == ("first:6", "second:12:same worker True")


def test_a_question_opens_the_session_and_close_is_idempotent(rlm: RLM) -> None:
    s = rlm.session("abcdef")
    assert s.ask("q").answer == "first:6"  # no `with`: the first question opens it
    s.close()
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.ask("again")


def test_closing_the_rlm_closes_its_sessions(config: Path, tmp_path: Path) -> None:
    with RLM.from_config(config, trajectory_dir=tmp_path, root_model="chat") as own:
        s = own.session("abcdef").open()
        assert s.ask("q").answer == "first:6"
    assert s.closed
    assert [e["event"] for e in read(s.trajectory)][-1] == "run_end"
    s.close()  # after the RLM's close: nothing left to do


# ---------------------------------------------------------------- in memory


def test_a_compacted_follow_up_keeps_the_question_being_answered() -> None:
    history = History("system", "Question: first")
    history.add_response("r1")
    history.add_observation("o1")
    history.add_response("FINAL(a)")
    history.follow_up("second?", "a")
    for i in range(3):
        history.add_response(f"r{i + 2}")
        history.add_observation("x" * 100)

    async def never(messages: Any) -> str:
        raise AssertionError("window mode asks for no summary")

    done = asyncio.run(
        history.compact_if_needed(max_chars=10, keep_last_turns=1, mode="window", summarise=never)
    )
    assert done is not None
    assert done.dropped_turns == 4
    assert history.summary is not None
    assert history.summary.endswith("[The question you are answering now: second?]")


def test_a_follow_up_after_no_answer_says_so() -> None:
    history = History("system", "Question: first")
    history.add_response("r1")
    history.add_observation("o1")
    history.follow_up("second?", None)
    assert (
        history.turns[-1][1]
        == "o1\n\n[The previous question stopped without an answer.]\n\nNext question: second?"
    )


def test_the_answer_dict_is_reset_between_questions() -> None:
    models = ScriptedModelClient()
    models.script(
        "run-c",
        [
            repl('answer["content"] = "one"\nanswer["ready"] = True'),
            repl("x = 2"),  # would end at once on the first question's answer dict, were it kept
            repl("FINAL(f'two:{x}')"),
        ],
    )
    loop = Loop(models, InMemorySandbox(models), RunSettings())

    async def main() -> tuple[str, str, int]:
        conversation = await loop.conversation("ctx", run_id="run-c")
        try:
            first = await conversation.ask("q1")
            second = await conversation.ask("q2")
        finally:
            await conversation.close()
        return first.answer, second.answer, second.iterations

    assert asyncio.run(main()) == ("one", "two:2", 2)


def test_per_question_settings_and_the_wall_clock_of_each_question() -> None:
    models = ScriptedModelClient()
    models.script("run-i", [repl("print(1)"), "no code", repl("FINAL('b')")])
    loop = Loop(models, InMemorySandbox(models), RunSettings(max_iterations=5))

    async def main() -> list[tuple[str, StopReason, int]]:
        conversation = await loop.conversation("ctx", run_id="run-i")
        try:
            first = await conversation.ask("q1", RunSettings(max_iterations=1))
            second = await conversation.ask("q2")
        finally:
            await conversation.close()
        return [(r.answer, r.stop_reason, r.iterations) for r in (first, second)]

    # Question 1 stops at its own limit (the last call answers "no code"); question 2 has five.
    assert asyncio.run(main()) == [("no code", StopReason.MAX_ITERATIONS, 1), ("b", StopReason.FINAL, 1)]
