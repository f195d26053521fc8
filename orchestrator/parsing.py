"""Reading a model response: its code blocks, and a FINAL written as text.

Code runs from fenced blocks tagged ``repl`` or ``python``. ``FINAL(answer)`` or
``FINAL_VAR(name)`` written as text, at the start of a line and outside any code fence, is a
prose ending; what the loop does with it depends on what stands beside it (docs/orchestrator.md,
"Endings").
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

__all__ = ["FinalText", "extract_code_blocks", "find_final", "prose_after_code", "without_code"]

# A fence opens at the start of a line with ``` (or more) and a repl/python tag, and closes with a
# line of at least as many backticks.
_FENCE = re.compile(
    r"^(?P<fence>`{3,})[ \t]*(?P<tag>repl|python|py)\b[^\n]*\n(?P<code>.*?)^(?P=fence)`*[ \t]*$",
    re.MULTILINE | re.DOTALL | re.IGNORECASE,
)
_FINAL_VAR = re.compile(r"^\s*FINAL_VAR\(\s*(?P<q>[\"']?)(?P<name>[A-Za-z_]\w*)(?P=q)\s*\)", re.MULTILINE)
_FINAL_START = re.compile(r"^[ \t]*FINAL\(", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class FinalText:
    """A FINAL found in prose: either an answer, or the name of a session variable.

    ``complete`` is False for a ``FINAL(`` whose closing parenthesis never came: the response
    was cut off (or the model forgot it), and ``answer`` is everything after the parenthesis.
    """

    answer: str | None = None
    var: str | None = None
    complete: bool = True


def extract_code_blocks(text: str) -> list[str]:
    """The code of every ```repl / ```python block, in order."""
    return [m.group("code").rstrip("\n") for m in _FENCE.finditer(text)]


def without_code(text: str) -> str:
    """The response with its code blocks taken out: what it says in words."""
    return _FENCE.sub("", text)


def prose_after_code(text: str) -> str:
    """The text after the response's last code block ("" when there is none)."""
    ends = [m.end() for m in _FENCE.finditer(text)]
    return text[ends[-1] :] if ends else ""


def _unquote(body: str, *, complete: bool) -> str:
    body = body.strip()
    if len(body) >= 2 and body[0] == body[-1] and body[0] in "\"'":
        try:
            value = ast.literal_eval(body)
        except (ValueError, SyntaxError):
            return body[1:-1]
        return str(value)
    if not complete and body[:1] in ("'", '"'):
        return body[1:].strip()  # a string literal cut off before its closing quote
    return body


def _closing(text: str, start: int) -> int | None:
    """The index of the parenthesis that closes the one before ``start``, or None.

    Parentheses nest; inside a quoted body (one that starts with a quote) quotes are honoured,
    so ``FINAL("a) b")`` reads whole. Apostrophes in unquoted prose (``it's``) are just text.
    """
    depth = 1
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    quote = text[i] if i < len(text) and text[i] in "\"'" else None
    if quote is not None:
        i += 1
        while i < len(text) and text[i] != quote:
            i += 2 if text[i] == "\\" else 1
        i += 1
    while i < len(text):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def find_final(text: str) -> FinalText | None:
    """The FINAL_VAR or FINAL of a response, if it has one (looked for outside any code fence)."""
    prose = without_code(text)
    var = _FINAL_VAR.search(prose)
    if var:
        return FinalText(var=var.group("name"))
    start = _FINAL_START.search(prose)
    if start is None:
        return None
    end = _closing(prose, start.end())
    if end is None:
        # Cut off (a response at its length limit), or the parenthesis was forgotten.
        return FinalText(answer=_unquote(prose[start.end() :], complete=False), complete=False)
    return FinalText(answer=_unquote(prose[start.end() : end], complete=True))
