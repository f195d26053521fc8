"""The command line end to end: real handler, pool and worker processes, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
RLMQ = [sys.executable, "-m", "rlmq"]

# A root model that counts the lines mentioning "needle", with a sub-call per chunk.
SCRIPT = [
    "```repl\nlines = context.splitlines()\nprint(len(lines))\n```",
    "```repl\nhits = [l for l in lines if 'needle' in l]\n"
    "echoed = llm_query_batched(['count: ' + h for h in hits])\n"
    "answer = f'{len(echoed)} needles'\nprint(answer)\n```",
    "FINAL_VAR(answer)",
]


def write_config(tmp: Path) -> Path:
    script = tmp / "script.json"
    script.write_text(json.dumps(SCRIPT))
    config = tmp / "rlmq.toml"
    config.write_text(
        f'[models.root]\nbackend = "script"\npath = "{script}"\n\n'
        '[models.sub]\nbackend = "echo"\nlatency_ms = 20\n\n[sandbox]\nworkers = 1\n'
    )
    return config


def context_file(tmp: Path, needles: int, name: str = "doc.txt") -> Path:
    lines = [f"line {i} hay" for i in range(2000)]
    for i in range(needles):
        lines[i * 37 + 5] = f"line {i} has a needle"
    path = tmp / name
    path.write_text("\n".join(lines))
    return path


def test_run_command_answers_and_writes_the_trajectory(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    trajectory = tmp_path / "t.jsonl"
    done = subprocess.run(
        [
            *RLMQ,
            "run",
            "--config",
            str(config),
            "--query",
            "How many needles?",
            "--context",
            str(context_file(tmp_path, 7)),
            "--trajectory",
            str(trajectory),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["answer"] == "7 needles"
    assert out["stop_reason"] == "final"
    assert out["iterations"] == 3
    assert out["usage"]["calls"] == 3 + 7  # root turns and sub-calls
    records = [json.loads(line) for line in trajectory.read_text().splitlines()]
    kinds = [r["event"] for r in records]
    assert kinds[0] == "run_start"
    assert kinds[-1] == "run_end"
    assert kinds.count("model_call") == 3
    assert [r["llm_calls"] for r in records if r["event"] == "exec_end"] == [0, 7]
    assert [r["found"] for r in records if r["event"] == "final_var"] == [True]
    assert records[-1]["answer"] == "7 needles"


def test_run_command_reads_stdin_and_prints_the_bare_answer(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    done = subprocess.run(
        [
            *RLMQ,
            "run",
            "--config",
            str(config),
            "-q",
            "How many?",
            "--context",
            "-",
            "--trajectory",
            str(tmp_path / "t.jsonl"),
        ],
        input=context_file(tmp_path, 3).read_text(),
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3 needles"
    assert "trajectory:" in done.stderr


def test_run_without_services_or_config_says_what_to_do(tmp_path: Path) -> None:
    done = subprocess.run(
        [*RLMQ, "run", "-q", "x", "--context", str(context_file(tmp_path, 1))],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "rlmq.toml" in done.stderr


def test_demo_reports_a_correct_answer(tmp_path: Path) -> None:
    done = subprocess.run(
        [*RLMQ, "demo", "--out", str(tmp_path)], capture_output=True, text=True, timeout=180, env=ENV
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "correct:  yes" in done.stdout
    trajectory = next(tmp_path.glob("run-*.jsonl"))
    kinds = [json.loads(line)["event"] for line in trajectory.read_text().splitlines()]
    assert kinds.count("model_call") == 5
    assert kinds[-1] == "run_end"


def test_two_orchestrators_share_one_rlmq_up(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    sock_dir = Path(tempfile.mkdtemp(prefix="rlmq-up-"))
    handler, sandbox = f"ipc://{sock_dir}/h.sock", f"ipc://{sock_dir}/s.sock"
    up = subprocess.Popen(
        [*RLMQ, "up", "--config", str(config), "--handler-bind", handler, "--sandbox-bind", sandbox],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert up.stdout is not None
        ready = up.stdout.readline()
        assert ready.startswith("rlmq up:"), ready + up.stderr.read() if up.stderr else ""
        runs = [
            subprocess.Popen(
                [
                    *RLMQ,
                    "run",
                    "--handler",
                    handler,
                    "--sandbox",
                    sandbox,
                    "-q",
                    "How many?",
                    "--context",
                    str(context_file(tmp_path, n, f"doc{n}.txt")),
                    "--json",
                    "--trajectory",
                    str(tmp_path / f"t{n}.jsonl"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
            )
            for n in (4, 9)
        ]
        outputs = []
        for proc in runs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out))
        assert [o["answer"] for o in outputs] == ["4 needles", "9 needles"]
        assert [o["usage"]["calls"] for o in outputs] == [3 + 4, 3 + 9]
        assert outputs[0]["run_id"] != outputs[1]["run_id"]
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.communicate()
    assert up.returncode == 0


# Endings real root models write, through `rlmq run` with the script backend (every ending and
# fallback, on the fakes and on in-process services, is tests/test_endings.py).
ENDING_SCRIPTS = {
    "final_var_after_code": (
        [
            "Counting.\n```repl\nhits = [l for l in context.splitlines() if 'needle' in l]\n"
            "count = len(hits)\nprint(count)\n```\nFINAL_VAR(count)"
        ],
        "4",
    ),
    "code_final_var": (
        [
            "```repl\nhits = [l for l in context.splitlines() if 'needle' in l]\n"
            "found = f'{len(hits)} found'\nFINAL_VAR(found)\n```"
        ],
        "4 found",
    ),
    "answer_dict": (
        [
            "```repl\nanswer['content'] = str(sum('needle' in l for l in context.splitlines()))\n"
            "print(answer)\n```",
            "```repl\nanswer['content'] += ' needles'\nanswer['ready'] = True\n```",
        ],
        "4 needles",
    ),
}


@pytest.mark.parametrize("ending", list(ENDING_SCRIPTS))
def test_run_command_ends_the_ways_models_end(tmp_path: Path, ending: str) -> None:
    responses, answer = ENDING_SCRIPTS[ending]
    script = tmp_path / "script.json"
    script.write_text(json.dumps(responses))
    config = tmp_path / "rlmq.toml"
    config.write_text(
        f'[models.root]\nbackend = "script"\npath = "{script}"\n\n'
        '[models.sub]\nbackend = "echo"\n\n[sandbox]\nworkers = 1\n[run]\nendings = "both"\n'
    )
    trajectory = tmp_path / "t.jsonl"
    done = subprocess.run(
        [
            *RLMQ,
            *("run", "--config", str(config), "-q", "How many needles?"),
            *("--context", str(context_file(tmp_path, 4)), "--trajectory", str(trajectory), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["answer"], out["stop_reason"]) == (answer, "final")
    finals = [json.loads(line) for line in trajectory.read_text().splitlines()]
    assert [r["ending"] for r in finals if r["event"] == "final"] == [ending]
