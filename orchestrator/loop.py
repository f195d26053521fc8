"""The RLM loop: explore, decompose, aggregate, terminate.

Each iteration sends the history to the ``root`` model, runs the response's ```repl blocks in the
session in order, and feeds their output back. The run ends the ways real models end it (the
table is in docs/orchestrator.md, "Endings"): code calls FINAL/FINAL_VAR or sets
``answer["ready"]``; a response without code says FINAL(...)/FINAL_VAR(...); a response's
FINAL_VAR(name) after code that ran cleanly names a variable that exists. Or a limit stops it
(iterations, depth, wall time, the handler's run budget), always with the best answer available
(``Ending`` says where it came from) and the reason (``StopReason``).

``RLM`` holds what runs share (the model client, the sandbox, the settings) and may run many
queries at once; everything that belongs to one run (its counters, clock, trajectory, usage) lives
in a ``_Run`` made by each ``run()`` call, and everything of one depth (session, history,
iteration, fallback answer) in a ``_Level``.

Recursion: ``rlm_query`` in a session's code comes back here through the sandbox, and runs a
child loop at depth + 1 with its own session, under the same run id (so the same budget).

Host-side tools (``tools``, a ``ToolBox``) come back the same way and are answered here; every
session of a run, child runs' included, has them. ``Conversation`` asks many questions over one
context: one run at the handler, one sandbox session, one history (see its docstring).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from rlmq.protocol import (
    ChatMessage,
    CompleteReply,
    ErrorCode,
    ErrorInfo,
    RlmqError,
    RunUsage,
    Usage,
    tracing,
)
from rlmq.protocol.sandbox import ExecResult, Replay, SubCall

from .errors import ChildRunFailed, SettingsError
from .history import History
from .interfaces import ModelClient, RlmCallback, Sandbox, SandboxSession
from .parsing import FinalText, extract_code_blocks, find_final, prose_after_code, without_code
from .prompts import describe_context, last_call_prompt, no_code_nudge, system_prompt
from .settings import RunSettings
from .tools import ToolBox, describe_modules
from .trajectory import ROOT_LEVEL, SCHEMA, MessageDeltas, Trajectory

__all__ = [
    "CUT_OFF_NOTE",
    "LAST_CALL",
    "NO_CODE_NUDGE",
    "RLM",
    "Conversation",
    "Ending",
    "RunCounters",
    "RunReplay",
    "RunResult",
    "StopReason",
    "format_observation",
    "new_run_id",
]

log = logging.getLogger(__name__)

NO_CODE_NUDGE = no_code_nudge("final")  # the nudge under the default endings
LAST_CALL = (  # ... and the last call's request (last_call_prompt("final", n))
    "You have used all {n} iterations. Answer now with FINAL(your best answer) or "
    "FINAL_VAR(variable_name), and no code."
)
CUT_OFF_NOTE = (
    "Your FINAL( was cut off: the response reached its length limit before the closing "
    "parenthesis. Put the answer in a variable with code and end with FINAL_VAR(name), or give "
    "a shorter FINAL(answer)."
)
# A provider's stop reason for a response cut at its length limit (Anthropic, OpenAI).
_CUT_STOP_REASONS = frozenset({"max_tokens", "length"})


class Ending(StrEnum):
    """Where a depth's answer came from (the ``final`` event's ``ending``; docs/orchestrator.md)."""

    CODE_FINAL = "code_final"  # FINAL(value) in code
    CODE_FINAL_VAR = "code_final_var"  # FINAL_VAR(name) or FINAL_VAR(value) in code
    ANSWER_DICT = "answer_dict"  # code set answer["ready"] = True
    PROSE_FINAL = "prose_final"  # FINAL(...) as text, no code beside it
    PROSE_FINAL_VAR = "prose_final_var"  # FINAL_VAR(name) as text, no code beside it
    FINAL_VAR_AFTER_CODE = "final_var_after_code"  # FINAL_VAR(name) as text after code that ran cleanly
    LAST_CALL_FINAL = "last_call_final"  # the last call's FINAL as text beside code, or cut off
    LAST_CALL_TEXT = "last_call_text"  # the last call's plain text
    FALLBACK_FINAL_VAR = "fallback_final_var"  # the variable of a prose FINAL_VAR that was not taken
    FALLBACK_ANSWER_DICT = "fallback_answer_dict"  # answer["content"], never made ready
    FALLBACK_FINAL = "fallback_final"  # the last prose FINAL that was not taken
    NONE = "none"  # no answer at all


_FROM_EXEC = {"final": Ending.CODE_FINAL, "final_var": Ending.CODE_FINAL_VAR, "answer": Ending.ANSWER_DICT}


class StopReason(StrEnum):
    """Why a run (or one depth of it) stopped. The values are what JSON output and trajectories show."""

    FINAL = "final"
    MAX_ITERATIONS = "max_iterations"
    BUDGET_EXCEEDED = "budget_exceeded"
    WALL_TIME = "wall_time"
    ERROR = "error"

    @property
    def answered(self) -> bool:
        """The model gave the answer: by FINAL, or when asked for it at the iteration limit."""
        return self in (StopReason.FINAL, StopReason.MAX_ITERATIONS)


def new_run_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"


@dataclass(frozen=True, slots=True)
class RunResult:
    answer: str
    stop_reason: StopReason
    iterations: int
    run_id: str
    elapsed_s: float
    usage: RunUsage | None = None
    detail: str = ""  # which limit, or the error, for people
    depth: int = 0
    error: ErrorInfo | None = None  # the error that stopped the run, as it arrived
    ending: str = Ending.NONE  # where the answer came from (an ``Ending``)

    @property
    def ok(self) -> bool:
        return self.stop_reason.answered


@dataclass(slots=True)
class RunCounters:
    """Live counts of one run, for progress displays."""

    iterations: int = 0  # of the root loop (depth 0)
    model_calls: int = 0  # root-model calls answered, at every depth (the rest are sub-calls)
    asking: int = 0  # root-model calls in flight
    sub_calls: int = 0  # llm_query/rlm_query calls made by the run's code, as sessions count them


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How the loop at one depth ended."""

    answer: str
    reason: StopReason
    detail: str
    iterations: int
    error: ErrorInfo | None = None
    ending: Ending = Ending.NONE


@dataclass(slots=True, eq=False)
class _Place:
    """Where a loop instance is in its run: its level id (docs/trajectory.md), depth, and the
    iteration and block it is at (a child run started now nests under them)."""

    id: str
    depth: int
    iteration: int = 0
    block: int | None = None
    children: int = 0

    def child(self) -> _Place:
        self.children += 1
        return _Place(f"{self.id}.{self.children}", self.depth + 1)


@dataclass(slots=True, eq=False)
class _Level:
    """The loop at one depth: its session, history, iteration, and what a fallback reads."""

    place: _Place
    session: SandboxSession
    history: History
    best: str = ""  # the last prose FINAL not taken (beside code, or cut off)
    hint_var: str | None = None  # the last prose FINAL_VAR not taken: read if a limit stops this depth
    records: bool | None = None  # the session's exec takes on_sub_call (asked once)

    @property
    def depth(self) -> int:
        return self.place.depth

    @property
    def iteration(self) -> int:
        return self.place.iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self.place.iteration = value


@dataclass(frozen=True, slots=True)
class RunReplay:
    """A run played again from a recording (``rlmq replay``, ``rlmq run --resume``).

    ``sub_calls(level, iteration, block)``: the recorded sub-call answers of that block, passed
    to its exec as ``replay=`` (None: none recorded, the block runs as usual). ``resume``: the
    fields of the ``resume`` event written instead of ``run_start`` (a resumed run appends to
    its trajectory); None for a replay, which writes a trajectory of its own."""

    sub_calls: Callable[[str, int, int], Replay | None]
    resume: dict[str, Any] | None = None


def format_observation(index: int, count: int, code: str, result: ExecResult) -> str:
    """What the model is shown of one block's run."""
    label = f"[block {index + 1} of {count}]" if count > 1 else "[output]"
    parts = [label]
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.stderr:
        parts.append("[stderr]\n" + result.stderr.rstrip("\n"))
    if result.error is not None:
        err = result.error
        parts.append(f"[error: {err.code}] " + (err.traceback.rstrip("\n") or f"{err.type}: {err.message}"))
    if result.state_lost:
        parts.append("[the REPL was restarted: your variables are gone; `context` is loaded again]")
    if result.final is not None:
        parts.append("[FINAL was set]")
    if len(parts) == 1:
        parts.append("(no output)")
    return "\n".join(parts)


EventSink = Callable[[str, dict[str, Any]], None]


class RLM:
    """Runs queries against one model client and one sandbox. Reusable; runs may overlap.

    ``models`` is any ``ModelClient`` (``AsyncHandlerClient``, or ``testing.ScriptedModelClient``),
    ``sandbox`` any ``Sandbox`` (``AsyncSandboxClient``, or ``testing.InMemorySandbox``).
    ``on_event`` sees every trajectory event of every run; ``clock`` measures wall time.
    ``sub_window_tokens``: the sub-model's context window, when known (the handler's ``ping``
    tells it), so the system prompt can say how much one ``llm_query`` reads. ``tools``: host-side
    tools for the model's code (the sandbox must take them, as ``budget.GuardedSandbox`` and
    ``testing.InMemorySandbox`` do).
    """

    def __init__(
        self,
        models: ModelClient,
        sandbox: Sandbox,
        settings: RunSettings,
        *,
        on_event: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        sub_window_tokens: int | None = None,
        tools: ToolBox | None = None,
    ) -> None:
        self.models = models
        self.sandbox = sandbox
        self.settings = settings
        self.on_event = on_event
        self.clock = clock
        self.sub_window_tokens = sub_window_tokens
        self.tools = tools if tools else None
        self._active: dict[str, _Run] = {}
        self._modules_text: dict[tuple[str, ...], str] = {}

    def modules_text(self, modules: tuple[str, ...]) -> str:
        """What the system prompt says of ``sandbox_modules`` (described once per RLM)."""
        if modules not in self._modules_text:
            self._modules_text[modules] = describe_modules(modules)
        return self._modules_text[modules]

    async def conversation(
        self, context: Any, *, run_id: str | None = None, trajectory: Trajectory | None = None
    ) -> Conversation:
        """Open a ``Conversation`` over ``context`` (its session and its run at the handler).
        Raises what kept it from opening (a module of ``sandbox_modules`` that cannot be
        imported, a pool that refused the session, ...); close it with ``close()``."""
        conversation = Conversation(self, run_id or new_run_id(), trajectory or Trajectory(None))
        await conversation.open(context)
        return conversation

    async def run(
        self,
        query: str,
        context: Any,
        *,
        run_id: str | None = None,
        trajectory: Trajectory | None = None,
        replay: RunReplay | None = None,
        context_path: str | None = None,
    ) -> RunResult:
        """One whole run: registered with the model client, traced, and closed whatever happens.

        ``trajectory`` receives this run's events (default: one kept in memory only).
        ``replay``: the run plays a recording again (see ``RunReplay``). ``context_path``: where
        the context was read from, recorded so that ``rlmq replay`` can read it again."""
        run = _Run(self, run_id or new_run_id(), trajectory or Trajectory(None), replay)
        run.context_path = context_path
        if run.id in self._active:
            raise ValueError(f"run {run.id!r} is already running on this RLM")
        self._active[run.id] = run
        try:
            return await run.execute(query, context)
        finally:
            del self._active[run.id]

    def counters(self, run_id: str) -> RunCounters | None:
        """The live counters of a run in progress (None once it ended, or if unknown)."""
        run = self._active.get(run_id)
        return None if run is None else run.counters


class _Run:
    """One run: its id, clock, counters, trajectory and usage. Made by each ``RLM.run`` call."""

    def __init__(
        self, rlm: RLM, run_id: str, trajectory: Trajectory, replay: RunReplay | None = None
    ) -> None:
        self.id = run_id
        self.replay = replay
        self.deltas = MessageDeltas()
        self.root = _Place(ROOT_LEVEL, 0)
        self.context_path: str | None = None
        self.models = rlm.models
        self.sandbox = rlm.sandbox
        self.settings = rlm.settings
        self.clock = rlm.clock
        self.on_event = rlm.on_event
        self.sub_window_tokens = rlm.sub_window_tokens
        self.rlm = rlm
        self.tools = rlm.tools
        self.trajectory = trajectory
        self.counters = RunCounters()
        self.started = self.clock()
        wall = self.settings.wall_time_s
        self.deadline = None if wall is None else self.started + wall
        self.usage: RunUsage | None = None

    def event(self, name: str, place: _Place | None = None, /, **fields: Any) -> None:
        """Write an event of ``place``'s level (None: a run-wide event, level "0")."""
        where = place or self.root
        fields = {"level": where.id, "depth": where.depth, **fields}
        self.trajectory.write(name, **fields)
        if self.on_event is not None:
            self.on_event(name, fields)

    def start_event(self, **fields: Any) -> None:
        """``run_start`` (schema 2), or ``resume`` when this run continues a recorded one."""
        if self.replay is not None and self.replay.resume is not None:
            self.event("resume", **self.replay.resume)
        else:
            self.event("run_start", schema=SCHEMA, **fields)

    def past_deadline(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    async def execute(self, query: str, context: Any) -> RunResult:
        s = self.settings
        self.start_event(
            run=self.id,
            query=query,
            context=describe_context(context),
            **({"context_path": self.context_path} if self.context_path else {}),
            settings={k: getattr(s, k) for k in s.__dataclass_fields__},
            sub_window_tokens=self.sub_window_tokens,
        )
        outcome = _Outcome("", StopReason.ERROR, "", 0)
        try:
            with tracing.span("rlmq.run", attributes={"rlmq.run": self.id}):
                await self.models.run_open(self.id, s.limits())
                outcome = await self.depth(query, context, self.root)
                tracing.set_attributes({"rlmq.stop_reason": str(outcome.reason)})
        except RlmqError as exc:  # the run could not start
            outcome = self.stopped_by(exc, ("", Ending.NONE), self.counters.iterations)
        except BaseException as exc:  # cancelled, interrupted, or a bug: still leave a whole trajectory
            outcome = _Outcome("", StopReason.ERROR, f"{type(exc).__name__}: {exc}", self.counters.iterations)
            raise
        finally:
            try:
                self.usage = await self.models.run_close(self.id)
            except RlmqError as exc:
                log.warning("could not close run %s: %s", self.id, ErrorInfo.of(exc))
            elapsed = round(self.clock() - self.started, 3)
            self.event(
                "run_end",
                run=self.id,
                stop_reason=outcome.reason,
                detail=outcome.detail,
                answer=outcome.answer,
                iterations=outcome.iterations,
                elapsed_s=elapsed,
                usage=self.usage.to_wire() if self.usage else None,
                error=None if outcome.error is None else outcome.error.to_wire(),
            )
        return RunResult(
            outcome.answer,
            outcome.reason,
            outcome.iterations,
            self.id,
            elapsed,
            self.usage,
            outcome.detail,
            error=outcome.error,
            ending=outcome.ending,
        )

    def stopped_by(self, exc: RlmqError, best: tuple[str, Ending], iterations: int) -> _Outcome:
        """The outcome of an error from the model client or the sandbox, its ErrorInfo kept whole."""
        info = ErrorInfo.of(exc)
        answer, ending = best
        if info.code == ErrorCode.BUDGET_EXCEEDED:
            return _Outcome(answer, StopReason.BUDGET_EXCEEDED, info.message, iterations, info, ending)
        if info.code == ErrorCode.TIMEOUT and self.past_deadline():
            return _Outcome(answer, StopReason.WALL_TIME, info.message, iterations, info, ending)
        return _Outcome(answer, StopReason.ERROR, f"{info.code}: {info.message}", iterations, info, ending)

    # ------------------------------------------------------------------ one depth

    async def depth(self, query: str, context: Any, place: _Place, parent: _Place | None = None) -> _Outcome:
        """Run the loop of one level (the root, or a child run of ``parent``), in its own session."""
        if parent is not None:
            self.event(
                "child_start",
                place,
                parent=parent.id,
                iteration=parent.iteration,
                block=parent.block,
                query=query,
                context=describe_context(context),
            )
        try:
            session = await self.open_session(context, place)
        except RlmqError as exc:
            return self.finish(place, self.stopped_by(exc, ("", Ending.NONE), 0), parent)
        level = _Level(place, session, History(self.prompt(context, place.depth), f"Question: {query}"))
        try:
            return self.finish(place, await self.iterate(level), parent)
        except RlmqError as exc:
            outcome = self.stopped_by(exc, await self.fallback(level), level.iteration)
            return self.finish(place, outcome, parent)
        finally:
            try:
                await session.close()
            except RlmqError as exc:  # the outcome stands; the pool reaps what it cannot close
                log.warning("could not close a session of run %s: %s", self.id, ErrorInfo.of(exc))

    def prompt(self, context: Any, depth: int, *, conversation: bool = False) -> str:
        s = self.settings
        return system_prompt(
            context,
            depth=depth,
            max_depth=s.max_depth,
            max_output_chars=s.max_output_chars,
            sub_model=s.sub_model,
            endings=s.endings,
            sub_window_tokens=self.sub_window_tokens,
            tools="" if self.tools is None else self.tools.describe(),
            modules=self.rlm.modules_text(s.sandbox_modules) if s.sandbox_modules else "",
            conversation=conversation,
        )

    async def open_session(self, context: Any, place: _Place) -> SandboxSession:
        s = self.settings
        depth = place.depth
        extra: dict[str, Any] = {}
        if self.tools is not None:
            extra["tools"] = self.tools.names
            extra["on_tool_call"] = self.tools.callback(s.tool_timeout_s)
        if s.sandbox_modules:
            extra["sandbox_modules"] = s.sandbox_modules
        if extra and not _takes(self.sandbox.open, "tools"):
            raise SettingsError(
                f"host-side tools and sandbox_modules need a sandbox that takes them; "
                f"{type(self.sandbox).__name__} does not (use budget.GuardedSandbox)"
            )
        return await self.sandbox.open(
            run=self.id,
            context=context,
            depth=depth,
            max_depth=s.max_depth,
            sub_model=s.sub_model,
            exec_timeout_s=s.exec_timeout_s,
            max_output_chars=s.max_output_chars,
            on_rlm_query=self.child_runner(place),
            **extra,
        )

    def child_runner(self, place: _Place) -> RlmCallback | None:
        """What answers ``rlm_query`` at this level: a child loop at depth + 1, if allowed."""
        if place.depth + 1 >= self.settings.max_depth:
            return None

        async def child(prompt: str, child_context: Any) -> str:
            given = prompt if child_context is None else child_context
            outcome = await self.depth(prompt, given, place.child(), place)
            if not outcome.reason.answered:
                raise ChildRunFailed(outcome.reason, outcome.detail, cause=outcome.error)
            return outcome.answer

        return child

    def finish(self, place: _Place, outcome: _Outcome, parent: _Place | None = None) -> _Outcome:
        self.event(
            "final",
            place,
            answer=outcome.answer,
            stop_reason=outcome.reason,
            detail=outcome.detail,
            iterations=outcome.iterations,
            error=None if outcome.error is None else outcome.error.to_wire(),
            ending=outcome.ending,
        )
        if parent is not None:
            self.event(
                "child_end",
                place,
                parent=parent.id,
                answer=outcome.answer,
                stop_reason=outcome.reason,
                iterations=outcome.iterations,
            )
        return outcome

    async def iterate(self, level: _Level) -> _Outcome:
        s = self.settings
        for iteration in range(1, s.max_iterations + 1):
            level.iteration = iteration
            if level.depth == 0:
                self.counters.iterations = iteration
            if self.past_deadline():
                detail = f"wall time of {s.wall_time_s:g} s reached"
                answer, ending = await self.fallback(level)
                return _Outcome(answer, StopReason.WALL_TIME, detail, iteration, ending=ending)
            with tracing.span(
                "rlmq.iteration", attributes={"rlmq.level": level.place.id, "rlmq.iteration": iteration}
            ):
                await self.compact(level)
                reply = await self.ask(level.history.messages(), level.place, iteration, "iteration")
                level.history.add_response(reply.text)
                cut = reply.stop_reason in _CUT_STOP_REASONS
                taken, observation = await self.act(level, reply.text, cut=cut)
                if taken is not None:
                    return _Outcome(taken[0], StopReason.FINAL, "", iteration, ending=taken[1])
                level.history.add_observation(observation)
        return await self.last_call(level)

    async def last_call(self, level: _Level) -> _Outcome:
        """Out of iterations: one last request for an answer, read through the same endings,
        then the fallbacks, with the plain text as the last resort."""
        s = self.settings
        asked = level.iteration + 1
        messages = level.history.messages(extra_user=last_call_prompt(s.endings, s.max_iterations))
        reply = await self.ask(messages, level.place, asked, "last_call")
        answer, ending = await self.take_last(level, reply.text)
        detail = f"stopped after {s.max_iterations} iterations"
        return _Outcome(answer, StopReason.MAX_ITERATIONS, detail, level.iteration, ending=ending)

    async def take_last(self, level: _Level, response: str) -> tuple[str, Ending]:
        """The answer in the last call's response, in this order: an ending of its code, or of its
        text; a FINAL beside its code (there is no later turn to wait for); the fallbacks read
        from the session; its plain text; the last FINAL not taken."""
        blocks = extract_code_blocks(response)
        prose = find_final(response)
        if blocks:
            taken, _ = await self.act(level, response, cut=False)
            if taken is not None:
                return taken
            if prose is not None and prose.answer:
                return prose.answer, Ending.LAST_CALL_FINAL
        elif prose is not None and prose.var is not None:
            value = await self.final_var(level, prose.var, level.iteration + 1)
            if value is not None:
                return value, Ending.PROSE_FINAL_VAR
        elif prose is not None and prose.answer:
            return prose.answer, Ending.PROSE_FINAL if prose.complete else Ending.LAST_CALL_FINAL
        found = await self.read_fallbacks(level)
        if found is not None:
            return found
        text = without_code(response).strip()
        if text and prose is None:
            return text, Ending.LAST_CALL_TEXT
        return (level.best, Ending.FALLBACK_FINAL) if level.best else ("", Ending.NONE)

    async def fallback(self, level: _Level) -> tuple[str, Ending]:
        """The best answer when a limit or an error stops this depth: the variable of the last
        prose FINAL_VAR not taken, then ``answer["content"]``, then the last prose FINAL not taken."""
        found = await self.read_fallbacks(level)
        if found is not None:
            return found
        return (level.best, Ending.FALLBACK_FINAL) if level.best else ("", Ending.NONE)

    async def read_fallbacks(self, level: _Level) -> tuple[str, Ending] | None:
        """What the session holds of an answer: values from executed code, not from what the
        model imagined. A session that cannot answer (lost, closed) holds nothing."""
        try:
            if level.hint_var is not None:
                value = await self.final_var(level, level.hint_var, level.iteration)
                if value:
                    return value, Ending.FALLBACK_FINAL_VAR
            result = await level.session.exec('FINAL(answer["content"])')
        except RlmqError as exc:
            log.info("run %s: no fallback from the session: %s", self.id, ErrorInfo.of(exc))
            return None
        if result.error is None and result.final and result.final.strip():
            return result.final, Ending.FALLBACK_ANSWER_DICT
        return None

    async def compact(self, level: _Level) -> None:
        s = self.settings

        async def summarise(messages: list[ChatMessage]) -> str:
            return (await self.ask(messages, level.place, level.iteration, "compaction")).text

        compaction = await level.history.compact_if_needed(
            max_chars=s.history_max_chars,
            keep_last_turns=s.keep_last_turns,
            mode=s.compaction,
            summarise=summarise,
        )
        if compaction is not None:
            self.event(
                "compaction",
                level.place,
                iteration=level.iteration,
                mode=s.compaction,
                dropped_turns=compaction.dropped_turns,
                chars_before=compaction.chars_before,
                chars_after=compaction.chars_after,
                summary=compaction.summary,
            )

    async def ask(
        self, messages: list[ChatMessage], place: _Place, iteration: int, purpose: str
    ) -> CompleteReply:
        s = self.settings
        self.counters.asking += 1
        try:
            reply = await self.models.complete(
                messages,
                model=s.root_model,
                max_tokens=s.max_tokens,
                temperature=s.temperature,
                timeout_s=s.model_timeout_s,
                run=self.id,
                depth=place.depth,
            )
        finally:
            self.counters.asking -= 1
        self.counters.model_calls += 1
        added, reset = self.deltas.delta(place.id, messages)
        self.deltas.answered(place.id, reply.text)
        self.event(
            "model_call",
            place,
            iteration=iteration,
            purpose=purpose,
            model=s.root_model,
            added=added,
            **({"reset": True} if reset else {}),
            response=reply.text,
            stop_reason=reply.stop_reason,
            usage=reply.usage.to_wire(),
            cost_usd=float(getattr(reply, "cost_usd", 0.0) or 0.0),
            latency_ms=reply.latency_ms,
            cached=reply.cached,
        )
        return reply

    async def act(self, level: _Level, response: str, *, cut: bool) -> tuple[tuple[str, Ending] | None, str]:
        """Run the response's code, or take its prose ending: (the answer and how it came, or
        None; what the model is shown). ``cut``: the response stopped at its length limit."""
        blocks = extract_code_blocks(response)
        prose = find_final(response)
        if not blocks:
            return await self.act_on_prose(level, prose, cut=cut)
        observations = []
        clean = True  # every block ran without an error and kept its state
        for index, code in enumerate(blocks):
            result = await self.exec_block(level, index, code)
            observations.append(format_observation(index, len(blocks), code, result))
            if result.final is not None:
                ending = _FROM_EXEC.get(result.ending or "", Ending.CODE_FINAL)
                return (result.final, ending), "\n\n".join(observations)
            clean = clean and result.error is None and not result.state_lost
        if prose is not None:
            note = await self.beside_code(level, prose, response, clean)
            if isinstance(note, tuple):
                return note, "\n\n".join(observations)
            if note:
                observations.append(note)
        return None, "\n\n".join(observations)

    async def exec_block(self, level: _Level, index: int, code: str) -> ExecResult:
        """Run one block of the model's code, recording it and each sub-call it makes."""
        place, iteration = level.place, level.iteration
        place.block = index
        self.event("exec_start", place, iteration=iteration, block=index, code=code)
        kwargs: dict[str, Any] = {}
        record_chars = self.settings.record_chars
        if level.records is None:
            level.records = _takes(level.session.exec, "on_sub_call")
        if record_chars is not None and level.records:

            def on_sub_call(record: SubCall) -> None:
                self.event("sub_call", place, iteration=iteration, block=index, **record.to_wire())

            kwargs["on_sub_call"] = on_sub_call
            kwargs["record_chars"] = record_chars
        if self.replay is not None:
            replay = self.replay.sub_calls(place.id, iteration, index)
            if replay is not None:
                if not level.records:
                    raise SettingsError(
                        f"replaying sub-calls needs a sandbox session whose exec takes replay=; "
                        f"{type(level.session).__name__} does not"
                    )
                kwargs["replay"] = replay
        attributes = {"rlmq.level": place.id, "rlmq.iteration": iteration, "rlmq.block": index}
        try:
            with tracing.span("rlmq.exec", attributes=attributes):
                result = await level.session.exec(code, **kwargs)
                tracing.set_attributes({"rlmq.llm_calls": result.llm_calls})
        finally:
            place.block = None
        self.counters.sub_calls += result.llm_calls
        # Records the session's client could not hand over (docs/trajectory.md, exec_end): a
        # replay must know this block's recording is incomplete rather than report a divergence.
        dropped = getattr(level.session, "records_dropped", 0)
        self.event(
            "exec_end",
            place,
            iteration=iteration,
            block=index,
            stdout=result.stdout,
            stderr=result.stderr,
            error=None if result.error is None else result.error.to_wire(),
            final=result.final,
            final_var=result.final_var,
            ending=result.ending,
            elapsed_ms=result.elapsed_ms,
            llm_calls=result.llm_calls,
            truncated_chars=result.truncated_chars,
            state_lost=result.state_lost,
            records_dropped=dropped if isinstance(dropped, int) and not isinstance(dropped, bool) else 0,
        )
        return result

    async def act_on_prose(
        self, level: _Level, prose: FinalText | None, *, cut: bool
    ) -> tuple[tuple[str, Ending] | None, str]:
        """A response without code: its FINAL or FINAL_VAR ends the run, if it can."""
        if prose is None:
            return None, no_code_nudge(self.settings.endings)
        if prose.var is not None:
            value = await self.final_var(level, prose.var, level.iteration)
            if value is None:
                return None, (
                    f"FINAL_VAR({prose.var}) names no variable of the REPL. Define it with code first "
                    "(SHOW_VARS() lists what exists), or answer with FINAL(answer)."
                )
            return (value, Ending.PROSE_FINAL_VAR), ""
        if not prose.complete and cut:
            # A FINAL cut off at the length limit is part of an answer: ask for it whole, keep
            # the part in case a limit stops the run first.
            level.best = prose.answer or level.best
            self.event("final_cut", level.place, iteration=level.iteration, final=prose.answer)
            return None, CUT_OFF_NOTE
        return (prose.answer or "", Ending.PROSE_FINAL), ""

    async def beside_code(
        self, level: _Level, prose: FinalText, response: str, clean: bool
    ) -> tuple[str, Ending] | str:
        """A prose FINAL next to code blocks. FINAL_VAR(name) after the code is taken when every
        block ran without error and ``name`` exists: the value comes from code that ran. A FINAL
        literal is ignored (written before its code's output was seen), and kept as a fallback,
        as is the FINAL_VAR not taken. Returns the answer, or a note for the model ("" for none)."""
        note = ""
        if prose.var is not None:
            after = find_final(prose_after_code(response))
            if clean and after is not None and after.var == prose.var:
                value = await self.final_var(level, prose.var, level.iteration)
                if value is not None:
                    return value, Ending.FINAL_VAR_AFTER_CODE
                note = f"[FINAL_VAR({prose.var}) was not taken: no variable named {prose.var!r} exists]"
            elif not clean:
                note = f"[FINAL_VAR({prose.var}) was not taken: a block failed; fix it, then answer]"
            level.hint_var = prose.var
        else:
            level.best = prose.answer or level.best
        self.event("final_ignored", level.place, iteration=level.iteration, final=prose.answer or prose.var)
        return note

    async def final_var(self, level: _Level, name: str, iteration: int) -> str | None:
        """The value of a session variable, read the way the model's own code would."""
        result = await level.session.exec(f"FINAL_VAR({name!r})")
        # Only FINAL_VAR's own answer counts (an answer dict made ready would also set ``final``).
        value = result.final if result.ending in (None, "final_var") else None
        self.event("final_var", level.place, iteration=iteration, name=name, found=value is not None)
        return value


def _takes(method: Callable[..., Any], name: str) -> bool:
    """Whether ``method`` has a parameter ``name`` (or takes any keyword)."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _spent_between(before: RunUsage | None, after: RunUsage | None) -> RunUsage | None:
    """What the run spent from ``before`` to ``after`` (two reports of the same run)."""
    if after is None or before is None:
        return after
    a, b = after.usage, before.usage
    return dataclasses.replace(
        after,
        calls=after.calls - before.calls,
        cached_calls=after.cached_calls - before.cached_calls,
        failed_calls=after.failed_calls - before.failed_calls,
        usage=Usage(
            a.input_tokens - b.input_tokens,
            a.output_tokens - b.output_tokens,
            a.cache_read_tokens - b.cache_read_tokens,
            a.cache_write_tokens - b.cache_write_tokens,
        ),
        cost_usd=round(after.cost_usd - before.cost_usd, 9),
    )


class Conversation:
    """Many questions over one context (``RLM.conversation``), asked one at a time.

    - One run at the handler for the whole conversation, under one run id: its budget
      (``max_calls``, tokens, ``max_cost_usd``) is the conversation's, spent by every question in
      turn. ``max_iterations`` and ``wall_time_s`` (checked here, not by the handler) count per
      question, from the settings given to each ``ask``.
    - One sandbox session at depth 0, opened with the context: the REPL keeps its variables from
      one question to the next (the answer dict is reset before each question after the first).
      Child runs (``rlm_query``) open sessions of their own, as in any run.
    - One history: each later question follows the previous answer (``History.follow_up``) and
      everything is compacted like any history.
    - One trajectory: ``run_start``, then for each question an ``ask`` event and the events of its
      iterations, then ``run_end`` at ``close``.
    """

    def __init__(self, rlm: RLM, run_id: str, trajectory: Trajectory) -> None:
        self._rlm = rlm
        self._run = _Run(rlm, run_id, trajectory)
        self._session: SandboxSession | None = None
        self._history: History | None = None
        self._prompt = ""
        self._last_answer: str | None = None
        self._lock = asyncio.Lock()
        self._opened = False
        self._opened_at = rlm.clock()
        self.asks = 0
        self.closed = False
        self.usage: RunUsage | None = None  # the conversation's totals, once closed

    @property
    def run_id(self) -> str:
        return self._run.id

    async def open(self, context: Any) -> None:
        run, s = self._run, self._run.settings
        if run.id in self._rlm._active:
            raise ValueError(f"run {run.id!r} is already running on this RLM")
        self._rlm._active[run.id] = run
        run.event(
            "run_start",
            schema=SCHEMA,
            run=run.id,
            query=None,
            conversation=True,
            context=describe_context(context),
            settings={k: getattr(s, k) for k in s.__dataclass_fields__},
        )
        self._opened = True
        try:
            # The handler's deadline would span the conversation: wall time counts per question here.
            await run.models.run_open(run.id, dataclasses.replace(s.limits(), deadline_s=None))
            self._session = await run.open_session(context, run.root)
        except BaseException:
            await self.close()
            raise
        self._prompt = run.prompt(context, 0, conversation=True)

    async def ask(self, query: str, settings: RunSettings | None = None) -> RunResult:
        """Answer one question, with the REPL and the history of the earlier ones. ``settings``:
        this question's (its iterations, wall time, ...; the budget stays the conversation's)."""
        async with self._lock:
            if self.closed or self._session is None:
                raise ValueError("this conversation is closed")
            run = self._run
            run.settings = settings or self._rlm.settings
            run.started = run.clock()
            wall = run.settings.wall_time_s
            run.deadline = None if wall is None else run.started + wall
            run.counters = RunCounters()
            self.asks += 1
            run.event("ask", ask=self.asks, query=query)
            before = await self._usage()
            if self._history is None:
                self._history = History(self._prompt, f"Question: {query}")
            else:
                self._history.follow_up(query, self._last_answer)
            level = _Level(run.root, self._session, self._history)
            try:
                if self.asks > 1:
                    await self._session.exec('answer = {"content": "", "ready": False}')
                with tracing.span("rlmq.run", attributes={"rlmq.run": run.id, "rlmq.ask": self.asks}):
                    outcome = run.finish(run.root, await run.iterate(level))
            except RlmqError as exc:
                outcome = run.finish(
                    run.root, run.stopped_by(exc, await run.fallback(level), level.iteration)
                )
            self._last_answer = outcome.answer if outcome.reason.answered else None
            spent = _spent_between(before, await self._usage())
            return RunResult(
                outcome.answer,
                outcome.reason,
                outcome.iterations,
                run.id,
                round(run.clock() - run.started, 3),
                spent,
                outcome.detail,
                error=outcome.error,
                ending=outcome.ending,
            )

    async def _usage(self) -> RunUsage | None:
        try:
            return await self._run.models.usage(self._run.id)
        except RlmqError as exc:
            log.info("run %s: no usage report: %s", self._run.id, ErrorInfo.of(exc))
            return None

    async def close(self) -> None:
        """Close the session and the run at the handler; write ``run_end``. Idempotent."""
        if self.closed:
            return
        self.closed = True
        run = self._run
        try:
            if self._session is not None:
                await self._session.close()
        except RlmqError as exc:  # the pool reaps what it cannot close
            log.warning("could not close the session of run %s: %s", run.id, ErrorInfo.of(exc))
        finally:
            try:
                self.usage = await run.models.run_close(run.id)
            except RlmqError as exc:
                log.warning("could not close run %s: %s", run.id, ErrorInfo.of(exc))
            finally:
                self._rlm._active.pop(run.id, None)
                if self._opened:
                    run.event(
                        "run_end",
                        run=run.id,
                        asks=self.asks,
                        elapsed_s=round(run.clock() - self._opened_at, 3),
                        usage=self.usage.to_wire() if self.usage else None,
                    )
