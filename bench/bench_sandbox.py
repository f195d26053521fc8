"""Sandbox pool benchmark: session open with a 40 MB context, exec round trips, sub-call rates.

    /tmp/venv/bin/python bench/bench_sandbox.py [--isolation process|bwrap|all] [--quick]

Starts its own handler (echo backend) and pool in this process, prints a table and writes
bench/results/sandbox.json. Each figure is measured from the orchestrator's side (the client),
except where a row says "in the worker".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlmq.lmhandler.testing import echo_model, running_handler  # noqa: E402
from rlmq.protocol import RunLimits  # noqa: E402
from rlmq.protocol.sandbox import AsyncSandboxClient  # noqa: E402
from rlmq.sandbox.testing import running_pool  # noqa: E402

CONTEXT_BYTES = 40_000_000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(isolation: str, quick: bool) -> dict[str, Any]:
    text = ("The quick brown fox jumps over the lazy dog. " * (CONTEXT_BYTES // 45 + 1))[:CONTEXT_BYTES]
    out: dict[str, Any] = {"isolation": isolation}
    models = {"sub": echo_model(), "slow": echo_model(latency_ms=500)}
    async with running_handler(models) as handler:
        for run in ("bench-open", "bench-small"):
            handler.runs.open_run(run, RunLimits())  # a handler serves only runs it holds
        started = time.perf_counter()
        async with running_pool(
            handler.address or "",
            isolation=isolation,
            workers=2,
            exec_timeout_s=120,
            max_sub_calls_per_exec=10_000,  # the sequential round trips below make 3,000 in one block
        ) as pool:
            out["pool_ready_s"] = round(time.perf_counter() - started, 3)
            async with AsyncSandboxClient(pool.address or "", timeout_s=120) as client:
                # 1. session open with a 40 MB str context (warm pool full before each open)
                opens, loads = [], []
                for _ in range(3 if quick else 9):
                    await pool.wait_ready()
                    t = time.perf_counter()
                    session = await client.open(run="bench-open", context=text)
                    opens.append((time.perf_counter() - t) * 1000)
                    loads.append(session.info.load_ms)
                    assert session.info.context_length == CONTEXT_BYTES
                    await session.close()
                out["open_40mb_ms"] = {
                    "median": round(statistics.median(opens), 1),
                    "max": round(max(opens), 1),
                }
                out["open_40mb_worker_decode_ms"] = round(statistics.median(loads), 1)

                await pool.wait_ready()
                t = time.perf_counter()
                small = await client.open(run="bench-small", context="small")
                out["open_small_ms"] = round((time.perf_counter() - t) * 1000, 2)

                # 2. trivial exec round trip
                for _ in range(50):
                    await small.exec("pass")
                rtts = []
                for _ in range(300 if quick else 2000):
                    t = time.perf_counter()
                    await small.exec("pass")
                    rtts.append((time.perf_counter() - t) * 1000)
                out["exec_rtt_ms"] = {
                    "median": round(statistics.median(rtts), 3),
                    "p99": round(pct(rtts, 0.99), 3),
                    "n": len(rtts),
                }

                # 3. sequential llm_query round trips per second (echo, latency 0), in the worker
                n = 500 if quick else 3000
                result = await small.exec(
                    f"import time\nt = time.perf_counter()\nfor i in range({n}):\n    llm_query('ping')\n"
                    "print(time.perf_counter() - t)"
                )
                assert result.error is None, result.error
                seconds = float(result.stdout.strip())
                out["llm_query_sequential"] = {
                    "per_s": round(n / seconds),
                    "rtt_ms": round(seconds / n * 1000, 3),
                }

                # 4. 100 batched sub-calls at 500 ms echo latency: wall time of the exec
                walls = []
                for _ in range(3):
                    t = time.perf_counter()
                    result = await small.exec(
                        "r = llm_query_batched([f'q{i}' for i in range(100)], model='slow')"
                    )
                    walls.append(time.perf_counter() - t)
                    assert (result.error, result.llm_calls) == (None, 100), result
                out["batched_100_at_500ms_s"] = {
                    "median": round(statistics.median(walls), 3),
                    "max": round(max(walls), 3),
                }
                await small.close()
    return out


def row(name: str, value: str) -> None:
    print(f"  {name:<52} {value}")


def show(r: dict[str, Any]) -> None:
    print(f"\nisolation = {r['isolation']}")
    row("pool start until 2 warm workers ready", f"{r['pool_ready_s'] * 1000:.0f} ms")
    o = r["open_40mb_ms"]
    row("session open, 40 MB str context (median / max)", f"{o['median']:.1f} / {o['max']:.1f} ms")
    row("  of which UTF-8 decode in the worker (median)", f"{r['open_40mb_worker_decode_ms']:.1f} ms")
    row("session open, small context", f"{r['open_small_ms']:.2f} ms")
    e = r["exec_rtt_ms"]
    row(f"trivial exec round trip (median / p99, n={e['n']})", f"{e['median']:.3f} / {e['p99']:.3f} ms")
    s = r["llm_query_sequential"]
    row(
        "sequential llm_query, echo latency 0 (in the worker)",
        f"{s['per_s']:,}/s ({s['rtt_ms']:.3f} ms each)",
    )
    b = r["batched_100_at_500ms_s"]
    row("100 batched sub-calls at 500 ms latency (median / max)", f"{b['median']:.3f} / {b['max']:.3f} s")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--isolation", choices=("process", "bwrap", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    levels = ["process", "bwrap"] if args.isolation == "all" else [args.isolation]
    if "bwrap" in levels and shutil.which("bwrap") is None:
        print("bwrap not installed: skipping isolation = bwrap", file=sys.stderr)
        levels.remove("bwrap")
    results = {level: asyncio.run(bench(level, args.quick)) for level in levels}
    for r in results.values():
        show(r)
    report = {
        "benchmark": "sandbox",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "euid": os.geteuid(),
        },
        "results": results,
    }
    path = ROOT / "bench" / "results" / "sandbox.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
