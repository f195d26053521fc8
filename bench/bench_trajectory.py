"""Trajectory size, schema 1 against schema 2, and the cost of recording one sub-call.

A 30-iteration run on the in-memory fakes (rlmq.orchestrator.testing): each iteration's code
prints about 2,000 characters and makes a batch of 10 sub-calls. Schema 2 is the file the run
wrote; schema 1 is the same run laid out as before issue 15 (the whole message list on every
``model_call``, rebuilt with ``rebuild_history``; one ``exec`` event per block; no sub-call
records). Then the time ``Trajectory.write`` takes for one ``sub_call`` event, to a real file.

    .venv/bin/python bench/bench_trajectory.py [--iterations 30] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rlmq.orchestrator.loop import RLM
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.testing import InMemorySandbox, ScriptedModelClient
from rlmq.orchestrator.trajectory import Trajectory, read_events, rebuild_history
from rlmq.protocol import Usage
from rlmq.protocol.sandbox import SubCall, prompt_sha256

CODE = (
    "```repl\nchunk = context[{i} * 200:({i} + 1) * 200]\n"
    "answers = llm_query_batched([f'part {{j}}: ' + chunk for j in range(10)])\n"
    "print('x' * 2000)\n```"
)


def _line(event: dict[str, Any]) -> int:
    return len(json.dumps(event, ensure_ascii=False, default=str)) + 1


def v1_size(events: list[dict[str, Any]]) -> int:
    """The bytes of the same run in the schema-1 layout."""
    histories = {"0": iter(rebuild_history(events, "0"))}
    size = 0
    starts: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in events:
        kind = e["event"]
        if kind == "sub_call":
            continue  # schema 1 had none
        if kind == "exec_start":
            starts[(e["level"], e["iteration"], e["block"])] = e
            continue
        old = {k: v for k, v in e.items() if k != "level"}
        if kind == "model_call":
            old.pop("added", None)
            old.pop("reset", None)
            old["messages"] = next(histories[e["level"]])
        elif kind == "exec_end":
            old["event"] = "exec"
            old["code"] = starts[(e["level"], e["iteration"], e["block"])]["code"]
        size += _line(old)
    return size


async def run(iterations: int, path: Path) -> None:
    model = ScriptedModelClient()
    model.script("bench", [CODE.format(i=i) for i in range(iterations)] + ["FINAL(done)"])
    settings = RunSettings(max_iterations=iterations + 1, history_max_chars=10_000_000)
    trajectory = Trajectory(path)
    try:
        await RLM(model, InMemorySandbox(model), settings).run(
            "Q?", "c" * 20_000, run_id="bench", trajectory=trajectory
        )
    finally:
        trajectory.close()


def write_cost_us(path: Path, n: int) -> float:
    """Microseconds per recorded sub-call: the record's wire form, the JSON line, the flush."""
    record = SubCall(
        seq=0,
        model="sub",
        depth=1,
        prompt="p" * 1_000,
        prompt_tail="q" * 1_000,
        prompt_chars=50_000,
        prompt_sha256=prompt_sha256([("user", "p")]),
        text="an answer of a sub-call, " * 8,
        usage=Usage(12_500, 50),
        cost_usd=0.0,
        cached=False,
        error=None,
        started_ms=1.5,
        latency_ms=420.0,
    )
    trajectory = Trajectory(path)
    trajectory.events = _Discard()  # the bench measures the file, not the in-memory copy
    started = time.perf_counter()
    for i in range(n):
        trajectory.write("sub_call", level="0", iteration=1, block=i % 3, **record.to_wire())
    elapsed = time.perf_counter() - started
    trajectory.close()
    return elapsed / n * 1e6


class _Discard(list[dict[str, Any]]):
    def append(self, _: dict[str, Any]) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.jsonl"
        asyncio.run(run(args.iterations, path))
        events = read_events(path)
        v2 = path.stat().st_size
        v1 = v1_size(events)
        subs = sum(1 for e in events if e["event"] == "sub_call")
        v2_without_subs = v2 - sum(_line(e) for e in events if e["event"] == "sub_call")
        us = write_cost_us(Path(tmp) / "writes.jsonl", args.writes)
    figures = {
        "iterations": args.iterations,
        "sub_calls": subs,
        "v1_bytes": v1,
        "v2_bytes": v2,
        "v2_bytes_without_sub_calls": v2_without_subs,
        "v1_over_v2": round(v1 / v2, 1),
        "sub_call_write_us": round(us, 1),
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{args.iterations} iterations, {subs} sub-calls recorded")
    print(f"schema 1 layout: {v1:,} bytes")
    print(
        f"schema 2:        {v2:,} bytes ({v2_without_subs:,} without the sub-call records); "
        f"{v1 / v2:.1f}x smaller"
    )
    print(f"recording one sub-call: {us:.1f} us (SubCall.to_wire, JSON line, flush)")


if __name__ == "__main__":
    main()
