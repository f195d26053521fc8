"""How a worker process is launched and contained (docs/security.md says what each level buys).

- ``process``: a plain subprocess with a scrubbed environment, a private working directory, rlimits,
  its own empty network namespace (``network_mode``), and (when the pool runs as root) its own
  unprivileged uid and a pids cgroup.
- ``bwrap``: the same inside bubblewrap: no network, a read-only root filesystem, a private /tmp,
  and its own pid, ipc and uts namespaces.

Either way the worker's only way out is the pool's stamping relay (``relay.SubCallRelay``), an
ipc socket in the pool's private directory; ``network = true`` gives the network back.

Everything here is synchronous and quick, and knows no sockets; the supervisor calls it from a
thread.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import rlmq

from . import procs
from .config import PoolConfig
from .spec import WorkerSpec

__all__ = [
    "Cgroups",
    "UidSlots",
    "find_bwrap",
    "in_cgroup",
    "network_mode",
    "worker_command",
    "worker_env",
]

log = logging.getLogger(__name__)

CGROUP_V1_PIDS = Path("/sys/fs/cgroup/pids")
# Tasks that are ours, not the code's, in a worker's pids cgroup: sh/bwrap, bwrap's init, the
# nanny, and the worker's threads (main, heartbeat, two ZeroMQ threads).
OWN_TASKS = 8
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
# The directory bubblewrap replaces with a private tmpfs (not a temp file of ours).
SANDBOX_TMP = "/tmp"  # noqa: S108


def find_bwrap() -> str | None:
    return shutil.which("bwrap")


# Run in a throwaway interpreter: does this kernel (and container) let us unshare the network?
_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
flags = 0x40000000 if sys.argv[1] == "net" else 0x50000000
sys.exit(0 if libc.unshare(ctypes.c_int(flags)) == 0 else 1)
"""


def _can_unshare(python: str, mode: str) -> bool:
    try:
        done = subprocess.run(
            [python, "-I", "-c", _PROBE, mode],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": SYSTEM_PATH},
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def network_mode(config: PoolConfig, *, bwrap: str | None) -> tuple[str, str | None]:
    """How workers get a network namespace of their own (``procs.NETNS_MODES``), and the one
    line the pool says at start when they cannot have one (None when all is well).

    bubblewrap makes its own (``--unshare-net``); ``network = true`` asks for none. Otherwise a
    root pool unshares the network namespace itself; an unprivileged one needs a user namespace
    around it, which some kernels and most container profiles forbid."""
    if config.network:
        return "", "network = true: model code can reach the network and this host's services"
    if bwrap is not None:
        return "", None
    python = config.python or sys.executable
    if os.geteuid() == 0:
        # Not a user namespace as root: the worker must drop to a real host uid (docs/security.md).
        if _can_unshare(python, "net"):
            return "net", None
    elif _can_unshare(python, "user"):
        return "user", None
    return "", (
        "no network namespace for workers (this kernel or container allows neither unshare nor a "
        "user namespace): model code can reach the network and this host's services; see "
        "docs/security.md"
    )


class UidSlots:
    """Unprivileged uids for workers, one per live worker, never shared: RLIMIT_NPROC and "kill
    every process of this uid" are then per worker. A random start lowers the odds that two
    pools on one host pick the same uid (the pool also skips uids that have processes)."""

    def __init__(self, base: int, count: int) -> None:
        self.base = base
        self.count = count
        self._used: set[int] = set()
        self._avoid: set[int] = set()
        self._next = random.randrange(count)

    def take(self) -> int | None:
        for i in range(self.count):
            slot = (self._next + i) % self.count
            if slot not in self._used and slot not in self._avoid:
                self._used.add(slot)
                self._next = slot + 1
                return self.base + slot
        return None

    def release(self, uid: int, *, avoid: bool = False) -> None:
        """Give ``uid`` back; ``avoid``: something of it lingers (a zombie), never reuse it."""
        self._used.discard(uid - self.base)
        if avoid:
            self._avoid.add(uid - self.base)


class Cgroups:
    """A pids cgroup per worker under one group per pool (cgroup v1, root only).

    cgroup v2 is not handled: creating a child group there needs the pids controller delegated
    to a group without processes, which a container's root cgroup usually is not. Without it the
    process limit is RLIMIT_NPROC alone (docs/security.md).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def create(cls, name: str) -> Cgroups | None:
        if os.geteuid() != 0 or not (CGROUP_V1_PIDS / "cgroup.procs").exists():
            return None
        root = CGROUP_V1_PIDS / name
        try:
            root.mkdir()
        except OSError as exc:
            log.info("no pids cgroup for the pool (%s); RLIMIT_NPROC only", exc)
            return None
        return cls(root)

    def make(self, wid: str, pids_max: int) -> Path:
        """A group for one worker; returns its cgroup.procs, which the launcher joins."""
        group = self.root / wid
        group.mkdir()
        (group / "pids.max").write_text(str(pids_max))
        return group / "cgroup.procs"

    def pids(self, wid: str) -> list[int]:
        try:
            text = (self.root / wid / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def kill_and_remove(self, wid: str, timeout_s: float = 5.0) -> bool:
        """Kill whatever is left in the worker's group, then remove it. False if it lingers."""
        group = self.root / wid
        if not group.exists():
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self.pids(wid)
            if pids:
                procs.kill_pids(pids)
            else:
                try:
                    group.rmdir()
                    return True
                except OSError:  # EBUSY while the last ones are being torn down
                    pass
            time.sleep(0.005)
        log.warning("cgroup %s still busy after %.1f s", group, timeout_s)
        return False

    def remove_root(self) -> None:
        for group in list(self.root.iterdir()) if self.root.exists() else []:
            if group.is_dir():
                self.kill_and_remove(group.name, timeout_s=2.0)
        with contextlib.suppress(OSError):
            self.root.rmdir()


def _package_roots() -> list[str]:
    # The folder that holds the `rlmq` package: site-packages for an install, the checkout for a
    # source tree (whose rlmq/ links the four service folders in).
    return [str(Path(rlmq.__file__ or "").resolve().parent.parent)]


def worker_env(workdir: str) -> dict[str, str]:
    """The whole environment of a worker: nothing of the pool's (no API keys, no tokens)."""
    return {
        "PATH": SYSTEM_PATH,
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONPATH": os.pathsep.join(_package_roots()),
        "PYTHONNOUSERSITE": "1",
    }


def _runtime_paths(python: str) -> list[str]:
    """What a worker must be able to read: the interpreter, its prefix, and the directories
    holding rlmq's packages and its two dependencies (not the rest of ``sys.path``)."""
    paths = [sys.prefix, sys.exec_prefix, sys.base_prefix, os.path.dirname(python), *_package_roots()]
    for name in ("zmq", "msgpack"):  # located, not imported: this module knows no sockets
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin is not None:
            paths.append(str(Path(spec.origin).resolve().parent.parent))
    return paths


def _hidden_by_tmp(paths: list[str]) -> list[str]:
    """Those of ``paths`` under /tmp, which bwrap replaces with a private tmpfs (a virtualenv
    in /tmp, for instance): each is bound back read-only. /tmp itself never is."""
    out: list[str] = []
    for p in sorted({str(Path(p).resolve()) for p in paths if p}):
        if p == SANDBOX_TMP:
            log.warning("a worker needs %s itself; it stays hidden behind the private /tmp", p)
            continue
        inside = p.startswith(SANDBOX_TMP + "/")
        if inside and os.path.exists(p) and not any(p.startswith(o + "/") for o in out):
            out.append(p)
    return out


def _handler_dirs(handler: str, ours: list[str]) -> list[str]:
    """The directory of an ipc:// handler socket, to hide inside bubblewrap, unless it holds a
    directory the worker needs, or is /tmp (private there already) or the root."""
    if not handler.startswith("ipc://") or handler.startswith("ipc://@"):
        return []
    folder = str(Path(handler[len("ipc://") :]).resolve().parent)
    if folder in ("/", SANDBOX_TMP) or folder.startswith(SANDBOX_TMP + "/"):
        return []
    if any(p == folder or p.startswith(folder + "/") for p in ours):
        return []
    return [folder]


def worker_command(
    config: PoolConfig,
    spec: WorkerSpec,
    *,
    bwrap: str | None,
    bind_dirs: list[str],
) -> list[str]:
    """The argv that starts one worker (see the module docstring)."""
    python = config.python or sys.executable
    cmd = [python, "-P", "-s", "-m", "rlmq.sandbox.worker", spec.to_json()]
    if bwrap is not None:
        env = worker_env(spec.workdir)
        needed = _runtime_paths(python)
        args = [
            bwrap,
            "--unshare-ipc",
            "--unshare-pid",
            *([] if config.network else ["--unshare-net"]),
            "--unshare-uts",
            "--unshare-cgroup-try",
            # not --unshare-user as root: the worker must setuid to a real host uid for
            # RLIMIT_NPROC to count (a user namespace would map it away)
            *([] if os.geteuid() == 0 else ["--unshare-user"]),
            "--die-with-parent",
            # The worker's nanny is a reaper already: let it be pid 1 rather than bubblewrap's
            # own, which its parent leaves unreaped (a zombie per worker) when it exits.
            "--as-pid-1",
            "--new-session",
            "--clearenv",
            *[a for k, v in env.items() for a in ("--setenv", k, v)],
            "--ro-bind",
            "/",
            "/",
            "--perms",
            "1777",  # the worker's uid must write to it; nobody else sees this tmpfs
            "--size",
            str(config.tmp_size_mb * 1024 * 1024),
            "--tmpfs",
            SANDBOX_TMP,
            "--proc",
            "/proc",
            "--dev",
            "/dev",
        ]
        for path in _hidden_by_tmp(needed):
            args += ["--ro-bind", path, path]
        for path in _handler_dirs(config.handler, [*bind_dirs, spec.workdir]):
            # The handler's own socket is none of the code's business: its only way out is the
            # relay. An empty tmpfs hides the directory (it would be reachable in a shared volume).
            args += ["--tmpfs", path]
        for parent in sorted({os.path.dirname(p) for p in [*bind_dirs, spec.workdir]}):
            # bubblewrap would create these mount points' parent itself, untraversable by the
            # worker's uid (which reaches the handler proxies in it after its uid drop)
            args += ["--perms", "0711", "--dir", parent]
        for path in [*bind_dirs, spec.workdir]:
            args += ["--bind", path, path]
        args += ["--chdir", spec.workdir, "--"]
        cmd = args + cmd
    return cmd


def in_cgroup(cmd: list[str], cgroup_procs: Path) -> list[str]:
    """``cmd`` run inside a cgroup: join it (its ``cgroup.procs``) before anything else runs."""
    return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup_procs), *cmd]
