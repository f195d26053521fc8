"""The root model's history and its compaction (rlmq.orchestrator.history)."""

from __future__ import annotations

from rlmq.orchestrator.history import History
from rlmq.protocol import ChatMessage


async def test_window_compaction_keeps_system_question_and_last_turns() -> None:
    history = History("SYSTEM", "Question: what?")
    for i in range(10):
        history.add_response(f"response {i} " + "r" * 100)
        history.add_observation(f"observation {i} " + "o" * 100)

    async def never(_: list[ChatMessage]) -> str:
        raise AssertionError("window mode does not ask the model")

    result = await history.compact_if_needed(
        max_chars=1000, keep_last_turns=3, mode="window", summarise=never
    )
    assert result is not None
    assert result.dropped_turns == 7
    msgs = history.messages()
    assert msgs[0] == ChatMessage("system", "SYSTEM")
    assert msgs[1] == ChatMessage("user", "Question: what?")
    assert "7 earlier turns were dropped" in msgs[2].content
    assert [m.content.split()[1] for m in msgs[3:]] == ["7", "7", "8", "8", "9", "9"]
    assert history.chars() < result.chars_before
    # Under the limit nothing more happens.
    assert (
        await history.compact_if_needed(max_chars=10**6, keep_last_turns=3, mode="window", summarise=never)
        is None
    )


async def test_summary_compaction_asks_the_model_with_the_old_turns() -> None:
    history = History("SYSTEM", "Question: what?")
    for i in range(6):
        history.add_response(f"response {i}")
        history.add_observation(f"observation {i} " + "x" * 200)
    seen: list[list[ChatMessage]] = []

    async def summarise(messages: list[ChatMessage]) -> str:
        seen.append(messages)
        return "found half the codes; `codes` holds them"

    result = await history.compact_if_needed(
        max_chars=500, keep_last_turns=2, mode="summary", summarise=summarise
    )
    assert result is not None
    assert result.summary == "found half the codes; `codes` holds them"
    sent = seen[0]
    assert sent[1].content == "Question: what?"
    assert "response 3" in sent[-3].content
    assert "Summarise" in sent[-1].content
    msgs = history.messages()
    assert msgs[1].content == "Question: what?"
    assert "found half the codes" in msgs[2].content
    assert msgs[3].content == "response 4"
