"""Thousands of requests in flight: 1,000 and 10,000 at once against an ``echo`` model with 1 s latency.

The load generator sends all N at once (closed loop with N in flight, so each request is sent
exactly once) from two client processes; the wall time runs from the first send to the last
reply, so it is 1 s of model latency plus everything the handler and ZeroMQ add. The handler's
memory is its peak RSS (VmHWM of /proc/PID/status), from a fresh handler process per size.

Measured next to ``plain`` (bench/servers.py: zmq.asyncio, a task and an asyncio.sleep per request,
no logic) for reference.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
from collections.abc import Callable
from typing import Any

from _common import (
    Server,
    checkout,
    load,
    machine,
    proc_status_mb,
    start_handler,
    start_reference,
    table,
    write_results,
)

LATENCY_MS = 1000.0


def measure(make: Callable[[], Server], n: int, processes: int | None) -> dict[str, Any]:
    server = make()
    try:
        rss_idle = proc_status_mb(server.pid, "VmRSS")
        report = load(server, requests=n, concurrency=n, processes=processes, timeout_s=120.0)
        peak = proc_status_mb(server.pid, "VmHWM")
    finally:
        server.stop()
    return {
        "server": server.name,
        "requests": n,
        "ok": report["ok"],
        "errors": report["errors"],
        "wall_s": report["elapsed_s"],
        "overhead_s": round(report["elapsed_s"] - LATENCY_MS / 1000.0, 3),
        "latency_ms": report["latency_ms"],
        "rss_idle_mb": rss_idle,
        "rss_peak_mb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000, 10_000])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument(
        "--baseline", metavar="GITREF", help="also measure the handler of this git revision, in the same run"
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = [1_000] if args.quick else args.sizes

    servers: list[tuple[str, Callable[[], Server]]] = [
        ("plain", functools.partial(start_reference, "plain", latency_ms=LATENCY_MS)),
        ("handler", functools.partial(start_handler, latency_ms=LATENCY_MS)),
    ]
    if not args.no_uvloop and importlib.util.find_spec("uvloop") is not None:
        servers.append(
            ("handler-uvloop", functools.partial(start_handler, latency_ms=LATENCY_MS, loop="uvloop"))
        )
    if args.baseline:
        code = checkout(args.baseline)
        name = f"handler@{code.name.removeprefix('baseline-')}"
        servers.append((name, functools.partial(start_handler, latency_ms=LATENCY_MS, code=code)))

    results = []
    rows = []
    for n in sizes:
        for name, make in servers:
            runs = [measure(make, n, args.processes) for _ in range(rounds)]
            best = sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]  # the median
            best["rounds_wall_s"] = [r["wall_s"] for r in runs]
            best["rounds_rss_peak_mb"] = [r["rss_peak_mb"] for r in runs]
            results.append(best)
            print(
                f"{n:>6} in flight, {name}: {best['wall_s']:.3f} s wall, "
                f"peak RSS {best['rss_peak_mb']:.0f} MB "
                f"(idle {best['rss_idle_mb']:.0f} MB), ok {best['ok']}, errors {best['errors'] or 0}",
                flush=True,
            )
            rows.append(
                [
                    f"{n:,}",
                    name,
                    f"{best['wall_s']:.3f}",
                    f"{best['latency_ms']['p50']:.0f} / {best['latency_ms']['max']:.0f}",
                    f"{best['rss_idle_mb']:.0f}",
                    f"{best['rss_peak_mb']:.0f}",
                    f"{best['ok']:,}",
                ]
            )
    print()
    print(
        table(
            ["in flight", "server", "wall s", "latency p50 / max ms", "RSS idle MB", "RSS peak MB", "ok"],
            rows,
        )
    )
    path = write_results(
        "inflight",
        {
            "bench": "inflight",
            "machine": machine(),
            "latency_ms": LATENCY_MS,
            "rounds": rounds,
            "results": results,
        },
        quick=args.quick,
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
