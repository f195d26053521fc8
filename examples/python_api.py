"""rlmq from Python, offline: `python examples/python_api.py`.

The root model replays offline_script.json (the `script` backend) and sub-calls are echoed, so
this runs without a key or a network; put real models in the config and nothing else changes.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from rlmq import RLM, Progress

CONFIG = Path(__file__).with_name("offline.toml")
REVIEWS = [
    "Great battery life, I love it.",
    "Stopped working after a week.",
    "Good value for the price.",
    "The strap broke on day two.",
    "Screen is too dim outdoors.",
]


def show(step: Progress) -> None:
    print("  ..", step.message)


async def two_at_once(rlm: RLM) -> None:
    # Runs on one RLM overlap: each has its own sandbox session and its own budget.
    first, second = await asyncio.gather(
        rlm.acompletion("How many reviews are positive?", REVIEWS),
        rlm.acompletion("How many reviews are positive?", REVIEWS[:2]),
    )
    print("async:", first.answer, "/", second.answer)


def main() -> None:
    with tempfile.TemporaryDirectory() as runs, RLM.from_config(CONFIG, trajectory_dir=runs) as rlm:
        # The private handler and pool start here, on first use, and stop when the block ends.
        result = rlm.completion("How many reviews are positive?", REVIEWS, on_progress=show)
        print("answer:", result.answer)
        print(f"stopped by {result.stop_reason} after {result.iterations} iterations,", end=" ")
        print(f"{result.calls} model calls")
        if result.trajectory is not None:  # every model call, code block and output, as JSON lines
            print("trajectory lines:", len(result.trajectory.read_text().splitlines()))
        asyncio.run(two_at_once(rlm))


if __name__ == "__main__":
    main()
