"""What the root model is told about its environment."""

from __future__ import annotations

from typing import Any

__all__ = ["describe_context", "system_prompt"]


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


def system_prompt(
    context: Any,
    *,
    depth: int,
    max_depth: int,
    max_output_chars: int,
    sub_model: str,
) -> str:
    recursion = (
        "- `rlm_query(prompt, context=None) -> str`: start a full recursive run (its own REPL and "
        "iterations) on a sub-problem; `context` defaults to the prompt. Costly: use it for "
        "sub-problems that need exploration, not for simple questions.\n"
        if depth + 1 < max_depth
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
text. It can read about 100k characters at a time; it does not see `context` unless you pass it.
- `llm_query_batched(prompts, model=None) -> list[str]`: many llm_query calls at once, \
concurrently; answers in order. Much faster than a loop of llm_query.
{recursion}- `FINAL(value)`: end the run with `value` as the answer.
- `FINAL_VAR(name)`: end the run with the variable named `name` as the answer.

How to work:
1. Peek first: the type, the length, a few slices, the structure (lines, sections, records).
2. Pre-filter in Python (regex, keywords, slicing) before spending model calls.
3. Decompose: chunk what is left (about 50 lines or 10-50k characters per sub-call, not one call \
per line) and use llm_query_batched over the chunks.
4. Aggregate the answers in Python; check them against the context where you can.
5. Finish with FINAL(answer) or FINAL_VAR(name) once you have seen your code's output. Do not \
write FINAL in the same response as code whose output you have not seen yet.
"""
