"""`rlmq up --handlers N`: N handlers beside one state, a pool given all their addresses, and
nothing left running after SIGINT, SIGTERM or even SIGKILL. Several handlers share a real
redis-server: a private one `up` starts (handed to them as RLMQ_STATE_URL), or the config's
[state] url."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq.asyncio
from conftest import requires
from proctree import Procs, cmdline, descendants, kill, kill_tree, wait_gone

from rlmq.orchestrator.errors import ServiceError
from rlmq.orchestrator.local import handler_binds, local_services, state_url_of
from rlmq.protocol import AsyncHandlerClient, CompleteReply, CompleteRequest, RunLimits, as_messages

HAVE_REDIS = shutil.which("redis-server") is not None
needs_redis = requires(HAVE_REDIS, "redis-server (Debian: apt-get install redis-server)")
WAIT_S = 60.0  # every wait on a child process is bounded by this
# Tests with processes: room for a few inner waits, so that they, not pytest-timeout, report a
# hang (the fixture's cleanup runs either way).
PROCESS_TEST_TIMEOUT_S = 5 * WAIT_S

# The root model counts the lines mentioning "needle", one echo sub-call per hit (as tests/test_e2e.py).
SCRIPT = [
    "```repl\nlines = context.splitlines()\nprint(len(lines))\n```",
    "```repl\nhits = [l for l in lines if 'needle' in l]\n"
    "echoed = llm_query_batched(['count: ' + h for h in hits])\n"
    "answer = f'{len(echoed)} needles'\nprint(answer)\n```",
    "FINAL_VAR(answer)",
]
NEEDLES = 7


def _config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "script.json").write_text(json.dumps(SCRIPT))
    config = tmp_path / "rlmq.toml"
    # A relative path on purpose: the handlers' config keeps resolving it beside the original.
    config.write_text(
        '[models.root]\nbackend = "script"\npath = "script.json"\n\n'
        '[models.sub]\nbackend = "echo"\n\n[sandbox]\nworkers = 1\n' + extra
    )
    return config


def _wait_for_tree(root: int, *, workers: int) -> Procs:
    """Everything ``root`` started, once its pool's workers are among them. A bounded poll: the
    pool announces itself before its workers are up, and nothing else says when they are."""
    deadline = time.monotonic() + WAIT_S
    while True:
        tree = descendants(root)
        if sum("rlmq.sandbox.worker" in cmdline(pid) for pid in tree) >= workers:
            return tree
        assert time.monotonic() < deadline, f"no {workers} worker(s) below {root}: {_names(tree)}"
        time.sleep(0.05)


def _names(procs: Procs) -> list[str]:
    return [cmdline(pid)[:120] for pid in procs]


def _environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


# ------------------------------------------------------------------ addresses and config, no processes


def test_handler_binds_one_per_handler(tmp_path: Path) -> None:
    assert handler_binds([], 1, directory=tmp_path) == [f"ipc://{tmp_path}/handler.sock"]  # as always
    assert handler_binds([], 2, directory=tmp_path) == [
        f"ipc://{tmp_path}/handler-1.sock",
        f"ipc://{tmp_path}/handler-2.sock",
    ]
    # tcp: the next ports, skipping the pool's; port 0: a random port for each.
    assert handler_binds(["tcp://127.0.0.1:5555"], 3, directory=tmp_path, taken=["tcp://127.0.0.1:5556"]) == [
        "tcp://127.0.0.1:5555",
        "tcp://127.0.0.1:5557",
        "tcp://127.0.0.1:5558",
    ]
    assert handler_binds(["tcp://127.0.0.1:0"], 2, directory=tmp_path) == ["tcp://127.0.0.1:0"] * 2
    assert handler_binds(["ipc:///x/h.sock"], 2, directory=tmp_path) == [
        "ipc:///x/h.sock",
        "ipc:///x/h-2.sock",
    ]
    assert handler_binds(["ipc:///a", "ipc:///b"], 2, directory=tmp_path) == ["ipc:///a", "ipc:///b"]


def test_the_state_url_is_rlmq_state_url_else_the_configs(tmp_path: Path) -> None:
    plain = _config(tmp_path)
    assert state_url_of(plain, {}) is None
    assert state_url_of(plain, {"RLMQ_STATE_URL": "redis://h:1/0"}) == "redis://h:1/0"
    with_url = _config(tmp_path, '\n[state]\nurl = "redis://db:6379/0"\n')
    assert state_url_of(with_url, {}) == "redis://db:6379/0"
    assert state_url_of(with_url, {"RLMQ_STATE_URL": ""}) == "redis://db:6379/0"  # empty: unset
    assert state_url_of(with_url, {"RLMQ_STATE_URL": "redis://h:1/0"}) == "redis://h:1/0"


async def test_several_handlers_without_redis_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ServiceError, match=r"set \[state\] url .* or install redis-server"):
        async with local_services(_config(tmp_path), handlers=2, directory=tmp_path / "run"):
            pass
    assert not list((tmp_path / "run").glob("*.sock"))  # nothing was started


# ------------------------------------------------------------------ real processes


@dataclass
class Up:
    process: subprocess.Popen[str]
    handlers: list[str]
    front: str
    sandbox: str
    state_url: str
    lines: list[str]


@contextmanager
def rlmq_up(tmp_path: Path, *args: str) -> Iterator[Up]:
    """`rlmq up ARGS` until its summary line. At the end, even when the test failed or timed
    out, `up` and every process below it are SIGKILLed: nothing is left running."""
    stderr = (tmp_path / "up.err").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "rlmq", "up", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        # readline returns at EOF too (up died): the assertion below then shows its stderr.
        while not (lines and lines[-1].startswith("rlmq up: handler on ")):
            line = process.stdout.readline()
            assert line, f"rlmq up exited: {(tmp_path / 'up.err').read_text()}"
            lines.append(line.strip())
        handlers = [
            line.split()[-1] for line in lines if line.startswith("rlmq up: handler ") and " on " in line
        ]
        summary = lines[-1].removeprefix("rlmq up: handler on ")
        front, _, sandbox = summary.partition(", sandbox on ")
        state = [line.split()[5] for line in lines if line.startswith("rlmq up: shared state on ")]
        yield Up(process, handlers[:-1], front, sandbox, state[0] if state else "", lines)
    finally:
        left = kill_tree(process.pid) if process.poll() is None else {}
        process.wait(WAIT_S)
        if process.stdout is not None:
            process.stdout.close()
        stderr.close()
        assert not left, f"still running after SIGKILL: {_names(left)}"


def _stop_and_check_clean(up: Up, sig: signal.Signals) -> None:
    started = descendants(up.process.pid)
    assert started
    up.process.send_signal(sig)
    assert up.process.wait(WAIT_S) == 0
    left = wait_gone(started, WAIT_S)  # up waited for its children, not for their children
    names = _names(left)
    kill(left)
    assert not left, f"left running after {sig.name}: {names}"


@needs_redis
@pytest.mark.timeout(PROCESS_TEST_TIMEOUT_S)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_up_with_two_handlers_and_a_private_redis(
    tmp_path: Path, sig: signal.Signals, actx: zmq.asyncio.Context
) -> None:
    config = _config(tmp_path)
    binds = ["--handler-bind", f"ipc://{tmp_path}/h.sock", "--sandbox-bind", f"ipc://{tmp_path}/s.sock"]
    with rlmq_up(tmp_path, "--config", str(config), "--handlers", "2", *binds) as up:
        assert up.handlers == [f"ipc://{tmp_path}/h.sock", f"ipc://{tmp_path}/h-2.sock"]
        assert up.front == ",".join(up.handlers)
        assert up.state_url.startswith("redis://127.0.0.1:")
        assert "(a private redis-server, stopped with the rest)" in up.lines[-2]

        # One state: a run opened on the first handler is served and counted on the second.
        one, two = up.handlers
        async with (
            AsyncHandlerClient(one, context=actx, timeout_s=20) as first,
            AsyncHandlerClient(two, context=actx, timeout_s=20) as second,
        ):
            key = "k" * 32
            await first.run_open("r-shared", RunLimits(max_calls=10), key=key)
            # The second client did not open the run: it shows the key as a pool's relay would.
            on_two = CompleteRequest(second.new_id(), "sub", as_messages("on two"), run="r-shared", key=key)
            reply = await second.request(on_two)
            assert isinstance(reply, CompleteReply)
            assert reply.text == "on two"
            assert (await first.complete("on one", model="sub", run="r-shared")).text == "on one"
            assert (await second.usage("r-shared")).calls == 2
            await first.run_close("r-shared")

        # A whole run through the front: the orchestrator and the pool spread over both handlers.
        context = tmp_path / "doc.txt"
        lines = [f"line {i} hay" for i in range(500)]
        for i in range(NEEDLES):
            lines[i * 37 + 5] = f"line {i} has a needle"
        context.write_text("\n".join(lines))
        command = [sys.executable, "-m", "rlmq", "run", "--config", str(config), "--handler", up.front]
        command += [
            "--sandbox",
            up.sandbox,
            "--query",
            "How many needles?",
            "--context",
            str(context),
            "--json",
        ]
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["answer"] == f"{NEEDLES} needles"
        assert out["usage"]["calls"] == 3 + NEEDLES  # whole: every call counted, wherever it went
        served = []
        for address in up.handlers:
            async with AsyncHandlerClient(address, context=actx, timeout_s=20) as client:
                stats = await client.stats()
            served.append(stats["by_op"].get("complete", 0))
        assert sum(served) == 2 + 3 + NEEDLES, served
        assert all(served), f"a handler served no call: {served}"

        _stop_and_check_clean(up, sig)
    assert sorted(p.name for p in tmp_path.glob("*.toml")) == ["rlmq.toml"]  # up wrote no config
    assert "stopping" in (tmp_path / "up.err").read_text()


@needs_redis
@pytest.mark.timeout(PROCESS_TEST_TIMEOUT_S)
def test_sigkill_of_up_leaves_none_of_its_services_running(tmp_path: Path) -> None:
    config = _config(tmp_path)
    binds = ["--handler-bind", f"ipc://{tmp_path}/h.sock", "--sandbox-bind", f"ipc://{tmp_path}/s.sock"]
    with rlmq_up(tmp_path, "--config", str(config), "--handlers", "2", *binds) as up:
        started = _wait_for_tree(up.process.pid, workers=1)
        names = _names(started)
        handlers = [pid for pid in started if " -m rlmq handler " in cmdline(pid)]
        (pool,) = [pid for pid in started if " -m rlmq sandbox " in cmdline(pid)]
        assert len(handlers) == 2, names
        assert any("redis-server" in name for name in names), names
        # The private Redis reaches the handlers through their environment; the pool never sees it.
        assert all(_environ(pid).get("RLMQ_STATE_URL") == up.state_url for pid in handlers)
        assert "RLMQ_STATE_URL" not in _environ(pool)

        up.process.kill()  # no chance to stop anything: the kernel has to
        assert up.process.wait(WAIT_S) == -signal.SIGKILL
        left = wait_gone(started, WAIT_S)
        names = _names(left)
        kill(left)  # a failure leaves nothing behind either
        assert not left, f"left running after SIGKILL: {names}"
    assert sorted(p.name for p in tmp_path.glob("*.toml")) == ["rlmq.toml"]  # up wrote no config


@asynccontextmanager
async def redis_server(directory: Path) -> AsyncIterator[str]:
    """A redis-server of the test's own on a random loopback port, persistence off: its URL."""
    from rlmq.orchestrator.local import _start_redis, _stop

    child, url = await _start_redis(directory)
    try:
        yield url
    finally:
        await _stop(child)


@needs_redis
@pytest.mark.timeout(PROCESS_TEST_TIMEOUT_S)
async def test_the_configs_state_url_is_used_and_one_handler_is_as_before(tmp_path: Path) -> None:
    async with redis_server(tmp_path) as url:
        config = _config(tmp_path, f'\n[state]\nurl = "{url}"\n')
        async with local_services(config, handlers=2, workers=1) as services:
            assert services.state_url == url
            assert not services.private_redis
            assert not list(services.directory.glob("redis.log"))
            assert services.handler == ",".join(services.handlers)
    async with local_services(_config(tmp_path), workers=1) as one:
        assert one.handlers == (one.handler,)
        assert one.handler == f"ipc://{one.directory}/handler.sock"
        assert one.state_url is None


@pytest.mark.timeout(PROCESS_TEST_TIMEOUT_S)
def test_up_help_explains_handlers() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rlmq", "up", "--help"], capture_output=True, text=True, timeout=WAIT_S
    )
    assert done.returncode == 0
    assert "--handlers N" in done.stdout
    assert "redis-server" in done.stdout
    assert "[state] url" in " ".join(done.stdout.split())
