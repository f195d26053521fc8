"""``from rlmq import RLM``: the Python surface of rlmq (DESIGN.md section 8).

    rlm = RLM.from_config("rlmq.toml", max_iterations=20)   # private handler and pool, on first use
    rlm = RLM.connect(handler="tcp://...", sandbox="tcp://...")  # running ones
    result = rlm.completion("Which vendors are late?", contracts_text)
    result = await rlm.acompletion("...", Path("contracts/"))

Everything that talks to the services (the ZeroMQ clients, the private services, the runs) lives
on one event loop in a thread of its own, started with the ``RLM``. That is what lets the same
object serve a plain script (``completion`` blocks on it), an asyncio application (``acompletion``
awaits it) and a notebook, whose loop is already running when ``completion`` is called: the
caller's loop is never re-entered, so nothing deadlocks. Runs on one ``RLM`` overlap freely.

Context: a ``str`` (or ``bytes``) is the document itself, never a file name; a ``list`` or a
``dict`` is passed as it is; a ``pathlib.Path`` (any ``os.PathLike``), or ``path=`` for a name
given as a string, is read from disk like ``rlmq run --context``: a text file, a ``.json`` file,
or a directory (a dict of relative path to text).

Sessions: ``with rlm.session(context) as s: s.ask(q1); s.ask(q2)`` (or ``async with
rlm.asession(context) as s: await s.aask(q)``) load the context once; the REPL keeps its
variables and the history its questions and answers from one question to the next. One session is
one run at the handler (one run id, one budget, one trajectory); each question has its own
iterations and wall time (``ask(q, max_iterations=...)``) and its ``Result`` counts what it spent.

Host-side tools: ``tools={"search": fn}`` makes ``search(...)`` callable from the model's code;
``fn`` runs here, in this process, on the trusted side (``rlmq.orchestrator.tools``).
``sandbox_modules=["pkg.helpers"]`` (a run setting) imports helpers into the REPL instead.

Runs are opened with a key of their own and survive a handler restart with what is left of their
budget (``GuardedModels``), as those of ``rlmq run`` do.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import queue
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from rlmq.orchestrator import (
    RLM as _Loop,
)
from rlmq.orchestrator import (
    Conversation,
    GuardedModels,
    GuardedSandbox,
    RunResult,
    RunSettings,
    StopReason,
    ToolBox,
    Trajectory,
    load_context,
    load_run_settings,
    local_services,
    new_run_id,
)
from rlmq.protocol import AsyncHandlerClient, ConfigError, ErrorInfo, RlmqError, RunUsage, Usage
from rlmq.protocol.sandbox import AsyncSandboxClient
from rlmq.protocol.security import CurveClientKeys
from rlmq.protocol.tables import read_toml

__all__ = ["DEFAULT_TRAJECTORY_DIR", "RLM", "Progress", "Result", "Session"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TRAJECTORY_DIR = Path("rlmq-runs")  # where `rlmq run` writes them too
PING_TIMEOUT_S = 5.0
SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(RunSettings))
# Settings a session fixes when it opens (its budget, its sandbox session): not per question.
SESSION_SETTINGS = frozenset(
    {
        "max_calls",
        "max_input_tokens",
        "max_output_tokens",
        "max_cost_usd",
        "max_depth",
        "sub_model",
        "exec_timeout_s",
        "max_output_chars",
        "sandbox_modules",
        "tool_timeout_s",
    }
)

ContextArg = str | bytes | list[Any] | tuple[Any, ...] | dict[Any, Any] | os.PathLike[str] | None
Tools = Mapping[str, Callable[..., Any]]


# ---------------------------------------------------------------- what a run gives back


@dataclass(frozen=True, slots=True)
class Result:
    """One run's outcome. ``str(result)`` is the answer.

    ``stop_reason`` says why the run stopped (``final``, ``max_iterations``, ``budget_exceeded``,
    ``wall_time``, ``error``); ``detail`` says more for people, ``error`` keeps the remote error
    whole. A limit or a remote error is not an exception: the answer is then the best one
    available, and ``ok`` is false unless the model answered. ``usage``, ``calls`` and
    ``cost_usd`` cover every model call of the run, sub-calls and child runs included, as the
    handler counted them (``run_usage`` is its whole record). ``trajectory`` is the JSON-lines
    record of the run, when one was written.
    """

    answer: str
    stop_reason: StopReason
    detail: str
    iterations: int
    usage: Usage
    calls: int
    cost_usd: float
    trajectory: Path | None
    run_id: str
    elapsed_s: float
    error: ErrorInfo | None = None
    run_usage: RunUsage | None = None

    @property
    def ok(self) -> bool:
        """The model gave the answer (by FINAL, or when asked for it at the iteration limit)."""
        return self.stop_reason.answered

    def __str__(self) -> str:
        return self.answer

    @classmethod
    def of(cls, run: RunResult, trajectory: Path | None) -> Result:
        usage = run.usage
        return cls(
            answer=run.answer,
            stop_reason=run.stop_reason,
            detail=run.detail,
            iterations=run.iterations,
            usage=usage.usage if usage else Usage(),
            calls=usage.calls if usage else 0,
            cost_usd=usage.cost_usd if usage else 0.0,
            trajectory=trajectory,
            run_id=run.run_id,
            elapsed_s=run.elapsed_s,
            error=run.error,
            run_usage=usage,
        )


@dataclass(frozen=True, slots=True)
class Progress:
    """A step of a run in progress, for ``on_progress``: ``event`` is the trajectory event it comes
    from (``model_call``, ``exec``, ``child_start``, ``compaction``, ``final``); ``sub_calls`` and
    ``model_calls`` count the whole run so far; ``message`` is one line for people."""

    run_id: str
    event: str
    depth: int
    iteration: int
    sub_calls: int
    model_calls: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ProgressCallback = Callable[[Progress], None]


class _ProgressTracker:
    """Turns one run's trajectory events into ``Progress`` for a sink."""

    def __init__(self, run_id: str, sink: Callable[[Progress], None] | None) -> None:
        self.run_id = run_id
        self.sink = sink  # None: nobody listens (a session's question without on_progress)
        self.sub_calls = 0
        self.model_calls = 0

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if self.sink is None:
            return
        depth = int(fields.get("depth", 0))
        iteration = int(fields.get("iteration", 0))
        where = f"depth {depth}, iteration {iteration}" if depth else f"iteration {iteration}"
        if name == "model_call":
            self.model_calls += 1
            out = fields.get("usage", {}).get("output_tokens", 0)
            message = f"{where}: the model replied ({out} tokens)"
        elif name == "exec_end":
            name = "exec"  # the progress step's name, older than trajectory events' exec_end
            calls = int(fields.get("llm_calls", 0))
            self.sub_calls += calls
            message = f"{where}: code block {int(fields.get('block', 0)) + 1} ran, {calls} sub-calls"
            error = fields.get("error")
            if error:
                message += f", error: {error.get('message', '')[:200]}"
        elif name == "child_start":
            message = f"depth {depth}: a recursive run started"
        elif name == "compaction":
            message = f"{where}: the history was compacted"
        elif name == "final":
            iteration = int(fields.get("iterations", 0))
            message = f"depth {depth}: stopped ({fields.get('stop_reason', '')}) after {iteration} iterations"
        else:
            return
        self.sink(Progress(self.run_id, name, depth, iteration, self.sub_calls, self.model_calls, message))


# ---------------------------------------------------------------- the private event loop


class _LoopThread:
    """One event loop in a daemon thread: the home of every client and run of an ``RLM``.

    Daemon, because the interpreter joins other threads *before* it runs ``atexit`` handlers, and
    the handler that stops the private services needs this loop still running.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="rlmq-facade", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def here(self) -> bool:
        """Whether the caller runs on this loop's thread (where blocking on it would deadlock)."""
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()


# ---------------------------------------------------------------- services and clients


StartServices = Callable[[contextlib.AsyncExitStack], Awaitable[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class _Connection:
    models: GuardedModels  # runs with keys, that survive a handler restart
    sandbox: GuardedSandbox  # sessions with the run's key, tools and sandbox_modules
    context_windows: Mapping[str, int]


class _Shared:
    """What every view of one ``RLM`` shares: the loop thread, the services, the two clients."""

    def __init__(self, start: StartServices, curve: CurveClientKeys | None) -> None:
        self._start = start
        self._curve = curve
        self.thread = _LoopThread()
        self._stack = contextlib.AsyncExitStack()
        self._connection: _Connection | None = None
        self._lock = asyncio.Lock()  # bound to the private loop on first use
        self.runs: set[asyncio.Task[Any]] = set()  # in progress, cancelled by close()
        self.sessions: set[Session] = set()  # open sessions, closed by close()
        self.closed = False

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the private loop; refused once closed, and from the loop's own thread
        (blocking there would deadlock)."""
        if self.closed:
            coro.close()
            raise RuntimeError("this RLM is closed")
        if self.thread.here:
            coro.close()
            raise RuntimeError("a blocking RLM call was made from the RLM's own thread; use the async one")
        return self.thread.submit(coro)

    async def connection(self) -> _Connection:
        """The clients, starting the services and connecting on first use (once, under a lock)."""
        async with self._lock:
            if self.closed:
                raise RuntimeError("this RLM is closed")
            if self._connection is None:
                try:
                    self._connection = await self._connect()
                except BaseException:
                    # Stop whatever did start; the next call tries again from nothing.
                    await self._stack.aclose()
                    self._stack = contextlib.AsyncExitStack()
                    raise
            return self._connection

    async def _connect(self) -> _Connection:
        handler, sandbox = await self._start(self._stack)
        models = await self._stack.enter_async_context(AsyncHandlerClient(handler, curve=self._curve))
        pool = await self._stack.enter_async_context(AsyncSandboxClient(sandbox, curve=self._curve))
        # The handler tells the models' context windows, which the system prompt passes on. A
        # handler that does not answer is the run's problem to report, not this lookup's.
        try:
            windows: Mapping[str, int] = (await models.ping(timeout_s=PING_TIMEOUT_S)).context_windows
        except RlmqError:
            windows = {}
        guarded = GuardedModels(models)
        return _Connection(guarded, GuardedSandbox(pool, guarded), windows)

    async def aclose(self) -> None:
        self.closed = True
        runs = [t for t in self.runs if t is not asyncio.current_task()]
        for task in runs:
            # Once is enough: a second cancel would interrupt the run's own clean-up (closing
            # its session and its run at the handler, writing the end of its trajectory).
            if not task.cancelling():
                task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await asyncio.gather(*(s.finish() for s in list(self.sessions)), return_exceptions=True)
        self.sessions.clear()
        async with self._lock:
            self._connection = None
            await self._stack.aclose()

    def close(self) -> None:
        """Stop the services and the loop thread; idempotent; never from the loop thread itself."""
        try:
            if not self.closed:
                self.submit(self.aclose()).result()
        finally:
            self.thread.stop()


def _private_services(config: Path) -> StartServices:
    async def start(stack: contextlib.AsyncExitStack) -> tuple[str, str]:
        services = await stack.enter_async_context(local_services(config))
        return services.handler, services.sandbox

    return start


def _running_services(handler: str, sandbox: str) -> StartServices:
    async def start(stack: contextlib.AsyncExitStack) -> tuple[str, str]:
        return handler, sandbox

    return start


# ---------------------------------------------------------------- the facade


def _context_value(context: ContextArg, path: str | os.PathLike[str] | None) -> Any:
    """What the model's ``context`` variable holds (see the module docstring)."""
    if path is not None:
        if context is not None:
            raise TypeError("give the context or path=, not both")
        context = Path(path)
    if context is None:
        return ""
    if isinstance(context, os.PathLike):
        # absolute(): `-` would otherwise mean stdin to load_context
        return load_context(str(Path(context).absolute()))
    if isinstance(context, str | bytes | list | tuple | dict):
        return context
    raise TypeError(f"context must be str, bytes, list, dict or a pathlib.Path, not {type(context).__name__}")


def _check_options(options: Mapping[str, Any], *, what: str) -> None:
    unknown = sorted(set(options) - SETTING_NAMES)
    if unknown:
        raise TypeError(
            f"unknown {what} {unknown[0]!r}; the run settings are: {', '.join(sorted(SETTING_NAMES))}"
        )


def _toolbox(tools: Tools | None) -> ToolBox | None:
    """The tools of ``tools=`` (bad names and non-callables are refused here, at once)."""
    if tools is None:
        return None
    if not isinstance(tools, Mapping):
        raise TypeError(f"tools must be a dict of name to function, not {type(tools).__name__}")
    return ToolBox(tools) if tools else None


class RLM:
    """Recursive Language Model runs against a handler and a sandbox pool.

    Make one with ``RLM.from_config`` (private services, started on first use and stopped by
    ``close()``, by leaving a ``with`` block, or at interpreter exit) or ``RLM.connect`` (services
    already running). Options are the same for both: the run settings (``max_iterations=``,
    ``max_depth=``, ``sub_model=``, ``wall_time_s=``, ``max_cost_usd=``, ``sandbox_modules=``,
    ``tool_timeout_s=``, ... every field of ``rlmq.orchestrator.RunSettings``),
    ``trajectory_dir=`` (default ``rlmq-runs``; None writes none) and ``tools=`` (a dict of name
    to function: host-side tools). With a config, its ``[run]`` table comes first and the
    options override it.
    """

    def __init__(
        self,
        shared: _Shared,
        settings: RunSettings,
        *,
        trajectory_dir: Path | None,
        owner: bool,
        tools: ToolBox | None = None,
    ) -> None:
        """Not for direct use: see ``from_config``, ``connect`` and ``with_options``."""
        self._shared = shared
        self._tools = tools
        self.settings = settings
        self.trajectory_dir = trajectory_dir
        self._owner = owner
        if owner:
            atexit.register(self.close)

    # ------------------------------------------------------------ making one

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] = "rlmq.toml",
        *,
        tools: Tools | None = None,
        trajectory_dir: str | os.PathLike[str] | None = DEFAULT_TRAJECTORY_DIR,
        **settings: Any,
    ) -> RLM:
        """Private services from ``config`` (its ``[models.*]``, ``[sandbox]`` and ``[run]``),
        started on first use. A missing or invalid file is a ``ConfigError`` now, not later."""
        box = _toolbox(tools)
        _check_options(settings, what="option")
        path = Path(config)
        read_toml(path, error=ConfigError)  # exists and parses: fail here, not in a child process
        run = load_run_settings(path, settings)
        shared = _Shared(_private_services(path), curve=None)  # ipc:// in a private directory
        return cls(shared, run, trajectory_dir=_dir(trajectory_dir), owner=True, tools=box)

    @classmethod
    def connect(
        cls,
        *,
        handler: str,
        sandbox: str,
        config: str | os.PathLike[str] | None = None,
        curve: CurveClientKeys | None = None,
        tools: Tools | None = None,
        trajectory_dir: str | os.PathLike[str] | None = DEFAULT_TRAJECTORY_DIR,
        **settings: Any,
    ) -> RLM:
        """Use a running handler and pool. ``config``: a file whose ``[run]`` table gives the
        settings' defaults; ``curve``: client keys for services on TCP beyond loopback."""
        box = _toolbox(tools)
        _check_options(settings, what="option")
        run = load_run_settings(None if config is None else Path(config), settings)
        shared = _Shared(_running_services(handler, sandbox), curve=curve)
        return cls(shared, run, trajectory_dir=_dir(trajectory_dir), owner=True, tools=box)

    def with_options(self, **options: Any) -> RLM:
        """Another ``RLM`` on the same services and clients with some options changed (run
        settings, ``trajectory_dir``, ``tools``). Closing it does nothing: the original owns the
        services."""
        trajectory_dir = _dir(options.pop("trajectory_dir")) if "trajectory_dir" in options else None
        box = _toolbox(options.pop("tools")) if "tools" in options else self._tools
        _check_options(options, what="option")
        settings = dataclasses.replace(self.settings, **options).validated()
        keep_dir = self.trajectory_dir if trajectory_dir is None else trajectory_dir
        return RLM(self._shared, settings, trajectory_dir=keep_dir, owner=False, tools=box)

    # ------------------------------------------------------------ runs

    def completion(
        self,
        query: str,
        context: ContextArg = None,
        *,
        path: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        trajectory: str | os.PathLike[str] | None = None,
        on_progress: ProgressCallback | None = None,
        **limits: Any,
    ) -> Result:
        """Answer ``query`` about ``context``; blocks until the run ends.

        ``limits``: run settings for this run only (``max_iterations=5``, ``max_cost_usd=0.5``).
        ``trajectory``: this run's trajectory file (default: ``trajectory_dir/RUN_ID.jsonl``).
        ``on_progress`` is called in this thread with each ``Progress`` of the run. Works where an
        event loop is already running (a notebook): the run happens on the RLM's own loop.
        """
        settings = self._run_settings(limits)
        steps: queue.SimpleQueue[Progress | None] = queue.SimpleQueue()
        sink = None if on_progress is None else steps.put
        future = self._shared.submit(self._run(query, context, path, settings, run_id, trajectory, sink))
        future.add_done_callback(lambda _: steps.put(None))
        try:
            if on_progress is not None:
                while (step := steps.get()) is not None:
                    on_progress(step)
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C, or a callback that raised: the run stops too
            raise

    async def acompletion(
        self,
        query: str,
        context: ContextArg = None,
        *,
        path: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        trajectory: str | os.PathLike[str] | None = None,
        on_progress: ProgressCallback | None = None,
        **limits: Any,
    ) -> Result:
        """``completion`` for asyncio code: ``on_progress`` is called on the caller's event loop.
        Cancelling the awaiting task cancels the run."""
        settings = self._run_settings(limits)
        sink: Callable[[Progress], None] | None = None
        if on_progress is not None:
            loop = asyncio.get_running_loop()
            callback = on_progress

            def sink(step: Progress) -> None:
                loop.call_soon_threadsafe(callback, step)

        future = self._shared.submit(self._run(query, context, path, settings, run_id, trajectory, sink))
        return await asyncio.wrap_future(future)

    def session(
        self,
        context: ContextArg = None,
        *,
        path: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        trajectory: str | os.PathLike[str] | None = None,
        **settings: Any,
    ) -> Session:
        """A conversation over one context that keeps the REPL and the history between questions:
        ``with rlm.session(ctx) as s: a = s.ask(q1); b = s.ask(q2)``.

        ``settings``: run settings for the whole session (its budget: ``max_cost_usd``,
        ``max_calls``, ...; ``sandbox_modules``; any other as the default of each question).
        The session opens on ``with`` (or ``open()``, or the first question): the context is
        loaded then, and a module of ``sandbox_modules`` that cannot be imported raises then.
        ``trajectory``: the session's one trajectory file (default ``trajectory_dir/RUN_ID.jsonl``).
        """
        _check_options(settings, what="setting")
        run = dataclasses.replace(self.settings, **settings).validated() if settings else self.settings
        return Session(self, context, path, run, run_id or new_run_id(), trajectory)

    def asession(
        self,
        context: ContextArg = None,
        *,
        path: str | os.PathLike[str] | None = None,
        run_id: str | None = None,
        trajectory: str | os.PathLike[str] | None = None,
        **settings: Any,
    ) -> Session:
        """``session`` for asyncio code: ``async with rlm.asession(ctx) as s: await s.aask(q)``
        (the same ``Session``; the name says how it is meant to be used)."""
        return self.session(context, path=path, run_id=run_id, trajectory=trajectory, **settings)

    def _trajectory_path(self, run_id: str, trajectory: str | os.PathLike[str] | None) -> Path | None:
        if trajectory is not None:
            return Path(trajectory)
        return None if self.trajectory_dir is None else self.trajectory_dir / f"{run_id}.jsonl"

    def _run_settings(self, limits: Mapping[str, Any]) -> RunSettings:
        if not limits:
            return self.settings
        _check_options(limits, what="limit")
        return dataclasses.replace(self.settings, **limits).validated()

    async def _run(
        self,
        query: str,
        context: ContextArg,
        path: str | os.PathLike[str] | None,
        settings: RunSettings,
        run_id: str | None,
        trajectory: str | os.PathLike[str] | None,
        sink: Callable[[Progress], None] | None,
    ) -> Result:
        """One run, on the private loop."""
        task = asyncio.current_task()
        assert task is not None
        self._shared.runs.add(task)
        try:
            return await self._run_here(query, context, path, settings, run_id, trajectory, sink)
        finally:
            self._shared.runs.discard(task)

    async def _run_here(
        self,
        query: str,
        context: ContextArg,
        path: str | os.PathLike[str] | None,
        settings: RunSettings,
        run_id: str | None,
        trajectory: str | os.PathLike[str] | None,
        sink: Callable[[Progress], None] | None,
    ) -> Result:
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, not {type(query).__name__}")
        value = await asyncio.to_thread(_context_value, context, path)  # may read files
        connection = await self._shared.connection()
        run_id = run_id or new_run_id()
        where = self._trajectory_path(run_id, trajectory)
        loop = _Loop(
            connection.models,
            connection.sandbox,
            settings,
            on_event=None if sink is None else _ProgressTracker(run_id, sink),
            sub_window_tokens=connection.context_windows.get(settings.sub_model),
            tools=self._tools,
        )
        record = Trajectory(where)
        try:
            result = await loop.run(query, value, run_id=run_id, trajectory=record)
        finally:
            record.close()
        return Result.of(result, where)

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Start (or connect to) the services now rather than on the first run."""
        self._shared.submit(self._shared.connection()).result()

    async def astart(self) -> None:
        await asyncio.wrap_future(self._shared.submit(self._shared.connection()))

    def close(self) -> None:
        """Stop the private services (if this RLM started them) and its thread. Idempotent.
        Runs still in progress are cancelled. A view made by ``with_options`` closes nothing."""
        if not self._owner:
            return
        atexit.unregister(self.close)
        self._shared.close()

    async def aclose(self) -> None:
        if self._owner:
            await asyncio.to_thread(self.close)

    @property
    def closed(self) -> bool:
        return self._shared.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _dir(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


class Session:
    """Questions over one context, one at a time, with the REPL and the history kept between
    them. Made by ``RLM.session`` / ``RLM.asession``; use it as a context manager (``with`` or
    ``async with``), or call ``close()``.

    Budgets: the session is one run at the handler, so ``max_cost_usd``, ``max_calls`` and the
    token limits given to ``session(...)`` bound all its questions together; ``max_iterations``,
    ``wall_time_s`` and the other loop settings count per question (``ask(q, max_iterations=3)``
    for one question only). Each ``Result`` counts what its question spent (``run_usage``
    included); ``usage`` here is the session's total once closed.

    Trajectory: one file for the session (``run_start``, an ``ask`` event before each question's
    events, ``run_end`` at close); every ``Result.trajectory`` points to it.
    """

    def __init__(
        self,
        rlm: RLM,
        context: ContextArg,
        path: str | os.PathLike[str] | None,
        settings: RunSettings,
        run_id: str,
        trajectory: str | os.PathLike[str] | None,
    ) -> None:
        self._rlm = rlm
        self._shared = rlm._shared
        self._context = context
        self._path = path
        self.settings = settings
        self.run_id = run_id
        self.trajectory = rlm._trajectory_path(run_id, trajectory)
        self._conversation: Conversation | None = None
        self._record: Trajectory | None = None
        self._tracker = _ProgressTracker(run_id, None)
        self._open_lock: asyncio.Lock | None = None  # made on the private loop
        self.closed = False

    @property
    def usage(self) -> RunUsage | None:
        """The session's totals, once it is closed."""
        return None if self._conversation is None else self._conversation.usage

    # ------------------------------------------------------------ opening and closing

    async def _open(self) -> Conversation:
        """The conversation, opened once (on the private loop)."""
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self.closed:
                raise RuntimeError("this session is closed")
            if self._conversation is not None:
                return self._conversation
            value = await asyncio.to_thread(_context_value, self._context, self._path)
            self._context = None  # loaded once: the session's worker holds it now
            connection = await self._shared.connection()
            loop = _Loop(
                connection.models,
                connection.sandbox,
                self.settings,
                on_event=self._tracker,
                sub_window_tokens=connection.context_windows.get(self.settings.sub_model),
                tools=self._rlm._tools,
            )
            record = Trajectory(self.trajectory)
            try:
                conversation = await loop.conversation(value, run_id=self.run_id, trajectory=record)
            except BaseException:
                record.close()
                self.closed = True
                raise
            self._record, self._conversation = record, conversation
            self._shared.sessions.add(self)
            return conversation

    def open(self) -> Self:
        """Load the context in a sandbox session now (``with`` does it); raises what stops it."""
        self._shared.submit(self._open()).result()
        return self

    async def aopen(self) -> Self:
        await asyncio.wrap_future(self._shared.submit(self._open()))
        return self

    async def finish(self) -> None:
        """Close the conversation and the trajectory (on the private loop). Idempotent."""
        self.closed = True
        conversation = self._conversation
        try:
            if conversation is not None:
                await conversation.close()
        finally:
            self._shared.sessions.discard(self)
            if self._record is not None:
                self._record.close()

    def close(self) -> None:
        """Close the sandbox session and the run at the handler. Idempotent; after the RLM's own
        close (which closes its sessions) it does nothing."""
        if self._shared.closed:
            self.closed = True
            return
        self._shared.submit(self.finish()).result()

    async def aclose(self) -> None:
        if self._shared.closed:
            self.closed = True
            return
        await asyncio.wrap_future(self._shared.submit(self.finish()))

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return await self.aopen()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------ questions

    def ask(self, query: str, *, on_progress: ProgressCallback | None = None, **limits: Any) -> Result:
        """Answer ``query`` with what the earlier questions left in the REPL and the history;
        blocks until done. ``limits``: loop settings for this question only (``max_iterations``,
        ``wall_time_s``, ...; not the session's budget). ``on_progress`` as for ``completion``."""
        settings = self._ask_settings(limits)
        steps: queue.SimpleQueue[Progress | None] = queue.SimpleQueue()
        sink = None if on_progress is None else steps.put
        future = self._shared.submit(self._ask(query, settings, sink))
        future.add_done_callback(lambda _: steps.put(None))
        try:
            if on_progress is not None:
                while (step := steps.get()) is not None:
                    on_progress(step)
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def aask(self, query: str, *, on_progress: ProgressCallback | None = None, **limits: Any) -> Result:
        """``ask`` for asyncio code: ``on_progress`` is called on the caller's event loop."""
        settings = self._ask_settings(limits)
        sink: Callable[[Progress], None] | None = None
        if on_progress is not None:
            loop = asyncio.get_running_loop()
            callback = on_progress

            def sink(step: Progress) -> None:
                loop.call_soon_threadsafe(callback, step)

        return await asyncio.wrap_future(self._shared.submit(self._ask(query, settings, sink)))

    def _ask_settings(self, limits: Mapping[str, Any]) -> RunSettings:
        if not isinstance(limits, Mapping) or not limits:
            return self.settings
        _check_options(limits, what="limit")
        fixed = sorted(set(limits) & SESSION_SETTINGS)
        if fixed:
            raise TypeError(
                f"{fixed[0]!r} is the session's, set when it opens (rlm.session(..., {fixed[0]}=...)), "
                "not per question"
            )
        return dataclasses.replace(self.settings, **limits).validated()

    async def _ask(
        self, query: str, settings: RunSettings, sink: Callable[[Progress], None] | None
    ) -> Result:
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, not {type(query).__name__}")
        task = asyncio.current_task()
        assert task is not None
        self._shared.runs.add(task)
        try:
            conversation = await self._open()
            self._tracker.sink = sink
            self._tracker.sub_calls = self._tracker.model_calls = 0
            result = await conversation.ask(query, settings)
            return Result.of(result, self.trajectory)
        finally:
            self._tracker.sink = None
            self._shared.runs.discard(task)
