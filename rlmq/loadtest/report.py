"""The report of a load test: the workers' results merged, latency percentiles, the handler's view."""

from __future__ import annotations

import array
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from .spec import CLIENT_TIMEOUT, LoadSpec

__all__ = ["build_report", "format_report", "stats_delta", "sum_stats", "summarize"]


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max (and min, mean) of latencies in milliseconds, rounded to microseconds."""
    ordered = sorted(latencies_ms)
    if not ordered:
        return {"min": 0.0, "mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    return {
        "min": round(ordered[0], 3),
        "mean": round(sum(ordered) / len(ordered), 3),
        "p50": round(_percentile(ordered, 0.50), 3),
        "p90": round(_percentile(ordered, 0.90), 3),
        "p99": round(_percentile(ordered, 0.99), 3),
        "max": round(ordered[-1], 3),
    }


def stats_delta(before: Any, after: Any) -> Any:
    """Counters after minus before, recursively; gauges and percentiles are left out."""
    if isinstance(after, Mapping):
        out = {}
        for key, value in after.items():
            if key in {"latency_ms", "uptime_s", "in_flight", "queued", "runs_open"}:
                continue
            prior = before.get(key) if isinstance(before, Mapping) else None
            d = stats_delta(prior, value)
            if d not in (None, {}, 0, 0.0):
                out[key] = d
        return out
    if isinstance(after, bool) or not isinstance(after, int | float):
        return None
    prior = before if isinstance(before, int | float) and not isinstance(before, bool) else 0
    d = after - prior
    return round(d, 9) if isinstance(d, float) else d


def sum_stats(each: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several handlers' ``stats`` as one: numbers added up, recursively; other values (and
    percentiles, which do not add) taken from the first handler that has them."""
    out: dict[str, Any] = {}
    for stats in each:
        for key, value in stats.items():
            prior = out.get(key)
            if key not in out:
                out[key] = dict(value) if isinstance(value, Mapping) else value
            elif isinstance(value, Mapping) and isinstance(prior, dict):
                out[key] = sum_stats([prior, value])
            elif (
                key != "latency_ms"
                and isinstance(value, int | float)
                and not isinstance(value, bool)
                and isinstance(prior, int | float)
                and not isinstance(prior, bool)
            ):
                out[key] = prior + value
    return out


def build_report(
    spec: LoadSpec,
    nproc: int,
    results: list[dict[str, Any]],
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    run_usage: Mapping[str, Any] | None,
    run_id: str | None,
) -> dict[str, Any]:
    """One report (what ``--json`` prints) from every worker's result and the handler's stats."""
    latencies: array.array[float] = array.array("d")
    errors: Counter[str] = Counter()
    sent = ok = 0
    first = math.inf
    last = 0.0
    lag = 0.0
    cpu = 0.0
    last_send = 0.0
    for r in results:
        cpu += r["cpu_s"]
        chunk: array.array[float] = array.array("d")
        chunk.frombytes(r["latencies_ms"])
        latencies.extend(chunk)
        errors.update(r["errors"])
        sent += r["sent"]
        ok += r["ok"]
        first = min(first, r["first_send"])
        last = max(last, r["last_reply"])
        last_send = max(last_send, r["last_send"])
        lag = max(lag, r["max_lag_ms"])
    answered = ok + sum(v for k, v in errors.items() if k != CLIENT_TIMEOUT)
    elapsed = max(0.0, last - first) if answered else 0.0
    report: dict[str, Any] = {
        "address": spec.address,
        "mode": "open" if spec.rate else "closed",
        "model": spec.model,
        "concurrency": spec.concurrency,
        "rate": spec.rate,
        "prompt_bytes": spec.prompt_bytes,
        "processes": nproc,
        "run": run_id,
        "sent": sent,
        "ok": ok,
        "errors": dict(sorted(errors.items())),
        "elapsed_s": round(elapsed, 6),
        "throughput_rps": round(answered / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_ms": summarize(latencies),
        # What the generator itself cost, to tell whether it was the bottleneck.
        "generator_cpu_us_per_request": round(cpu / sent * 1e6, 2) if sent else 0.0,
        "handler": {"before": dict(before), "after": dict(after), "delta": stats_delta(before, after)},
        "run_usage": dict(run_usage) if run_usage is not None else None,
    }
    if spec.rate:
        report["max_schedule_lag_ms"] = round(lag, 3)
        # The rate actually sent at (throughput also counts the wait for the last replies).
        sending = last_send - first
        report["sent_rate_rps"] = round((sent - 1) / sending, 1) if sent > 1 and sending > 0 else 0.0
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as the human-readable table ``rlmq loadtest`` prints without ``--json``."""
    lat = report["latency_ms"]
    lines = [
        f"target      {report['address']} (model {report['model']}, {report['mode']} loop, "
        f"{report['processes']} client processes)",
        (
            f"load        {report['rate']:g} req/s scheduled (sent at {report['sent_rate_rps']:,.0f}), "
            f"at most {report['concurrency']} outstanding"
            if report["rate"]
            else f"load        {report['concurrency']} in flight"
        )
        + f", {report['prompt_bytes']} B prompts",
        f"requests    {report['sent']} sent, {report['ok']} ok, "
        f"{sum(report['errors'].values())} errors in {report['elapsed_s']:.3f} s",
        f"throughput  {report['throughput_rps']:,.0f} req/s",
        f"latency ms  p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  max {lat['max']:.3f}",
    ]
    if report["errors"]:
        lines.append("errors      " + ", ".join(f"{k} {v}" for k, v in report["errors"].items()))
    if "max_schedule_lag_ms" in report:
        lines.append(f"schedule    fell behind by up to {report['max_schedule_lag_ms']:.1f} ms")
    delta = report["handler"]["delta"]
    after = report["handler"]["after"]
    lines.append(
        f"handler     received {delta.get('received', 0)}, replied {delta.get('replied', 0)}, "
        f"dropped {delta.get('dropped', 0)}"
        + (
            ", errors " + ", ".join(f"{k} {v}" for k, v in delta["errors"].items())
            if delta.get("errors")
            else ""
        )
    )
    model = after.get("models", {}).get(report["model"])
    if isinstance(model, Mapping):
        hl = model.get("latency_ms", {})
        lines.append(
            f"handler ms  p50 {hl.get('p50', 0):.3f}  p90 {hl.get('p90', 0):.3f}  "
            f"p99 {hl.get('p99', 0):.3f}  max {hl.get('max', 0):.3f}  (its own view, last 10k calls)"
        )
    for address, one in report.get("handlers", {}).items():
        ol = one["latency_ms"]
        lines.append(
            f"  {address}  {one['ok']} ok, {sum(one['errors'].values())} errors, "
            f"{one['throughput_rps']:,.0f} req/s, p50 {ol['p50']:.3f} ms, p99 {ol['p99']:.3f} ms"
        )
    usage = report.get("run_usage")
    if usage:
        lines.append(
            f"run         {usage['run']}: {usage['calls']} calls, {usage['failed_calls']} failed, "
            f"{usage['usage']['input_tokens']} input / {usage['usage']['output_tokens']} output tokens"
        )
    return "\n".join(lines)
