"""`rlmq up --handlers N`: N handlers beside one state, a pool given all their addresses, and
nothing left running after SIGINT or SIGTERM. Several handlers share a real redis-server: a
private one `up` starts, or the config's [state] url."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq.asyncio
from conftest import requires

from rlmq.orchestrator.errors import ServiceError
from rlmq.orchestrator.local import _config_with_state, handler_binds, local_services, state_url_of
from rlmq.protocol import AsyncHandlerClient, CompleteReply, CompleteRequest, RunLimits, as_messages

HAVE_REDIS = shutil.which("redis-server") is not None
needs_redis = requires(HAVE_REDIS, "redis-server (Debian: apt-get install redis-server)")
WAIT_S = 60.0  # every wait on a child process is bounded by this

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


def _cmdlines() -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


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


def test_the_handlers_config_gains_the_state_url_beside_the_original(tmp_path: Path) -> None:
    url = "redis://127.0.0.1:6390/0"
    plain = _config(tmp_path)
    derived = _config_with_state(plain, url)
    assert derived.parent == plain.parent  # relative paths (script.json) still resolve
    assert state_url_of(derived) == url
    assert state_url_of(plain) is None
    with_table = tmp_path / "with-table.toml"
    with_table.write_text('[models.sub]\nbackend = "echo"\n\n[state]  # shared\nkey_prefix = "x"\n')
    assert state_url_of(_config_with_state(with_table, url)) == url
    odd = tmp_path / "odd.toml"
    # An inline table cannot gain a key.
    odd.write_text('state = { key_prefix = "x" }\n[models.sub]\nbackend = "echo"\n')
    with pytest.raises(ServiceError, match=r"set \[state\] url .* yourself"):
        _config_with_state(odd, url)


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
    """`rlmq up ARGS` until its summary line; SIGKILLed at the end if the test left it running."""
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
        if process.poll() is None:
            process.kill()
            process.wait(WAIT_S)
        if process.stdout is not None:
            process.stdout.close()
        stderr.close()


def _stop_and_check_clean(up: Up, sig: signal.Signals, needles: list[str]) -> None:
    pids = [pid for pid, cmd in _cmdlines().items() if any(n in cmd for n in needles)]
    assert pids
    up.process.send_signal(sig)
    assert up.process.wait(WAIT_S) == 0
    left = [pid for pid in pids if _alive(pid)]
    assert not left, f"left running after {sig.name}: {[_cmdlines().get(p) for p in left]}"


@needs_redis
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
        port = up.state_url.removeprefix("redis://127.0.0.1:").split("/")[0]

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

        _stop_and_check_clean(up, sig, [str(tmp_path), f"127.0.0.1:{port}"])
    assert not list(tmp_path.glob(".rlmq-up-*.toml"))  # the handlers' config is gone too
    assert "stopping" in (tmp_path / "up.err").read_text()


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


def test_up_help_explains_handlers() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rlmq", "up", "--help"], capture_output=True, text=True, timeout=WAIT_S
    )
    assert done.returncode == 0
    assert "--handlers N" in done.stdout
    assert "redis-server" in done.stdout
    assert "[state] url" in " ".join(done.stdout.split())
