"""rlmq's handler next to the official RLM implementation's (PyPI ``rlms``): relay throughput.

The official package is installed into its own virtualenv (``bench/results/.venv-rlms``, made
on first run; ``--venv`` to use another) and driven through its public API by
``bench/rlms_driver.py``: its ``LMHandler`` serves a ``BaseLM`` mock that echoes the prompt after
the same latency as rlmq's ``echo`` model, and the load is made the way its REPL environments
make sub-calls (``send_lm_request`` per ``llm_query``, ``send_lm_request_batched`` per
``llm_query_batched``). rlmq gets the same load shape from ``rlmq loadtest`` (closed loop, same
requests in flight, same prompt size, same number of client processes) and ``HandlerClient``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    BENCH,
    RESULTS,
    Server,
    load,
    machine,
    ratio,
    start_handler,
    table,
    write_results,
)

from rlmq.loadtest import summarize
from rlmq.protocol import HandlerClient

DRIVER = BENCH / "rlms_driver.py"


def ensure_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        print(f"installing rlms into {path} (first run only)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "rlms"], check=True)
    return python


def rlms_version(python: Path) -> str:
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('rlms'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def start_rlms(python: Path, latency_ms: float) -> Server:
    proc = subprocess.Popen(
        [str(python), str(DRIVER), "serve", "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ready on "):
        proc.kill()
        raise RuntimeError(f"rlms LMHandler did not start: {line!r}")

    def stop() -> None:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    return Server("rlms", proc, line.split()[-1], stop)


def load_rlms(
    python: Path, server: Server, *, requests: int, concurrency: int, processes: int, prompt_bytes: int = 16
) -> dict[str, Any]:
    """``processes`` client processes with ``concurrency / processes`` threads each, started together."""
    processes = max(1, min(processes, concurrency))
    share = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    reqs = [requests // processes + (i < requests % processes) for i in range(processes)]
    procs = [
        subprocess.Popen(
            [
                str(python),
                str(DRIVER),
                "load",
                "--address",
                server.address,
                "--requests",
                str(reqs[i]),
                "--concurrency",
                str(share[i]),
                "--prompt-bytes",
                str(prompt_bytes),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("rlms load process did not start")
    overflows = _listen_overflows()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        results.append(json.loads(out.strip().splitlines()[-1]))
    latencies = [x for r in results for x in r["latencies_ms"]]
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    ok = sum(r["ok"] for r in results)
    elapsed = max(r["last_reply"] for r in results) - min(r["first_send"] for r in results)
    return {
        "server": "rlms",
        "ok": ok,
        "errors": errors,
        "elapsed_s": round(elapsed, 6),
        "throughput_rps": round((ok + sum(errors.values())) / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": summarize(latencies),
        "processes": processes,
        # Connections the kernel refused because LMHandler's accept queue (5) was full.
        "listen_overflows": (_listen_overflows() or 0) - (overflows or 0),
    }


def batch_rlms(python: Path, server: Server, size: int) -> float:
    out = subprocess.run(
        [str(python), str(DRIVER), "batch", "--address", server.address, "--size", str(size)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["ok"] != size:
        raise RuntimeError(f"rlms batch answered {result['ok']} of {size}")
    return float(result["elapsed_s"])


def batch_rlmq(server: Server, size: int) -> float:
    with HandlerClient(server.address, timeout_s=600) as client:
        started = time.monotonic()
        replies = client.complete_many([f"{i}:" + "x" * 16 for i in range(size)], model="echo")
        elapsed = time.monotonic() - started
    if sum(1 for r in replies if getattr(r, "text", None) is not None) != size:
        raise RuntimeError("rlmq batch did not answer every prompt")
    return elapsed


def _listen_overflows() -> int | None:
    """The kernel's count of connections refused for a full accept queue (TcpExt ListenOverflows)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            fields = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(fields.get("ListenOverflows", 0))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument(
        "--venv", type=Path, default=Path(os.environ.get("RLMQ_RLMS_VENV", RESULTS / ".venv-rlms"))
    )
    parser.add_argument("--processes", type=int, default=2, help="client processes for each side")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    python = ensure_venv(args.venv)
    version = rlms_version(python)

    # (echo latency ms, requests in flight, requests per measurement for rlms; rlmq gets 10x)
    points = [(0, 1, 1000), (0, 4, 2000), (0, 16, 2000), (0, 64, 1000), (100, 16, 500), (100, 256, 1000)]
    batches = [(0, 1000), (100, 100), (100, 1000)]  # (echo latency ms, prompts in one batched call)
    if args.quick:
        points = [(0, 4, 300), (0, 64, 300)]
        batches = [(0, 200), (100, 100)]

    rows = []
    results: list[dict[str, Any]] = []
    for latency_ms, concurrency, n in points:
        rlms = start_rlms(python, latency_ms)
        rlmq = start_handler(latency_ms=latency_ms)
        try:
            load(rlmq, requests=2_000, concurrency=64, processes=args.processes)  # warm-up
            load_rlms(python, rlms, requests=200, concurrency=16, processes=args.processes)
            theirs, ours = [], []
            for _ in range(rounds):
                theirs.append(
                    load_rlms(python, rlms, requests=n, concurrency=concurrency, processes=args.processes)
                )
                ours.append(load(rlmq, requests=n * 10, concurrency=concurrency, processes=args.processes))
        finally:
            rlms.stop()
            rlmq.stop()
        t = sorted(theirs, key=lambda r: r["throughput_rps"])[(len(theirs) - 1) // 2]
        o = sorted(ours, key=lambda r: r["throughput_rps"])[(len(ours) - 1) // 2]
        point = {
            "latency_ms": latency_ms,
            "concurrency": concurrency,
            "rlms": {k: t[k] for k in ("throughput_rps", "latency_ms", "ok", "errors", "listen_overflows")},
            "rlmq": {k: o[k] for k in ("throughput_rps", "latency_ms", "ok", "errors")},
            "ratio": ratio(o["throughput_rps"], t["throughput_rps"]),
            "rounds_rps": {
                "rlms": [r["throughput_rps"] for r in theirs],
                "rlmq": [r["throughput_rps"] for r in ours],
            },
        }
        results.append(point)
        print(
            f"echo {latency_ms} ms, {concurrency} in flight: rlms {t['throughput_rps']:,.0f} req/s "
            f"(p99 {t['latency_ms']['p99']:.1f} ms, errors {t['errors'] or 0}), "
            f"rlmq {o['throughput_rps']:,.0f} req/s "
            f"(p99 {o['latency_ms']['p99']:.1f} ms) -> {point['ratio']:.1f}x",
            flush=True,
        )
        rows.append(
            [
                f"{latency_ms} ms",
                concurrency,
                f"{t['throughput_rps']:,.0f}",
                f"{t['latency_ms']['p50']:.2f} / {t['latency_ms']['p99']:.2f}",
                f"{o['throughput_rps']:,.0f}",
                f"{o['latency_ms']['p50']:.2f} / {o['latency_ms']['p99']:.2f}",
                f"{point['ratio']:.1f}x",
            ]
        )

    batch_rows = []
    batch_results = []
    for latency_ms, size in batches:
        rlms = start_rlms(python, latency_ms)
        rlmq = start_handler(latency_ms=latency_ms)
        try:
            theirs_s = batch_rlms(python, rlms, size)
            ours_s = batch_rlmq(rlmq, size)
        finally:
            rlms.stop()
            rlmq.stop()
        batch_results.append(
            {
                "latency_ms": latency_ms,
                "size": size,
                "rlms_s": round(theirs_s, 3),
                "rlmq_s": round(ours_s, 3),
                "rlms_prompts_per_s": round(size / theirs_s, 1),
                "rlmq_prompts_per_s": round(size / ours_s, 1),
            }
        )
        print(f"batch of {size} at {latency_ms} ms: rlms {theirs_s:.2f} s, rlmq {ours_s:.2f} s", flush=True)
        batch_rows.append(
            [
                size,
                f"{latency_ms} ms",
                f"{theirs_s:.3f}",
                f"{ours_s:.3f}",
                f"{size / theirs_s:,.0f}",
                f"{size / ours_s:,.0f}",
                f"{ratio(theirs_s, ours_s):.1f}x",
            ]
        )

    print()
    print(
        table(
            [
                "echo latency",
                "in flight",
                "rlms req/s",
                "rlms p50 / p99 ms",
                "rlmq req/s",
                "rlmq p50 / p99 ms",
                "rlmq / rlms",
            ],
            rows,
        )
    )
    print()
    print(
        table(
            [
                "batch size",
                "echo latency",
                "rlms s",
                "rlmq s",
                "rlms prompts/s",
                "rlmq prompts/s",
                "rlmq / rlms",
            ],
            batch_rows,
        )
    )
    zero = [p for p in results if p["latency_ms"] == 0]
    best_rlms = max(zero, key=lambda p: p["rlms"]["throughput_rps"])
    best_rlmq = max(zero, key=lambda p: p["rlmq"]["throughput_rps"])
    peak: dict[str, Any] = {
        "rlms_rps": best_rlms["rlms"]["throughput_rps"],
        "rlms_at_concurrency": best_rlms["concurrency"],
        "rlmq_rps": best_rlmq["rlmq"]["throughput_rps"],
        "rlmq_at_concurrency": best_rlmq["concurrency"],
    }
    peak["ratio"] = ratio(peak["rlmq_rps"], peak["rlms_rps"])
    print(
        f"\npeak relay throughput (echo 0 ms, best in-flight level of each): rlms {peak['rlms_rps']:,.0f} "
        f"req/s at {peak['rlms_at_concurrency']} in flight, rlmq {peak['rlmq_rps']:,.0f} req/s at "
        f"{peak['rlmq_at_concurrency']} -> {peak['ratio']:.1f}x"
    )
    path = write_results(
        "rlms",
        {
            "bench": "rlms",
            "machine": machine(),
            "rlms_version": version,
            "rounds": rounds,
            "points": results,
            "batches": batch_results,
            "peak": peak,
            "listen_overflows_total": _listen_overflows(),
        },
        quick=args.quick,
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
