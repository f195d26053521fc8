"""Handlers and a sandbox pool on this machine, as child processes.

``rlmq up`` runs them in the foreground; ``rlmq run`` without addresses and ``rlmq demo`` start
private ones on ipc:// sockets in a temporary directory and stop them afterwards. They are started
through the ``rlmq`` command, so this package never imports the other services. Several handlers
share their state through Redis: ``RLMQ_STATE_URL`` or the config's ``[state] url``, else a private
``redis-server`` on a random loopback port (no persistence), stopped with the rest.

Every child dies with the process that started it, even one killed by SIGKILL: on Linux each is
started through a tiny wrapper that sets ``PR_SET_PDEATHSIG`` and then execs the service, so the
kernel sends it SIGTERM when the starting thread (the event loop's) goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import tomllib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import NoServices, ServiceError

__all__ = ["LocalServices", "ServiceError", "local_services", "services_or_private"]

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
STATE_URL_ENV = "RLMQ_STATE_URL"  # the handler's override of [state] url (lmhandler/config.py reads it)

# Run as ``python -I -S -c _DIE_WITH_PARENT PARENT_PID SIGNAL PROGRAM ARGS...``: asks the kernel to
# send SIGNAL when the thread that forked us dies, then becomes PROGRAM (the setting survives
# exec). A wrapper rather than preexec_fn, which is unsafe in a process with threads (the RLM
# facade has several). The getppid check closes the race of a parent gone before the prctl.
_DIE_WITH_PARENT = """\
import ctypes, os, sys
parent, signum, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, signum, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
    sys.exit("rlmq: prctl(PR_SET_PDEATHSIG) failed: " + os.strerror(ctypes.get_errno()))
if os.getppid() != parent:
    sys.exit(0)
os.execv(argv[0], argv)
"""


def _dies_with_us(argv: Sequence[str], signum: signal.Signals = signal.SIGTERM) -> list[str]:
    """``argv`` wrapped so that it gets ``signum`` when the thread that starts it dies (with this
    process, or alone): here always an event loop's thread, which outlives the services started
    on its loop. SIGTERM by default, which every service here handles with a bounded, clean stop
    (the pool stops its workers, which die with it in any case). Elsewhere than Linux: ``argv``."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    wrapper = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), str(int(signum))]
    return wrapper + list(argv)


@dataclass
class _Child:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    address: str = ""
    drain: asyncio.Task[None] | None = None  # copies a chatty child's stdout to its log


@dataclass
class LocalServices:
    """What ``local_services`` started. ``handler`` is every handler's address, comma-joined:
    the one string any ``--handler`` takes."""

    handler: str
    sandbox: str
    directory: Path
    handlers: tuple[str, ...] = ()
    state_url: str | None = None  # the shared state the handlers use (None: each its own, in-process)
    private_redis: bool = False  # state_url is a redis-server started here


async def _start(
    name: str, args: list[str], ready_prefix: str, directory: Path, env: dict[str, str] | None = None
) -> _Child:
    log_path = directory / f"{name}.log"
    with log_path.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            *_dies_with_us([sys.executable, "-m", "rlmq", *args]),
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
    if child.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.process.wait(), timeout_s)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", child.name, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            await child.process.wait()
    if child.drain is not None:
        # The pipe reaches EOF once the process is gone; bounded in case a grandchild holds it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(child.drain), 5.0)
        child.drain.cancel()


# ------------------------------------------------------------------ shared state for N handlers

REDIS_READY = b"Ready to accept connections"
REDIS_ATTEMPTS = 3  # a port found free may be taken before redis-server binds it


def redis_server_binary() -> str | None:
    """The ``redis-server`` on PATH (Debian's is /usr/bin/redis-server), or None."""
    return shutil.which("redis-server")


def state_url_of(config: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> str | None:
    """The shared state url a handler started here would use: ``RLMQ_STATE_URL`` in ``environ``
    (this process's environment, which the handlers inherit), else the config's ``[state] url``."""
    override = (os.environ if environ is None else environ).get(STATE_URL_ENV)
    if override:
        return override
    try:
        with open(config, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ServiceError(f"cannot read {config}: {exc}") from None
    state = data.get("state")
    url = state.get("url") if isinstance(state, dict) else None
    return url if isinstance(url, str) and url else None


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _copy_to(stream: asyncio.StreamReader, path: Path) -> None:
    with path.open("ab") as out:
        while line := await stream.readline():
            out.write(line)
            out.flush()


async def _start_redis(directory: Path) -> tuple[_Child, str]:
    """A private redis-server on a random loopback port, persistence off; its ``redis://`` URL."""
    binary = redis_server_binary()
    if binary is None:
        raise ServiceError(
            "several handlers share their state through Redis: set [state] url = "
            '"redis://HOST:PORT/DB" in the config (or RLMQ_STATE_URL), or install redis-server '
            "(Debian: apt-get install redis-server) and rlmq up starts a private one"
        )
    log_path = directory / "redis.log"
    output = b""
    for _ in range(REDIS_ATTEMPTS):
        port = _free_loopback_port()
        # start_new_session: our Ctrl-C goes to us, and we stop redis last, after the handlers.
        redis_args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        redis_args += ["--dir", str(directory), "--logfile", "", "--daemonize", "no"]
        process = await asyncio.create_subprocess_exec(
            *_dies_with_us([binary, *redis_args]),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        child = _Child("redis", process, log_path, f"redis://127.0.0.1:{port}/0")
        assert process.stdout is not None
        output = b""
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                while line := await process.stdout.readline():
                    output += line
                    if REDIS_READY in line:
                        break
        except TimeoutError:
            await _stop(child)
            raise ServiceError(f"redis-server did not become ready within {READY_TIMEOUT_S:g} s") from None
        log_path.write_bytes(output)
        if REDIS_READY in output:
            child.drain = asyncio.create_task(_copy_to(process.stdout, log_path))
            return child, child.address
        await _stop(child)
        if b"Address already in use" not in output:
            break
    tail = output.decode(errors="replace")[-2000:]
    raise ServiceError(f"redis-server failed to start:\n{tail}")


def handler_binds(
    given: Sequence[str], count: int, *, directory: Path, taken: Sequence[str] = ()
) -> list[str]:
    """One address per handler: those given, then more derived from the first (ipc: a ``-N``
    suffix; tcp: the next ports not in ``taken``; port 0 stays 0, a random port each)."""
    if not given:
        if count == 1:
            return [f"ipc://{directory}/handler.sock"]  # as with one handler always
        return [f"ipc://{directory}/handler-{i}.sock" for i in range(1, count + 1)]
    binds = list(given[:count])
    used = set(binds) | set(taken)
    n = 2
    while len(binds) < count:
        candidate = _derived_bind(binds[0], n)
        n += 1
        if candidate.endswith(":0") or candidate not in used:
            binds.append(candidate)
            used.add(candidate)
    return binds


def _derived_bind(address: str, n: int) -> str:
    scheme, _, rest = address.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme == "tcp" and port.isdigit():
        return address if port == "0" else f"tcp://{host}:{int(port) + n - 1}"
    root, ext = os.path.splitext(address)  # ipc:///x/handler.sock -> ipc:///x/handler-2.sock
    return f"{root}-{n}{ext}"


# What a private pool keeps of this process's environment: enough to run Python and find rlmq,
# and its own RLMQ_ settings (CURVE keys); never the model providers' keys, which only the handler reads.
_POOL_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "XDG_CACHE_HOME")


def _pool_env(environ: Mapping[str, str]) -> dict[str, str]:
    kept = {
        k: v
        for k, v in environ.items()
        if (k in _POOL_ENV or k.startswith("RLMQ_")) and k != STATE_URL_ENV  # it may hold a password
    }
    kept["PYTHONUNBUFFERED"] = "1"
    return kept


@contextlib.asynccontextmanager
async def local_services(
    config: str | os.PathLike[str],
    *,
    workers: int | None = None,
    directory: str | os.PathLike[str] | None = None,
    handler_bind: str | Sequence[str] | None = None,
    sandbox_bind: str | None = None,
    handlers: int = 1,
) -> AsyncIterator[LocalServices]:
    """Start ``handlers`` handlers and a pool given all their addresses (ipc:// in a private
    directory unless binds are given; ``handler_bind``: one address per handler, the missing ones
    derived from the first). More than one handler shares ``RLMQ_STATE_URL`` or the config's
    ``[state] url``, else a private redis-server this starts and stops and passes to the handlers
    as ``RLMQ_STATE_URL`` (``ServiceError`` when there is none)."""
    if handlers < 1:
        raise ServiceError(f"handlers must be at least 1, not {handlers}")
    own_dir = directory is None
    base = Path(tempfile.mkdtemp(prefix="rlmq-")) if directory is None else Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    given = [handler_bind] if isinstance(handler_bind, str) else list(handler_bind or ())
    binds = handler_binds(given, handlers, directory=base, taken=[sandbox_bind] if sandbox_bind else [])
    children: list[_Child] = []
    handler_env: dict[str, str] | None = None  # None: this process's environment, as it is
    private_redis = False
    state_url: str | None = None
    try:
        if handlers > 1:
            state_url = await asyncio.to_thread(state_url_of, config)
            if state_url is None:
                redis, state_url = await _start_redis(base)
                children.append(redis)
                private_redis = True
                # The handlers read it as their [state] url: the user's config stays as it is.
                handler_env = {**os.environ, STATE_URL_ENV: state_url}
        started: list[_Child] = []
        for i, bind in enumerate(binds, start=1):
            child = await _start(
                "handler" if handlers == 1 else f"handler-{i}",
                # Private services serve only the runs this process opens (with keys): a call with
                # no run, from code that found the socket, is refused (docs/security.md).
                ["handler", "--config", str(config), "--bind", bind, "--no-anonymous"],
                "lmhandler ready on ",
                base,
                env=handler_env,
            )
            children.append(child)
            started.append(child)
        addresses = tuple(child.address for child in started)
        front = ",".join(addresses)  # one front of several handlers, as every --handler takes it
        sandbox_args = ["sandbox", "--handler", front, "--bind", sandbox_bind or f"ipc://{base}/sandbox.sock"]
        sandbox_args += ["--config", str(config)]  # the pool reads its optional [sandbox] table
        if workers is not None:
            sandbox_args += ["--workers", str(workers)]
        # The pool needs no API key: it gets the environment without the handler's secrets.
        sandbox = await _start("sandbox", sandbox_args, "sandbox ready on ", base, env=_pool_env(os.environ))
        children.append(sandbox)
        yield LocalServices(front, sandbox.address, base, addresses, state_url, private_redis=private_redis)
    finally:
        # The pool first: its workers may still be talking to the handlers; Redis last.
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
