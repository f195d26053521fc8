"""Run ``rlmq ...`` with a chosen event loop: ``python bench/run_handler.py --loop uvloop handler ...``.

The handler's own command line has no event-loop setting (yet); the benchmarks use this runner to
measure uvloop against the default asyncio loop with everything else the same.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from rlmq.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args, rest = parser.parse_known_args()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main(rest))
