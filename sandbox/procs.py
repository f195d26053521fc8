"""Small /proc readers, process killers and namespace calls shared by the pool and the worker.

Linux only. Every function tolerates processes that vanish while it looks at them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterable

__all__ = [
    "NETNS_MODES",
    "cpu_ticks",
    "descendants",
    "host_pid_of",
    "kill_pids",
    "pids_of_uid",
    "process_table",
    "reap_descendants",
    "unshare_network",
]

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
# How a worker gets a network namespace of its own: "net" (the pool is root: unshare it
# directly), "user" (unprivileged: a user namespace mapping the worker's own ids, then the
# network namespace inside it), or "" (none: bwrap does it, network = true, or the kernel
# allows neither).
NETNS_MODES = ("", "net", "user")


def unshare_network(mode: str) -> None:
    """Move this process into a new, empty network namespace (only a loopback that is down):
    no TCP or UDP anywhere, no abstract unix sockets; unix sockets in the filesystem (ZeroMQ
    ipc://) still connect. Raises OSError when the kernel refuses."""
    if mode not in NETNS_MODES:
        raise ValueError(f"unknown network namespace mode {mode!r}")
    if not mode:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if mode == "net":
        flags = CLONE_NEWNET
    else:
        uid, gid = os.getuid(), os.getgid()
        flags = CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({mode}): {os.strerror(err)}")
    if mode == "user":
        # The worker keeps its own ids inside the user namespace, so its files stay its own.
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")


def _stat_fields(data: bytes) -> list[bytes]:
    # /proc/PID/stat is "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
    return data[data.rindex(b")") + 2 :].split()


def process_table() -> dict[int, int]:
    """``{pid: ppid}`` of every process this /proc shows."""
    table: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = _stat_fields(f.read())
        except (OSError, ValueError):
            continue
        table[int(name)] = int(fields[1])
    return table


def descendants(root: int, table: dict[int, int] | None = None) -> list[int]:
    """Every live descendant of ``root`` (children first)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    out: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            out.append(child)
            stack.append(child)
    return out


def pids_of_uid(uid: int, *, include_zombies: bool = False) -> list[int]:
    """Processes whose real uid is ``uid``."""
    found: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        real_uid = state = None
        for line in status.splitlines():
            if line.startswith(b"Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith(b"State:"):
                state = line.split()[1]
        if real_uid == uid and (include_zombies or state != b"Z"):
            found.append(int(name))
    return found


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of ``pid`` (all threads) in clock ticks; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = _stat_fields(f.read())
    except (OSError, ValueError):
        return None
    return int(fields[11]) + int(fields[12])


def host_pid_of(ns_pid: int, root: int) -> int | None:
    """The host pid of the process that calls itself ``ns_pid`` inside a pid namespace whose
    processes all descend from ``root`` (a bubblewrap process started by the pool)."""
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(b"NSpid:"):
                ids = line.split()[1:]
                if len(ids) >= 2 and int(ids[-1]) == ns_pid:
                    return pid
    return None


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> int:
    """Signal each pid; returns how many were signalled."""
    sent = 0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            sent += 1
    return sent


def reap_descendants(timeout_s: float = 10.0) -> None:
    """Kill every descendant of this process and reap them all (for a child subreaper).

    Repeats until no child is left: a fork bomb keeps forking while it is being killed.
    """
    me = os.getpid()
    deadline = time.monotonic() + timeout_s
    while True:
        kill_pids(descendants(me))
        try:
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.002)
