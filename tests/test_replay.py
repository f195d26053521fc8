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
import tomllib
from pathlib import Path
from typing import Any

import pytest

from rlmq.orchestrator.loop import RLM
from rlmq.orchestrator.replay import Recording, replay_on
from rlmq.orchestrator.replay_cli import offline_config
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


def cut(path: Path, *, after: str, nth: int = 1, torn: bool = True) -> None:
    """What a crash leaves: the lines up to the ``nth`` event named ``after``, then (``torn``)
    half of the next line."""
    lines = path.read_text().splitlines(keepends=True)
    seen, out = 0, []
    for line in lines:
        out.append(line)
        if json.loads(line)["event"] == after:
            seen += 1
            if seen == nth:
                break
    following = lines[len(out)]
    path.write_text("".join(out) + (following[: len(following) // 2] if torn else ""))


async def test_a_recording_cut_inside_a_batch_says_where_it_ends_not_that_it_diverged(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    await record(path)
    cut(path, after="sub_call", nth=2)  # the root's batch: 2 of its 4 records were written
    report, silent = await replay(path)
    divergence = report.divergence
    assert divergence is not None
    assert (divergence.kind, divergence.level, divergence.iteration, divergence.block) == (
        "recording_ends",
        "0",
        2,
        0,
    )
    assert "the recording ends in this block (cut after 2 of its sub-call records" in divergence.what
    assert "sub-call 2 ('say gamma') was not recorded" in divergence.what
    assert "has no recorded answer" not in divergence.what
    assert silent.requests == []


async def test_a_recording_cut_between_blocks_ends_before_the_run_did(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    await record(path)
    cut(path, after="exec_end", torn=False)  # iteration 1 whole, then nothing
    report, silent = await replay(path)
    assert report.divergence is not None
    assert report.divergence.kind == "recording_ends"
    assert (report.divergence.level, report.divergence.iteration) == ("0", 1)
    assert "the recording ends before the run did" in report.divergence.what
    assert "cut after its exec_end (level 0, iteration 1, block 0)" in report.divergence.what
    assert silent.requests == []


class LossySession:
    """A session whose client lost the record of each call with seq 1, as one that got a
    malformed notice does: it counts them in ``records_dropped``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.records_dropped = 0

    async def exec(
        self,
        code: str,
        *,
        timeout_s: float | None = None,
        on_sub_call: Any = None,
        record_chars: int | None = None,
        replay: Any = None,
    ) -> Any:
        self.records_dropped = 0

        def keep(record: Any) -> None:
            if record.seq == 1:
                self.records_dropped += 1
            else:
                on_sub_call(record)

        return await self.inner.exec(
            code,
            timeout_s=timeout_s,
            on_sub_call=None if on_sub_call is None else keep,
            record_chars=record_chars,
            replay=replay,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class LossySandbox(InMemorySandbox):
    async def open(self, **options: Any) -> Any:
        return LossySession(await super().open(**options))


async def test_lost_records_are_written_to_exec_end_and_replay_says_the_block_is_incomplete(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.jsonl"
    model = ScriptedModelClient()
    model.script("t", ROOT, depth=0)
    model.script("t", CHILD, depth=1)
    trajectory = Trajectory(path)
    try:
        await RLM(model, LossySandbox(model), RunSettings(max_depth=2)).run(
            "What?", CONTEXT, run_id="t", trajectory=trajectory
        )
    finally:
        trajectory.close()
    ends = {
        (e["level"], e["iteration"]): e["records_dropped"]
        for e in read_events(path)
        if e["event"] == "exec_end"
    }
    assert ends == {("0", 1): 0, ("0.1", 1): 0, ("0", 2): 1, ("0", 3): 0}
    report, silent = await replay(path)
    assert report.divergence is not None
    assert (report.divergence.kind, report.divergence.iteration, report.divergence.block) == (
        "incomplete",
        2,
        0,
    )
    assert (
        "the recording of this block is incomplete (1 sub-call record(s) were lost" in report.divergence.what
    )
    assert "sub-call 1 ('say beta')" in report.divergence.what
    assert silent.requests == []


async def test_a_whole_recording_has_no_records_dropped(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    await record(path)
    assert {e["records_dropped"] for e in read_events(path) if e["event"] == "exec_end"} == {0}


async def test_the_built_in_offline_config_names_every_alias_the_recording_used(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    await record(path)

    def rename(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events[0]["settings"]["root_model"] = "boss"
        next(e for e in events if e["event"] == "sub_call")["model"] = "odd.name"
        return events

    rewrite(path, rename)
    config = tomllib.loads(offline_config(Recording.load(path)))
    # root: the model calls still name it; sub: the settings and the other sub-calls do.
    assert config["models"] == {name: {"backend": "echo"} for name in ("boss", "sub", "root", "odd.name")}


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


@pytest.mark.slow
def test_replay_without_a_config_starts_private_services_from_a_built_in_offline_one(tmp_path: Path) -> None:
    """The contract form, ``rlmq replay RUN.jsonl``, in a directory with no rlmq.toml: the
    recording's aliases (here not the defaults) get echo models, none of which is called."""
    recorded_in = tmp_path / "recorded"
    recorded_in.mkdir()
    script = recorded_in / "script.json"
    script.write_text(
        json.dumps(
            [
                "```repl\nlines = context.splitlines()\necho = llm_query_batched(lines)\n```",
                "```repl\nFINAL(' + '.join(echo))\n```",
            ]
        )
    )
    (recorded_in / "rlmq.toml").write_text(
        f'[models.boss]\nbackend = "script"\npath = "{script}"\n\n[models.helper]\nbackend = "echo"\n'
    )
    context = recorded_in / "doc.txt"
    context.write_text("one\ntwo\nthree")
    trajectory = tmp_path / "t.jsonl"
    run = subprocess.run(
        [
            *RLMQ,
            "run",
            "--root-model",
            "boss",
            "--sub-model",
            "helper",
            "-q",
            "Join them",
            "--context",
            str(context),
            "--trajectory",
            str(trajectory),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=recorded_in,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["answer"] == "one + two + three"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [*RLMQ, "replay", str(trajectory), "--json"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=elsewhere,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    verdict = json.loads(done.stdout)
    assert verdict["matched"] is True
    assert verdict["answer"] == verdict["recorded_answer"] == "one + two + three"
    assert verdict["sub_calls_replayed"] == 3
    assert "built-in offline config" in done.stderr
    assert list(elsewhere.iterdir()) == []  # nothing written where it ran


def test_spent_counts_what_the_handler_counted() -> None:
    """A resumed run's limits are less what the handler counted in ``calls``: admitted calls,
    failed or not; never a cache hit (free), a refusal before admission, or a replayed answer."""

    def sub(
        seq: int, *, usage: int = 0, cost: float = 0.0, code: str | None = None, **flags: Any
    ) -> dict[str, Any]:
        error = None if code is None else {"code": code, "message": code, "retryable": False}
        return {
            "event": "sub_call",
            "level": "0",
            "iteration": 1,
            "block": 0,
            "seq": seq,
            "model": "sub",
            "depth": 1,
            "prompt": f"p{seq}",
            "prompt_tail": None,
            "prompt_chars": 2,
            "prompt_sha256": f"{seq:064x}",
            "text": None if code else "ok",
            "usage": {"input_tokens": usage, "output_tokens": usage},
            "cost_usd": cost,
            "cached": flags.get("cached", False),
            "error": error,
            "started_ms": 0.0,
            "latency_ms": 1.0,
            "replayed": flags.get("replayed", False),
            "diverged": flags.get("diverged", False),
        }

    root = {"event": "model_call", "level": "0", "depth": 0, "iteration": 1, "purpose": "iteration"}
    events = [
        {"event": "run_start", "schema": 2, "run": "s", "query": "q", "t": 0.0},
        {**root, "usage": {"input_tokens": 100, "output_tokens": 10}, "cost_usd": 0.5},
        {**root, "usage": {"input_tokens": 0, "output_tokens": 0}, "cached": True},  # a cache hit: free
        sub(0, usage=1, cost=0.01),  # paid
        sub(1, cached=True),  # a cache hit
        sub(2, code="budget_exceeded"),  # refused at admission
        sub(3, code="too_large"),  # refused before admission
        sub(4, code="run_closed"),
        sub(5, code="backend_error"),  # admitted, then failed: counted, nothing spent
        sub(6, code="not_recorded", diverged=True),  # a replay's: never sent
        sub(7, usage=5, replayed=True),  # answered from a recording
        sub(8, usage=2, cost=0.02, diverged=True),  # a changed prompt sent live under a resume: paid
        {"event": "exec_end", "level": "0", "iteration": 1, "block": 0, "t": 2.5},
    ]
    recording = Recording(events)
    assert recording.spent() == {
        "calls": 4,  # the first root call, sub-calls 0, 5 and 8
        "input_tokens": 103,
        "output_tokens": 13,
        "cost_usd": 0.53,
        "elapsed_s": 2.5,
    }
    # Every record with an answer is offered back, the changed prompt's too; not_recorded is none.
    offered = sorted(c.seq for c in recording.sub_calls[("0", 1, 0)])
    assert offered == [0, 1, 2, 3, 4, 5, 8]
