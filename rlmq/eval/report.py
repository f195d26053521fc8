"""The summary of an output directory: a table by task, method and length, and a plot."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlmq.orchestrator.loop import StopReason

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["figure", "format_length", "format_table", "plot", "summarize"]


def format_length(tokens: int) -> str:
    """8000 -> 8K, 131072 -> 131K, 10000000 -> 10M."""
    if tokens >= 1_000_000 and tokens % 100_000 == 0:
        return f"{tokens / 1_000_000:g}M"
    if tokens >= 1_000:
        return (
            f"{round(tokens / 1_000)}K"
            if tokens % 1_000 < 50 or tokens >= 100_000
            else f"{tokens / 1000:.1f}K"
        )
    return str(tokens)


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method, length): means over its runs. Scores are fractions (0..1)."""
    groups: dict[tuple[str, str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["task"], r["method"], r["length_tokens"])].append(r)
    rows = []
    for (task, method, length), runs in sorted(groups.items()):
        n = len(runs)
        rows.append(
            {
                "task": task,
                "method": method,
                "length_tokens": length,
                "n": n,
                "score": sum(r["score"] for r in runs) / n,
                "cost_usd": sum(r["cost_usd"] for r in runs) / n,
                "input_tokens": sum(r["input_tokens"] for r in runs) / n,
                "output_tokens": sum(r["output_tokens"] for r in runs) / n,
                "elapsed_s": sum(r["elapsed_s"] for r in runs) / n,
                "errors": sum(1 for r in runs if r["stop_reason"] == StopReason.ERROR),
            }
        )
    return rows


def _tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    header = ("task", "method", "length", "n", "score %", "$/task", "tokens in/task", "s/task", "errors")
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["task"],
                r["method"],
                format_length(r["length_tokens"]),
                str(r["n"]),
                f"{100 * r['score']:.1f}",
                f"{r['cost_usd']:.4f}",
                _tokens(r["input_tokens"]),
                f"{r['elapsed_s']:.1f}",
                str(r["errors"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    # Text columns to the left, numbers to the right.
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i < 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    )


def figure(rows: Iterable[Mapping[str, Any]]) -> Figure | None:
    """Score and cost against context length, one line per task and method (the paper's Figure 1):
    two panels, score (%) on the left, mean cost per task on the right. The caller closes it
    (``matplotlib.pyplot.close``). None when matplotlib is not installed (the extra ``rlmq[eval]``).
    """
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    series: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    rows = list(rows)
    tasks = {r["task"] for r in rows}
    for r in rows:
        series[r["method"] if len(tasks) == 1 else f"{r['task']} / {r['method']}"].append(r)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for label, runs in sorted(series.items()):
        runs = sorted(runs, key=lambda r: r["length_tokens"])
        x = [r["length_tokens"] for r in runs]
        left.plot(x, [100 * r["score"] for r in runs], marker="o", label=label)
        right.plot(x, [r["cost_usd"] for r in runs], marker="o", label=label)
    lengths = sorted({r["length_tokens"] for r in rows})
    for ax, title in ((left, "score (%)"), (right, "mean cost per task (USD)")):
        ax.set_xscale("log")
        ax.set_xticks(lengths, [format_length(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    left.set_ylim(-2, 102)
    fig.suptitle(f"rlmq eval: {', '.join(sorted(tasks))}")
    return fig


def plot(rows: Iterable[Mapping[str, Any]], path: Path) -> Path | None:
    """``figure(rows)`` written to ``path`` as a PNG; None when matplotlib is not installed."""
    fig = figure(rows)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
