"""Reading a model response: its code blocks, and a FINAL written as text.

Code runs from fenced blocks tagged ``repl`` or ``python``. A response without code blocks ends
the run if it contains ``FINAL(answer)`` or ``FINAL_VAR(name)`` as text. A FINAL next to code
blocks is ignored (models write the answer they expect before seeing their code's output).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

__all__ = ["FinalText", "extract_code_blocks", "find_final"]

# A fence opens at the start of a line with ``` (or more) and a repl/python tag, and closes with a
# line of at least as many backticks.
_FENCE = re.compile(
    r"^(?P<fence>`{3,})[ \t]*(?P<tag>repl|python|py)\b[^\n]*\n(?P<code>.*?)^(?P=fence)`*[ \t]*$",
    re.MULTILINE | re.DOTALL | re.IGNORECASE,
)
_FINAL_VAR = re.compile(r"^\s*FINAL_VAR\(\s*(?P<q>[\"']?)(?P<name>[A-Za-z_]\w*)(?P=q)\s*\)", re.MULTILINE)
_FINAL = re.compile(r"^\s*FINAL\((?P<body>.*)\)\s*$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True, slots=True)
class FinalText:
    """A FINAL found in prose: either an answer, or the name of a session variable."""

    answer: str | None = None
    var: str | None = None


def extract_code_blocks(text: str) -> list[str]:
    """The code of every ```repl / ```python block, in order."""
    return [m.group("code").rstrip("\n") for m in _FENCE.finditer(text)]


def _unquote(body: str) -> str:
    body = body.strip()
    if len(body) >= 2 and body[0] == body[-1] and body[0] in "\"'":
        try:
            value = ast.literal_eval(body)
        except (ValueError, SyntaxError):
            return body[1:-1]
        return str(value)
    return body


def find_final(text: str) -> FinalText | None:
    """The FINAL_VAR or FINAL of a response, if it has one (checked outside any code fence)."""
    prose = _FENCE.sub("", text)
    var = _FINAL_VAR.search(prose)
    if var:
        return FinalText(var=var.group("name"))
    # FINAL( ... ) may span lines; take the first FINAL( at a line start up to its last ")".
    start = re.search(r"^\s*FINAL\(", prose, re.MULTILINE)
    if start is None:
        return None
    rest = prose[start.start() :]
    match = _FINAL.match(rest)
    if match is None:
        # No closing parenthesis at a line end: take the rest of the line after FINAL(.
        line = rest.split("\n", 1)[0]
        body = line.split("FINAL(", 1)[1].rstrip(") \t")
        return FinalText(answer=_unquote(body))
    body = match.group("body")
    # FINAL(x) followed by more prose: cut at the parenthesis that balances the opening one.
    depth = 1
    for i, ch in enumerate(body):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                body = body[:i]
                break
    return FinalText(answer=_unquote(body))
