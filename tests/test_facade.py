"""``from rlmq import RLM`` (rlmq.facade): real handler, pool and worker processes, the script backend.

The root models are scripts (DESIGN.md section 3) replayed from the start for each run:
``root`` measures the context and makes one sub-call; ``meet`` answers only when two runs are
in their code at once; ``hold`` waits in its code for a file that never comes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import rlmq
from rlmq import RLM, Progress, Result
from rlmq.orchestrator import SettingsError, local_services
from rlmq.protocol import AsyncHandlerClient, ConfigError

ROOT = Path(__file__).resolve().parent.parent

MEASURE = [
    "Let me look.\n```repl\nn = len(context)\nprint(llm_query('ping'))\n```",
    "```repl\nFINAL(f'{type(context).__name__}:{n}')\n```",
]


def meet_script(meet: Path) -> list[str]:
    # Each run leaves its worker's pid in `meet` and answers with how many runs it met. Two
    # processes share no event, so the model's code polls the folder, with a deadline: run one
    # after the other, the first would give up and answer "1".
    code = textwrap.dedent(
        f"""\
        import os, time
        open(os.path.join({str(meet)!r}, str(os.getpid())), "w").close()
        deadline = time.monotonic() + 20
        while len(os.listdir({str(meet)!r})) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        FINAL(str(len(os.listdir({str(meet)!r}))))
        """
    )
    return [f"```repl\n{code}```"]


def hold_script(flag: Path) -> list[str]:
    code = f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.05)\n"
    return [f"```repl\n{code}```"]


def write_config(directory: Path) -> Path:
    """A config whose root models are scripts and whose sub model echoes."""
    (directory / "meet").mkdir()
    scripts = {
        "root": MEASURE,
        "meet": meet_script(directory / "meet"),
        "hold": hold_script(directory / "never"),
    }
    lines = []
    for alias, script in scripts.items():
        (directory / f"{alias}.json").write_text(json.dumps(script))
        lines += [f"[models.{alias}]", 'backend = "script"', f'path = "{alias}.json"', ""]
    lines += [
        "[models.sub]",
        'backend = "echo"',
        "",
        "[sandbox]",
        "workers = 2",
        "uid_base = false  # the workers write to the test's folder",
        "",
        "[run]",
        "max_iterations = 5",
        "",
        "[serve]  # read by rlmq serve only: the facade must start the services all the same",
        "max_body_bytes = 4096",
    ]
    path = directory / "rlmq.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def children(pid: int) -> dict[int, str]:
    """The live child processes of ``pid``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


def service_children(pid: int) -> dict[int, str]:
    return {p: c for p, c in children(pid).items() if " -m rlmq handler" in c or " -m rlmq sandbox" in c}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("facade"))


@pytest.fixture(scope="module")
def rlm(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RLM]:
    """One RLM for the module: it has its own loop thread, so sync and async tests share it."""
    with RLM.from_config(config, trajectory_dir=tmp_path_factory.mktemp("runs")) as shared:
        yield shared
    assert not service_children(os.getpid())


# ---------------------------------------------------------------- import


def test_import_rlmq_stays_cheap_and_rlm_comes_on_first_use() -> None:
    code = (
        "import sys, rlmq\n"
        "print('rlmq.orchestrator' in sys.modules, 'rlmq.facade' in sys.modules)\n"
        "from rlmq import RLM\n"
        "print(RLM.__module__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split("\n")[:2] == ["False False", "rlmq.facade"]


def test_rlmq_all_names_exist_once() -> None:
    assert sorted(set(rlmq.__all__)) == sorted(rlmq.__all__)
    assert all(hasattr(rlmq, name) for name in rlmq.__all__)
    with pytest.raises(AttributeError):
        _ = rlmq.no_such_name  # type: ignore[attr-defined]


# ---------------------------------------------------------------- a plain script


def test_completion_in_a_plain_script(rlm: RLM) -> None:
    steps: list[tuple[Progress, threading.Thread]] = []
    result = rlm.completion(
        "How long is it?",
        "hello world",
        on_progress=lambda p: steps.append((p, threading.current_thread())),
    )
    assert isinstance(result, Result)
    assert (result.answer, str(result), result.stop_reason, result.ok) == ("str:11", "str:11", "final", True)
    assert (result.iterations, result.calls) == (2, 3)  # two root calls and one llm_query
    assert result.usage.input_tokens > 0
    assert result.usage.output_tokens > 0
    assert result.cost_usd == 0.0
    assert result.error is None
    assert result.detail == ""
    assert result.trajectory is not None
    assert result.trajectory.name == f"{result.run_id}.jsonl"
    events = [json.loads(line)["event"] for line in result.trajectory.read_text().splitlines()]
    assert events[0] == "run_start"
    assert events[-1] == "run_end"
    # Progress comes in the caller's thread, in order, with the run's counts.
    assert {thread for _, thread in steps} == {threading.current_thread()}
    assert [p.event for p, _ in steps] == ["model_call", "exec", "model_call", "exec", "final"]
    assert steps[1][0].sub_calls == 1
    assert steps[-1][0].model_calls == 2
    assert all(p.run_id == result.run_id for p, _ in steps)


def test_context_kinds(rlm: RLM, tmp_path: Path) -> None:
    doc = tmp_path / "doc.txt"
    doc.write_text("twelve chars")
    (tmp_path / "items.json").write_text('["a", "b", "c"]')
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    (folder / "b.txt").write_text("b")
    assert rlm.completion("q", ["x", "y"]).answer == "list:2"
    assert rlm.completion("q", {"k": 1}).answer == "dict:1"
    assert rlm.completion("q", doc).answer == "str:12"  # a Path is read
    assert rlm.completion("q", tmp_path / "items.json").answer == "list:3"
    assert rlm.completion("q", folder).answer == "dict:2"
    assert rlm.completion("q", path=str(doc)).answer == "str:12"  # path= names a file
    # A str is the document itself, even when it names a file that exists.
    assert rlm.completion("q", str(doc)).answer == f"str:{len(str(doc))}"
    assert rlm.completion("q").answer == "str:0"


def test_per_call_limits_and_trajectory(rlm: RLM, tmp_path: Path) -> None:
    where = tmp_path / "one.jsonl"
    result = rlm.completion("q", "abc", max_iterations=1, run_id="run-limits", trajectory=where)
    # One iteration: the script's code runs, then the last call's text is the answer.
    assert (result.stop_reason, result.run_id, result.trajectory) == ("max_iterations", "run-limits", where)
    first = json.loads(where.read_text().splitlines()[0])
    assert first["settings"]["max_iterations"] == 1
    assert rlm.settings.max_iterations == 5  # the [run] table; the call changed nothing


def test_bad_arguments(rlm: RLM, config: Path) -> None:
    with pytest.raises(TypeError, match="unknown limit 'max_iteration'"):
        rlm.completion("q", "x", max_iteration=3)
    with pytest.raises(SettingsError, match="max_iterations"):
        rlm.completion("q", "x", max_iterations=0)
    with pytest.raises(TypeError, match="context must be"):
        rlm.completion("q", 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not both"):
        rlm.completion("q", "x", path="y")
    with pytest.raises(TypeError, match="unknown option 'max_iteration'"):
        RLM.from_config(config, max_iteration=3)
    with pytest.raises(ConfigError, match="does not exist"):
        RLM.from_config(config.parent / "missing.toml")
    with pytest.raises(ValueError, match="REPL has that name"):
        RLM.from_config(config, tools={"llm_query": print})
    with pytest.raises(ValueError, match="Python identifier"):
        RLM.from_config(config, tools={"not a name": print})
    with pytest.raises(TypeError, match="not callable"):
        RLM.from_config(config, tools={"search": 42})
    with pytest.raises(TypeError, match="session's, set when it opens"):
        rlm.session("context").ask("q", max_cost_usd=1.0)
    with pytest.raises(SettingsError, match="not a module name"):
        rlm.session("context", sandbox_modules=["no such module"])


def test_with_options_shares_the_services(rlm: RLM) -> None:
    view = rlm.with_options(root_model="meet", max_iterations=2, trajectory_dir=None)
    assert (view.settings.root_model, view.settings.max_iterations) == ("meet", 2)
    assert rlm.settings.root_model == "root"
    view.close()  # a view owns nothing
    assert not rlm.closed
    assert rlm.completion("q", "ab").answer == "str:2"


# ---------------------------------------------------------------- asyncio


async def test_acompletion_in_an_asyncio_application(rlm: RLM) -> None:
    loop = asyncio.get_running_loop()
    seen: list[bool] = []

    def on_progress(step: Progress) -> None:
        seen.append(asyncio.get_running_loop() is loop)  # called on the caller's loop

    result = await rlm.acompletion("q", "four", on_progress=on_progress)
    assert result.answer == "str:4"
    assert seen
    assert all(seen)


async def test_two_completions_overlap_on_one_rlm(rlm: RLM, config: Path) -> None:
    meet = rlm.with_options(root_model="meet")
    first, second = await asyncio.gather(meet.acompletion("q", "a"), meet.acompletion("q", "b"))
    # Each run's code answered only once both runs were in their code at the same time.
    assert (first.answer, second.answer) == ("2", "2")
    assert first.run_id != second.run_id
    assert len(os.listdir(config.parent / "meet")) == 2


async def test_completion_where_a_loop_is_already_running(rlm: RLM) -> None:
    # A notebook: the blocking call is made from inside a running event loop.
    result = rlm.completion("q", "notebook")
    assert result.answer == "str:8"


async def test_cancelling_acompletion_cancels_the_run(config: Path, tmp_path: Path) -> None:
    rlm = RLM.from_config(config, trajectory_dir=tmp_path, root_model="hold")
    try:
        started = asyncio.Event()
        task = asyncio.create_task(
            rlm.acompletion("q", "x", run_id="run-cancelled", on_progress=lambda p: started.set())
        )
        await started.wait()  # the model replied; its code now waits forever
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await rlm.aclose()  # waits for the cancelled run to finish its trajectory
    end = json.loads((tmp_path / "run-cancelled.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "run_end"
    assert "CancelledError" in end["detail"]


# ---------------------------------------------------------------- life cycle


def test_close_stops_the_private_services(config: Path, tmp_path: Path) -> None:
    before = set(service_children(os.getpid()))
    rlm = RLM.from_config(config, trajectory_dir=None)
    assert set(service_children(os.getpid())) == before  # nothing starts before the first use
    rlm.start()
    mine = set(service_children(os.getpid())) - before
    assert len(mine) == 2  # a handler and a pool
    rlm.close()
    rlm.close()  # idempotent
    assert rlm.closed
    assert not any(alive(pid) for pid in mine)
    with pytest.raises(RuntimeError, match="closed"):
        rlm.completion("q", "x")


def test_interpreter_exit_stops_the_private_services(config: Path) -> None:
    script = textwrap.dedent(
        f"""\
        import os
        from pathlib import Path
        from rlmq import RLM
        rlm = RLM.from_config({str(config)!r}, trajectory_dir=None)
        print(rlm.completion("q", "bye").answer)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat[stat.rindex(")") + 2 :].split()[1]) == os.getpid():
                    print(entry.name)
        # no close(): the interpreter's exit must stop the services
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    answer, *pids = done.stdout.split()
    assert answer == "str:3"
    assert len(pids) >= 2
    assert not any(alive(int(pid)) for pid in pids)


async def test_connect_uses_running_services_and_leaves_them_running(config: Path) -> None:
    async with local_services(_plain(config)) as services:
        async with RLM.connect(
            handler=services.handler, sandbox=services.sandbox, trajectory_dir=None
        ) as rlm:
            result = await rlm.acompletion("q", "connected")
            assert result.answer == "str:9"
            assert rlm.settings.max_iterations == 30  # no config given: the defaults
        async with AsyncHandlerClient(services.handler) as client:
            await client.ping(timeout_s=5)  # still there after the RLM closed


def _plain(config: Path) -> Path:
    """The test config without its [serve] table, for local_services (the handler refuses tables
    it does not know)."""
    text = config.read_text()
    plain = config.with_name("plain.toml")
    if not plain.exists():
        plain.write_text(text[: text.index("[serve]")])
    return plain
