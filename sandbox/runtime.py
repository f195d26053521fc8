"""The model's side of a session: a persistent namespace and one ``exec`` at a time.

Pure Python with no sockets: the worker gives ``Repl`` an object that makes sub-calls
(``SubCalls``), so the namespace logic is tested without processes. What the model's code sees:

    context                      the session's context (str, list or dict)
    llm_query(prompt, model=None) -> str
    llm_query_batched(prompts, model=None) -> list[str]
    rlm_query(prompt, context=None) -> str       (a child run, when depth allows)
    FINAL(value), FINAL_VAR(name)                record the answer; the code runs on to its end
    LLMQueryError, RLMQueryError                 what failed sub-calls raise; their ``code`` and
                                                 ``retryable`` are the error's, as it travelled

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

from rlmq.protocol.errors import ErrorCode, ErrorInfo
from rlmq.protocol.sandbox import ExecError, ExecResult

__all__ = [
    "LLMQueryError",
    "OutputCapture",
    "RLMQueryError",
    "Repl",
    "SubCalls",
    "truncate_note",
]


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


# Tracebacks print "LLMQueryError: ..." as for a builtin: the model sees these names in its
# namespace, never the module they come from.
_SubCallError.__module__ = LLMQueryError.__module__ = RLMQueryError.__module__ = "builtins"


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
    ) -> None:
        """``rlm_error``: when set, rlm_query is unavailable and raises this error.
        ``on_fork_check``: called before every sub-call (the worker refuses them in forked
        children, whose sockets are copies of the parent's)."""
        self.calls = calls
        self.max_output_chars = max_output_chars
        self.rlm_error = rlm_error
        self.memory_mb = memory_mb
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
            "LLMQueryError": LLMQueryError,
            "RLMQueryError": RLMQueryError,
        }

    # ------------------------------------------------------------ the model's functions

    def _count(self, n: int) -> None:
        with self._count_lock:
            self._llm_calls += n

    def _llm_query(self, prompt: Any, model: str | None = None) -> str:
        """Ask a language model; returns its answer as a str."""
        self._check()
        self._count(1)
        return self.calls.complete(prompt, model)

    def _llm_query_batched(self, prompts: Sequence[Any], model: str | None = None) -> list[str]:
        """Ask many prompts concurrently; answers come back in the prompts' order."""
        self._check()
        if isinstance(prompts, str):
            raise TypeError("llm_query_batched takes a list of prompts; for one prompt use llm_query")
        prompts = list(prompts)
        if not prompts:
            return []
        self._count(len(prompts))
        return self.calls.complete_many(prompts, model)

    def _rlm_query(self, prompt: str, context: Any = None) -> str:
        """Start a recursive child run on ``prompt`` (and an optional ``context``)."""
        if self.rlm_error is not None:
            raise RLMQueryError(self.rlm_error.message, info=self.rlm_error)
        self._check()
        if not isinstance(prompt, str):
            raise TypeError(f"rlm_query prompt must be a str, not {type(prompt).__name__}")
        self._count(1)
        return self.calls.rlm_query(prompt, context)

    def _final_fn(self, value: Any) -> None:
        """Record ``value`` (as ``str(value)``) as the final answer."""
        self._final.value = _safe(str(value))
        self._final.var = None

    def _final_var_fn(self, name: Any) -> None:
        """Record the variable called ``name`` (a str) as the final answer."""
        if not isinstance(name, str):
            raise TypeError(
                f"FINAL_VAR takes the variable's name as a string, e.g. FINAL_VAR('answer'); "
                f"got {type(name).__name__}"
            )
        key = name.strip().strip("'\"").strip()
        if key not in self.namespace:
            raise NameError(
                f"FINAL_VAR({key!r}): no variable named {key!r} is defined in this session", name=key
            )
        self._final.value = _safe(str(self.namespace[key]))
        self._final.var = key

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
