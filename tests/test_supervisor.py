"""The worker supervisor without sockets: real short-lived processes (``python -c``), an injected
clock and CPU reader for liveness, and the uid range and cgroups where this machine allows."""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import requires

import rlmq.sandbox
from rlmq.sandbox import isolation
from rlmq.sandbox.config import PoolConfig
from rlmq.sandbox.isolation import CGROUP_V1_PIDS, UidSlots
from rlmq.sandbox.supervisor import Silent, Supervisor, Worker, WorkerState, describe_exit

IS_ROOT = os.geteuid() == 0
SLEEPER = "import time\ntime.sleep(60)"


class Events:
    """Records what the supervisor tells its owner."""

    def __init__(self) -> None:
        self.ready: list[Worker] = []
        self.killed: list[tuple[Worker, str]] = []
        self.exited: list[tuple[Worker, str, bool]] = []

    def worker_ready(self, worker: Worker) -> None:
        self.ready.append(worker)

    def worker_killed(self, worker: Worker, reason: str) -> None:
        self.killed.append((worker, reason))

    def worker_exited(self, worker: Worker, reason: str, *, unexpected: bool) -> None:
        self.exited.append((worker, reason, unexpected))


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def python(code: str) -> Callable[[Worker], list[str]]:
    return lambda worker: [sys.executable, "-c", code]


def settings(**changes: Any) -> PoolConfig:
    values: dict[str, Any] = {"handler": "tcp://127.0.0.1:1", "uid_base": None, "kill_grace_s": 0.2}
    return PoolConfig(**(values | changes))


@asynccontextmanager
async def supervising(config: PoolConfig, **seams: Any) -> AsyncIterator[tuple[Supervisor, Events]]:
    supervisor = Supervisor(config, **seams)
    events = Events()
    supervisor.events = events
    await supervisor.start()
    try:
        yield supervisor, events
    finally:
        await supervisor.stop()
        await supervisor.close()
        assert supervisor.workers == {}
        assert supervisor.base is not None
        assert not supervisor.base.exists()


async def launched(worker: Worker) -> int:
    await asyncio.wait_for(worker.launched.wait(), 10)
    assert worker.proc is not None
    return worker.proc.pid


async def gone(worker: Worker) -> None:
    await asyncio.wait_for(worker.exited.wait(), 10)


def spawn(supervisor: Supervisor) -> Worker:
    worker = supervisor.spawn()
    assert worker is not None
    return worker


def test_the_supervisor_knows_no_zeromq() -> None:
    """supervisor.py and the sandbox modules it imports never import zmq themselves."""
    root = Path(rlmq.sandbox.__file__ or "").parent
    seen: set[str] = set()
    todo = ["supervisor"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                todo += [node.module] if node.module else [a.name for a in node.names]
                continue
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
            else:
                continue
            assert not [m for m in imported if m.split(".")[0] == "zmq"], f"{name}.py imports zmq"
    assert {"supervisor", "isolation", "procs", "spec", "config", "_tasks"} <= seen


# ---------------------------------------------------------------- exits


def test_exits_are_described() -> None:
    assert describe_exit(0) == "the worker exited with status 0"
    assert describe_exit(3) == "the worker exited with status 3"
    assert describe_exit(-9).startswith("the worker was killed by SIGKILL")
    assert describe_exit(128 + 9).startswith("the worker was killed by SIGKILL")  # as the nanny says it
    assert describe_exit(128 + signal.SIGSEGV) == "the worker was crashed (SIGSEGV)"
    assert describe_exit(-signal.SIGXCPU) == "the worker was stopped by its CPU time limit (SIGXCPU)"
    assert describe_exit(-signal.SIGUSR1) == "the worker was killed by SIGUSR1"
    assert describe_exit(None) == "the worker vanished"


async def test_an_exit_before_ready_is_seen_reaped_and_described() -> None:
    code = "import sys\nsys.stderr.write('cannot import things\\n')\nsys.exit(3)"
    async with supervising(settings(), command=python(code)) as (supervisor, events):
        worker = spawn(supervisor)
        assert worker.state is WorkerState.STARTING
        assert supervisor.starting == 1
        await gone(worker)
        assert worker.proc is not None
        assert worker.proc.returncode == 3  # reaped
        assert worker.exit_reason == "the worker exited with status 3"
        assert events.exited == [(worker, "the worker exited with status 3", True)]
        assert (
            supervisor.last_failure
            == "the worker exited with status 3 before it was ready: cannot import things"
        )
        assert supervisor.failures == 1
        assert not worker.workdir.exists()
        assert supervisor.workers == {}


async def test_a_death_after_ready_is_unexpected_and_counted() -> None:
    async with supervising(settings(), command=python("import os\nos.kill(os.getpid(), 11)")) as (
        sup,
        events,
    ):
        worker = spawn(sup)
        sup.ready(worker, await launched(worker))
        assert events.ready == [worker]
        assert sup.failures == 0
        await gone(worker)
        assert events.exited == [(worker, "the worker was crashed (SIGSEGV)", True)]
        assert sup.stats.counters["workers_died"] == 1
        assert sup.last_failure == ""  # not a start-up failure


async def test_repeated_early_deaths_back_off_spawning() -> None:
    clock = Clock()
    async with supervising(settings(), command=python("raise SystemExit(1)"), clock=clock) as (sup, _):
        for _ in range(3):
            await gone(spawn(sup))
        assert sup.failures == 3
        assert sup.spawn_delay() == 2.0  # 0.25 s x 2^3
        clock.advance(2.0)
        assert sup.spawn_delay() == 0.0


async def test_a_command_that_cannot_start_is_reported() -> None:
    command = python("")
    async with supervising(settings(), command=lambda w: ["/nonexistent/python", *command(w)[1:]]) as (
        sup,
        events,
    ):
        worker = spawn(sup)
        await gone(worker)
        assert worker.proc is None
        assert sup.last_failure.startswith("cannot start a worker: [Errno 2]")
        assert [(w, unexpected) for w, _, unexpected in events.exited] == [(worker, False)]


# ---------------------------------------------------------------- kill


async def test_a_hung_process_is_killed_and_reaped(tmp_path: Path) -> None:
    fifo = tmp_path / "deaf"
    os.mkfifo(fifo)
    # hung, as far as a polite kill goes: it ignores SIGTERM, then says so
    code = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(fifo)!r}, 'w').write('deaf')\ntime.sleep(60)"
    )
    async with supervising(settings(kill_grace_s=0.2), command=python(code)) as (sup, events):
        worker = spawn(sup)
        pid = await launched(worker)
        assert await asyncio.wait_for(asyncio.to_thread(fifo.read_text), 10) == "deaf"
        assert sup.kill(worker, "the worker was killed: testing")  # SIGTERM first: not ready yet
        assert not sup.kill(worker, "again")  # discarded once
        assert worker.state is WorkerState.KILLED
        assert events.killed == [(worker, "the worker was killed: testing")]
        await gone(worker)  # SIGKILL after kill_grace_s, then reaped
        assert worker.proc is not None
        assert worker.proc.returncode == -signal.SIGKILL
        assert events.exited == [(worker, describe_exit(-9), False)]  # asked for: not unexpected
        assert sup.stats.counters["workers_killed"] == 1
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_ready_worker_is_killed_at_its_code_running_process() -> None:
    # A long grace: only the direct SIGKILL to the ready worker's child can end it this soon.
    async with supervising(settings(kill_grace_s=60.0), command=python(SLEEPER)) as (sup, _):
        worker = spawn(sup)
        sup.ready(worker, await launched(worker))  # without a nanny, the child is the process
        assert worker.state is WorkerState.WARM
        sup.claim(worker)
        assert worker.state is WorkerState.SESSION
        sup.kill(worker, "the session was closed")
        await gone(worker)
        assert worker.exit_reason is not None
        assert "SIGKILL" in worker.exit_reason


async def test_stop_kills_every_worker() -> None:
    async with supervising(settings(), command=python(SLEEPER)) as (sup, events):
        workers = [spawn(sup) for _ in range(3)]
        pids = [await launched(w) for w in workers]
        await sup.stop()
        assert all(w.exited.is_set() for w in workers)
        assert {w for w, _ in events.killed} == set(workers)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


# ---------------------------------------------------------------- liveness


async def test_liveness_silent_is_lost_busy_cpu_is_kept() -> None:
    clock = Clock()
    cpu: dict[int, int] = {}
    config = settings(heartbeat_interval_s=1.0, heartbeat_liveness=3, open_timeout_s=30.0)
    async with supervising(config, command=python(SLEEPER), clock=clock, cpu_ticks=cpu.get) as (sup, _):
        warm, busy = spawn(sup), spawn(sup)
        for worker in (warm, busy):
            pid = await launched(worker)
            sup.ready(worker, pid)
            cpu[pid] = 100
        sup.claim(busy)
        clock.advance(2.0)
        assert sup.check() == []  # within interval x liveness = 3 s
        clock.advance(2.0)  # 4 s without a word from either
        cpu[warm.child_pid or 0] = cpu[busy.child_pid or 0] = 150
        # CPU time advancing keeps a worker in a session (a C call holding the GIL), not a warm one
        assert sup.check() == [Silent(warm, 4.0)]
        assert Silent(warm, 4.0).reason.startswith("the worker was killed: silent for 4.0 s")
        clock.advance(2.0)  # the busy one's CPU time stands still now: hung
        assert sup.check() == [Silent(warm, 6.0), Silent(busy, 6.0)]
        sup.seen(busy)
        sup.seen(warm)
        assert sup.check() == []
        assert sup.stats.counters["workers_silent"] == 3
        assert warm.alive  # check only reports; the owner decides and kills
        assert busy.alive


async def test_a_worker_not_ready_in_time_is_killed() -> None:
    clock = Clock()
    config = settings(open_timeout_s=5.0)
    async with supervising(config, command=python(SLEEPER), clock=clock) as (sup, events):
        worker = spawn(sup)
        await launched(worker)
        clock.advance(4.0)
        assert sup.check() == []
        assert worker.alive
        clock.advance(2.0)
        assert sup.check() == []
        assert events.killed == [(worker, "the worker was killed: not ready within 5 s of its start")]
        await gone(worker)


# ---------------------------------------------------------------- uids and cgroups


def test_uid_slots_never_hand_out_a_uid_in_use_or_avoided() -> None:
    slots = UidSlots(70000, 4)
    taken = {slots.take() for _ in range(4)}
    assert taken == {70000, 70001, 70002, 70003}
    assert slots.take() is None  # all in use
    slots.release(70001, avoid=True)  # something of it lingers
    slots.release(70002)
    assert slots.take() == 70002
    assert slots.take() is None  # 70001 is never handed out again


@requires(IS_ROOT, "root (workers' directories are chowned to their uid)")
async def test_spawn_skips_uids_with_processes_on_the_host() -> None:
    base = 70000
    busy = {base + 1}  # another pool's worker, say
    seams: dict[str, Any] = {
        "command": python(SLEEPER),
        "uids": UidSlots(base, 3),
        "uid_in_use": lambda uid: uid in busy,
    }
    async with supervising(settings(cgroup=False), **seams) as (sup, events):
        workers = [spawn(sup) for _ in range(3)]
        for worker in workers:
            await asyncio.wait_for(worker.launched.wait(), 10)
        skipped = [w for w in workers if w.proc is None]
        assert [w.uid for w in skipped] == [base + 1]
        assert [(w, r) for w, r, _ in events.exited] == [(skipped[0], "its uid was in use")]
        live = [w for w in workers if w.proc is not None]
        assert sorted(w.uid or 0 for w in live) == [base, base + 2]
        assert all(os.stat(w.workdir).st_uid == w.uid for w in live)
        assert sup.spawn() is None  # two in use, one avoided: none free
        assert sup.last_failure == "no free uid in the uid range"
        busy.clear()  # avoided for good, even once it is free again
        sup.kill(live[0], "done")
        await gone(live[0])
        again = spawn(sup)
        assert again.uid == live[0].uid
        assert sup.spawn() is None


@requires(IS_ROOT and (CGROUP_V1_PIDS / "cgroup.procs").exists(), "root and the cgroup v1 pids controller")
async def test_each_worker_gets_a_pids_cgroup_removed_after_it(tmp_path: Path) -> None:
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    code = f"open({str(fifo)!r}, 'w').write('in')\nimport time\ntime.sleep(60)"
    seams: dict[str, Any] = {
        "command": python(code),
        "uids": UidSlots(70100, 2),
        "uid_in_use": lambda uid: False,
    }
    async with supervising(settings(cgroup=True, nproc=32), **seams) as (sup, _):
        assert sup.cgroups is not None
        worker = spawn(sup)
        pid = await launched(worker)
        assert await asyncio.wait_for(asyncio.to_thread(fifo.read_text), 10) == "in"  # it runs
        group = sup.cgroups.root / worker.wid
        assert pid in sup.cgroups.pids(worker.wid)
        assert (group / "pids.max").read_text().strip() == "40"  # nproc + 8 of our own
        sup.kill(worker, "done")
        await gone(worker)
        assert not group.exists()
        root = sup.cgroups.root
    assert not root.exists()


# ---------------------------------------------------------------- network namespaces


@pytest.mark.parametrize(
    ("network", "bwrap", "allowed", "mode", "says"),
    [
        (True, None, {"net", "user"}, "", "network = true"),  # asked for: the network stays
        (False, "/usr/bin/bwrap", set(), "", None),  # bubblewrap makes its own namespace
        (False, None, {"net", "user"}, "net" if IS_ROOT else "user", None),
        (False, None, set(), "", "no network namespace for workers"),  # the kernel allows neither
    ],
)
def test_network_mode_is_probed_and_a_missing_namespace_is_said(
    monkeypatch: pytest.MonkeyPatch,
    network: bool,
    bwrap: str | None,
    allowed: set[str],
    mode: str,
    says: str | None,
) -> None:
    monkeypatch.setattr(isolation, "_can_unshare", lambda python, kind: kind in allowed)
    got, notice = isolation.network_mode(settings(network=network), bwrap=bwrap)
    assert got == mode
    if says is None:
        assert notice is None
    else:
        assert notice is not None
        assert says in notice
        assert "\n" not in notice  # one line


async def test_the_supervisor_says_once_at_start_when_workers_keep_the_network(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(isolation, "_can_unshare", lambda python, kind: False)
    async with supervising(settings()) as (supervisor, _):
        assert supervisor.netns == ""
        assert supervisor.spec(spawn(supervisor)).netns == ""
    lines = [r.getMessage() for r in caplog.records if "network namespace" in r.getMessage()]
    assert len(lines) == 1
    assert "docs/security.md" in lines[0]


@requires(IS_ROOT, "root (the pool unshares the network namespace itself)")
def test_this_machine_gives_workers_a_network_namespace() -> None:
    assert isolation.network_mode(settings(), bwrap=None) == ("net", None)
