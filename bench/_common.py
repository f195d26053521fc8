"""Helpers shared by the bench scripts: servers to measure, the load generator, results files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import zmq

from rlmq.loadtest import LoadSpec, SpawnedHandler, echo_config, run_load, spawn_handler

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"


def machine() -> dict[str, Any]:
    """The machine and software a figure was measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop

        uvloop_version: str | None = uvloop.__version__
    except ImportError:
        uvloop_version = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    mem_gib = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "uvloop": uvloop_version,
        "commit": commit,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def proc_status_mb(pid: int, key: str) -> float:
    """A memory figure of /proc/PID/status in MB (VmHWM: peak RSS; VmRSS: current)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise KeyError(key)


def proc_cpu_s(pid: int) -> float:
    """CPU seconds used so far by a process, all its threads included (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A server process under test: a handler or a reference server."""

    def __init__(self, name: str, process: subprocess.Popen[str], address: str, stop: Callable[[], Any]):
        self.name = name
        self.process = process
        self.address = address
        self._stop = stop

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self._stop()


def start_reference(kind: str, *, text_bytes: int = 16, latency_ms: float = 0.0) -> Server:
    """``bench/servers.py bare|plain``, on a free port."""
    argv = [
        sys.executable,
        str(BENCH / "servers.py"),
        kind,
        "--text-bytes",
        str(text_bytes),
        "--latency-ms",
        str(latency_ms),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ready on "):
        proc.kill()
        raise RuntimeError(f"{kind} server did not start: {line!r}")

    def stop() -> None:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    return Server(kind, proc, line.split()[-1], stop)


def start_handler(
    *, latency_ms: float = 0.0, loop: str = "asyncio", extra_handler: str = "", code: Path | None = None
) -> Server:
    """``rlmq handler`` with one ``echo`` model, run under the chosen event loop; ``code`` runs
    another version of rlmq (a directory made by ``checkout``) instead of this one."""
    command = [sys.executable, str(BENCH / "run_handler.py"), "--loop", loop]
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH")]))
    spawned: SpawnedHandler = spawn_handler(
        echo_config(latency_ms, extra_handler=extra_handler), command=command, env=env
    )
    name = "handler" if loop == "asyncio" else f"handler-{loop}"
    if code is not None:
        name += f"@{code.name.removeprefix('baseline-')}"
    return Server(name, spawned.process, spawned.address, spawned.stop)


def checkout(ref: str) -> Path:
    """The tree of git ``ref`` in ``bench/results/baseline-REF`` (``git archive``: the working tree
    and the index are left alone), to measure the handler of another version in the same run."""
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True, text=True, check=True
    ).stdout.strip()
    target = RESULTS / f"baseline-{commit}"
    if not (target / "lmhandler" / "server.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


@contextmanager
def servers(factories: Sequence[Callable[[], Server]]) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        for make in factories:
            started.append(make())
        yield started
    finally:
        for s in started:
            s.stop()


def is_handler(server: Server) -> bool:
    return server.name.startswith("handler")


def load(server: Server, **spec: Any) -> dict[str, Any]:
    """One load test against ``server``. The references get the same messages (a ``run`` field
    included) but no ``stats``/run requests, which they cannot answer."""
    handler = is_handler(server)
    if not handler:
        spec.setdefault("run", "loadtest-000000-000000")  # same size as the handler's run ids
        spec.setdefault("run_key", "0" * 32)  # and its run keys
    report = run_load(
        LoadSpec(address=server.address, **spec), env=os.environ, handler_stats=handler, open_run=handler
    )
    report["server"] = server.name
    return report


def median_by(reports: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    """The report whose ``key`` is the median (the lower middle one for an even count)."""
    ordered = sorted(reports, key=key)
    return ordered[(len(ordered) - 1) // 2]


def write_results(name: str, data: dict[str, Any], *, quick: bool = False) -> Path:
    """Write ``bench/results/NAME.json`` (latest) and a timestamped copy; returns the latest path.

    A ``--quick`` run writes ``NAME-quick.json`` instead, so a smoke run never replaces the
    figures of a full one."""
    RESULTS.mkdir(exist_ok=True)
    if quick:
        name += "-quick"
        data = {**data, "quick": True}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = json.dumps(data, indent=2, sort_keys=False)
    (RESULTS / f"{name}-{stamp}.json").write_text(text)
    latest = RESULTS / f"{name}.json"
    latest.write_text(text)
    return latest


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, so the printout can be pasted into docs/benchmarks.md."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else 0.0


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0
