"""Handler throughput and latency at 1, 16, 64 and 256 requests in flight, next to the references.

Every server gets the same load from the same generator (``rlmq loadtest``'s client processes),
in the same run, interleaved round by round so that drift of a noisy machine hits all alike:

- ``bare``: a synchronous pyzmq ROUTER answering a canned reply (bench/servers.py); the floor.
- ``plain``: a zmq.asyncio ROUTER with a task per request and no logic (bench/servers.py).
- ``handler``: ``rlmq handler`` with an ``echo`` model at 0 ms, every request accounted to a run
  with limits (validation, budgets, accounting, stats all on); default asyncio loop.
- ``handler-uvloop``: the same handler under uvloop (bench/run_handler.py).

The figure kept for each point is the round with the median throughput.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
from pathlib import Path

from _common import (
    checkout,
    is_handler,
    load,
    machine,
    median_by,
    proc_cpu_s,
    servers,
    start_handler,
    start_reference,
    table,
    write_results,
)

CONCURRENCY = (1, 16, 64, 256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--requests", type=int, default=None, help="requests per measurement")
    parser.add_argument("--processes", type=int, default=None, help="load generator processes")
    parser.add_argument("--concurrency", type=int, nargs="*", default=list(CONCURRENCY))
    parser.add_argument("--no-uvloop", action="store_true")
    parser.add_argument(
        "--baseline", metavar="GITREF", help="also measure the handler of this git revision, in the same run"
    )
    parser.add_argument(
        "--code",
        metavar="DIR",
        action="append",
        default=[],
        help="also measure the handler of this source tree (a directory holding rlmq/), in the same run",
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    requests = args.requests or (3_000 if args.quick else 40_000)

    factories = [
        functools.partial(start_reference, "bare"),
        functools.partial(start_reference, "plain"),
        functools.partial(start_handler),
    ]
    if not args.no_uvloop and importlib.util.find_spec("uvloop") is not None:
        factories.append(functools.partial(start_handler, loop="uvloop"))
    if args.baseline:
        factories.append(functools.partial(start_handler, code=checkout(args.baseline)))
    for tree in args.code:
        factories.append(functools.partial(start_handler, code=Path(tree).resolve()))

    points = []
    with servers(factories) as running:
        for s in running:  # warm up: connections, allocator, caches
            load(s, requests=2_000, concurrency=64, processes=args.processes)
        for c in args.concurrency:
            # Latency-bound at 1 in flight: fewer requests keep the run short.
            n = requests // 4 if c == 1 else requests
            reports: dict[str, list[dict]] = {s.name: [] for s in running}
            for _ in range(rounds):
                for s in running:
                    cpu_before = proc_cpu_s(s.pid)
                    report = load(s, requests=n, concurrency=c, processes=args.processes)
                    # The server process's own CPU (all its threads) per request answered.
                    report["server_cpu_us"] = round((proc_cpu_s(s.pid) - cpu_before) / n * 1e6, 1)
                    reports[s.name].append(report)
            point = {"concurrency": c, "requests": n}
            bare_rounds = [r["throughput_rps"] for r in reports["bare"]]
            for name, rs in reports.items():
                best = median_by(rs, lambda r: r["throughput_rps"])
                # Each round's figure over the bare echo's of the same round, then the median.
                paired = sorted(r["throughput_rps"] / b for r, b in zip(rs, bare_rounds, strict=True) if b)
                point[name] = {
                    "throughput_rps": best["throughput_rps"],
                    "latency_ms": best["latency_ms"],
                    "errors": best["errors"],
                    "ok": best["ok"],
                    "processes": best["processes"],
                    "rounds_rps": [r["throughput_rps"] for r in rs],
                    "ratio_to_bare": round(paired[(len(paired) - 1) // 2], 3) if paired else 0.0,
                    "rounds_ratio_to_bare": [round(x, 3) for x in paired],
                    "server_cpu_us_per_request": sorted(r["server_cpu_us"] for r in rs)[(len(rs) - 1) // 2],
                    "generator_cpu_us_per_request": best["generator_cpu_us_per_request"],
                }
                if name.startswith("handler"):
                    point[name]["handler_delta"] = best["handler"]["delta"]
            points.append(point)
            _print_point(point, [s.name for s in running])
        names = [s.name for s in running]
        handlers = [s.name for s in running if is_handler(s)]

    rows = []
    for p in points:
        row = [
            p["concurrency"],
            f"{p['bare']['throughput_rps']:,.0f}",
            f"{p['plain']['throughput_rps']:,.0f}",
        ]
        for h in handlers:
            row += [f"{p[h]['throughput_rps']:,.0f}", f"{p[h]['ratio_to_bare']:.2f}"]
        rows.append(row)
    headers = ["in flight", "bare req/s", "plain req/s"]
    for h in handlers:
        headers += [f"{h} req/s", f"{h} / bare"]
    print()
    print(table(headers, rows))
    detail = []
    for p in points:
        for name in names:
            r = p[name]
            detail.append(
                [
                    p["concurrency"],
                    name,
                    f"{r['latency_ms']['p50']:.2f}",
                    f"{r['latency_ms']['p99']:.2f}",
                    f"{r['server_cpu_us_per_request']:.1f}",
                    f"{r['generator_cpu_us_per_request']:.1f}",
                ]
            )
    print()
    print(
        table(
            ["in flight", "server", "p50 ms", "p99 ms", "server CPU us/req", "generator CPU us/req"], detail
        )
    )
    path = write_results(
        "handler",
        {"bench": "handler", "machine": machine(), "rounds": rounds, "servers": names, "points": points},
        quick=args.quick,
    )
    print(f"\nresults: {path}")


def _print_point(point: dict, names: list[str]) -> None:
    parts = [f"{point['concurrency']:>4} in flight:"]
    for n in names:
        r = point[n]
        parts.append(
            f"{n} {r['throughput_rps']:,.0f} req/s ({r['ratio_to_bare']:.2f}x bare, "
            f"p99 {r['latency_ms']['p99']:.2f} ms)"
        )
    print("  ".join(parts), flush=True)


if __name__ == "__main__":
    main()
