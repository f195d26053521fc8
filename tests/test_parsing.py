"""Reading a model response (rlmq.orchestrator.parsing): code blocks, and FINAL written as text."""

from __future__ import annotations

import pytest

from rlmq.orchestrator.parsing import FinalText, extract_code_blocks, find_final


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
