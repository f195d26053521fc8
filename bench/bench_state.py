"""What shared state (Redis) adds to each call's admission and settlement, next to in-process state.

In one run, against a redis-server this script starts on a free loopback port (persistence off):

- ``memory (pipeline)``: what the handler's zero-latency path does per call with in-process state:
  ``RunTable.held``, ``Run.admit_call``, ``Run.finish`` and the kept reply, as plain calls.
- ``memory (async)``: the same through the async ``State`` interface.
- ``redis``: ``RedisState.admit`` and ``RedisState.settle``, one call at a time (the latency one
  call pays), each one round trip to Redis.
- ``redis, N in flight``: N admissions and then N settlements issued together (the handler's
  burst case; they go out as pipelines): wall time per call.

Figures are microseconds per call, p50 and p90 over ``--calls`` calls (after a warm-up). Target:
Redis adds under 200 us at p50 (admission + settlement).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from rlmq.lmhandler.accounting import RunTable
from rlmq.lmhandler.config import StateConfig
from rlmq.lmhandler.state import MemoryState, ReplayStore, make_state
from rlmq.protocol import CompleteReply, RunLimits, Usage, encode

REPLY = bytes(encode(CompleteReply("id", "an answer of a few words", "m", Usage(120, 30))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:  # no readiness event: poll PING, bounded
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as c:
                c.sendall(b"*1\r\n$4\r\nPING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("redis-server did not start")
        time.sleep(0.02)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def row(name: str, admit: list[float], settle: list[float]) -> dict[str, float | str]:
    both = [a + s for a, s in zip(admit, settle, strict=True)]
    return {
        "name": name,
        "admit_p50": pct(admit, 0.5),
        "admit_p90": pct(admit, 0.9),
        "settle_p50": pct(settle, 0.5),
        "settle_p90": pct(settle, 0.9),
        "both_p50": pct(both, 0.5),
        "both_p90": pct(both, 0.9),
    }


def memory_pipeline(calls: int) -> tuple[list[float], list[float]]:
    runs = RunTable()
    replays = ReplayStore(600.0, 100_000)
    runs.open_run("r", RunLimits(max_calls=10 * calls))
    admit: list[float] = []
    settle: list[float] = []
    clock = time.perf_counter
    usage = Usage(120, 30)
    for i in range(calls):
        rid = f"q{i}"
        t0 = clock()
        run = runs.held("r", None)
        if replays.get("r", rid, "m") is None:
            run.admit_call(4096, 120.0)
        t1 = clock()
        run.finish(usage, 0.0)
        replays.put("r", rid, "m", REPLY)
        t2 = clock()
        admit.append((t1 - t0) * 1e6)
        settle.append((t2 - t1) * 1e6)
    return admit, settle


async def sequential(state: object, calls: int) -> tuple[list[float], list[float]]:
    from rlmq.lmhandler.state import State

    assert isinstance(state, MemoryState) or hasattr(state, "admit")
    st: State = state  # type: ignore[assignment]
    run = f"bench-{time.time_ns()}"
    await st.run_open(run, RunLimits(max_calls=10 * calls), None)
    admit: list[float] = []
    settle: list[float] = []
    clock = time.perf_counter
    usage = Usage(120, 30)
    for i in range(calls):
        rid = f"q{i}"
        t0 = clock()
        await st.admit(run, None, rid, "m", 4096, 120.0)
        t1 = clock()
        await st.settle(run, rid, "m", usage, 0.0, REPLY)
        t2 = clock()
        admit.append((t1 - t0) * 1e6)
        settle.append((t2 - t1) * 1e6)
    return admit, settle


async def burst(url: str, in_flight: int, rounds: int) -> tuple[list[float], list[float]]:
    """Per-call wall time of ``in_flight`` admissions issued together, then their settlements."""
    st = make_state(StateConfig(url=url, key_prefix="bench-burst:", timeout_s=30))
    await st.start()
    admit: list[float] = []
    settle: list[float] = []
    try:
        for r in range(rounds):
            run = f"burst-{r}-{time.time_ns()}"
            await st.run_open(run, RunLimits(), None)
            ids = [f"q{i}" for i in range(in_flight)]
            t0 = time.perf_counter()
            await asyncio.gather(*(st.admit(run, None, rid, "m", 4096, 120.0) for rid in ids))
            t1 = time.perf_counter()
            await asyncio.gather(*(st.settle(run, rid, "m", Usage(120, 30), 0.0, REPLY) for rid in ids))
            t2 = time.perf_counter()
            admit.append((t1 - t0) * 1e6 / in_flight)
            settle.append((t2 - t1) * 1e6 / in_flight)
    finally:
        await st.aclose()
    return admit, settle


async def with_state(
    make: Callable[[], object], fn: Callable[[object], Awaitable[tuple[list[float], list[float]]]]
) -> tuple[list[float], list[float]]:
    st = make()
    await st.start()  # type: ignore[attr-defined]
    try:
        return await fn(st)
    finally:
        await st.aclose()  # type: ignore[attr-defined]


async def ping_floor(url: str, calls: int) -> tuple[list[float], list[float]]:
    """The round trip the machine allows: a bare PING through redis-py's asyncio client, and
    through a plain blocking socket (us). Admission and settlement are one round trip each, so
    twice the first is the least they can cost one call at a time."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        await client.ping()
        via_client = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await client.execute_command("PING")  # type: ignore[no-untyped-call]
            via_client.append((time.perf_counter() - t0) * 1e6)
    finally:
        await client.aclose()
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    raw = []
    with socket.create_connection((host, int(port))) as sock:
        for _ in range(calls):
            t0 = time.perf_counter()
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            sock.recv(16)
            raw.append((time.perf_counter() - t0) * 1e6)
    return via_client, raw


async def measure(url: str, calls: int, in_flight: int) -> list[dict[str, float | str]]:
    rows = []
    memory_pipeline(1_000)  # warm-up
    rows.append(row("memory (pipeline)", *memory_pipeline(calls)))
    rows.append(row("memory (async)", *await with_state(MemoryState, lambda s: sequential(s, calls))))

    def redis() -> object:
        return make_state(StateConfig(url=url, key_prefix=f"bench-{time.time_ns()}:"))

    await with_state(redis, lambda s: sequential(s, 500))  # warm-up: connections, scripts loaded
    rows.append(row("redis", *await with_state(redis, lambda s: sequential(s, calls))))
    rows.append(
        row(f"redis, {in_flight} in flight", *await burst(url, in_flight, max(5, calls // in_flight)))
    )
    via_client, raw = await ping_floor(url, calls)
    rows.append(row("PING: redis-py / socket", via_client, raw))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=5_000, help="calls measured per case")
    parser.add_argument(
        "--in-flight", type=int, default=1_000, help="calls issued together in the burst case"
    )
    parser.add_argument("--uvloop", action="store_true", help="run under uvloop")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("needs redis-server (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="rlmq-bench-redis-") as tmp:
        proc, url = start_redis(Path(tmp))
        try:
            if args.uvloop:
                import uvloop

                rows = uvloop.run(measure(url, args.calls, args.in_flight))
            else:
                rows = asyncio.run(measure(url, args.calls, args.in_flight))
        finally:
            proc.kill()
            proc.wait()
    print(f"admission and settlement, us per call ({args.calls} calls; p50 / p90)")
    print(f"{'state':<26}{'admit':>16}{'settle':>16}{'both':>16}")
    for r in rows:
        cells = [f"{r[k + '_p50']:7.1f} /{r[k + '_p90']:7.1f}" for k in ("admit", "settle", "both")]
        print(f"{r['name']!s:<26}" + "".join(f"{c:>16}" for c in cells))
    base = statistics.fmean([float(rows[0]["both_p50"])])
    added = float(rows[2]["both_p50"]) - base
    print(f"Redis adds {added:.1f} us at p50 per call (target: under 200 us)")
    print("(last row: a bare PING round trip, redis-py under 'admit', a plain socket under 'settle')")


if __name__ == "__main__":
    main()
