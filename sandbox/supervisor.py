"""The worker supervisor: processes, uids and cgroups; it knows nothing of ZeroMQ or sessions.

Life of a worker process (one per session, never reused):

    STARTING --ready--> WARM --claim--> SESSION --kill / exit--> KILLED --exit--> EXITED
    (spawned ahead of demand)       (given to a session)        (cleanup: cgroup, uid, directory)

- Spawn: a uid of its own (when the pool runs as root), a private directory, a pids cgroup, a
  network namespace of its own (``isolation.network_mode``, probed once at start), a routing id
  for the sub-call relay, and the command from ``isolation.worker_command``; exit is watched with
  a pidfd in the event loop.
- Kill: the code-running child (its host pid is known once the worker is ready) or the launcher,
  then SIGKILL to the whole process group if it is still there after ``kill_grace_s``.
- Liveness: ``check()`` reports workers silent for ``heartbeat_interval_s x heartbeat_liveness``,
  except a worker in a session whose CPU time still advances: it is busy (a C call holding the
  GIL), not hung, and is left to its exec deadline. A worker not ready within ``open_timeout_s``
  is killed.

The owner (the session manager) hears of each worker through ``SupervisorEvents``; the clock,
the CPU reader, the "is this uid in use" probe and the command are injectable for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rlmq.protocol.errors import ConfigError

from . import procs
from ._tasks import Background, Stats
from .config import PoolConfig
from .isolation import Cgroups, UidSlots, find_bwrap, in_cgroup, network_mode, worker_command, worker_env
from .spec import WorkerSpec

__all__ = [
    "Silent",
    "Supervisor",
    "SupervisorEvents",
    "Worker",
    "WorkerState",
    "describe_exit",
]

log = logging.getLogger(__name__)

_SIGNALS = {
    signal.SIGKILL: "killed by SIGKILL (from outside, or by the kernel when out of memory)",
    signal.SIGXCPU: "stopped by its CPU time limit (SIGXCPU)",
    signal.SIGSEGV: "crashed (SIGSEGV)",
    signal.SIGABRT: "aborted (SIGABRT)",
    signal.SIGBUS: "crashed (SIGBUS)",
    signal.SIGTERM: "terminated (SIGTERM)",
}


def describe_exit(code: int | None) -> str:
    """How a worker ended. The nanny exits with the code-running child's status, 128 + signal
    when it was killed; a negative code is Popen's way of saying the process itself was."""
    if code is None:
        return "the worker vanished"
    sig = -code if code < 0 else code - 128 if code > 128 else 0
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        known = {int(k): v for k, v in _SIGNALS.items()}
        return "the worker was " + known.get(sig, f"killed by {name}")
    return f"the worker exited with status {code}"


class WorkerState(enum.Enum):
    STARTING = "starting"
    WARM = "warm"
    SESSION = "session"
    KILLED = "killed"
    EXITED = "exited"


@dataclass(eq=False)
class Worker:
    """One worker process as the supervisor sees it."""

    wid: str
    uid: int | None
    workdir: Path
    started: float
    last_seen: float
    # The routing id the worker connects to the sub-call relay with: chosen here, unguessable,
    # so that nothing else can pass for this worker there.
    relay_id: bytes = field(default_factory=lambda: os.urandom(16).hex().encode())
    state: WorkerState = WorkerState.STARTING
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    stderr_fd: int | None = None
    stderr_tail: bytes = b""
    child_pid: int | None = None  # host pid of the code-running process, known once ready
    cpu_mark: int | None = None
    kill_reason: str | None = None
    exit_reason: str | None = None  # how it ended, once it has
    kill_timer: asyncio.TimerHandle | None = None
    launched: asyncio.Event = field(default_factory=asyncio.Event)  # has a process, or never will
    exited: asyncio.Event = field(default_factory=asyncio.Event)  # exited and cleaned up

    @property
    def alive(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.WARM, WorkerState.SESSION)


@dataclass(frozen=True, slots=True)
class Silent:
    """A worker that sent nothing for ``silent_s`` and is not busy: stopped or hung."""

    worker: Worker
    silent_s: float

    @property
    def reason(self) -> str:
        return f"the worker was killed: silent for {self.silent_s:.1f} s (no heartbeat: stopped or hung)"


class SupervisorEvents(Protocol):
    """What the supervisor tells its owner. Called on the event loop, never from a thread."""

    def worker_ready(self, worker: Worker) -> None: ...

    def worker_killed(self, worker: Worker, reason: str) -> None: ...

    def worker_exited(self, worker: Worker, reason: str, *, unexpected: bool) -> None: ...


class _Quiet:
    def worker_ready(self, worker: Worker) -> None:
        pass

    def worker_killed(self, worker: Worker, reason: str) -> None:
        pass

    def worker_exited(self, worker: Worker, reason: str, *, unexpected: bool) -> None:
        pass


Command = Callable[[Worker], list[str]]


class Supervisor:
    """Start, watch, kill and clean up worker processes (see the module docstring)."""

    def __init__(
        self,
        config: PoolConfig,
        *,
        background: Background | None = None,
        stats: Stats | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu_ticks: Callable[[int], int | None] = procs.cpu_ticks,
        uid_in_use: Callable[[int], bool] | None = None,
        uids: UidSlots | None = None,
        command: Command | None = None,
    ) -> None:
        """``uids``: the uid range to drop workers to; by default the config's, when the pool
        runs as root, else none (workers keep the pool's uid). ``command``: the argv of a worker
        (default: ``isolation.worker_command``); ``uid_in_use``: whether a uid has processes on
        this host (default: a /proc scan)."""
        self.config = config
        self.events: SupervisorEvents = _Quiet()
        self._own_background = background is None
        self.background = background or Background()
        self.stats = stats or Stats()
        self.clock = clock
        self._cpu_ticks = cpu_ticks
        self._uid_in_use = uid_in_use or (lambda uid: bool(procs.pids_of_uid(uid, include_zombies=True)))
        if uids is None and config.uid_base is not None and os.geteuid() == 0:
            uids = UidSlots(config.uid_base, config.uid_count)
        self.uids = uids
        self._command = command or self._worker_command
        self.bwrap: str | None = None
        self.cgroups: Cgroups | None = None
        self.base: Path | None = None
        self.netns = ""  # how workers get a network namespace (procs.NETNS_MODES); set by start()
        self.network_notice: str | None = None  # the line said at start when they get none
        self.workers: dict[str, Worker] = {}
        self._ids = itertools.count(1)
        self.failures = 0  # consecutive workers that died before they were ready
        self.spawn_after = 0.0  # no spawning before this time (backing off after failures)
        self.last_failure = ""

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Find bubblewrap if asked for, make the private tree, the pool's cgroup (root only)."""
        if self.config.isolation == "bwrap":
            self.bwrap = find_bwrap()
            if self.bwrap is None:
                raise ConfigError('isolation = "bwrap" but bubblewrap (bwrap) is not installed')
        base = await self.background.blocking(_make_dirs)
        self.base = base
        if self.uids is not None and self.config.cgroup:
            self.cgroups = await self.background.blocking(Cgroups.create, base.name)
        self.netns, self.network_notice = await self.background.blocking(
            lambda: network_mode(self.config, bwrap=self.bwrap)
        )
        if self.network_notice is not None:
            log.warning("%s", self.network_notice)

    @property
    def ipc_dir(self) -> Path:
        """0700: the pool's own sockets (workers connect before their uid drop, and cannot enter
        it after: no connection of theirs can appear later)."""
        assert self.base is not None, "start() first"
        return self.base / "ipc"

    @property
    def pool_address(self) -> str:
        """Where workers find the pool (the server binds it)."""
        return f"ipc://{self.ipc_dir / 'workers.sock'}"

    @property
    def relay_path(self) -> str:
        """Where workers find the sub-call relay (the server starts it)."""
        return str(self.ipc_dir / "relay.sock")

    @property
    def uid_drop(self) -> bool:
        return self.uids is not None

    async def stop(self, reason: str = "the pool is stopping") -> None:
        """Kill every worker and wait for their exits (SIGKILL and a forced reap for the slow)."""
        launching = self.background.named("launch", "resolve")
        if launching:
            await asyncio.wait(launching, timeout=10.0)
        for worker in list(self.workers.values()):
            self.kill(worker, reason)
        exits = [asyncio.ensure_future(w.exited.wait()) for w in self.workers.values()]
        if exits:
            _, pending = await asyncio.wait(exits, timeout=self.config.kill_grace_s + 2.0)
            for p in pending:
                p.cancel()
        for worker in list(self.workers.values()):
            if worker.state is not WorkerState.EXITED:  # exited ones are being cleaned up
                log.warning("worker %s did not exit; cleaning up after it", worker.wid)
                self._force_kill(worker)
                self._on_exit(worker, force=True)
        cleanups = self.background.named("cleanup", "resolve")
        if cleanups:
            await asyncio.wait(cleanups, timeout=10.0)

    async def close(self) -> None:
        """Remove the pool's cgroup and private tree (after ``stop``, and after whatever else
        lives in the tree, such as proxies, is gone)."""
        if self.cgroups is not None:
            await self.background.blocking(self.cgroups.remove_root)
        if self.base is not None:
            await self.background.blocking(shutil.rmtree, self.base, True)
        if self._own_background:
            self.background.shutdown()

    async def wait_cleaned(self, timeout_s: float = 15.0) -> None:
        """Wait until every discarded worker has exited and been cleaned up."""
        async with asyncio.timeout(timeout_s):
            while True:
                dying = [w for w in self.workers.values() if not w.alive]
                if not dying:
                    return
                await dying[0].exited.wait()

    # ------------------------------------------------------------ counts

    def count(self, *states: WorkerState) -> int:
        return sum(1 for w in self.workers.values() if w.state in states)

    @property
    def starting(self) -> int:
        return self.count(WorkerState.STARTING)

    @property
    def live(self) -> int:
        return self.count(WorkerState.STARTING, WorkerState.WARM, WorkerState.SESSION)

    def spawn_delay(self) -> float:
        """Seconds until spawning may resume (0: now); set after repeated early deaths."""
        return max(0.0, self.spawn_after - self.clock())

    # ------------------------------------------------------------ spawn

    def spawn(self) -> Worker | None:
        """Start one worker in the background; None when no uid is free."""
        assert self.base is not None, "start() first"
        uid = None
        if self.uids is not None:
            uid = self.uids.take()
            if uid is None:
                self.last_failure = "no free uid in the uid range"
                return None
        wid = f"w{next(self._ids)}"
        now = self.clock()
        worker = Worker(wid=wid, uid=uid, workdir=self.base / wid, started=now, last_seen=now)
        self.workers[wid] = worker
        self.background.spawn(self._launch(worker), name=f"launch {wid}")
        return worker

    def spec(self, worker: Worker) -> WorkerSpec:
        return WorkerSpec(
            wid=worker.wid,
            pool=self.pool_address,
            relay=f"ipc://{self.relay_path}",
            relay_id=worker.relay_id.decode(),
            workdir=str(worker.workdir),
            uid=worker.uid,
            gid=worker.uid,
            memory_mb=self.config.memory_mb,
            cpu_s=self.config.cpu_s,
            fsize_mb=self.config.fsize_mb,
            nproc=self.config.nproc,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            preimport=self.config.preimport,
            connect_timeout_s=min(5.0, self.config.open_timeout_s),
            netns=self.netns,
            max_batch=self.config.max_batch,
        )

    def _worker_command(self, worker: Worker) -> list[str]:
        return worker_command(
            self.config,
            self.spec(worker),
            bwrap=self.bwrap,
            bind_dirs=[str(self.ipc_dir)],
        )

    def _popen(self, worker: Worker) -> tuple[subprocess.Popen[bytes], int] | None:
        """In a thread: the worker's directory, cgroup and process. None: its uid has processes
        on this host (another pool?); the caller tries another."""
        if worker.uid is not None and self._uid_in_use(worker.uid):
            return None
        worker.workdir.mkdir(mode=0o700)
        if worker.uid is not None:
            os.chown(worker.workdir, worker.uid, worker.uid)
        cmd = self._command(worker)
        if self.cgroups is not None:
            cmd = in_cgroup(cmd, self.cgroups.make(worker.wid, self.config.nproc + 8))
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=worker_env(str(worker.workdir)),
            cwd=self.base,
            start_new_session=True,
            close_fds=True,
        )
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
            raise
        return proc, pidfd

    async def _launch(self, worker: Worker) -> None:
        try:
            launched = await self.background.blocking(self._popen, worker)
        except Exception as exc:  # the task boundary: OSError from mkdir/cgroup/exec, or a bug
            log.exception("starting worker %s failed", worker.wid)
            self._failed_early(f"cannot start a worker: {exc}")
            self._forget(worker, avoid_uid=False)
            return
        if launched is None:
            log.info("uid %s has processes on this host; skipping it", worker.uid)
            self._forget(worker, avoid_uid=True)
            return
        proc, pidfd = launched
        worker.proc = proc
        worker.pidfd = pidfd
        loop = asyncio.get_running_loop()
        loop.add_reader(pidfd, self._on_exit, worker)
        if proc.stderr is not None:
            fd = proc.stderr.fileno()
            os.set_blocking(fd, False)
            worker.stderr_fd = fd
            loop.add_reader(fd, self._on_stderr, worker)
        worker.launched.set()
        if worker.state is WorkerState.KILLED:  # discarded (the pool stopping) while being spawned
            self._signal(worker, was_starting=True)

    def _failed_early(self, why: str) -> None:
        """A worker died (or could not start) before it was ready: after a few in a row, back
        off, so that a broken setup does not spin."""
        self.failures += 1
        self.last_failure = why
        if self.failures >= 3:
            self.spawn_after = self.clock() + min(10.0, 0.25 * 2 ** min(self.failures, 6))

    def _forget(self, worker: Worker, *, avoid_uid: bool) -> None:
        """A worker that never got a process."""
        worker.state = WorkerState.EXITED
        worker.exit_reason = self.last_failure if not avoid_uid else "its uid was in use"
        self.workers.pop(worker.wid, None)
        if self.uids is not None and worker.uid is not None:
            self.uids.release(worker.uid, avoid=avoid_uid)
        with contextlib.suppress(OSError):
            worker.workdir.rmdir()
        worker.launched.set()
        worker.exited.set()
        self.events.worker_exited(worker, worker.exit_reason, unexpected=False)

    def _on_stderr(self, worker: Worker) -> bool:
        """Read what the worker wrote to stderr (its tail is kept for failure messages); False
        when nothing more is there for now."""
        fd = worker.stderr_fd
        if fd is None:
            return False
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._close_stderr(worker)
            return False
        worker.stderr_tail = (worker.stderr_tail + data)[-4096:]
        log.debug("worker %s stderr: %s", worker.wid, data.decode("utf-8", "replace").rstrip())
        return True

    def _close_stderr(self, worker: Worker) -> None:
        if worker.stderr_fd is not None:
            asyncio.get_running_loop().remove_reader(worker.stderr_fd)
            worker.stderr_fd = None
        if worker.proc is not None and worker.proc.stderr is not None:
            worker.proc.stderr.close()

    # ------------------------------------------------------------ ready, seen, claimed

    def ready(self, worker: Worker, pid: int) -> None:
        """The worker said READY with ``pid``, its pid in its own pid namespace."""
        if worker.state is not WorkerState.STARTING:
            return
        if self.bwrap is None:
            self._became_ready(worker, pid)
            return
        assert worker.proc is not None
        root = worker.proc.pid

        async def resolve() -> None:  # under bwrap the worker knows only its namespace's pid
            host_pid = await self.background.blocking(procs.host_pid_of, pid, root)
            if host_pid is None:
                self.kill(worker, "the worker was killed: its host pid could not be found")
            elif worker.state is WorkerState.STARTING:
                self._became_ready(worker, host_pid)

        self.background.spawn(resolve(), name=f"resolve {worker.wid}")

    def _became_ready(self, worker: Worker, pid: int) -> None:
        worker.child_pid = pid
        worker.state = WorkerState.WARM
        self.failures = 0
        self.stats.inc("workers_ready")
        log.debug(
            "worker %s ready (pid %d, %.0f ms)", worker.wid, pid, (self.clock() - worker.started) * 1000
        )
        self.events.worker_ready(worker)

    def seen(self, worker: Worker) -> None:
        """The worker sent something (a heartbeat or any message): it is alive."""
        worker.last_seen = self.clock()

    def claim(self, worker: Worker) -> None:
        """A warm worker now serves a session (busy CPU then counts as alive)."""
        assert worker.state is WorkerState.WARM, worker.state
        worker.state = WorkerState.SESSION

    # ------------------------------------------------------------ liveness

    def check(self) -> list[Silent]:
        """Kill workers not ready in time; return those silent past the heartbeat expiry (the
        owner decides what their sessions become, then kills them)."""
        now = self.clock()
        expiry = self.config.heartbeat_expiry_s
        silent_ones: list[Silent] = []
        for worker in list(self.workers.values()):
            if worker.state is WorkerState.STARTING:
                limit = self.config.open_timeout_s
                if now - worker.started > limit:
                    self.kill(worker, f"the worker was killed: not ready within {limit:g} s of its start")
                continue
            if worker.state not in (WorkerState.WARM, WorkerState.SESSION) or worker.child_pid is None:
                continue
            cpu = self._cpu_ticks(worker.child_pid)
            silent = now - worker.last_seen
            if silent <= expiry:
                worker.cpu_mark = cpu
                continue
            if (
                worker.state is WorkerState.SESSION
                and cpu is not None
                and worker.cpu_mark is not None
                and cpu > worker.cpu_mark
            ):
                worker.cpu_mark = cpu  # busy, not hung: a long C call holds the GIL
                continue
            self.stats.inc("workers_silent")
            silent_ones.append(Silent(worker, silent))
        return silent_ones

    # ------------------------------------------------------------ kill

    def kill(self, worker: Worker, reason: str) -> bool:
        """Discard a worker: tell the owner, then signal it. Cleanup follows its exit. False if
        it was discarded already."""
        if not worker.alive:
            return False
        worker.kill_reason = reason
        was_starting = worker.state is WorkerState.STARTING
        worker.state = WorkerState.KILLED
        self.stats.inc("workers_killed")
        self.events.worker_killed(worker, reason)
        self._signal(worker, was_starting)
        return True

    def _signal(self, worker: Worker, was_starting: bool) -> None:
        if worker.proc is None:
            return  # not launched yet: _launch signals it when Popen returns
        if worker.child_pid is not None and not was_starting:
            # The nanny sees its child die, kills and reaps the rest, and exits (then, under
            # bwrap, bubblewrap's init and bubblewrap itself): nothing is left unreaped.
            _signal(worker.child_pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.killpg(worker.child_pid, signal.SIGKILL)
        elif self.bwrap is not None:
            self.background.spawn(self._kill_unready_bwrap(worker), name=f"resolve kill {worker.wid}")
        else:
            _signal(worker.proc.pid, signal.SIGTERM)  # the nanny kills its child
        loop = asyncio.get_running_loop()
        worker.kill_timer = loop.call_later(self.config.kill_grace_s, self._force_kill, worker)

    async def _kill_unready_bwrap(self, worker: Worker) -> None:
        """Not ready yet under bwrap: kill the nanny, pid 1 of the namespace (the kernel then
        kills the rest), found as bubblewrap's child so that bubblewrap reaps it. Only signals
        with a handler reach a namespace's pid 1 from outside, and SIGKILL."""
        assert worker.proc is not None
        outer = worker.proc.pid
        table = await self.background.blocking(procs.process_table)
        for pid in [p for p, parent in table.items() if parent == outer] or [outer]:
            _signal(pid, signal.SIGKILL)

    def _force_kill(self, worker: Worker) -> None:
        if worker.exited.is_set() or worker.proc is None:
            return
        log.warning(
            "worker %s did not exit %.1f s after being killed; SIGKILL", worker.wid, self.config.kill_grace_s
        )
        _signal(worker.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(worker.proc.pid, signal.SIGKILL)

    # ------------------------------------------------------------ exit and cleanup

    def _on_exit(self, worker: Worker, *, force: bool = False) -> None:
        """The worker's process exited (its pidfd is readable): reap, account, clean up, tell."""
        if worker.state is WorkerState.EXITED:
            return
        loop = asyncio.get_running_loop()
        code: int | None = None
        if worker.pidfd is not None:
            loop.remove_reader(worker.pidfd)
            os.close(worker.pidfd)
            worker.pidfd = None
        if worker.proc is not None:
            if force:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = worker.proc.wait(timeout=0.5)
            else:
                code = worker.proc.wait()
        for _ in range(16):  # its last words may still be in the pipe (bounded: a grandchild
            if not self._on_stderr(worker):  # may hold the pipe open and keep writing)
                break
        self._close_stderr(worker)
        if worker.kill_timer is not None:
            worker.kill_timer.cancel()
        reason = describe_exit(code)
        worker.exit_reason = reason
        before = worker.state
        if before is WorkerState.STARTING:
            tail = worker.stderr_tail.decode("utf-8", "replace").strip().splitlines()[-5:]
            self._failed_early(f"{reason} before it was ready" + (f": {' | '.join(tail)}" if tail else ""))
            log.warning("worker %s: %s", worker.wid, self.last_failure)
        elif before is not WorkerState.KILLED:
            log.info("worker %s: %s", worker.wid, reason)
            self.stats.inc("workers_died")
        worker.state = WorkerState.EXITED
        self.background.spawn(
            self._cleanup(worker, force or code is None or code < 0), name=f"cleanup {worker.wid}"
        )
        self.events.worker_exited(worker, reason, unexpected=before is not WorkerState.KILLED)

    async def _cleanup(self, worker: Worker, sweep: bool) -> None:
        """Kill anything of the worker still running (its nanny normally has), remove its
        directory and cgroup, free its uid (never to be reused if something of it lingers)."""

        def work() -> bool:
            lingering = False
            if self.cgroups is not None:
                lingering = not self.cgroups.kill_and_remove(worker.wid)
            if worker.uid is not None:
                for _ in range(200 if sweep else 20):
                    pids = procs.pids_of_uid(worker.uid)
                    if not pids:
                        break
                    procs.kill_pids(pids)
                    time.sleep(0.005)  # in a thread: give the kernel a moment to tear them down
                lingering = lingering or bool(procs.pids_of_uid(worker.uid, include_zombies=True))
            shutil.rmtree(worker.workdir, ignore_errors=True)
            return lingering

        lingering = True
        try:
            lingering = await self.background.blocking(work)
        finally:
            if self.uids is not None and worker.uid is not None:
                self.uids.release(worker.uid, avoid=lingering)
            self.workers.pop(worker.wid, None)
            worker.exited.set()


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _make_dirs() -> Path:
    """The pool's private tree: ``ipc/`` (0700, the pool's sockets and the sub-call relay) and
    one 0700 directory per worker, owned by its uid."""
    base = Path(tempfile.mkdtemp(prefix="rlmq-sandbox-"))
    # Workers (other uids) traverse base to reach their own directory, nothing more.
    base.chmod(0o711)
    (base / "ipc").mkdir(mode=0o700)
    return base
