"""``rlmq replay``: a recorded run played again with zero model calls, and its first divergence.

Units on the in-memory fakes, then the demo's trajectory through real processes, its zero model
calls checked in the handler's stats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from rlmq.orchestrator.loop import RLM
from rlmq.orchestrator.replay import Recording, replay_on
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.testing import InMemorySandbox, ScriptedModelClient
from rlmq.orchestrator.trajectory import Trajectory, read_events
from rlmq.protocol import HandlerClient

CONTEXT = "alpha\nbeta\ngamma\ndelta"
ROOT = [
    "```repl\nlines = context.splitlines()\nprint(len(lines))\n```",
    "```repl\nechoed = llm_query_batched(['say ' + l for l in lines])\nchild = rlm_query('inner')\n"
    "print(echoed, child)\n```",
    "```repl\nFINAL(' | '.join(echoed) + ' / ' + child)\n```",
]
CHILD = ["```repl\nc = llm_query('child asks')\n```", "FINAL_VAR(c)"]


async def record(path: Path) -> str:
    model = ScriptedModelClient()
    model.script("t", ROOT, depth=0)
    model.script("t", CHILD, depth=1)
    trajectory = Trajectory(path)
    rlm = RLM(model, InMemorySandbox(model), RunSettings(max_depth=2))
    try:
        result = await rlm.run("What?", CONTEXT, run_id="t", trajectory=trajectory)
    finally:
        trajectory.close()
    assert result.answer == "say alpha | say beta | say gamma | say delta / child asks"
    return result.answer


async def replay(path: Path) -> tuple[Any, ScriptedModelClient]:
    silent = ScriptedModelClient(scripted=())  # records any request: there must be none
    report = await replay_on(Recording.load(path), CONTEXT, InMemorySandbox(silent), Trajectory(None))
    return report, silent


def rewrite(path: Path, change: Any) -> None:
    """Rewrite the recorded events through ``change(events) -> events``."""
    events = change(read_events(path))
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


async def test_a_recording_replays_with_the_same_answer_and_no_model_call(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    answer = await record(path)
    report, silent = await replay(path)
    assert report.matched, report.divergence
    assert report.result.answer == report.recorded_answer == answer
    assert silent.requests == []
    assert report.model_calls == 5  # 3 of the root, 2 of the child
    assert report.sub_calls == 5  # 4 of the batch, 1 of the child


async def test_an_output_that_differs_is_the_first_divergence(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    await record(path)

    def change(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for e in events:
            if e["event"] == "exec_end" and e["iteration"] == 1:
                e["stdout"] = "5\n"
        return events

    rewrite(path, change)
    report, silent = await replay(path)
    assert (
        str(report.divergence)
        == "level 0, iteration 1, block 0: exec_end: stdout differs: recorded '5\\n', now '4\\n'"
    )
    assert silent.requests == []


async def test_a_sub_call_without_a_recorded_answer_diverges_and_is_not_sent(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    await record(path)
    rewrite(
        path,
        lambda events: [
            e for e in events if not (e["event"] == "sub_call" and e.get("seq") == 2 and e["level"] == "0")
        ],
    )
    report, silent = await replay(path)
    assert report.divergence is not None
    assert (report.divergence.level, report.divergence.iteration, report.divergence.block) == ("0", 2, 0)
    assert "sub-call 2 ('say gamma') has no recorded answer" in report.divergence.what
    assert silent.requests == []


async def test_a_changed_prompt_diverges_at_the_model_call(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    await record(path)
    recording = Recording.load(path)
    silent = ScriptedModelClient(scripted=())
    report = await replay_on(
        recording, CONTEXT.replace("alpha", "omega"), InMemorySandbox(silent), Trajectory(None)
    )
    assert report.divergence is not None
    assert report.result.stop_reason == "error"
    assert silent.requests == []


# ---------------------------------------------------------------- real processes

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
RLMQ = [sys.executable, "-m", "rlmq"]


@pytest.mark.slow
def test_the_demos_trajectory_replays_with_the_same_answer_and_no_model_call(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    demo = subprocess.run(
        [*RLMQ, "demo", "--out", str(out), "--tokens", "20000"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr
    (trajectory,) = out.glob("run-*.jsonl")
    recorded = next(e for e in read_events(trajectory) if e["event"] == "run_end")["answer"]
    assert any(e["event"] == "sub_call" for e in read_events(trajectory))
    sock_dir = Path(tempfile.mkdtemp(prefix="rlmq-replay-"))
    handler, sandbox = f"ipc://{sock_dir}/h.sock", f"ipc://{sock_dir}/s.sock"
    up = subprocess.Popen(
        [
            *RLMQ,
            "up",
            "--config",
            str(out / "rlmq.toml"),
            "--handler-bind",
            handler,
            "--sandbox-bind",
            sandbox,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert up.stdout is not None
        ready = up.stdout.readline()
        assert ready.startswith("rlmq up:"), ready
        done = subprocess.run(
            [*RLMQ, "replay", str(trajectory), "--handler", handler, "--sandbox", sandbox, "--json"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        verdict = json.loads(done.stdout)
        assert verdict["matched"] is True
        assert verdict["answer"] == verdict["recorded_answer"] == recorded
        assert verdict["sub_calls_replayed"] > 0
        with HandlerClient(handler) as client:
            stats = client.stats()
        assert stats["by_op"].get("complete", 0) == 0
        assert all(m["requests"] == 0 for m in stats["models"].values())
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.communicate()
