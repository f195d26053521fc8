"""A process and everything it started, read from /proc: for tests that kill a command and check
that none of its services outlive it, and for fixtures that must leave nothing behind.

A process is named by (pid, start time) so that a pid reused by an unrelated process is never
mistaken for one of ours."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["alive", "cmdline", "descendants", "kill", "kill_tree", "wait_gone"]

Procs = dict[int, int]  # pid -> start time (clock ticks since boot)


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of ``pid``, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children() -> dict[int, list[tuple[int, int]]]:
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] != "Z":
                children.setdefault(stat[0], []).append((int(entry.name), stat[2]))
    return children


def _below(children: dict[int, list[tuple[int, int]]], roots: list[int]) -> Procs:
    found: Procs = {}
    todo = list(roots)
    while todo:
        for pid, start in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = start
                todo.append(pid)
    return found


def descendants(root: int) -> Procs:
    """Every live process below ``root`` (children, theirs, ...), not ``root`` itself."""
    return _below(_children(), [root])


def alive(procs: Procs) -> Procs:
    """Those of ``procs`` still running (a zombie has finished: only its exit status is left)."""
    left: Procs = {}
    for pid, start in procs.items():
        stat = _stat(pid)
        if stat is not None and stat[1] != "Z" and stat[2] == start:
            left[pid] = start
    return left


def wait_gone(procs: Procs, timeout_s: float) -> Procs:
    """Wait until none of ``procs`` runs, at most ``timeout_s``; those still running. A bounded
    poll: nothing tells this process when another's grandchildren exit."""
    deadline = time.monotonic() + timeout_s
    left = alive(procs)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = alive(left)
    return left


def _signal(procs: Procs, sig: signal.Signals) -> None:
    for pid in alive(procs):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue


def kill(procs: Procs) -> None:
    """SIGKILL those of ``procs`` still running (a failed test's leftovers)."""
    _signal(procs, signal.SIGKILL)


def kill_tree(root: int, timeout_s: float = 30.0) -> Procs:
    """SIGKILL ``root`` (a child of ours) and everything below it, whatever session each is in.

    Everything is stopped first, top down, until no new process appears (a stopped process
    starts nothing), so that none is missed by being reparented while we look; then all of them
    are killed. Returns those still running after ``timeout_s`` (none, normally)."""
    start = _stat(root)
    procs: Procs = {root: start[2]} if start is not None else {}
    _signal(procs, signal.SIGSTOP)
    while True:
        found = {pid: s for pid, s in _below(_children(), list(procs)).items() if pid not in procs}
        if not found:
            break
        procs.update(found)
        _signal(found, signal.SIGSTOP)
    _signal(procs, signal.SIGKILL)
    return wait_gone({pid: s for pid, s in procs.items() if pid != root}, timeout_s)
