"""Trajectory schema 2 (docs/trajectory.md): levels, deltas, sub-call records, child runs, crash
tolerance, and the orchestrator's spans. On the in-memory fakes: no processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlmq.orchestrator.loop import RLM, RunResult
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.testing import InMemorySandbox, ScriptedModelClient, events
from rlmq.orchestrator.trajectory import (
    MessageDeltas,
    Trajectory,
    TrajectoryError,
    read_events,
    rebuild_history,
)
from rlmq.protocol import ChatMessage, ErrorCode, RemoteError, tracing
from rlmq.protocol.sandbox import prompt_sha256

BATCH = "```repl\nr = llm_query_batched(['short', 'x' * 50, 'third'])\nprint(len(r))\n```"


async def run(
    responses: list[str],
    *,
    path: Path | None = None,
    model: ScriptedModelClient | None = None,
    **settings: Any,
) -> tuple[RunResult, Trajectory, ScriptedModelClient]:
    model = model or ScriptedModelClient()
    model.script("t", responses)
    trajectory = Trajectory(path)
    rlm = RLM(model, InMemorySandbox(model), RunSettings(**settings))
    try:
        result = await rlm.run("Q?", "the context", run_id="t", trajectory=trajectory)
    finally:
        trajectory.close()
    return result, trajectory, model


async def test_every_event_names_its_level_and_the_first_is_schema_2(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    _, trajectory, _ = await run(["```repl\nx = 1\n```", "FINAL(done)"], path=path)
    written = read_events(path)
    assert written == json.loads(json.dumps(trajectory.events, default=str))  # as written
    assert written[0]["event"] == "run_start"
    assert written[0]["schema"] == 2
    assert all(e["level"] == "0" and e["depth"] == 0 for e in written)
    assert [e["event"] for e in written] == [
        "run_start",
        "model_call",
        "exec_start",
        "exec_end",
        "model_call",
        "final",
        "run_end",
    ]


async def test_model_calls_record_only_what_was_added_and_the_history_rebuilds_exactly() -> None:
    responses = ["```repl\na = 1\nprint(a)\n```", "no code here", "```repl\nprint(a + 1)\n```", "FINAL(2)"]
    _, trajectory, model = await run(responses)
    calls = events(trajectory, "model_call")
    assert calls[0]["reset"] is True
    assert "reset" not in calls[1]
    # After the first call, each records the observation only: not the history again.
    assert [len(c["added"]) for c in calls] == [2, 1, 1, 1]
    sent = [[m.to_wire() for m in r.messages] for r in model.requests_for(model="root")]
    assert rebuild_history(trajectory.events, "0") == sent


def test_a_replaced_history_is_recorded_whole() -> None:
    deltas = MessageDeltas()
    one = [ChatMessage("system", "s"), ChatMessage("user", "q")]
    assert deltas.delta("0", one) == ([m.to_wire() for m in one], True)
    deltas.answered("0", "r1")
    two = [*one, ChatMessage("assistant", "r1"), ChatMessage("user", "o1")]
    assert deltas.delta("0", two) == ([{"role": "user", "content": "o1"}], False)
    deltas.answered("0", "r2")
    compacted = [*one, ChatMessage("user", "[dropped]")]
    assert deltas.delta("0", compacted) == ([m.to_wire() for m in compacted], True)


async def test_a_compacted_history_rebuilds_exactly() -> None:
    responses = [f"```repl\nprint('{i}' * 300)\n```" for i in range(6)] + ["FINAL(ok)"]
    _, trajectory, model = await run(responses, history_max_chars=1_500, keep_last_turns=1)
    assert events(trajectory, "compaction")
    assert sum(1 for c in events(trajectory, "model_call") if c.get("reset")) > 1
    sent = [[m.to_wire() for m in r.messages] for r in model.requests_for(model="root")]
    assert rebuild_history(trajectory.events, "0") == sent


async def test_each_sub_call_is_recorded_under_its_block_with_long_prompts_cut() -> None:
    _, trajectory, _ = await run(["```repl\nx = 0\n```\n" + BATCH, "FINAL(3)"], record_chars=10)
    subs = events(trajectory, "sub_call")
    assert [(s["level"], s["iteration"], s["block"], s["seq"]) for s in subs] == [
        ("0", 1, 1, 0),
        ("0", 1, 1, 1),
        ("0", 1, 1, 2),
    ]
    short, long, _ = subs
    assert (short["prompt"], short["prompt_tail"], short["prompt_chars"], short["text"]) == (
        "short",
        None,
        5,
        "short",
    )
    assert (long["prompt"], long["prompt_tail"], long["prompt_chars"]) == ("xxxxx", "xxxxx", 50)
    assert long["text"] == "x" * 50  # answers are kept whole
    assert long["prompt_sha256"] == prompt_sha256([("user", "x" * 50)])
    assert long["depth"] == 1
    assert long["model"] == "sub"
    assert long["error"] is None
    assert not long["replayed"]
    assert not long["diverged"]
    # Every record of a block comes before the block's end.
    kinds = [e["event"] for e in trajectory.events]
    assert kinds.index("exec_end", kinds.index("sub_call")) > max(
        i for i, k in enumerate(kinds) if k == "sub_call"
    )
    (end,) = [e for e in events(trajectory, "exec_end") if e["block"] == 1]
    assert end["llm_calls"] == 3
    assert end["records_dropped"] == 0  # every record reached the trajectory


async def test_a_failed_sub_call_is_recorded_with_its_error() -> None:
    model = ScriptedModelClient(scripted=("root", "sub"))
    code = "```repl\ntry:\n    llm_query('p')\nexcept LLMQueryError:\n    pass\n```"
    model.script("t", [code, "FINAL(ok)"], depth=0)
    model.script("t", [RemoteError(ErrorCode.BACKEND_ERROR, "boom")], depth=1)
    trajectory = Trajectory(None)
    await RLM(model, InMemorySandbox(model), RunSettings()).run("Q?", "c", run_id="t", trajectory=trajectory)
    (sub,) = events(trajectory, "sub_call")
    assert sub["text"] is None
    assert (sub["error"]["code"], sub["error"]["message"]) == ("backend_error", "boom")


async def test_record_chars_none_records_no_sub_calls() -> None:
    _, trajectory, _ = await run([BATCH, "FINAL(3)"], record_chars=None)
    assert not events(trajectory, "sub_call")
    assert events(trajectory, "exec_end")[0]["llm_calls"] == 3


async def test_child_runs_get_their_own_level_nested_under_the_block_that_started_them() -> None:
    model = ScriptedModelClient()
    model.script("t", ["```repl\nprint('child')\n```", "FINAL(inner)"] * 2, depth=1)  # two children
    code = "```repl\na = rlm_query('one')\nb = rlm_query('two')\nprint(a, b)\n```"
    _, trajectory, _ = await run(["```repl\nx = 1\n```", code, "FINAL(both)"], model=model, max_depth=2)
    starts = events(trajectory, "child_start")
    assert [(c["level"], c["parent"], c["iteration"], c["block"], c["query"]) for c in starts] == [
        ("0.1", "0", 2, 0, "one"),
        ("0.2", "0", 2, 0, "two"),
    ]
    ends = events(trajectory, "child_end")
    assert [(c["level"], c["answer"]) for c in ends] == [("0.1", "inner"), ("0.2", "inner")]
    child_events = [e for e in trajectory.events if e["level"] == "0.1"]
    assert {e["depth"] for e in child_events} == {1}
    assert [e["event"] for e in child_events][:3] == ["child_start", "model_call", "exec_start"]
    assert len(rebuild_history(trajectory.events, "0.1")) == 2
    # The child's events stand between its parent block's start and end.
    kinds = [(e["event"], e["level"]) for e in trajectory.events]
    parent_start = kinds.index(("exec_start", "0"), kinds.index(("model_call", "0"), 2))
    assert parent_start < kinds.index(("child_start", "0.1")) < kinds.index(("child_end", "0.2"))
    assert kinds.index(("child_end", "0.2")) < kinds.index(("exec_end", "0"), parent_start)


def test_read_events_ignores_a_torn_last_line_and_refuses_a_bad_one_before(tmp_path: Path) -> None:
    good = [{"event": "run_start", "t": 0, "schema": 2}, {"event": "model_call", "t": 1}]
    path = tmp_path / "t.jsonl"
    text = "".join(json.dumps(e) + "\n" for e in good)
    path.write_text(text + '{"event": "sub_ca')
    assert read_events(path) == good
    path.write_text(text)  # no run_end: still a valid prefix
    assert read_events(path) == good
    path.write_text(text + "garbage\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(TrajectoryError, match=":3: not a JSON object"):
        read_events(path)
    path.write_text(json.dumps(good[1]) + "\n")
    with pytest.raises(TrajectoryError, match="not a trajectory"):
        read_events(path)


def test_appending_drops_a_torn_tail_and_skips_what_was_recorded(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"event": "run_start", "t": 0, "level": "0"}) + '\n{"event": "x')
    trajectory = Trajectory(path, append=True, t_offset_s=5.0)
    trajectory.skip = {("exec_start", "0", 1, 0, None, None, None): 1}
    trajectory.write("exec_start", level="0", iteration=1, block=0, code="x")
    trajectory.write("exec_end", level="0", iteration=1, block=0)
    trajectory.close()
    written = read_events(path)
    assert [e["event"] for e in written] == ["run_start", "exec_end"]
    assert written[1]["t"] >= 5.0
    assert trajectory.skipped == 1


async def test_spans_nest_run_iteration_exec() -> None:
    exporter_module = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = exporter_module.InMemorySpanExporter()
    tracing.configure(service="test", exporter=exporter)
    try:
        await run(["```repl\nx = 1\n```\n```repl\ny = 2\n```", "FINAL(done)"])
    finally:
        tracing.shutdown()
    spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
    by_name: dict[str, list[Any]] = {}
    for s in spans.values():
        by_name.setdefault(s.name, []).append(s)
    (root,) = by_name["rlmq.run"]
    assert root.parent is None
    assert root.attributes["rlmq.run"] == "t"
    iterations = by_name["rlmq.iteration"]
    assert [s.attributes["rlmq.iteration"] for s in sorted(iterations, key=lambda s: s.start_time)] == [1, 2]
    assert all(s.parent.span_id == root.context.span_id for s in iterations)
    execs = by_name["rlmq.exec"]
    assert [s.attributes["rlmq.block"] for s in sorted(execs, key=lambda s: s.start_time)] == [0, 1]
    first = min(iterations, key=lambda s: s.start_time)
    assert all(s.parent.span_id == first.context.span_id for s in execs)
    assert {s.context.trace_id for s in spans.values()} == {root.context.trace_id}
