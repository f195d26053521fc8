"""Hostile code in real worker processes. Each test ends with the pool still serving new sessions.

Run as root (this machine, CI) the workers drop to their own uid and get a pids cgroup; the
tests that need that, or bubblewrap, say so with ``requires`` (a skip that fails under CI).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq.asyncio
from conftest import requires

from rlmq.lmhandler.backends import Backend, BackendRequest, Completion
from rlmq.lmhandler.server import Handler
from rlmq.lmhandler.testing import echo_model, running_handler
from rlmq.protocol import RunLimits, Usage
from rlmq.protocol.sandbox import AsyncSandboxClient, ExecResult, Session
from rlmq.sandbox import Pool, procs
from rlmq.sandbox.isolation import CGROUP_V1_PIDS
from rlmq.sandbox.testing import running_pool

ROOT_ONLY = requires(os.geteuid() == 0, "root (uid drop and cgroups need the pool to run as root)")
NEEDS_BWRAP = requires(shutil.which("bwrap") is not None, "bubblewrap (bwrap)")


class SignallingEcho(Backend):
    """Echo that tells the test when a prompt arrived: the code has reached that line."""

    def __init__(self) -> None:
        self.arrived: asyncio.Queue[str] = asyncio.Queue()

    async def complete(self, request: BackendRequest) -> Completion:
        text = request.messages[-1].content
        self.arrived.put_nowait(text)
        return Completion(text, "echo", Usage(1, 1), "end_turn")


@pytest.fixture
def signalling() -> SignallingEcho:
    return SignallingEcho()


# The runs of this file's sessions that make sub-calls: a handler serves only runs it holds.
RUNS = ("r-outside", "r-bwrap", "r-bwrap-other")


def open_runs(handler: Handler) -> None:
    for run in RUNS:
        handler.runs.open_run(run, RunLimits())


@pytest.fixture
async def handler(signalling: SignallingEcho) -> AsyncIterator[Handler]:
    async with running_handler({"sub": echo_model()}, backends={"sub": signalling}) as h:
        open_runs(h)
        yield h


@pytest.fixture
async def pool(handler: Handler) -> AsyncIterator[Pool]:
    async with running_pool(handler.address or "", exec_timeout_s=20.0) as p:
        yield p


@pytest.fixture
async def client(pool: Pool, actx: zmq.asyncio.Context) -> AsyncIterator[AsyncSandboxClient]:
    async with AsyncSandboxClient(pool.address or "", context=actx) as c:
        yield c


async def exited(pid: int) -> None:
    """Wait until ``pid`` has exited (a pidfd: works for processes that are not our children)."""
    fd = os.pidfd_open(pid)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(done, 10)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def pids_cgroup_of(pid: int) -> Path | None:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "pids" and path != "/":
            return CGROUP_V1_PIDS / path.lstrip("/")
    return None


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


async def still_serves(client: AsyncSandboxClient, session: Session | None = None) -> None:
    """The pool opens and runs a new session (and ``session`` still runs code, context intact)."""
    fresh = await client.open(run="r-after", context="fresh")
    result = await fresh.exec("len(context)")
    assert (result.error, result.stdout) == (None, "5\n")
    await fresh.close()
    if session is not None:
        result = await session.exec("len(context)")
        assert result.error is None, result.error
        assert result.stdout == f"{session.info.context_length}\n"


async def test_infinite_loop_times_out_and_the_session_continues(client: AsyncSandboxClient) -> None:
    session = await client.open(run="r-loop", context="kept context")
    await session.exec("x = 1")
    old_pid = session.info.worker_pid
    # the typed result says the exec deadline stopped it; how soon is not asserted here
    result = await session.exec("while True:\n    pass", timeout_s=1.0)
    assert result.error is not None
    assert result.error.code == "timeout"
    assert "killed after 1 s" in result.error.message
    assert "variables are lost" in result.error.message
    assert result.state_lost
    after = await session.exec("context")
    assert (after.error, after.stdout, after.state_lost) == (None, "'kept context'\n", False)
    assert session.info.worker_pid != old_pid  # a fresh worker, told to the client
    lost = await session.exec("x")
    assert lost.error is not None
    assert lost.error.type == "NameError"
    await still_serves(client, session)
    await session.close()


async def test_allocating_10_gb_is_a_memory_error(client: AsyncSandboxClient) -> None:
    session = await client.open(run="r-mem", context="abc")
    await session.exec("keep = 'me'")
    result = await session.exec("x = bytearray(10 * 1024**3)")
    assert result.error is not None
    assert (result.error.code, result.error.type) == ("memory", "MemoryError")
    assert "memory limit" in result.error.message
    assert not result.state_lost
    survived = await session.exec("keep")
    assert survived.stdout == "'me'\n"
    await still_serves(client, session)
    await session.close()


@ROOT_ONLY
@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    os.fork()",
        # every process spins once it cannot fork any more: only a kill stops them
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    ],
    ids=["plain", "spinning"],
)
async def test_fork_bomb_is_contained_and_leaves_nothing(
    client: AsyncSandboxClient, pool: Pool, bomb: str
) -> None:
    session = await client.open(run="r-fork", context="abc")
    uid = uid_of(session.info.worker_pid)
    assert uid != 0
    group = pids_cgroup_of(session.info.worker_pid)
    assert (group is not None) == pool.snapshot()["cgroup"]
    result = await session.exec(bomb, timeout_s=3.0)
    assert result.error is not None
    assert result.error.code in ("timeout", "exception"), result.error
    await session.close()
    await pool.wait_cleaned()
    assert procs.pids_of_uid(uid, include_zombies=True) == [], "processes of the fork bomb survived"
    if group is not None:
        assert not group.exists(), "the worker's cgroup was not removed"
    await still_serves(client)


async def test_writing_a_1_gb_file_is_stopped_by_the_file_size_limit(client: AsyncSandboxClient) -> None:
    session = await client.open(run="r-file", context="abc")
    code = "f = open('big.bin', 'wb')\nchunk = b'x' * 1024**2\nfor _ in range(1024):\n    f.write(chunk)"
    result = await session.exec(code)
    assert result.error is not None
    assert (result.error.code, result.error.type) == ("exception", "OSError")
    assert "File too large" in result.error.message
    size = await session.exec("import os\nf.close()\nos.path.getsize('big.bin') // 1024**2")
    assert size.stdout == "256\n"  # fsize_mb
    await still_serves(client, session)
    await session.close()


async def test_the_environment_is_scrubbed(
    handler: Handler, actx: zmq.asyncio.Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-very-secret")
    monkeypatch.setenv("RLMQ_TEST_TOKEN", "token-very-secret")
    async with (
        running_pool(handler.address or "", workers=1) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        session = await client.open(run="r-env")
        code = "import os\nenv = dict(os.environ)\nprint(sorted(env))\nprint(os.getcwd() == env['HOME'])"
        result = await session.exec(code)
        assert result.error is None, result.error
        names = eval(result.stdout.splitlines()[0])
        assert set(names) <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONPATH", "PYTHONNOUSERSITE"}
        assert not [n for n in names if any(w in n for w in ("KEY", "TOKEN", "SECRET", "PASSWORD"))]
        assert result.stdout.splitlines()[-1] == "True"  # working directory: the private home
        # what the process was started with, read from outside (root may)
        started_with = Path(f"/proc/{session.info.worker_pid}/environ").read_bytes()
        assert b"very-secret" not in started_with
        assert b"ANTHROPIC" not in started_with
        await still_serves(client)
        await session.close()


@ROOT_ONLY
async def test_killing_the_parent_or_a_neighbour_is_refused(client: AsyncSandboxClient, pool: Pool) -> None:
    session = await client.open(run="r-kill", context="abc")
    neighbour = await client.open(run="r-kill", context="neighbour")
    result = await session.exec("import os\nos.kill(os.getppid(), 9)")
    assert result.error is not None
    assert result.error.type == "PermissionError"
    result = await session.exec(f"os.kill({neighbour.info.worker_pid}, 9)")
    assert result.error is not None
    assert result.error.type == "PermissionError"
    result = await session.exec("os.kill(1, 9)")
    assert result.error is not None
    assert result.error.type == "PermissionError"
    result = await session.exec("open('/root/.profile')")
    assert result.error is not None
    assert result.error.type in ("PermissionError", "FileNotFoundError")
    assert (await client.ping())["server"] == "rlmq-sandbox"
    await still_serves(client, session)
    await still_serves(client, neighbour)
    await session.close()
    await neighbour.close()


async def test_a_worker_killed_from_outside_mid_exec(
    client: AsyncSandboxClient, signalling: SignallingEcho
) -> None:
    session = await client.open(run="r-outside", context="reloaded")
    running = asyncio.ensure_future(session.exec("llm_query('sleeping now')\nimport time\ntime.sleep(30)"))
    assert await asyncio.wait_for(signalling.arrived.get(), 10) == "sleeping now"
    killed = session.info.worker_pid
    os.kill(killed, 9)
    # Noticed as a death (its pidfd), not by the exec deadline (20 s, code "timeout").
    result: ExecResult = await asyncio.wait_for(running, 10)
    assert result.error is not None
    assert result.error.code == "worker_died"
    assert "SIGKILL" in result.error.message
    assert result.state_lost
    after = await session.exec("context")
    assert (after.error, after.stdout) == (None, "'reloaded'\n")
    assert session.info.worker_pid != killed
    await still_serves(client, session)
    await session.close()


async def test_a_worker_that_dies_between_execs_reports_lost_state(
    client: AsyncSandboxClient, pool: Pool
) -> None:
    session = await client.open(run="r-between", context="abc")
    await session.exec("x = 1")
    nanny = parent_of(session.info.worker_pid)  # the pool's own child; it exits after the worker
    os.kill(session.info.worker_pid, 9)
    await exited(nanny)
    await pool.wait_cleaned()
    result = await session.exec("len(context)")
    assert result.error is None
    assert result.stdout == "3\n"
    assert result.state_lost
    assert "variables were lost" in result.stderr
    await session.close()


# ---------------------------------------------------------------- bubblewrap


@NEEDS_BWRAP
async def test_bwrap_isolation(
    handler: Handler, signalling: SignallingEcho, actx: zmq.asyncio.Context
) -> None:
    port = (handler.address or "").rsplit(":", 1)[1]
    async with (
        running_pool(handler.address or "", isolation="bwrap", workers=2) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        first = await client.open(run="r-bwrap", context="in a box")
        second = await client.open(run="r-bwrap", context="another box")
        code = (
            "import os, socket\n"
            "print(llm_query('through the proxy'))\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('network: open')\n"
            "except OSError:\n"
            "    print('network: closed')\n"
            "try:\n"
            "    open('/etc/rlmq-test', 'w')\n"
            "    print('root fs: writable')\n"
            "except OSError as e:\n"
            "    print('root fs:', e.strerror)\n"
            "open('/tmp/mine', 'w').write('private')\n"
            "print(sorted(os.listdir('/tmp')))\n"
        )
        result = await first.exec(code)
        assert result.error is None, result.error
        lines = result.stdout.splitlines()
        assert lines[0] == "through the proxy"
        assert lines[1] == "network: closed"
        assert lines[2] == "root fs: Read-only file system"
        assert "mine" in lines[3]
        assert await signalling.arrived.get() == "through the proxy"
        other = await second.exec("import os\nos.path.exists('/tmp/mine')")
        assert other.stdout == "False\n"  # each worker has its own /tmp
        assert not Path("/tmp/mine").exists()
        # the host pid is reported, and killing it mid-exec is noticed
        running = asyncio.ensure_future(first.exec("llm_query('in the box')\nimport time\ntime.sleep(30)"))
        assert await asyncio.wait_for(signalling.arrived.get(), 10) == "in the box"
        os.kill(first.info.worker_pid, 9)
        result = await asyncio.wait_for(running, 10)
        assert result.error is not None
        assert result.error.code == "worker_died"
        assert result.state_lost
        result = await first.exec("context")
        assert result.stdout == "'in a box'\n"
        bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
        result = await second.exec(bomb, timeout_s=2.0)
        assert result.error is not None
        assert result.error.code == "timeout"
        await first.close()
        await second.close()
        await pool.wait_cleaned()
        await still_serves(client)


@NEEDS_BWRAP
async def test_bwrap_session_with_its_own_tcp_handler(handler: Handler, actx: zmq.asyncio.Context) -> None:
    async with (
        running_handler({"sub": echo_model()}) as other,
        running_pool(handler.address or "", isolation="bwrap", workers=1) as pool,
        AsyncSandboxClient(pool.address or "", context=actx) as client,
    ):
        open_runs(other)
        session = await client.open(run="r-bwrap-other", handler=other.address)
        result = await session.exec("llm_query('proxied elsewhere')")
        assert (result.error, result.stdout) == (None, "'proxied elsewhere'\n")
        await session.close()
