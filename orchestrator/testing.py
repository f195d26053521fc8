"""Test kit for the orchestrator: in-memory fakes of the loop's two interfaces.

    ScriptedModelClient   a ``ModelClient``: the root model's answers are written by the test
                          per run (and optionally per depth); other aliases echo. Records every
                          request, raises scripted ``RlmqError``s, and enforces a simple run
                          budget (calls, input/output tokens, deadline) like the handler.
    InMemorySandbox       a ``Sandbox`` whose sessions run code with ``exec()`` in a dict
                          namespace holding ``context``, ``llm_query``, ``llm_query_batched``,
                          ``rlm_query``, ``FINAL``, ``FINAL_VAR``, ``SHOW_VARS`` and the
                          ``answer`` dict, wired to the fakes, with the worker's checks on
                          sub-calls (context windows, a cap per exec). Its execs report
                          ``SubCall`` records (``on_sub_call``) and answer from a ``Replay``,
                          as the pool's relay does.
    ManualClock           a clock the test moves by hand, for ``RLM(clock=...)``.

    rlm = RLM(models, InMemorySandbox(models), RunSettings())

**InMemorySandbox is NOT a sandbox.** The code runs in this very process, with this process's
rights, files and memory; nothing is isolated, limited or killed (``exec_timeout_s`` is not
enforced). It exists so the loop's behaviours are fast unit tests. Never give it code you would
not run yourself; real runs use ``rlmq.protocol.sandbox.AsyncSandboxClient`` and a pool.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import concurrent.futures
import contextlib
import importlib
import io
import linecache
import sys
import threading
import time
import traceback
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import msgpack

from rlmq.protocol import (
    ChatMessage,
    CompleteReply,
    ErrorCode,
    ErrorInfo,
    RemoteError,
    RlmqError,
    RunLimits,
    RunUsage,
    Usage,
)
from rlmq.protocol.sandbox import ExecError, ExecResult, Replay, SandboxError, SubCall, prompt_sha256
from rlmq.protocol.sandbox.client import ToolCallback

from .interfaces import ModelClient, RlmCallback, Sandbox
from .trajectory import Trajectory

__all__ = [
    "InMemorySandbox",
    "InMemorySession",
    "LLMQueryError",
    "ManualClock",
    "ModelRequest",
    "RLMQueryError",
    "ScriptedModelClient",
    "ScriptedReply",
    "ToolError",
    "echo_last_user",
    "events",
]

T = TypeVar("T")


def events(trajectory: Trajectory, name: str) -> list[dict[str, Any]]:
    """The events called ``name`` of a trajectory, in order."""
    return [e for e in trajectory.events if e["event"] == name]


class ManualClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------- the model client


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """One ``complete`` call as the fake model received it."""

    model: str
    messages: tuple[ChatMessage, ...]
    run: str | None
    depth: int | None
    max_tokens: int | None = None
    temperature: float | None = None
    timeout_s: float | None = None

    @property
    def last_user(self) -> str:
        """The content of the last user message (what the model was just told)."""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


def echo_last_user(request: ModelRequest) -> str:
    """The ``echo`` backend's answer: the last user message, verbatim."""
    return request.last_user


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


@dataclass(slots=True)
class _Budget:
    run: str
    limits: RunLimits
    opened: float
    calls: int = 0
    failed_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    in_flight: int = 0
    closed: bool = False
    exceeded: str | None = None

    def refusal(self, now: float) -> tuple[str, str] | None:
        """The first limit the next call would break, as (limit, message), or None."""
        lim = self.limits
        if lim.deadline_s is not None and now - self.opened >= lim.deadline_s:
            return "deadline_s", f"deadline of {lim.deadline_s:g} s has passed"
        if lim.max_calls is not None and self.calls >= lim.max_calls:
            return "max_calls", f"call limit of {lim.max_calls} reached"
        if lim.max_input_tokens is not None and self.input_tokens >= lim.max_input_tokens:
            return "max_input_tokens", f"input token limit of {lim.max_input_tokens} reached"
        if lim.max_output_tokens is not None and self.output_tokens >= lim.max_output_tokens:
            return "max_output_tokens", f"output token limit of {lim.max_output_tokens} reached"
        return None

    def snapshot(self, now: float) -> RunUsage:
        return RunUsage(
            run=self.run,
            calls=self.calls,
            cached_calls=0,
            failed_calls=self.failed_calls,
            usage=Usage(self.input_tokens, self.output_tokens),
            cost_usd=0.0,
            elapsed_s=round(now - self.opened, 3),
            limits=self.limits,
            closed=self.closed,
            exceeded=self.exceeded,
            in_flight=self.in_flight,
        )


@dataclass(frozen=True, slots=True)
class ScriptedReply:
    """A scripted answer with its stop reason: ``ScriptedReply(text, "max_tokens")`` is a
    response the provider cut at its length limit."""

    text: str
    stop_reason: str = "end_turn"


Scripted = str | ScriptedReply | RlmqError


class ScriptedModelClient:
    """A ``ModelClient`` in memory. ``model.script("run-1", ["```repl\\n...\\n```", "FINAL(x)"])``.

    Calls to a ``scripted`` alias (default ``root``) get the next entry of the run's script: the
    one given for the call's depth if there is one, else the run's shared one. An entry that is
    an ``RlmqError`` is raised instead of answered; past the end, ``script_exhausted``. Other
    aliases (the sub-calls of ``llm_query``) are answered by ``reply`` (default: echo).

    Runs opened with ``run_open`` get the handler's budget checks for ``max_calls``,
    ``max_input_tokens``, ``max_output_tokens`` and ``deadline_s`` (on ``clock``); cost is not
    counted. ``before_reply`` is awaited with each admitted request before it is answered: a
    test can hold calls there (a barrier) or move a ``ManualClock``.
    """

    def __init__(
        self,
        *,
        scripted: Iterable[str] = ("root",),
        reply: Callable[[ModelRequest], str] = echo_last_user,
        before_reply: Callable[[ModelRequest], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scripted = frozenset(scripted)
        self.reply = reply
        self.before_reply = before_reply
        self.clock = clock
        self.requests: list[ModelRequest] = []  # every admitted request, in arrival order
        self.refused: list[ModelRequest] = []  # requests the budget refused
        self._scripts: dict[tuple[str, int | None], list[Scripted]] = {}
        self._runs: dict[str, _Budget] = {}
        self._ids = count(1)

    def script(self, run: str, responses: Iterable[Scripted], *, depth: int | None = None) -> None:
        """The answers of the scripted aliases for ``run`` (at ``depth`` only, if given)."""
        self._scripts[(run, depth)] = list(responses)

    def requests_for(
        self, run: str | None = None, *, model: str | None = None, depth: int | None = None
    ) -> list[ModelRequest]:
        """The recorded requests matching every filter given."""
        return [
            r
            for r in self.requests
            if (run is None or r.run == run)
            and (model is None or r.model == model)
            and (depth is None or r.depth == depth)
        ]

    def _next(self, request: ModelRequest) -> Scripted:
        run = request.run or ""
        queue = self._scripts.get((run, request.depth))
        if queue is None:
            queue = self._scripts.setdefault((run, None), [])
        if not queue:
            return RemoteError(
                ErrorCode.SCRIPT_EXHAUSTED,
                f"no scripted response left for run {request.run!r} at depth {request.depth}",
            )
        return queue.pop(0)

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        /,
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        timeout_s: float | None = None,
        run: str | None = None,
        depth: int | None = None,
    ) -> CompleteReply:
        request = ModelRequest(model, tuple(messages), run, depth, max_tokens, temperature, timeout_s)
        budget = self._runs.get(run) if run is not None else None
        if budget is not None:
            if budget.closed:
                raise RemoteError(ErrorCode.RUN_CLOSED, f"run {run!r} is closed")
            refusal = budget.refusal(self.clock())
            if refusal is not None:
                limit, message = refusal
                budget.exceeded = budget.exceeded or limit
                self.refused.append(request)
                raise RemoteError(ErrorCode.BUDGET_EXCEEDED, f"run {run!r}: {message}")
            budget.calls += 1
            budget.in_flight += 1
        self.requests.append(request)
        try:
            if self.before_reply is not None:
                await self.before_reply(request)
            answer = self._next(request) if model in self.scripted else self.reply(request)
            if isinstance(answer, RlmqError):
                raise answer
        except BaseException:
            if budget is not None:
                budget.in_flight -= 1
                budget.failed_calls += 1
            raise
        text, stop_reason = (
            (answer.text, answer.stop_reason) if isinstance(answer, ScriptedReply) else (answer, "end_turn")
        )
        usage = Usage(sum(_tokens(m.content) for m in messages), _tokens(text))
        if budget is not None:
            budget.in_flight -= 1
            budget.input_tokens += usage.input_tokens
            budget.output_tokens += usage.output_tokens
        return CompleteReply(f"fake-{next(self._ids)}", text, model, usage, stop_reason=stop_reason)

    def _budget(self, run: str) -> _Budget:
        budget = self._runs.get(run)
        if budget is None:
            budget = self._runs[run] = _Budget(run, RunLimits(), self.clock())
        return budget

    async def run_open(self, run: str, limits: RunLimits | None = None) -> RunUsage:
        budget = self._runs[run] = _Budget(run, limits or RunLimits(), self.clock())
        return budget.snapshot(self.clock())

    async def run_close(self, run: str) -> RunUsage:
        budget = self._budget(run)
        budget.closed = True
        return budget.snapshot(self.clock())

    async def usage(self, run: str) -> RunUsage:
        return self._budget(run).snapshot(self.clock())


# ---------------------------------------------------------------- the sandbox (not a sandbox)


class LLMQueryError(RuntimeError):
    """An llm_query / llm_query_batched call failed (raised inside the model's code)."""


class RLMQueryError(RuntimeError):
    """An rlm_query call failed or is not available (raised inside the model's code)."""


class ToolError(RuntimeError):
    """A host-side tool failed (raised inside the model's code)."""


ToolError.__module__ = "builtins"


# The model sees these as builtins, as it does in a real worker.
LLMQueryError.__module__ = RLMQueryError.__module__ = "builtins"


def _cut(text: str, limit: int) -> tuple[str, int]:
    """``text`` cut to about ``limit`` characters, head and tail kept, with a note of the cut."""
    if len(text) <= limit:
        return text, 0
    half = limit // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n... [truncated {cut:,} characters] ...\n{text[len(text) - half :]}", cut


class InMemorySession:
    """A namespace in this process. NOT A SANDBOX: see the module docstring. Made by ``open``."""

    _numbers = count(1)

    def __init__(
        self,
        *,
        run: str,
        context: Any,
        depth: int,
        max_depth: int,
        sub_model: str,
        max_output_chars: int,
        models: ModelClient | None,
        on_rlm_query: RlmCallback | None,
        wait_s: float,
        context_windows: Mapping[str, int] | None = None,
        max_sub_calls: int = 1_000,
        tools: Sequence[str] = (),
        on_tool_call: ToolCallback | None = None,
        sandbox_modules: Sequence[str] = (),
    ) -> None:
        self.id = f"mem-{next(self._numbers)}"
        self.on_tool_call = on_tool_call
        self.run = run
        self.depth = depth
        self.max_depth = max_depth
        self.sub_model = sub_model
        self.max_output_chars = max_output_chars
        self.models = models
        self.on_rlm_query = on_rlm_query
        self.wait_s = wait_s
        self.context_windows = dict(context_windows or {})
        self.max_sub_calls = max_sub_calls
        self.codes: list[str] = []  # every block run here, in order
        self.closed = False
        self._busy = False
        self._runs = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out = io.StringIO()
        self._err = io.StringIO()
        self._final: str | None = None
        self._final_var: str | None = None
        self._ending: str | None = None
        self._llm_calls = 0
        # The exec in progress: its sub-call records and replay (the pool relay's job).
        self._seq = 0
        self._started = 0.0
        self._on_sub_call: Callable[[SubCall], None] | None = None
        self._record_chars: int | None = None
        self._replay: Replay | None = None
        self._replayed: dict[int, SubCall] = {}
        self.namespace: dict[str, Any] = {
            "__name__": "__main__",
            "__builtins__": builtins,
            "context": context,
            "print": self._print,
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
        for name in tools:
            self.namespace[name] = self._tool(name)
        for module_name in sandbox_modules:  # as a worker does, minus its checks
            module = importlib.import_module(module_name)
            self.namespace[module_name.rpartition(".")[2]] = module
            public = getattr(module, "__all__", [k for k in vars(module) if not k.startswith("_")])
            self.namespace.update({k: getattr(module, k) for k in public})
        self._helpers = frozenset(k for k in self.namespace if k not in ("context", "answer"))

    def __repr__(self) -> str:
        return f"<InMemorySession {self.id} run={self.run} depth={self.depth}>"

    # ------------------------------------------------------------ the session interface

    async def exec(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        on_sub_call: Callable[[SubCall], None] | None = None,
        record_chars: int | None = None,
        replay: Replay | None = None,
    ) -> ExecResult:
        """Run ``code`` in a thread of its own, so its sub-calls can wait on this event loop.

        As the pool: with ``record_chars`` set, each sub-call is reported to ``on_sub_call`` (on
        this event loop, before the result); ``replay`` answers sub-calls from a recording.
        ``timeout_s`` is accepted and ignored (code in this process cannot be stopped)."""
        if self.closed:
            raise SandboxError(ErrorCode.UNKNOWN_SESSION, f"session {self.id} is closed")
        if self._busy:
            raise SandboxError(ErrorCode.SESSION_BUSY, f"session {self.id} is already running code")
        self._busy = True
        self._seq = 0
        self._started = time.perf_counter()
        self._on_sub_call = on_sub_call if record_chars is not None else None
        self._record_chars = record_chars
        self._replay = replay
        self._replayed = {} if replay is None else {c.seq: c for c in replay.calls}
        self.codes.append(code)
        loop = self._loop = asyncio.get_running_loop()
        done: asyncio.Future[ExecResult] = loop.create_future()

        def deliver(result: ExecResult) -> None:
            if not done.done():  # the awaiting task may have been cancelled
                done.set_result(result)

        def work() -> None:
            result = self._run(code)
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is waiting
                loop.call_soon_threadsafe(deliver, result)

        # A thread per exec, not a pool: a block waiting on rlm_query needs the child's block to run.
        threading.Thread(target=work, name=f"rlmq-{self.id}", daemon=True).start()
        try:
            return await done
        finally:
            self._busy = False

    async def close(self) -> None:
        self.closed = True

    # ------------------------------------------------------------ running one block (in its thread)

    def _run(self, code: str) -> ExecResult:
        self._runs += 1
        filename = f"<repl-{self._runs}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
        self._out, self._err = io.StringIO(), io.StringIO()
        self._final = self._final_var = self._ending = None
        self._llm_calls = 0
        error: ExecError | None = None
        started = time.perf_counter()
        try:
            self._exec(code, filename)
        except BaseException as exc:  # the exec boundary: the model's code may raise anything
            error = ExecError("exception", type(exc).__name__, str(exc), _traceback(exc, filename))
        if self._final is None:
            self._answer_ready()
        stdout, cut_out = _cut(self._out.getvalue(), self.max_output_chars)
        stderr, cut_err = _cut(self._err.getvalue(), self.max_output_chars)
        return ExecResult(
            stdout=stdout,
            stderr=stderr,
            error=error,
            final=self._final,
            final_var=self._final_var,
            elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
            truncated_chars=cut_out + cut_err,
            llm_calls=self._llm_calls,
            state_lost=False,
            ending=self._ending,
        )

    def _exec(self, code: str, filename: str) -> None:
        tree = ast.parse(code, filename, "exec")
        last: ast.expr | None = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):  # echo a last expression, like a REPL
            last = tree.body[-1].value
            tree.body.pop()
        if tree.body:
            exec(compile(tree, filename, "exec"), self.namespace)  # noqa: S102 - NOT a sandbox, see above
        if last is not None:
            value = eval(compile(ast.Expression(last), filename, "eval"), self.namespace)  # noqa: S307
            if value is not None:
                self._print(repr(value))

    def _print(
        self, *values: object, sep: str | None = " ", end: str | None = "\n", file: Any = None
    ) -> None:
        target: TextIO
        if file is None or file is sys.stdout:
            target = self._out
        elif file is sys.stderr:
            target = self._err
        else:
            target = file
        builtins.print(*values, sep=sep, end=end, file=target)

    def _wait(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run ``make()`` on the session's event loop and wait for it, from the exec thread."""
        assert self._loop is not None

        async def call() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout=self.wait_s)

    # ------------------------------------------------------------ the model's functions

    def _messages(self, prompt: Any) -> list[ChatMessage]:
        if isinstance(prompt, str):
            return [ChatMessage("user", prompt)]
        if isinstance(prompt, list | tuple) and all(isinstance(m, Mapping) for m in prompt):
            return [ChatMessage(str(m["role"]), str(m["content"])) for m in prompt]
        raise TypeError(f"llm_query prompt must be a str, not {type(prompt).__name__}")

    def _client(self) -> ModelClient:
        if self.models is None:
            raise LLMQueryError("llm_query is not available: this InMemorySandbox has no model client")
        return self.models

    def _count(self, n: int, what: str) -> None:
        if self._llm_calls + n > self.max_sub_calls:
            raise LLMQueryError(
                f"{what}: this block has made {self._llm_calls:,} sub-calls and {n:,} more would pass "
                f"the limit of {self.max_sub_calls:,} per block (max_sub_calls_per_exec); none of them "
                "was sent. Give each sub-call a bigger chunk and use llm_query_batched."
            )
        self._llm_calls += n

    def _over_window(self, alias: str, messages: list[ChatMessage]) -> tuple[int, int] | None:
        """(estimated tokens, window) of a prompt over ``alias``'s window, else None."""
        window = self.context_windows.get(alias)
        tokens = -(-sum(len(m.content) for m in messages) // 4)
        return None if window is None or tokens <= window else (tokens, window)

    def _llm_query(self, prompt: Any, model: str | None = None) -> str:
        client, messages, alias = self._client(), self._messages(prompt), model or self.sub_model
        over = self._over_window(alias, messages)
        if over is not None:
            tokens, window = over
            raise LLMQueryError(
                f"llm_query: the prompt is about {tokens:,} tokens, over the context window of "
                f"{alias!r} ({window:,} tokens); nothing was sent. Split it into chunks of at most "
                f"about {window * 3:,} characters and use llm_query_batched over the chunks."
            )
        self._count(1, "llm_query")
        seq = self._next_seq(1)
        try:
            reply = self._wait(lambda: self._answer(client, seq, messages, alias))
        except RlmqError as exc:
            info = ErrorInfo.of(exc)
            raise LLMQueryError(f"llm_query failed ({info.code}): {info.message}") from None
        except concurrent.futures.TimeoutError:
            raise LLMQueryError(f"llm_query failed (timeout): no answer within {self.wait_s:g} s") from None
        return reply.text

    def _llm_query_batched(self, prompts: Sequence[Any], model: str | None = None) -> list[str]:
        if isinstance(prompts, str):
            raise TypeError("llm_query_batched takes a list of prompts; for one prompt use llm_query")
        client, alias = self._client(), model or self.sub_model
        batch = [self._messages(p) for p in prompts]
        over = [(i, o[0]) for i, m in enumerate(batch) if (o := self._over_window(alias, m)) is not None]
        if over:
            window = self.context_windows[alias]
            shown = ", ".join(f"{i} (about {t:,} tokens)" for i, t in over[:10])
            raise LLMQueryError(
                f"llm_query_batched: {len(over)} of {len(batch)} prompts are over the context window "
                f"of {alias!r} ({window:,} tokens): index {shown}; none of the batch was sent. Split "
                f"those into chunks of at most about {window * 3:,} characters."
            )
        self._count(len(batch), "llm_query_batched")
        seq0 = self._next_seq(len(batch))

        async def gather() -> list[CompleteReply | BaseException]:
            return await asyncio.gather(
                *(self._answer(client, seq0 + i, m, alias) for i, m in enumerate(batch)),
                return_exceptions=True,
            )

        try:
            replies = self._wait(gather)
        except concurrent.futures.TimeoutError:
            raise LLMQueryError(
                f"llm_query_batched failed (timeout): no answers within {self.wait_s:g} s"
            ) from None
        failed = [(i, r) for i, r in enumerate(replies) if isinstance(r, BaseException)]
        if failed:
            index, first = failed[0]
            info = ErrorInfo.of(first)
            shown = ", ".join(str(i) for i, _ in failed[:20]) + (", ..." if len(failed) > 20 else "")
            raise LLMQueryError(
                f"llm_query_batched: {len(failed)} of {len(replies)} prompts failed (indexes {shown}); "
                f"first error, at index {index}: ({info.code}) {info.message}"
            )
        return [r.text for r in replies if isinstance(r, CompleteReply)]

    def _next_seq(self, n: int) -> int:
        seq, self._seq = self._seq, self._seq + n
        return seq

    async def _answer(
        self, client: ModelClient, seq: int, messages: list[ChatMessage], alias: str
    ) -> CompleteReply:
        """One sub-call, on the event loop: from the exec's replay when it has this call's
        answer, else from the model client (or ``not_recorded``); recorded either way."""
        sha = prompt_sha256((m.role, m.content) for m in messages)
        started = time.perf_counter()
        replay = self._replay
        recorded = None
        candidate = self._replayed.get(seq)
        if candidate is not None and candidate.prompt_sha256 == sha:
            recorded = candidate
        reply: CompleteReply | None = None
        error: ErrorInfo | None = None
        if recorded is not None:
            error = recorded.error
            if error is None:
                text = recorded.text or ""
                reply = CompleteReply("replayed", text, alias, recorded.usage, cached=recorded.cached)
        elif replay is not None and not replay.live:
            error = ErrorInfo(ErrorCode.NOT_RECORDED, f"sub-call {seq} of this exec has no recorded answer")
        else:
            try:
                reply = await client.complete(messages, model=alias, run=self.run, depth=self.depth + 1)
            except RlmqError as exc:
                error = ErrorInfo.of(exc)
        if self._on_sub_call is not None:
            self._on_sub_call(
                self._record(seq, alias, messages, sha, reply, error, started, recorded is not None, replay)
            )
        if error is not None:
            raise RemoteError(error.code, error.message, retryable=error.retryable)
        assert reply is not None
        return reply

    def _record(
        self,
        seq: int,
        alias: str,
        messages: list[ChatMessage],
        sha: str,
        reply: CompleteReply | None,
        error: ErrorInfo | None,
        started: float,
        replayed: bool,
        replay: Replay | None,
    ) -> SubCall:
        prompt = "\n\n".join(m.content for m in messages if m.role == "user")
        limit = self._record_chars or 0
        head, tail = prompt, None
        if len(prompt) > limit:
            half = limit // 2
            head, tail = prompt[:half], prompt[len(prompt) - half :]
        now = time.perf_counter()
        return SubCall(
            seq=seq,
            model=alias,
            depth=self.depth + 1,
            prompt=head,
            prompt_tail=tail,
            prompt_chars=len(prompt),
            prompt_sha256=sha,
            text=None if reply is None else reply.text,
            usage=Usage(0, 0) if reply is None else reply.usage,
            cost_usd=0.0,
            cached=False if reply is None else reply.cached,
            error=error,
            started_ms=round((started - self._started) * 1000, 3),
            latency_ms=round((now - started) * 1000, 3),
            replayed=replayed,
            # As the pool does: no matching answer, and under live replay only when one was
            # recorded at this seq (a changed prompt); a call past the recording is plain live.
            diverged=replay is not None
            and not replayed
            and (not replay.live or any(c.seq == seq for c in replay.calls)),
        )

    def _rlm_query(self, prompt: str, context: Any = None) -> str:
        if self.depth + 1 >= self.max_depth:
            raise RLMQueryError(
                f"rlm_query is disabled at depth {self.depth} (max_depth={self.max_depth}): a child "
                f"run would be at depth {self.depth + 1}. Use llm_query(prompt) for a plain sub-call."
            )
        if self.on_rlm_query is None:
            raise RLMQueryError(
                "rlm_query is not available: the orchestrator that opened this session does not "
                "answer recursive runs. Use llm_query(prompt) for a plain sub-call."
            )
        if not isinstance(prompt, str):
            raise TypeError(f"rlm_query prompt must be a str, not {type(prompt).__name__}")
        self._count(1, "rlm_query")
        try:
            callback = self.on_rlm_query
            return str(self._wait(lambda: callback(prompt, context)))
        except concurrent.futures.TimeoutError:
            raise RLMQueryError(f"no answer to rlm_query within {self.wait_s:g} s") from None
        except Exception as exc:  # the callback boundary, as in the real client: typed or a bug
            info = ErrorInfo.of(exc)
            if not isinstance(exc, RlmqError):
                info = ErrorInfo(ErrorCode.RLM_FAILED, info.message)
            raise RLMQueryError(f"rlm_query failed: ({info.code}) {info.message}") from None

    def _tool(self, name: str) -> Callable[..., Any]:
        def tool(*args: Any, **kwargs: Any) -> Any:
            callback = self.on_tool_call
            if callback is None:
                raise ToolError(f"{name}(): this session has no host-side tools")
            try:
                packed = msgpack.packb([list(args), kwargs], use_bin_type=True)
            except (TypeError, ValueError, OverflowError) as exc:
                raise TypeError(f"{name}(): its arguments must be msgpack values: {exc}") from None
            call_args, call_kwargs = msgpack.unpackb(packed, raw=False)
            try:
                return self._wait(lambda: callback(name, call_args, call_kwargs))
            except concurrent.futures.TimeoutError:
                raise ToolError(f"{name}(): no answer within {self.wait_s:g} s") from None
            except Exception as exc:  # the callback boundary, as in the real client
                info = ErrorInfo.of(exc)
                raise ToolError(f"{name}() failed ({info.code}): {info.message}") from None

        tool.__name__ = name
        return tool

    def _final_fn(self, value: Any) -> None:
        self._final = str(value)
        self._final_var = None
        self._ending = "final"

    def _final_var_fn(self, name: Any) -> None:
        """A str names a variable; anything else, or a str that is a variable's value, is the
        answer itself (as in the worker, ``rlmq.sandbox.runtime.final_var_value``)."""
        helpers = self._helpers
        holder = next(
            (
                k
                for k, v in self.namespace.items()
                if v is name and k not in helpers and not k.startswith("_")
            ),
            None,
        )
        value: Any = name
        if isinstance(name, str):
            key = name.strip().strip("'\"").strip()
            if key in self.namespace and key not in helpers:
                value, holder = self.namespace[key], key
            elif holder is None:
                raise NameError(f"FINAL_VAR({key!r}): no variable named {key!r} is defined in this session")
        self._final = str(value)
        self._final_var = holder
        self._ending = "final_var"

    def _show_vars(self) -> str:
        names = [
            f"{k} ({type(v).__name__})"
            for k, v in self.namespace.items()
            if k not in self._helpers and not k.startswith("_") and not isinstance(v, types.ModuleType)
        ]
        return "Variables: " + ", ".join(names) if names else "No variables yet."

    def _answer_ready(self) -> None:
        """The ``answer`` dict ending: ``answer["content"]`` once ``answer["ready"]`` is true."""
        answer = self.namespace.get("answer")
        if not isinstance(answer, dict) or not answer.get("ready"):
            return
        content = str(answer.get("content", ""))
        if not content.strip():
            self._err.write(
                '[rlmq] answer["ready"] is set but answer["content"] is empty: put the answer in it\n'
            )
            return
        self._final, self._final_var, self._ending = content, None, "answer"


def _traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the first frame of the model's code (ours above it is noise)."""
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        return "".join(traceback.format_exception_only(type(exc), exc))
    tb: types.TracebackType | None = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


@dataclass
class InMemorySandbox:
    """A ``Sandbox`` of ``InMemorySession``s. NOT A SANDBOX: see the module docstring.

    ``models`` answers the sessions' ``llm_query`` calls (None: they raise). ``open_error``, when
    set, is raised by the next ``open`` (once), as a pool's refusal would be.
    """

    models: ModelClient | None = None
    max_output_chars: int = 20_000
    wait_s: float = 60.0  # bound on any sub-call a block waits for: nothing waits forever
    open_error: RlmqError | None = None
    context_windows: Mapping[str, int] = field(default_factory=dict)  # alias -> tokens, as the handler tells
    max_sub_calls: int = 1_000  # per exec, as a pool's max_sub_calls_per_exec
    sessions: list[InMemorySession] = field(default_factory=list)

    @property
    def open_sessions(self) -> list[InMemorySession]:
        return [s for s in self.sessions if not s.closed]

    async def open(
        self,
        *,
        run: str,
        context: Any = None,
        depth: int = 0,
        max_depth: int = 1,
        sub_model: str = "sub",
        exec_timeout_s: float | None = None,
        max_output_chars: int | None = None,
        on_rlm_query: RlmCallback | None = None,
        tools: Sequence[str] = (),
        on_tool_call: ToolCallback | None = None,
        sandbox_modules: Sequence[str] = (),
    ) -> InMemorySession:
        """``exec_timeout_s`` is accepted and ignored: code in this process cannot be stopped."""
        if self.open_error is not None:
            error, self.open_error = self.open_error, None
            raise error
        session = InMemorySession(
            run=run,
            context=context,
            depth=depth,
            max_depth=max_depth,
            sub_model=sub_model,
            max_output_chars=max_output_chars or self.max_output_chars,
            models=self.models,
            on_rlm_query=on_rlm_query,
            wait_s=self.wait_s,
            context_windows=self.context_windows,
            max_sub_calls=self.max_sub_calls,
            tools=tools,
            on_tool_call=on_tool_call,
            sandbox_modules=sandbox_modules,
        )
        self.sessions.append(session)
        return session


if TYPE_CHECKING:  # mypy holds the fakes to the interfaces they stand for

    def _fits(models: ScriptedModelClient, sandbox: InMemorySandbox) -> tuple[ModelClient, Sandbox]:
        return models, sandbox
