"""Incremental reads of a JSON-lines trajectory that may still be growing.

A writer flushes one whole line at a time, but a reader can catch it mid-line (or after a crash
that tore the last line). ``read_lines`` returns only whole lines and the byte offset just past
the last one, so the next call picks the torn line up again once the writer has finished it.
``read_from`` is the same, parsed.

An offset alone cannot tell a file rewritten in place that has grown past it again: each read
also names the file's ``generation`` (its inode and a digest of its first line), and a read
given the generation its offset came from starts over at 0 when the file's differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "TRAJECTORY_EVENTS",
    "Chunk",
    "Lines",
    "first_line",
    "is_trajectory_event",
    "newest_run",
    "parse_lines",
    "read_from",
    "read_lines",
]

DEFAULT_CHUNK_BYTES = 8 << 20  # per answer, so a 10,000-sub-call run reaches the page in a few pieces

# The event names docs/trajectory.md defines (schema 2), and schema 1's ``exec``.
TRAJECTORY_EVENTS = frozenset(
    {
        "run_start",
        "ask",
        "model_call",
        "exec_start",
        "sub_call",
        "exec_end",
        "exec",
        "child_start",
        "child_end",
        "final_ignored",
        "final_cut",
        "final_var",
        "compaction",
        "final",
        "resume",
        "resume_diverged",
        "run_end",
    }
)


@dataclass(frozen=True, slots=True)
class Lines:
    """The whole lines (bytes, each ending in a newline) from where the read began up to ``offset``."""

    data: bytes
    offset: int  # where the next read begins
    size: int  # the file's size when read: offset < size means more is waiting (or a torn line)
    reset: bool = False  # the file shrank below the asked offset (rewritten): data starts at 0
    more: bool = False  # the size limit stopped the read: ask again at once for the rest
    exists: bool = True
    generation: str = ""  # which file this is (``file_generation``); "" for a missing one


@dataclass(frozen=True, slots=True)
class Chunk:
    """Whole events read up to ``offset``; fields as in ``Lines``."""

    events: list[dict[str, Any]]
    offset: int
    size: int
    reset: bool = False
    bad_lines: int = 0  # whole lines that were not a JSON object, skipped
    more: bool = False


# A first line is digested up to this much: enough to tell two runs apart (run_start holds the
# run's id), little to read again on every poll.
_GENERATION_BYTES = 64 << 10


def _generation(f: BinaryIO, st: os.stat_result) -> str:
    """The generation of the open file ``f``: its device and inode (a file replaced by another)
    and a digest of its first line (a file truncated and written again in place). A first line
    not whole yet is left out: it cannot have been read, so nothing read before can be wrong."""
    f.seek(0)
    head = f.read(_GENERATION_BYTES)
    newline = head.find(b"\n")
    if newline >= 0:
        head = head[: newline + 1]
    elif len(head) < _GENERATION_BYTES:
        head = b""
    digest = hashlib.blake2b(head, digest_size=8).hexdigest() if head else "-"
    return f"{st.st_dev:x}.{st.st_ino:x}.{digest}"


def read_lines(
    path: str | Path,
    offset: int = 0,
    *,
    max_bytes: int = DEFAULT_CHUNK_BYTES,
    generation: str | None = None,
) -> Lines:
    """The whole lines of ``path`` from byte ``offset`` on, about ``max_bytes`` of them at most.

    A line longer than ``max_bytes`` is still returned whole. A missing file is empty, so a viewer
    started before the run's first line waits for it. ``generation``: the one of the read that
    gave ``offset``; when the file's is another now (rewritten), the lines start at 0 (``reset``).
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; a missing file is not an error)
    except FileNotFoundError:
        return Lines(b"", 0, 0, reset=offset > 0, exists=False)
    with f:
        st = os.fstat(f.fileno())
        size = st.st_size
        current = _generation(f, st)
        reset = offset > size or (offset > 0 and bool(generation) and generation != current)
        start = 0 if reset else offset
        f.seek(start)
        data = f.read(max_bytes)
        end = data.rfind(b"\n")
        # One line longer than the limit: read on until its end (or the file's).
        while end < 0:
            more_data = f.read(max_bytes)
            if not more_data:
                break
            newline = more_data.find(b"\n")
            if newline >= 0:
                end = len(data) + newline
            data += more_data
    if end < 0:
        return Lines(b"", start, size, reset=reset, generation=current)
    new_offset = start + end + 1
    more = len(data) >= max_bytes and new_offset < size
    return Lines(data[: end + 1], new_offset, size, reset=reset, more=more, generation=current)


def parse_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of ``data``'s lines, and how many non-blank lines were not one."""
    events: list[dict[str, Any]] = []
    bad = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(event, dict):
            events.append(event)
        else:
            bad += 1
    return events, bad


def read_from(path: str | Path, offset: int = 0, *, max_bytes: int = DEFAULT_CHUNK_BYTES) -> Chunk:
    """``read_lines``, parsed: the events of the whole lines from ``offset`` on."""
    lines = read_lines(path, offset, max_bytes=max_bytes)
    events, bad = parse_lines(lines.data)
    return Chunk(events, lines.offset, lines.size, reset=lines.reset, bad_lines=bad, more=lines.more)


def is_trajectory_event(value: object) -> bool:
    """Whether ``value`` (a parsed line) is an event of a trajectory: an object with a known ``event``."""
    return isinstance(value, dict) and value.get("event") in TRAJECTORY_EVENTS


def first_line(path: str | Path) -> bytes | None:
    """The first whole non-blank line of ``path``; None while there is none (missing, empty, torn)."""
    lines = read_lines(path, 0, max_bytes=64 << 10)
    while lines.data:
        for line in lines.data.split(b"\n"):
            if line.strip():
                return line
        if not lines.more:
            break
        lines = read_lines(path, lines.offset, max_bytes=64 << 10)
    return None


def newest_run(directory: str | Path) -> Path | None:
    """The most recently modified ``*.jsonl`` in ``directory`` (None when there is none)."""
    folder = Path(directory)
    if not folder.is_dir():
        return None
    runs = [p for p in folder.glob("*.jsonl") if p.is_file()]
    if not runs:
        return None
    return max(runs, key=lambda p: (p.stat().st_mtime_ns, p.name))
