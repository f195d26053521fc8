"""The driver: start the client processes, let them go together, gather their results."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection, wait
from typing import Any, TextIO

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
from rlmq.protocol.front import split_addresses

from .report import build_report, sum_stats
from .spec import LoadSpec, LoadtestError, check_spec, payload_head
from .worker import BOOT, WorkerSpec

__all__ = ["run_load"]

# The folder that holds the rlmq package, for the workers' PYTHONPATH: a checkout runs them too.
_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _default_processes(concurrency: int) -> int:
    # One client process per core (at least two), never more processes than requests in flight.
    return max(1, min(concurrency, max(2, os.cpu_count() or 2)))


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


def run_load(
    spec: LoadSpec,
    *,
    env: Mapping[str, str],
    progress: TextIO | None = None,
    open_run: bool = True,
    handler_stats: bool = True,
) -> dict[str, Any]:
    """Run one load test against ``spec.address`` and return the report (what ``--json`` prints).

    ``env`` is the environment of the client processes (the caller's, usually).

    ``open_run``: open a run (``spec.run``, or a fresh id) with generous limits, account every
    request to it, and close it afterwards. ``handler_stats=False`` skips the ``stats``, run and
    ``usage`` requests, for servers that only answer ``complete`` (the benchmarks' references).
    """
    check_spec(spec)
    nproc = spec.processes or _default_processes(spec.concurrency)
    if spec.requests is not None:
        nproc = max(1, min(nproc, spec.requests))
    nproc = min(nproc, spec.concurrency)

    try:
        addresses = split_addresses(spec.address)
    except RlmqError as exc:
        raise LoadtestError(exc.message) from None
    if len(addresses) > 1:
        # Every handler gets its own client processes (at least one each).
        nproc = min(max(nproc, len(addresses)), spec.concurrency)
    controls: dict[str, HandlerClient] = {}
    try:
        # The front (run open and close, shared state) and one client per handler (its stats).
        control = HandlerClient(spec.address, timeout_s=30.0, curve=spec.curve)
        controls[spec.address] = control
        for address in addresses if len(addresses) > 1 else ():
            controls[address] = HandlerClient(address, timeout_s=30.0, curve=spec.curve)
    except zmq.ZMQError as exc:  # an address ZeroMQ cannot connect to at all
        for c in controls.values():
            c.close()
        raise LoadtestError(f"cannot connect to {spec.address}: {exc.strerror}") from None
    each = {a: controls[a] for a in addresses} if len(addresses) > 1 else {addresses[0]: control}
    run_id = spec.run
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    before_each: dict[str, dict[str, Any]] = {}
    after_each: dict[str, dict[str, Any]] = {}
    run_usage: dict[str, Any] | None = None
    try:
        for address, c in each.items():
            try:
                c.ping(timeout_s=10.0)
            except RlmqError as exc:
                raise LoadtestError(f"no handler answering at {address}: {exc}") from None
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
            # Keyed, so that no other client can spend it (a handler without anonymous access
            # serves keyed runs only); every worker process shows the key on its requests.
            run_key = os.urandom(16).hex()
            control.request(RunOpenRequest(control.new_id(), run_id, limits, run_key))
            spec = dataclasses.replace(spec, run_key=run_key)
        spec = dataclasses.replace(spec, run=run_id)
        head = payload_head(spec)
        concurrency = _split(spec.concurrency, nproc)
        requests = _split(spec.requests, nproc) if spec.requests is not None else [None] * nproc
        rate = spec.rate / nproc if spec.rate else None
        worker_specs = [
            WorkerSpec(
                index=i,
                address=addresses[i % len(addresses)],
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
                before_each.update({a: c.stats() for a, c in each.items()})
                before.update(sum_stats(list(before_each.values())))

        results = _run_workers(worker_specs, spec, env, progress, snapshot)
        if handler_stats:
            after_each.update({a: c.stats() for a, c in each.items()})
            after = sum_stats(list(after_each.values()))
            if run_id is not None:
                with contextlib.suppress(RlmqError):
                    # A run this test opened is closed; one named with --run is only read.
                    if open_run:
                        reply = control.request(RunCloseRequest(control.new_id(), run_id, spec.run_key))
                    else:
                        reply = control.request(UsageRequest(control.new_id(), run_id))
                    if isinstance(reply, RunUsageReply):
                        run_usage = reply.run.to_wire()
    finally:
        for c in controls.values():
            c.close()
    report = build_report(spec, nproc, results, before, after, run_usage, run_id)
    if len(addresses) > 1:
        report["handlers"] = {
            address: build_report(
                dataclasses.replace(spec, address=address),
                len(mine),
                mine,
                before_each.get(address, {}),
                after_each.get(address, {}),
                None,
                run_id,
            )
            for address in addresses
            if (mine := [r for ws, r in zip(worker_specs, results, strict=True) if ws.address == address])
        }
    return report


def _run_workers(
    specs: list[WorkerSpec],
    spec: LoadSpec,
    env: Mapping[str, str],
    progress: TextIO | None,
    on_ready: Callable[[], None],
) -> list[dict[str, Any]]:
    """Start the client processes, call ``on_ready`` once all are connected, then let them go.

    Workers are fresh interpreters (``python -c``) talking over a socket pair, not
    ``multiprocessing`` children: those re-run the caller's main module, which a script calling
    ``run_load`` at top level does not expect.
    """
    conns: list[Connection] = []
    procs: list[subprocess.Popen[bytes]] = []
    worker_env = {
        **env,
        "PYTHONPATH": os.pathsep.join(filter(None, [_CODE_ROOT, env.get("PYTHONPATH")])),
    }
    try:
        for ws in specs:
            parent, child = socket.socketpair()
            with parent, child:
                try:
                    proc = subprocess.Popen(
                        [sys.executable, "-c", BOOT, str(child.fileno())],
                        pass_fds=(child.fileno(),),
                        stdin=subprocess.DEVNULL,
                        env=worker_env,
                    )
                except OSError as exc:
                    raise LoadtestError(f"cannot start a load generator process: {exc}") from None
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
