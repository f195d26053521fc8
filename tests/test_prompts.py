"""What the root model is told (rlmq.orchestrator.prompts)."""

from __future__ import annotations

from rlmq.orchestrator.prompts import describe_context, system_prompt


def test_prompt_describes_context_and_recursion() -> None:
    prompt = system_prompt("x" * 4000, depth=0, max_depth=1, max_output_chars=20000, sub_model="sub")
    assert "4,000 characters" in prompt
    assert "llm_query_batched" in prompt
    assert "rlm_query" not in prompt
    assert "rlm_query" in system_prompt("x", depth=0, max_depth=2, max_output_chars=1, sub_model="sub")
    assert "dict of 2 entries" in describe_context({"a": "1", "b": "22"})
    assert "list of 3 items" in describe_context(["a", "b", "c"])
