"""``rlmq loadtest``: drive a handler over the wire protocol and report what it sustained.

Closed loop (``--concurrency`` requests kept in flight) or open loop (``--rate`` requests per
second on a fixed schedule, latency counted from the scheduled time so a stalled handler cannot
hide behind a stalled generator). Requests are spread over several client processes, each with
one DEALER and a synchronous pyzmq loop, so that on a small machine the generator is not the
bottleneck. Reports throughput, latency percentiles, errors by code, and the handler's own
counters (the ``stats`` op) before and after. ``--spawn`` starts a private handler with an
``echo`` model, so one command measures a machine.

By default every request is accounted to a run opened with generous limits, so the handler's
budget checks and accounting run as they would in production (``--no-run`` turns that off).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import dataclasses
import json
import math
import os
import queue
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO

import msgpack
import zmq

from rlmq.protocol import (
    HandlerClient,
    RlmqError,
    RunCloseRequest,
    RunLimits,
    RunOpenRequest,
    RunUsageReply,
    UsageRequest,
)
from rlmq.protocol.client import configure_socket
from rlmq.protocol.security import CurveClientKeys, CurveError, client_keys_from_env, connect

__all__ = [
    "LoadSpec",
    "LoadtestError",
    "SpawnedHandler",
    "add_arguments",
    "check_spec",
    "echo_config",
    "main",
    "read_line",
    "run_load",
    "spawn_handler",
    "spawned_handler",
    "stop_process",
    "summarize",
]

# Counted under this code when the generator gave up waiting for a reply.
CLIENT_TIMEOUT = "client_timeout"
PROGRESS_INTERVAL_S = 0.2
# Open loop: requests outstanding beyond this wait (and show up as schedule lag).
OPEN_LOOP_CAP = 100_000


class LoadtestError(RlmqError):
    """The load test could not run (no handler, a handler that died, bad options)."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """What to send. ``requests`` or ``duration_s`` bounds the test; ``rate`` makes it open loop."""

    address: str
    requests: int | None = 10_000
    duration_s: float | None = None
    concurrency: int = 64
    rate: float | None = None
    model: str = "echo"
    prompt_bytes: int = 16
    processes: int | None = None
    timeout_s: float = 60.0
    max_tokens: int | None = None
    run: str | None = None
    handler_timeout_s: float | None = None  # the request's own timeout_s field, if given
    curve: CurveClientKeys | None = None  # CURVE client keys, for a handler with server keys


@dataclass(frozen=True, slots=True)
class _WorkerSpec:
    index: int
    address: str
    requests: int | None
    duration_s: float | None
    concurrency: int
    rate: float | None
    payload_head: bytes
    timeout_s: float
    curve: CurveClientKeys | None = None


@dataclass(slots=True)
class _WorkerResult:
    sent: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: array.array[float] = field(default_factory=lambda: array.array("d"))
    first_send: float = math.inf
    last_reply: float = 0.0
    last_send: float = 0.0
    max_lag_ms: float = 0.0  # open loop: how far behind schedule the generator fell


# ---------------------------------------------------------------- request encoding


def _payload_head(spec: LoadSpec) -> bytes:
    """Every field of the request but ``id``, with a map header counting the ``id`` too.

    A request is ``head + packb("id") + packb(id)``: the prompt is encoded once per process,
    which matters for 40 MB prompts, and the per-request cost is one small pack and one concat.
    """
    prompt = ("x" * spec.prompt_bytes) if spec.prompt_bytes > 0 else ""
    fields: dict[str, Any] = {"v": 1, "op": "complete", "model": spec.model, "prompt": prompt}
    if spec.max_tokens is not None:
        fields["max_tokens"] = spec.max_tokens
    if spec.run is not None:
        fields["run"] = spec.run
    if spec.handler_timeout_s is not None:
        fields["timeout_s"] = spec.handler_timeout_s
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(fields) + 1)]
    for key, value in fields.items():
        parts.append(packer.pack(key))
        parts.append(packer.pack(value))
    parts.append(packer.pack("id"))
    return b"".join(parts)


# ---------------------------------------------------------------- worker process


_WORKER_BOOT = "import sys; from lmhandler.loadtest import _worker_entry; _worker_entry(int(sys.argv[1]))"


def _worker_entry(fd: int) -> None:
    """``python -c`` entry of a client process: its spec comes first on the socket ``fd``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    conn = Connection(fd)
    try:
        spec = conn.recv()
    except EOFError:
        return
    _worker_main(conn, spec)


def _cpu_s() -> float:
    """CPU seconds of this whole process, ZeroMQ's I/O thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker_main(conn: Connection, spec: _WorkerSpec) -> None:
    """One client process: connect, say ready, wait for go, run, send the result back."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    configure_socket(sock)
    try:
        connect(sock, spec.address, spec.curve)
        # One ping so that "ready" means the connection is up and the handler answers.
        sock.send(msgpack.packb({"v": 1, "op": "ping", "id": f"w{spec.index}-ping"}))
        if not sock.poll(10_000):
            conn.send(("failed", f"no answer from {spec.address} within 10 s"))
            return
        sock.recv()
        conn.send(("ready", None))
        cmd, start_at = conn.recv()
        if cmd != "go":
            return
        delay = start_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        cpu_before = _cpu_s()
        result = _run_worker(sock, spec, conn)
        cpu_s = _cpu_s() - cpu_before
        conn.send(
            (
                "result",
                {
                    "sent": result.sent,
                    "ok": result.ok,
                    "errors": dict(result.errors),
                    "latencies_ms": result.latencies_ms.tobytes(),
                    "first_send": result.first_send,
                    "last_reply": result.last_reply,
                    "last_send": result.last_send,
                    "max_lag_ms": result.max_lag_ms,
                    "cpu_s": cpu_s,
                },
            )
        )
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        sock.close(linger=0)
        ctx.term()
        conn.close()


def _run_worker(sock: zmq.Socket[Any], spec: _WorkerSpec, conn: Connection) -> _WorkerResult:
    res = _WorkerResult()
    head = spec.payload_head
    prefix = f"w{spec.index}-"
    pending: dict[str, float] = {}  # id -> time it was (due to be) sent; insertion order = age
    latencies = res.latencies_ms
    errors = res.errors
    unpackb = msgpack.unpackb
    packb = msgpack.packb
    send = sock.send
    recv = sock.recv
    poll = sock.poll
    monotonic = time.monotonic
    noblock = zmq.NOBLOCK
    again = zmq.Again

    started = monotonic()
    stop_sending_at = started + spec.duration_s if spec.duration_s is not None else math.inf
    budget = spec.requests if spec.requests is not None else -1  # -1: until the duration ends
    interval = 1.0 / spec.rate if spec.rate else 0.0
    next_due = started
    seq = 0
    next_progress = started + PROGRESS_INTERVAL_S
    timeout_s = spec.timeout_s
    # Large prompts (and their echoes) go without a copy into and out of ZeroMQ.
    small = len(head) < zmq.COPY_THRESHOLD

    def may_send(now: float) -> bool:
        return budget != 0 and now < stop_sending_at and len(pending) < spec.concurrency

    def send_one(due: float) -> None:
        nonlocal seq, budget
        seq += 1
        rid = prefix + str(seq)
        pending[rid] = due
        res.last_send = due
        if small:
            send(head + packb(rid))
        else:
            send(head + packb(rid), copy=False)
        if budget > 0:
            budget -= 1
        res.sent += 1

    now = monotonic()
    res.first_send = now
    if not interval:
        while may_send(now):
            send_one(now)
    while True:
        now = monotonic()
        if interval:
            # Open loop: send everything that is due; the concurrency cap is a safety valve.
            while next_due <= now and may_send(now):
                lag = (now - next_due) * 1000.0
                if lag > res.max_lag_ms:
                    res.max_lag_ms = lag
                send_one(next_due)
                next_due += interval
        if not pending and not may_send(now):
            break
        if now >= next_progress:
            next_progress = now + PROGRESS_INTERVAL_S
            conn.send(("progress", (res.ok + sum(errors.values()), sum(errors.values()))))
            # Requests older than the timeout are counted and forgotten (oldest first).
            while pending:
                rid, t0 = next(iter(pending.items()))
                if now - t0 < timeout_s:
                    break
                del pending[rid]
                errors[CLIENT_TIMEOUT] += 1
        wait_s = min(PROGRESS_INTERVAL_S, max(0.0, next_progress - now))
        if interval and may_send(now):
            wait_s = min(wait_s, max(0.0, next_due - now))
        if not poll(int(wait_s * 1000) + (0 if wait_s == 0 else 1)):
            continue
        # Drain every reply already queued before looking at the clock again.
        while True:
            try:
                frame = recv(noblock, copy=small)
            except again:
                break
            now = monotonic()
            try:
                reply = unpackb(frame.buffer if isinstance(frame, zmq.Frame) else frame)
                rid = reply["id"]
            except Exception:
                errors["unreadable_reply"] += 1
                continue
            sent_at = pending.pop(rid, None) if isinstance(rid, str) else None
            if sent_at is None:
                continue  # late reply to a request already counted as timed out
            res.last_reply = now
            if reply.get("ok") is True:
                res.ok += 1
                latencies.append((now - sent_at) * 1000.0)
            else:
                error = reply.get("error")
                code = error.get("code") if isinstance(error, dict) else None
                errors[str(code)] += 1
            if not interval and may_send(now):
                send_one(now)
    return res


# ---------------------------------------------------------------- the driver


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max (and min, mean) of latencies in milliseconds, rounded to microseconds."""
    ordered = sorted(latencies_ms)
    if not ordered:
        return {"min": 0.0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    return {
        "min": round(ordered[0], 3),
        "mean": round(sum(ordered) / len(ordered), 3),
        "p50": round(_percentile(ordered, 0.50), 3),
        "p90": round(_percentile(ordered, 0.90), 3),
        "p99": round(_percentile(ordered, 0.99), 3),
        "max": round(ordered[-1], 3),
    }


def _default_processes(concurrency: int) -> int:
    # One client process per core (at least two), never more processes than requests in flight.
    return max(1, min(concurrency, max(2, os.cpu_count() or 2)))


def _delta(before: Any, after: Any) -> Any:
    """Counters after minus before, recursively; gauges and percentiles are left out."""
    if isinstance(after, Mapping):
        out = {}
        for key, value in after.items():
            if key in {"latency_ms", "uptime_s", "in_flight", "queued", "runs_open"}:
                continue
            prior = before.get(key) if isinstance(before, Mapping) else None
            d = _delta(prior, value)
            if d not in (None, {}, 0, 0.0):
                out[key] = d
        return out
    if isinstance(after, bool) or not isinstance(after, int | float):
        return None
    prior = before if isinstance(before, int | float) and not isinstance(before, bool) else 0
    d = after - prior
    return round(d, 9) if isinstance(d, float) else d


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int | None, duration_s: float | None, stream: TextIO | None) -> None:
        self.total = total
        self.duration_s = duration_s
        self.out = stream
        self.started = time.monotonic()

    def draw(self, done: int, errors: int) -> None:
        if self.out is None:
            return
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(1.0, done / self.total)
        elif self.duration_s:
            frac = min(1.0, elapsed / self.duration_s)
        else:
            frac = 0.0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        of = f"/{self.total}" if self.total else ""
        self.out.write(f"\r\x1b[2K[{bar}] {done}{of} | {rate:,.0f} req/s | {errors} errors | {elapsed:.1f}s")
        self.out.flush()

    def close(self) -> None:
        if self.out is not None:
            self.out.write("\r\x1b[2K")
            self.out.flush()


def check_spec(spec: LoadSpec) -> None:
    """Raise ``LoadtestError`` for options no load test can run with."""
    if spec.requests is None and spec.duration_s is None:
        raise LoadtestError("give a number of requests or a duration")
    if spec.requests is not None and spec.requests < 1:
        raise LoadtestError("requests must be at least 1")
    if spec.duration_s is not None and spec.duration_s <= 0:
        raise LoadtestError("duration must be positive")
    if spec.concurrency < 1:
        raise LoadtestError("concurrency must be at least 1")
    if spec.rate is not None and spec.rate <= 0:
        raise LoadtestError("rate must be positive")
    if spec.prompt_bytes < 0:
        raise LoadtestError("prompt size must not be negative")
    if spec.processes is not None and spec.processes < 1:
        raise LoadtestError("processes must be at least 1")
    if spec.timeout_s <= 0:
        raise LoadtestError("timeout must be positive")


def run_load(
    spec: LoadSpec,
    *,
    progress: TextIO | None = None,
    open_run: bool = True,
    handler_stats: bool = True,
) -> dict[str, Any]:
    """Run one load test against ``spec.address`` and return the report (what ``--json`` prints).

    ``open_run``: open a run (``spec.run``, or a fresh id) with generous limits, account every
    request to it, and close it afterwards. ``handler_stats=False`` skips the ``stats``, run and
    ``usage`` requests, for servers that only answer ``complete`` (the benchmarks' references).
    """
    check_spec(spec)
    nproc = spec.processes or _default_processes(spec.concurrency)
    if spec.requests is not None:
        nproc = max(1, min(nproc, spec.requests))
    nproc = min(nproc, spec.concurrency)

    control = HandlerClient(spec.address, timeout_s=30.0, curve=spec.curve)
    run_id = spec.run
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    run_usage: dict[str, Any] | None = None
    try:
        try:
            control.ping(timeout_s=10.0)
        except RlmqError as exc:
            raise LoadtestError(f"no handler answering at {spec.address}: {exc}") from None
        open_run = open_run and handler_stats
        if open_run:
            run_id = run_id or f"loadtest-{os.getpid()}-{os.urandom(3).hex()}"
            # Generous limits: every budget check runs on every call, none refuses one.
            limits = RunLimits(
                max_calls=10**12,
                max_input_tokens=10**15,
                max_output_tokens=10**15,
                max_cost_usd=1e9,
                deadline_s=1e7,
            )
            control.request(RunOpenRequest(control.new_id(), run_id, limits))
        spec = LoadSpec(**{**_fields(spec), "run": run_id})
        head = _payload_head(spec)
        concurrency = _split(spec.concurrency, nproc)
        requests = _split(spec.requests, nproc) if spec.requests is not None else [None] * nproc
        rate = spec.rate / nproc if spec.rate else None
        worker_specs = [
            _WorkerSpec(
                index=i,
                address=spec.address,
                requests=requests[i],
                duration_s=spec.duration_s,
                concurrency=concurrency[i],
                rate=rate,
                payload_head=head,
                timeout_s=spec.timeout_s,
                curve=spec.curve,
            )
            for i in range(nproc)
        ]

        def snapshot() -> None:
            if handler_stats:
                before.update(control.stats())

        results = _run_workers(worker_specs, spec, progress, snapshot)
        if handler_stats:
            after = control.stats()
            if run_id is not None:
                with contextlib.suppress(RlmqError):
                    # A run this test opened is closed; one named with --run is only read.
                    req = RunCloseRequest if open_run else UsageRequest
                    reply = control.request(req(control.new_id(), run_id))
                    if isinstance(reply, RunUsageReply):
                        run_usage = reply.run.to_wire()
    finally:
        control.close()
    return _report(spec, nproc, results, before, after, run_usage, run_id)


def _fields(spec: LoadSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in LoadSpec.__slots__}


def _run_workers(
    specs: list[_WorkerSpec], spec: LoadSpec, progress: TextIO | None, on_ready: Callable[[], None]
) -> list[dict[str, Any]]:
    """Start the client processes, call ``on_ready`` once all are connected, then let them go.

    Workers are fresh interpreters (``python -c``) talking over a socket pair, not
    ``multiprocessing`` children: those re-run the caller's main module, which a script calling
    ``run_load`` at top level does not expect.
    """
    conns: list[Connection] = []
    procs: list[subprocess.Popen[bytes]] = []
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    try:
        for ws in specs:
            parent, child = socket.socketpair()
            with parent, child:
                proc = subprocess.Popen(
                    [sys.executable, "-c", _WORKER_BOOT, str(child.fileno())],
                    pass_fds=(child.fileno(),),
                    stdin=subprocess.DEVNULL,
                    env=env,
                )
                procs.append(proc)
                conn = Connection(parent.detach())
            conns.append(conn)
            conn.send(ws)
        for i, conn in enumerate(conns):
            if not conn.poll(60):
                raise LoadtestError("a load generator process did not start within 60 s")
            try:
                kind, detail = conn.recv()
            except EOFError:
                raise LoadtestError(f"load generator process {i} died while starting") from None
            if kind != "ready":
                raise LoadtestError(f"a load generator process failed: {detail}")
        on_ready()
        start_at = time.monotonic() + 0.05
        for conn in conns:
            conn.send(("go", start_at))
        bar = _Progress(spec.requests, spec.duration_s, progress)
        done = [0] * len(conns)
        errs = [0] * len(conns)
        results: dict[int, dict[str, Any]] = {}
        index = {id(c): i for i, c in enumerate(conns)}
        live = list(conns)
        while live:
            for ready in wait(live, timeout=1.0):
                assert isinstance(ready, Connection)
                i = index[id(ready)]
                try:
                    kind, detail = ready.recv()
                except EOFError:
                    raise LoadtestError(f"load generator process {i} died") from None
                if kind == "progress":
                    done[i], errs[i] = detail
                    bar.draw(sum(done), sum(errs))
                elif kind == "result":
                    results[i] = detail
                    done[i] = detail["ok"] + sum(detail["errors"].values())
                    live.remove(ready)
        bar.close()
        return [results[i] for i in range(len(conns))]
    finally:
        for conn in conns:
            conn.close()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _report(
    spec: LoadSpec,
    nproc: int,
    results: list[dict[str, Any]],
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    run_usage: Mapping[str, Any] | None,
    run_id: str | None,
) -> dict[str, Any]:
    latencies: array.array[float] = array.array("d")
    errors: Counter[str] = Counter()
    sent = ok = 0
    first = math.inf
    last = 0.0
    lag = 0.0
    cpu = 0.0
    last_send = 0.0
    for r in results:
        cpu += r["cpu_s"]
        chunk: array.array[float] = array.array("d")
        chunk.frombytes(r["latencies_ms"])
        latencies.extend(chunk)
        errors.update(r["errors"])
        sent += r["sent"]
        ok += r["ok"]
        first = min(first, r["first_send"])
        last = max(last, r["last_reply"])
        last_send = max(last_send, r["last_send"])
        lag = max(lag, r["max_lag_ms"])
    answered = ok + sum(v for k, v in errors.items() if k != CLIENT_TIMEOUT)
    elapsed = max(0.0, last - first) if answered else 0.0
    report: dict[str, Any] = {
        "address": spec.address,
        "mode": "open" if spec.rate else "closed",
        "model": spec.model,
        "concurrency": spec.concurrency,
        "rate": spec.rate,
        "prompt_bytes": spec.prompt_bytes,
        "processes": nproc,
        "run": run_id,
        "sent": sent,
        "ok": ok,
        "errors": dict(sorted(errors.items())),
        "elapsed_s": round(elapsed, 6),
        "throughput_rps": round(answered / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": summarize(latencies),
        # What the generator itself cost, to tell whether it was the bottleneck.
        "generator_cpu_us_per_request": round(cpu / sent * 1e6, 2) if sent else 0.0,
        "handler": {"before": dict(before), "after": dict(after), "delta": _delta(before, after)},
        "run_usage": dict(run_usage) if run_usage is not None else None,
    }
    if spec.rate:
        report["max_schedule_lag_ms"] = round(lag, 3)
        # The rate actually sent at (throughput also counts the wait for the last replies).
        sending = last_send - first
        report["sent_rate_rps"] = round((sent - 1) / sending, 1) if sent > 1 and sending > 0 else 0.0
    return report


# ---------------------------------------------------------------- a private handler


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
    process: subprocess.Popen[str]
    base_url: str

    def stop(self, timeout_s: float = 15.0) -> None:
        stop_process(self.process, timeout_s)


def spawn_fake_provider(latency_s: float, *, ready_timeout_s: float = 30.0) -> FakeProviderProcess:
    """Start ``rlmq fake-provider`` on a free loopback port; wait for its listening line."""
    argv = [sys.executable, "-m", "rlmq", "fake-provider", "--port", "0", "--api-key", RELAY_KEY]
    proc = subprocess.Popen(
        [*argv, "--latency-s", repr(latency_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
    )
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
    bind: str = "tcp://127.0.0.1:0",
    command: Sequence[str] | None = None,
    ready_timeout_s: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> SpawnedHandler:
    """Start ``python -m rlmq handler`` (or ``command``) with ``config_text``; wait for its ready line.

    ``command`` replaces ``[python, -m, rlmq]``; the arguments ``handler --config F --bind B``
    are appended either way.
    """
    workdir = tempfile.TemporaryDirectory(prefix="rlmq-loadtest-")
    config_path = os.path.join(workdir.name, "rlmq.toml")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(config_text)
    log_path = os.path.join(workdir.name, "handler.log")
    argv = [*(command or [sys.executable, "-m", "rlmq"]), "handler", "--config", config_path, "--bind", bind]
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"},
        )
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
def spawned_handler(config_text: str, **kwargs: Any) -> Iterator[SpawnedHandler]:
    handler = spawn_handler(config_text, **kwargs)
    try:
        yield handler
    finally:
        handler.stop()


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--connect", metavar="ADDR", help="the handler to drive, e.g. tcp://127.0.0.1:5555")
    target.add_argument(
        "--spawn",
        action="store_true",
        help="start a private handler with an `echo` model for the test, and stop it afterwards",
    )
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--requests", "-n", type=int, default=None, help="requests to send (default 10000)")
    bound.add_argument("--duration", type=float, default=None, metavar="S", help="send for S seconds")
    parser.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=None,
        help="requests in flight (closed loop, default 64); with --rate, the cap on requests "
        "outstanding (default 100000)",
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="open loop: requests per second, on a fixed schedule"
    )
    parser.add_argument(
        "--model", default=None, help="model alias to call (default: echo with --spawn, else root)"
    )
    parser.add_argument(
        "--prompt-bytes", type=int, default=16, help="size of each prompt in bytes (default: %(default)s)"
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens of each request")
    parser.add_argument(
        "--processes", type=int, default=None, help="client processes (default: one per core, at least 2)"
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="a reply not back within this many seconds counts as client_timeout (default: %(default)s)",
    )
    run = parser.add_mutually_exclusive_group()
    run.add_argument("--run", default=None, help="account every request to this run id (not opened)")
    run.add_argument("--no-run", action="store_true", help="send requests without a run (no budget checks)")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="with --spawn: the model's latency, echo or fake provider (default: %(default)s)",
    )
    parser.add_argument(
        "--provider",
        choices=("anthropic", "openai"),
        default=None,
        help="with --spawn: also start `rlmq fake-provider` and relay to it over HTTP through this "
        "backend, measuring the whole path client -> handler -> HTTP -> provider",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _format(report: Mapping[str, Any]) -> str:
    lat = report["latency_ms"]
    lines = [
        f"target      {report['address']} (model {report['model']}, {report['mode']} loop, "
        f"{report['processes']} client processes)",
        (
            f"load        {report['rate']:g} req/s scheduled (sent at {report['sent_rate_rps']:,.0f}), "
            f"at most {report['concurrency']} outstanding"
            if report["rate"]
            else f"load        {report['concurrency']} in flight"
        )
        + f", {report['prompt_bytes']} B prompts",
        f"requests    {report['sent']} sent, {report['ok']} ok, "
        f"{sum(report['errors'].values())} errors in {report['elapsed_s']:.3f} s",
        f"throughput  {report['throughput_rps']:,.0f} req/s",
        f"latency ms  p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  max {lat['max']:.3f}",
    ]
    if report["errors"]:
        lines.append("errors      " + ", ".join(f"{k} {v}" for k, v in report["errors"].items()))
    if "max_schedule_lag_ms" in report:
        lines.append(f"schedule    fell behind by up to {report['max_schedule_lag_ms']:.1f} ms")
    delta = report["handler"]["delta"]
    after = report["handler"]["after"]
    lines.append(
        f"handler     received {delta.get('received', 0)}, replied {delta.get('replied', 0)}, "
        f"dropped {delta.get('dropped', 0)}"
        + (
            ", errors " + ", ".join(f"{k} {v}" for k, v in delta["errors"].items())
            if delta.get("errors")
            else ""
        )
    )
    model = after.get("models", {}).get(report["model"])
    if isinstance(model, Mapping):
        hl = model.get("latency_ms", {})
        lines.append(
            f"handler ms  p50 {hl.get('p50', 0):.3f}  p90 {hl.get('p90', 0):.3f}  "
            f"p99 {hl.get('p99', 0):.3f}  max {hl.get('max', 0):.3f}  (its own view, last 10k calls)"
        )
    usage = report.get("run_usage")
    if usage:
        lines.append(
            f"run         {usage['run']}: {usage['calls']} calls, {usage['failed_calls']} failed, "
            f"{usage['usage']['input_tokens']} input / {usage['usage']['output_tokens']} output tokens"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    requests = args.requests if args.requests is not None else (None if args.duration else 10_000)
    spec = LoadSpec(
        address=args.connect or "",
        requests=requests,
        duration_s=args.duration,
        concurrency=args.concurrency
        if args.concurrency is not None
        else (OPEN_LOOP_CAP if args.rate else 64),
        rate=args.rate,
        model=args.model or ("echo" if args.spawn else "root"),
        prompt_bytes=args.prompt_bytes,
        processes=args.processes,
        timeout_s=args.timeout_s,
        max_tokens=args.max_tokens,
        run=args.run,
    )
    progress = sys.stderr if sys.stderr.isatty() and not args.json else None
    spawned: SpawnedHandler | None = None
    provider: FakeProviderProcess | None = None
    if args.provider and not args.spawn:
        print("rlmq loadtest: --provider goes with --spawn", file=sys.stderr)
        return 2
    try:
        # A handler with CURVE keys needs ours: from the environment, like every rlmq client.
        spec = dataclasses.replace(spec, curve=client_keys_from_env(os.environ))
        check_spec(spec)  # before a handler is started for nothing
        if args.spawn and args.provider:
            provider = spawn_fake_provider(args.latency_ms / 1000.0)
            config = relay_config(
                args.provider, provider.base_url, alias=spec.model, concurrency=spec.concurrency
            )
            spawned = spawn_handler(config, env={**os.environ, RELAY_KEY_ENV: RELAY_KEY})
            spec = dataclasses.replace(spec, address=spawned.address)
        elif args.spawn:
            spawned = spawn_handler(echo_config(args.latency_ms))
            spec = dataclasses.replace(spec, address=spawned.address)
        report = run_load(spec, progress=progress, open_run=not args.no_run and args.run is None)
    except (LoadtestError, CurveError) as exc:
        print(f"rlmq loadtest: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rlmq loadtest: interrupted", file=sys.stderr)
        return 130
    finally:
        if spawned is not None:
            code = spawned.stop()
            if code not in (0, None):
                print(f"rlmq loadtest: the spawned handler exited with {code}", file=sys.stderr)
        if provider is not None:
            provider.stop()
    report["spawned"] = args.spawn
    if args.json:
        print(json.dumps(report))
    else:
        print(_format(report))
    return 0
