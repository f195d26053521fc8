"""The command line as a user runs it: real subprocesses, plain pyzmq clients."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import zmq

from rlmq.cli import SUBCOMMANDS, build_parser
from rlmq.protocol import pack

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start_handler(config: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlmq",
            "handler",
            "--config",
            str(config),
            "--bind",
            "tcp://127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the ready line; blocks until bound (or the process died)
    if not line.startswith("lmhandler ready on "):
        proc.kill()
        raise AssertionError(f"handler did not start: {line!r} {proc.communicate(timeout=5)}")
    return proc, line.split()[-1]


def test_handler_subprocess_serves_and_stops_on_sigterm(tmp_path: Path, zctx: zmq.Context) -> None:  # type: ignore[type-arg]
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.root]\nbackend = "echo"\n')
    proc, address = start_handler(config)
    try:
        sock = zctx.socket(zmq.DEALER)
        sock.connect(address)
        try:
            sock.send(pack({"v": 1, "op": "complete", "id": "1", "model": "root", "prompt": "ping me"}))
            assert sock.poll(10_000), "no reply from the handler subprocess"
            reply = msgpack.unpackb(sock.recv())
            assert reply["ok"] is True
            assert reply["text"] == "ping me"
        finally:
            sock.close(linger=0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert "lmhandler stopped" in err
        assert "ping me" not in err  # prompts stay out of INFO logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_handler_with_a_bad_config_exits_2_and_says_why(tmp_path: Path) -> None:
    config = tmp_path / "rlmq.toml"
    config.write_text('[models.root]\nbackend = "echo"\nlatency = 3\n')
    done = subprocess.run(
        [sys.executable, "-m", "rlmq", "handler", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
    )
    assert done.returncode == 2
    assert "unknown key 'latency'" in done.stderr
    assert str(config) in done.stderr


def test_help_explains_the_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rlmq", "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    assert "handler" in done.stdout


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_module_adds_its_arguments(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each entry of the table names a module with ``add_arguments`` (and ``main``)."""
    module = importlib.import_module(SUBCOMMANDS[command][0])
    assert callable(module.main)
    with pytest.raises(SystemExit) as exited:
        build_parser(command).parse_args([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: rlmq {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("loadtest", ["--connect", "--spawn", "--requests", "--rate", "--provider", "--json"]),
        ("fake-provider", ["--port", "--api-key", "--latency-s", "--rate-limit-fraction", "--seed"]),
        ("handler", ["--config", "--bind", "--metrics-bind", "--otlp-endpoint"]),
        ("sandbox", ["--handler", "--bind", "--workers", "--metrics-bind", "--otlp-endpoint"]),
        ("run", ["--query", "--context", "--handler", "--sandbox", "--trajectory", "--resume", "--json"]),
        ("replay", ["--json"]),
        ("view", ["--html"]),
        ("up", ["--config", "--handlers"]),
    ],
)
def test_the_tools_keep_their_flags(command: str, flags: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rlmq", command, "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    for flag in flags:
        assert flag in done.stdout
