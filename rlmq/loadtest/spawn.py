"""Private servers for a load test: a handler (``rlmq handler``) and a fake provider, as subprocesses.

Each helper takes the environment its process runs with; none reads ``os.environ`` itself.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .spec import LoadtestError

__all__ = [
    "RELAY_KEY",
    "RELAY_KEY_ENV",
    "FakeProviderProcess",
    "SpawnedHandler",
    "echo_config",
    "read_line",
    "relay_config",
    "spawn_fake_provider",
    "spawn_handler",
    "spawned_handler",
    "stop_process",
]


def stop_process(process: subprocess.Popen[str], timeout_s: float) -> int:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; close its stdout; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()
    return process.returncode


@dataclass(slots=True)
class SpawnedHandler:
    """A handler subprocess started by ``spawn_handler``; ``stop()`` sends SIGTERM and waits."""

    process: subprocess.Popen[str]
    address: str
    workdir: tempfile.TemporaryDirectory[str]
    log_path: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 30.0) -> int:
        code = stop_process(self.process, timeout_s)
        self.workdir.cleanup()
        return code

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def echo_config(latency_ms: float = 0.0, *, alias: str = "echo", extra_handler: str = "") -> str:
    """The TOML of a handler with one ``echo`` model, for load tests."""
    return (
        f'[models.{alias}]\nbackend = "echo"\nlatency_ms = {float(latency_ms)!r}\n'
        f"[handler]\nmax_in_flight = 1000000\n{extra_handler}"
    )


RELAY_KEY_ENV = "RLMQ_LOADTEST_PROVIDER_KEY"
RELAY_KEY = "loadtest-key"


def relay_config(backend: str, base_url: str, *, alias: str, concurrency: int) -> str:
    """The TOML of a handler whose one model relays over HTTP to a (fake) provider."""
    url = base_url + ("/v1" if backend == "openai" else "")
    return (
        f'[models.{alias}]\nbackend = "{backend}"\nmodel = "loadtest"\nbase_url = "{url}"\n'
        f'api_key_env = "{RELAY_KEY_ENV}"\nmax_concurrency = {max(64, concurrency)}\n'
        "[handler]\nmax_in_flight = 1000000\n"
    )


@dataclass
class FakeProviderProcess:
    """A fake provider subprocess started by ``spawn_fake_provider``."""

    process: subprocess.Popen[str]
    base_url: str

    def stop(self, timeout_s: float = 15.0) -> None:
        stop_process(self.process, timeout_s)


def spawn_fake_provider(
    latency_s: float, *, env: Mapping[str, str], ready_timeout_s: float = 30.0
) -> FakeProviderProcess:
    """Start ``rlmq fake-provider`` on a free loopback port with ``env``; wait for its listening line."""
    argv = [sys.executable, "-m", "rlmq", "fake-provider", "--port", "0", "--api-key", RELAY_KEY]
    try:
        proc = subprocess.Popen(
            [*argv, "--latency-s", repr(latency_s)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
            env=dict(env),
        )
    except OSError as exc:
        raise LoadtestError(f"cannot start the fake provider: {exc}") from None
    started = FakeProviderProcess(proc, "")
    line = read_line(proc, ready_timeout_s) or ""
    if not line.startswith("fake-provider listening on "):
        started.stop(timeout_s=5)
        raise LoadtestError(f"the fake provider did not start: {line or 'timed out'}")
    started.base_url = line.split()[-1]
    return started


def spawn_handler(
    config_text: str,
    *,
    env: Mapping[str, str],
    bind: str = "tcp://127.0.0.1:0",
    command: Sequence[str] | None = None,
    ready_timeout_s: float = 30.0,
) -> SpawnedHandler:
    """Start ``python -m rlmq handler`` (or ``command``) with ``config_text`` and ``env``; wait for
    its ready line. CURVE server keys in ``env`` reach the handler as they would from a shell.

    ``command`` replaces ``[python, -m, rlmq]``; the arguments ``handler --config F --bind B``
    are appended either way.
    """
    workdir = tempfile.TemporaryDirectory(prefix="rlmq-loadtest-")
    config_path = os.path.join(workdir.name, "rlmq.toml")
    log_path = os.path.join(workdir.name, "handler.log")
    argv = [*(command or [sys.executable, "-m", "rlmq"]), "handler", "--config", config_path, "--bind", bind]
    try:
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(config_text)
        with open(log_path, "w", encoding="utf-8") as log_file:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                text=True,
                env={**env, "PYTHONUNBUFFERED": "1"},
            )
    except OSError as exc:
        workdir.cleanup()
        raise LoadtestError(f"cannot start the handler: {exc}") from None
    spawned = SpawnedHandler(proc, "", workdir, log_path)
    line = read_line(proc, ready_timeout_s)
    if line is None or not line.startswith("lmhandler ready on "):
        spawned.stop(timeout_s=5)
        detail = spawned.log_text().strip()[-2000:] if line is not None else "timed out"
        raise LoadtestError(f"the handler did not start: {line!r} {detail}")
    spawned.address = line.split()[-1]
    return spawned


def read_line(proc: subprocess.Popen[str], timeout_s: float) -> str | None:
    """The first stdout line of ``proc``, or None if none came within the timeout."""
    assert proc.stdout is not None
    out: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    threading.Thread(target=lambda: out.put(stdout.readline()), daemon=True).start()
    try:
        return out.get(timeout=timeout_s).strip()
    except queue.Empty:
        return None


@contextlib.contextmanager
def spawned_handler(config_text: str, *, env: Mapping[str, str], **kwargs: Any) -> Iterator[SpawnedHandler]:
    """``spawn_handler`` as a context: the handler is stopped on the way out."""
    handler = spawn_handler(config_text, env=env, **kwargs)
    try:
        yield handler
    finally:
        handler.stop()
