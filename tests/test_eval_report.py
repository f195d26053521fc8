"""The summary of an eval: rows by task, method and length, the table, the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rlmq.eval import format_table, plot, summarize
from rlmq.eval.report import figure, format_length


def record(method: str, length: int, score: float, cost: float, stop: str = "final") -> dict[str, Any]:
    return {
        "task": "oolong",
        "method": method,
        "length_tokens": length,
        "score": score,
        "cost_usd": cost,
        "input_tokens": 1000,
        "output_tokens": 100,
        "elapsed_s": 2.0,
        "stop_reason": stop,
    }


RECORDS = [
    record("rlm", 8_000, 1.0, 0.02),
    record("rlm", 8_000, 0.5, 0.04),
    record("rlm", 131_072, 0.25, 0.10, stop="error"),
    record("direct", 8_000, 0.0, 0.01),
]


def test_rows_are_means_by_task_method_and_length() -> None:
    rows = summarize(RECORDS)
    assert [(r["method"], r["length_tokens"], r["n"]) for r in rows] == [
        ("direct", 8_000, 1),
        ("rlm", 8_000, 2),
        ("rlm", 131_072, 1),
    ]
    assert rows[1]["score"] == 0.75
    assert rows[1]["cost_usd"] == pytest.approx(0.03)
    assert rows[2]["errors"] == 1


def test_the_table_reads_in_columns() -> None:
    lines = format_table(summarize(RECORDS)).splitlines()
    assert lines[0].split() == [
        "task",
        "method",
        "length",
        "n",
        "score",
        "%",
        "$/task",
        "tokens",
        "in/task",
        "s/task",
        "errors",
    ]
    assert lines[2].split() == ["oolong", "rlm", "8K", "2", "75.0", "0.0300", "1.0K", "2.0", "0"]
    assert len({len(line) for line in lines}) == 1


@pytest.mark.parametrize(
    ("tokens", "text"),
    [(8_000, "8K"), (131_072, "131K"), (32_768, "32.8K"), (1_000_000, "1M"), (10_000_000, "10M")],
)
def test_lengths_are_written_as_people_say_them(tokens: int, text: str) -> None:
    assert format_length(tokens) == text


def test_the_figure_has_a_score_panel_and_a_cost_panel_with_a_line_per_method() -> None:
    import matplotlib.pyplot as plt

    fig = figure(summarize(RECORDS))
    assert fig is not None
    try:
        score_panel, cost_panel = fig.axes  # the legends are no axes of their own
        assert score_panel.get_title() == "score (%)"
        assert cost_panel.get_title() == "mean cost per task (USD)"
        for panel in fig.axes:
            assert panel.get_xscale() == "log"
            assert panel.get_xlabel() == "context length (tokens)"
            assert [t.get_text() for t in panel.get_xticklabels()] == ["8K", "131K"]
            legend = panel.get_legend()
            assert legend is not None
            assert [t.get_text() for t in legend.get_texts()] == ["direct", "rlm"]

        def lines(panel: Any) -> dict[str, tuple[list[float], list[float]]]:
            return {
                line.get_label(): (list(line.get_xdata()), pytest.approx(list(line.get_ydata())))
                for line in panel.get_lines()
            }

        # Means by method and length, in % on the left and USD on the right, by length.
        assert lines(score_panel) == {"direct": ([8_000], [0.0]), "rlm": ([8_000, 131_072], [75.0, 25.0])}
        assert lines(cost_panel) == {"direct": ([8_000], [0.01]), "rlm": ([8_000, 131_072], [0.03, 0.10])}
    finally:
        plt.close(fig)


def test_with_several_tasks_a_line_is_named_by_task_and_method() -> None:
    import matplotlib.pyplot as plt

    pairs = {**record("rlm", 32_000, 0.5, 0.2), "task": "oolong-pairs"}
    fig = figure(summarize([*RECORDS, pairs]))
    assert fig is not None
    try:
        for panel in fig.axes:
            assert sorted(line.get_label() for line in panel.get_lines()) == [
                "oolong / direct",
                "oolong / rlm",
                "oolong-pairs / rlm",
            ]
    finally:
        plt.close(fig)


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = plot(summarize(RECORDS), tmp_path / "plot.png")
    assert path == tmp_path / "plot.png"
    assert path.read_bytes().startswith(b"\x89PNG")
