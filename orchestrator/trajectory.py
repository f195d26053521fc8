"""The trajectory: a run as data, one JSON object per line, flushed as it happens (schema 2).

Not a log: it records what the model was sent and said, the code it ran and what that printed,
every sub-call with its prompt and answer, usage, and why the run stopped. The format is
specified in docs/trajectory.md. A run that is killed still leaves a valid prefix: readers
(``read_events``) ignore a torn last line, and ``run_end`` may be missing.

Model calls record only the messages added since the level's previous call (``MessageDeltas``);
``rebuild_history`` gives every call's whole message list back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from rlmq.protocol import ChatMessage, ErrorCode

from .errors import RunError

__all__ = [
    "SCHEMA",
    "MessageDeltas",
    "Trajectory",
    "TrajectoryError",
    "levels",
    "read_events",
    "rebuild_history",
]

SCHEMA = 2
ROOT_LEVEL = "0"

Event = dict[str, Any]
WireMessage = dict[str, str]


class TrajectoryError(RunError):
    """A trajectory file that cannot be read (missing, not JSON lines, not a run)."""

    code = ErrorCode.BAD_REQUEST


class Trajectory:
    """Writes events to ``path`` (None: memory only), one JSON line each, flushed per line.

    ``append``: continue an existing file (a resumed run) with ``t`` going on from ``t_offset_s``.
    ``skip``: events the writer must not write again (a resumed run's replayed part): a multiset
    of ``event_key``s; an event whose key is in it is dropped once. Every event, written or not,
    is also kept in ``events`` (for callers and tests)."""

    def __init__(self, path: str | Path | None, *, append: bool = False, t_offset_s: float = 0.0) -> None:
        self.path = Path(path) if path is not None else None
        self._file: TextIO | None = None
        # t counts from the first event (run_start), not from when the file was made: services may
        # start in between. A resumed file goes on from where the recorded part ended.
        self._started: float | None = time.monotonic() - t_offset_s if append else None
        self.events: list[Event] = []  # kept in memory too, for callers and tests
        self.skip: dict[tuple[Any, ...], int] = {}
        self.skipped = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if append:
                _drop_torn_tail(self.path)
            self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, event: str, /, **fields: Any) -> None:
        now = time.monotonic()
        if self._started is None:
            self._started = now
        record = {"event": event, "t": round(now - self._started, 4), **fields}
        self.events.append(record)
        # A sub-call that went live (not answered from the recording) is news even when its key
        # matches a recorded one (same seq, a changed prompt): it was paid, so it is written.
        if self.skip and not (event == "sub_call" and not fields.get("replayed")):
            key = event_key(record)
            left = self.skip.get(key, 0)
            if left:
                self.skip[key] = left - 1
                self.skipped += 1
                return
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def event_key(event: Mapping[str, Any]) -> tuple[Any, ...]:
    """What names an event within its run, for telling a replayed event from a new one."""
    return (
        event.get("event"),
        event.get("level"),
        event.get("iteration"),
        event.get("block"),
        event.get("seq"),
        event.get("purpose"),
        event.get("name"),
    )


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line without its newline (torn by a crash) before appending after it."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_events(path: str | Path) -> list[Event]:
    """Every event of a trajectory file, in order. A last line that does not parse is the
    crash's torn write and is ignored; a bad line before it is a ``TrajectoryError``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrajectoryError(f"cannot read trajectory {path}: {exc}") from None
    lines = text.split("\n")
    events: list[Event] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            if number >= len(lines) - 1 and not text.endswith("\n"):
                break  # the torn last line of a crashed run
            raise TrajectoryError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            raise TrajectoryError(f"{path}:{number}: not a trajectory event")
        events.append(event)
    if not events or events[0]["event"] != "run_start":
        raise TrajectoryError(f"{path}: not a trajectory (its first event is not run_start)")
    return events


def levels(events: Iterable[Mapping[str, Any]]) -> list[str]:
    """The level ids of a run, in order of their first event."""
    seen: dict[str, None] = {}
    for e in events:
        level = e.get("level")
        if isinstance(level, str):
            seen.setdefault(level, None)
    return list(seen) or [ROOT_LEVEL]


def _level_of(event: Mapping[str, Any]) -> str:
    level = event.get("level")
    if isinstance(level, str):
        return level
    # Schema 1 had depths only: its root is level "0"; deeper levels are told apart by depth.
    depth = event.get("depth", 0)
    return ROOT_LEVEL if not depth else f"depth-{depth}"


def rebuild_history(events: Iterable[Mapping[str, Any]], level: str = ROOT_LEVEL) -> list[list[WireMessage]]:
    """For each ``model_call`` of ``level``, in order, the whole list of messages it sent.

    Schema 2: a call's request is its ``added`` when ``reset``, else the previous request of
    the level, the previous response as an assistant message, then ``added``. Schema 1 files
    carry the whole list (``messages``) on every call."""
    out: list[list[WireMessage]] = []
    previous: list[WireMessage] | None = None
    response = ""
    for e in events:
        if e.get("event") != "model_call" or _level_of(e) != level:
            continue
        if "messages" in e:  # schema 1
            current = [dict(m) for m in e["messages"]]
        elif e.get("reset") or previous is None:
            current = [dict(m) for m in e.get("added", [])]
        else:
            current = [*previous, {"role": "assistant", "content": response}, *e.get("added", [])]
        out.append(current)
        previous, response = current, str(e.get("response", ""))
    return out


class MessageDeltas:
    """Per level: what a model call adds to the level's previous request and response.

    ``delta(level, messages)`` returns (added, reset) for a request about to be recorded;
    ``answered(level, response)`` notes its response (which the next request repeats)."""

    def __init__(self) -> None:
        # level -> (the previous request with its response appended, as (role, content) pairs)
        self._base: dict[str, list[tuple[str, str]]] = {}

    def delta(self, level: str, messages: Sequence[ChatMessage]) -> tuple[list[WireMessage], bool]:
        pairs = [(m.role, m.content) for m in messages]
        base = self._base.get(level)
        self._base[level] = pairs
        if base is not None and len(pairs) >= len(base) and pairs[: len(base)] == base:
            return [{"role": r, "content": c} for r, c in pairs[len(base) :]], False
        return [{"role": r, "content": c} for r, c in pairs], True

    def answered(self, level: str, response: str) -> None:
        base = self._base.get(level)
        if base is not None:
            base.append(("assistant", response))
