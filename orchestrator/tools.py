"""Host-side tools: functions of the orchestrator's process that the model's code calls by name.

``RLM(..., tools=ToolBox({"search": search}))`` makes ``search(...)`` a function of every session
of its runs, child runs included. A call travels the way of ``rlm_query``: worker -> pool ->
the orchestrator's sandbox client -> ``ToolBox.call`` here -> back. The tool runs on the trusted
side, so credentials it needs never enter the sandbox.

- Arguments and results are msgpack values (None, bool, int, float, str, bytes, and lists and
  dicts of them); the worker refuses other arguments with a ``TypeError`` in the model's code,
  and a result that is not one comes back as a ``ToolError`` there.
- A tool that raises, or runs past ``timeout_s`` (``RunSettings.tool_timeout_s``), is a
  ``ToolError`` in the model's code, its message naming the tool and the error.
- Plain functions run in a thread (a slow one does not stall other runs; one past its timeout
  cannot be stopped and finishes unobserved); ``async def`` functions run on the event loop
  (cancelled at their timeout).
- The system prompt describes each tool from its signature and the first paragraph of its
  docstring (``ToolBox.describe``).
"""

from __future__ import annotations

import asyncio
import inspect
import keyword
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from rlmq.protocol import ErrorCode
from rlmq.protocol.sandbox import ToolCallback

from .errors import RunError

__all__ = [
    "RESERVED_NAMES",
    "ToolBox",
    "ToolFailed",
    "describe_function",
    "describe_modules",
]

# Names the REPL gives the model's code already: a tool may not take one.
RESERVED_NAMES = frozenset(
    {
        "context",
        "llm_query",
        "llm_query_batched",
        "rlm_query",
        "FINAL",
        "FINAL_VAR",
        "SHOW_VARS",
        "answer",
        "print",
        "LLMQueryError",
        "RLMQueryError",
        "ToolError",
    }
)
DOC_CHARS = 600  # of a docstring's first paragraph, in the system prompt


class ToolFailed(RunError):
    """A tool raised, timed out, or returned what cannot be sent: raised to the tool call waiting
    on it, in the model's code (``ToolError`` there), with this code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code  # before the base reads it
        super().__init__(message, retryable=False)


class ToolBox:
    """Named host-side tools. Names must be Python identifiers and not the REPL's own names."""

    def __init__(self, tools: Mapping[str, Callable[..., Any]]) -> None:
        for name, fn in tools.items():
            if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
                raise ValueError(f"a tool's name must be a Python identifier, not {name!r}")
            if name in RESERVED_NAMES:
                raise ValueError(f"a tool may not be called {name!r}: the REPL has that name")
            if not callable(fn):
                raise TypeError(f"tool {name!r} is not callable: {type(fn).__name__}")
        self.tools: dict[str, Callable[..., Any]] = dict(tools)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tools)

    def __bool__(self) -> bool:
        return bool(self.tools)

    def describe(self) -> str:
        """One line per tool for the system prompt: its signature and its docstring's summary."""
        lines = []
        for name, fn in self.tools.items():
            signature, summary = describe_function(name, fn)
            lines.append(f"- `{signature}`" + (f": {summary}" if summary else "") + "\n")
        return "".join(lines)

    def callback(self, timeout_s: float | None) -> ToolCallback:
        """What answers the sessions' tool calls, each bounded by ``timeout_s``."""

        async def answer(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
            return await self.call(name, args, kwargs, timeout_s=timeout_s)

        return answer

    async def call(
        self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any], *, timeout_s: float | None
    ) -> Any:
        """Call a tool; raises ``ToolFailed`` (never the tool's own exception)."""
        fn = self.tools.get(name)
        if fn is None:
            raise ToolFailed(ErrorCode.BAD_REQUEST, f"there is no tool {name!r}")
        try:
            async with asyncio.timeout(timeout_s):
                if _is_async(fn):
                    value = await fn(*args, **kwargs)
                else:
                    value = await asyncio.to_thread(fn, *args, **kwargs)
                if inspect.isawaitable(value):  # a plain function that returned a coroutine
                    value = await value
        except TimeoutError:
            raise ToolFailed(ErrorCode.TIMEOUT, f"{name}() did not return within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the tool's boundary: whatever it raises reaches the model's code
            message = f"{name}() raised {type(exc).__name__}: {exc}"
            raise ToolFailed(ErrorCode.BACKEND_ERROR, message) from None
        try:
            msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ToolFailed(
                ErrorCode.INTERNAL,
                f"{name}() returned a {type(value).__name__}, which cannot be sent to the sandbox "
                f"(results must be msgpack values: None, bool, int, float, str, bytes, and lists "
                f"and dicts of them): {exc}",
            ) from None
        return value


def _is_async(fn: Callable[..., Any]) -> bool:
    # An object whose __call__ is ``async def`` is awaited too.
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def describe_function(name: str, fn: Callable[..., Any]) -> tuple[str, str]:
    """``name(signature)``, and the first paragraph of the docstring on one line."""
    try:
        try:  # annotations as written, also under `from __future__ import annotations`
            signature = str(inspect.signature(fn, eval_str=True))
        except (NameError, SyntaxError, TypeError, AttributeError):  # a name only the type checker knows
            signature = str(inspect.signature(fn))
    except (TypeError, ValueError):  # some builtins have none
        signature = "(...)"
    doc = inspect.getdoc(fn) or ""
    summary = " ".join(doc.split("\n\n", 1)[0].split())
    if len(summary) > DOC_CHARS:
        summary = summary[: DOC_CHARS - 3] + "..."
    return f"{name}{signature}", summary


def describe_modules(names: Sequence[str], *, max_names: int = 20) -> str:
    """Lines for the system prompt naming what ``sandbox_modules`` put in the namespace.

    The module is imported here too (it is the user's own, named in their settings) to list its
    public functions with their signatures; one that cannot be imported here is only named: the
    worker, which imports it for the REPL, is the judge of whether it loads."""
    import importlib

    lines = []
    for name in names:
        short = name.rpartition(".")[2]
        try:
            module = importlib.import_module(name)
        except Exception:  # the worker reports a module that cannot load; here it is only not described
            lines.append(f"- `{short}`: the module `{name}`, with its public names in the namespace\n")
            continue
        public = getattr(module, "__all__", None)
        if public is None:
            public = [
                k
                for k, v in vars(module).items()
                if not k.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__
            ]
        lines.append(f"- `{short}`: the module `{name}`; its functions are in the namespace too:\n")
        for key in list(public)[:max_names]:
            value = getattr(module, key, None)
            if callable(value):
                signature, summary = describe_function(key, value)
                lines.append(f"  - `{signature}`" + (f": {summary}" if summary else "") + "\n")
        if len(public) > max_names:
            lines.append(f"  - ... and {len(public) - max_names} more (`dir({short})`)\n")
    return "".join(lines)
