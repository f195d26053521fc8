"""``rlmq demo``: a whole RLM run, offline, through real handler, pool and worker processes.

It writes a long operations log (about 1M tokens by default) with a few vault access codes hidden
among routine lines and decoys, and asks for every code and their sum. The root model is the
``script`` backend replaying realistic responses shipped with the package (peek, regex
pre-filter, batched sub-calls over chunks, aggregation in Python, FINAL_VAR); sub-calls go to an
``echo`` model. Nothing in the script knows the answer: its code computes it from ``context``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from .errors import ServiceError
from .local import local_services
from .loop import new_run_id
from .runner import run_query
from .settings import RunSettings
from .trajectory import Trajectory

__all__ = ["QUESTION", "add_arguments", "expected_answer", "main", "make_document"]

QUESTION = "The log hides access codes for several vaults. List every vault with its code, and give the sum."

NAMES = ["Orion", "Lyra", "Vega", "Draco", "Altair", "Rigel", "Sirius", "Carina", "Perseus", "Auriga"]
SERVICES = ["api", "db", "cache", "queue", "auth", "billing", "search", "ingest"]
ROUTINE = [
    "request {id} served in {ms} ms",
    "health check ok, {n} connections open",
    "cache hit ratio {pct}% over the last minute",
    "rotated log segment {id}",
    "user session {id} refreshed",
    "queue depth {n}, consumers {m}",
    "gc pause {ms} ms",
]
DECOYS = [
    "vault {name} maintenance window scheduled for next week",
    "access code rotation policy reviewed, no changes",
    "vault {name} door sensor recalibrated",
]

CONFIG = """# Written by `rlmq demo`: offline models.
[models.root]
backend = "script"
path = "{script}"

[models.sub]
backend = "echo"
latency_ms = {sub_latency_ms}

[run]
max_iterations = 10
"""


def make_document(tokens: int, *, seed: int = 7, vaults: int = 6) -> tuple[str, dict[str, int]]:
    """A log of about ``tokens`` tokens (4 characters each) and the codes hidden in it."""
    rng = random.Random(seed)
    codes = {name: rng.randint(1000, 9999) for name in rng.sample(NAMES, vaults)}
    target_chars = tokens * 4
    lines: list[str] = []
    size = 0
    second = 0
    while size < target_chars:
        second += rng.randint(1, 3)
        day, clock = (
            1 + second // 86400 % 28,
            f"{second // 3600 % 24:02d}:{second // 60 % 60:02d}:{second % 60:02d}",
        )
        stamp = f"2026-03-{day:02d} {clock}"
        template = rng.choice(DECOYS) if rng.random() < 0.002 else rng.choice(ROUTINE)
        body = template.format(
            id=f"{rng.getrandbits(32):08x}",
            ms=rng.randint(1, 900),
            n=rng.randint(1, 500),
            m=rng.randint(1, 16),
            pct=rng.randint(40, 99),
            name=rng.choice(NAMES),
        )
        line = f"{stamp} [{rng.choice(SERVICES)}-{rng.randint(1, 9)}] INFO {body}"
        lines.append(line)
        size += len(line) + 1
    # The facts go in at random places, each once.
    for name, code in codes.items():
        at = rng.randrange(len(lines))
        lines.insert(
            at, f"{lines[at][:19]} [security-1] NOTICE vault {name} was assigned access code {code} by ops"
        )
    return "\n".join(lines) + "\n", codes


def expected_answer(codes: dict[str, int]) -> str:
    return ", ".join(f"{n}={c}" for n, c in sorted(codes.items())) + f"; sum={sum(codes.values())}"


def is_correct(answer: str, codes: dict[str, int]) -> bool:
    found = {name: int(code) for name, code in re.findall(r"([A-Z][a-z]+)=(\d{4})", answer)}
    total = re.search(r"sum=(\d+)", answer)
    return found == codes and total is not None and int(total.group(1)) == sum(codes.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokens",
        type=int,
        default=1_000_000,
        help="document size in tokens, up to 10M (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the document (default: %(default)s)")
    parser.add_argument(
        "--sub-latency-ms",
        type=int,
        default=200,
        help="simulated latency of each sub-call (default: %(default)s)",
    )
    parser.add_argument(
        "--out", help="directory for the document, config and trajectory (default: a new temp dir)"
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _demo(args: argparse.Namespace, out: Path) -> int:
    started = time.monotonic()
    _say(f"writing a {args.tokens:,}-token operations log with hidden vault codes...")
    document, codes = make_document(args.tokens, seed=args.seed)
    doc_path = out / "document.txt"
    doc_path.write_text(document, encoding="utf-8")
    script = resources.files("rlmq.orchestrator") / "data" / "demo_script.json"
    config = out / "rlmq.toml"
    config.write_text(CONFIG.format(script=str(script), sub_latency_ms=args.sub_latency_ms), encoding="utf-8")
    run_id = new_run_id()
    trajectory_path = out / f"{run_id}.jsonl"
    trajectory = Trajectory(trajectory_path)
    _say("starting a handler and a sandbox pool (real processes, ipc sockets)...")
    try:
        async with local_services(config, workers=1) as services:
            _say(f"asking: {QUESTION}")
            result = await run_query(
                QUESTION,
                document,
                handler=services.handler,
                sandbox=services.sandbox,
                settings=RunSettings(max_iterations=10),
                trajectory=trajectory,
                run_id=run_id,
                curve=None,  # private services on ipc:// sockets: CURVE is for TCP only
                context_path=str(doc_path.resolve()),  # for rlmq replay
            )
    finally:
        trajectory.close()
    correct = is_correct(result.answer, codes)
    usage = result.usage
    print(f"answer:   {result.answer}")
    print(f"expected: {expected_answer(codes)}")
    print(f"correct:  {'yes' if correct else 'NO'}")
    calls = f"{usage.calls} model calls" if usage else "model calls unknown"
    print(
        f"run:      {result.stop_reason} after {result.iterations} iterations, {calls}, "
        f"{time.monotonic() - started:.1f} s in all"
    )
    print(f"trajectory: {trajectory_path}")
    print(f"document:   {doc_path}")
    print(f"see it:     rlmq view {trajectory_path}")
    print(f"replay it:  rlmq replay {trajectory_path} --config {config}")
    print(
        "\nWith a real model: put [models.root] and [models.sub] in rlmq.toml (see README), then\n"
        f"  rlmq run --config rlmq.toml --query {QUESTION!r} --context {doc_path}"
    )
    return 0 if correct else 1


def main(args: argparse.Namespace) -> int:
    if not 1_000 <= args.tokens <= 10_000_000:
        print("rlmq demo: --tokens must be between 1,000 and 10,000,000", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rlmq-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(_demo(args, out))
    except ServiceError as exc:
        print(f"rlmq demo: {exc.message}", file=sys.stderr)
        return 1
