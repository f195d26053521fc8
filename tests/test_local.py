"""The private services that `rlmq run`, `rlmq demo`, `rlmq eval` and `RLM.from_config` start:
they serve only the runs their orchestrator opens, and the pool never holds a provider's key."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq.asyncio
from proctree import cmdline, descendants, kill, kill_tree, wait_gone

from rlmq.orchestrator.errors import NoServices
from rlmq.orchestrator.local import local_services, services_or_private
from rlmq.protocol import AsyncHandlerClient, ErrorCode, RemoteError, RunLimits

WAIT_S = 60.0  # every wait on a child process is bounded by this


def _processes_running(needle: str) -> list[int]:
    """The pids whose command line contains ``needle``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids


async def test_private_services_refuse_calls_without_a_run_and_keep_keys_from_the_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, actx: zmq.asyncio.Context
) -> None:
    monkeypatch.setenv("RLMQ_TEST_PROVIDER_KEY", "sk-not-for-the-pool")
    monkeypatch.setenv("SOME_PROVIDER_API_KEY", "sk-also-not-for-the-pool")
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.sub]\nbackend = "echo"\n')
    async with (
        local_services(config, workers=1) as services,
        AsyncHandlerClient(services.handler, context=actx, timeout_s=10) as client,
    ):
        # Code that finds the handler's socket cannot spend outside a run...
        with pytest.raises(RemoteError) as refused:
            await client.complete("spend", model="sub")
        assert refused.value.code == ErrorCode.UNAUTHORIZED
        # ...nor open a run nobody else could be kept out of...
        with pytest.raises(RemoteError) as keyless:
            await client.run_open("r-anyone", RunLimits(max_calls=2))
        assert keyless.value.code == ErrorCode.UNAUTHORIZED
        # ...while the orchestrator's own runs, opened with a key, are served.
        await client.run_open("r-local", RunLimits(max_calls=2), key="k" * 32)
        assert (await client.complete("ok", model="sub", run="r-local")).text == "ok"
        (pool_pid,) = _processes_running(f"sandbox --handler {services.handler}")
        environ = Path(f"/proc/{pool_pid}/environ").read_bytes().split(b"\0")
        names = {item.split(b"=", 1)[0] for item in environ if item}
        assert b"SOME_PROVIDER_API_KEY" not in names
        assert b"RLMQ_TEST_PROVIDER_KEY" in names  # rlmq's own settings (CURVE keys) do reach it
        assert b"PATH" in names


async def test_given_addresses_are_used_and_no_config_is_a_typed_error(tmp_path: Path) -> None:
    async with services_or_private("ipc:///h", "ipc:///s", tmp_path / "absent.toml", guide="README") as got:
        assert got == ("ipc:///h", "ipc:///s")  # nothing started, the config not even read
    with pytest.raises(NoServices, match=r"no .*absent\.toml to start private ones with.*\(see README\)"):
        async with services_or_private(None, "ipc:///s", tmp_path / "absent.toml", guide="README"):
            pass


@pytest.mark.timeout(5 * WAIT_S)  # room for the inner waits: they, not pytest-timeout, report a hang
def test_sigkill_of_rlmq_run_mid_run_leaves_none_of_its_private_services(tmp_path: Path) -> None:
    # One block whose sub-call takes ten minutes: the run is killed while it waits for it.
    (tmp_path / "script.json").write_text(json.dumps(["```repl\nanswer = llm_query('slow')\n```"]))
    config = tmp_path / "rlmq.toml"
    config.write_text(
        '[models.root]\nbackend = "script"\npath = "script.json"\n\n'
        '[models.sub]\nbackend = "echo"\nlatency_ms = 600000\n\n[sandbox]\nworkers = 1\n'
    )
    (tmp_path / "doc.txt").write_text("some context\n")
    trajectory = tmp_path / "run.jsonl"
    command = [sys.executable, "-m", "rlmq", "run", "--config", str(config), "-q", "?", "-c", "doc.txt"]
    with (tmp_path / "run.err").open("w") as err:
        run = subprocess.Popen(
            [*command, "--trajectory", str(trajectory)], stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path
        )
    try:
        # A bounded poll on the trajectory, which another process writes: the block has started.
        deadline = time.monotonic() + WAIT_S
        while not (trajectory.exists() and '"exec_start"' in trajectory.read_text()):
            assert run.poll() is None, (tmp_path / "run.err").read_text()
            assert time.monotonic() < deadline, "the run never reached its block"
            time.sleep(0.05)
        started = descendants(run.pid)
        names = [cmdline(pid) for pid in started]
        assert sum(" -m rlmq handler " in n for n in names) == 1, names
        assert sum(" -m rlmq sandbox " in n for n in names) == 1, names
        assert any("rlmq.sandbox.worker" in n for n in names), names  # the session's worker

        run.kill()  # no chance to stop its services: the kernel has to
        assert run.wait(WAIT_S) == -signal.SIGKILL
        left = wait_gone(started, WAIT_S)
        left_names = [cmdline(pid)[:120] for pid in left]
        kill(left)  # a failure leaves nothing behind either
        assert not left, f"left running after SIGKILL: {left_names}"
    finally:
        if run.poll() is None:
            kill_tree(run.pid)
        run.wait(WAIT_S)


# Started from the RLM's own loop thread (not the main thread: PR_SET_PDEATHSIG follows the
# thread that forked); the process then dies without stopping anything.
_FACADE_THEN_SIGKILL = """
import os, signal, sys
from rlmq import RLM
rlm = RLM.from_config(sys.argv[1])
rlm.start()
print("started", flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(5 * WAIT_S)
def test_an_rlm_killed_with_sigkill_leaves_none_of_its_private_services(tmp_path: Path) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.sub]\nbackend = "echo"\n\n[sandbox]\nworkers = 1\n')
    with (tmp_path / "rlm.err").open("w") as err:
        script = subprocess.Popen(
            [sys.executable, "-c", _FACADE_THEN_SIGKILL, str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert script.stdin is not None
    assert script.stdout is not None
    try:
        assert script.stdout.readline() == "started\n", (tmp_path / "rlm.err").read_text()
        started = descendants(script.pid)
        names = [cmdline(pid) for pid in started]
        assert sum(" -m rlmq handler " in n for n in names) == 1, names
        assert sum(" -m rlmq sandbox " in n for n in names) == 1, names
        script.stdin.write("go\n")
        script.stdin.flush()
        assert script.wait(WAIT_S) == -signal.SIGKILL
        left = wait_gone(started, WAIT_S)
        left_names = [cmdline(pid)[:120] for pid in left]
        kill(left)
        assert not left, f"left running after SIGKILL: {left_names}"
    finally:
        if script.poll() is None:
            kill_tree(script.pid)
        script.wait(WAIT_S)
        script.stdin.close()
        script.stdout.close()
