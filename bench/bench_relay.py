"""The HTTP relay path: the handler relaying ``complete`` to a (fake) provider, with thousands in flight.

Three processes share the machine: the handler (``rlmq handler``, anthropic or openai backend),
the fake provider (``rlmq fake-provider``, 1 s latency) and this script, the load generator, which
sends all N requests at once through one DEALER (``AsyncHandlerClient``) and waits for every reply.
Wall time runs from the first send to the last reply. Next to it, in the same run and against the
same kind of fresh provider: **plain aiohttp**, an ``aiohttp.ClientSession`` in the generator
posting the same OpenAI-shaped request straight to the provider (connector limit = N), i.e. the
floor for "N HTTP requests with 1 s latency from one Python process".

The handler's CPU seconds (utime + stime of /proc/PID/stat, during the measurement only) and peak
RSS (VmHWM, fresh handler per measurement) are reported, with the generator's and the provider's
CPU seconds, to see which process is the bottleneck.

Then two fault runs: (a) a provider answering 20% of requests with 429 + retry-after 1 s, and (b)
a provider allowing 300 requests/s with the handler paced at ``rpm = 15000``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from _common import machine, mean, proc_cpu_s, proc_status_mb, table, write_results

from rlmq.loadtest import SpawnedHandler, read_line, spawn_handler, stop_process
from rlmq.protocol import AsyncHandlerClient

LATENCY_S = 1.0
API_KEY = "bench-relay-key"
KEY_ENV = "RLMQ_BENCH_RELAY_KEY"
PROMPT = "Say something short about the number {i}."
HOST = "127.0.0.1"


# -- processes ---------------------------------------------------------------------------------------


class Provider:
    """``rlmq fake-provider`` in its own process."""

    def __init__(self, *extra: str, latency_s: float = LATENCY_S) -> None:
        argv = [
            sys.executable,
            "-m",
            "rlmq",
            "fake-provider",
            "--host",
            HOST,
            "--port",
            "0",
            "--latency-s",
            str(latency_s),
            "--api-key",
            API_KEY,
            "--seed",
            "1",
            *extra,
        ]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=_env()
        )
        line = read_line(self.process, 30.0)
        if not line or not line.startswith("fake-provider listening on "):
            self.stop()
            raise RuntimeError(f"fake provider did not start: {line!r}")
        self.url = line.split()[-1]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process, 10.0)


def _env() -> dict[str, str]:
    return {**os.environ, KEY_ENV: API_KEY, "PYTHONUNBUFFERED": "1"}


def handler_config(backend: str, url: str, concurrency: int, extra: str = "") -> str:
    base_url = url if backend == "anthropic" else url + "/v1"
    return (
        "[models.m]\n"
        f'backend = "{backend}"\n'
        f'base_url = "{base_url}"\n'
        'model = "m"\n'
        f'api_key_env = "{KEY_ENV}"\n'
        f"max_concurrency = {concurrency}\n"
        "timeout_s = 60\n"
        f"{extra}"
    )


def start_handler(backend: str, url: str, concurrency: int, extra: str = "") -> SpawnedHandler:
    return spawn_handler(handler_config(backend, url, concurrency, extra), env=_env())


def stop_handler(handler: SpawnedHandler) -> None:
    try:
        handler.stop()
    finally:
        stop_process(handler.process, 10.0)  # no-op when already gone


# -- load --------------------------------------------------------------------------------------------


DONE: list[float] = []  # seconds from the first send at which each reply came, of the last run


async def _timed(n: int, one: Callable[[int], Awaitable[None]]) -> tuple[float, Counter[str]]:
    """Start all ``n`` at once; the wall time from the first send to the last reply, and errors."""
    errors: Counter[str] = Counter()
    DONE.clear()

    async def wrapped(i: int) -> None:
        try:
            await one(i)
        except Exception as exc:  # counted, never raised: one bad reply must not end the run
            code = getattr(exc, "code", None)
            errors[str(getattr(code, "value", code) or type(exc).__name__)] += 1
        DONE.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(wrapped(i) for i in range(n)))
    return time.perf_counter() - start, errors


def done_at() -> dict[str, float]:
    """When 50%, 90%, 99% and all of the replies had come, in seconds from the first send."""
    t = sorted(DONE)
    if not t:
        return {}
    points = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
    at = {q: round(t[min(len(t) - 1, int(f * len(t)))], 2) for q, f in points}
    return {**at, "all": round(t[-1], 2)}


async def relay_load(address: str, n: int) -> tuple[float, Counter[str], dict[str, Any]]:
    async with AsyncHandlerClient(address, timeout_s=120.0) as client:
        await client.complete("warm up", model="m", timeout_s=60)

        async def one(i: int) -> None:
            reply = await client.complete(PROMPT.format(i=i), model="m", timeout_s=60)
            if not reply.text:
                raise RuntimeError("empty reply")

        wall, errors = await _timed(n, one)
        stats = await client.stats()
    return wall, errors, stats


async def aiohttp_load(url: str, n: int) -> tuple[float, Counter[str]]:
    connector = aiohttp.TCPConnector(limit=n)
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        endpoint = url + "/v1/chat/completions"

        async def one(i: int) -> None:
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": PROMPT.format(i=i)}],
                "max_tokens": 4096,
            }
            async with session.post(endpoint, json=body) as resp:
                data = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                if not data["choices"][0]["message"]["content"]:
                    raise RuntimeError("empty reply")

        await one(-1)  # warm up, like the relay's first request
        return await _timed(n, one)


async def provider_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url + "/stats") as resp:
        return dict(await resp.json())


# -- measurements ------------------------------------------------------------------------------------


def measure_relay(backend: str, n: int) -> dict[str, Any]:
    provider = Provider()
    handler: SpawnedHandler | None = None
    try:
        handler = start_handler(backend, provider.url, max(n, 1))
        hpid = handler.process.pid
        rss_idle = proc_status_mb(hpid, "VmRSS")
        h0, p0, g0 = proc_cpu_s(hpid), proc_cpu_s(provider.pid), proc_cpu_s(os.getpid())
        wall, errors, stats = asyncio.run(relay_load(handler.address, n))
        h1, p1, g1 = proc_cpu_s(hpid), proc_cpu_s(provider.pid), proc_cpu_s(os.getpid())
        peak = proc_status_mb(hpid, "VmHWM")
    finally:
        if handler is not None:
            stop_handler(handler)
        provider.stop()
    model = stats.get("models", {}).get("m", {})
    return {
        "server": f"handler-{backend}",
        "in_flight": n,
        "wall_s": round(wall, 3),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "handler_cpu_s": round(h1 - h0, 2),
        "handler_cpu_s_per_1k": round((h1 - h0) / n * 1000, 3),
        "provider_cpu_s": round(p1 - p0, 2),
        "generator_cpu_s": round(g1 - g0, 2),
        "rss_idle_mb": rss_idle,
        "rss_peak_mb": peak,
        "done_at_s": done_at(),
        "handler_stats": {
            k: model.get(k)
            for k in ("sent", "retries", "rate_limited", "errors", "latency_ms", "concurrency", "breaker")
        },
    }


def measure_aiohttp(n: int) -> dict[str, Any]:
    provider = Provider()
    try:
        p0, g0 = proc_cpu_s(provider.pid), proc_cpu_s(os.getpid())
        wall, errors = asyncio.run(aiohttp_load(provider.url, n))
        p1, g1 = proc_cpu_s(provider.pid), proc_cpu_s(os.getpid())
    finally:
        provider.stop()
    return {
        "server": "aiohttp",
        "in_flight": n,
        "wall_s": round(wall, 3),
        "done_at_s": done_at(),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "provider_cpu_s": round(p1 - p0, 2),
        "generator_cpu_s": round(g1 - g0, 2),
    }


def measure_fault(
    name: str, n: int, provider_args: list[str], latency_s: float, extra: str
) -> dict[str, Any]:
    provider = Provider(*provider_args, latency_s=latency_s)
    handler: SpawnedHandler | None = None
    try:
        handler = start_handler("openai", provider.url, n, extra)
        hpid = handler.process.pid
        h0 = proc_cpu_s(hpid)
        wall, errors, stats = asyncio.run(relay_load(handler.address, n))
        h1 = proc_cpu_s(hpid)
        pstats = asyncio.run(provider_stats(provider.url))
    finally:
        if handler is not None:
            stop_handler(handler)
        provider.stop()
    model = stats.get("models", {}).get("m", {})
    return {
        "fault": name,
        "provider_args": provider_args,
        "latency_s": latency_s,
        "handler_extra": extra.strip(),
        "requests": n,
        "wall_s": round(wall, 3),
        "ok": n - sum(errors.values()),
        "errors": dict(errors),
        "handler_cpu_s": round(h1 - h0, 2),
        "sent": model.get("sent"),
        "retries": model.get("retries"),
        "rate_limited": model.get("rate_limited"),
        "handler_errors": model.get("errors"),
        "concurrency": model.get("concurrency"),
        "done_at_s": done_at(),
        "provider_by_status": pstats.get("by_status"),
        "provider_429": (pstats.get("by_status") or {}).get("429", 0),
    }


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = dict(sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2])
    best["rounds_wall_s"] = [r["wall_s"] for r in runs]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100, 1_000, 3_000, 5_000])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--no-faults", action="store_true")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    sizes = [100, 1_000] if args.quick else args.sizes
    fault_a_n, fault_b_n = (300, 500) if args.quick else (1_000, 2_000)

    kinds: list[tuple[str, Callable[[int], dict[str, Any]]]] = [
        ("aiohttp", measure_aiohttp),
        ("handler-openai", lambda n: measure_relay("openai", n)),
        ("handler-anthropic", lambda n: measure_relay("anthropic", n)),
    ]
    results: list[dict[str, Any]] = []
    rows = []
    for n in sizes:
        per_kind: dict[str, list[dict[str, Any]]] = {k: [] for k, _ in kinds}
        for _ in range(rounds):  # interleaved: every kind once per round
            for name, fn in kinds:
                r = fn(n)
                per_kind[name].append(r)
                print(
                    f"{n:>6} in flight, {name}: {r['wall_s']:.3f} s, errors {r['error_count']}, "
                    f"handler CPU {r.get('handler_cpu_s', '-')} s, generator CPU {r['generator_cpu_s']} s, "
                    f"provider CPU {r['provider_cpu_s']} s, peak RSS {r.get('rss_peak_mb', '-')} MB",
                    flush=True,
                )
        for name, _ in kinds:
            best = median(per_kind[name])
            # the ratio of each round to the aiohttp of the same round, median of those
            ratios = sorted(
                r["wall_s"] / b["wall_s"] for r, b in zip(per_kind[name], per_kind["aiohttp"], strict=True)
            )
            best["vs_aiohttp"] = round(ratios[(len(ratios) - 1) // 2], 2)
            results.append(best)
            relay = name != "aiohttp"
            rows.append(
                [
                    f"{n:,}",
                    name,
                    f"{best['wall_s']:.3f}",
                    f"{best['vs_aiohttp']:.2f}" if relay else "1.00",
                    best["error_count"],
                    f"{best['handler_cpu_s_per_1k']:.2f}" if relay else "-",
                    f"{best['rss_peak_mb']:.0f}" if relay else "-",
                    f"{best['generator_cpu_s']:.2f}",
                    f"{best['provider_cpu_s']:.2f}",
                ]
            )
    print()
    print(
        table(
            [
                "in flight",
                "path",
                "wall s",
                "/ aiohttp",
                "errors",
                "handler CPU s / 1k req",
                "handler peak RSS MB",
                "generator CPU s",
                "provider CPU s",
            ],
            rows,
        )
    )

    faults: list[dict[str, Any]] = []
    if not args.no_faults:
        faults.append(
            measure_fault(
                "429 x 20%, retry-after 1 s",
                fault_a_n,
                ["--rate-limit-fraction", "0.2", "--retry-after-s", "1"],
                LATENCY_S,
                "",
            )
        )
        faults.append(
            measure_fault("max 300 rps, rpm = 15000", fault_b_n, ["--max-rps", "300"], 0.05, "rpm = 15000\n")
        )
        frows = []
        for f in faults:
            print(f"fault {f['fault']}: {f}", flush=True)
            frows.append(
                [
                    f["fault"],
                    f"{f['requests']:,}",
                    f"{f['wall_s']:.2f}",
                    f"{f['ok']:,}",
                    sum(f["errors"].values()),
                    f["sent"],
                    f["retries"],
                    f["rate_limited"],
                    f["provider_429"],
                    " / ".join(str(f["done_at_s"].get(k, "-")) for k in ("p50", "p90", "all")),
                    "{} ({} halvings)".format(
                        (f["concurrency"] or {}).get("limit"), (f["concurrency"] or {}).get("decreases")
                    ),
                ]
            )
        print()
        print(
            table(
                [
                    "fault (openai backend)",
                    "requests",
                    "wall s",
                    "ok",
                    "errors",
                    "sent",
                    "retries",
                    "rate_limited",
                    "provider 429s",
                    "50% / 90% / all done s",
                    "slots limit at end",
                ],
                frows,
            )
        )

    path = write_results(
        "relay",
        {
            "bench": "relay",
            "machine": machine(),
            "latency_s": LATENCY_S,
            "rounds": rounds,
            "results": results,
            "faults": faults,
            "generator_cpu_mean_s": round(mean([r["generator_cpu_s"] for r in results]), 2),
        },
        quick=args.quick,
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
