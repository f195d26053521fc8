"""A handler and a sandbox pool on this machine, as child processes.

``rlmq up`` runs them in the foreground; ``rlmq run`` without addresses and ``rlmq demo`` start
private ones on ipc:// sockets in a temporary directory and stop them afterwards. They are started
through the ``rlmq`` command, so this package never imports the other services.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import NoServices, ServiceError

__all__ = ["LocalServices", "ServiceError", "local_services", "services_or_private"]

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0


@dataclass
class _Child:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    address: str = ""


@dataclass
class LocalServices:
    handler: str
    sandbox: str
    directory: Path


async def _start(
    name: str, args: list[str], ready_prefix: str, directory: Path, env: dict[str, str] | None = None
) -> _Child:
    log_path = directory / f"{name}.log"
    with log_path.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rlmq",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            start_new_session=True,  # our Ctrl-C goes to us; we stop the children in order
            env=env,
        )
    child = _Child(name, process, log_path)
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT_S)
    except TimeoutError:
        await _stop(child)
        raise ServiceError(
            f"{name} did not become ready within {READY_TIMEOUT_S:g} s; see {log_path}"
        ) from None
    text = line.decode(errors="replace").strip()
    if not text.startswith(ready_prefix):
        await _stop(child)
        tail = log_path.read_text(errors="replace")[-2000:]
        raise ServiceError(f"{name} failed to start:\n{tail}")
    child.address = text.split()[-1]
    return child


async def _stop(child: _Child, timeout_s: float = 15.0) -> None:
    if child.process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(child.process.wait(), timeout_s)
    except TimeoutError:
        log.warning("%s did not stop within %.0f s; killing it", child.name, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, signal.SIGKILL)
        await child.process.wait()


# What a private pool keeps of this process's environment: enough to run Python and find rlmq,
# and its own RLMQ_ settings (CURVE keys); never the model providers' keys, which only the handler reads.
_POOL_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "XDG_CACHE_HOME")


def _pool_env(environ: Mapping[str, str]) -> dict[str, str]:
    kept = {k: v for k, v in environ.items() if k in _POOL_ENV or k.startswith("RLMQ_")}
    kept["PYTHONUNBUFFERED"] = "1"
    return kept


@contextlib.asynccontextmanager
async def local_services(
    config: str | os.PathLike[str],
    *,
    workers: int | None = None,
    directory: str | os.PathLike[str] | None = None,
    handler_bind: str | None = None,
    sandbox_bind: str | None = None,
) -> AsyncIterator[LocalServices]:
    """Start a handler and a pool (ipc:// in a private directory unless binds are given)."""
    own_dir = directory is None
    base = Path(tempfile.mkdtemp(prefix="rlmq-")) if directory is None else Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    children: list[_Child] = []
    try:
        handler = await _start(
            "handler",
            # Private services serve only the runs this process opens (with keys): a call with no
            # run, from code that found the socket, is refused (docs/security.md).
            [
                "handler",
                "--config",
                str(config),
                "--bind",
                handler_bind or f"ipc://{base}/handler.sock",
                "--no-anonymous",
            ],
            "lmhandler ready on ",
            base,
        )
        children.append(handler)
        sandbox_args = [
            "sandbox",
            "--handler",
            handler.address,
            "--bind",
            sandbox_bind or f"ipc://{base}/sandbox.sock",
        ]
        sandbox_args += ["--config", str(config)]  # the pool reads its optional [sandbox] table
        if workers is not None:
            sandbox_args += ["--workers", str(workers)]
        # The pool needs no API key: it gets the environment without the handler's secrets.
        sandbox = await _start("sandbox", sandbox_args, "sandbox ready on ", base, env=_pool_env(os.environ))
        children.append(sandbox)
        yield LocalServices(handler.address, sandbox.address, base)
    finally:
        # The pool first: its workers may still be talking to the handler.
        for child in reversed(children):
            await _stop(child)
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)


@contextlib.asynccontextmanager
async def services_or_private(
    handler: str | None, sandbox: str | None, config: str | os.PathLike[str], *, guide: str
) -> AsyncIterator[tuple[str, str]]:
    """``(handler, sandbox)``: the addresses given, else private services started from
    ``config`` for as long as the block runs (one given address is kept, the other started).
    ``guide`` names where the user reads how to write a config, for the error without one."""
    if handler and sandbox:
        yield handler, sandbox
        return
    if not await asyncio.to_thread(os.path.exists, config):
        raise NoServices(
            f"no --handler/--sandbox given and no {config} to start private ones with; "
            f"write a config with [models.root] and [models.sub] (see {guide}) or pass --config"
        )
    async with local_services(config) as services:
        yield handler or services.handler, sandbox or services.sandbox
