"""``rlmq eval`` end to end: real handler, pool and worker processes, scripted root models.

A root model that reads (its code parses the records and decides each class the way a reader
would, knowing the wording) gets every task right; so does a direct call to a model that answers
from the whole context; the echo model gets every task wrong, by both methods. The reader programs
are first checked in-process over every question shape and several lengths, which is fast, then
driven through the real services at 8K tokens.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlmq.eval import TASKS, AnswerKind, EvalPlan, Results, Task, generate, score
from rlmq.eval.cli import parse_tokens
from rlmq.eval.harness import Progress

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
RLMQ = [sys.executable, "-m", "rlmq"]

# ---------------------------------------------------------------- reader programs (REPL code)
# Each runs in the sandbox with `context`; the question is quoted at the top, as a model copies it.

SNIAH_READER = r"""
import re
if m := re.search(r"The ([A-Z]\w+ \w+) has several current (.+?)s\. ", query):
    shape, keys, what = "all", [m.group(1)], m.group(2)
elif m := re.search(r"What are the current (.+?)s of (.+?)\? ", query):
    shape, keys, what = "each", re.findall(r"the ([A-Z]\w+ \w+)", m.group(2)), m.group(1)
else:
    m = re.search(r"current (.+?) of the (.+?)\? ", query)
    shape, keys, what = "one", [m.group(2)], m.group(1)
doubt = ("former", "guessed", "never", "old ", "no longer", "rejected", "retired", "wrong", "proposed")
forms = [r"^Note that (.+) is the " + what, r"^(.+) is one of the " + what, r" added (.+) to the " + what,
         r"the " + what + r" (.+) as well\.$", what + r": (.+)\.$", r" is (.+)\.$",
         r"the " + what + r" (.+)\.$"]
values = {key: set() for key in keys}
for line in context.splitlines():
    for key in keys:
        if key in line and what in line and not any(w in line for w in doubt):
            for form in forms:
                found = re.search(form, line)
                if found:
                    values[key].add(found.group(1))
                    break
if shape == "all":
    answer = ", ".join(sorted(values[keys[0]]))
else:  # one value a key; several found would show as "a / b", and score 0
    answer = ", ".join(" / ".join(sorted(values[key])) for key in keys)
"""

CLASSIFY = r"""
import re
import datetime as dt
from collections import Counter
CATEGORIES = ["abbreviation", "entity", "description and abstract concept", "human being",
              "location", "numeric value"]
def classify(question):
    q = question.lower()
    if any(w in q for w in ("stand for", "full form", "short for", "abbreviation", "acronym", "letters in")):
        return "abbreviation"
    if any(w in q for w in ("who ", "person", "scientist", "explorer")):
        return "human being"
    if any(w in q for w in ("how many", "population", "what year", "how far", "temperature", "how much",
                            "how tall", "when ")):
        return "numeric value"
    if any(w in q for w in ("where ", "capital", "which country", "river", "highest mountain", "ocean")):
        return "location"
    if any(w in q for w in ("animal", "sport", "instrument", "dish", "colour", "material", "breed")):
        return "entity"
    return "description and abstract concept"
MONTHS = {m: i + 1 for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split())}
def day(text):  # "Mar 04, 2023" (the sandbox does not offer datetime.strptime)
    month, number, year = text.replace(",", "").split()
    return dt.date(int(year), MONTHS[month], int(number))
records = []
for line in context.splitlines():
    m = re.match(r"Date: (.+?) \|\| User: (\d+) \|\| Instance: (.+)$", line)
    records.append((day(m.group(1)), int(m.group(2)), classify(m.group(3))))
counts = Counter(c for _, _, c in records)
ask = query.split("decide each from the question itself. ", 1)[1]
"""

OOLONG_READER = (
    CLASSIFY
    + r"""
if m := re.search(r"from user (\d+) are in the category '(.+?)'", ask):
    answer = str(sum(1 for _, u, c in records if u == int(m.group(1)) and c == m.group(2)))
elif m := re.search(r"dated from (.+?) to (.+?) \(both days included\) are in the category '(.+?)'", ask):
    first, last = day(m.group(1)), day(m.group(2))
    answer = str(sum(1 for d, _, c in records if first <= d <= last and c == m.group(3)))
elif "most common" in ask or "least common" in ask:
    ranked = counts.most_common()
    answer = ranked[0][0] if "most common" in ask else ranked[-1][0]
elif m := re.search(r"Is the category '(.+?)' more common.*the category '(.+?)'\?", ask):
    a, b = counts[m.group(1)], counts[m.group(2)]
    answer = "more common" if a > b else "less common" if a < b else "same frequency"
else:
    m = re.search(r"How many questions are in the category '(.+?)'", ask)
    answer = str(counts[m.group(1)])
"""
)

PAIRS_READER = (
    CLASSIFY
    + r"""
users = {}
for d, u, c in records:
    users.setdefault(u, []).append((d, c))
def n(u, c):
    return sum(1 for _, x in users[u] if x == c)
exactly_one = False
if m := re.search(r"exactly one of the two users has at least (\d+) questions? in the category '(.+?)'", ask):
    meets = {u for u in users if n(u, m.group(2)) >= int(m.group(1))}
    exactly_one = True
elif m := re.search(r"at least (\d+) questions? in the category '(.+?)'", ask):
    meets = {u for u in users if n(u, m.group(2)) >= int(m.group(1))}
elif m := re.search(r"more questions in the category '(.+?)' than in '(.+?)'", ask):
    meets = {u for u in users if n(u, m.group(1)) > n(u, m.group(2))}
elif m := re.search(r"a question in the category '(.+?)' dated after (.+?)\. Count", ask):
    after = day(m.group(2))
    meets = {u for u in users if any(d > after and c == m.group(1) for d, c in users[u])}
else:
    m = re.search(r"neither user has any question in the category '(.+?)'", ask)
    meets = {u for u in users if n(u, m.group(1)) == 0}
ids = sorted(users)
def qualifies(a, b):
    return (a in meets) != (b in meets) if exactly_one else (a in meets and b in meets)
pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if qualifies(a, b)]
answer = "\n".join(f"({a}, {b})" for a, b in pairs)
"""
)

READERS = {"sniah": SNIAH_READER, "oolong": OOLONG_READER, "oolong-pairs": PAIRS_READER}


def reader_script(name: str, tasks: list[Task]) -> list[str]:
    """A root model's responses: one block that reads the context, then the answer.

    A model reads its question in its prompt; the script backend does not see the prompt, so the
    script carries the question of each task it is used for, found by the context's first line.
    """
    queries = {task.context.split("\n", 1)[0]: task.query for task in tasks}
    assert len(queries) == len(tasks)
    code = f"query = {queries!r}[context.split(chr(10), 1)[0]]\n{READERS[name]}\nprint(answer[:500])"
    return [f"I will parse the records and compute the answer.\n```repl\n{code}\n```", "FINAL_VAR(answer)"]


def gold_text(task: Task) -> str:
    """The gold answer written as the question asks for it."""
    gold = task.gold_json()
    if task.kind is AnswerKind.PAIRS:
        return "\n".join(f"({a}, {b})" for a, b in gold)
    return ", ".join(gold) if isinstance(gold, list) else str(gold)


@pytest.mark.parametrize("length", [8_000, 64_000])
@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("name", TASKS)
def test_the_reader_programs_solve_every_question_shape(name: str, index: int, length: int) -> None:
    """In-process, without services: the same code the scripted model sends to the sandbox."""
    task = generate(name, length, seed=11, index=index)
    namespace: dict[str, Any] = {"context": task.context, "query": task.query}
    exec(READERS[name], namespace)
    assert score(task.kind, namespace["answer"], task.gold) == 1.0
    assert score(task.kind, gold_text(task), task.gold) == 1.0


# ---------------------------------------------------------------- through the real processes

SEED = 11
LENGTH = 8_000
# Tasks per eval: sniah's first three are its three questions (single, multi-value, multi-query).
N = {"sniah": 3, "oolong": 1, "oolong-pairs": 1}
WINDOW = 8_000  # the context window of the alias echo_window: an 8K task does not fit with its answer


def alias(prefix: str, name: str) -> str:
    return f"{prefix}_{name.replace('-', '_')}"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """``rlmq up`` with an echo root model, one with a small window, and two scripted aliases a
    task: a reader that runs code over the context (rlm), and one that answers the gold (direct)."""
    tmp = tmp_path_factory.mktemp("eval")
    config = ['[models.root]\nbackend = "echo"\nprice_in_per_mtok = 3.0\nprice_out_per_mtok = 15.0\n']
    config.append('[models.sub]\nbackend = "echo"\n')
    config.append(f'[models.echo_window]\nbackend = "echo"\ncontext_window_tokens = {WINDOW}\n')
    for name in TASKS:
        tasks = [generate(name, LENGTH, seed=SEED, index=i) for i in range(N[name])]
        for prefix, script in (("read", reader_script(name, tasks)), ("gold", [gold_text(tasks[0])])):
            path = tmp / f"{prefix}-{name}.json"
            path.write_text(json.dumps(script))
            table = f'[models.{alias(prefix, name)}]\nbackend = "script"\npath = "{path}"\n'
            config.append(table + "price_in_per_mtok = 1.0\n")
    config.append("[run]\nmax_iterations = 3\n\n[sandbox]\nworkers = 2\n")
    path = tmp / "rlmq.toml"
    path.write_text("\n".join(config))
    handler, sandbox = f"ipc://{tmp}/h.sock", f"ipc://{tmp}/s.sock"
    up = subprocess.Popen(
        [*RLMQ, "up", "--config", str(path), "--handler-bind", handler, "--sandbox-bind", sandbox],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        assert up.stdout is not None
        assert up.stdout.readline().startswith("rlmq up:")  # READY: both services answer
        yield handler, sandbox, path
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
        if up.stdout is not None:
            up.stdout.close()


def run_eval_cli(
    services: tuple[str, str, Path], out: Path, *args: str, n: int = 1
) -> tuple[dict[str, Any], str]:
    handler, sandbox, config = services
    done = subprocess.run(
        [*RLMQ, "eval", "--config", str(config), "--handler", handler, "--sandbox", sandbox,
         "--tokens", "8K", "--n", str(n), "--seed", str(SEED), "--out", str(out), "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def lines_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def events_of(line: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(e) for e in Path(line["trajectory"]).read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_a_model_that_reads_gets_every_task_right(
    services: tuple[str, str, Path], tmp_path: Path, name: str
) -> None:
    summary, _ = run_eval_cli(
        services, tmp_path, "--task", name, "--root-model", alias("read", name), n=N[name]
    )
    assert summary["ran"] == N[name]
    assert summary["failed"] == []
    [row] = summary["rows"]
    assert (row["task"], row["method"], row["length_tokens"], row["n"]) == (name, "rlm", LENGTH, N[name])
    assert row["score"] == 1.0
    lines = sorted(lines_of(tmp_path), key=lambda line: line["index"])
    assert [line["task_id"] for line in lines] == [f"{name}-{LENGTH}-s{SEED}-{i}" for i in range(N[name])]
    for line in lines:
        assert line["stop_reason"] == "final"
        assert line["score"] == 1.0
        assert line["gold"] == generate(name, LENGTH, seed=SEED, index=line["index"]).gold_json()
        assert line["iterations"] == 2
        assert line["calls"] == 2  # two root turns; the reader needs no sub-calls
        assert line["input_tokens"] > 0
        assert line["cost_usd"] > 0
        events = events_of(line)
        assert [e["event"] for e in events][-1] == "run_end"
        assert [e["found"] for e in events if e["event"] == "final_var"] == [True]
    assert Path(summary["plot"]).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_direct_with_a_model_that_reads_the_whole_context_gets_every_task_right(
    services: tuple[str, str, Path], tmp_path: Path, name: str
) -> None:
    """The root model answers the gold in its one call; the call carried the whole context."""
    summary, _ = run_eval_cli(
        services, tmp_path, "--task", name, "--method", "direct", "--root-model", alias("gold", name)
    )
    assert (summary["ran"], summary["failed"]) == (1, [])
    [row] = summary["rows"]
    assert (row["method"], row["score"]) == ("direct", 1.0)
    [line] = lines_of(tmp_path)
    task = generate(name, LENGTH, seed=SEED, index=0)
    assert (line["method"], line["stop_reason"], line["score"]) == ("direct", "final", 1.0)
    assert (line["iterations"], line["calls"], line["cut_tokens"]) == (1, 1, 0)
    assert line["input_tokens"] >= task.context_tokens  # the whole context, in the one call
    assert line["answer"] == gold_text(task)
    ends = [e for e in events_of(line) if e["event"] == "direct_end"]
    assert [(e["stop_reason"], e["cut_tokens"]) for e in ends] == [("final", 0)]


@pytest.mark.slow
def test_direct_cuts_the_context_to_the_root_models_window_with_a_note(
    services: tuple[str, str, Path], tmp_path: Path
) -> None:
    """An 8K task and a window of 8K tokens: with the room kept for the answer it does not fit,
    so its head goes, cut at a line end, with the note. The echo model shows the prompt it got."""
    summary, _ = run_eval_cli(
        services, tmp_path, "--task", "sniah", "--method", "direct", "--root-model", "echo_window"
    )
    assert (summary["ran"], summary["failed"]) == (1, [])
    [line] = lines_of(tmp_path)
    task = generate("sniah", LENGTH, seed=SEED, index=0)
    # The handler refuses a prompt over the model's window: the cut one went through.
    assert (line["stop_reason"], line["calls"]) == ("final", 1)
    assert line["input_tokens"] <= WINDOW
    prompt = line["answer"]
    kept = prompt.split("\n\n[Note", 1)[0].removeprefix("Context:\n\n")
    assert 0 < len(kept) < len(task.context)
    assert task.context.startswith(kept + "\n")  # the head, in whole lines
    assert line["cut_tokens"] == (len(task.context) - len(kept)) // 4 > 0
    assert f"[Note: the context was cut to fit the model's context window of {WINDOW:,} tokens" in prompt
    assert f"of {task.context_tokens:,} tokens are shown above" in prompt
    assert prompt.endswith(f"Question: {task.query}")
    assert line["score"] == 0.0
    assert [e["cut_tokens"] for e in events_of(line) if e["event"] == "direct_end"] == [line["cut_tokens"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_the_echo_model_gets_every_task_wrong_by_both_methods(
    services: tuple[str, str, Path], tmp_path: Path, name: str
) -> None:
    n = N[name]
    summary, _ = run_eval_cli(services, tmp_path, "--task", name, "--method", "rlm,direct", n=n)
    assert summary["ran"] == 2 * n
    assert {(r["method"], r["score"]) for r in summary["rows"]} == {("rlm", 0.0), ("direct", 0.0)}
    assert all(line["score"] == 0.0 for line in lines_of(tmp_path))
    first = {line["method"]: line for line in lines_of(tmp_path) if line["index"] == 0}
    direct = first["direct"]
    assert direct["iterations"] == 1
    assert direct["calls"] == 1
    assert direct["cut_tokens"] == 0  # 8K fits the default window of 128K
    assert generate(name, LENGTH, seed=SEED, index=0).context[:200] in direct["answer"]  # it echoed it all
    assert direct["cost_usd"] > 0
    assert first["rlm"]["stop_reason"] == "max_iterations"

    # Run again into the same directory: nothing is run twice.
    again, stderr = run_eval_cli(services, tmp_path, "--task", name, "--method", "rlm,direct", n=n)
    assert (again["ran"], again["skipped"]) == (0, 2 * n)
    assert f"skipped {2 * n} runs" in stderr
    assert len(lines_of(tmp_path)) == 2 * n


# ---------------------------------------------------------------- without services


def finished_eval(out: Path, task: str = "sniah") -> None:
    """An output directory as an eval leaves it, written by hand."""
    results = Results(out)
    for method, s in (("rlm", 1.0), ("direct", 0.0)):
        record = {"task_id": f"{task}-8000-s0-0", "task": task, "length_tokens": 8000, "method": method}
        spent = {"cost_usd": 0.01, "input_tokens": 100, "output_tokens": 10, "elapsed_s": 1.0}
        results.append({**record, **spent, "score": s, "stop_reason": "final"})


def test_a_resumed_eval_with_nothing_left_needs_no_services(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    finished_eval(tmp_path)
    argv = ["eval", "--task", "sniah", "--tokens", "8000", "--n", "1", "--method", "rlm,direct",
            "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path)]  # fmt: skip
    from rlmq.cli import main

    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped 2 runs" in captured.err
    assert "sniah  rlm" in captured.out
    assert (tmp_path / "plot.png").exists()


def test_an_interrupted_line_is_ignored_and_the_next_one_starts_clean(tmp_path: Path) -> None:
    finished_eval(tmp_path)
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"task_id": "sniah-8000-s0-1", "met')  # killed mid-write
    results = Results(tmp_path)
    assert len(results.load()) == 2
    assert results.unreadable == 1
    results.append({"task_id": "sniah-8000-s0-1", "method": "rlm"})
    assert [r["task_id"] for r in results.load()][-1] == "sniah-8000-s0-1"
    assert EvalPlan("sniah", (8000,), 2, methods=("rlm",)).runs


def test_without_matplotlib_the_eval_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    finished_eval(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    from rlmq.cli import main

    assert main(["eval", "--task", "sniah", "--tokens", "8K", "--n", "1", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "matplotlib is" in line] == [
        "rlmq eval: matplotlib is not installed (pip install 'rlmq[eval]'); no plot"
    ]
    assert not (tmp_path / "plot.png").exists()


def test_without_services_or_config_the_eval_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlmq.cli import main

    missing = str(tmp_path / "none.toml")
    code = main(
        ["eval", "--task", "oolong", "--tokens", "8K", "--config", missing, "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "no --handler/--sandbox given" in capsys.readouterr().err


def test_token_lengths_read_like_the_paper_writes_them() -> None:
    assert parse_tokens("8K,32k, 131072,1M,10M") == (8_000, 32_000, 131_072, 1_000_000, 10_000_000)
    assert parse_tokens("8K,8000") == (8_000,)
    for bad in ("8Q", "20M", "500"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"token count|lengths go"):
            parse_tokens(bad)


def test_the_progress_line_counts_runs_and_stays_off_a_pipe() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    progress = Progress("oolong", 3, screen)
    progress.start()
    progress.start()
    progress.end({"score": 1.0, "cost_usd": 0.5})
    progress.end(None)
    assert progress.line().startswith(
        "eval oolong: 1/3 done (1 failed), 0 running | mean score 100.0% | $0.5000"
    )
    assert screen.getvalue().count("\r\x1b[2K") == 4
    quiet = io.StringIO()
    Progress("oolong", 1, quiet).start()
    assert quiet.getvalue() == ""
