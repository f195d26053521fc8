"""Scale-out: one handler process against two, behind one client (``"A,B"``).

(a) The Anthropic path at 3,000 in flight: ``rlmq fake-provider`` (1 s latency) as the provider,
    handlers with an ``anthropic`` backend pointed at it, beside plain aiohttp calling the fake
    provider directly; wall time and the CPU of every process, in one run.
(b) 10,000 in flight at 1 s: ``echo`` handlers with ``latency_ms = 1000``, 2 against 1.

    .venv/bin/python bench/bench_scaleout.py [--quick]

Results go to bench/results/scaleout.json (``--quick``: scaleout-quick.json, smaller loads).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import Counter
from typing import Any

from _common import machine, proc_cpu_s, table, write_results
from bench_relay import Provider, _timed, aiohttp_load, done_at, start_handler, stop_handler

from rlmq.loadtest import SpawnedHandler, echo_config, spawn_handler
from rlmq.protocol import AsyncHandlerClient

PROMPT = "Say something short about the number {i}."


async def front_load(address: str, n: int, model: str) -> tuple[float, Counter[str], int]:
    async with AsyncHandlerClient(address, timeout_s=180.0) as client:
        await client.complete("warm up", model=model, timeout_s=60)
        # Every handler connected before the burst, so that the first does not take it all.
        for _ in range(200):
            if len(client.live()) == len(client.addresses):
                break
            await asyncio.sleep(0.01)

        async def one(i: int) -> None:
            reply = await client.complete(PROMPT.format(i=i), model=model, timeout_s=120)
            if not reply.text:
                raise RuntimeError("empty reply")

        wall, errors = await _timed(n, one)
        return wall, errors, client.resent


def measure(handlers: list[SpawnedHandler], n: int, model: str, extra_pids: list[int]) -> dict[str, Any]:
    pids = [h.process.pid for h in handlers]
    before = [proc_cpu_s(p) for p in pids]
    others0 = [proc_cpu_s(p) for p in extra_pids]
    gen0 = proc_cpu_s(os.getpid())
    wall, errors, resent = asyncio.run(front_load(",".join(h.address for h in handlers), n, model))
    cpu = [round(proc_cpu_s(p) - b, 2) for p, b in zip(pids, before, strict=True)]
    return {
        "handlers": len(handlers),
        "in_flight": n,
        "wall_s": round(wall, 3),
        "throughput_rps": round(n / wall, 1),
        "errors": dict(errors),
        "resent": resent,
        "handler_cpu_s": cpu,
        "handler_cpu_s_total": round(sum(cpu), 2),
        "provider_cpu_s": [round(proc_cpu_s(p) - b, 2) for p, b in zip(extra_pids, others0, strict=True)],
        "generator_cpu_s": round(proc_cpu_s(os.getpid()) - gen0, 2),
        "done_at_s": done_at(),
    }


def anthropic_path(n: int) -> list[dict[str, Any]]:
    out = []
    for count in (1, 2):
        provider = Provider()
        hs: list[SpawnedHandler] = []
        try:
            hs = [start_handler("anthropic", provider.url, n) for _ in range(count)]
            out.append({"server": f"anthropic x{count}", **measure(hs, n, "m", [provider.pid])})
        finally:
            for h in hs:
                stop_handler(h)
            provider.stop()
    provider = Provider()
    try:
        p0, g0 = proc_cpu_s(provider.pid), proc_cpu_s(os.getpid())
        wall, errors = asyncio.run(aiohttp_load(provider.url, n))
        out.append(
            {
                "server": "plain aiohttp",
                "handlers": 0,
                "in_flight": n,
                "wall_s": round(wall, 3),
                "throughput_rps": round(n / wall, 1),
                "errors": dict(errors),
                "provider_cpu_s": [round(proc_cpu_s(provider.pid) - p0, 2)],
                "generator_cpu_s": round(proc_cpu_s(os.getpid()) - g0, 2),
                "done_at_s": done_at(),
            }
        )
    finally:
        provider.stop()
    return out


def echo_path(n: int) -> list[dict[str, Any]]:
    out = []
    for count in (1, 2):
        hs: list[SpawnedHandler] = []
        try:
            hs = [spawn_handler(echo_config(1000.0, alias="e"), env=os.environ) for _ in range(count)]
            out.append({"server": f"echo 1 s x{count}", **measure(hs, n, "e", [])})
        finally:
            for h in hs:
                h.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller loads, for a smoke run")
    args = parser.parse_args()
    a_n, b_n = (300, 1000) if args.quick else (3000, 10_000)
    rows = anthropic_path(a_n) + echo_path(b_n)
    print(
        table(
            ["setup", "in flight", "wall s", "req/s", "handler CPU s", "provider CPU", "gen CPU s", "errors"],
            [
                [
                    r["server"],
                    r["in_flight"],
                    r["wall_s"],
                    r["throughput_rps"],
                    " + ".join(str(c) for c in r.get("handler_cpu_s", [])) or "-",
                    " + ".join(str(c) for c in r.get("provider_cpu_s", [])) or "-",
                    r["generator_cpu_s"],
                    sum(r["errors"].values()),
                ]
                for r in rows
            ],
        )
    )
    path = write_results("scaleout", {"machine": machine(), "rows": rows}, quick=args.quick)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
