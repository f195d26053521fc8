"""Large payloads through the handler: prompts of 100 KB, 1 MB, 10 MB and 40 MB, echoed back.

One request in flight (a 40 MB context is sent once, not in bursts), ``echo`` at 0 ms, so each
request carries the prompt in and the same text out. Next to ``bare`` (bench/servers.py), which
decodes each request and answers a canned reply of the same size, in the same run. Throughput is
in requests/s and in MB/s of payload moved (request + reply); the handler's peak RSS is from a
fresh handler process.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    Server,
    checkout,
    load,
    machine,
    proc_status_mb,
    ratio,
    start_handler,
    start_reference,
    table,
    write_results,
)

SIZES = {"100 KB": 100_000, "1 MB": 1_000_000, "10 MB": 10_000_000, "40 MB": 40_000_000}
REQUESTS = {100_000: 2_000, 1_000_000: 300, 10_000_000: 40, 40_000_000: 12}


def measure(make: Callable[[], Server], size: int, requests: int) -> dict[str, Any]:
    server = make()
    try:
        load(server, requests=max(2, requests // 10), concurrency=1, prompt_bytes=size)  # warm-up
        report = load(server, requests=requests, concurrency=1, prompt_bytes=size)
        peak = proc_status_mb(server.pid, "VmHWM")
    finally:
        server.stop()
    rps = report["throughput_rps"]
    return {
        "server": server.name,
        "bytes": size,
        "requests": requests,
        "ok": report["ok"],
        "errors": report["errors"],
        "throughput_rps": rps,
        "mb_per_s": round(rps * 2 * size / 1e6, 1),
        "latency_ms": report["latency_ms"],
        "rss_peak_mb": peak,
    }


def _label(code: Path) -> str:
    return "handler@" + code.name.removeprefix("baseline-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument(
        "--baseline", metavar="GITREF", help="also measure the handler of this git revision, in the same run"
    )
    args = parser.parse_args()
    baseline = checkout(args.baseline) if args.baseline else None
    results = []
    rows = []
    for label, size in SIZES.items():
        n = REQUESTS[size] if not args.quick else max(3, REQUESTS[size] // 10)
        bare = measure(functools.partial(start_reference, "bare", text_bytes=size), size, n)
        handler = measure(start_handler, size, n)
        results += [bare, handler]
        before = measure(functools.partial(start_handler, code=baseline), size, n) if baseline else None
        if before is not None:
            results.append(before)
        r = ratio(handler["throughput_rps"], bare["throughput_rps"])
        print(
            f"{label:>6}: handler {handler['throughput_rps']:,.1f} req/s ({handler['mb_per_s']:,.0f} MB/s, "
            f"p50 {handler['latency_ms']['p50']:.1f} ms, peak RSS {handler['rss_peak_mb']:.0f} MB), "
            f"bare {bare['throughput_rps']:,.1f} req/s -> {r:.2f}x",
            flush=True,
        )
        rows.append(
            [
                label,
                f"{handler['throughput_rps']:,.1f}",
                f"{handler['mb_per_s']:,.0f}",
                f"{handler['latency_ms']['p50']:.1f} / {handler['latency_ms']['p99']:.1f}",
                f"{handler['rss_peak_mb']:.0f}",
                f"{bare['throughput_rps']:,.1f}",
                f"{bare['latency_ms']['p50']:.1f}",
                f"{r:.2f}",
                *([f"{before['throughput_rps']:,.1f}", f"{before['rss_peak_mb']:.0f}"] if before else []),
            ]
        )
    print()
    print(
        table(
            [
                "prompt",
                "handler req/s",
                "handler MB/s",
                "handler p50 / p99 ms",
                "handler peak RSS MB",
                "bare req/s",
                "bare p50 ms",
                "handler / bare",
                *([f"{_label(baseline)} req/s", f"{_label(baseline)} peak RSS MB"] if baseline else []),
            ],
            rows,
        )
    )
    path = write_results(
        "payload", {"bench": "payload", "machine": machine(), "results": results}, quick=args.quick
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
