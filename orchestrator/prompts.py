"""What the root model is told about its environment."""

from __future__ import annotations

from typing import Any

__all__ = [
    "ENDINGS",
    "describe_context",
    "last_call_prompt",
    "no_code_nudge",
    "system_prompt",
]

# Which endings the system prompt teaches (RunSettings.endings). Every ending is accepted
# whatever is taught: a model trained on the other one still ends its run.
ENDINGS = ("final", "answer", "both")


def _how_to_answer(endings: str) -> str:
    """How the model is told to give its answer, in one phrase."""
    if endings == "answer":
        return 'set answer["content"] to your answer and answer["ready"] = True in a ```repl block'
    if endings == "both":
        return (
            'FINAL(your answer), FINAL_VAR(variable_name), or answer["content"] = ... with '
            'answer["ready"] = True'
        )
    return "FINAL(your answer) or FINAL_VAR(variable_name)"


def no_code_nudge(endings: str = "final") -> str:
    """What a response with neither code nor an ending gets back."""
    return (
        "Your response had no ```repl code block and no final answer. Continue with code to "
        f"explore `context`, or give your answer: {_how_to_answer(endings)}."
    )


def last_call_prompt(endings: str, iterations: int) -> str:
    """The request for an answer once the iterations are used up."""
    how = "Answer now with FINAL(your best answer) or FINAL_VAR(variable_name), and no code"
    if endings == "answer":
        how = (
            'Answer now: set answer["content"] and answer["ready"] = True in one ```repl block, '
            "or write the answer as plain text"
        )
    return f"You have used all {iterations} iterations. {how}."


def describe_context(context: Any) -> str:
    if isinstance(context, str):
        return f"a str of {len(context):,} characters (about {len(context) // 4:,} tokens)"
    if isinstance(context, dict):
        chars = sum(len(str(v)) for v in context.values())
        keys = list(context)[:5]
        more = ", ..." if len(context) > 5 else ""
        return (
            f"a dict of {len(context):,} entries ({chars:,} characters of values in all); "
            f"keys like {', '.join(repr(k) for k in keys)}{more}"
        )
    if isinstance(context, list):
        chars = sum(len(str(v)) for v in context)
        return f"a list of {len(context):,} items ({chars:,} characters in all)"
    return f"a {type(context).__name__}"


def _indent(lines: str) -> str:
    return "".join(f"  {line}\n" for line in lines.splitlines())


def system_prompt(
    context: Any,
    *,
    depth: int,
    max_depth: int,
    max_output_chars: int,
    sub_model: str,
    endings: str = "final",
    sub_window_tokens: int | None = None,
    tools: str = "",
    modules: str = "",
    conversation: bool = False,
) -> str:
    """The root model's system prompt. ``endings`` picks the endings it teaches (``ENDINGS``);
    ``sub_window_tokens``, when known, is the sub-model's context window. ``tools``: lines
    describing the host-side tools (``ToolBox.describe``); ``modules``: lines describing what
    ``sandbox_modules`` added (``tools.describe_modules``); ``conversation``: the run is a
    session where more questions follow the first."""
    recursion = (
        "- `rlm_query(prompt, context=None) -> str`: start a full recursive run (its own REPL and "
        "iterations) on a sub-problem; `context` defaults to the prompt. Costly: use it for "
        "sub-problems that need exploration, not for simple questions.\n"
        if depth + 1 < max_depth
        else ""
    )
    final_fns = (
        "- `FINAL(value)`: end the run with `value` as the answer.\n"
        "- `FINAL_VAR(name)`: end the run with the variable named `name` as the answer.\n"
    )
    answer_dict = (
        '- `answer`: a dict, `{"content": "", "ready": False}`. Put your answer in '
        '`answer["content"]`; the run ends after the block that sets `answer["ready"] = True`.\n'
    )
    enders = {"final": final_fns, "answer": answer_dict, "both": final_fns + answer_dict}[endings]
    finish = {
        "final": "Finish with FINAL(answer) or FINAL_VAR(name) once you have seen your code's output. "
        "Do not write FINAL in the same response as code whose output you have not seen yet.",
        "answer": 'Finish by setting answer["content"] and then answer["ready"] = True, once you have '
        "seen your code's output and checked the answer.",
        "both": 'Finish with FINAL(answer), FINAL_VAR(name), or answer["ready"] = True once you have '
        "seen your code's output. Do not write FINAL in the same response as code whose output you "
        "have not seen yet.",
    }[endings]
    reads = (
        f"It reads at most about {sub_window_tokens:,} tokens (about {sub_window_tokens * 3:,} "
        "characters with room for its answer) per call; a longer prompt raises an error before it "
        "is sent"
        if sub_window_tokens
        else "It can read about 100k characters at a time"
    )
    host = (
        "- Host-side tools: functions that run outside the sandbox, called like any function. "
        "Arguments and results are plain data (None, bool, int, float, str, bytes, lists and dicts "
        "of them); a tool that fails raises `ToolError`.\n" + _indent(tools)
        if tools
        else ""
    )
    helpers = "- Helper modules imported for you:\n" + _indent(modules) if modules else ""
    session = (
        "\nThis is a conversation: after you answer, more questions about the same context may "
        "follow. The REPL keeps everything you defined between questions, so reuse earlier "
        "results rather than recomputing them.\n"
        if conversation
        else ""
    )
    return f"""You answer a question about a context too large to read at once. The context is loaded \
in a Python REPL as the variable `context`: {describe_context(context)}.

You work by writing Python in fenced blocks tagged `repl`:
```repl
print(len(context), context[:500])
```
Each block runs in a persistent namespace (variables and functions survive between blocks and \
turns); you see what it prints, cut to {max_output_chars:,} characters per block, so print \
summaries and slices, never the whole context.

Available in the REPL:
- `context`: the data.
- `llm_query(prompt, model=None) -> str`: ask a language model ({sub_model!r}) about a piece of \
text. {reads}. It does not see `context` unless you pass it.
- `llm_query_batched(prompts, model=None) -> list[str]`: many llm_query calls at once, \
concurrently; answers in order. Much faster than a loop of llm_query.
{recursion}- `SHOW_VARS()`: the variables you have defined.
{host}{helpers}{enders}{session}
How to work:
1. Peek first: the type, the length, a few slices, the structure (lines, sections, records).
2. Pre-filter in Python (regex, keywords, slicing) before spending model calls.
3. Decompose: chunk what is left (about 50 lines or 10-50k characters per sub-call, not one call \
per line) and use llm_query_batched over the chunks.
4. Aggregate the answers in Python; check them against the context where you can.
5. {finish}
"""
