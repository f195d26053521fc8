"""``rlmq run --resume``: a run cut in the middle of a batch goes on from its trajectory, paying
nothing twice. Units on the in-memory fakes, then a real ``rlmq run`` killed with SIGKILL."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from rlmq.orchestrator import run_cli
from rlmq.orchestrator.loop import RLM
from rlmq.orchestrator.replay import Recording, replay_on, resume_on
from rlmq.orchestrator.settings import RunSettings
from rlmq.orchestrator.testing import InMemorySandbox, ScriptedModelClient
from rlmq.orchestrator.trajectory import Trajectory, event_key, read_events
from rlmq.protocol import HandlerClient

CONTEXT = "\n".join(f"line {i}" for i in range(8))
ROOT = [
    "```repl\nlines = context.splitlines()\nprint(len(lines))\n```",
    "```repl\nechoed = llm_query_batched(['say ' + l for l in lines])\nprint(len(echoed))\n```",
    "```repl\ntotal = sum(len(e) for e in echoed)\nprint(total)\n```",
    "FINAL_VAR(total)",
]


async def record(path: Path, run_id: str = "t") -> str:
    model = ScriptedModelClient()
    model.script(run_id, ROOT)
    trajectory = Trajectory(path)
    try:
        result = await RLM(model, InMemorySandbox(model), RunSettings(max_calls=100)).run(
            "How long?", CONTEXT, run_id=run_id, trajectory=trajectory
        )
    finally:
        trajectory.close()
    return result.answer


def cut_after_sub_calls(path: Path, keep: int) -> None:
    """What a crash in the middle of the batch leaves: the lines up to the ``keep``-th sub-call
    record, and half of the next line."""
    lines = path.read_text().splitlines(keepends=True)
    seen, out = 0, []
    for line in lines:
        out.append(line)
        if json.loads(line)["event"] == "sub_call":
            seen += 1
            if seen == keep:
                break
    following = lines[len(out)]
    path.write_text("".join(out) + following[: len(following) // 2])


async def test_a_cut_run_resumes_with_the_same_answer_and_pays_nothing_twice(tmp_path: Path) -> None:
    answer = await record(tmp_path / "whole.jsonl", "whole")
    path = tmp_path / "t.jsonl"
    await record(path)
    cut_after_sub_calls(path, 3)
    recording = Recording.load(path)
    recorded_prompts = {e["prompt"] for e in recording.events if e["event"] == "sub_call"}
    assert len(recorded_prompts) == 3
    live = ScriptedModelClient()
    live.script("t-r1", ROOT[2:])  # what the recording has not answered yet
    trajectory = Trajectory(path, append=True, t_offset_s=float(recording.events[-1]["t"]))
    try:
        result = await resume_on(
            recording, CONTEXT, live=live, sandbox=InMemorySandbox(live), trajectory=trajectory, run_id="t-r1"
        )
    finally:
        trajectory.close()
    assert result.answer == answer
    # Live: only the root calls past the recording and the sub-calls it has no answer for.
    assert len(live.requests_for(model="root")) == 2
    sent = [r.last_user for r in live.requests_for(model="sub")]
    assert len(sent) == 5
    assert not set(sent) & recorded_prompts
    # The budget left is the run's limit less what the recorded part spent (2 root + 3 sub).
    assert live._runs["t-r1"].limits.max_calls == 100 - 5
    # One file: the recording, a resume event, then only what is new.
    events = read_events(path)
    assert [e["event"] for e in events].count("resume") == 1
    assert [e["event"] for e in events].count("run_start") == 1
    keys = Counter(event_key(e) for e in events if e["event"] in ("sub_call", "exec_start", "model_call"))
    assert max(keys.values()) == 1, keys.most_common(3)
    subs = [e for e in events if e["event"] == "sub_call"]
    assert sorted(e["seq"] for e in subs) == list(range(8))
    assert events[-1]["event"] == "run_end"
    assert events[-1]["answer"] == answer


async def test_a_resume_that_no_longer_matches_goes_on_live(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    await record(path)
    cut_after_sub_calls(path, 8)
    recording = Recording.load(path)
    live = ScriptedModelClient()
    live.script("t-r1", ["```repl\nprint('again')\n```", "FINAL(live)"])
    trajectory = Trajectory(None)
    other = CONTEXT  # the same context, but the run's second response will now differ in its request
    recording.calls[1] = recording.calls[1].__class__(
        **{
            **{f: getattr(recording.calls[1], f) for f in recording.calls[1].__dataclass_fields__},
            "messages": (),
        }
    )
    result = await resume_on(
        recording, other, live=live, sandbox=InMemorySandbox(live), trajectory=trajectory, run_id="t-r1"
    )
    assert result.answer == "live"
    assert [e["event"] for e in trajectory.events].count("resume_diverged") == 1


def resume_cli(path: Path, *extra: str) -> int:
    """``rlmq run --resume PATH`` in this process, with no service to reach."""
    parser = argparse.ArgumentParser()
    run_cli.add_arguments(parser)
    return run_cli.main(parser.parse_args(["--resume", str(path), "--handler", "ipc:///nowhere", *extra]))


@pytest.mark.parametrize(("stop_reason", "status"), [("final", 0), ("max_iterations", 0), ("wall_time", 3)])
async def test_resuming_a_run_that_ended_prints_its_answer_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stop_reason: str, status: int
) -> None:
    path = tmp_path / "t.jsonl"
    answer = await record(path)
    lines = path.read_text().splitlines(keepends=True)
    end = json.loads(lines[-1])
    assert end["event"] == "run_end"
    end["stop_reason"] = stop_reason
    path.write_text("".join(lines[:-1]) + json.dumps(end) + "\n")
    before = path.read_text()
    # No handler or pool answers there: a resume that tried to run would fail, not print the answer.
    assert await asyncio.to_thread(resume_cli, path, "--sandbox", "ipc:///nowhere") == status
    out, err = capsys.readouterr()
    assert out == answer + "\n"
    assert f"already ended ({stop_reason})" in err
    assert "nothing to resume" in err
    assert await asyncio.to_thread(resume_cli, path, "--sandbox", "ipc:///nowhere", "--json") == status
    out, _ = capsys.readouterr()
    verdict = json.loads(out)
    assert (verdict["answer"], verdict["stop_reason"], verdict["resumed"]) == (answer, stop_reason, False)
    assert verdict["run_id"] == "t"
    assert path.read_text() == before  # not a line appended


async def test_a_run_that_ended_by_an_error_is_resumed_and_ends_again(tmp_path: Path) -> None:
    """A handler that went away after the second block: the recording has a final and a run_end
    with an error; --resume goes on and writes its own final and run_end after them."""
    answer = await record(tmp_path / "whole.jsonl", "whole")
    path = tmp_path / "t.jsonl"
    await record(path)
    lines = path.read_text().splitlines(keepends=True)
    ends = [i for i, line in enumerate(lines) if json.loads(line)["event"] == "exec_end"]
    kept = lines[: ends[2] + 1]  # three blocks ran; the fourth model call failed
    error = {"code": "unavailable", "message": "the handler went away", "retryable": True}
    t = json.loads(kept[-1])["t"]
    ended = {
        "level": "0",
        "depth": 0,
        "t": t,
        "stop_reason": "error",
        "detail": "unavailable",
        "error": error,
    }
    failed = [
        {"event": "final", **ended, "answer": "", "iterations": 3, "ending": None},
        {
            "event": "run_end",
            **ended,
            "run": "t",
            "answer": "",
            "iterations": 3,
            "elapsed_s": t,
            "usage": None,
        },
    ]
    path.write_text("".join(kept) + "".join(json.dumps(e) + "\n" for e in failed))
    recording = Recording.load(path)
    assert recording.ended
    assert recording.finished is None
    live = ScriptedModelClient()
    live.script("t-r1", ROOT[3:])
    trajectory = Trajectory(path, append=True, t_offset_s=float(recording.events[-1]["t"]))
    try:
        result = await resume_on(
            recording, CONTEXT, live=live, sandbox=InMemorySandbox(live), trajectory=trajectory, run_id="t-r1"
        )
    finally:
        trajectory.close()
    assert result.answer == answer
    assert len(live.requests) == 1  # only the call that had failed
    events = read_events(path)
    root_finals = [e for e in events if e["event"] == "final" and e["level"] == "0"]
    assert [f["stop_reason"] for f in root_finals] == ["error", "final"]
    run_ends = [e for e in events if e["event"] == "run_end"]
    assert [(e["stop_reason"], e["answer"]) for e in run_ends] == [("error", ""), ("final", answer)]
    assert Recording.load(path).finished is not None  # now it has ended for good


async def _resume(path: Path, run_id: str, root: list[str]) -> tuple[str, ScriptedModelClient]:
    recording = Recording.load(path)
    live = ScriptedModelClient()
    live.script(run_id, root)
    trajectory = Trajectory(path, append=True, t_offset_s=float(recording.events[-1]["t"]))
    try:
        result = await resume_on(
            recording, CONTEXT, live=live, sandbox=InMemorySandbox(live), trajectory=trajectory, run_id=run_id
        )
    finally:
        trajectory.close()
    return result.answer, live


def _as_the_pool_wrote_them(path: Path, live_seqs: set[int]) -> None:
    """Mark the resumed part's live sub-call records ``diverged``, as the pool wrote calls past
    the end of a cut block before they were plain live calls (and still writes a call whose prompt
    changed): sent to the handler and paid all the same."""
    lines = path.read_text().splitlines(keepends=True)
    resumed = next(i for i, line in enumerate(lines) if json.loads(line)["event"] == "resume")
    out = lines[: resumed + 1]
    for line in lines[resumed + 1 :]:
        e = json.loads(line)
        if e["event"] == "sub_call" and e["seq"] in live_seqs:
            assert not e["replayed"]
            assert e["error"] is None
            e["diverged"] = True
            line = json.dumps(e) + "\n"
        out.append(line)
    path.write_text("".join(out))


async def test_a_second_resume_gets_the_first_resumes_live_answers_and_counts_what_they_spent(
    tmp_path: Path,
) -> None:
    answer = await record(tmp_path / "whole.jsonl", "whole")
    path = tmp_path / "t.jsonl"
    await record(path)
    cut_after_sub_calls(path, 3)
    first, _ = await _resume(path, "t-r1", ROOT[2:])
    assert first == answer
    _as_the_pool_wrote_them(path, {3, 4, 5, 6, 7})
    # The resumed run is cut again after 6 sub-call records: 3 recorded first, 3 paid by the resume.
    cut_after_sub_calls(path, 6)
    recording = Recording.load(path)
    spent = recording.spent()
    assert spent["calls"] == 2 + 6  # two root calls and every sub-call a handler answered
    subs = [e for e in recording.events if e["event"] == "sub_call"]
    assert spent["input_tokens"] == sum(e["usage"]["input_tokens"] for e in subs) + sum(
        e["usage"]["input_tokens"] for e in recording.events if e["event"] == "model_call"
    )
    assert sorted(c.seq for calls in recording.sub_calls.values() for c in calls) == list(range(6))

    second, live = await _resume(path, "t-r2", ROOT[2:])
    assert second == answer
    sent = sorted(r.last_user for r in live.requests_for(model="sub"))
    assert sent == ["say line 6", "say line 7"]  # the first resume's answers are given back
    assert live._runs["t-r2"].limits.max_calls == 100 - 8


async def test_a_resumed_run_replays_offline_without_a_divergence(tmp_path: Path) -> None:
    answer = await record(tmp_path / "whole.jsonl", "whole")
    path = tmp_path / "t.jsonl"
    await record(path)
    cut_after_sub_calls(path, 3)
    assert (await _resume(path, "t-r1", ROOT[2:]))[0] == answer
    _as_the_pool_wrote_them(path, {3, 4, 5, 6, 7})
    silent = ScriptedModelClient(scripted=())  # records any request: there must be none
    report = await replay_on(Recording.load(path), CONTEXT, InMemorySandbox(silent), Trajectory(None))
    assert report.divergence is None, report.divergence
    assert report.result.answer == answer
    assert silent.requests == []


# ---------------------------------------------------------------- real processes

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
RLMQ = [sys.executable, "-m", "rlmq"]
BATCH = 8
E2E_ROOT = [
    "```repl\nlines = context.splitlines()\nprint(len(lines))\n```",
    "```repl\nechoed = llm_query_batched(['say ' + l for l in lines])\nFINAL(' | '.join(echoed))\n```",
]


def _sub_calls(path: Path) -> int:
    if not path.exists():
        return 0
    return path.read_text().count('"event": "sub_call"')


@pytest.mark.slow
def test_a_killed_run_resumes_with_the_same_answer_and_no_second_payment(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(E2E_ROOT))
    config = tmp_path / "rlmq.toml"
    # The sub model answers two calls at a time, slowly: the batch's records arrive over time.
    config.write_text(
        f'[models.root]\nbackend = "script"\npath = "{script}"\n\n'
        '[models.sub]\nbackend = "echo"\nlatency_ms = 400\nmax_concurrency = 2\n\n[sandbox]\nworkers = 3\n'
    )
    context = tmp_path / "doc.txt"
    context.write_text("\n".join(f"line {i}" for i in range(BATCH)))
    sock_dir = Path(tempfile.mkdtemp(prefix="rlmq-resume-"))
    handler, sandbox = f"ipc://{sock_dir}/h.sock", f"ipc://{sock_dir}/s.sock"
    up = subprocess.Popen(
        [*RLMQ, "up", "--config", str(config), "--handler-bind", handler, "--sandbox-bind", sandbox],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    base = [*RLMQ, "run", "--handler", handler, "--sandbox", sandbox, "--json"]
    try:
        assert up.stdout is not None
        assert up.stdout.readline().startswith("rlmq up:")
        path = tmp_path / "cut.jsonl"
        run = subprocess.Popen(
            [*base, "-q", "Say them", "--context", str(context), "--trajectory", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        # No event tells the test that some records are in: poll the file, bounded.
        deadline = time.monotonic() + 60
        while _sub_calls(path) < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert 2 <= _sub_calls(path) < BATCH, "the run was not caught in the middle of its batch"
        run.send_signal(signal.SIGKILL)
        run.communicate(timeout=30)
        recorded = _sub_calls(path)
        with HandlerClient(handler) as client:
            before = client.stats()["models"]["sub"]["requests"]
        resumed = subprocess.run(
            [*base, "--resume", str(path)], capture_output=True, text=True, env=ENV, timeout=120
        )
        assert resumed.returncode == 0, resumed.stderr
        with HandlerClient(handler) as client:
            after = client.stats()["models"]["sub"]["requests"]
            root_requests = client.stats()["models"]["root"]["requests"]
        # The whole batch again, uninterrupted, for the answer to compare with.
        whole = subprocess.run(
            [
                *base,
                "-q",
                "Say them",
                "--context",
                str(context),
                "--trajectory",
                str(tmp_path / "whole.jsonl"),
            ],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
        assert whole.returncode == 0, whole.stderr
        assert json.loads(resumed.stdout)["answer"] == json.loads(whole.stdout)["answer"]
        # The resumed run sent only the sub-calls that had no record; the root calls were replayed.
        assert after - before == BATCH - recorded
        assert root_requests == 2
        events = read_events(path)
        assert [e["event"] for e in events].count("resume") == 1
        assert sorted(e["seq"] for e in events if e["event"] == "sub_call") == list(range(BATCH))
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.communicate()
