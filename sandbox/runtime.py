"""The model's side of a session: a persistent namespace and one ``exec`` at a time.

Pure Python with no sockets: the worker gives ``Repl`` an object that makes sub-calls
(``SubCalls``), so the namespace logic is tested without processes. What the model's code sees:

    context                      the session's context (str, list or dict)
    llm_query(prompt, model=None) -> str
    llm_query_batched(prompts, model=None) -> list[str]
                                                 concurrently, in waves of at most the pool's
                                                 max_batch in flight (the worker's SubCalls)
    rlm_query(prompt, context=None) -> str       (a child run, when depth allows)
    FINAL(value), FINAL_VAR(name)                record the answer; the code runs on to its end.
                                                 FINAL_VAR takes a variable's name (a str) or,
                                                 as the reference implementation does, its value
    answer = {"content": "", "ready": False}     the other ending (rlms >= 0.1.2): the run ends
                                                 after the exec that sets answer["ready"] true
    SHOW_VARS()                                  the session's variables, with types and sizes
    LLMQueryError, RLMQueryError                 what failed sub-calls raise; their ``code`` and
                                                 ``retryable`` are the error's, as it travelled
    <tool>(*args, **kwargs)                      each host-side tool of the session: a call that
                                                 runs in the orchestrator (``ToolCalls``);
                                                 arguments and results are msgpack values
    ToolError                                    what a tool that raised or timed out raises
    the public names of each ``sandbox_modules`` module (``load_modules``)

Sub-calls are checked before anything is sent: a prompt estimated over the sub-model's context
window (``windows``) raises ``LLMQueryError`` (code ``too_large``), a batch with any such prompt
sends none of them, and an exec past ``max_sub_calls`` sub-calls gets ``budget_exceeded``.

Restricting builtins is not a security boundary and is not attempted here; isolation is the
worker process's job (docs/security.md).
"""

from __future__ import annotations

import ast
import builtins
import io
import linecache
import os
import sys
import threading
import time
import traceback
import types
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import msgpack

from rlmq.protocol.errors import ErrorCode, ErrorInfo
from rlmq.protocol.sandbox import ExecError, ExecResult

__all__ = [
    "DEFAULT_MAX_SUB_CALLS",
    "LLMQueryError",
    "OutputCapture",
    "RLMQueryError",
    "Repl",
    "SubCalls",
    "ToolCalls",
    "ToolError",
    "WindowOf",
    "load_modules",
    "truncate_note",
]

DEFAULT_MAX_SUB_CALLS = 1_000  # per exec: a runaway loop of llm_query stops here, saying so

# The alias a model=... resolves to and its context window in tokens, or None when unknown.
WindowOf = Callable[[str | None], tuple[str, int] | None]


class _SubCallError(RuntimeError):
    """A failed sub-call, as the model's code sees it: the message, and the error's ``code``
    and ``retryable`` as they travelled (``info``), so code can branch without parsing text."""

    default_code: ClassVar[str] = ErrorCode.INTERNAL

    def __init__(self, message: str, *, info: ErrorInfo | None = None) -> None:
        super().__init__(message)
        self.info = info if info is not None else ErrorInfo(self.default_code, message)
        self.code: str = self.info.code
        self.retryable: bool = self.info.retryable


class LLMQueryError(_SubCallError):
    """An llm_query / llm_query_batched call failed (raised inside the model's code)."""

    default_code = ErrorCode.BACKEND_ERROR


class RLMQueryError(_SubCallError):
    """An rlm_query call failed or is not available (raised inside the model's code)."""

    default_code = ErrorCode.RLM_FAILED


class ToolError(_SubCallError):
    """A host-side tool raised, timed out, or returned what cannot be sent back (raised inside the
    model's code; ``code`` says which, the message names the tool and the original error)."""

    default_code = ErrorCode.INTERNAL


# Tracebacks print "LLMQueryError: ..." as for a builtin: the model sees these names in its
# namespace, never the module they come from.
_SubCallError.__module__ = LLMQueryError.__module__ = RLMQueryError.__module__ = "builtins"
ToolError.__module__ = "builtins"


class ToolCalls(Protocol):
    """What a host-side tool's function in the namespace calls: the tool in the orchestrator.
    Raises ``ToolError`` when the tool fails."""

    def tool_call(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any: ...


def msgpack_problem(value: Any) -> str | None:
    """Why ``value`` cannot travel as msgpack (None: it can)."""
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        return str(exc)
    return None


def load_modules(names: Sequence[str]) -> dict[str, Any]:
    """The namespace entries of ``sandbox_modules``: each module's public names (its ``__all__``,
    else every name not starting with ``_`` that it defines rather than imports), and the module
    itself under its last name. Raises ``ImportError`` naming the module that cannot be imported."""
    import importlib

    entries: dict[str, Any] = {}
    for name in names:
        try:
            module = importlib.import_module(name)
        except BaseException as exc:  # a module's top level may raise anything
            problem = f"{type(exc).__name__}: {exc}"
            raise ImportError(f"sandbox_modules: cannot import {name!r}: {problem}") from None
        public = getattr(module, "__all__", None)
        if public is None:
            public = [
                k
                for k, v in vars(module).items()
                if not k.startswith("_")
                and not isinstance(v, types.ModuleType)
                and getattr(v, "__module__", module.__name__) == module.__name__
            ]
        entries[name.rpartition(".")[2]] = module
        for key in public:
            entries[key] = getattr(module, key)
    return entries


class SubCalls(Protocol):
    """What the namespace's functions call. Implementations raise the two errors above."""

    def complete(self, prompt: Any, model: str | None) -> str: ...

    def complete_many(self, prompts: Sequence[Any], model: str | None) -> list[str]: ...

    def rlm_query(self, prompt: str, context: Any) -> str: ...


def truncate_note(cut: int) -> str:
    return f"\n... [truncated {cut:,} characters] ...\n"


def _safe(text: str) -> str:
    """A str msgpack can encode: lone surrogates (from odd decodes) become escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class OutputCapture(io.TextIOBase):
    """A text stream that keeps at most ``limit`` characters: the head and the tail.

    Memory stays bounded however much the code prints; ``value()`` joins head and tail with a
    note saying how many characters were cut from the middle.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head: list[str] = []
        self._head_len = 0
        self._tail: deque[str] = deque()
        self._tail_len = 0
        self.total = 0
        self._lock = threading.Lock()  # the model's threads may print too

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        n = len(s)
        with self._lock:
            self.total += n
            room = self._head_limit - self._head_len
            if room > 0:
                part = s[:room]
                self._head.append(part)
                self._head_len += len(part)
                s = s[room:]
            if s:
                if len(s) >= self._tail_limit:
                    self._tail.clear()
                    s = s[len(s) - self._tail_limit :]
                    self._tail_len = 0
                self._tail.append(s)
                self._tail_len += len(s)
                while self._tail_len > self._tail_limit:
                    first = self._tail[0]
                    extra = self._tail_len - self._tail_limit
                    if len(first) <= extra:
                        self._tail.popleft()
                        self._tail_len -= len(first)
                    else:
                        self._tail[0] = first[extra:]
                        self._tail_len -= extra
        return n

    def value(self) -> tuple[str, int]:
        """The captured text (truncated with a note if needed) and how many characters were cut."""
        with self._lock:
            head = "".join(self._head)
            tail = "".join(self._tail)
            cut = self.total - len(head) - len(tail)
        if cut <= 0:
            return _safe(head + tail), 0
        return _safe(head + truncate_note(cut) + tail), cut


class _Final:
    """The answer recorded during one exec (the last FINAL/FINAL_VAR call wins)."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.var: str | None = None
        self.ending: str | None = None


class _Shown(str):
    """A str that a REPL echo shows as its text (``SHOW_VARS()`` on a last line), not its repr."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def _prompt_chars(prompt: Any) -> int | None:
    """The characters a prompt sends, or None for a shape the sub-call itself will refuse."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list | tuple):
        total = 0
        for m in prompt:
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, str):
                return None
            total += len(content)
        return total
    return None


def _tokens(chars: int) -> int:
    return -(-chars // 4)  # 4 characters a token, as the handler estimates


def _describe(value: Any) -> str:
    kind = type(value).__name__
    try:
        if isinstance(value, str):
            return f"{kind}, {len(value):,} chars"
        if isinstance(value, list | tuple | dict | set | frozenset):
            return f"{kind}, {len(value):,} items"
    except Exception:  # a subclass's __len__ may raise anything
        return kind
    return kind


class Repl:
    """A persistent namespace and the machinery to run code blocks in it like a REPL."""

    def __init__(
        self,
        context: Any,
        calls: SubCalls,
        *,
        max_output_chars: int = 20_000,
        rlm_error: ErrorInfo | None = None,
        on_fork_check: Callable[[], None] | None = None,
        memory_mb: int | None = None,
        windows: WindowOf | None = None,
        max_sub_calls: int = DEFAULT_MAX_SUB_CALLS,
        tools: Sequence[str] = (),
        tool_calls: ToolCalls | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """``rlm_error``: when set, rlm_query is unavailable and raises this error.
        ``on_fork_check``: called before every sub-call (the worker refuses them in forked
        children, whose sockets are copies of the parent's).
        ``windows``: the context window of the model a sub-call names (None: unchecked here,
        the handler still refuses). ``max_sub_calls``: sub-calls one exec may make.
        ``tools``: names of host-side tools, answered by ``tool_calls``; ``extra``: more names for
        the namespace (``load_modules``), which may not replace the REPL's own."""
        self.calls = calls
        self.max_output_chars = max_output_chars
        self.rlm_error = rlm_error
        self.memory_mb = memory_mb
        self.windows = windows
        self.max_sub_calls = max_sub_calls
        self._check = on_fork_check or (lambda: None)
        self._runs = 0
        self._llm_calls = 0
        self._count_lock = threading.Lock()
        self._final = _Final()
        self.namespace: dict[str, Any] = {
            "__name__": "__main__",
            "__doc__": None,
            "__builtins__": builtins,
            "context": context,
            "llm_query": self._llm_query,
            "llm_query_batched": self._llm_query_batched,
            "rlm_query": self._rlm_query,
            "FINAL": self._final_fn,
            "FINAL_VAR": self._final_var_fn,
            "SHOW_VARS": self._show_vars,
            "answer": {"content": "", "ready": False},
            "LLMQueryError": LLMQueryError,
            "RLMQueryError": RLMQueryError,
            "ToolError": ToolError,
        }
        own = set(self.namespace)
        for name in tools:
            if name in own:
                raise ValueError(f"a host-side tool may not be called {name!r}: the REPL has that name")
            if tool_calls is None:
                raise ValueError("host-side tools need tool_calls to answer them")
            self.namespace[name] = self._tool(name, tool_calls)
        for key, value in (extra or {}).items():
            if key in own or key in tools:
                raise ValueError(f"sandbox_modules: {key!r} would replace a name the REPL already has")
            self.namespace[key] = value
        self._helpers = frozenset(k for k in self.namespace if k not in ("context", "answer"))

    # ------------------------------------------------------------ the model's functions

    def _count(self, n: int, what: str) -> None:
        """Count ``n`` sub-calls of this exec, or refuse them all past ``max_sub_calls``."""
        with self._count_lock:
            if self._llm_calls + n > self.max_sub_calls:
                made = self._llm_calls
                info = ErrorInfo(
                    ErrorCode.BUDGET_EXCEEDED,
                    f"{what}: this block has made {made:,} sub-calls and {n:,} more would pass the "
                    f"limit of {self.max_sub_calls:,} per block (max_sub_calls_per_exec); none of "
                    "them was sent. Give each sub-call a bigger chunk (about 50 lines or 10-50k "
                    "characters) and use llm_query_batched, rather than one call per item.",
                )
                raise LLMQueryError(info.message, info=info)
            self._llm_calls += n

    def _window(self, model: str | None) -> tuple[str, int] | None:
        return None if self.windows is None else self.windows(model)

    def _llm_query(self, prompt: Any, model: str | None = None) -> str:
        """Ask a language model; returns its answer as a str."""
        self._check()
        window = self._window(model)
        chars = _prompt_chars(prompt)
        if window is not None and chars is not None and _tokens(chars) > window[1]:
            alias, tokens = window
            info = ErrorInfo(
                ErrorCode.TOO_LARGE,
                f"llm_query: the prompt is about {_tokens(chars):,} tokens ({chars:,} characters), "
                f"over the context window of {alias!r} ({tokens:,} tokens); nothing was sent. Split "
                f"it into chunks of at most about {tokens * 3:,} characters and use "
                "llm_query_batched over the chunks.",
            )
            raise LLMQueryError(info.message, info=info)
        self._count(1, "llm_query")
        return self.calls.complete(prompt, model)

    def _llm_query_batched(self, prompts: Sequence[Any], model: str | None = None) -> list[str]:
        """Ask many prompts concurrently (at most ``max_batch`` in flight at once); answers come
        back in the prompts' order."""
        self._check()
        if isinstance(prompts, str):
            raise TypeError("llm_query_batched takes a list of prompts; for one prompt use llm_query")
        prompts = list(prompts)
        if not prompts:
            return []
        window = self._window(model)
        if window is not None:
            alias, tokens = window
            over = []
            for i, prompt in enumerate(prompts):
                chars = _prompt_chars(prompt)
                if chars is not None and _tokens(chars) > tokens:
                    over.append((i, _tokens(chars)))
            if over:
                shown = ", ".join(f"{i} (about {t:,} tokens)" for i, t in over[:10])
                more = f" and {len(over) - 10} more" if len(over) > 10 else ""
                info = ErrorInfo(
                    ErrorCode.TOO_LARGE,
                    f"llm_query_batched: {len(over)} of {len(prompts)} prompts are over the context "
                    f"window of {alias!r} ({tokens:,} tokens): index {shown}{more}; none of the "
                    f"batch was sent. Split those into chunks of at most about {tokens * 3:,} "
                    "characters.",
                )
                raise LLMQueryError(info.message, info=info)
        self._count(len(prompts), "llm_query_batched")
        return self.calls.complete_many(prompts, model)

    def _rlm_query(self, prompt: str, context: Any = None) -> str:
        """Start a recursive child run on ``prompt`` (and an optional ``context``)."""
        if self.rlm_error is not None:
            raise RLMQueryError(self.rlm_error.message, info=self.rlm_error)
        self._check()
        if not isinstance(prompt, str):
            raise TypeError(f"rlm_query prompt must be a str, not {type(prompt).__name__}")
        self._count(1, "rlm_query")
        return self.calls.rlm_query(prompt, context)

    def _tool(self, name: str, calls: ToolCalls) -> Callable[..., Any]:
        def tool(*args: Any, **kwargs: Any) -> Any:
            self._check()
            problem = msgpack_problem([list(args), kwargs])
            if problem is not None:
                raise TypeError(
                    f"{name}(): its arguments must be msgpack values (None, bool, int, float, str, "
                    f"bytes, and lists and dicts of them): {problem}"
                )
            return calls.tool_call(name, list(args), kwargs)

        tool.__name__ = tool.__qualname__ = name
        tool.__doc__ = f"The host-side tool {name!r}: it runs outside the sandbox."
        return tool

    def _final_fn(self, value: Any) -> None:
        """Record ``value`` (as ``str(value)``) as the final answer."""
        self._final.value = _safe(str(value))
        self._final.var = None
        self._final.ending = "final"

    def _final_var_fn(self, name: Any) -> None:
        """Record the variable called ``name`` as the final answer; given a value that is not a
        str (``FINAL_VAR(result)`` for a list), that value is the answer."""
        value, var = final_var_value(self.namespace, name, self._helpers)
        self._final.value = _safe(str(value))
        self._final.var = var
        self._final.ending = "final_var"

    def _show_vars(self) -> str:
        """The session's variables, with their types and sizes."""
        return show_vars(self.namespace, self._helpers)

    def _answer_ready(self) -> str | None:
        """``answer["content"]`` once the code set ``answer["ready"]``; None before that. Empty
        content is no answer: the model is told so on stderr and the run goes on."""
        answer = self.namespace.get("answer")
        if not isinstance(answer, dict):
            return None
        try:
            if not answer.get("ready"):
                return None
            content = answer.get("content", "")
            text = content if isinstance(content, str) else str(content)
        except Exception:  # the model's own objects may raise anything from __bool__ or __str__
            return None
        if not text.strip():
            print(
                '[rlmq] answer["ready"] is set but answer["content"] is empty: put the answer in it',
                file=sys.stderr,
            )
            return None
        return _safe(text)

    # ------------------------------------------------------------ exec

    def run(self, code: str) -> ExecResult:
        """Run one block. Never raises: the code's failure is ``ExecResult.error``."""
        self._runs += 1
        filename = f"<repl-{self._runs}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
        self._final = _Final()
        with self._count_lock:
            self._llm_calls = 0
        out = OutputCapture(self.max_output_chars)
        err = OutputCapture(self.max_output_chars)
        error: ExecError | None = None
        saved = sys.stdout, sys.stderr
        started = time.perf_counter()
        sys.stdout, sys.stderr = out, err
        try:
            self._run_code(code, filename)
        except BaseException as exc:  # the model's code may raise anything, SystemExit included
            error = self._error(exc, filename)
        finally:
            if self._final.value is None:
                ready = self._answer_ready()
                if ready is not None:
                    self._final.value, self._final.var, self._final.ending = ready, None, "answer"
            sys.stdout, sys.stderr = saved
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        stdout, cut_out = out.value()
        stderr, cut_err = err.value()
        with self._count_lock:
            calls = self._llm_calls
        return ExecResult(
            stdout=stdout,
            stderr=stderr,
            error=error,
            final=self._final.value,
            final_var=self._final.var,
            elapsed_ms=round(elapsed_ms, 3),
            truncated_chars=cut_out + cut_err,
            llm_calls=calls,
            state_lost=False,
            ending=self._final.ending,
        )

    def _run_code(self, code: str, filename: str) -> None:
        tree = ast.parse(code, filename, "exec")
        last: ast.expr | None = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = tree.body[-1].value
            tree.body.pop()
        if tree.body:
            exec(compile(tree, filename, "exec"), self.namespace)  # noqa: S102 - running code is the job
        if last is not None:
            value = eval(compile(ast.Expression(last), filename, "eval"), self.namespace)  # noqa: S307
            if value is not None:
                print(repr(value))

    def _error(self, exc: BaseException, filename: str) -> ExecError:
        code = "memory" if isinstance(exc, MemoryError) else "exception"
        message = _safe(_message(exc))
        if isinstance(exc, MemoryError) and not message:
            limit = f" of {self.memory_mb:,} MB" if self.memory_mb else ""
            message = f"out of memory: the allocation would exceed the worker's memory limit{limit}"
        try:
            tb_text = _format_traceback(exc, filename)
        except MemoryError:
            tb_text = ""
        if len(tb_text) > self.max_output_chars:
            half = self.max_output_chars // 2
            tb_text = tb_text[:half] + truncate_note(len(tb_text) - 2 * half) + tb_text[-half:]
        return ExecError(code=code, type=type(exc).__name__, message=message, traceback=_safe(tb_text))


def final_var_value(namespace: dict[str, Any], name: Any, helpers: frozenset[str]) -> tuple[Any, str | None]:
    """What ``FINAL_VAR(name)`` answers, and the variable it read (None when given a value).

    A str names a variable (quotes and spaces around it are forgiven). Models also pass the value
    itself: anything else is the answer, and so is a str that names nothing but *is* the value
    of one of the session's variables (``FINAL_VAR(result)`` with ``result = "Paris"``).
    """
    holder = next(
        (k for k, v in namespace.items() if v is name and k not in helpers and not k.startswith("_")), None
    )
    if not isinstance(name, str):
        return name, holder
    key = name.strip().strip("'\"").strip()
    if key in namespace and key not in helpers:
        return namespace[key], key
    if holder is not None:
        return name, holder
    known = [k for k in namespace if k not in helpers and not k.startswith("_")]
    raise NameError(
        f"FINAL_VAR({key!r}): no variable named {key!r} is defined in this session (defined: "
        f"{', '.join(known[:20]) or 'none'}). Assign it in a ```repl block first, or give the "
        "answer itself with FINAL(answer).",
        name=key,
    )


def show_vars(namespace: dict[str, Any], helpers: frozenset[str]) -> str:
    """The ``SHOW_VARS()`` text: every variable the code (or the session) defined."""
    shown = [
        f"{k} ({_describe(v)})"
        for k, v in namespace.items()
        if k not in helpers and not k.startswith("_") and not isinstance(v, types.ModuleType)
    ]
    return _Shown("Variables: " + ", ".join(shown) if shown else "No variables yet.")


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # the model's own __str__ may raise anything
        return f"<{type(exc).__name__}: str() failed>"


# Frames of rlmq itself (this package and protocol) at the end of a traceback are noise to the model.
_INTERNAL_DIRS = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (__file__, sys.modules[ExecResult.__module__].__file__ or "")
)


def _internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL_DIRS)


def _format_traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the first frame of the model's code, without our own frames at the end
    (an llm_query failure ends at the model's call, not inside the worker)."""
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        return "".join(traceback.format_exception_only(type(exc), exc))
    tbs: list[types.TracebackType] = []
    tb = exc.__traceback__
    while tb is not None:
        tbs.append(tb)
        tb = tb.tb_next
    start = next((i for i, t in enumerate(tbs) if t.tb_frame.f_code.co_filename == filename), None)
    if start is None:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    end = len(tbs) - 1
    while end > start and _internal(tbs[end].tb_frame.f_code.co_filename):
        end -= 1
    tbs[end].tb_next = None
    exc.__traceback__ = tbs[start]
    return "".join(traceback.format_exception(type(exc), exc, tbs[start]))
