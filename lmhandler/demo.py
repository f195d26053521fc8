"""``rlmq demo`` (handler stage): a real handler process relaying a burst of calls, offline.

Shows what the handler does for every RLM run: concurrent relay, per-run budgets and usage.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol import AsyncHandlerClient, RemoteError, RunLimits

__all__ = ["add_arguments", "main"]

CONFIG = """
[models.sub]
backend = "echo"
latency_ms = {latency_ms}
price_in_per_mtok = 3.0
price_out_per_mtok = 15.0
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calls", type=int, default=500, help="sub-calls to relay at once (default: %(default)s)"
    )
    parser.add_argument(
        "--latency-ms", type=int, default=300, help="simulated model latency (default: %(default)s)"
    )


async def _drive(address: str, calls: int, latency_ms: int) -> None:
    async with AsyncHandlerClient(address, timeout_s=60) as client:
        await client.run_open("demo", RunLimits(max_calls=calls))
        started = time.monotonic()
        replies = await asyncio.gather(
            *(client.complete(f"chunk {i}", model="sub", run="demo") for i in range(calls))
        )
        elapsed = time.monotonic() - started
        wrong = sum(r.text != f"chunk {i}" for i, r in enumerate(replies))
        serial_s = calls * latency_ms / 1000
        print(f"{calls} sub-calls at {latency_ms} ms each: {elapsed:.2f} s (serially: {serial_s:.0f} s)")
        if wrong:
            raise SystemExit(f"{wrong} replies did not match their prompts")
        try:
            await client.complete("one too many", model="sub", run="demo")
        except RemoteError as exc:
            print(f"call {calls + 1} refused by the run's budget: {exc.code}")
        usage = await client.run_close("demo")
        print(
            f"run usage: {usage.calls} calls, {usage.usage.input_tokens} input and "
            f"{usage.usage.output_tokens} output tokens, ${usage.cost_usd:.6f}"
        )


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="rlmq-demo-") as tmp:
        config = Path(tmp) / "rlmq.toml"
        config.write_text(CONFIG.format(latency_ms=args.latency_ms))
        handler = subprocess.Popen(
            [sys.executable, "-m", "rlmq", "handler", "--config", str(config), "--bind", "tcp://127.0.0.1:0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert handler.stdout is not None
            line = handler.stdout.readline()
            if not line.startswith("lmhandler ready on "):
                print("the handler did not start", file=sys.stderr)
                return 1
            address = line.split()[-1]
            print(f"handler process {handler.pid} on {address}")
            asyncio.run(_drive(address, args.calls, args.latency_ms))
        finally:
            handler.terminate()
            handler.wait(timeout=15)
    return 0
