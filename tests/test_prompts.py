"""What the root model is told (rlmq.orchestrator.prompts)."""

from __future__ import annotations

import pytest

from rlmq.orchestrator.prompts import describe_context, last_call_prompt, no_code_nudge, system_prompt


def test_prompt_describes_context_and_recursion() -> None:
    prompt = system_prompt("x" * 4000, depth=0, max_depth=1, max_output_chars=20000, sub_model="sub")
    assert "4,000 characters" in prompt
    assert "llm_query_batched" in prompt
    assert "rlm_query" not in prompt
    assert "rlm_query" in system_prompt("x", depth=0, max_depth=2, max_output_chars=1, sub_model="sub")
    assert "dict of 2 entries" in describe_context({"a": "1", "b": "22"})
    assert "list of 3 items" in describe_context(["a", "b", "c"])


@pytest.mark.parametrize(
    ("endings", "taught", "not_taught"),
    [
        ("final", "`FINAL_VAR(name)`", 'answer["ready"]'),
        ("answer", 'answer["ready"] = True', "FINAL_VAR"),
        ("both", 'answer["ready"] = True', None),
    ],
)
def test_the_endings_setting_chooses_what_is_taught(
    endings: str, taught: str, not_taught: str | None
) -> None:
    prompt = system_prompt("x", depth=0, max_depth=1, max_output_chars=100, sub_model="sub", endings=endings)
    assert taught in prompt
    assert "SHOW_VARS()" in prompt
    if not_taught is not None:
        assert not_taught not in prompt
    assert "FINAL" in no_code_nudge("both")
    assert 'answer["ready"]' in no_code_nudge("answer")
    assert last_call_prompt("final", 3).startswith("You have used all 3 iterations.")


def test_the_sub_models_window_is_told_when_known() -> None:
    told = system_prompt(
        "x", depth=0, max_depth=1, max_output_chars=100, sub_model="sub", sub_window_tokens=32_768
    )
    assert "about 32,768 tokens" in told
    assert "raises an error before it is sent" in told
    assert "about 100k characters" in system_prompt(
        "x", depth=0, max_depth=1, max_output_chars=100, sub_model="sub"
    )
