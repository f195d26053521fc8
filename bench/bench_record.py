"""What recording sub-calls costs: the same sub-calls with ``record_chars`` None and 2000.

    .venv/bin/python bench/bench_record.py [--calls N] [--batch B] [--rounds R] [--prompt-chars C ...]

A handler (echo backend, zero latency) runs as its own process; the pool, its relay thread and
the client run in this one, so this process's CPU time is the pool's side of every sub-call
(plus the client's), and the workers' is not in it (recording adds nothing there). Each round
makes ``--calls`` sub-calls in ``llm_query_batched`` batches of ``--batch`` in one session's execs,
rounds without and with records alternating so that drift hits both alike. Prints per sub-call:
wall time, this process's CPU time and the relay thread's alone (where requests and replies are
recorded), medians over the rounds, what recording adds and the ratio with/without; writes
bench/results/record.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import RESULTS, machine  # noqa: E402
from rlmq.loadtest import echo_config, spawn_handler  # noqa: E402
from rlmq.protocol import AsyncHandlerClient, RunLimits  # noqa: E402
from rlmq.protocol.sandbox import AsyncSandboxClient, SubCall  # noqa: E402
from rlmq.sandbox.testing import running_pool  # noqa: E402

RECORD_CHARS = 2000


def thread_cpu_s(native_id: int) -> float:
    """CPU time of one thread of this process so far (Linux schedstat: nanoseconds on CPU)."""
    return int(Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()[0]) / 1e9


async def one_round(
    client: AsyncSandboxClient,
    relay_tid: int,
    run: str,
    calls: int,
    batch: int,
    prompt_chars: int,
    record_chars: int | None,
) -> tuple[float, float, float, int]:
    """(wall s, CPU s of this process, CPU s of the relay thread, records received) for ``calls``
    sub-calls in one session."""
    session = await client.open(run=run, context="")
    records: list[SubCall] = []
    pad = "x" * max(0, prompt_chars - 12)
    code = f"out = llm_query_batched([f'{{i:011d}} {pad}' for i in range({batch})])"
    await session.exec("1")  # the worker's first exec (imports, handler ping) is not measured
    cpu0, relay0, wall0 = time.process_time(), thread_cpu_s(relay_tid), time.perf_counter()
    for _ in range(calls // batch):
        result = await session.exec(code, on_sub_call=records.append, record_chars=record_chars)
        if result.error is not None:
            raise SystemExit(f"the exec failed: {result.error.message}")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    relay = thread_cpu_s(relay_tid) - relay0
    await session.close()
    return wall, cpu, relay, len(records)


async def bench(calls: int, batch: int, rounds: int, sizes: list[int]) -> dict[str, Any]:
    handler = spawn_handler(echo_config(alias="sub"), env=dict(os.environ))
    out: dict[str, Any] = {"calls": calls, "batch": batch, "rounds": rounds, "record_chars": RECORD_CHARS}
    try:
        async with (
            AsyncHandlerClient(handler.address) as hc,
            running_pool(handler.address, workers=2, max_sub_calls_per_exec=max(batch, 1000)) as pool,
            AsyncSandboxClient(pool.address or "", timeout_s=120) as client,
        ):
            await hc.run_open("bench-record", RunLimits())
            assert pool.relay is not None
            relay_tid = pool.relay._thread.native_id
            assert relay_tid is not None
            cases = []
            for size in sizes:
                # One warm-up round of each kind, not counted.
                for rc in (None, RECORD_CHARS):
                    await one_round(client, relay_tid, "bench-record", batch, batch, size, rc)
                samples: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
                for _ in range(rounds):
                    for name, rc in (("off", None), ("on", RECORD_CHARS)):
                        wall, cpu, relay, got = await one_round(
                            client, relay_tid, "bench-record", calls, batch, size, rc
                        )
                        assert got == (calls if rc is not None else 0), got
                        samples[name].append((wall, cpu, relay))
                row: dict[str, Any] = {"prompt_chars": size}
                for name, values in samples.items():
                    for i, what in enumerate(("wall", "cpu", "relay_cpu")):
                        median = statistics.median(v[i] for v in values)
                        row[f"{what}_us_{name}"] = round(median / calls * 1e6, 1)
                for what in ("wall", "cpu", "relay_cpu"):
                    row[f"{what}_ratio"] = round(row[f"{what}_us_on"] / row[f"{what}_us_off"], 3)
                    row[f"{what}_us_added"] = round(row[f"{what}_us_on"] - row[f"{what}_us_off"], 1)
                cases.append(row)
            out["cases"] = cases
    finally:
        handler.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000, help="sub-calls per round (default 1000)")
    parser.add_argument("--batch", type=int, default=100, help="prompts per llm_query_batched (default 100)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each kind, alternating (default 5)")
    parser.add_argument(
        "--prompt-chars", type=int, nargs="+", default=[200, 10_000], help="prompt sizes (default 200 10000)"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/record.json")
    args = parser.parse_args()
    if args.calls % args.batch:
        parser.error("--calls must be a multiple of --batch")
    result = asyncio.run(bench(args.calls, args.batch, args.rounds, args.prompt_chars))
    result["machine"] = machine()
    print(f"{args.calls} sub-calls per round, batches of {args.batch}, median of {args.rounds} rounds each")
    print(f"{'prompt':>8} {'':>6} {'off µs':>9} {'on µs':>9} {'added µs':>9} {'ratio':>6}")
    for c in result["cases"]:
        for what, label in (("wall", "wall"), ("cpu", "cpu"), ("relay_cpu", "relay")):
            print(
                f"{c['prompt_chars']:>8} {label:>6} {c[what + '_us_off']:>9.1f} {c[what + '_us_on']:>9.1f}"
                f" {c[what + '_us_added']:>9.1f} {c[what + '_ratio']:>6.3f}"
            )
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "record.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
