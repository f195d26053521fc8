"""Reading a model response (rlmq.orchestrator.parsing): code blocks, and FINAL written as text."""

from __future__ import annotations

import pytest

from rlmq.orchestrator.parsing import (
    FinalText,
    extract_code_blocks,
    find_final,
    prose_after_code,
    without_code,
)


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


@pytest.mark.parametrize(
    ("text", "final"),
    [
        # cut off at the length limit, or the parenthesis forgotten: the rest of the text
        (
            "The dates are:\nFINAL(2024-01-05 and 2024-02-",
            FinalText(answer="2024-01-05 and 2024-02-", complete=False),
        ),
        ("FINAL(a list:\n- one\n- tw", FinalText(answer="a list:\n- one\n- tw", complete=False)),
        ('FINAL("a quoted answer cut', FinalText(answer="a quoted answer cut", complete=False)),
        # quotes are honoured only in a quoted body; apostrophes in prose are text
        ('FINAL("a ) inside quotes")', FinalText(answer="a ) inside quotes")),
        ("FINAL(it's (really) blue) and more prose", FinalText(answer="it's (really) blue")),
        ("FINAL(42) is my answer", FinalText(answer="42")),
        ("FINAL_VAR('result')", FinalText(var="result")),
        ("  FINAL_VAR( result )", FinalText(var="result")),
    ],
)
def test_find_final_cut_off_and_quoted(text: str, final: FinalText) -> None:
    assert find_final(text) == final


def test_prose_after_the_last_block_and_without_code() -> None:
    text = "First.\n```repl\nx = 1\n```\nmiddle\n```repl\ny = 2\n```\nFINAL_VAR(y)"
    assert prose_after_code(text) == "\nFINAL_VAR(y)"
    assert prose_after_code("no code at all") == ""
    assert without_code(text) == "First.\n\nmiddle\n\nFINAL_VAR(y)"
