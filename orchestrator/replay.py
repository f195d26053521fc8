"""Playing a recorded run again: ``rlmq replay`` (offline, checked) and ``rlmq run --resume``.

A ``Recording`` is a trajectory file read back (docs/trajectory.md). Playing it:

- root responses come from its ``model_call`` events, in order, through ``RecordedModels`` (a
  ``ModelClient``) that checks each request against the rebuilt recorded messages;
- sub-call answers come from its ``sub_call`` events, handed to each block's exec as
  ``replay=Replay(calls, live)`` (``Recording.sub_call_replay``): the pool answers them without
  sending anything (``live=False``: a call it has no answer for fails with ``not_recorded``);
- the code runs again in a real session, so the REPL state is rebuilt for real.

``Comparer`` follows the new events and keeps the first place the run differs from the
recording (``Divergence``). A resumed run (``live=True``) goes on live past the recording.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlmq.protocol import ChatMessage, CompleteReply, DecodeError, ErrorCode, RunLimits, RunUsage, Usage
from rlmq.protocol.sandbox import Replay, SubCall

from .errors import RunError
from .interfaces import ModelClient, Sandbox
from .loop import RLM, RunReplay, RunResult
from .prompts import describe_context
from .settings import RunSettings
from .trajectory import ROOT_LEVEL, Trajectory, TrajectoryError, event_key, read_events, rebuild_history

__all__ = [
    "Comparer",
    "Divergence",
    "RecordedCall",
    "RecordedModels",
    "Recording",
    "ReplayDiverged",
    "ReplayReport",
    "check_context",
    "replay_on",
    "resume_on",
]

log = logging.getLogger(__name__)

# Events compared in order by ``Comparer``. Sub-calls are checked apart, by their seq: whether
# the pool found a recorded answer for each.
_ORDERED = frozenset({"model_call", "exec_start", "exec_end", "child_start", "final"})
# Events a resumed run writes anew whatever was recorded.
_NOT_SKIPPED = frozenset({"run_start", "run_end", "resume"})
# How a recorded run that has a run_end may be continued by ``rlmq run --resume``: only one that
# stopped on an error (a handler or pool that went away). Every other stop is the run's end under
# its budget: resuming it under the same budget could only stop again (docs/orchestrator.md).
RESUMABLE_STOPS = frozenset({"error"})

Key = tuple[str, int, int]  # (level, iteration, block): one executed code block


class ReplayDiverged(RunError):
    """The replayed run asked for something the recording does not have."""

    code = ErrorCode.NOT_RECORDED


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first place a replay differs from its recording, or cannot be checked against it.

    ``kind``: ``differs`` (the run did something else), ``recording_ends`` (the recording was
    cut, by a crash, before the run got this far), ``incomplete`` (the recording of this block
    lost sub-call records: its exec_end has ``records_dropped``)."""

    level: str
    iteration: int | None
    block: int | None
    what: str
    kind: str = "differs"

    def __str__(self) -> str:
        where = [f"level {self.level}"]
        if self.iteration is not None:
            where.append(f"iteration {self.iteration}")
        if self.block is not None:
            where.append(f"block {self.block}")
        return f"{', '.join(where)}: {self.what}"

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """One recorded root-model call, its request rebuilt whole."""

    level: str
    depth: int
    iteration: int
    purpose: str
    messages: tuple[tuple[str, str], ...]
    response: str
    stop_reason: str | None
    usage: Usage
    cached: bool
    latency_ms: float


def _usage(d: Any) -> Usage:
    if not isinstance(d, Mapping):
        return Usage(0, 0)
    return Usage(int(d.get("input_tokens", 0)), int(d.get("output_tokens", 0)))


class Recording:
    """A trajectory read back for playing again. ``Recording.load(path)``."""

    def __init__(self, events: Sequence[Mapping[str, Any]], *, source: str = "<memory>") -> None:
        if not events or events[0].get("event") != "run_start":
            raise TrajectoryError(f"{source}: not a trajectory (its first event is not run_start)")
        start = events[0]
        if start.get("schema") != 2:
            raise TrajectoryError(
                f"{source}: schema {start.get('schema', 1)} trajectory; replay and resume need schema 2"
            )
        self.source = source
        self.events = list(events)
        self.start = start
        self.run_id = str(start.get("run", ""))
        self.query = start.get("query")
        self.settings: dict[str, Any] = dict(start.get("settings") or {})
        self.calls = self._model_calls()
        self.sub_calls: dict[Key, list[SubCall]] = {}
        for e in self.events:
            if e.get("event") != "sub_call" or e.get("replayed") or not _answered(e):
                continue  # a replay's own answers are recorded elsewhere; a not_recorded one has none
            try:
                call = SubCall.from_wire(e)
            except DecodeError as exc:
                raise TrajectoryError(f"{source}: a sub_call event cannot be read: {exc.message}") from None
            key = (str(e.get("level")), int(e.get("iteration", 0)), int(e.get("block", 0)))
            self.sub_calls.setdefault(key, []).append(call)
        ends = [e for e in self.events if e.get("event") == "run_end"]
        self.ended = bool(ends)
        self.run_end: Mapping[str, Any] | None = ends[-1] if ends else None
        finals = [e for e in self.events if e.get("event") == "final" and e.get("level") == ROOT_LEVEL]
        self.final: Mapping[str, Any] | None = finals[-1] if finals else None
        # Blocks whose recording is not whole: begun but never ended (the run was cut inside),
        # and those whose exec_end says sub-call records were lost on the way.
        started: set[Key] = set()
        self.records_dropped: dict[Key, int] = {}
        for e in self.events:
            name = e.get("event")
            if name not in ("exec_start", "exec_end"):
                continue
            key = _block_key(e)
            if name == "exec_start":
                started.add(key)
                continue
            started.discard(key)
            dropped = e.get("records_dropped")
            if isinstance(dropped, int) and dropped > 0:
                self.records_dropped[key] = self.records_dropped.get(key, 0) + dropped
        self.unfinished: frozenset[Key] = frozenset(started)
        self.blocks: frozenset[Key] = frozenset(
            _block_key(e) for e in self.events if e.get("event") == "exec_start"
        )

    @property
    def finished(self) -> Mapping[str, Any] | None:
        """The last ``run_end`` when the recorded run ended for good (not by an error), else None:
        what ``rlmq run --resume`` refuses to continue."""
        end = self.run_end
        if end is None or end.get("stop_reason") in RESUMABLE_STOPS:
            return None
        return end

    @property
    def last_event(self) -> Mapping[str, Any]:
        return self.events[-1]

    @classmethod
    def load(cls, path: str | Path) -> Recording:
        return cls(read_events(path), source=str(path))

    def _model_calls(self) -> list[RecordedCall]:
        rebuilt: dict[str, list[list[dict[str, str]]]] = {}
        used: Counter[str] = Counter()
        out = []
        for e in self.events:
            if e.get("event") != "model_call":
                continue
            level = str(e.get("level", ROOT_LEVEL))
            if level not in rebuilt:
                rebuilt[level] = rebuild_history(self.events, level)
            messages = rebuilt[level][used[level]]
            used[level] += 1
            out.append(
                RecordedCall(
                    level=level,
                    depth=int(e.get("depth", 0)),
                    iteration=int(e.get("iteration", 0)),
                    purpose=str(e.get("purpose", "")),
                    messages=tuple((m["role"], m["content"]) for m in messages),
                    response=str(e.get("response", "")),
                    stop_reason=e.get("stop_reason"),
                    usage=_usage(e.get("usage")),
                    cached=bool(e.get("cached", False)),
                    latency_ms=float(e.get("latency_ms", 0.0)),
                )
            )
        return out

    def run_settings(self, **overrides: Any) -> RunSettings:
        """The recorded run's settings (fields this version does not know are left out)."""
        known = {f.name for f in dataclasses.fields(RunSettings)}
        values = {k: v for k, v in self.settings.items() if k in known}
        values.update(overrides)
        return RunSettings(**values).validated()

    def sub_call_replay(self, *, live: bool) -> Callable[[str, int, int], Replay | None]:
        """The ``replay=`` of each block: its recorded sub-calls (None when it has none and the
        run may go live; an empty list when it may not, so every sub-call is ``not_recorded``)."""

        def replay(level: str, iteration: int, block: int) -> Replay | None:
            calls = self.sub_calls.get((level, iteration, block))
            if not calls and live:
                return None
            return Replay(tuple(calls or ()), live=live)

        return replay

    def spent(self) -> dict[str, Any]:
        """What the recorded part cost, as the handler counted it: its model calls and the
        sub-calls the handler admitted (``_paid``), live in the first run or in a resumed part."""
        calls = input_tokens = output_tokens = 0
        cost = 0.0
        for e in self.events:
            if e.get("event") not in ("model_call", "sub_call") or not _paid(e):
                continue
            calls += 1
            u = _usage(e.get("usage"))
            input_tokens += u.input_tokens
            output_tokens += u.output_tokens
            cost += float(e.get("cost_usd") or 0.0)
        return {
            "calls": calls,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cost_usd": round(cost, 9),
            "elapsed_s": float(self.events[-1].get("t", 0.0)),
        }

    def remaining_settings(self, settings: RunSettings) -> RunSettings:
        """``settings`` with each limit less what the recorded part spent (never below 0)."""
        spent = self.spent()

        def left(limit: float | None, used: float) -> Any:
            if limit is None:
                return None
            rest = max(limit - used, 0)
            return type(limit)(rest)

        return dataclasses.replace(
            settings,
            max_calls=left(settings.max_calls, spent["calls"]),
            max_input_tokens=left(settings.max_input_tokens, spent["input_tokens"]),
            max_output_tokens=left(settings.max_output_tokens, spent["output_tokens"]),
            max_cost_usd=left(settings.max_cost_usd, spent["cost_usd"]),
            wall_time_s=left(settings.wall_time_s, spent["elapsed_s"]),
        )

    def recorded_keys(self) -> dict[tuple[Any, ...], int]:
        """The events a resumed run must not write again (``Trajectory.skip``). A ``final`` of
        the root, or one with an error, ended a process that stopped there: the resumed run's
        own is new, though its key is the same."""
        return dict(
            Counter(
                event_key(e)
                for e in self.events
                if e.get("event") not in _NOT_SKIPPED
                and not (e.get("event") == "final" and (e.get("level") == ROOT_LEVEL or e.get("error")))
            )
        )

    def incomplete_blocks(self) -> list[dict[str, Any]]:
        """The blocks whose exec_end says sub-call records were lost, for the ``resume`` event."""
        return [
            {"level": level, "iteration": iteration, "block": block, "records_dropped": n}
            for (level, iteration, block), n in self.records_dropped.items()
        ]

    def cut_note(self) -> str:
        """Where a recording without run_end stops: its last event, for a message."""
        last = self.last_event
        where = [f"level {last.get('level', ROOT_LEVEL)}"]
        if last.get("iteration") is not None:
            where.append(f"iteration {last.get('iteration')}")
        if last.get("block") is not None:
            where.append(f"block {last.get('block')}")
        return (
            f"it has no run_end: the recorded run was cut after its {last.get('event')} ({', '.join(where)})"
        )

    def plan(self, *, live: bool, resume: dict[str, Any] | None = None) -> RunReplay:
        return RunReplay(self.sub_call_replay(live=live), resume)


# Errors a call gets before the handler reserves it in its run (lmhandler/pipeline.py: the
# request is checked, the prompt measured against the window, then the run's budget admits it),
# or that the pool gives without sending it: the run's ``calls`` does not count them. An error
# after admission (backend_error, rate_limited, timeout, unavailable, internal...) is a counted,
# failed call. Where a code can come from either side (unavailable, internal, timeout), the call
# is counted: a resumed run's limits err on the side of spending less, never more.
_NOT_ADMITTED = frozenset(
    {
        ErrorCode.BAD_REQUEST,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNKNOWN_OP,
        ErrorCode.UNKNOWN_MODEL,
        ErrorCode.UNAUTHORIZED,
        ErrorCode.TOO_LARGE,
        ErrorCode.OVERLOADED,
        ErrorCode.BUDGET_EXCEEDED,
        ErrorCode.RUN_CLOSED,
        ErrorCode.UNKNOWN_RUN,
        ErrorCode.NOT_RECORDED,
    }
)


def _error_code(e: Mapping[str, Any]) -> str | None:
    error = e.get("error")
    if not isinstance(error, Mapping):
        return None
    return str(error.get("code"))


def _answered(e: Mapping[str, Any]) -> bool:
    """Whether a sub_call record holds an answer (text or the handler's error) to give back: every
    one but a replay's ``not_recorded``, which was never sent."""
    return _error_code(e) != ErrorCode.NOT_RECORDED


def _paid(e: Mapping[str, Any]) -> bool:
    """Whether the handler counted this model_call or sub_call event in its run's ``calls``:
    not a replayed answer (never sent), not a cache hit (free: ``cached_calls``), not refused
    before admission."""
    if e.get("replayed") or e.get("cached") is True:
        return False
    return _error_code(e) not in _NOT_ADMITTED


def _block_key(e: Mapping[str, Any]) -> Key:
    return (str(e.get("level", ROOT_LEVEL)), int(e.get("iteration") or 0), int(e.get("block") or 0))


def _clip(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class RecordedModels:
    """A ``ModelClient`` that answers root calls from a recording, in order.

    Each request must equal the recorded one (rebuilt from the deltas) and come from the same
    depth. ``live`` None (replay): a request that differs or goes past the recording raises
    ``ReplayDiverged``; run budget calls are answered here. ``live`` set (resume): from then on
    every call goes to ``live``, and so do the budget calls always."""

    def __init__(
        self,
        recording: Recording,
        *,
        live: ModelClient | None = None,
        on_divergence: Callable[[Divergence], None] | None = None,
    ) -> None:
        self.recording = recording
        self.live = live
        self.on_divergence = on_divergence
        self.served = 0
        self.gone_live = False

    @property
    def remaining(self) -> int:
        return len(self.recording.calls) - self.served

    def _diverged(self, divergence: Divergence) -> None:
        if self.on_divergence is not None:
            self.on_divergence(divergence)

    def _check(
        self, call: RecordedCall, messages: Sequence[ChatMessage], model: str, depth: int | None
    ) -> str:
        """What differs between the request and the recorded one ("" for nothing)."""
        if depth is not None and depth != call.depth:
            return f"a model call at depth {depth}, recorded at depth {call.depth}"
        sent = [(m.role, m.content) for m in messages]
        if sent == list(call.messages):
            return ""
        for index, (got, want) in enumerate(zip(sent, call.messages, strict=False)):
            if got != want:
                return (
                    f"model call ({call.purpose}): message {index} differs: "
                    f"recorded {want[0]} {_clip(want[1])}, sent {got[0]} {_clip(got[1])}"
                )
        return f"model call ({call.purpose}): {len(sent)} messages sent, {len(call.messages)} recorded"

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
        if not self.gone_live and self.served < len(self.recording.calls):
            call = self.recording.calls[self.served]
            what = self._check(call, messages, model, depth)
            if not what:
                self.served += 1
                return CompleteReply(
                    f"recorded-{self.served}",
                    call.response,
                    model,
                    call.usage,
                    cached=call.cached,
                    latency_ms=call.latency_ms,
                    stop_reason=call.stop_reason,
                )
            self._diverged(Divergence(call.level, call.iteration, None, what))
            if self.live is None:
                raise ReplayDiverged(what)
            log.warning("resume: the run no longer matches its recording (%s); going on live", what)
            self.gone_live = True
        elif self.live is None:
            if self.recording.ended:
                what = f"a model call at depth {depth} past the end of the recording"
                self._diverged(Divergence(ROOT_LEVEL, None, None, what))
            else:
                last = self.recording.last_event
                what = (
                    f"the recording ends before the run did ({self.recording.cut_note()}); "
                    f"the replay asked for one more model call (depth {depth})"
                )
                self._diverged(
                    Divergence(
                        str(last.get("level", ROOT_LEVEL)),
                        last.get("iteration"),
                        last.get("block"),
                        what,
                        kind="recording_ends",
                    )
                )
            raise ReplayDiverged(what)
        self.gone_live = True
        assert self.live is not None
        return await self.live.complete(
            messages,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            timeout_s=timeout_s,
            run=run,
            depth=depth,
        )

    def _nothing(self, run: str, limits: RunLimits | None = None, *, closed: bool = False) -> RunUsage:
        return RunUsage(run, 0, 0, 0, Usage(0, 0), 0.0, 0.0, limits or RunLimits(), closed)

    async def run_open(self, run: str, limits: RunLimits | None = None) -> RunUsage:
        if self.live is not None:
            return await self.live.run_open(run, limits)
        return self._nothing(run, limits)

    async def run_close(self, run: str) -> RunUsage:
        if self.live is not None:
            return await self.live.run_close(run)
        return self._nothing(run, closed=True)

    async def usage(self, run: str) -> RunUsage:
        if self.live is not None:
            return await self.live.usage(run)
        return self._nothing(run)


def _error_of(e: Mapping[str, Any]) -> tuple[Any, ...] | None:
    error = e.get("error")
    if not isinstance(error, Mapping):
        return None
    return (error.get("code"), error.get("type"), error.get("message"))


# What must be equal, per event, for a replay to match.
_COMPARED: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "model_call": lambda e: {"purpose": e.get("purpose"), "response": e.get("response")},
    "exec_start": lambda e: {"block": e.get("block"), "code": e.get("code")},
    "exec_end": lambda e: {
        "block": e.get("block"),
        "stdout": e.get("stdout"),
        "stderr": e.get("stderr"),
        "error": _error_of(e),
        "final": e.get("final"),
        "state_lost": e.get("state_lost"),
    },
    "child_start": lambda e: {"parent": e.get("parent"), "block": e.get("block"), "query": e.get("query")},
    "final": lambda e: {"answer": e.get("answer"), "stop_reason": e.get("stop_reason")},
}


class Comparer:
    """Follows a replay's events (``RLM(on_event=...)``) and keeps the first ``Divergence``."""

    def __init__(self, recording: Recording) -> None:
        self.recording = recording
        self.expected = [e for e in recording.events if e.get("event") in _ORDERED]
        self.position = 0
        self.first: Divergence | None = None
        self.sub_calls = 0

    def note(self, divergence: Divergence) -> None:
        if self.first is None:
            self.first = divergence

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if self.first is not None:
            return
        level = str(fields.get("level", ROOT_LEVEL))
        iteration = fields.get("iteration")
        block = fields.get("block")
        if name == "sub_call":
            self.sub_calls += 1
            if fields.get("diverged"):
                self.note(self._unanswered(level, iteration, block, fields))
            return
        if name not in _ORDERED:
            return
        if self.position >= len(self.expected):
            if self.recording.ended:
                what = f"a {name} event past the end of the recording"
                self.note(Divergence(level, iteration, block, what))
            else:
                what = (
                    f"the recording ends before the run did ({self.recording.cut_note()}); "
                    f"the replay went on to {name}"
                )
                self.note(Divergence(level, iteration, block, what, kind="recording_ends"))
            return
        want = self.expected[self.position]
        self.position += 1
        where = (want.get("level"), want.get("iteration"))
        if name != want.get("event") or (level, iteration) != where:
            self.note(
                Divergence(
                    level,
                    iteration,
                    block,
                    f"{name} where the recording has {want.get('event')} "
                    f"(level {want.get('level')}, iteration {want.get('iteration')})",
                )
            )
            return
        got, expected = _COMPARED[name](fields), _COMPARED[name](want)
        for key, value in expected.items():
            if got.get(key) != value:
                what = f"{name}: {key} differs: recorded {_clip(str(value))}, now {_clip(str(got.get(key)))}"
                self.note(Divergence(level, iteration, block, what))
                return

    def _unanswered(self, level: str, iteration: Any, block: Any, fields: Mapping[str, Any]) -> Divergence:
        """Why a sub-call of the replay found no recorded answer: the recording of its block is
        incomplete or cut, or the call differs from what was recorded."""
        call = f"sub-call {fields.get('seq')} ({_clip(str(fields.get('prompt', '')), 60)})"
        key = (level, int(iteration or 0), int(block or 0))
        dropped = self.recording.records_dropped.get(key, 0)
        if dropped:
            return Divergence(
                level,
                iteration,
                block,
                f"the recording of this block is incomplete ({dropped} sub-call record(s) were lost "
                f"when it was recorded: exec_end records_dropped), so it cannot be checked: {call} "
                "has no recorded answer",
                kind="incomplete",
            )
        if key in self.recording.unfinished or (
            key not in self.recording.blocks and not self.recording.ended
        ):
            recorded = len(self.recording.sub_calls.get(key, ()))
            return Divergence(
                level,
                iteration,
                block,
                f"the recording ends in this block (cut after {recorded} of its sub-call records; "
                f"{self.recording.cut_note()}): {call} was not recorded",
                kind="recording_ends",
            )
        return Divergence(
            level,
            iteration,
            block,
            f"{call} has no recorded answer (its prompt differs from the recorded one, or it was never made)",
        )

    def finish(self) -> Divergence | None:
        """The first divergence, counting a replay that stopped before the recording did."""
        if self.first is None and self.position < len(self.expected):
            want = self.expected[self.position]
            self.note(
                Divergence(
                    str(want.get("level")),
                    want.get("iteration"),
                    want.get("block"),
                    f"the replay ended where the recording goes on with {want.get('event')}",
                )
            )
        return self.first


def check_context(recording: Recording, context: Any) -> None:
    """A ``RunError`` when ``context`` is not the one the recording describes."""
    recorded = recording.start.get("context")
    if recorded is not None and describe_context(context) != recorded:
        raise ReplayDiverged(
            f"the context given is not the recorded one: recorded {recorded!r}, "
            f"given {describe_context(context)!r}"
        )


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay found: the replayed run's result and the first divergence."""

    result: RunResult
    divergence: Divergence | None
    model_calls: int  # root responses served from the recording
    sub_calls: int  # sub-call records of the replay (each answered from the recording, or diverged)
    recorded_answer: str | None  # the recorded run's answer, if it finished

    @property
    def matched(self) -> bool:
        return self.divergence is None


async def replay_on(
    recording: Recording, context: Any, sandbox: Sandbox, trajectory: Trajectory
) -> ReplayReport:
    """Run ``recording`` again in ``sandbox``, with no model calls: root responses and sub-call
    answers from the recording (sub-calls it has no answer for fail with ``not_recorded``)."""
    comparer = Comparer(recording)
    models = RecordedModels(recording, on_divergence=comparer.note)
    window = recording.start.get("sub_window_tokens")
    rlm = RLM(models, sandbox, recording.run_settings(), on_event=comparer, sub_window_tokens=window)
    result = await rlm.run(
        str(recording.query or ""),
        context,
        run_id=recording.run_id,
        trajectory=trajectory,
        replay=recording.plan(live=False),
    )
    final = recording.final
    return ReplayReport(
        result,
        comparer.finish(),
        models.served,
        comparer.sub_calls,
        None if final is None else str(final.get("answer", "")),
    )


async def resume_on(
    recording: Recording,
    context: Any,
    *,
    live: ModelClient,
    sandbox: Sandbox,
    trajectory: Trajectory,
    run_id: str,
) -> RunResult:
    """Continue a recorded run that was cut (docs/trajectory.md, "Resume"): root responses from
    the recording, recorded sub-call answers given to each block (``live=True``: the rest of a
    cut block goes to the handler), then live through ``live`` under ``run_id``, with the limits
    less what the recorded part spent. ``trajectory`` appends to the recording's file and skips
    the events the recording already has."""
    check_context(recording, context)
    settings = recording.remaining_settings(recording.run_settings())
    resume: dict[str, Any] = {
        "run": recording.run_id,
        "handler_run": run_id,
        "resumed_from": len(recording.events),
        "usage_recorded": recording.spent(),
    }
    incomplete = recording.incomplete_blocks()
    if incomplete:
        # Not a divergence: the calls whose records were lost are simply sent live again.
        resume["incomplete_blocks"] = incomplete
        log.warning(
            "resume: %d block(s) of the recording lost sub-call records; their unrecorded calls go "
            "to the handler again",
            len(incomplete),
        )
    trajectory.skip = recording.recorded_keys()

    def live_from(divergence: Divergence) -> None:
        # From here on every event is new: none is skipped any more.
        trajectory.skip.clear()
        trajectory.write("resume_diverged", level=divergence.level, depth=0, what=str(divergence))

    models = RecordedModels(recording, live=live, on_divergence=live_from)
    window = recording.start.get("sub_window_tokens")
    rlm = RLM(models, sandbox, settings, sub_window_tokens=window)
    return await rlm.run(
        str(recording.query or ""),
        context,
        run_id=run_id,
        trajectory=trajectory,
        replay=recording.plan(live=True, resume=resume),
    )
