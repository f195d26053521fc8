"""Pure units of the orchestrator: response parsing, history compaction, settings, contexts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlmq.orchestrator.contexts import ContextError, load_context
from rlmq.orchestrator.history import History
from rlmq.orchestrator.parsing import FinalText, extract_code_blocks, find_final
from rlmq.orchestrator.prompts import describe_context, system_prompt
from rlmq.orchestrator.settings import RunSettings, SettingsError, load_run_settings
from rlmq.protocol import ChatMessage


def test_blocks_in_order_repl_and_python_tags() -> None:
    text = "Look:\n```repl\nx = 1\n```\nthen\n```python\nprint(x)\n```\n```bash\nls\n```\n```\nplain\n```"
    assert extract_code_blocks(text) == ["x = 1", "print(x)"]


def test_block_containing_backticks_inside_a_longer_fence() -> None:
    text = "````repl\ns = '```'\nprint(s)\n````"
    assert extract_code_blocks(text) == ["s = '```'\nprint(s)"]


@pytest.mark.parametrize(
    ("text", "final"),
    [
        ("The answer is below.\nFINAL(42)", FinalText(answer="42")),
        ('FINAL("Paris, France")', FinalText(answer="Paris, France")),
        ("FINAL(It is (probably) blue)", FinalText(answer="It is (probably) blue")),
        ("FINAL(multi\nline answer)", FinalText(answer="multi\nline answer")),
        ("FINAL_VAR(result)", FinalText(var="result")),
        ('FINAL_VAR("result")', FinalText(var="result")),
        ("I will call FINAL later, not now.", None),
        ("no final here", None),
    ],
)
def test_find_final(text: str, final: FinalText | None) -> None:
    assert find_final(text) == final


def test_final_inside_code_is_not_prose() -> None:
    assert find_final("```repl\nFINAL(x)\n```") is None


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


def test_prompt_describes_context_and_recursion() -> None:
    prompt = system_prompt("x" * 4000, depth=0, max_depth=1, max_output_chars=20000, sub_model="sub")
    assert "4,000 characters" in prompt
    assert "llm_query_batched" in prompt
    assert "rlm_query" not in prompt
    assert "rlm_query" in system_prompt("x", depth=0, max_depth=2, max_output_chars=1, sub_model="sub")
    assert "dict of 2 entries" in describe_context({"a": "1", "b": "22"})
    assert "list of 3 items" in describe_context(["a", "b", "c"])


def test_settings_from_config_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.root]\nbackend = "echo"\n[run]\nmax_iterations = 7\ncompaction = "summary"\n')
    settings = load_run_settings(config, {"max_depth": 2, "max_calls": None})
    assert (settings.max_iterations, settings.max_depth, settings.compaction) == (7, 2, "summary")
    assert settings.limits().max_calls is None
    config.write_text("[run]\nmax_iteration = 7\n")
    with pytest.raises(SettingsError, match="unknown key 'max_iteration'"):
        load_run_settings(config, {})
    with pytest.raises(SettingsError, match="max_depth"):
        load_run_settings(None, {"max_depth": 0})
    assert load_run_settings(tmp_path / "missing.toml", {}) == RunSettings()


def test_context_from_file_json_directory(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    assert load_context(str(tmp_path / "a.txt")) == "alpha"
    (tmp_path / "b.json").write_text(json.dumps(["x", "y"]))
    assert load_context(str(tmp_path / "b.json")) == ["x", "y"]
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "one.md").write_text("1")
    (docs / "sub" / "two.txt").write_text("2")
    (docs / "blob.bin").write_bytes(b"\xff\xfe\x00")
    (docs / ".hidden").write_text("secret")
    assert load_context(str(docs)) == {"one.md": "1", "sub/two.txt": "2"}
    with pytest.raises(ContextError, match="does not exist"):
        load_context(str(tmp_path / "nope.txt"))
